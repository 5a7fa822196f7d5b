"""One claimed job to done/, failed/ or back to inbox/: the steps shared by pool workers, lock mode and
any other claimer (a Ray driver). The claimer holds `job.lease` throughout; every settle checks it, so a
claimer that lost its job (it was recovered and claimed again) commits nothing: outcome "lost"."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from loguru import logger

from transcribe.config import Config
from transcribe.core.engine.formats import render
from transcribe.core.engine.result import Result
from transcribe.core.errors import TranscribeError
from transcribe.core.fsio import printable
from transcribe.core.notify import Notifier
from transcribe.core.pool.jobs import Job, JobOptions, LeaseLost, error_info
from transcribe.core.pool.task_dir import ERROR_FILE, TaskDir


def prepare_job(td: TaskDir, job: Job) -> JobOptions:
    """Refuse unsafe input and read the options (raises a non-retryable error for either)."""
    td.check_input(job)
    return td.options(job)


def finish_job(td: TaskDir, job: Job, result: Result, options: JobOptions, cfg: Config,
               notifier: Notifier | None = None) -> Path:
    formats = list(dict.fromkeys(["json", *(options.formats or cfg.output.formats)]))
    layout = options.layout(cfg)
    outputs = {fmt: render(result, fmt, layout) for fmt in formats}
    path = td.complete(job, outputs, keep_audio=cfg.pool.keep_audio)
    if notifier:
        if result.fallback and not result.cached:  # the job left its device: out of memory, a missing operator
            notifier.send("job.fallback", job_id=job.job_id, source=printable(job.record.original_name), device=result.device,
                          **result.fallback)
        notifier.send("job.done", job_id=job.job_id, source=printable(job.record.original_name), result_path=str(path),
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
        notifier.send("job.failed", job_id=job.job_id, source=printable(job.record.original_name),
                      error_path=str(failed / ERROR_FILE), **info)
    return outcome


def run_job(td: TaskDir, job: Job, transcribe: Callable[..., Result], cfg: Config, worker_id: str,
            notifier: Notifier | None = None) -> tuple[str, Result | None]:
    """Run one claimed job to done/, failed/ or back to inbox/ and return (outcome, result).

    Outcomes: "done", "failed", "requeued"; "lost" when the job's lease was lost (nothing was written);
    "abandoned" when even settling failed (the disk refused it): the job is left in processing/, unleased,
    for the supervisor's sweep. Never raises for a job's own fault or the filesystem's.
    """
    try:
        options = prepare_job(td, job)
        result = transcribe(job.audio_path, **options.engine_kwargs(cfg), extension=job.extension,
                            source_name=job.record.original_name)
    except Exception as exc:  # noqa: BLE001 - every job error is recorded; the worker lives on
        return commit_result(td, job, None, exc, cfg, worker_id, notifier)
    return commit_result(td, job, options, result, cfg, worker_id, notifier)


def commit_result(td: TaskDir, job: Job, options: JobOptions | None, result: Result | BaseException, cfg: Config,
                  worker_id: str, notifier: Notifier | None = None) -> tuple[str, Result | None]:
    """A transcribed job (its Result, or the exception that failed it) to done/, failed/ or inbox/.
    Outcomes as `run_job`'s; never raises for a job's own fault or the filesystem's."""
    try:
        if isinstance(result, BaseException):
            return settle_failed_job(td, job, result, worker_id, notifier), None
        try:
            path = finish_job(td, job, result, options or JobOptions(), cfg, notifier)
        except LeaseLost:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a full disk: retryable
            return settle_failed_job(td, job, exc, worker_id, notifier), None
    except LeaseLost as lost:
        logger.error("job {}: {}; its result (if any) is discarded", job.job_id, lost.message)
        td.abandon(job)
        return "lost", None
    except OSError as exc:
        logger.error("job {}: cannot settle it ({}); leaving it for the sweep to requeue", job.job_id, exc)
        td.abandon(job)
        return "abandoned", None
    n = len(result.speakers)
    logger.info("job {} done: {:.1f}s audio, rtf {:.3f}, {} speaker{} -> {}", job.job_id, result.duration,
                result.rtf, n, "" if n == 1 else "s", path.name)
    return "done", result
