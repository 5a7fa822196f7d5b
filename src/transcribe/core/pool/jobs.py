"""What a job is: its options (sidecar or `submit`), its record (job.json), a claimed job, and the
machine-readable record of an error. Pure data; the folder protocol is `task_dir.py`.

File names are carried as Python does (``os.fsdecode``: bytes that are not UTF-8 become surrogates,
so the file can still be renamed); in JSON a name is written printable, and when it is not valid
UTF-8 its exact bytes are kept beside it as ``<key>_b64`` so nothing is lost.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import unicodedata
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from transcribe.core.fsio import NAME_MAX, dumps_json, printable

if TYPE_CHECKING:
    from transcribe.core.pool.task_dir import Lease

_SAFE_STEM = re.compile(r"[^\w.-]+", re.UNICODE)


def new_job_id(original_name: str) -> str:
    """Time-ordered and unique: ``20261123T190812123-1f3a9c2b-meeting`` (sortable, keeps the stem)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")[:-3]
    return f"{stamp}-{uuid.uuid4().hex[:8]}-{safe_stem(original_name)}"


def safe_stem(original_name: str) -> str:
    """A file name's stem reduced to letters, digits, ``_``, ``.`` and ``-`` (never a path): ``audio`` if empty."""
    stem = unicodedata.normalize("NFC", printable(Path(original_name.replace("\\", "/")).stem))
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


SIDECAR_SUFFIX = ".json"


def sidecar_candidates(audio_name: str) -> list[str]:
    """The names a sidecar of `audio_name` may have, in order: ``<name>.json`` (``talk.wav.json``), then
    ``<stem>.json`` (``talk.json``); never the audio's own name, never one over NAME_MAX bytes. The one rule
    the scan, the claim and recovery all use."""
    stem = audio_name.rsplit(".", 1)[0] if "." in audio_name[1:] else audio_name
    names = dict.fromkeys((audio_name + SIDECAR_SUFFIX, stem + SIDECAR_SUFFIX))
    return [n for n in names if n != audio_name and len(os.fsencode(n)) <= NAME_MAX]


def name_bytes(name: str) -> bytes:
    return os.fsencode(name)


def name_problem(name: str) -> tuple[str, str] | None:
    """Why an inbox entry called `name` can never be processed: (reason, how to fix), or None."""
    raw = name_bytes(name)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "name_invalid", (f"the file name {raw!r} is not valid UTF-8 (names from an SMB share or a zip are "
                                f"often Latin-1); rename it to UTF-8 (e.g. `convmv -f latin1 -t utf8`) and drop "
                                f"it again")
    if len(raw) > NAME_MAX - len(SIDECAR_SUFFIX):
        return "name_too_long", (f"the file name is {len(raw)} bytes; names over {NAME_MAX - len(SIDECAR_SUFFIX)} "
                                 f"bytes leave no room for its sidecar <name>.json ({NAME_MAX}-byte limit); "
                                 f"rename it shorter and drop it again")
    return None


def name_to_json(key: str, name: str) -> dict[str, str]:
    """``{key: printable name}``, plus ``{key}_b64`` with the exact bytes when they are not UTF-8."""
    out = {key: printable(name)}
    if out[key] != name:
        out[f"{key}_b64"] = base64.b64encode(name_bytes(name)).decode("ascii")
    return out


def name_from_json(d: dict[str, Any], key: str) -> str:
    if f"{key}_b64" in d:
        return os.fsdecode(base64.b64decode(d[f"{key}_b64"]))
    return str(d[key])


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
    lease_token: str | None = None  # the token of the lease that claimed it last (checked at commit)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(name_to_json("original_name", self.original_name))
        d.update(name_to_json("audio_name", self.audio_name))
        return d

    def to_json(self) -> str:
        return dumps_json(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> JobRecord:
        d = json.loads(text)
        return cls(job_id=str(d["job_id"]), original_name=name_from_json(d, "original_name"),
                   audio_name=name_from_json(d, "audio_name"), created=str(d["created"]),
                   attempts=int(d.get("attempts", 0)), history=list(d.get("history", [])),
                   options=d.get("options"), claimed=d.get("claimed"), lease_token=d.get("lease_token"))


@dataclass
class Job:
    """A claimed job: its directory under processing/, its record, and the lease that fences it.

    `lease` is what makes the holder the owner: an open, flocked lock file (see `task_dir.Lease`).
    `TaskDir.complete/fail/release` act only while it is held and its token matches job.json.
    """

    dir: Path
    record: JobRecord
    lease: Lease | None = None

    @property
    def job_id(self) -> str:
        return self.record.job_id

    @property
    def audio_path(self) -> Path:
        return self.dir / self.record.audio_name

    @property
    def extension(self) -> str:
        return Path(self.record.original_name).suffix.lower()


class LeaseLost(TranscribeError):
    """The job is no longer ours (requeued and claimed again, or moved by hand): nothing of it is touched."""

    reason = "lease_lost"
    retryable = False


class RefusedInput(TranscribeError):
    """An inbox entry that is refused for safety, with its own reason code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def error_info(exc: BaseException) -> dict[str, Any]:
    """The machine-readable record of an error, for error.json and job history."""
    if isinstance(exc, ReportedError):
        return exc.to_dict()  # another process's record (a Ray actor's), already public and printable
    if isinstance(exc, TranscribeError):
        return {**exc.to_dict(), "error_type": public_type_name(exc), "message": printable(exc.message)}
    if isinstance(exc, OSError) and exc.errno is not None:
        code = errno.errorcode.get(exc.errno, str(exc.errno))
        return {"reason": code, "error_type": public_type_name(exc), "message": printable(str(exc)),
                "retryable": True}
    return {"reason": "internal_error", "error_type": public_type_name(exc), "message": printable(str(exc)),
            "retryable": True}


def public_type_name(exc: BaseException) -> str:
    """The first public class name in the exception's MRO (a private helper class never leaks out)."""
    return next((c.__name__ for c in type(exc).__mro__ if not c.__name__.startswith("_")), "Exception")


class ReportedError(TranscribeError):
    """An error another process reported as its `error_info` record (a Ray actor's), kept as it was."""

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__(str(info.get("message", "unknown error")))
        self.info = dict(info)
        self.reason = str(info.get("reason", "error"))
        self.retryable = bool(info.get("retryable", True))

    def to_dict(self) -> dict[str, object]:
        return dict(self.info)
