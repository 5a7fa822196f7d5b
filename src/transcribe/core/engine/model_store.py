"""Where each configured model comes from: a local directory, the local hub cache, or the hub.

FunASR resolves an alias (``paraformer-zh``) to a hub id and downloads it at build time. With no
network it retries for ~22 s and then reports ``model 'paraformer-zh' is not registered``, which
misleads. We resolve first: a directory is used as it is; an alias already in the hub cache is
passed to FunASR as its cached directory (no network at all); only an alias that is not cached
goes to FunASR by name, and if that fails we say which model could not be fetched from which hub
and how to fix it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from loguru import logger

from transcribe.core.errors import ModelLoadError, ModelUnavailableError

# config key -> role, in the order AutoModel builds them
MODEL_ROLES = {"model": "asr", "vad_model": "vad", "punc_model": "punc", "spk_model": "spk"}
HUB_NAMES = {"ms": "ModelScope", "hf": "Hugging Face"}
HUB_HOSTS = {"ms": "www.modelscope.cn", "hf": "huggingface.co"}
CMVN_FRONTENDS = ("WavFrontend", "WavFrontendOnline")


@dataclass(frozen=True)
class ModelRef:
    role: str  # "asr", "vad", "punc", "spk"
    name: str  # what the configuration says
    source: str  # "local" (a directory), "cached" (hub cache), "remote" (needs a download)
    path: str | None  # directory to load from, when known
    repo_id: str | None  # hub id for aliases and ids
    hub: str
    revision: str | None = None

    @property
    def load_arg(self) -> str:
        """What to pass to AutoModel: a directory when there is one, else the name."""
        return self.path or self.name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def looks_like_path(name: str) -> bool:
    # "iic/speech_..." is a hub id, not a path: only explicit paths count when the dir is missing.
    return name.startswith((".", "/", "~")) or os.path.isabs(name)


# FunASR prints a four-line notice on import when no ffmpeg binary is on PATH ("Notice: ffmpeg is not
# installed. torchaudio is used...", then install hints). It is false here: we decode audio ourselves,
# through soundfile or the ffmpeg we find. So every line of it is dropped, never logged.
_FALSE_NOTICE_WORD = "ffmpeg"


# FunASR warns this on every model it builds; it says nothing a user can act on.
FUNASR_NOISE = ("trust_remote_code: False",)


def is_funasr_noise(record: logging.LogRecord) -> bool:
    return record.getMessage() in FUNASR_NOISE


@contextlib.contextmanager
def quiet_funasr() -> Iterator[None]:
    """Import or build FunASR with its prints off stdout and its INFO logging muted.

    FunASR prints an ffmpeg notice on import and its version when building a model, and logs ~35
    INFO lines per build (``download models from model hub: ms`` even for a local folder, ckpt
    loading...). stdout belongs to commands such as ``run --json``; a Python API user did not ask
    for those lines. The root logger is raised to WARNING for the block (FunASR logs through it)
    and put back after; the prints are logged at TRACE, the false ffmpeg notice not at all.
    """
    buffer = io.StringIO()
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    drop_noise = logging.Filter()
    drop_noise.filter = lambda record: not is_funasr_noise(record)  # type: ignore[method-assign]
    root.addFilter(drop_noise)
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        root.setLevel(level)
        root.removeFilter(drop_noise)
    said = [line.strip() for line in buffer.getvalue().splitlines()
            if line.strip() and _FALSE_NOTICE_WORD not in line]
    if said:
        logger.trace("funasr said: {}", " ".join(said))


def hub_repo_id(name: str, hub: str) -> str:
    with quiet_funasr():
        from funasr.download.name_maps_from_hub import name_maps_hf, name_maps_ms

    maps = name_maps_hf if hub == "hf" else name_maps_ms
    return maps.get(name, name)


def cached_snapshot(repo_id: str, hub: str, revision: str | None) -> str | None:
    """The cached directory of `repo_id`, or None; never touches the network."""
    try:
        if hub == "hf":
            from huggingface_hub import snapshot_download as hf_snapshot

            path = hf_snapshot(repo_id, revision=revision, local_files_only=True)
        else:
            from modelscope.hub.snapshot_download import (
                snapshot_download as ms_snapshot,
            )

            path = ms_snapshot(repo_id, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - every "not in the cache" flavour the hub clients raise
        return None
    return path if path and Path(path, "config.yaml").is_file() else None


def missing_model_files(model_dir: Path) -> list[str]:
    """The files FunASR needs to build the model in `model_dir` that are not there (empty: complete).

    Mirrors FunASR 1.4's ``download_from_ms``: a ``configuration.json`` with ``file_path_metas`` names
    every file (weights, config, tokens, CMVN); otherwise ``config.yaml`` with ``model.pt`` beside it,
    plus the token list when the config has a tokenizer and ``am.mvn`` for the fbank frontends.
    Without this check FunASR fails late with ``init_param does not exist`` naming no model, or (with
    configuration.json) builds the model with random weights after printing an error.
    """
    import json

    import yaml

    def flatten(metas: Any) -> Iterator[str]:
        for value in metas.values() if isinstance(metas, dict) else []:
            if isinstance(value, dict):
                yield from flatten(value)
            elif isinstance(value, str):
                yield value

    try:
        conf_json = json.loads((model_dir / "configuration.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        conf_json = {}
    except (OSError, ValueError) as e:
        return [f"a readable configuration.json ({e})"]
    metas = conf_json.get("file_path_metas") if isinstance(conf_json, dict) else None
    if metas:
        return sorted({rel for rel in flatten(metas) if not (model_dir / rel).is_file()})
    try:
        conf = yaml.safe_load((model_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        return ["config.yaml"]
    except (OSError, yaml.YAMLError) as e:
        return [f"a readable config.yaml ({type(e).__name__})"]
    conf = conf if isinstance(conf, dict) else {}

    def given(section: str, key: str) -> bool:
        value = (conf.get(section) or {}).get(key) if isinstance(conf.get(section), dict) else None
        return isinstance(value, str) and Path(value).is_file()

    missing = []
    if not (model_dir / "model.pt").is_file() and not (isinstance(conf.get("init_param"), str)
                                                       and Path(conf["init_param"]).is_file()):
        missing.append("model.pt")
    if conf.get("tokenizer") and not given("tokenizer_conf", "token_list") and not any(
            (model_dir / name).is_file() for name in ("tokens.json", "tokens.txt", "bpe.model")):
        missing.append("tokens.json (or tokens.txt)")
    # FunASR's fbank frontends run without CMVN when am.mvn is absent: no error, only wrong text. Every
    # published model that uses them ships am.mvn, so its absence is a copy that lost a file.
    if conf.get("frontend") in CMVN_FRONTENDS and not given("frontend_conf", "cmvn_file") \
            and not (model_dir / "am.mvn").is_file():
        missing.append("am.mvn")
    return missing


def check_model_dir(role: str, model_dir: Path) -> None:
    """Raise `ModelLoadError` naming the role, the folder and the missing files."""
    missing = missing_model_files(model_dir)
    if missing:
        raise ModelLoadError(f"{role} model at {model_dir}: {', '.join(missing)} missing (copy the complete "
                             f"model folder, or re-run `transcribe models download` for a hub model)")


def resolve_model(role: str, name: str, hub: str, revision: str | None, base_dir: str | os.PathLike[str]) -> ModelRef:
    """Resolve one configured model without network access."""
    candidate = Path(os.path.expanduser(name))
    if not candidate.is_absolute():
        candidate = Path(base_dir) / candidate
    if candidate.is_dir() or looks_like_path(name):
        key = _config_key(role)
        if not candidate.is_dir():
            raise ModelLoadError(f"{role} model at {candidate}: no such directory (funasr.{key})")
        if not (candidate / "config.yaml").is_file() and not (candidate / "configuration.json").is_file():
            raise ModelLoadError(f"{role} model at {candidate}: config.yaml missing, not a FunASR model "
                                 f"directory (funasr.{key})")
        check_model_dir(role, candidate)
        return ModelRef(role, name, "local", str(candidate.resolve()), None, hub, revision)
    repo_id = hub_repo_id(name, hub)
    path = cached_snapshot(repo_id, hub, revision)
    if path:
        check_model_dir(role, Path(path))
    return ModelRef(role, name, "cached" if path else "remote", path, repo_id, hub, revision)


def resolve_models(funasr_cfg: Any, base_dir: str | os.PathLike[str]) -> dict[str, ModelRef]:
    """Every configured model of a `FunasrConfig`, keyed by config key (``model``, ``vad_model``...)."""
    refs = {}
    for key, role in MODEL_ROLES.items():
        name = getattr(funasr_cfg, key)
        if name:
            refs[key] = resolve_model(role, name, funasr_cfg.hub, getattr(funasr_cfg, f"{key}_revision"), base_dir)
    return refs


def hub_reachable(hub: str, timeout: float = 3.0) -> bool:
    """Whether the hub's host answers on 443 within `timeout` (DNS failure answers at once offline)."""
    try:
        with socket.create_connection((HUB_HOSTS[hub], 443), timeout=timeout):
            return True
    except OSError:
        return False


def unavailable_error(ref: ModelRef, cause: str) -> ModelUnavailableError:
    hub = HUB_NAMES.get(ref.hub, ref.hub)
    return ModelUnavailableError(
        f"{ref.role} model {ref.name!r} ({ref.repo_id}) is not in the local cache and could not be fetched "
        f"from {hub}: {cause}. Fix: point funasr.{_config_key(ref.role)} in config.json at a local model "
        f"directory, or run `transcribe models download` on a machine with network access and copy its cache "
        f"(MODELSCOPE_CACHE / HF_HOME) here."
    )


def _config_key(role: str) -> str:
    return next(k for k, r in MODEL_ROLES.items() if r == role)


def check_remote_refs(refs: dict[str, ModelRef], reachable: Callable[[str], bool] = hub_reachable) -> None:
    """Fail fast, with a useful message, when an uncached model needs a hub that cannot be reached."""
    for ref in refs.values():
        if ref.source == "remote" and not reachable(ref.hub):
            raise unavailable_error(ref, f"{HUB_HOSTS[ref.hub]} cannot be reached (no network?)")


def download_models(refs: dict[str, ModelRef], progress: Callable[[str], None] | None = None) -> dict[str, str]:
    """Fill the hub cache for every aliased model (resumable: the hub clients skip complete files)."""
    done = {}
    for key, ref in refs.items():
        if ref.source == "local":
            done[key] = ref.path or ref.name
            continue
        if progress:
            progress(f"{ref.role}: {ref.repo_id} from {HUB_NAMES[ref.hub]}")
        try:
            if ref.hub == "hf":
                from huggingface_hub import snapshot_download as hf_snapshot

                done[key] = hf_snapshot(ref.repo_id, revision=ref.revision)
            else:
                from modelscope.hub.snapshot_download import (
                    snapshot_download as ms_snapshot,
                )

                done[key] = ms_snapshot(ref.repo_id, revision=ref.revision or "master")
        except Exception as e:  # noqa: BLE001 - the hub clients raise many types; we report each
            raise unavailable_error(ref, f"{type(e).__name__}: {e}") from e
    return done
