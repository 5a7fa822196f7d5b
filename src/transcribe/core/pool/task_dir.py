"""The task directory: a Maildir-style job queue. A folder is a state; a job moves by atomic rename.

::

    <task_dir>/
      inbox/        dropped audio (+ optional sidecar <name>.json), and requeued jobs <job-id>.job/
      tmp/          staging: `submit` builds <job-id>.job/ here, then renames it into inbox/
      processing/   <job-id>/ : the audio (original name), job.json (options, attempts), lease.json
      done/         <job-id>.json result (+ <job-id>.txt/.srt/...), <job-id>/ archived audio (pool.keep_audio)
      failed/       <job-id>/ : the audio, job.json and error.json (reason, error type, attempts, worker, times)
      workers/      <worker-id>.json: each worker's status; its mtime is the worker's heartbeat

Invariants (docs/task-directory.md):
- A job is in exactly one of inbox/, processing/, done/ (its result), failed/ at any instant; moves are
  ``rename(2)`` on one filesystem, so a crash leaves it in the old place or the new one, never both/neither.
- Claim = one rename out of inbox/. Two workers racing for one file: one rename wins, the other gets
  FileNotFoundError and moves on. No locks.
- Commit = the result JSON renamed into done/ (written to tmp/, fsynced first). Only then is the
  processing/ entry archived or removed. Recovery that finds the result already in done/ finishes that
  cleanup and never transcribes again.
- Recovery is a scan of processing/: nothing is ever deleted at start-up.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from loguru import logger

from transcribe.core.errors import TranscribeError
from transcribe.core.fault_injection import crash_point
from transcribe.core.fsio import now_iso, write_atomic
from transcribe.core.pool.jobs import (
    Job,
    JobOptions,
    JobRecord,
    RefusedInput,
    new_job_id,
    parse_options,
)

STATES = ("inbox", "tmp", "processing", "done", "failed")
JOB_SUFFIX = ".job"  # a requeued or submitted job in inbox/: a directory holding audio + job.json
IGNORED_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".download", ".json")
JOB_FILE, LEASE_FILE, SIDECAR_FILE, ERROR_FILE = "job.json", "lease.json", "sidecar.json", "error.json"
STATUS_DIR = "workers"


def _is_candidate(name: str) -> bool:
    return not name.startswith(".") and not name.lower().endswith(IGNORED_SUFFIXES)


class TaskDir:
    """Operations on one task directory. Every method is safe to run from many processes at once."""

    def __init__(self, root: str | os.PathLike[str], *, settle_seconds: float = 1.0, max_attempts: int = 3,
                 max_sidecar_bytes: int = 64 * 1024, umask: int = 0o027) -> None:
        self.root = Path(root)
        self.settle_seconds = settle_seconds
        self.max_attempts = max_attempts
        self.max_sidecar_bytes = max_sidecar_bytes
        self.dir_mode = 0o777 & ~umask
        self.file_mode = 0o666 & ~umask
        self.inbox, self.tmp, self.processing = self.root / "inbox", self.root / "tmp", self.root / "processing"
        self.done, self.failed, self.workers = self.root / "done", self.root / "failed", self.root / STATUS_DIR

    @classmethod
    def from_config(cls, cfg: Any) -> "TaskDir":
        p = cfg.pool
        return cls(cfg.resolve_path(p.task_dir), settle_seconds=p.settle_seconds, max_attempts=p.max_attempts,
                   max_sidecar_bytes=p.max_sidecar_bytes, umask=p.umask)

    def ensure(self) -> "TaskDir":
        for d in (self.root, *(self.root / s for s in STATES), self.workers):
            d.mkdir(mode=self.dir_mode, parents=True, exist_ok=True)
        return self

    # ------------------------------------------------------------------ claiming
    def candidates(self, now: float | None = None) -> list[Path]:
        """Inbox entries ready to claim, best first: priority (high first), then oldest first."""
        now = time.time() if now is None else now
        ready: list[tuple[int, float, str, Path]] = []
        try:
            entries = list(os.scandir(self.inbox))
        except FileNotFoundError:
            return []
        for entry in entries:
            if not _is_candidate(entry.name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            path = Path(entry.path)
            if stat.S_ISDIR(st.st_mode):
                if not entry.name.endswith(JOB_SUFFIX):
                    continue
                priority = self._job_dir_priority(path)
            else:
                # Still being written? Its mtime moves with every write; wait until it has settled.
                if now - st.st_mtime < self.settle_seconds:
                    continue
                priority = self._sidecar_priority(path)
            ready.append((-priority, st.st_mtime, entry.name, path))
        ready.sort(key=lambda t: t[:3])
        return [t[3] for t in ready]

    def _sidecar_priority(self, audio: Path) -> int:
        side = self.sidecar_for(audio)
        if side is None:
            return 0
        try:
            return int(json.loads(side.read_bytes()[: self.max_sidecar_bytes]).get("priority", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            return 0  # a bad sidecar is reported when the job runs, not here

    def _job_dir_priority(self, job_dir: Path) -> int:
        try:
            opts = JobRecord.from_json((job_dir / JOB_FILE).read_text(encoding="utf-8")).options or {}
            return int(opts.get("priority", 0))
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def sidecar_for(self, audio: Path) -> Path | None:
        """``<name>.json`` (``talk.wav.json``), else ``<stem>.json`` (``talk.json``)."""
        for cand in (audio.with_name(audio.name + ".json"), audio.with_suffix(".json")):
            if cand != audio and cand.is_file() and not cand.is_symlink():
                return cand
        return None

    def claim(self, entry: Path, worker_id: str) -> Job | None:
        """Take `entry` out of inbox/ by one rename. None if another worker was faster."""
        if entry.name.endswith(JOB_SUFFIX) and entry.is_dir() and not entry.is_symlink():
            job_id = entry.name[: -len(JOB_SUFFIX)]
            target = self.processing / job_id
            crash_point("claim.before")
            try:
                os.rename(entry, target)
            except FileNotFoundError:
                return None
            crash_point("claim.after")
            record = self._read_record(target)
        else:
            job_id = new_job_id(entry.name)
            target = self.processing / job_id
            target.mkdir(mode=self.dir_mode)
            crash_point("claim.before")
            try:
                os.rename(entry, target / entry.name)
            except FileNotFoundError:
                target.rmdir()
                return None
            crash_point("claim.after")
            side = self.sidecar_for(entry)
            if side is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.rename(side, target / SIDECAR_FILE)
            record = JobRecord(job_id, entry.name, entry.name, now_iso())
        record.attempts += 1
        record.claimed = time.time()
        write_atomic(target / JOB_FILE, record.to_json(), target, self.file_mode)
        lease = {"worker": worker_id, "pid": os.getpid(), "attempt": record.attempts, "started": now_iso(),
                 "started_ts": time.time()}
        write_atomic(target / LEASE_FILE, json.dumps(lease), target, self.file_mode)
        return Job(target, record)

    def claim_next(self, worker_id: str) -> Job | None:
        for entry in self.candidates():
            job = self.claim(entry, worker_id)
            if job is not None:
                return job
        return None

    def _read_record(self, job_dir: Path) -> JobRecord:
        """job.json, or one rebuilt from the dir (a crash right after the claim rename leaves none)."""
        try:
            return JobRecord.from_json((job_dir / JOB_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError):
            audio = self._audio_in(job_dir)
            name = audio.name if audio else "audio"
            return JobRecord(job_dir.name.removesuffix(JOB_SUFFIX), name, name, now_iso(), attempts=1)

    @staticmethod
    def _audio_in(job_dir: Path) -> Path | None:
        meta = {JOB_FILE, LEASE_FILE, SIDECAR_FILE, ERROR_FILE}
        for p in sorted(job_dir.iterdir()):
            if p.name not in meta and not p.name.startswith("."):
                return p
        return None

    # ------------------------------------------------------------------ a claimed job
    def check_input(self, job: Job) -> None:
        """Refuse what must never be read: symlinks (not followed), hard links, FIFOs and devices."""
        from transcribe.core.errors import AudioError

        try:
            st = os.lstat(job.audio_path)
        except FileNotFoundError:
            raise AudioError(f"{job.record.original_name!r}: the job holds no audio file") from None
        if stat.S_ISLNK(st.st_mode):
            raise RefusedInput("symlink_refused", f"{job.record.original_name!r} is a symbolic link; links are not "
                                              f"followed (copy the file into the inbox instead)")
        if not stat.S_ISREG(st.st_mode):
            raise RefusedInput("not_regular_file", f"{job.record.original_name!r} is not a regular file "
                                               f"(FIFOs, devices and directories are refused)")
        if st.st_nlink > 1:
            raise RefusedInput("hardlink_refused", f"{job.record.original_name!r} has {st.st_nlink} hard links; "
                                               f"hard-linked files are refused (copy the file instead)")

    def options(self, job: Job) -> JobOptions:
        """The job's options: from submit (job.json) or its sidecar; `SidecarError` if invalid."""
        if job.record.options is not None:
            return JobOptions.model_validate(job.record.options)
        side = job.dir / SIDECAR_FILE
        try:
            with open(side, "rb") as f:
                raw = f.read(self.max_sidecar_bytes + 1)
        except FileNotFoundError:
            return JobOptions()
        return parse_options(raw, self.max_sidecar_bytes)

    def complete(self, job: Job, outputs: dict[str, str], *, keep_audio: bool) -> Path:
        """Commit: write each output (json last: the commit marker), then archive or drop the job dir."""
        result_path = self.done / f"{job.job_id}.json"
        crash_point("result.before_write")
        try:
            for fmt, text in sorted(outputs.items(), key=lambda kv: kv[0] == "json"):
                hook = (lambda: crash_point("result.before_rename")) if fmt == "json" else None
                write_atomic(self.done / f"{job.job_id}.{fmt}", text, self.tmp, self.file_mode, hook)
        except OSError:
            for fmt in outputs:  # no partial results: a retry writes them all again
                if fmt != "json":
                    with contextlib.suppress(FileNotFoundError):
                        (self.done / f"{job.job_id}.{fmt}").unlink()
            raise
        crash_point("result.after_rename")
        self._finish_done(job.dir, keep_audio)
        crash_point("cleanup.after")
        return result_path

    def _finish_done(self, job_dir: Path, keep_audio: bool) -> None:
        with contextlib.suppress(FileNotFoundError):
            (job_dir / LEASE_FILE).unlink()
        if keep_audio:
            with contextlib.suppress(FileNotFoundError):
                os.rename(job_dir, self.done / job_dir.name)
        else:
            shutil.rmtree(job_dir, ignore_errors=True)

    def fail(self, job: Job, error: dict[str, Any], worker_id: str | None = None) -> Path:
        """Move the job to failed/ with error.json (reason, type, message, attempts, worker, times)."""
        record = job.record
        lease = self._read_lease(job.dir)
        info = {
            "job_id": record.job_id, "original_name": record.original_name, "attempts": record.attempts,
            "worker": worker_id or lease.get("worker"), "created": record.created,
            "started": lease.get("started"), "failed": now_iso(), "history": record.history, **error,
        }
        write_atomic(job.dir / ERROR_FILE, json.dumps(info, ensure_ascii=False, indent=2), job.dir, self.file_mode)
        with contextlib.suppress(FileNotFoundError):
            (job.dir / LEASE_FILE).unlink()
        target = self.failed / job.job_id
        os.rename(job.dir, target)
        logger.warning("job {} failed: {} ({})", record.job_id, error.get("reason"), error.get("message"))
        return target

    def release(self, job: Job, error: dict[str, Any]) -> str:
        """Give a job back after a retryable failure: requeue it, or fail it when attempts are spent."""
        job.record.history.append({"attempt": job.record.attempts, "at": now_iso(), **error})
        if job.record.attempts >= self.max_attempts:
            self.fail(job, {**error, "reason": "max_attempts_exceeded", "last_reason": error.get("reason"),
                            "message": f"gave up after {job.record.attempts} attempts; last: {error.get('message')}"})
            return "failed"
        write_atomic(job.dir / JOB_FILE, job.record.to_json(), job.dir, self.file_mode)
        with contextlib.suppress(FileNotFoundError):
            (job.dir / LEASE_FILE).unlink()
        os.rename(job.dir, self.inbox / f"{job.job_id}{JOB_SUFFIX}")
        logger.info("job {} requeued (attempt {} of {}): {}", job.job_id, job.record.attempts, self.max_attempts,
                    error.get("reason"))
        return "requeued"

    @staticmethod
    def _read_lease(job_dir: Path) -> dict[str, Any]:
        try:
            return json.loads((job_dir / LEASE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    # ------------------------------------------------------------------ recovery (supervisor only)
    def processing_jobs(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        """(job dir, lease) for every entry in processing/."""
        for entry in sorted(self.processing.iterdir()):
            if entry.is_dir() and not entry.name.startswith("."):
                yield entry, self._read_lease(entry)

    def recover(self, job_dir: Path, reason: str, message: str, *, keep_audio: bool = True) -> str:
        """Settle a processing/ entry whose worker is gone. Returns what happened."""
        if (self.done / f"{job_dir.name}.json").exists():
            self._finish_done(job_dir, keep_audio)  # committed before the crash: finish, never redo
            return "completed"
        if self._audio_in(job_dir) is None:
            # Claimed dir whose rename never happened (crash between mkdir and rename): an empty dir.
            with contextlib.suppress(FileNotFoundError):
                job_dir.rmdir()
            return "empty"
        job = Job(job_dir, self._read_record(job_dir))
        side_left = self.inbox / (job.record.original_name + ".json")
        if not (job_dir / SIDECAR_FILE).exists() and side_left.is_file():
            with contextlib.suppress(FileNotFoundError):  # crash between the audio and sidecar renames of a claim
                os.rename(side_left, job_dir / SIDECAR_FILE)
        return self.release(job, {"reason": reason, "error_type": "WorkerLost", "message": message,
                                  "retryable": True})

    def recover_all(self, reason: str, message: str, *, keep_audio: bool = True) -> dict[str, str]:
        """Start-up: everything in processing/ belongs to a previous run. Nothing is deleted."""
        outcomes = {}
        for job_dir, _ in list(self.processing_jobs()):
            outcomes[job_dir.name] = self.recover(job_dir, reason, message, keep_audio=keep_audio)
            logger.info("recovered job {}: {}", job_dir.name, outcomes[job_dir.name])
        return outcomes

    def acquire_server_lock(self) -> int:
        """One server per task dir: an flock on <task_dir>/server.lock, held for the process's life."""
        path = self.root / "server.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TranscribeError(f"another server is already serving {self.root} (lock {path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        return fd

    # ------------------------------------------------------------------ user operations
    def submit(self, audio: Path, options: JobOptions | None = None) -> str:
        """Stage a copy of `audio` in tmp/ and rename it into inbox/ (never seen half-written)."""
        job_id = new_job_id(audio.name)
        stage = self.tmp / f"{job_id}{JOB_SUFFIX}"
        stage.mkdir(mode=self.dir_mode)
        try:
            shutil.copyfile(audio, stage / audio.name)
            os.chmod(stage / audio.name, self.file_mode)
            record = JobRecord(job_id, audio.name, audio.name, now_iso(),
                               options=options.model_dump(exclude_none=True) if options else None)
            write_atomic(stage / JOB_FILE, record.to_json(), stage, self.file_mode)
            os.rename(stage, self.inbox / stage.name)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return job_id

    def retry(self, job_id: str) -> None:
        """Move failed/<job_id> back to inbox/ with its attempts reset."""
        src = self.failed / job_id
        if not src.is_dir():
            raise TranscribeError(f"no failed job {job_id!r} in {self.failed}")
        record = self._read_record(src)
        record.attempts = 0
        record.history.append({"retried": now_iso()})
        write_atomic(src / JOB_FILE, record.to_json(), src, self.file_mode)
        with contextlib.suppress(FileNotFoundError):
            # a readable UTC time, to the millisecond so two retries never overwrite each other's record
            stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H-%M-%S.%f")[:-3]
            (src / ERROR_FILE).rename(src / f".error-{stamp}Z.json")
        os.rename(src, self.inbox / f"{job_id}{JOB_SUFFIX}")

    def failed_ids(self) -> list[str]:
        return sorted(p.name for p in self.failed.iterdir() if p.is_dir() and not p.name.startswith("."))

    def find(self, job_id: str) -> tuple[str, Path] | None:
        """Where a job is now: ("done", result) / ("failed", dir) / ("processing", dir) / ("inbox", entry)."""
        for state, path in (("done", self.done / f"{job_id}.json"), ("failed", self.failed / job_id),
                            ("processing", self.processing / job_id),
                            ("inbox", self.inbox / f"{job_id}{JOB_SUFFIX}")):
            if path.exists():
                return state, path
        return None

    def counts(self) -> dict[str, int]:
        """Jobs per state, from the folders alone."""
        def n(path: Path, pred: Callable[[os.DirEntry[str]], bool]) -> int:
            try:
                return sum(1 for e in os.scandir(path) if pred(e))
            except FileNotFoundError:
                return 0
        return {
            "inbox": n(self.inbox, lambda e: _is_candidate(e.name) and (not e.is_dir(follow_symlinks=False)
                                                                      or e.name.endswith(JOB_SUFFIX))),
            "processing": n(self.processing, lambda e: e.is_dir(follow_symlinks=False) and e.name[0] != "."),
            "done": n(self.done, lambda e: e.name.endswith(".json") and e.name[0] != "."),
            "failed": n(self.failed, lambda e: e.is_dir(follow_symlinks=False) and e.name[0] != "."),
        }

    def oldest_waiting(self) -> float | None:
        """Age in seconds of the oldest inbox entry."""
        ages = []
        for e in os.scandir(self.inbox) if self.inbox.exists() else []:
            if _is_candidate(e.name):
                with contextlib.suppress(FileNotFoundError):
                    ages.append(time.time() - e.stat(follow_symlinks=False).st_mtime)
        return max(ages) if ages else None
