"""transcribe: production speech transcription on FunASR.

``from transcribe import Transcriber, AsyncTranscriber, Result`` — resolved on first use, so that
``import transcribe`` (the CLI, the supervisor) does not pay for importing torch and FunASR.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["AsyncTranscriber", "Result", "Segment", "Transcriber", "__version__"]

if TYPE_CHECKING:
    from transcribe.core.engine.funasr_transcriber import AsyncTranscriber, Transcriber
    from transcribe.core.engine.result import Result, Segment

_LAZY = {
    "Transcriber": "transcribe.core.engine.funasr_transcriber",
    "AsyncTranscriber": "transcribe.core.engine.funasr_transcriber",
    "Result": "transcribe.core.engine.result",
    "Segment": "transcribe.core.engine.result",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'transcribe' has no attribute {name!r}")
