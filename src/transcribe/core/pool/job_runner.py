"""One claimed job to done/, failed/ or back to inbox/: the steps shared by pool workers and lock mode."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from loguru import logger

from transcribe.config import Config
from transcribe.core.engine.formats import render
from transcribe.core.engine.result import Result
from transcribe.core.errors import TranscribeError
from transcribe.core.notify import Notifier
from transcribe.core.pool.jobs import Job, JobOptions, error_info
from transcribe.core.pool.task_dir import TaskDir


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
    except Exception as exc:  # noqa: BLE001 - every job error is recorded; the worker lives on
        return settle_failed_job(td, job, exc, worker_id, notifier), None
    return commit_result(td, job, options, result, cfg, worker_id, notifier)


def commit_result(td: TaskDir, job: Job, options: JobOptions, result: Result | BaseException, cfg: Config,
                  worker_id: str, notifier: Notifier | None = None) -> tuple[str, Result | None]:
    """A transcribed job (its Result, or the exception that failed it) to done/, failed/ or inbox/."""
    if isinstance(result, BaseException):
        return settle_failed_job(td, job, result, worker_id, notifier), None
    try:
        path = finish_job(td, job, result, options, cfg, notifier)
    except Exception as exc:  # noqa: BLE001 - e.g. a full disk: retryable
        return settle_failed_job(td, job, exc, worker_id, notifier), None
    logger.info("job {} done: {:.1f}s audio, rtf {:.3f}, {} speakers -> {}", job.job_id, result.duration,
                result.rtf, len(result.speakers), path.name)
    return "done", result
