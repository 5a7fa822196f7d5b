"""Count, on the CPU, the device-to-host syncs a model output would cost on a GPU.

`DeviceTensor` marks a tensor as if it lived on an accelerator: every tensor computed from it is
marked too, and each read of one into Python (``.item()``, ``int()``, ``__index__``, ``.tolist()``,
``.numpy()``, ...) or copy to the host (``.cpu()``, ``.to("cpu")``) is counted, as CUDA would
block on it. A copy to the host is plain again (later reads cost nothing), as on a GPU.

    with counting() as syncs:
        ...  # code whose model output was wrapped with `mark(y)`
    syncs.total, syncs.by_op
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch

READS = frozenset({"item", "tolist", "numpy", "__index__", "__int__", "__float__", "__bool__"})
COPIES = frozenset({"cpu"})
_counts: list[Counter] = []


class DeviceTensor(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        to_host = name in COPIES or (name == "to" and _to_cpu(args[1:], kwargs or {}))
        if (name in READS or to_host) and _counts:
            _counts[-1][name] += 1
        if to_host:
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **(kwargs or {}))
            return out.as_subclass(torch.Tensor)
        return super().__torch_function__(func, types, args, kwargs)


def _to_cpu(args: tuple, kwargs: dict) -> bool:
    target = kwargs.get("device", args[0] if args else None)
    return str(target).startswith("cpu")


def mark(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, counted as living on the device from now on."""
    return tensor.as_subclass(DeviceTensor)


class Syncs:
    def __init__(self, counts: Counter) -> None:
        self.by_op = counts

    @property
    def total(self) -> int:
        return sum(self.by_op.values())


@contextlib.contextmanager
def counting() -> Iterator[Syncs]:
    counts: Counter = Counter()
    _counts.append(counts)
    try:
        yield Syncs(counts)
    finally:
        _counts.pop()


@contextlib.contextmanager
def punc_logits_on_device(punc_class: type) -> Iterator[None]:
    """Mark the logits of every ``punc_forward`` of `punc_class` (FunASR's CTTransformer) as device tensors."""
    original = punc_class.punc_forward

    def punc_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        y, rest = original(self, *args, **kwargs)
        return mark(y), rest

    punc_class.punc_forward = punc_forward
    try:
        yield
    finally:
        punc_class.punc_forward = original
