"""A worker's status file and its heartbeat (gunicorn style: the file's mtime is the heartbeat).

``workers/<id>.json`` is rewritten by a thread every `pool.heartbeat_interval` seconds, so a worker
stays visibly alive through a long model call; a job that makes no progress for
`pool.job_stall_timeout` stops the beats and the supervisor kills the worker.
"""

from __future__ import annotations

import ctypes
import os
import resource
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from transcribe.core.engine.result import Result
from transcribe.core.fsio import dumps_json, now_iso, read_json_object, write_atomic


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
    gpu_reserved_mb: float | None = None  # CUDA memory PyTorch holds now, and the most it held (None off CUDA)
    gpu_peak_mb: float | None = None
    error: dict[str, Any] | None = None
    patches: list[str] = field(default_factory=list)
    cuda_mps_pipe_dir: str | None = None  # the MPS daemon this process's CUDA reaches (CUDA_MPS_PIPE_DIRECTORY)
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
        return dumps_json({**asdict(self), "mean_rtf": self.mean_rtf})


def current_rss_mb() -> float:
    """Resident set size now (Linux /proc), else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**20 if sys.platform == "darwin" else 2**10)


def cuda_memory_mb() -> tuple[float, float] | None:
    """(reserved now, peak reserved) of this process's CUDA caching allocator over all its devices (a worker
    on cuda:1 holds nothing on cuda:0), or None where CUDA is unused. torch is not imported for it: a worker
    that has not imported it has no CUDA memory."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    devices = range(torch.cuda.device_count())
    reserved = sum(torch.cuda.memory_reserved(i) for i in devices)
    peak = sum(torch.cuda.max_memory_reserved(i) for i in devices)
    return round(reserved / 2**20, 1), round(peak / 2**20, 1)


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


PR_SET_PDEATHSIG = 1


def read_worker_status(path: Path) -> tuple[dict[str, Any], float] | None:
    """A worker's status file and its mtime (the heartbeat); None when it is gone or not a JSON object."""
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return None
    status = read_json_object(path)
    return (status, mtime) if status else None


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Linux: have the kernel send `sig` to this process when its parent exits. With the forkserver start
    method the parent is the fork server, which itself exits when the supervisor dies, so this covers
    both start methods. Returns whether it was set."""
    setter = parent_death_signal_setter(sig)
    return setter is not None and setter()


def parent_death_signal_setter(sig: int) -> Callable[[], bool] | None:
    """`set_parent_death_signal` resolved ahead (None off Linux): safe as a subprocess's ``preexec_fn``, which
    runs between fork and exec, where loading a library could deadlock."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


class SupervisorWatch(threading.Thread):
    """Calls `on_lost` as soon as the supervisor process ends, even in the middle of a job.

    A ``pidfd`` (Linux 5.3+) becomes readable when the process exits and cannot be fooled by pid reuse;
    elsewhere the pid is polled. An orphaned worker must stop: the supervisor that replaces the dead one
    recovers its job once the worker's lease is released, which happens when it exits.
    """

    def __init__(self, pid: int, on_lost: Callable[[], None], poll_interval: float = 1.0) -> None:
        super().__init__(name="supervisor-watch", daemon=True)
        self.pid, self.on_lost, self.poll_interval = pid, on_lost, poll_interval
        self._pidfd: int | None = None
        if hasattr(os, "pidfd_open"):
            try:
                self._pidfd = os.pidfd_open(pid)
            except OSError:
                self._pidfd = None  # gone already (noticed in run) or not permitted

    def run(self) -> None:
        if self._pidfd is not None:
            poller = select.poll()
            poller.register(self._pidfd, select.POLLIN)
            while not poller.poll(None):
                pass
        else:
            while pid_alive(self.pid):
                time.sleep(self.poll_interval)
        self.on_lost()


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
        # Progress age is measured on the monotonic clock from when a new `progress_ts` was first seen,
        # so a wall-clock step (NTP) neither fakes a stall nor hides one.
        self._seen_progress: float | None = None
        self._seen_progress_mono = time.monotonic()

    def progress_age(self) -> float:
        if self.status.progress_ts != self._seen_progress:
            self._seen_progress, self._seen_progress_mono = self.status.progress_ts, time.monotonic()
        return time.monotonic() - self._seen_progress_mono

    def stalled(self) -> bool:
        s = self.status
        age = self.progress_age()
        return s.state == "busy" and s.progress_ts is not None and age > self.stall_timeout

    def beat(self) -> None:
        if self.stalled():
            logger.error("job {} made no progress for {:.0f}s (pool.job_stall_timeout); heartbeat stops",
                         self.status.job, self.progress_age())
            return
        self.status.rss_mb = round(current_rss_mb(), 1)
        gpu = cuda_memory_mb()
        if gpu is not None:
            self.status.gpu_reserved_mb, self.status.gpu_peak_mb = gpu
        try:
            write_atomic(self.path, self.status.to_json(), self.staging, 0o640)
        except OSError as e:  # a full disk must not kill the worker; the stale mtime will tell
            logger.warning("heartbeat write failed: {}", e)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - a dead heartbeat thread would get a healthy worker killed
                logger.opt(exception=exc).error("heartbeat failed: {}", exc)

    def stop(self) -> None:
        self._stop_event.set()
