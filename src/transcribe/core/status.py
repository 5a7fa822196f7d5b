"""`transcribe status`: read from the folders and status files alone, so it works with the server down."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Any

from loguru import logger

from transcribe.config import Config
from transcribe.core.fsio import dumps_json, now_iso, read_json_object, write_atomic
from transcribe.core.pool.heartbeat import pid_alive, read_worker_status
from transcribe.core.pool.task_dir import TaskDir


SERVER_STATUS_FILE = "supervisor.json"
# supervisor.json's cuda_mps.state (core/pool/supervisor.py) in words
MPS_SHOWN = {"on": "on", "external": "on, a daemon this pool did not start", "off": "off",
             "died": "off, the daemon exited while serving", "stopped": "stopped"}


class ServerStatusFile:
    """supervisor.json, which the pool supervisor and the Ray driver keep: rewritten (atomically, fsynced) only
    when what it says changes, not on every turn of their loops; its `updated` is when it last changed."""

    def __init__(self, td: TaskDir) -> None:
        self.td = td
        self._written: dict[str, Any] | None = None

    def write(self, info: dict[str, Any]) -> None:
        if info == self._written:
            return
        try:
            write_atomic(self.td.root / SERVER_STATUS_FILE, dumps_json({**info, "updated": now_iso()}), self.td.tmp,
                         0o640)
            self._written = info
        except OSError as e:
            logger.warning("cannot write {}: {}", SERVER_STATUS_FILE, e)


def server_lock_held(root: Path) -> int | None:
    """The pid of the server holding ``<task_dir>/server.lock`` (pool, lock or ray mode), or None.

    Every mode takes an exclusive flock on that file for its whole life and writes its pid into it.
    A shared, non-blocking flock on a separate descriptor fails exactly while one is held; the kernel
    drops the lock when the holder dies, so this never reports a crashed server as running. The file
    is opened read-only and never created.
    """
    try:
        fd = os.open(root / "server.lock", os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            with contextlib.suppress(OSError, ValueError):
                return int(os.read(fd, 32).decode().strip() or 0) or -1
            return -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def server_state(td: TaskDir) -> dict[str, Any]:
    """Whether a server serves `td` now, its mode and pid (``{"alive": False}`` when none)."""
    pid = server_lock_held(td.root)
    info = read_json_object(td.root / SERVER_STATUS_FILE)
    if pid is not None:
        # supervisor.json is written by the pool supervisor and the Ray driver (with its "mode"), not lock mode
        pool = info.get("pid") == pid
        return {**(info if pool else {}), "alive": True, "pid": pid if pid > 0 else info.get("pid"),
                "mode": info.get("mode", "pool") if pool else "lock"}
    return {**info, "alive": False}


def _worker_row(w: dict[str, Any], age: float, now: float, heartbeat_timeout: float) -> dict[str, Any]:
    alive = pid_alive(w.get("pid")) and w.get("state") not in ("exited", "boot_failed")
    stale = age > heartbeat_timeout
    state = w.get("state") if alive and not stale else ("stale" if alive else "gone")
    started = w.get("job_started_ts")
    return {
        # Ray mode: the driver keeps the file (its pid says it is alive); show the actor's own process and node
        "worker_id": w.get("worker_id"), "pid": w.get("actor_pid") or w.get("pid"), "node": w.get("node"),
        "device": w.get("device"), "state": state,
        "job": w.get("job"), "job_elapsed_s": round(now - started, 1) if started and w.get("job") else None,
        "job_stage": w.get("job_stage") if w.get("job") else None,
        "jobs_done": w.get("jobs_done", 0), "jobs_failed": w.get("jobs_failed", 0),
        "mean_rtf": w.get("mean_rtf"), "heartbeat_age_s": round(age, 1), "rss_mb": w.get("rss_mb"),
        "gpu_reserved_mb": w.get("gpu_reserved_mb"), "gpu_peak_mb": w.get("gpu_peak_mb"),
    }


def collect_status(cfg: Config, *, include_gone: bool = False) -> dict[str, Any]:
    """Counts, server and workers. Workers whose process is gone (exited, replaced, crashed) are left
    out unless `include_gone`: their status files stay for post-mortems, the list stays current."""
    td = TaskDir.from_config(cfg)
    now = time.time()
    workers, hidden = [], 0
    if td.workers.is_dir():
        for path in sorted(td.workers.glob("*.json")):
            if (read := read_worker_status(path)) is None:
                continue
            row = _worker_row(read[0], now - read[1], now, cfg.pool.heartbeat_timeout)
            if row["state"] == "gone" and not include_gone:
                hidden += 1
                continue
            workers.append(row)
    oldest = td.oldest_waiting()
    return {"task_dir": str(td.root), "counts": td.counts(), "oldest_waiting_s": round(oldest, 1) if oldest else None,
            "server": server_state(td), "workers": workers, "workers_gone_hidden": hidden}


def print_status(info: dict[str, Any]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    c, server = info["counts"], info["server"]
    up = (f"running ({server.get('mode', '?')} mode, pid {server.get('pid')})" if server.get("alive")
          else "not running")
    console.print(f"task dir {info['task_dir']}", overflow="fold", markup=False)
    console.print(f"server {up}", markup=False)
    mps = server.get("cuda_mps") if server.get("alive") else None
    if isinstance(mps, dict) and mps.get("cuda") and mps.get("state") in MPS_SHOWN:  # said only on CUDA pools
        where = f", pipe dir {mps['pipe_dir']}" if mps.get("pipe_dir") else ""
        console.print(f"CUDA MPS: {MPS_SHOWN[mps['state']]}{where} ({mps.get('reason')})", overflow="fold",
                      markup=False)
    console.print(f"jobs: inbox {c['inbox']}  processing {c['processing']}  done {c['done']}  failed {c['failed']}"
                  + (f"  (oldest waiting {info['oldest_waiting_s']}s)" if info["oldest_waiting_s"] else ""))
    if info["workers"]:
        # Narrow headers and folding cells: readable at 80 columns (job ids fold instead of turning into "2026…").
        table = Table(box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False, caption_justify="left",
                      caption="done/failed: jobs this worker process finished into done/ or failed/ "
                              "(requeued attempts not counted)")
        for col in ("worker", "device", "state", "job", "elapsed", "done/failed", "RTF", "RSS MB"):
            table.add_column(col, overflow="fold", min_width=len(col) if col != "job" else 10)
        for w in info["workers"]:
            elapsed = f"{w['job_elapsed_s']}s {w['job_stage'] or ''}" if w["job_elapsed_s"] is not None else "-"
            rtf = f"{w['mean_rtf']:.3f}" if isinstance(w["mean_rtf"], (int, float)) else "-"
            rss = f"{w['rss_mb']:.0f}" if isinstance(w["rss_mb"], (int, float)) and w["rss_mb"] else "-"
            cells = (f"{w['worker_id']} pid {w['pid']}", w["device"], w["state"], w["job"] or "-", elapsed,
                     f"{w['jobs_done']}/{w['jobs_failed']}", rtf, rss)
            table.add_row(*(Text(str(cell)) for cell in cells))  # data from files: never rich markup
        console.print(table)
    if info.get("workers_gone_hidden"):
        n = info["workers_gone_hidden"]
        console.print(f"{n} worker{'s' if n != 1 else ''} no longer running not shown (--all shows them)")
