"""The task directory: a Maildir-style job queue. A folder is a state; a job moves by atomic rename.

::

    <task_dir>/
      inbox/        dropped audio (+ optional sidecar <name>.json), and requeued jobs <job-id>.job/
      tmp/          staging: `submit` builds <job-id>.job/ here, then renames it into inbox/
      processing/   <job-id>/ : the audio (original name), job.json (options, attempts, lease token)
      leases/       <job-id>.lock : the lease; flocked by the job's owner for as long as it owns the job
      done/         <job-id>.json result (+ <job-id>.txt/.srt/...), <job-id>/ archived audio (pool.keep_audio)
      failed/       <job-id>/ : the audio, job.json and error.json (reason, error type, attempts, worker, times)
      workers/      <worker-id>.json: each worker's status; its mtime is the worker's heartbeat

Invariants (docs/task-directory.md):
- A job is in exactly one of inbox/, processing/, done/ (its result), failed/ at any instant; moves are
  ``rename(2)`` on one filesystem, so a crash leaves it in the old place or the new one, never both/neither.
- Claim = take the job's lease, then one rename out of inbox/. Two claimers racing for one file: one rename
  wins, the other gets FileNotFoundError and moves on.

Fencing (who may touch a job in processing/):
- Owning a job is holding its **lease**: an exclusive ``flock`` on ``leases/<job-id>.lock``, taken *before*
  the claim rename and held until the job has left processing/. The kernel drops it when the owner dies,
  so "is the lease held?" is "is the owner alive?", with no pid to trust. `Job.lease` (a `Lease`: open fd +
  token) is that ownership; any process may claim (a pool worker, lock mode, a Ray driver) and it must
  keep the `Job` object - the fd - until it commits.
- `complete`, `fail` and `release` first check the fence: the lease is still flocked by us, its lock file
  is still the one at ``leases/<job-id>.lock``, the job is still in processing/ and job.json carries our
  token. Otherwise they raise `LeaseLost` and touch nothing (no result, no archive, no delete).
- Recovery (`recover`, `sweep`, `recover_all`) takes the lease itself with ``LOCK_NB``: a job whose lease
  is held by a live process is skipped; only unheld jobs are requeued or finished. The lock file is
  unlinked only by its holder, after the job has left processing/.
- Commit = the result JSON renamed into done/ (written to tmp/, fsynced, folder fsynced). Only then is the
  processing/ entry archived or removed. Recovery that finds the result already in done/ finishes that
  cleanup and never transcribes again.
- Names: every internal name (job folders, lock files, staging files) is derived from the job id, never
  from the dropped file's name; an inbox entry whose name can never be processed (not UTF-8, too long for
  its sidecar) goes to failed/ with `name_invalid` / `name_too_long`, its bytes intact.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loguru import logger

from transcribe.core.errors import TranscribeError
from transcribe.core.fault_injection import crash_point
from transcribe.core.fsio import (
    dumps_json,
    fsync_dir,
    loads_json_object,
    now_iso,
    printable,
    read_json_object,
    write_atomic,
)
from transcribe.core.pool.jobs import (
    SIDECAR_SUFFIX,
    Job,
    JobOptions,
    JobRecord,
    LeaseLost,
    RefusedInput,
    name_problem,
    name_to_json,
    new_job_id,
    parse_options,
    sidecar_candidates,
)

STATES = ("inbox", "tmp", "processing", "done", "failed")
JOB_SUFFIX = ".job"  # a requeued or submitted job in inbox/: a directory holding audio + job.json
IGNORED_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".download", ".json")
SIDECAR_SUFFIXES = (SIDECAR_SUFFIX,)
JOB_FILE, LEASE_FILE, SIDECAR_FILE, ERROR_FILE = "job.json", "lease.json", "sidecar.json", "error.json"
STATUS_DIR, LEASES_DIR = "workers", "leases"
TMP_MAX_AGE = 24 * 3600.0  # tmp/ entries older than this are leftovers of a crash, swept by the supervisor
# Disk-level errors: every entry would hit them, so a claim pass stops at the first one instead of trying all.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


@dataclass
class StagedJob:
    """A job being written in tmp/ by `TaskDir.staging`."""

    job_id: str
    audio: Path  # write the audio here
    options: JobOptions | None = None


def _is_candidate(name: str) -> bool:
    return not name.startswith(".") and not name.lower().endswith(IGNORED_SUFFIXES)


def errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "OSError")


@dataclass(eq=False)
class Lease:
    """Ownership of one job: an open fd holding an exclusive flock on ``leases/<job-id>.lock``.

    The flock lives as long as the fd (and dies with the process), so whoever holds it is alive. The
    token is written into job.json at claim; `TaskDir` checks both before it commits anything.
    """

    job_id: str
    path: Path
    fd: int | None
    token: str | None

    @property
    def held(self) -> bool:
        """Open, and still the lock file at `path` (the holder alone unlinks it)."""
        if self.fd is None:
            return False
        try:
            mine, there = os.fstat(self.fd), os.stat(self.path)
        except OSError:
            return False
        return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)

    def read_info(self) -> dict[str, Any]:
        """What the last holder wrote into the lock file (worker, pid, token, started)."""
        if self.fd is None:
            return {}
        try:
            return loads_json_object(os.pread(self.fd, 65536, 0))
        except OSError:
            return {}

    def write_info(self, info: dict[str, Any]) -> None:
        assert self.fd is not None
        data = dumps_json(info).encode("utf-8")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def drop(self) -> None:
        """The job has left processing/: unlink the lock file, then close (releasing the flock)."""
        if self.fd is None:
            return
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.abandon()

    def abandon(self) -> None:
        """Close without unlinking: the job stays where it is, and the next sweep recovers it."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


@dataclass
class _ScanCache:
    """One process's view of the inbox: candidates from the last scan, claimed from until empty."""

    queue: collections.deque[str] = field(default_factory=collections.deque)
    scanned_at: float = float("-inf")  # time.monotonic()
    priorities: dict[tuple[str, int, int], int] = field(default_factory=dict)  # (name, mtime_ns, size)
    settled: dict[str, os.stat_result] = field(default_factory=dict)  # non-directories already seen settled
    ready: dict[str, tuple[int, float, str]] = field(default_factory=dict)  # name -> sort key, from the last scan
    sidecars: dict[str, int] = field(default_factory=dict)  # sidecar name -> mtime_ns, from the last scan
    unclaimable: dict[str, int] = field(default_factory=dict)  # name -> mtime_ns: left alone until it changes


class TaskDir:
    """Operations on one task directory. Every method is safe to run from many processes at once."""

    def __init__(self, root: str | os.PathLike[str], *, settle_seconds: float = 1.0, max_attempts: int = 3,
                 max_sidecar_bytes: int = 64 * 1024, umask: int = 0o027, rescan_after: float = 1.0) -> None:
        self.root = Path(root)
        self.settle_seconds = settle_seconds
        self.max_attempts = max_attempts
        self.max_sidecar_bytes = max_sidecar_bytes
        # A claimer rescans the inbox when its candidate list is empty or older than this (new arrivals,
        # a new high priority); in between, a claim is O(1): no rescan, no sidecar re-read per claim.
        self.rescan_after = rescan_after
        self.dir_mode = 0o777 & ~umask
        self.file_mode = 0o666 & ~umask
        self.inbox, self.tmp, self.processing = self.root / "inbox", self.root / "tmp", self.root / "processing"
        self.done, self.failed, self.workers = self.root / "done", self.root / "failed", self.root / STATUS_DIR
        self.leases = self.root / LEASES_DIR
        self._scan = _ScanCache()

    @classmethod
    def from_config(cls, cfg: Any) -> TaskDir:
        p = cfg.pool
        return cls(cfg.resolve_path(p.task_dir), settle_seconds=p.settle_seconds, max_attempts=p.max_attempts,
                   max_sidecar_bytes=p.max_sidecar_bytes, umask=p.umask,
                   rescan_after=min(max(p.settle_seconds, 0.2), p.rescan_interval, 1.0))

    def folders(self) -> list[Path]:
        return [self.root, *(self.root / s for s in STATES), self.workers, self.leases]

    def ensure(self) -> TaskDir:
        for d in self.folders():
            d.mkdir(mode=self.dir_mode, parents=True, exist_ok=True)
        return self

    def check_one_filesystem(self) -> None:
        """Jobs move by rename(2), which cannot cross filesystems (EXDEV): refuse to serve a task dir whose
        folders are separate mounts (typically Docker bind mounts of inbox/ and done/)."""
        devices = {}
        for d in self.folders():
            try:
                devices[d] = os.stat(d).st_dev
            except OSError as e:
                raise TranscribeError(f"cannot use task dir folder {d}: {e.strerror}") from None
        try:  # job leases are flocks: a filesystem without them (some network mounts) cannot fence jobs
            probe = self.take_lease(".probe")
            if probe is not None:
                probe.drop()
        except OSError as e:
            raise TranscribeError(f"{self.leases} does not support file locks ({e.strerror}); job leases need them: "
                                  f"put pool.task_dir on a local filesystem (or NFSv4 with locking)") from None
        root_dev = devices[self.root]
        apart = [d for d, dev in devices.items() if dev != root_dev]
        if apart:
            names = ", ".join(f"{d.name}/" for d in apart)
            raise TranscribeError(
                f"{names} in {self.root} {'is' if len(apart) == 1 else 'are'} on a different filesystem than the "
                f"task directory; jobs move by rename, which cannot cross filesystems. Mount the whole task "
                f"directory as one volume (e.g. `-v /data/tasks:/tasks`, not separate mounts for inbox/ and done/), "
                f"or point pool.task_dir at a folder on one filesystem")

    # ------------------------------------------------------------------ leases
    def _lease_path(self, job_id: str) -> Path:
        raw = os.fsencode(job_id)
        if len(raw) <= 200 and job_id.isprintable() and printable(job_id) == job_id:
            return self.leases / f"{job_id}.lock"
        return self.leases / f"{hashlib.sha256(raw).hexdigest()[:32]}.lock"  # never over NAME_MAX

    def take_lease(self, job_id: str, info: dict[str, Any] | None = None) -> Lease | None:
        """The job's lease if nobody holds it (non-blocking), else None."""
        path = self._lease_path(job_id)
        for _ in range(3):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, self.file_mode)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            lease = Lease(job_id, path, fd, uuid.uuid4().hex)
            if lease.held:
                if info is not None:
                    try:
                        lease.write_info({**info, "token": lease.token})
                    except BaseException:
                        lease.drop()
                        raise
                return lease
            lease.abandon()  # locked a file its holder had just unlinked: open the current one
        return None

    def lease_info(self, job_id: str) -> dict[str, Any]:
        """Who holds a job (worker, pid, token, started) as its owner wrote it; {} if unknown."""
        return read_json_object(self._lease_path(job_id))

    def _disk_token(self, job_dir: Path) -> str | None:
        return read_json_object(job_dir / JOB_FILE).get("lease_token")

    def check_owner(self, job: Job) -> None:
        """The fence: raise `LeaseLost` unless `job` is still ours to commit, fail or requeue."""
        lease = job.lease
        if lease is None or not lease.held:
            raise LeaseLost(f"job {job.job_id}: this process does not hold its lease; it was recovered and "
                            f"may be running elsewhere, so nothing of it is touched")
        if job.dir.parent != self.processing or not job.dir.is_dir():
            raise LeaseLost(f"job {job.job_id} is no longer in processing/")
        if self._disk_token(job.dir) != lease.token:
            raise LeaseLost(f"job {job.job_id} was claimed again (lease token changed)")

    # ------------------------------------------------------------------ scanning and claiming
    def scan(self, now: float | None = None) -> list[Path]:
        """Inbox entries ready to claim, best first: priority (high first), then oldest first."""
        return [self.inbox / name for name in self._ready_names(now)]

    def _ready_names(self, now: float | None = None) -> list[str]:
        """The names of `scan`, cheaply enough for 10,000 waiting files.

        One ``scandir``. An entry found ready by an earlier scan keeps its place (no stat, no sidecar read)
        unless a sidecar of its name appeared or changed since; the rest get an ``lstat`` unless already seen
        settled, and a sidecar's priority is read once per (name, mtime, size). A claim re-checks the entry
        it takes, so a stale view costs a skipped claim, never a wrong one. An audio file is ready once it
        and its sidecar (if any) have been still for `settle_seconds`.
        """
        now = time.time() if now is None else now
        cache, settle = self._scan, self.settle_seconds
        kept: dict[str, tuple[int, float, str]] = {}
        fresh: dict[str, os.DirEntry[str]] = {}
        try:
            with os.scandir(self.inbox) as it:
                for entry in it:
                    key = cache.ready.get(entry.name)
                    if key is None:
                        fresh[entry.name] = entry
                    else:
                        kept[entry.name] = key
        except OSError as e:
            if not isinstance(e, FileNotFoundError):
                logger.error("cannot list {}: {} ({})", self.inbox, e.strerror, errno_name(e))
            return []
        stats: dict[str, os.stat_result] = {}
        for name, entry in fresh.items():
            st = cache.settled.get(name)
            if st is None:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # gone since the listing (claimed by someone else)
            stats[name] = st
        sidecars = {n: st.st_mtime_ns for n, st in stats.items() if n.lower().endswith(SIDECAR_SUFFIXES)}
        changed = {n.rsplit(".", 1)[0] for n, m in sidecars.items() if cache.sidecars.get(n) != m}
        if changed:  # a sidecar appeared or changed: its audio is looked at again (priority, settle)
            for name in [n for n in kept if n in changed or n.rsplit(".", 1)[0] in changed]:
                del kept[name]
                with contextlib.suppress(OSError):
                    stats[name] = os.lstat(self.inbox / name)
        cache.settled = {name: st for name, st in stats.items()
                         if not stat.S_ISDIR(st.st_mode) and now - st.st_mtime >= settle}
        settled, priorities, unclaimable = cache.settled, cache.priorities, cache.unclaimable
        seen_priorities: dict[tuple[str, int, int], int] = {}
        for name, st in stats.items():
            if name[0] == "." or name.lower().endswith(IGNORED_SUFFIXES) or unclaimable.get(name) == st.st_mtime_ns:
                continue
            if name not in settled:
                if not (stat.S_ISDIR(st.st_mode) and name.endswith(JOB_SUFFIX)):
                    continue  # still being written (its mtime moves with every write), or not a job
                key = (name, st.st_mtime_ns, 0)
                priority = priorities.get(key)
                if priority is None:
                    priority = self._job_dir_priority(self.inbox / name)
            else:
                side_name = self._sidecar_name(name, stats)
                key = (name, 0, -1)
                if side_name is not None:
                    side = stats[side_name]
                    if side_name not in settled:
                        continue  # its sidecar is still being written
                    key = (side_name, side.st_mtime_ns, side.st_size)
                priority = priorities.get(key)
                if priority is None:
                    priority = self._sidecar_priority(self.inbox / side_name) if side_name else 0
            seen_priorities[key] = priority
            kept[name] = (-priority, st.st_mtime, name)
        cache.priorities, cache.ready, cache.sidecars = seen_priorities, kept, sidecars
        return [key[2] for key in sorted(kept.values())]


    @staticmethod
    def _sidecar_name(audio_name: str, names: dict[str, Any] | set[str]) -> str | None:
        """The first of `sidecar_candidates` present in `names`."""
        return next((cand for cand in sidecar_candidates(audio_name) if cand in names), None)

    def _sidecar_priority(self, side: Path) -> int:
        try:
            with open(side, "rb") as f:
                data = json.loads(f.read(self.max_sidecar_bytes))
            return int(data.get("priority", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            return 0  # a bad sidecar is reported when the job runs, not here

    def _job_dir_priority(self, job_dir: Path) -> int:
        try:
            opts = JobRecord.from_json((job_dir / JOB_FILE).read_text(encoding="utf-8")).options or {}
            return int(opts.get("priority", 0))
        except Exception:  # noqa: BLE001 - a bad record is reported when the job runs; it never blocks a scan
            return 0

    def sidecar_for(self, audio: Path) -> Path | None:
        """The sidecar file of `audio` in its folder, if there is one (a regular file, not a link)."""
        for cand in sidecar_candidates(audio.name):
            p = audio.with_name(cand)
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.lstat(p).st_mode):
                    return p
        return None

    def claim(self, entry: Path, worker_id: str) -> Job | None:
        """Take `entry` out of inbox/: lease first, then one rename. None if it is not (or no longer) ready,
        another claimer was faster, or it could never run (then it is in failed/ with the reason).
        Raises OSError for what the filesystem refuses (the caller, `claim_next`, classifies it)."""
        try:
            st = os.lstat(entry)
        except FileNotFoundError:
            return None
        is_job_dir = stat.S_ISDIR(st.st_mode)
        if is_job_dir and not entry.name.endswith(JOB_SUFFIX):
            return None
        if not is_job_dir and time.time() - st.st_mtime < self.settle_seconds:
            self._forget(entry.name)
            return None  # written to since the scan: not settled after all
        job_id = entry.name[: -len(JOB_SUFFIX)] if is_job_dir else new_job_id(entry.name)
        lease = self.take_lease(job_id, {"worker": worker_id, "pid": os.getpid(), "started": now_iso(),
                                         "started_ts": time.time()})
        if lease is None:
            return None  # its requeuer or another claimer still holds it
        target = self.processing / job_id
        try:
            crash_point("claim.before")
            if is_job_dir:
                os.rename(entry, target)
            else:
                target.mkdir(mode=self.dir_mode)
                try:
                    os.rename(entry, target / entry.name)
                except BaseException:
                    with contextlib.suppress(OSError):
                        target.rmdir()
                    raise
        except FileNotFoundError:
            lease.drop()
            return None
        except BaseException:
            lease.drop()
            raise
        crash_point("claim.after")
        side_name = None
        if not is_job_dir:
            side = self.sidecar_for(entry)
            if side is not None:
                side_name = side.name
                try:
                    os.rename(side, target / SIDECAR_FILE)
                except FileNotFoundError:
                    side_name = None
                except OSError as e:  # the job runs without its options rather than not at all
                    logger.warning("job {}: cannot take sidecar {!r}: {}", job_id, side.name, e)
                    side_name = None
        record = self._read_record(target) if is_job_dir else JobRecord(job_id, entry.name, entry.name, now_iso())
        record.attempts += 1
        record.claimed = time.time()
        record.lease_token = lease.token
        job = Job(target, record, lease)
        try:
            write_atomic(target / JOB_FILE, record.to_json(), target, self.file_mode)
        except OSError:
            self._unclaim(job, entry, is_job_dir, side_name)
            raise
        problem = name_problem(entry.name) or (name_problem(record.audio_name) if is_job_dir else None)
        if problem is not None:
            reason, message = problem
            try:
                self.fail(job, {"reason": reason, "error_type": "UnprocessableName", "message": message,
                                "retryable": False}, worker_id)
            except OSError:
                lease.abandon()  # left in processing/, unleased: the sweep settles it later
                raise
            return None
        return job

    def _unclaim(self, job: Job, entry: Path, is_job_dir: bool, side_name: str | None) -> None:
        """Undo a claim that could not record itself (job.json not written: a full disk)."""
        assert job.lease is not None
        try:
            if is_job_dir:
                os.rename(job.dir, entry)
            else:
                os.rename(job.dir / entry.name, entry)
                if side_name:
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(job.dir / SIDECAR_FILE, self.inbox / side_name)
                job.dir.rmdir()
        except OSError as e:
            logger.warning("job {}: claim could not be undone ({}); the sweep will requeue it", job.job_id, e)
            job.lease.abandon()
            return
        job.lease.drop()

    def claim_next(self, worker_id: str) -> Job | None:
        """Claim the best ready entry, or None. Never raises for the filesystem: errors are classified,
        logged, and the entry (or, for a full disk, the pass) is skipped."""
        cache = self._scan
        if not cache.queue or time.monotonic() - cache.scanned_at > self.rescan_after:
            cache.queue = collections.deque(self._ready_names())
            cache.scanned_at = time.monotonic()
        while cache.queue:
            entry = self.inbox / cache.queue.popleft()
            try:
                job = self.claim(entry, worker_id)
            except OSError as e:
                if e.errno in _DISK_ERRNOS:
                    logger.error("cannot claim from {}: {} ({}); retrying later", self.inbox, e.strerror,
                                 errno_name(e))
                    cache.queue.clear()
                    return None
                self._mark_unclaimable(entry, e)
                continue
            if job is not None:
                return job
        return None

    def _mark_unclaimable(self, entry: Path, exc: OSError) -> None:
        """An entry this filesystem will not move: leave it in the inbox, untouched, until it changes."""
        hint = {errno.EXDEV: "the inbox and processing/ are on different filesystems; mount the whole task "
                             "directory as one volume",
                errno.EACCES: "the server may not move it; fix the permissions of the inbox",
                errno.EPERM: "the server may not move it; fix the permissions of the inbox"}.get(exc.errno or 0, "")
        logger.error("cannot claim {!r}: {} ({}){}", printable(entry.name), exc.strerror, errno_name(exc),
                     f"; {hint}" if hint else "")
        with contextlib.suppress(OSError):
            self._scan.unclaimable[entry.name] = os.lstat(entry).st_mtime_ns
        self._forget(entry.name)

    def _forget(self, name: str) -> None:
        """Drop what the scan cache knows of `name`: the next scan looks at it afresh."""
        self._scan.settled.pop(name, None)
        self._scan.ready.pop(name, None)

    def _read_record(self, job_dir: Path) -> JobRecord:
        """job.json, or one rebuilt from the dir (a crash right after the claim rename leaves none)."""
        try:
            record = JobRecord.from_json((job_dir / JOB_FILE).read_text(encoding="utf-8"))
            if not isinstance(record.options, (dict, type(None))):
                raise TypeError("options is not an object")
            # the folder names the job: a record copied from elsewhere must not requeue it under another id
            record.job_id = job_dir.name.removesuffix(JOB_SUFFIX)
            return record
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # missing, or not a record we wrote
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

        name = printable(job.record.original_name)
        try:
            st = os.lstat(job.audio_path)
        except FileNotFoundError:
            raise AudioError(f"{name!r}: the job holds no audio file") from None
        if stat.S_ISLNK(st.st_mode):
            raise RefusedInput("symlink_refused", f"{name!r} is a symbolic link; links are not "
                                                  f"followed (copy the file into the inbox instead)")
        if not stat.S_ISREG(st.st_mode):
            raise RefusedInput("not_regular_file", f"{name!r} is not a regular file "
                                                   f"(FIFOs, devices and directories are refused)")
        if st.st_nlink > 1:
            raise RefusedInput("hardlink_refused", f"{name!r} has {st.st_nlink} hard links; "
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
        """Commit: check the fence, write each output (json last: the commit marker), then archive or drop
        the job dir and give up the lease. `LeaseLost` (nothing written) if the job is no longer ours."""
        self.check_owner(job)
        result_path = self.done / f"{job.job_id}.json"
        crash_point("result.before_write")

        def before_commit() -> None:
            crash_point("result.before_rename")
            self.check_owner(job)  # the last instant: the rename after this is the commit

        try:
            for fmt, text in sorted(outputs.items(), key=lambda kv: kv[0] == "json"):
                write_atomic(self.done / f"{job.job_id}.{fmt}", text, self.tmp, self.file_mode,
                             before_commit if fmt == "json" else None)
        except (OSError, LeaseLost):
            for fmt in outputs:  # no partial results: a retry writes them all again
                if fmt != "json":
                    with contextlib.suppress(FileNotFoundError):
                        (self.done / f"{job.job_id}.{fmt}").unlink()
            raise
        with contextlib.suppress(OSError):  # durability of the commit; the rename itself already happened
            fsync_dir(self.done)
        crash_point("result.after_rename")
        assert job.lease is not None
        try:
            self._finish_done(job.dir, keep_audio)
        except OSError as e:  # committed: never requeue it; the sweep finishes the cleanup
            logger.warning("job {}: committed, but its folder could not be archived ({}); left for the sweep",
                           job.job_id, e)
            job.lease.abandon()
            return result_path
        crash_point("cleanup.after")
        job.lease.drop()
        return result_path

    def _finish_done(self, job_dir: Path, keep_audio: bool) -> None:
        """After the commit (by its lease holder): archive the job dir to done/, or delete it."""
        with contextlib.suppress(FileNotFoundError):
            (job_dir / LEASE_FILE).unlink()  # left by older versions
        if keep_audio:
            try:
                os.rename(job_dir, self.done / job_dir.name)
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                logger.warning("job {}: an archive already exists in done/; dropping this copy", job_dir.name)
        shutil.rmtree(job_dir, ignore_errors=True)

    def fail(self, job: Job, error: dict[str, Any], worker_id: str | None = None) -> Path:
        """Move the job to failed/ with error.json (reason, type, message, attempts, worker, times)."""
        self.check_owner(job)
        assert job.lease is not None
        record, holder = job.record, job.lease.read_info()
        info = {
            "job_id": record.job_id, **name_to_json("original_name", record.original_name),
            "attempts": record.attempts, "worker": worker_id or holder.get("worker"), "created": record.created,
            "started": holder.get("started"), "failed": now_iso(), "history": record.history, **error,
        }
        write_atomic(job.dir / ERROR_FILE, dumps_json(info, indent=2), job.dir, self.file_mode)
        target = self.failed / job.job_id
        crash_point("fail.before_rename")
        os.rename(job.dir, target)
        with contextlib.suppress(OSError):
            fsync_dir(self.failed)
        crash_point("fail.after_rename")
        job.lease.drop()
        logger.warning("job {} failed: {} ({})", record.job_id, error.get("reason"), error.get("message"))
        return target

    def release(self, job: Job, error: dict[str, Any], *, counted: bool = True) -> str:
        """Give a job back: requeue it, or fail it when attempts are spent. `counted=False` (a stop the
        server itself decided: reload, shutdown) gives the attempt back instead of spending it."""
        self.check_owner(job)
        assert job.lease is not None
        record = job.record
        record.history.append({"attempt": record.attempts, "at": now_iso(), **error,
                               **({} if counted else {"counted": False})})
        if not counted:
            record.attempts = max(0, record.attempts - 1)
        elif record.attempts >= self.max_attempts:
            self.fail(job, {**error, "reason": "max_attempts_exceeded", "last_reason": error.get("reason"),
                            "message": f"gave up after {record.attempts} attempts; last: {error.get('message')}"})
            return "failed"
        try:
            write_atomic(job.dir / JOB_FILE, record.to_json(), job.dir, self.file_mode)
        except OSError as e:  # a full disk must not strand the job: requeue it with the record as claimed
            logger.warning("job {}: cannot update job.json ({}); requeued with its record as claimed", job.job_id, e)
        crash_point("requeue.before_rename")
        os.rename(job.dir, self.inbox / f"{job.job_id}{JOB_SUFFIX}")
        with contextlib.suppress(OSError):
            fsync_dir(self.inbox)
        crash_point("requeue.after_rename")
        job.lease.drop()
        logger.info("job {} requeued (attempt {} of {}{}): {}", job.job_id, record.attempts, self.max_attempts,
                    "" if counted else ", not counted", error.get("reason"))
        return "requeued"

    def abandon(self, job: Job) -> None:
        """Let go of a job that could not be settled (the disk refused even that): it stays in processing/,
        unleased, and the supervisor's sweep requeues it."""
        if job.lease is not None:
            job.lease.abandon()

    # ------------------------------------------------------------------ recovery
    def processing_names(self) -> list[str]:
        """The job ids in processing/, sorted (read-only; takes no lease)."""
        try:
            with os.scandir(self.processing) as it:
                return sorted(e.name for e in it if e.is_dir(follow_symlinks=False) and e.name[0] != ".")
        except OSError:
            return []

    def recover(self, job_dir: Path, reason: str, message: str, *, keep_audio: bool = True,
                counted: bool | Callable[[dict[str, Any]], bool] = True) -> str:
        """Settle a processing/ entry whose owner is gone. Returns what happened: "held" (its lease is held:
        the owner is alive, nothing is done), "completed", "requeued", "failed", "empty" or "gone".
        `counted` may be a function of the dead holder's lease info (the supervisor's "did I stop it?")."""
        job_id = job_dir.name
        lease = self.take_lease(job_id)
        if lease is None:
            return "held"
        try:
            if not job_dir.is_dir():
                return "gone"
            holder = lease.read_info()
            if (self.done / f"{job_id}.json").exists():
                self._finish_done(job_dir, keep_audio)  # committed before the crash: finish, never redo
                return "completed"
            audio_missing = self._audio_in(job_dir) is None
            if audio_missing:
                with contextlib.suppress(OSError):  # a claim dir whose audio rename never happened
                    job_dir.rmdir()
                    return "empty"
            record = self._read_record(job_dir)
            lease.token = record.lease_token  # adopt the job as its last owner left it
            job = Job(job_dir, record, lease)
            if audio_missing:  # and the folder holds something else
                self.fail(job, {"reason": "audio_missing", "error_type": "WorkerLost", "retryable": False,
                                "message": "the job folder holds no audio"})
                return "failed"
            side_left = self.sidecar_for(self.inbox / record.original_name)
            if side_left is not None and not (job_dir / SIDECAR_FILE).exists():
                with contextlib.suppress(FileNotFoundError):  # crash between the audio and sidecar renames
                    os.rename(side_left, job_dir / SIDECAR_FILE)
            count = counted(holder) if callable(counted) else counted
            return self.release(job, {"reason": reason, "error_type": "WorkerLost", "message": message,
                                      "retryable": True, "worker": holder.get("worker"), "pid": holder.get("pid")},
                                counted=count)
        finally:
            lease.drop()

    def sweep(self, reason: str, message: str, *, keep_audio: bool = True,
              counted: bool | Callable[[dict[str, Any]], bool] = True) -> dict[str, str]:
        """Recover every processing/ entry whose lease nobody holds (a dead owner, or a claim cut short),
        and drop lock files nobody holds. Live owners are left alone. Safe to run at any time."""
        outcomes: dict[str, str] = {}
        names = self.processing_names()
        for job_dir in (self.processing / name for name in names):
            try:
                outcome = self.recover(job_dir, reason, message, keep_audio=keep_audio, counted=counted)
            except OSError as e:
                outcome = f"error: {errno_name(e)}"
                logger.error("cannot recover job {}: {}", job_dir.name, e)
            except Exception as e:  # noqa: BLE001 - one odd entry must not stop the sweep of the others
                outcome = f"error: {type(e).__name__}"
                logger.opt(exception=e).error("cannot recover job {}", job_dir.name)
            if outcome != "held":
                outcomes[job_dir.name] = outcome
                logger.info("recovered job {}: {}", job_dir.name, outcome)
        self._sweep_lock_files(names)
        return outcomes

    def _sweep_lock_files(self, processing: list[str]) -> None:
        """Drop the lock files of jobs no longer in processing/ (`processing`: the ids listed there) that
        nobody holds."""
        try:
            with os.scandir(self.leases) as it:
                names = [e.name for e in it if e.name.endswith(".lock")]
        except OSError:
            return
        live = {self._lease_path(job_id).name for job_id in processing}
        for name in names:
            if name in live:
                continue
            with contextlib.suppress(OSError):
                fd = os.open(self.leases / name, os.O_RDWR | os.O_CLOEXEC)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    st, there = os.fstat(fd), os.stat(self.leases / name)
                    if (st.st_ino, st.st_dev) == (there.st_ino, there.st_dev):
                        os.unlink(self.leases / name)
                finally:
                    os.close(fd)

    def recover_all(self, reason: str, message: str, *, keep_audio: bool = True) -> dict[str, str]:
        """Start-up: settle what a previous run left in processing/; jobs still leased by a live process (an
        orphaned worker finishing its job) are skipped, and the live sweep picks them up if it dies."""
        return self.sweep(reason, message, keep_audio=keep_audio)

    def sweep_tmp(self, max_age: float = TMP_MAX_AGE, now: float | None = None) -> list[str]:
        """Delete tmp/ entries older than `max_age` (staging left by a crash mid-submit or mid-write)."""
        now = time.time() if now is None else now
        removed = []
        try:
            with os.scandir(self.tmp) as it:
                entries = list(it)
        except OSError:
            return removed
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
                if now - st.st_mtime < max_age:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(e.path)
                else:
                    os.unlink(e.path)
            except OSError as exc:
                logger.warning("cannot sweep {}: {}", printable(e.path), exc)
                continue
            removed.append(e.name)
            logger.info("swept tmp/{} ({:.0f} h old)", printable(e.name), (now - st.st_mtime) / 3600)
        return removed

    def sweep_orphan_sidecars(self, max_age: float = 3600.0, now: float | None = None) -> list[str]:
        """Move sidecars whose audio never came (or was claimed before they arrived) and that are older than
        `max_age` to failed/<id>/ with reason `sidecar_orphaned`: they never sit in the inbox forever."""
        now = time.time() if now is None else now
        try:
            with os.scandir(self.inbox) as it:
                names = {e.name for e in it}
        except OSError:
            return []
        moved = []
        sidecars = sorted(n for n in names if n.lower().endswith(SIDECAR_SUFFIXES))
        stems = {n.rsplit(".", 1)[0] for n in names.difference(sidecars)}
        for name in sidecars:
            base = name[: -len(".json")]
            if base in names or base in stems:
                continue  # its audio is waiting
            side = self.inbox / name
            try:
                st = os.lstat(side)
                if now - st.st_mtime < max_age:
                    continue
                job_id = new_job_id(base)
                target = self.failed / job_id
                target.mkdir(mode=self.dir_mode)
                os.rename(side, target / SIDECAR_FILE)
                info = {"job_id": job_id, **name_to_json("original_name", name), "reason": "sidecar_orphaned",
                        "error_type": "OrphanedSidecar", "retryable": False, "failed": now_iso(),
                        "message": f"sidecar {printable(name)!r} waited {(now - st.st_mtime) / 3600:.1f} h for an "
                                   f"audio file named {printable(base)!r} (or with that stem); drop the audio "
                                   f"with it, writing the sidecar first"}
                write_atomic(target / ERROR_FILE, dumps_json(info, indent=2), target, self.file_mode)
            except OSError as e:
                logger.warning("cannot move orphaned sidecar {!r}: {}", printable(name), e)
                continue
            moved.append(name)
            logger.warning("orphaned sidecar {!r} moved to failed/{}", printable(name), job_id)
        return moved

    def acquire_server_lock(self) -> int:
        """One server per task dir: an flock on <task_dir>/server.lock, held for the process's life."""
        path = self.root / "server.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
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
        with self.staging(audio.name, options) as staged:
            shutil.copyfile(audio, staged.audio)
        return staged.job_id

    @contextlib.contextmanager
    def staging(self, audio_name: str, options: JobOptions | None = None) -> Iterator[StagedJob]:
        """A job built in tmp/<job-id>.job/: the caller writes `staged.audio` (and may set `staged.options`);
        a clean exit writes job.json and renames the folder into inbox/ (the only moment a server can see
        it), an exception removes it. `audio_name` must be a bare file name the caller trusts."""
        job_id = new_job_id(audio_name)
        stage = self.tmp / f"{job_id}{JOB_SUFFIX}"
        stage.mkdir(mode=self.dir_mode)
        staged = StagedJob(job_id, stage / audio_name, options)
        try:
            yield staged
            os.chmod(staged.audio, self.file_mode)
            opts = staged.options.model_dump(exclude_none=True) if staged.options else None
            record = JobRecord(job_id, audio_name, audio_name, now_iso(), options=opts)
            write_atomic(stage / JOB_FILE, record.to_json(), stage, self.file_mode)
            os.rename(stage, self.inbox / stage.name)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise

    def retry(self, job_id: str) -> None:
        """Move failed/<job_id> back to inbox/ with its attempts reset."""
        src = self.failed / job_id
        if not job_id or job_id != os.path.basename(job_id) or job_id in (".", "..") or not src.is_dir():
            # a job id is a folder name under failed/, never a path (`../processing/x` must not move a live job)
            raise TranscribeError(f"no failed job {job_id!r} in {self.failed} (`transcribe status` lists them)")
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

    def failure_info(self, job_id: str) -> dict[str, Any]:
        """failed/<id>/error.json, or {} where it is missing, truncated or not an object: a reader (submit
        --wait, the HTTP API) says the reason is unknown rather than crash on a file someone edited."""
        return read_json_object(self.failed / job_id / ERROR_FILE)

    def counts(self, states: tuple[str, ...] = ("inbox", "processing", "done", "failed")) -> dict[str, int]:
        """Jobs per state, from the folders alone; only the `states` asked for are listed (done/ grows with
        every job ever run: an admission check needs inbox and processing only)."""
        def n(path: Path, pred: Callable[[os.DirEntry[str]], bool]) -> int:
            try:
                return sum(1 for e in os.scandir(path) if pred(e))
            except FileNotFoundError:
                return 0

        def is_dir(e: os.DirEntry[str]) -> bool:
            return e.is_dir(follow_symlinks=False) and e.name[0] != "."

        folders: dict[str, tuple[Path, Callable[[os.DirEntry[str]], bool]]] = {
            "inbox": (self.inbox, lambda e: _is_candidate(e.name) and (not e.is_dir(follow_symlinks=False)
                                                                      or e.name.endswith(JOB_SUFFIX))),
            "processing": (self.processing, is_dir),
            "done": (self.done, lambda e: e.name.endswith(".json") and e.name[0] != "."),
            "failed": (self.failed, is_dir),
        }
        return {state: n(*folders[state]) for state in states}

    def oldest_waiting(self) -> float | None:
        """Age in seconds of the oldest inbox entry."""
        ages = []
        for e in os.scandir(self.inbox) if self.inbox.exists() else []:
            if _is_candidate(e.name):
                with contextlib.suppress(FileNotFoundError):
                    ages.append(time.time() - e.stat(follow_symlinks=False).st_mtime)
        return max(ages) if ages else None


SWEEP_INTERVAL = 2.0  # seconds between sweeps of processing/ for jobs whose lease nobody holds
TMP_SWEEP_INTERVAL = 600.0  # seconds between sweeps of tmp/ (day-old leftovers) and of orphaned sidecars


class Housekeeping:
    """The periodic clean-ups every server of a task directory runs (pool supervisor, lock mode, Ray
    driver): requeue jobs nobody holds (`TaskDir.sweep`), and now and then tmp/ leftovers and orphaned
    sidecars. `counted` says whether a recovered job's attempt counts (a callable gets the lease info)."""

    def __init__(self, td: TaskDir, *, keep_audio: bool,
                 counted: bool | Callable[[dict[str, Any]], bool] = True) -> None:
        self.td, self.keep_audio, self.counted = td, keep_audio, counted
        self._sweep_due = self._tmp_due = 0.0

    def tick(self, *, now: float | None = None, force: bool = False) -> None:
        """Run what is due (`force`: the processing/ sweep now, e.g. right after a worker was reaped).
        Never raises: a failing disk is logged and retried on a later tick."""
        now = time.monotonic() if now is None else now
        try:
            if force or now >= self._sweep_due:
                self._sweep_due = now + SWEEP_INTERVAL
                self.td.sweep("worker_died", "the worker stopped during the job", keep_audio=self.keep_audio,
                              counted=self.counted)
            if now >= self._tmp_due:
                self._tmp_due = now + TMP_SWEEP_INTERVAL
                self.td.sweep_tmp()
                self.td.sweep_orphan_sidecars()
        except Exception as e:  # noqa: BLE001 - housekeeping must never stop a server
            logger.opt(exception=e).error("housekeeping of {} failed; retrying later", self.td.root)
