"""`serve --mode lock`: the task directory served by one in-process `AsyncTranscriber`.

Same protocol and same results as the pool (one `job_runner.run_job` for both); one model, jobs one
at a time behind the asyncio lock. For a single machine that wants one model in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from typing import Any

from loguru import logger

from transcribe.config import Config
from transcribe.core.engine.funasr_transcriber import AsyncTranscriber
from transcribe.core.engine.result import Result
from transcribe.core.notify import Notifier
from transcribe.core.pool.heartbeat import Heartbeat, WorkerStatus
from transcribe.core.pool.inbox_watcher import InboxWatcher
from transcribe.core.pool.job_runner import run_job
from transcribe.core.pool.task_dir import Housekeeping, TaskDir

WORKER_ID = "lock"


async def serve_lock(cfg: Config) -> int:
    td = TaskDir.from_config(cfg).ensure()
    td.check_one_filesystem()
    td.acquire_server_lock()
    os.umask(cfg.pool.umask)
    td.recover_all("supervisor_restart", "the previous server stopped while the job ran",
                   keep_audio=cfg.pool.keep_audio)
    status = WorkerStatus(WORKER_ID, os.getpid())
    heartbeat = Heartbeat(td.workers / f"{WORKER_ID}.json", status, cfg.pool.heartbeat_interval, td.tmp)
    heartbeat.beat()
    heartbeat.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    wake = threading.Event()
    notifier = Notifier.from_config(cfg)
    try:
        engine = await AsyncTranscriber.create(cfg)
    except Exception as exc:  # noqa: BLE001 - reported as the boot failure it is
        from transcribe.core.pool.jobs import error_info

        status.state, status.error = "boot_failed", error_info(exc)
        heartbeat.beat()
        logger.error("lock mode could not boot: {}", status.error["message"])
        return 3
    status.device, status.dtype = engine.transcriber.device.device, engine.transcriber.device.dtype
    status.state = "ready"
    heartbeat.beat()
    logger.info("lock mode ready on {} (task dir {})", status.device, td.root)
    idle = max(cfg.pool.settle_seconds, 0.05)
    housekeeping = Housekeeping(td, keep_audio=cfg.pool.keep_audio)

    def through_lock(*args: Any, **kwargs: Any) -> Result:
        """`run_job` runs in a thread (its file I/O stays off the event loop); the model call comes back
        to the loop, so it goes through the same `asyncio.Lock` as every other caller of `engine`."""
        return asyncio.run_coroutine_threadsafe(engine.transcribe(*args, **kwargs), loop).result()

    async with engine:
        with InboxWatcher(td.inbox, wake):
            while not stop.is_set():
                wake.clear()
                await asyncio.to_thread(housekeeping.tick)  # jobs left unleased (a settle the disk refused)
                try:
                    job = await asyncio.to_thread(td.claim_next, WORKER_ID)
                except Exception as exc:  # noqa: BLE001 - claim_next classifies the filesystem's errors; anything
                    logger.opt(exception=exc).error("claim failed; retrying")  # else must not stop the server
                    job = None
                if job is None:
                    # wait_for cancels its wait on timeout: no pending task piles up per idle turn
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=min(idle, cfg.pool.rescan_interval))
                    continue
                status.start_job(job.job_id)
                outcome, result = await asyncio.to_thread(run_job, td, job, through_lock, cfg, WORKER_ID, notifier)
                status.end_job(outcome, result)
    status.state = "exited"
    notifier.close()
    heartbeat.stop()
    heartbeat.beat()
    logger.info("lock mode stopped cleanly")
    return 0
