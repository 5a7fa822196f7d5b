"""A pool worker: choose a device, patch FunASR, load the models, warm up, then claim jobs.

The worker owns no state the supervisor needs to rebuild: its job lives in processing/ with a
lease naming its pid, and its status lives in ``workers/<id>.json``, rewritten by a heartbeat
thread (gunicorn style: the file's mtime is the heartbeat, kept fresh even while ``generate`` runs
for minutes). The supervisor requeues the job of a worker that dies and kills one whose heartbeat
goes stale.

Exit codes tell the supervisor why a worker ended: 0 asked to stop, `EXIT_BOOT_FAILED` the models
could not load (the pool stops instead of respawning forever), `EXIT_RECYCLE` a planned restart
(max jobs or memory), `EXIT_ORPHANED` the supervisor vanished.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from loguru import logger

from transcribe.config import Config
from transcribe.core.errors import TranscribeError
from transcribe.core.engine.formats import render
from transcribe.core.notify import Notifier
from transcribe.core.engine.result import Result
from transcribe.core.pool.task_dir import Job, JobOptions, TaskDir, error_info, now_iso, write_atomic

EXIT_OK, EXIT_BOOT_FAILED, EXIT_RECYCLE, EXIT_ORPHANED = 0, 3, 4, 5


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


class InboxWatcher:
    """Wakes the worker when something lands in inbox/ (watchdog/inotify); the loop also rescans."""

    def __init__(self, inbox: Path, wake: threading.Event) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                wake.set()

        self._observer = Observer()
        self._observer.schedule(_Handler(), str(inbox), recursive=False)

    def __enter__(self) -> "InboxWatcher":
        self._observer.daemon = True
        self._observer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._observer.stop()


# --------------------------------------------------------------------------- one job, both modes
def prepare_job(td: TaskDir, job: Job) -> JobOptions:
    """Refuse unsafe input and read the options (raises a non-retryable error for either)."""
    td.check_input(job)
    return td.options(job)


def finish_job(td: TaskDir, job: Job, result: Result, options: JobOptions, cfg: Config,
               notifier: Notifier | None = None) -> Path:
    formats = list(dict.fromkeys(["json", *(options.formats or cfg.output.formats)]))
    outputs = {fmt: render(result, fmt) for fmt in formats}
    path = td.complete(job, outputs, keep_audio=cfg.pool.keep_audio)
    if notifier:
        notifier.send("job.done", job_id=job.job_id, source=job.record.original_name, result_path=str(path),
                      duration=result.duration, rtf=result.rtf, speakers=result.speakers)
    return path


def settle_failed_job(td: TaskDir, job: Job, exc: BaseException, worker_id: str,
                      notifier: Notifier | None = None) -> str:
    """Bad input fails the job now; anything retryable (FunASR error, full disk) requeues it."""
    info = error_info(exc)
    if isinstance(exc, TranscribeError) and not exc.retryable:
        td.fail(job, info, worker_id)
        outcome = "failed"
    else:
        logger.opt(exception=exc if not isinstance(exc, (TranscribeError, OSError)) else None).warning(
            "job {} hit a retryable error: {}", job.job_id, info["message"])
        outcome = td.release(job, info)
    if outcome == "failed" and notifier:
        failed = td.failed / job.job_id
        notifier.send("job.failed", job_id=job.job_id, source=job.record.original_name,
                      error_path=str(failed / "error.json"), **info)
    return outcome


def run_job(td: TaskDir, job: Job, transcribe: Callable[..., Result], cfg: Config, worker_id: str,
            notifier: Notifier | None = None) -> tuple[str, Result | None]:
    """Run one claimed job to done/, failed/ or back to inbox/. Never raises for a job's own fault."""
    try:
        options = prepare_job(td, job)
        result = transcribe(job.audio_path, speakers=options.speakers, hotwords=options.hotwords,
                            extension=job.extension, source_name=job.record.original_name)
        path = finish_job(td, job, result, options, cfg, notifier)
    except Exception as exc:  # noqa: BLE001 - every job error is recorded; the worker lives on
        return settle_failed_job(td, job, exc, worker_id, notifier), None
    logger.info("job {} done: {:.1f}s audio, rtf {:.3f}, {} speakers -> {}", job.job_id, result.duration,
                result.rtf, len(result.speakers), path.name)
    return "done", result


# --------------------------------------------------------------------------- the process
class Worker:
    def __init__(self, cfg: Config, worker_id: str, device: str | None, parent_pid: int) -> None:
        self.cfg = cfg
        self.worker_id = worker_id
        self.device_override = device
        self.parent_pid = parent_pid
        self.td = TaskDir.from_config(cfg)
        self.status = WorkerStatus(worker_id, os.getpid())
        self.heartbeat = Heartbeat(self.td.workers / f"{worker_id}.json", self.status, cfg.pool.heartbeat_interval,
                                   self.td.tmp, cfg.pool.job_stall_timeout)
        self.stopping = False
        self.wake = threading.Event()
        self.notifier = Notifier.from_config(cfg)

    def _on_term(self, signum: int, frame: Any) -> None:
        self.stopping = True  # finish the job in hand, claim no more
        self.wake.set()

    def boot(self) -> Any:
        from transcribe.core.engine.device_manager import DeviceManager
        from transcribe.core.engine.funasr_transcriber import Transcriber

        started = time.perf_counter()
        funasr_cfg = self.cfg.funasr
        if self.device_override:
            funasr_cfg = funasr_cfg.model_copy(update={"device": self.device_override})
        choice = DeviceManager.select_device(funasr_cfg)
        self.status.device, self.status.dtype = choice.device, choice.dtype
        if choice.fell_back:
            self.notifier.send("device.fallback", worker=self.worker_id, requested=choice.requested,
                               device=choice.device, reason=choice.reason)
        transcriber = Transcriber(self.cfg, choice)
        self.status.patches = transcriber.patches
        transcriber.on_progress = self._progress
        warm = transcriber.warm_up()
        self.status.ready_after_s = round(time.perf_counter() - started, 2)
        logger.info("worker {} ready on {} in {:.1f}s (load {:.1f}s, warm-up {:.2f}s)", self.worker_id,
                    choice.device, self.status.ready_after_s, transcriber.load_time, warm)
        return transcriber

    def should_recycle(self) -> str | None:
        """Checked between jobs; never before the first one, so a low limit cannot stop all progress."""
        p = self.cfg.pool
        if self.status.jobs_done + self.status.jobs_failed == 0:
            return None
        if p.max_jobs_per_worker and self.status.jobs_done + self.status.jobs_failed >= p.max_jobs_per_worker:
            return f"{p.max_jobs_per_worker} jobs done (pool.max_jobs_per_worker)"
        if p.max_rss_mb and current_rss_mb() > p.max_rss_mb:
            return f"RSS {current_rss_mb():.0f} MB over pool.max_rss_mb={p.max_rss_mb}"
        return None

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the supervisor decides
        self.heartbeat.beat()
        self.heartbeat.start()
        try:
            transcriber = self.boot()
        except Exception as exc:  # noqa: BLE001 - reported to the supervisor, which stops the pool
            self.status.state, self.status.error = "boot_failed", error_info(exc)
            self.heartbeat.beat()
            logger.error("worker {} could not boot: {}", self.worker_id, self.status.error["message"])
            return EXIT_BOOT_FAILED
        self.status.state = "ready"
        self.heartbeat.beat()
        with InboxWatcher(self.td.inbox, self.wake):
            code = self._loop(transcriber)
        self.status.state = "exited"
        self.heartbeat.beat()
        self.notifier.close()
        return code

    def _loop(self, transcriber: Any) -> int:
        idle_wait = min(self.cfg.pool.rescan_interval, max(self.cfg.pool.settle_seconds, 0.05))
        while not self.stopping:
            if not pid_alive(self.parent_pid):
                logger.error("worker {}: supervisor is gone; exiting", self.worker_id)
                return EXIT_ORPHANED
            reason = self.should_recycle()
            if reason:
                logger.info("worker {} recycling: {}", self.worker_id, reason)
                return EXIT_RECYCLE
            self.wake.clear()
            job = self.td.claim_next(self.worker_id)
            if job is None:
                self.wake.wait(idle_wait)
                continue
            self._run(job, transcriber)
        return EXIT_OK

    def _progress(self, stage: str) -> None:
        self.status.job_stage, self.status.progress_ts = stage, time.time()

    def _run(self, job: Job, transcriber: Any) -> None:
        self.status.start_job(job.job_id)
        self.heartbeat.beat()
        logger.info("job {} claimed by {} ({!r}, attempt {})", job.job_id, self.worker_id, job.record.original_name,
                    job.record.attempts)
        outcome, result = run_job(self.td, job, transcriber.transcribe, self.cfg, self.worker_id, self.notifier)
        self.status.end_job(outcome, result)
        self.heartbeat.beat()


def worker_main(config_json: str, worker_id: str, device: str | None, parent_pid: int) -> None:
    """Process entry point. Takes the configuration as JSON text (no pickled objects cross over)."""
    from transcribe.config import config_from_dict
    from transcribe.logging_setup import setup_logging

    data = json.loads(config_json)
    cfg = config_from_dict(data["config"], data["base_dir"])
    setup_logging(cfg, f"worker-{worker_id}")
    code = Worker(cfg, worker_id, device, parent_pid).run()
    logger.remove()  # flushes and closes the log files before the hard exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: FunASR/torch threads can hang it
