"""Punctuation (CT-Transformer, ct-punc) with one device-to-host transfer per mini-sentence, for FunASR 1.4.16.

FunASR's ``CTTransformer.inference`` (funasr/models/ct_transformer/model.py) splits the text into
mini-sentences of ``split_size`` tokens and, for each one in turn, runs the transformer and picks
each token's mark with ``y.view(-1, C).topk(1, dim=1)``. That index tensor stays on the model's
device, and the rest of the loop reads it one element at a time from Python:
``self.punc_list[punctuations[i]]`` up to three times per token in the search for the carried tail
and up to four times per token while building the text, each an ``__index__`` (a ``.item()``);
then ``punctuations.cpu()`` and a ``torch.cat`` into ``punc_array``. After ``inference`` returns,
FunASR's sentence building (``timestamp_sentence`` in funasr/utils/timestamp_tools.py, called from
``AutoModel.inference_with_vad``) iterates ``punc_array`` with ``int(punc_id)`` per token. On a GPU
each of those reads is a host sync: about five per token (3.9 in the loop, measured, and one building
sentences), some 22,000 for the 4,495 tokens of a 10-minute job (docs/benchmarks.md#punctuation).

Here, for the duration of one ``inference`` call, ``punc_forward`` hands FunASR a host one-hot of
the device's decision instead of the device logits: FunASR's own ``topk(1)`` runs on the device
(the same op, so the same choice among equal logits), the indices come to the host in one transfer,
and a one-hot row (a single 1 among 0s) makes FunASR's ``topk(1)`` on the host pick that same index.
Every later line of FunASR's loop then runs unchanged on host tensors holding the same values: the
same text and the same ``punc_array`` values (a CPU tensor, where FunASR's is on the model's device;
FunASR's assembly reads it only through ``int()`` and ``len()``). The wrap runs on the CPU as well
(where it changes nothing but costs one small topk per mini-sentence), so CI exercises the code the
GPU runs. ``tests/test_fast_punc.py`` checks text and ``punc_array`` against FunASR's own on long
mixed texts, and tests/test_parity.py whole transcripts.

Then the sentence building: ``timestamp_sentence`` and ``timestamp_sentence_en`` iterate ``punc_array``
(``Tensor.__iter__``, one 0-d tensor per token) and ``int()`` each element: a sync per token on a GPU
(FunASR's own array lives there), ~1 us per token on the host. Their names in ``funasr.auto.auto_model`` are
wrapped to hand them ``punc_array.tolist()`` instead (one transfer): ``int()`` of a Python int is the
same number, ``len`` the same length, so the same sentences. That wrap is process-wide (module
names), like `fast_cif`; `funasr_own` restores FunASR's functions for a comparison.

Only ``CTTransformer`` on FunASR 1.4.16 is wrapped (the lines above were read from that version);
other punctuation models and versions run FunASR's own code. ``funasr.fast_punc: false`` turns it off.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from loguru import logger

NAME = "fast_punc"
VERIFIED_FUNASR = ("1.4.16",)
MODEL_CLASSES = ("CTTransformer",)  # not CTTransformerStreaming (VadRealtimeTransformer): another loop
SENTENCE_MODULE = "funasr.auto.auto_model"  # imports these by name from funasr.utils.timestamp_tools
SENTENCE_FUNCTIONS = ("timestamp_sentence", "timestamp_sentence_en")
_ORIGINAL_SENTENCES: dict[str, Callable[..., Any]] = {}


def host_decision(forward: Callable[..., tuple[torch.Tensor, Any]]) -> Callable[..., tuple[torch.Tensor, Any]]:
    """`forward` (a ``punc_forward``) whose logits are replaced by a host one-hot of their device argmax."""

    def punc_forward(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        y, rest = forward(*args, **kwargs)
        flat = y.view(-1, y.shape[-1])
        _, indices = flat.topk(1, dim=1)  # FunASR's op, on the model's device
        one_hot = torch.zeros(flat.shape, dtype=torch.float32).scatter_(1, indices.cpu(), 1.0)  # one transfer
        return one_hot.view(y.shape), rest

    return punc_forward


class HostDecisionInference:
    """Replaces one CTTransformer instance's ``inference``; ``enabled`` is read at each call."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.original: Callable[..., Any] = model.inference
        self.enabled = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return self.original(*args, **kwargs)
        model = self.model
        shadowed = model.__dict__.get("punc_forward")  # an instance-level wrapper someone else set, if any
        model.punc_forward = host_decision(model.punc_forward)
        try:
            return self.original(*args, **kwargs)
        finally:
            if shadowed is None:
                del model.punc_forward  # the class's own method again
            else:
                model.punc_forward = shadowed


def marks_as_list(original: Callable[..., Any]) -> Callable[..., Any]:
    """FunASR's sentence builder, handed its first argument (punc_array) as a list of ints."""

    @functools.wraps(original)
    def sentences(punc_id_list: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.is_tensor(punc_id_list) and punc_id_list.dim() == 1 and not punc_id_list.is_floating_point():
            punc_id_list = punc_id_list.tolist()  # one transfer; FunASR int()s each element
        return original(punc_id_list, *args, **kwargs)

    sentences.fast_punc_wrapped = True  # type: ignore[attr-defined]
    return sentences


def install_sentences() -> None:
    module = importlib.import_module(SENTENCE_MODULE)
    for name in SENTENCE_FUNCTIONS:
        current = getattr(module, name)
        if not getattr(current, "fast_punc_wrapped", False):
            _ORIGINAL_SENTENCES[name] = current
            setattr(module, name, marks_as_list(current))


def uninstall_sentences() -> None:
    module = importlib.import_module(SENTENCE_MODULE)
    for name, original in _ORIGINAL_SENTENCES.items():
        setattr(module, name, original)


@contextlib.contextmanager
def funasr_own(wrapper: HostDecisionInference | None) -> Iterator[None]:
    """FunASR's own punctuation loop and sentence building for the duration (tests and benchmarks)."""
    installed = any(getattr(getattr(importlib.import_module(SENTENCE_MODULE), n), "fast_punc_wrapped", False)
                    for n in SENTENCE_FUNCTIONS)
    if wrapper is not None:
        wrapper.enabled = False
    uninstall_sentences()
    try:
        yield
    finally:
        if wrapper is not None:
            wrapper.enabled = True
        if installed:
            install_sentences()


def supported(funasr_version: str) -> bool:
    return funasr_version.split("+")[0] in VERIFIED_FUNASR


def install(punc_model: Any, funasr_version: str) -> HostDecisionInference | None:
    """Wrap this punctuation model's ``inference`` (idempotent); None where FunASR's own code runs."""
    if punc_model is None:
        return None
    if type(punc_model).__name__ not in MODEL_CLASSES or not supported(funasr_version):
        logger.info("fast punctuation not verified for {} on funasr {}: FunASR's own loop runs",
                    type(punc_model).__name__, funasr_version)
        return None
    install_sentences()
    current = punc_model.__dict__.get("inference")
    if isinstance(current, HostDecisionInference):
        return current
    wrapper = HostDecisionInference(punc_model)
    punc_model.inference = wrapper  # instance attribute: found before the class's method
    return wrapper
