"""Configuration: load `config.json` (or YAML), apply environment overrides, validate.

Every key has a default, so an empty file is a valid configuration. Environment variables
override the file: ``TRANSCRIBE__<SECTION>__<KEY>=value`` (double underscores separate the
levels; the value is parsed as JSON when it parses, else taken as a string), e.g.
``TRANSCRIBE__FUNASR__DEVICE=cpu`` or ``TRANSCRIBE__POOL__WORKERS=4``.

Validation errors name the key that is wrong (``pool.workers: ...``), never a traceback.
"""

from __future__ import annotations

import difflib
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
OUTPUT_FORMATS = ("json", "txt", "srt", "vtt", "tsv", "rttm")
ALL_FORMATS = "all"  # in a format list: every one of OUTPUT_FORMATS


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
    # A job whose GPU/MPS run fails with out-of-memory or a missing operator is retried with half the
    # batch, then on the CPU (engine/fallback.py); False: such a job fails (retryable) instead.
    runtime_fallback: bool = True
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    ncpu: int = Field(default=4, ge=1)
    batch_size_s: int = Field(default=300, ge=1)
    disable_update: bool = True
    # Batched CAM++ embeddings (same labels as FunASR's per-segment loop; see docs/benchmarks.md).
    fast_diarization: bool = True
    # Bit-exact CPU scans for the SeACo/BiCif Paraformer CIF loops (src/transcribe/core/fast_cif.py).
    fast_cif: bool = True
    # ct-punc with one device-to-host transfer per mini-sentence, not one per token, and FunASR's sentence
    # building and speaker assignment without per-token reads or sentence x turn scans (core/engine/fast_punc.py).
    fast_punc: bool = True
    # numpy's global random state is reset to this before each job: FunASR's speaker clustering (k-means with
    # random_state=None) draws from it, so labels otherwise depend on what ran before in the process
    seed: int | None = Field(default=None, ge=0)
    # fsmn-vad's frame loop reads a host copy of each chunk's scores, not one GPU tensor item per 10 ms
    # frame (src/transcribe/core/engine/fast_vad.py; same segments).
    fast_vad: bool = True
    # On CUDA, the punctuation model's transformer layers and CAM++ replay CUDA graphs recorded per input
    # shape instead of launching a few hundred tiny kernels from Python per call (core/engine/cuda_graphs.py;
    # the same kernels, so the same results). No effect on the CPU or MPS.
    cuda_graphs: bool = True
    # Stages that do not read each other's results run at the same time on their own threads and CUDA
    # streams (core/engine/side_stream.py): CAM++ beside ASR, an ASR batch's timestamp predictor beside the
    # next batch's decoding. auto: on CUDA only (on a CPU both are compute-bound on the same cores).
    overlap_stages: bool | Literal["auto"] = "auto"
    # Batch engine (core/engine/batch_engine.py): seconds of audio (padded length x count) per ASR batch
    # when several jobs share a batch, and CAM++ windows (1.5 s each) per speaker-model forward call.
    # Both bound GPU memory whatever the job's length (an ASR batch: this plus one segment, FunASR's rule).
    engine_batch_s: int = Field(default=300, ge=1)
    engine_spk_batch: int = Field(default=128, ge=1)
    # Extra keyword arguments passed through to AutoModel(...) / generate(...) unchanged.
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    generate_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        return check_device(v)

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
    # On SIGHUP, an old worker finishes its job for up to this long before it is stopped (its job is
    # then requeued without spending an attempt).
    graceful_timeout: float = Field(default=600.0, ge=0)
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
    # CUDA MPS (core/pool/cuda_mps.py): workers sharing a GPU run their kernels concurrently instead of
    # time-slicing it. auto: a private MPS daemon when a worker is planned on CUDA and
    # nvidia-cuda-mps-control is on PATH (an MPS daemon already running is used instead); true: the
    # same, but a missing or failing daemon stops the pool; false: never.
    cuda_mps: bool | Literal["auto"] = "auto"


    @field_validator("workers", mode="before")
    @classmethod
    def _check_workers(cls, v: Any) -> int | str:
        return parse_workers(v)


class OutputConfig(_Section):
    formats: list[str] = Field(default_factory=lambda: ["json", "txt"])
    # Each segment's tokens with their times in the JSON (`words`); per job: word_timestamps.
    word_timestamps: bool = False
    # srt/vtt cue layout: wrap at this many characters, split cues past this many lines (None: no limit).
    max_line_width: int | None = Field(default=None, ge=1)
    max_line_count: int | None = Field(default=None, ge=1)

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


class CacheConfig(_Section):
    """The result cache (`cache.*`, engine/result_cache.py): off unless enabled."""

    enabled: bool = False
    dir: str = "cache/results"
    max_mb: float = Field(default=1024, gt=0)


class HttpConfig(_Section):
    """The HTTP API (`http.*`, docs/http.md), served by `serve` when `bind` or `--http` is set."""

    bind: str | None = None  # "HOST:PORT"; None: no HTTP unless `serve --http`
    max_upload_mb: float = Field(default=1024, gt=0)
    max_queue_depth: int = Field(default=1000, ge=1)  # jobs waiting or running; more get 503 + Retry-After
    sync_timeout_s: float = Field(default=600.0, gt=0)  # POST /v1/audio/transcriptions waits this long
    api_keys: list[str] = Field(default_factory=list)  # empty: no key needed

    @field_validator("bind", mode="before")
    @classmethod
    def _check_bind(cls, v: Any) -> Any:
        if v is None or not isinstance(v, (str, int)) or isinstance(v, bool):
            return v  # None, or a type error that pydantic reports
        return check_bind(str(v))  # also a bare port: TRANSCRIBE__HTTP__BIND=8000 parses as a number

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        # TRANSCRIBE__HTTP__API_KEYS=key1,key2 arrives as one string
        return [k.strip() for k in v.split(",") if k.strip()] if isinstance(v, str) else v

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, v: list[str]) -> list[str]:
        if any(len(k) < 16 for k in v):
            raise ValueError("each API key must be at least 16 characters (e.g. `openssl rand -hex 24`)")
        return v


def check_bind(text: str) -> str:
    """An `http.bind` value (also the `--http` flag), normalised: ``8000`` -> ``127.0.0.1:8000``."""
    host, port = parse_bind(text)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_bind(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``PORT`` (127.0.0.1) -> (host, port); ValueError says the form."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") if host.startswith("[") else host
    if not host or (":" in host and not text.startswith("[")) or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8000, [::1]:8000 or 8000)")
    return host, int(port)


class RayConfig(_Section):
    """`serve --mode ray`: the task directory served by Ray actors across a cluster (`ray.*`)."""

    # None: start a local Ray instance; "auto": join the cluster started on this machine with `ray start`;
    # "HOST:PORT": join that cluster's head (the --address flag overrides this).
    address: str | None = None
    # GPUs per actor on nodes that have GPUs: 1 = one engine per card, 0.5 = two engines share a card
    # (each process's CUDA memory is then capped to that fraction of the card).
    num_gpus: float = Field(default=1.0, gt=0, le=1)
    # CPUs per actor; None = 1 on GPU nodes, funasr.ncpu on CPU-only nodes.
    num_cpus: float | None = Field(default=None, gt=0)
    cpu_nodes: bool = True  # also run (CPU or Apple-silicon) actors on nodes without GPUs
    actors_per_node: int = Field(default=0, ge=0)  # 0: as many as the node's resources allow
    max_actors: int = Field(default=0, ge=0)  # 0: no cap over the whole cluster
    audio_transfer: Literal["object_store", "shared_mount"] = "object_store"
    resize_interval: float = Field(default=5.0, gt=0)  # seconds between looks at the cluster's nodes
    local_num_cpus: int | None = Field(default=None, ge=1)  # CPUs of a local instance (None: all)
    namespace: str = "transcribe"
    runtime_env: dict[str, Any] = Field(default_factory=dict)  # Ray runtime_env for the actors


class Config(_Section):
    funasr: FunasrConfig = Field(default_factory=FunasrConfig)
    pool: PoolConfig = Field(default_factory=PoolConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    input: InputConfig = Field(default_factory=InputConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    # Where the file came from: relative paths in it (models, task_dir, logs) resolve against it.
    base_dir: str = Field(default=".", exclude=True)

    def resolve_path(self, p: str) -> Path:
        path = Path(os.path.expanduser(p))
        return path if path.is_absolute() else Path(self.base_dir) / path


def check_device(value: str) -> str:
    """A `funasr.device` value (also the `--device` flag): auto, cuda, cuda:N, mps or cpu."""
    v = value.strip().lower()
    if v in ("auto", "cuda", "mps", "cpu") or (v.startswith("cuda:") and v[5:].isdigit()):
        return v
    raise ValueError(f"{value!r} is not a device: use 'auto', 'cuda', 'cuda:N', 'mps' or 'cpu'")


def parse_workers(value: Any) -> int | str:
    """A `pool.workers` value (also the `--workers` flag): a whole number from 1, or 'auto'."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
        if isinstance(value, (float, bool)) or n < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a worker count: use a whole number from 1, or 'auto'") from None
    return n


def validate_formats(formats: list[str]) -> list[str]:
    """Lower-case, deduplicated, checked; ``all`` stands for every format."""
    out = []
    for f in formats:
        f = f.strip().lower()
        if f == ALL_FORMATS:
            out += [x for x in OUTPUT_FORMATS if x not in out]
            continue
        if f not in OUTPUT_FORMATS:
            raise ValueError(f"unknown format {f!r}; choose from {', '.join(OUTPUT_FORMATS)} or {ALL_FORMATS}")
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


def _field_path(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """``pool.workers`` from pydantic's ``('pool', 'workers', "literal['auto']")``: field names (known or
    not) while inside a model, list indexes; past a leaf field, strings are the union-member tags pydantic
    adds, which mean nothing to a user."""
    parts: list[str] = []
    current: Any = model
    for p in loc:
        if isinstance(p, int):
            parts[-1:] = [f"{parts[-1] if parts else ''}[{p}]"]
        elif current is not None:
            parts.append(str(p))
            field = getattr(current, "model_fields", {}).get(p)
            ann = field.annotation if field else None
            current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return ".".join(parts)


_EXPECTED = {"int_parsing": "a whole number", "int_type": "a whole number", "int_from_float": "a whole number",
             "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false",
             "bool_type": "true or false", "string_type": "a string", "list_type": "a list",
             "dict_type": "an object", "none_required": "null"}


def describe_validation_errors(err: ValidationError, model: type[BaseModel],
                               names: Mapping[str, str] | None = None) -> list[str]:
    """One ``key: what is wrong`` per bad key, in words: no pydantic internals, union members merged.
    `names` renames a key by where its value came from (``{"funasr.device": "TRANSCRIBE__FUNASR__DEVICE"}``)."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    for e in err.errors():
        by_key.setdefault(_field_path(model, e["loc"]), []).append(e)
    out = []
    for key, errors in by_key.items():
        shown = (names or {}).get(key.split("[")[0], key)
        if any(e["type"] == "extra_forbidden" for e in errors):
            known = sorted(getattr(_model_at(model, key.rsplit(".", 1)[0] if "." in key else ""), "model_fields", {}))
            guess = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
            hint = f"did you mean {guess[0]!r}?" if guess else "check the spelling"
            out.append(f"{shown}: unknown key ({hint})")
            continue
        if len(errors) > 1 or errors[0]["type"] in _EXPECTED or errors[0]["type"] == "literal_error":
            wanted = []
            for e in errors:
                w = e.get("ctx", {}).get("expected") if e["type"] == "literal_error" else _EXPECTED.get(e["type"])
                wanted.append(w or _message(e))
            got = errors[0].get("input")
            out.append(f"{shown or 'value'}: {got!r} is not valid: expected {' or '.join(dict.fromkeys(wanted))}")
        else:
            out.append(f"{shown or 'value'}: {_message(errors[0])}")
    return out


def _message(e: dict[str, Any]) -> str:
    msg = str(e["msg"])
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _model_at(model: type[BaseModel], dotted: str) -> Any:
    current: Any = model
    for part in filter(None, dotted.split(".")):
        fields = getattr(current, "model_fields", {})
        current = fields[part].annotation if part in fields else None
    return current


def _format_validation_error(err: ValidationError, source: str, names: Mapping[str, str] | None = None) -> str:
    """One line, every problem named: ``invalid configuration in x.json: pool.workers: ...; funasr.device: ...``."""
    return f"invalid configuration in {source}: " + "; ".join(describe_validation_errors(err, Config, names))


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
    env = os.environ if environ is None else environ
    data = apply_env_overrides(data, env)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        data.setdefault(section, {})[key] = value
    source = str(file) if file else "defaults"
    # A bad value that came from the environment is named by its variable, not blamed on the file.
    from_env = {".".join(k.lower() for k in name[len(ENV_PREFIX):].split("__") if k): name
                for name in env if name.startswith(ENV_PREFIX)}
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source, from_env)) from None
    cfg.base_dir = str(file.parent.resolve()) if file else str(Path.cwd())
    return cfg


def config_from_dict(data: dict[str, Any], base_dir: str | os.PathLike[str] = ".") -> Config:
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, "dict")) from None
    cfg.base_dir = str(Path(base_dir).resolve())
    return cfg


def as_config(source: "Config | Mapping[str, Any] | str | os.PathLike[str]") -> Config:
    """A `Config` from a Config (as is), a dict (relative paths against the current directory) or a
    path to a JSON/YAML file (loaded as the CLI loads it, environment overrides included)."""
    if isinstance(source, Config):
        return source
    if isinstance(source, Mapping):
        return config_from_dict(dict(source), Path.cwd())
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {str(path)!r}")
        return load_config(path)
    raise ConfigError(f"expected a Config, a dict or a path to a config file, not {type(source).__name__}")
