"""A pool worker: choose a device, patch FunASR, load the models, warm up, then claim jobs.

The worker owns no state the supervisor needs to rebuild: its job lives in processing/ and it holds
the job's lease (a flock, see task_dir.py) for the job's whole life, and its status lives in
``workers/<id>.json``, rewritten by a heartbeat thread (gunicorn style: the file's mtime is the
heartbeat, kept fresh even while ``generate`` runs for minutes). The supervisor's sweep requeues the
job of a worker that dies (its lease is released by the kernel) and kills one whose heartbeat goes stale.

A worker whose supervisor dies exits at once, even mid-job (`SupervisorWatch`, plus PR_SET_PDEATHSIG on
Linux): the next server recovers its job only once its lease is released, so the job is never run twice.
With the forkserver start method workers are children of the fork server, not of the supervisor
(``pgrep -P <supervisor>`` lists the fork server); all of them stay in the supervisor's process group.

Exit codes tell the supervisor why a worker ended: 0 asked to stop, `EXIT_BOOT_FAILED` the models
could not load (the pool stops instead of respawning forever), `EXIT_RECYCLE` a planned restart
(max jobs or memory), `EXIT_ORPHANED` the supervisor vanished.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

from loguru import logger

from transcribe.config import Config
from transcribe.core.notify import Notifier
from transcribe.core.pool.batch_runner import claim_batch, run_jobs
from transcribe.core.pool.cuda_mps import PIPE_VAR
from transcribe.core.pool.heartbeat import (
    Heartbeat,
    SupervisorWatch,
    WorkerStatus,
    current_rss_mb,
    pid_alive,
    set_parent_death_signal,
)
from transcribe.core.pool.inbox_watcher import InboxWatcher
from transcribe.core.pool.job_runner import run_job
from transcribe.core.pool.jobs import Job, error_info
from transcribe.core.pool.task_dir import TaskDir

EXIT_OK, EXIT_BOOT_FAILED, EXIT_RECYCLE, EXIT_ORPHANED = 0, 3, 4, 5


# --------------------------------------------------------------------------- the process
class Worker:
    def __init__(self, cfg: Config, worker_id: str, device: str | None, parent_pid: int) -> None:
        self.cfg = cfg
        self.worker_id = worker_id
        self.device_override = device
        self.parent_pid = parent_pid
        self.td = TaskDir.from_config(cfg)
        self.status = WorkerStatus(worker_id, os.getpid(), cuda_mps_pipe_dir=os.environ.get(PIPE_VAR))
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

    def _supervisor_lost(self) -> None:
        logger.error("worker {}: supervisor (pid {}) is gone; exiting now (a new server recovers the job)",
                     self.worker_id, self.parent_pid)
        logger.remove()
        os._exit(EXIT_ORPHANED)  # releases the job's lease with the process

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the supervisor decides
        set_parent_death_signal()
        watch = SupervisorWatch(self.parent_pid, self._supervisor_lost)
        if not pid_alive(self.parent_pid):
            self._supervisor_lost()
        watch.start()
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
            try:
                if self.cfg.pool.batch_jobs > 1:
                    jobs = claim_batch(lambda: self.td.claim_next(self.worker_id), self.cfg.pool.batch_jobs,
                                       self.cfg.pool.batch_audio_s)
                else:
                    job = self.td.claim_next(self.worker_id)
                    jobs = [job] if job is not None else []
            except Exception as exc:  # noqa: BLE001 - claim_next classifies the filesystem's errors; anything
                # else is a bug, which must not take the worker down with it: log it and try again later
                logger.opt(exception=exc).error("worker {}: claim failed; retrying", self.worker_id)
                jobs = []
            if not jobs:
                self.wake.wait(idle_wait)
            elif len(jobs) == 1 and self.cfg.pool.batch_jobs <= 1:
                self._run(jobs[0], transcriber)
            else:
                self._run_batch(jobs, transcriber)
        return EXIT_OK

    def _run_batch(self, jobs: list[Job], transcriber: Any) -> None:
        """Several jobs through the batch engine (pool.batch_jobs > 1); each committed on its own."""
        from transcribe.core.engine.batch_engine import BatchTranscriber

        if getattr(self, "_engine", None) is None:
            self._engine = transcriber.stages_side_by_side or BatchTranscriber(transcriber)  # one engine a worker
        self.status.start_job(jobs[0].job_id)  # the status names one job; the others are in its batch
        self.heartbeat.beat()
        logger.info("jobs {} claimed by {} as one batch", ", ".join(j.job_id for j in jobs), self.worker_id)
        for outcome, result in run_jobs(self.td, jobs, self._engine, self.cfg, self.worker_id, self.notifier):
            self.status.end_job(outcome, result)
        self.heartbeat.beat()

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
