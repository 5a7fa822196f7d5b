"""Configuration: load `config.json` (or YAML), apply environment overrides, validate.

Every key has a default, so an empty file is a valid configuration. Environment variables
override the file: ``TRANSCRIBE__<SECTION>__<KEY>=value`` (double underscores separate the
levels; the value is parsed as JSON when it parses, else taken as a string), e.g.
``TRANSCRIBE__FUNASR__DEVICE=cpu`` or ``TRANSCRIBE__POOL__WORKERS=4``.

Validation errors name the key that is wrong (``pool.workers: ...``), never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from transcribe.core.errors import ConfigError

ENV_PREFIX = "TRANSCRIBE__"
DEFAULT_CONFIG_NAME = "config.json"

DeviceKind = Literal["cuda", "mps", "cpu"]
OUTPUT_FORMATS = ("json", "txt", "srt", "vtt", "tsv")


class _Section(BaseModel):
    # Unknown keys are a typo far more often than a feature: reject them, naming the key.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FunasrConfig(_Section):
    """The FunASR models and how to run them (`funasr.*`)."""

    model: str = "paraformer-zh"
    model_revision: str | None = None
    vad_model: str | None = "fsmn-vad"
    vad_model_revision: str | None = None
    punc_model: str | None = "ct-punc"
    punc_model_revision: str | None = None
    spk_model: str | None = "cam++"
    spk_model_revision: str | None = None
    hub: Literal["ms", "hf"] = "ms"
    device: str = "auto"
    device_priority: list[DeviceKind] = Field(default_factory=lambda: ["cuda", "mps", "cpu"])
    fallback_on_error: bool = True
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    ncpu: int = Field(default=4, ge=1)
    batch_size_s: int = Field(default=300, ge=1)
    disable_update: bool = True
    # Batched CAM++ embeddings (same labels as FunASR's per-segment loop; see docs/benchmarks.md).
    fast_diarization: bool = True
    # Bit-exact CPU scans for the SeACo/BiCif Paraformer CIF loops (src/transcribe/core/fast_cif.py).
    fast_cif: bool = True
    # Batch engine (core/engine/batch_engine.py): seconds of audio (padded length x count) per ASR batch
    # when several jobs share a batch, and CAM++ windows (1.5 s each) per speaker-model forward call.
    # Both bound GPU memory whatever the job's length (an ASR batch: this plus one segment, FunASR's rule).
    engine_batch_s: int = Field(default=300, ge=1)
    engine_spk_batch: int = Field(default=512, ge=1)
    # Extra keyword arguments passed through to AutoModel(...) / generate(...) unchanged.
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    generate_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        v = v.strip().lower()
        if v in ("auto", "cuda", "mps", "cpu"):
            return v
        if v.startswith("cuda:") and v[5:].isdigit():
            return v
        raise ValueError("must be 'auto', 'cuda', 'cuda:N', 'mps' or 'cpu'")

    @field_validator("device_priority")
    @classmethod
    def _check_priority(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must list at least one of 'cuda', 'mps', 'cpu'")
        if len(set(v)) != len(v):
            raise ValueError("must not repeat a device")
        return v


class PoolConfig(_Section):
    """The worker pool and its task directory (`pool.*`)."""

    task_dir: str = "tasks"
    workers: int | Literal["auto"] = 2
    # One device per worker ("cuda:0", "cuda:1", "cpu", ...); None spreads workers over what is found.
    devices: list[str] | None = None
    # forkserver: workers fork from a server process that has imported FunASR once (fast respawn);
    # spawn: each worker imports everything itself. Never fork: CUDA cannot be used after fork.
    start_method: Literal["spawn", "forkserver"] = "forkserver" if sys.platform.startswith("linux") else "spawn"
    settle_seconds: float = Field(default=1.0, ge=0)
    heartbeat_interval: float = Field(default=2.0, gt=0)
    heartbeat_timeout: float = Field(default=60.0, gt=0)
    # A busy worker whose model makes no progress (no FunASR sub-model call starts) for this long
    # stops beating, so the supervisor kills it after heartbeat_timeout and requeues the job.
    job_stall_timeout: float = Field(default=600.0, gt=0)
    boot_timeout: float = Field(default=600.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    shutdown_timeout: float = Field(default=30.0, ge=0)
    max_jobs_per_worker: int = Field(default=0, ge=0)  # 0 = never recycle by count
    # Jobs a worker claims at once and runs through the batch engine (core/pool/batch_runner.py);
    # 1 = one job at a time through the Transcriber. It stops claiming once batch_audio_s of audio is held.
    batch_jobs: int = Field(default=1, ge=1)
    batch_audio_s: float = Field(default=3600.0, gt=0)
    max_rss_mb: int = Field(default=0, ge=0)  # 0 = never recycle by memory
    keep_audio: bool = True
    rescan_interval: float = Field(default=5.0, gt=0)
    respawn_backoff_max: float = Field(default=30.0, gt=0)
    max_sidecar_bytes: int = Field(default=64 * 1024, gt=0)
    umask: int = Field(default=0o027, ge=0, le=0o777)


class OutputConfig(_Section):
    formats: list[str] = Field(default_factory=lambda: ["json", "txt"])

    @field_validator("formats")
    @classmethod
    def _check_formats(cls, v: list[str]) -> list[str]:
        return validate_formats(v)


class InputConfig(_Section):
    allowed_extensions: list[str] = Field(
        default_factory=lambda: [
            ".wav", ".flac", ".ogg", ".mp3", ".m4a", ".mp4", ".aac", ".opus", ".webm",
        ]
    )
    max_file_mb: float = Field(default=4096, gt=0)

    @field_validator("allowed_extensions")
    @classmethod
    def _normalise(cls, v: list[str]) -> list[str]:
        return [e.lower() if e.startswith(".") else "." + e.lower() for e in v]


class LoggingConfig(_Section):
    dir: str = "logs"
    level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR"] = "INFO"
    rotation: str = "20 MB"
    retention: str = "14 days"
    json_lines: bool = False


class NotifyConfig(_Section):
    webhook_url: str | None = None
    timeout_s: float = Field(default=5.0, gt=0)
    retries: int = Field(default=2, ge=0)


class MetricsConfig(_Section):
    textfile: str | None = None


class Config(_Section):
    funasr: FunasrConfig = Field(default_factory=FunasrConfig)
    pool: PoolConfig = Field(default_factory=PoolConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    input: InputConfig = Field(default_factory=InputConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    # Where the file came from: relative paths in it (models, task_dir, logs) resolve against it.
    base_dir: str = Field(default=".", exclude=True)

    def resolve_path(self, p: str) -> Path:
        path = Path(os.path.expanduser(p))
        return path if path.is_absolute() else Path(self.base_dir) / path


def validate_formats(formats: list[str]) -> list[str]:
    out = []
    for f in formats:
        f = f.strip().lower()
        if f not in OUTPUT_FORMATS:
            raise ValueError(f"unknown format {f!r}; choose from {', '.join(OUTPUT_FORMATS)}")
        if f not in out:
            out.append(f)
    return out


def _parse_env_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Return a copy of `data` with every ``TRANSCRIBE__A__B=v`` written at ``data[a][b]``."""
    merged = json.loads(json.dumps(data))
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX):].split("__") if k]
        if not keys:
            continue
        node = merged
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: '{k}' is not a section")
            node = child
        node[keys[-1]] = _parse_env_value(raw)
    return merged


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; docs/configuration.md lists every key)"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text) if text.strip() else {}
    except (json.JSONDecodeError, ValueError) as e:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:] or 'json'}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold an object at the top level")
    return data


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The file to load: the one given, else $TRANSCRIBE_CONFIG, else ./config.json if present."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("TRANSCRIBE_CONFIG")
    if env:
        return Path(env)
    default = Path(DEFAULT_CONFIG_NAME)
    return default if default.is_file() else None


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Load, override from the environment, then from `overrides` (CLI flags), and validate."""
    file = find_config_file(path)
    data: dict[str, Any] = _read_file(file) if file else {}
    data = apply_env_overrides(data, os.environ if environ is None else environ)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        data.setdefault(section, {})[key] = value
    source = str(file) if file else "defaults"
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None
    cfg.base_dir = str(file.parent.resolve()) if file else str(Path.cwd())
    return cfg


def config_from_dict(data: dict[str, Any], base_dir: str | os.PathLike[str] = ".") -> Config:
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, "dict")) from None
    cfg.base_dir = str(Path(base_dir).resolve())
    return cfg
