"""Per-backend FunASR patches, applied where the model is built (each worker; never the supervisor).

A backend module exposes ``NAME``, ``plan(funasr_version)`` and ``apply(funasr_version)`` (idempotent),
both returning patch names,
``model_kwargs(device) -> dict`` (AutoModel arguments that backend needs) and ``after_job()``.
Only MPS needs anything today; CUDA and CPU run FunASR as it is.
"""

from __future__ import annotations

from importlib.metadata import version
from types import ModuleType
from typing import Any

from transcribe.core.engine.patches import mps_patch

_BACKENDS: dict[str, ModuleType] = {mps_patch.NAME: mps_patch}


def _backend(device: str) -> ModuleType | None:
    return _BACKENDS.get(device.split(":", 1)[0])


def apply_patches(device: str, funasr_version: str | None = None) -> list[str]:
    """Apply the patches `device` needs to the installed FunASR; returns what is applied."""
    backend = _backend(device)
    if backend is None:
        return []
    return backend.apply(funasr_version or version("funasr"))


def planned_patches(device: str, funasr_version: str | None = None) -> list[str]:
    """What `apply_patches` would apply for `device`, without applying anything."""
    backend = _backend(device)
    return backend.plan(funasr_version or version("funasr")) if backend else []


def patched_model_kwargs(device: str) -> dict[str, Any]:
    backend = _backend(device)
    return backend.model_kwargs(device) if backend else {}


def after_job(device: str) -> None:
    backend = _backend(device)
    if backend is not None:
        backend.after_job()
