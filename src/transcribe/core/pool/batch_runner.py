"""Several claimed jobs through the batch engine at once, each committed on its own (pool.batch_jobs > 1).

A GPU worker that runs one job at a time spends most of its time launching small kernels; the batch
engine (core/engine/batch_engine.py) feeds the card batches drawn from several jobs. Here a worker
claims up to ``pool.batch_jobs`` jobs, stopping early once ``pool.batch_audio_s`` seconds of audio
are in hand, runs them through ``BatchTranscriber.transcribe_many``, and then commits each job
separately through the same steps as a single job (job_runner's ``prepare_job`` and
``commit_result``): one job's bad input or model error never touches the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from loguru import logger

from transcribe.config import Config
from transcribe.core.engine.result import Result
from transcribe.core.errors import TranscribeError
from transcribe.core.notify import Notifier
from transcribe.core.pool.job_runner import commit_result, prepare_job
from transcribe.core.pool.jobs import Job, JobOptions
from transcribe.core.pool.task_dir import TaskDir

if TYPE_CHECKING:  # the engine imports torch: loaded only by a worker that batches
    from transcribe.core.engine.batch_engine import BatchTranscriber


def audio_seconds(job: Job) -> float:
    """The job's audio length from its header (soundfile), or an upper guess from its size (16 kB/s)."""
    import soundfile as sf

    try:
        info = sf.info(str(job.audio_path))
        return info.frames / info.samplerate
    except Exception:  # noqa: BLE001 - a compressed or broken file: the engine reports it properly later
        try:
            return job.audio_path.stat().st_size / 16000
        except OSError:
            return 0.0


def claim_batch(claim: Callable[[], Job | None], max_jobs: int, max_audio_s: float) -> list[Job]:
    """Claim jobs until `max_jobs` are held, the inbox is empty, or `max_audio_s` of audio is in hand."""
    jobs: list[Job] = []
    seconds = 0.0
    while len(jobs) < max_jobs and seconds < max_audio_s:
        try:
            job = claim()
        except Exception as exc:  # noqa: BLE001 - the jobs already held still run; the next turn claims again
            logger.opt(exception=exc).error("claim failed; running the {} job(s) held", len(jobs))
            break
        if job is None:
            break
        jobs.append(job)
        seconds += audio_seconds(job)
    return jobs


def run_jobs(td: TaskDir, jobs: list[Job], engine: BatchTranscriber, cfg: Config, worker_id: str,
             notifier: Notifier | None = None) -> list[tuple[str, Result | None]]:
    """Run claimed jobs together; each ends in done/, failed/ or back in inbox/. Never raises for a job."""
    from transcribe.core.engine.batch_engine import EngineJob

    outcomes: dict[int, tuple[str, Result | None]] = {}
    batched: list[tuple[int, Job, JobOptions]] = []
    for i, job in enumerate(jobs):
        try:
            options = prepare_job(td, job)
        except Exception as exc:  # noqa: BLE001 - bad input fails this job alone
            outcomes[i] = commit_result(td, job, None, exc, cfg, worker_id, notifier)
            continue
        kwargs = options.engine_kwargs(cfg)
        if engine_covers(kwargs, cfg):
            batched.append((i, job, options))
            continue
        # an option the batch engine does not cover: this job takes the Transcriber's own path
        outcomes[i] = commit_result(td, job, options, transcribe_alone(engine, job, options, cfg), cfg, worker_id,
                                    notifier)
    items = [EngineJob(job.audio_path, speakers=o.speakers, hotwords=o.hotwords, batch_size_s=o.batch_size_s,
                       extension=job.extension, source_name=job.record.original_name) for _, job, o in batched]
    results = engine.transcribe_many(items) if items else []
    for (i, job, options), result in zip(batched, results):
        if isinstance(result, Exception) and not (isinstance(result, TranscribeError) and not result.retryable):
            # a failure inside a shared batch: this job alone through the Transcriber, which has the runtime
            # device fallback (out of memory) and the typed user errors (too many speakers)
            logger.warning("job {}: failed in its batch ({}); retrying it alone", job.job_id, result)
            result = transcribe_alone(engine, job, options, cfg)
        outcomes[i] = commit_result(td, job, options, result, cfg, worker_id, notifier)
    return [outcomes[i] for i in range(len(jobs))]


def transcribe_alone(engine: BatchTranscriber, job: Job, options: JobOptions, cfg: Config) -> Result | Exception:
    """One job through the engine's `Transcriber` (every option, the runtime fallback, the typed errors);
    its error is returned, recorded for this job alone."""
    try:
        return engine.transcriber.transcribe(job.audio_path, **options.engine_kwargs(cfg), extension=job.extension,
                                             source_name=job.record.original_name)
    except Exception as exc:  # noqa: BLE001 - recorded for this job alone
        return exc


def engine_covers(kwargs: dict[str, object], cfg: Config) -> bool:
    """Whether the batch engine runs a job with these `Transcriber.transcribe` options as that would:
    it covers speakers, hotwords and batch size, not speaker bounds, --no-diarize, word timestamps or
    the result cache (those jobs run through the Transcriber)."""
    return (kwargs.get("min_speakers") is None and kwargs.get("max_speakers") is None
            and kwargs.get("diarize", True) is not False and not kwargs.get("word_timestamps")
            and not (cfg.cache.enabled and kwargs.get("use_cache", True)))
