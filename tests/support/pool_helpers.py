"""Run `transcribe serve` as a real subprocess (its own process group) and check the task dir."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[2]


def wait_until(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> object:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Server:
    """`python -m transcribe serve` in a new session: killpg reaches the supervisor and its workers."""

    def __init__(self, config: Path, mode: str = "pool", workers: int = 2, env: dict | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.log = config.parent / f"serve-{mode}-{int(time.time() * 1000)}.log"
        cmd = [sys.executable, "-m", "transcribe", "--config", str(config), "serve", "--mode", mode, *args]
        if mode == "pool":
            cmd += ["--workers", str(workers)]
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, cwd=config.parent, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, **(env or {})})

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill_group()

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self._log_file.close()


def workers_status(task_dir: Path) -> dict[str, dict]:
    out = {}
    for p in (task_dir / "workers").glob("*.json"):
        try:
            out[p.stem] = json.loads(p.read_text())
        except (OSError, ValueError):
            pass
    return out


def ready_workers(task_dir: Path, n: int) -> bool:
    return sum(w.get("state") in ("ready", "busy") for w in workers_status(task_dir).values()) >= n


def results(task_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((task_dir / "done").glob("*.json"))]


def failed(task_dir: Path) -> dict[str, dict]:
    return {p.name: json.loads((p / "error.json").read_text()) for p in sorted((task_dir / "failed").iterdir())
            if p.is_dir()}


def leftovers(task_dir: Path) -> list[str]:
    return [p.name for p in (task_dir / "inbox").iterdir()] + [p.name for p in (task_dir / "processing").iterdir()]


def assert_exactly_once(task_dir: Path, expected_sources: list[str], settle: float = 10) -> dict[str, int]:
    """Every input ended exactly once, in done/ or failed/; nothing left in inbox/ or processing/.

    A result's json is the commit marker and its job dir leaves processing/ just after it, so a caller that
    waited for results gets up to `settle` seconds for that last move before anything left counts."""
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not leftovers(task_dir), settle, "inbox/ and processing/ to empty")
    done = [r["source"] for r in results(task_dir)]
    bad = [e["original_name"] for e in failed(task_dir).values()]
    leftover = leftovers(task_dir)
    assert leftover == [], f"jobs left behind: {leftover}"
    assert sorted(done + bad) == sorted(expected_sources), f"done={sorted(done)} failed={sorted(bad)}"
    return {"done": len(done), "failed": len(bad)}


def archived_record(task_dir: Path, name: str, timeout: float = 30) -> dict:
    """The job.json of the one job dir archived in done/ for input `name`. The result's json is the commit
    marker; the job dir is moved to done/ just after it, so this waits for it rather than racing it."""
    stem = name.rsplit(".", 1)[0]

    def archived() -> list[Path]:
        return [p for p in (task_dir / "done").iterdir() if p.is_dir() and p.name.endswith(stem)]

    wait_until(archived, timeout, f"the archived job dir of {name}")
    (job_dir,) = archived()
    return json.loads((job_dir / "job.json").read_text())


def tile_audio(src: Path, dst: Path, times: int) -> Path:
    data, rate = sf.read(src, dtype="float32")
    sf.write(dst, np.tile(data, times), rate)
    return dst


def drop_file(src: Path, inbox: Path, name: str | None = None) -> Path:
    """Copy into inbox the way a careless user would (directly, not via tmp/)."""
    target = inbox / (name or src.name)
    target.write_bytes(src.read_bytes())
    return target
