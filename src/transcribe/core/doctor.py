"""`transcribe doctor`: check everything `serve` needs, say what is wrong and how to fix it.

Each check is a `Check(name, ok, detail, fatal)`. A fatal failure (no usable device, a model that
cannot be resolved without a reachable hub, a task dir or log dir that cannot be written) makes the
command exit non-zero: `serve` would not start.
"""

from __future__ import annotations

import os
import platform
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from transcribe import __version__
from transcribe.config import Config
from transcribe.core.engine import model_store
from transcribe.core.errors import ConfigError, TranscribeError


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fatal: bool = True


def _writable(path: Path) -> tuple[bool, str]:
    """Whether `path` can be written, or created by `serve`; doctor itself creates nothing."""
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
            return True, f"{path} (does not exist yet; `serve` creates it)"
        return False, f"{path}: cannot be created under {parent} (fix the permissions or point the config elsewhere)"
    if not path.is_dir():
        return False, f"{path}: exists but is not a folder (point the config elsewhere)"
    try:
        probe = path / f".doctor-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"ok")
        probe.unlink()
        return True, str(path)
    except OSError as e:
        return False, f"{path}: {e.strerror} (fix the permissions or point the config elsewhere)"


def _mps_check(cfg: Config) -> Check:
    """What `serve --mode pool` would do about CUDA MPS on this machine (pool.cuda_mps; docs/operations.md)."""
    from transcribe.core.pool.cuda_mps import decide

    try:
        plan = decide(cfg.pool.cuda_mps, True)
    except ConfigError as e:
        return Check("cuda mps", False, e.message)
    state = {"start": "on: a private daemon", "external": "on: the running daemon", "off": "off"}[plan.action]
    return Check("cuda mps", plan.action != "off" or cfg.pool.cuda_mps is False, f"{state} ({plan.reason})",
                 fatal=False)


def run_checks(cfg: Config, reachable: Callable[[str], bool] = model_store.hub_reachable) -> dict[str, Any]:
    import torch

    from transcribe.core.engine.audio import ffmpeg_path
    from transcribe.core.engine.device_manager import DeviceManager, _funasr_version
    from transcribe.core.engine.patches import planned_patches

    checks: list[Check] = []
    versions = {"transcribe": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "funasr": _funasr_version()}
    checks.append(Check("funasr installed", versions["funasr"] is not None, f"funasr {versions['funasr']}"))

    available = DeviceManager.detect_available_devices()
    cuda = [{"device": d, **{k: v for k, v in DeviceManager.get_device_info(d).items()
                            if k in ("name", "memory_total_mb", "capability")}}
            for d in available if d.startswith("cuda")]
    mps = {"built": torch.backends.mps.is_built(), "available": torch.backends.mps.is_available()}
    selection: dict[str, Any] = {}
    try:
        choice = DeviceManager.select_device(cfg.funasr, available)
        selection = {**choice.to_dict(), "patches": planned_patches(choice.device)}
        checks.append(Check("device", True, f"{choice.device} {choice.dtype}: {choice.reason}"))
    except TranscribeError as e:
        checks.append(Check("device", False, e.message))

    if cuda:
        checks.append(_mps_check(cfg))

    models = {}
    for key, name in ((k, getattr(cfg.funasr, k)) for k in model_store.MODEL_ROLES):
        if not name:
            continue
        role = model_store.MODEL_ROLES[key]
        try:
            ref = model_store.resolve_model(role, name, cfg.funasr.hub, getattr(cfg.funasr, f"{key}_revision"),
                                            cfg.base_dir)
        except TranscribeError as e:
            models[key] = {"name": name, "resolvable": False, "error": e.message}
            checks.append(Check(f"model {role}", False, e.message))
            continue
        info = ref.to_dict()
        if ref.source == "remote":
            online = reachable(ref.hub)
            info["resolvable"] = online
            detail = (f"{name}: not cached; will download from {model_store.HUB_NAMES[ref.hub]}" if online else
                      model_store.unavailable_error(ref, f"{model_store.HUB_HOSTS[ref.hub]} cannot be reached").message)
            checks.append(Check(f"model {role}", online, detail))
        else:
            info["resolvable"] = True
            checks.append(Check(f"model {role}", True, f"{name}: {ref.source} at {ref.path}"))
        models[key] = info

    ff = ffmpeg_path()
    checks.append(Check("ffmpeg", ff is not None, ff or "not found: mp3/m4a/mp4/aac/opus/webm cannot be decoded "
                        "(pip install 'transcribe[ffmpeg]' or apt-get install ffmpeg)", fatal=False))
    for name, path in (("task dir writable", cfg.resolve_path(cfg.pool.task_dir)),
                       ("logs dir writable", cfg.resolve_path(cfg.logging.dir))):
        ok, detail = _writable(path)
        checks.append(Check(name, ok, detail))

    problems = [c for c in checks if not c.ok and c.fatal]
    return {
        "ok": not problems,
        "versions": versions,
        "devices": {"available": available, "cuda": cuda, "mps": mps, "cpu_threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count()},
        "selection": selection,
        "models": models,
        "checks": [asdict(c) for c in checks],
        "problems": [f"{c.name}: {c.detail}" for c in problems],
    }


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    v = report["versions"]
    console.print(f"transcribe {v['transcribe']} · python {v['python']} · torch {v['torch']} · funasr {v['funasr']}")
    table = Table(show_header=True)
    table.add_column("check", overflow="fold", max_width=18)
    table.add_column("", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for c in report["checks"]:
        mark = "[green]ok[/green]" if c["ok"] else ("[red]FAIL[/red]" if c["fatal"] else "[yellow]warn[/yellow]")
        table.add_row(Text(c["name"]), mark, Text(c["detail"]))  # paths may hold "[...]": not markup
    console.print(table)
    console.print("[green]ready to serve[/green]" if report["ok"] else
                  f"[red]{len(report['problems'])} problem(s) would stop `serve`[/red]")
