"""What a job is: its options (sidecar or `submit`), its record (job.json), a claimed job, and the
machine-readable record of an error. Pure data; the folder protocol is `task_dir.py`."""

from __future__ import annotations

import errno
import json
import re
import unicodedata
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from transcribe.config import Config, describe_validation_errors, validate_formats
from transcribe.core.engine.formats import SubtitleLayout
from transcribe.core.engine.options import MAX_SPEAKERS, option_problems
from transcribe.core.errors import SidecarError, TranscribeError

_SAFE_STEM = re.compile(r"[^\w.-]+", re.UNICODE)


def new_job_id(original_name: str) -> str:
    """Time-ordered and unique: ``20261123T190812123-1f3a9c2b-meeting`` (sortable, keeps the stem)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")[:-3]
    return f"{stamp}-{uuid.uuid4().hex[:8]}-{safe_stem(original_name)}"


def safe_stem(original_name: str) -> str:
    """A file name's stem reduced to letters, digits, ``_``, ``.`` and ``-`` (never a path): ``audio`` if empty."""
    stem = unicodedata.normalize("NFC", Path(original_name.replace("\\", "/")).stem)
    return _SAFE_STEM.sub("_", stem).strip("._-")[:60] or "audio"


def check_speakers(n: int) -> int:
    """A speaker count (``--speakers``, a sidecar's ``speakers``): 1..MAX_SPEAKERS; leaving it out means auto."""
    if n == 0:
        raise ValueError("0 is not a speaker count: leave it out for automatic detection, "
                         f"or give the number of speakers (1 to {MAX_SPEAKERS})")
    if not 1 <= n <= MAX_SPEAKERS:
        raise ValueError(f"{n} is not a speaker count: give 1 to {MAX_SPEAKERS}, or leave it out for automatic "
                         "detection")
    return n


class JobOptions(BaseModel):
    """Per-job options from a sidecar JSON file (or `submit` flags). Unknown keys are an error."""

    model_config = ConfigDict(extra="forbid")

    speakers: int | None = None
    # Bounds on CAM++'s estimated speaker count (not together with speakers).
    min_speakers: int | None = Field(default=None, ge=1, le=MAX_SPEAKERS)
    max_speakers: int | None = Field(default=None, ge=1, le=MAX_SPEAKERS)
    diarize: bool | None = None  # false: no speaker model for this job (None: true, left out of job.json)
    hotwords: list[str] | None = Field(default=None, max_length=1000)
    formats: list[str] | None = None
    priority: int = Field(default=0, ge=-100, le=100)
    batch_size_s: int | None = Field(default=None, ge=1)  # None: funasr.batch_size_s
    word_timestamps: bool | None = None  # None: output.word_timestamps
    max_line_width: int | None = Field(default=None, ge=1)  # None: output.max_line_width
    max_line_count: int | None = Field(default=None, ge=1)  # None: output.max_line_count
    cache: bool | None = None  # false: neither read nor write the result cache for this job (None: true)

    @model_validator(mode="after")
    def _speaker_options(self) -> "JobOptions":
        problems = option_problems(speakers=self.speakers, min_speakers=self.min_speakers,
                                   max_speakers=self.max_speakers, diarize=self.diarize is not False)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def engine_kwargs(self, cfg: Config) -> dict[str, Any]:
        """The keyword arguments of `Transcriber.transcribe` for this job."""
        return {"speakers": self.speakers, "min_speakers": self.min_speakers, "max_speakers": self.max_speakers,
                "diarize": self.diarize is not False, "hotwords": self.hotwords, "batch_size_s": self.batch_size_s,
                "word_timestamps": cfg.output.word_timestamps if self.word_timestamps is None
                else self.word_timestamps, "use_cache": self.cache is not False}

    def layout(self, cfg: Config) -> SubtitleLayout:
        """srt/vtt line limits: this job's, else the configuration's."""
        return SubtitleLayout(self.max_line_width or cfg.output.max_line_width,
                              self.max_line_count or cfg.output.max_line_count)

    @field_validator("speakers")
    @classmethod
    def _speakers(cls, v: int | None) -> int | None:
        return None if v is None else check_speakers(v)

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else validate_formats(v)

    @field_validator("hotwords")
    @classmethod
    def _hotwords(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(len(w) > 100 or not w.strip() for w in v):
            raise ValueError("each hotword must be a non-empty string of at most 100 characters")
        return v


def parse_options(raw: bytes, max_bytes: int) -> JobOptions:
    """Validate sidecar bytes; raises `SidecarError` naming what is wrong."""
    if len(raw) > max_bytes:
        raise SidecarError(f"sidecar is {len(raw)} bytes, over the {max_bytes}-byte limit")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SidecarError(f"sidecar is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise SidecarError("sidecar must be a JSON object such as {\"speakers\": 2}")
    try:
        return JobOptions.model_validate(data)
    except ValidationError as e:
        raise SidecarError(f"sidecar rejected: {'; '.join(describe_validation_errors(e, JobOptions))}") from None


@dataclass
class JobRecord:
    """job.json: what a job is, carried with it from state to state."""

    job_id: str
    original_name: str
    audio_name: str  # the audio file's name inside the job dir
    created: str
    attempts: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per attempt that ended badly
    options: dict[str, Any] | None = None  # validated options (from submit); a raw sidecar.json otherwise
    claimed: float | None = None  # unix time of the latest claim (inbox-to-claim latency)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, ensure_ascii=False, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "JobRecord":
        d = json.loads(text)
        return cls(job_id=str(d["job_id"]), original_name=str(d["original_name"]), audio_name=str(d["audio_name"]),
                   created=str(d["created"]), attempts=int(d.get("attempts", 0)), history=list(d.get("history", [])),
                   options=d.get("options"), claimed=d.get("claimed"))


@dataclass
class Job:
    """A claimed job: its directory under processing/ and its record."""

    dir: Path
    record: JobRecord

    @property
    def job_id(self) -> str:
        return self.record.job_id

    @property
    def audio_path(self) -> Path:
        return self.dir / self.record.audio_name

    @property
    def extension(self) -> str:
        return Path(self.record.original_name).suffix.lower()


class RefusedInput(TranscribeError):
    """An inbox entry that is refused for safety, with its own reason code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def error_info(exc: BaseException) -> dict[str, Any]:
    """The machine-readable record of an error, for error.json and job history."""
    if isinstance(exc, TranscribeError):
        return exc.to_dict()
    if isinstance(exc, OSError) and exc.errno is not None:
        code = errno.errorcode.get(exc.errno, str(exc.errno))
        return {"reason": code, "error_type": type(exc).__name__, "message": str(exc), "retryable": True}
    return {"reason": "internal_error", "error_type": type(exc).__name__, "message": str(exc), "retryable": True}


class ReportedError(TranscribeError):
    """An error another process reported as its `error_info` record (a Ray actor's), kept as it was."""

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__(str(info.get("message", "unknown error")))
        self.info = dict(info)
        self.reason = str(info.get("reason", "error"))
        self.retryable = bool(info.get("retryable", True))

    def to_dict(self) -> dict[str, object]:
        return dict(self.info)
