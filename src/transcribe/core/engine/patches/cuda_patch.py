"""CUDA patch: keep PyTorch's CUDA memory cache across FunASR's sub-model calls.

FunASR's ``AutoModel.inference`` (funasr/auto/auto_model.py, read from 1.4.16) ends every call with
``torch.cuda.empty_cache()``. A diarized job makes one such call per ASR batch and one per VAD segment
for CAM++ (some 170 for ten minutes of audio): each hands every cached block back to the driver
(``cudaFree``, which waits for the device), and the next call's tensors come back through
``cudaMalloc``. Several pool workers on one GPU (CUDA MPS) pay those driver calls against each other.

`apply` wraps ``torch.cuda.empty_cache`` so that the call is skipped when FunASR's ``auto_model`` module
makes it (the calling frame's module is checked); every other caller (this project's out-of-memory
fallback, user code) empties the cache as before. The numbers computed do not change; a worker keeps
the memory of its largest job reserved, as PyTorch's caching allocator does in any process, and the
next job reuses it (the pool reports it per worker).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

NAME = "cuda"
PATCH = "cuda.keep_cache"
VERIFIED_FUNASR = ("1.4.",)  # AutoModel.inference empties the cache after every call (read from 1.4.16)
CALLER_MODULE = "funasr.auto.auto_model"
_WRAPPED_FLAG = "_transcribe_keeps_cache_for"


def supported(funasr_version: str) -> bool:
    return funasr_version.split("+")[0].startswith(VERIFIED_FUNASR)


def skip_for_caller(original: Callable[[], None], caller_module: str) -> Callable[[], None]:
    """`original` (``torch.cuda.empty_cache``), doing nothing when `caller_module` calls it."""

    @functools.wraps(original)
    def empty_cache() -> None:
        if sys._getframe(1).f_globals.get("__name__") == caller_module:
            return None
        return original()

    setattr(empty_cache, _WRAPPED_FLAG, caller_module)
    return empty_cache


def plan(funasr_version: str) -> list[str]:
    """What `apply` would install for this FunASR version (for `doctor`); changes nothing."""
    return [PATCH] if supported(funasr_version) else []


def apply(funasr_version: str) -> list[str]:
    """Install the wrapper (idempotent, process-wide); returns the names of what is active."""
    if not supported(funasr_version):
        return []
    import torch

    if getattr(torch.cuda.empty_cache, _WRAPPED_FLAG, None) != CALLER_MODULE:
        torch.cuda.empty_cache = skip_for_caller(torch.cuda.empty_cache, CALLER_MODULE)
    return [PATCH]


def model_kwargs(device: str) -> dict[str, Any]:
    return {}


def after_job() -> None:
    """Nothing: the cache is what the next job reuses."""
