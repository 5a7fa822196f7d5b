"""`transcribe status`: read from the folders and status files alone, so it works with the server down."""

from __future__ import annotations

import json
import time
from typing import Any

from transcribe.config import Config
from transcribe.core.pool.heartbeat import pid_alive
from transcribe.core.pool.task_dir import TaskDir


def collect_status(cfg: Config) -> dict[str, Any]:
    td = TaskDir.from_config(cfg)
    now = time.time()
    workers = []
    if td.workers.is_dir():
        for path in sorted(td.workers.glob("*.json")):
            try:
                w = json.loads(path.read_text(encoding="utf-8"))
                age = now - path.stat().st_mtime
            except (OSError, ValueError):
                continue
            alive = pid_alive(w.get("pid")) and w.get("state") not in ("exited", "boot_failed")
            stale = age > cfg.pool.heartbeat_timeout
            state = w.get("state") if alive and not stale else ("stale" if alive else "gone")
            started = w.get("job_started_ts")
            workers.append({
                # Ray mode: the driver keeps the file (its pid says it is alive); show the actor's own process
                "worker_id": w.get("worker_id"), "pid": w.get("actor_pid") or w.get("pid"), "node": w.get("node"),
                "device": w.get("device"), "state": state,
                "job": w.get("job"), "job_elapsed_s": round(now - started, 1) if started and w.get("job") else None,
                "job_stage": w.get("job_stage") if w.get("job") else None,
                "jobs_done": w.get("jobs_done", 0), "jobs_failed": w.get("jobs_failed", 0),
                "mean_rtf": w.get("mean_rtf"), "heartbeat_age_s": round(age, 1), "rss_mb": w.get("rss_mb"),
            })
    server: dict[str, Any] = {}
    try:
        server = json.loads((td.root / "supervisor.json").read_text(encoding="utf-8"))
        server["alive"] = pid_alive(server.get("pid")) and server.get("state") == "running"
    except (OSError, ValueError):
        server = {"alive": any(w["state"] not in ("gone", "stale") for w in workers)}
    oldest = td.oldest_waiting()
    return {"task_dir": str(td.root), "counts": td.counts(), "oldest_waiting_s": round(oldest, 1) if oldest else None,
            "server": server, "workers": workers}


def print_status(info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    c = info["counts"]
    up = "running" if info["server"].get("alive") else "not running"
    console.print(f"task dir {info['task_dir']} — server {up}")
    console.print(f"inbox {c['inbox']}  processing {c['processing']}  done {c['done']}  failed {c['failed']}"
                  + (f"  (oldest waiting {info['oldest_waiting_s']}s)" if info["oldest_waiting_s"] else ""))
    if info["workers"]:
        table = Table()
        for col in ("worker", "pid", "device", "state", "job", "elapsed", "done", "failed", "mean RTF", "RSS MB"):
            table.add_column(col)
        for w in info["workers"]:
            table.add_row(str(w["worker_id"]), str(w["pid"]), str(w["device"]), w["state"], w["job"] or "-",
                          f"{w['job_elapsed_s']}s {w['job_stage'] or ''}" if w["job_elapsed_s"] is not None else "-", str(w["jobs_done"]),
                          str(w["jobs_failed"]), str(w["mean_rtf"] or "-"), str(w["rss_mb"] or "-"))
        console.print(table)
