"""Apple MPS patch: make FunASR run on MPS, keep the VAD on the CPU, free MPS memory per job.

What it does, and why:
- ``PYTORCH_ENABLE_MPS_FALLBACK=1``: ops MPS lacks run on the CPU instead of raising. torch
  reads it when it first initialises MPS, so `transcribe.core` also sets it at import, before
  torch is imported in a worker; here it is checked and set again (idempotent).
- FunASR older than 1.2.7 (before FunASR PR #2477) coerces every non-CUDA device to the CPU in
  ``AutoModel.build_model`` when CUDA is absent. On those versions we wrap ``build_model``: the
  original runs unchanged, and if it put an MPS-requested model on the CPU while MPS is available
  we move the model to MPS and restore the device and batch size it dropped. On 1.2.7+ (this
  project pins 1.4.16) the wrapper is not installed: FunASR already honours ``"mps"``.
- fsmn-vad runs one tiny forward per frame; on MPS each pays kernel-launch overhead, 5x slower
  than the CPU (FunASR #3701: 123 s vs 24 s for 121 min of audio). `model_kwargs` pins the VAD
  sub-model to the CPU when the main device is MPS (FunASR 1.4 honours ``vad_kwargs["device"]``).
- After each job `after_job` empties the MPS cache so a long-running worker does not grow.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

from loguru import logger

NAME = "mps"
MPS_NATIVE_SINCE = (1, 2, 7)  # FunASR PR #2477 ("add mac m1 mps support")
_WRAPPED_FLAG = "_transcribe_mps_wrapped"


def parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def needs_build_model_wrapper(funasr_version: str) -> bool:
    return parse_version(funasr_version) < MPS_NATIVE_SINCE


def ensure_mps_fallback_env() -> bool:
    """Set PYTORCH_ENABLE_MPS_FALLBACK=1 unless the user set it; True if it is now '1'."""
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    return os.environ["PYTORCH_ENABLE_MPS_FALLBACK"] == "1"


def wrap_build_model(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap FunASR's static ``AutoModel.build_model`` so an MPS request survives the build."""

    @functools.wraps(original)
    def build_model(**kwargs: Any) -> Any:
        import torch

        wanted = str(kwargs.get("device", ""))
        batch_size = kwargs.get("batch_size")
        model, built = original(**kwargs)
        if wanted.startswith("mps") and built.get("device") == "cpu" and torch.backends.mps.is_available():
            model.to(wanted)
            built["device"] = wanted
            if batch_size is None:
                built.pop("batch_size", None)
            else:
                built["batch_size"] = batch_size
        return model, built

    setattr(build_model, _WRAPPED_FLAG, True)
    return build_model


def plan(funasr_version: str) -> list[str]:
    """What `apply` would install for this FunASR version (for `doctor`); changes nothing."""
    return ["mps.fallback_env"] + (["mps.build_model"] if needs_build_model_wrapper(funasr_version) else [])


def apply(funasr_version: str) -> list[str]:
    """Install what this FunASR version needs; idempotent. Returns the names of what is active."""
    applied = []
    if ensure_mps_fallback_env():
        applied.append("mps.fallback_env")
    if needs_build_model_wrapper(funasr_version):
        from funasr import AutoModel

        current = AutoModel.__dict__["build_model"].__func__
        if not getattr(current, _WRAPPED_FLAG, False):
            AutoModel.build_model = staticmethod(wrap_build_model(current))
            logger.info("mps patch: funasr {} coerces mps to cpu; wrapped AutoModel.build_model", funasr_version)
        applied.append("mps.build_model")
    return applied


def model_kwargs(device: str) -> dict[str, Any]:
    """AutoModel keyword arguments for an MPS run: the VAD stays on the CPU (FunASR #3701)."""
    return {"vad_kwargs": {"device": "cpu"}}


def after_job() -> None:
    import torch

    if torch.backends.mps.is_available():
        torch.mps.empty_cache()
