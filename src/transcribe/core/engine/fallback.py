"""Runtime device fallback: what to do when a job's GPU/MPS run fails for the device's sake.

A failure is the device's (not the audio's) when it is out of memory or an operator the backend
lacks: ``torch.OutOfMemoryError`` (CUDA, and MPS's "MPS backend out of memory"), a CPU allocator
failure, ``NotImplementedError``, or a RuntimeError naming an operator MPS does not implement
(long MPS inputs crash in FunASR's CIF ``index_select``). `retry_plan` says what the
`Transcriber` tries next for that one job: half the batch (``batch_size_s``) on the same device
for out-of-memory, then the CPU (a CPU copy of the models, built once on first need and kept).
The worker's own device is not changed: the next job starts there again. Pure: no torch import
unless an exception is classified.
"""

from __future__ import annotations

from dataclasses import dataclass

OUT_OF_MEMORY = "out_of_memory"
UNSUPPORTED_OPERATOR = "unsupported_operator"

_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate")
_OPERATOR_MESSAGES = ("not implemented for", "not currently implemented for the mps device",
                      "not supported on mps", "unsupported on mps", "mps backend", "index_select")


def device_failure_reason(exc: BaseException) -> str | None:
    """`OUT_OF_MEMORY`, `UNSUPPORTED_OPERATOR`, or None for a failure that another device would not fix."""
    import torch

    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    if oom_types and isinstance(exc, oom_types):
        return OUT_OF_MEMORY
    if isinstance(exc, NotImplementedError):
        return UNSUPPORTED_OPERATOR
    if isinstance(exc, (RuntimeError, MemoryError, IndexError)):  # MPS reports index_select failures either way
        text = str(exc).lower()
        if isinstance(exc, MemoryError) or any(m in text for m in _OOM_MESSAGES):
            return OUT_OF_MEMORY
        if any(m in text for m in _OPERATOR_MESSAGES):
            return UNSUPPORTED_OPERATOR
    return None


@dataclass(frozen=True)
class Attempt:
    device: str  # where to run: the worker's device or "cpu"
    batch_size_s: int


def retry_plan(reason: str, device: str, batch_size_s: int) -> list[Attempt]:
    """The attempts after a failure: smaller batches first (out of memory only), then the CPU.

    On the CPU itself only the smaller batch is left to try (an operator the CPU lacks is a bug,
    not a device limit)."""
    plan = []
    if reason == OUT_OF_MEMORY and batch_size_s > 1:
        plan.append(Attempt(device, max(batch_size_s // 2, 1)))
    if not device.startswith("cpu"):
        plan.append(Attempt("cpu", batch_size_s))
    return plan


def release_device_memory(device: str) -> None:
    """Give the failed attempt's cached blocks back before the next one."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device.startswith("mps") and torch.backends.mps.is_available():
        torch.mps.empty_cache()
