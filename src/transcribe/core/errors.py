"""Typed errors. Each carries a stable machine-readable `reason` (written into
`failed/<job>.error.json` and `--json` output) and a message a user can act on."""

from __future__ import annotations


class TranscribeError(Exception):
    """Base class: every error the project raises on purpose."""

    reason = "error"
    # Whether retrying the same job could succeed (a crash, a full disk) or not (bad input).
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, object]:
        return {"reason": self.reason, "error_type": type(self).__name__, "message": self.message,
                "retryable": self.retryable}


class ConfigError(TranscribeError):
    reason = "config_invalid"


class DeviceUnavailableError(TranscribeError):
    reason = "device_unavailable"


class ModelLoadError(TranscribeError):
    """A model directory or alias that cannot be loaded."""

    reason = "model_load_failed"


class ModelUnavailableError(ModelLoadError):
    """An alias that is neither cached locally nor downloadable (no network, wrong name)."""

    reason = "model_unavailable"


class AudioError(TranscribeError):
    """Base for problems with an input file."""

    reason = "audio_invalid"


class AudioNotFoundError(AudioError):
    reason = "audio_not_found"


class EmptyAudioError(AudioError):
    reason = "audio_empty"


class UnsupportedFormatError(AudioError):
    reason = "audio_unsupported_format"


class AudioDecodeError(AudioError):
    reason = "audio_undecodable"


class AudioTooLargeError(AudioError):
    reason = "audio_too_large"


class FFmpegMissingError(AudioError):
    reason = "ffmpeg_missing"


class TranscriptionError(TranscribeError):
    """FunASR itself failed on valid audio (out of memory, a bug): may work on retry."""

    reason = "transcription_failed"
    retryable = True


class SpeakerCountError(TranscribeError):
    """More speakers asked for than the audio can be split into (too few speech windows): the same
    request fails the same way every time, so it is the user's to fix, not a retry."""

    reason = "speakers_invalid"


class TranscriptionTimeout(TranscribeError):
    reason = "timeout"
    retryable = True


class SidecarError(TranscribeError):
    reason = "sidecar_invalid"
