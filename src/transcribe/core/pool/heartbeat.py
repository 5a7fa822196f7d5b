"""A worker's status file and its heartbeat (gunicorn style: the file's mtime is the heartbeat).

``workers/<id>.json`` is rewritten by a thread every `pool.heartbeat_interval` seconds, so a worker
stays visibly alive through a long model call; a job that makes no progress for
`pool.job_stall_timeout` stops the beats and the supervisor kills the worker.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from transcribe.core.engine.result import Result
from transcribe.core.fsio import now_iso, write_atomic


@dataclass
class WorkerStatus:
    """``workers/<id>.json``: what `transcribe status` shows for a worker."""

    worker_id: str
    pid: int
    state: str = "booting"  # booting, ready, busy, stopping, boot_failed, exited
    device: str | None = None
    dtype: str | None = None
    started: str = field(default_factory=now_iso)
    ready_after_s: float | None = None
    job: str | None = None
    job_started_ts: float | None = None
    job_stage: str | None = None  # the FunASR stage running now: vad, asr, spk, punc
    progress_ts: float | None = None  # when the job last made progress (a sub-model call started)
    jobs_done: int = 0
    jobs_failed: int = 0
    rtf_sum: float = 0.0
    audio_seconds: float = 0.0
    rss_mb: float = 0.0
    error: dict[str, Any] | None = None
    patches: list[str] = field(default_factory=list)
    # Ray mode: the file is kept by the driver (`pid`); the actor's own process and node are here.
    actor_pid: int | None = None
    node: str | None = None

    def start_job(self, job_id: str) -> None:
        now = time.time()
        self.state, self.job, self.job_started_ts = "busy", job_id, now
        self.job_stage, self.progress_ts = "decode", now

    def end_job(self, outcome: str, result: Result | None) -> None:
        """Count the job (done with its result, or failed) and go back to ready."""
        if outcome == "done" and result is not None:
            self.jobs_done += 1
            self.rtf_sum += result.rtf
            self.audio_seconds += result.duration
        elif outcome == "failed":
            self.jobs_failed += 1
        self.state, self.job, self.job_started_ts, self.job_stage, self.progress_ts = "ready", None, None, None, None

    @property
    def mean_rtf(self) -> float | None:
        return round(self.rtf_sum / self.jobs_done, 5) if self.jobs_done else None

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "mean_rtf": self.mean_rtf}, ensure_ascii=False)


def current_rss_mb() -> float:
    """Resident set size now (Linux /proc), else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**20 if sys.platform == "darwin" else 2**10)


def pid_alive(pid: int | None) -> bool:
    """Whether process `pid` exists (the supervisor, for a worker: not getppid(), since with
    forkserver the parent is the fork server)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Heartbeat(threading.Thread):
    """Rewrites the status file every `interval` seconds; its mtime is the worker's heartbeat.

    Beating from a thread keeps a worker alive through a long ``generate``; but a busy worker whose
    job has made no progress for `stall_timeout` (a model call that never returns) stops beating,
    so the supervisor's heartbeat check kills it and requeues the job.
    """

    def __init__(self, path: Path, status: WorkerStatus, interval: float, staging: Path,
                 stall_timeout: float = float("inf")) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.path, self.status, self.interval, self.staging = path, status, interval, staging
        self.stall_timeout = stall_timeout
        self._stop_event = threading.Event()

    def stalled(self) -> bool:
        s = self.status
        return s.state == "busy" and s.progress_ts is not None and time.time() - s.progress_ts > self.stall_timeout

    def beat(self) -> None:
        if self.stalled():
            logger.error("job {} made no progress for {:.0f}s (pool.job_stall_timeout); heartbeat stops",
                         self.status.job, time.time() - (self.status.progress_ts or 0))
            return
        self.status.rss_mb = round(current_rss_mb(), 1)
        try:
            write_atomic(self.path, self.status.to_json(), self.staging, 0o640)
        except OSError as e:  # a full disk must not kill the worker; the stale mtime will tell
            logger.warning("heartbeat write failed: {}", e)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.beat()

    def stop(self) -> None:
        self._stop_event.set()
