"""The task directory protocol, on files alone (no models): claims, commits, recovery, safety."""

import json
import os
import stat
import time

import pytest

from transcribe.core import errors
from transcribe.core.pool.jobs import new_job_id
from transcribe.core.pool.task_dir import JOB_SUFFIX, TaskDir


@pytest.fixture
def td(tmp_path):
    return TaskDir(tmp_path / "tasks", settle_seconds=1.0, max_attempts=3).ensure()


def drop(td, name="a.wav", data=b"RIFF....", age=5.0):
    p = td.inbox / name
    p.write_bytes(data)
    t = time.time() - age
    os.utime(p, (t, t))
    return p


def sidecar(td, name, text, age=5.0):
    return drop(td, name, text if isinstance(text, bytes) else text.encode(), age)


def test_folders_are_0750(td):
    for d in ("inbox", "tmp", "processing", "done", "failed", "workers"):
        assert stat.S_IMODE((td.root / d).stat().st_mode) == 0o750


def test_unsettled_partial_and_hidden_files_are_not_claimed(td):
    drop(td, "fresh.wav", age=0)
    for name in (".hidden.wav", "x.wav.part", "y.tmp", "z.crdownload", "a.wav.json"):
        drop(td, name)
    (td.inbox / "somedir").mkdir()
    assert td.scan() == []
    old = drop(td, "old.wav")
    assert td.scan() == [old]


def test_priority_then_age_ordering(td):
    a = drop(td, "a.wav", age=10)
    b = drop(td, "b.wav", age=5)
    sidecar(td, "b.wav.json", '{"priority": 5}')
    assert td.scan() == [b, a]


def test_claim_race_has_exactly_one_winner(td):
    entry = drop(td)
    other = TaskDir(td.root)
    first = td.claim(entry, "w1")
    second = other.claim(entry, "w2")
    assert first is not None and second is None
    assert list(td.processing.iterdir()) == [first.dir]  # the loser left nothing behind
    lease = td.lease_info(first.job_id)
    assert lease["worker"] == "w1" and lease["pid"] == os.getpid() and lease["token"] == first.lease.token
    assert first.record.attempts == 1 and first.lease.held


def test_sidecar_travels_and_validates(td):
    drop(td, "talk.wav")
    sidecar(td, "talk.wav.json", '{"speakers": 2, "hotwords": ["会议"], "formats": ["srt"]}')
    job = td.claim_next("w1")
    opts = td.options(job)
    assert (opts.speakers, opts.hotwords, opts.formats) == (2, ["会议"], ["srt"])
    assert not (td.inbox / "talk.wav.json").exists()


def test_stem_sidecar_is_accepted(td):
    drop(td, "talk.wav")
    sidecar(td, "talk.json", '{"speakers": 3}')
    assert td.options(td.claim_next("w1")).speakers == 3


def test_the_scan_and_the_claim_pair_the_same_sidecar_for_a_name_ending_in_a_dot(td):
    """`talk.` pairs with `talk.json` in the scan (priority, settling): the claim must take that same file, or the
    job runs without its options and the sidecar is later failed as orphaned."""
    drop(td, "talk.")
    sidecar(td, "talk.json", '{"speakers": 3, "priority": 4}')
    job = td.claim_next("w1")
    assert job.record.original_name == "talk." and td.options(job).speakers == 3
    assert not (td.inbox / "talk.json").exists()


@pytest.mark.parametrize("content, match", [
    (b"{not json", "not valid JSON"),
    (b'{"speakers": 2, "colour": "red"}', "colour"),
    (b'{"speakers": "two"}', "speakers"),
    (b'["a"]', "JSON object"),
    (b'{"formats": ["docx"]}', "docx"),
    (b'{"hotwords": "' + b"x" * 70000 + b'"}', "limit"),
])
def test_bad_sidecars_are_rejected_with_a_reason(td, content, match):
    drop(td, "talk.wav")
    sidecar(td, "talk.wav.json", content)
    job = td.claim_next("w1")
    with pytest.raises(errors.SidecarError, match=match):
        td.options(job)


def test_names_are_kept_and_job_ids_are_unique_and_safe(td):
    names = ["same.wav", "会议 记录.wav", "line\nbreak.wav", "-rf.wav", "noext"]
    for n in names:
        drop(td, n)
    ids, originals = set(), set()
    while (job := td.claim_next("w1")) is not None:
        ids.add(job.job_id)
        originals.add(job.record.original_name)
        assert job.audio_path.exists()
        assert "/" not in job.job_id and "\n" not in job.job_id and not job.job_id.startswith("-")
    assert originals == set(names) and len(ids) == len(names)
    assert new_job_id("same.wav") != new_job_id("same.wav")


def test_commit_then_cleanup(td):
    drop(td)
    job = td.claim_next("w1")
    result = td.complete(job, {"json": "{}", "txt": "hi\n"}, keep_audio=False)
    assert result == td.done / f"{job.job_id}.json" and (td.done / f"{job.job_id}.txt").read_text() == "hi\n"
    assert not job.dir.exists() and stat.S_IMODE(result.stat().st_mode) == 0o640


def test_keep_audio_archives_the_job_dir(td):
    drop(td)
    job = td.claim_next("w1")
    td.complete(job, {"json": "{}"}, keep_audio=True)
    assert (td.done / job.job_id / "a.wav").exists() and not (td.done / job.job_id / "lease.json").exists()


def test_recovery_finishes_a_committed_job_instead_of_redoing_it(td):
    drop(td)
    job = td.claim_next("w1")
    (td.done / f"{job.job_id}.json").write_text("{}")  # committed, then the worker died
    assert td.recover(job.dir, "worker_died", "test") == "held"  # alive: its owner holds the lease
    job.lease.abandon()  # what the kernel does when the owner dies
    assert td.recover(job.dir, "worker_died", "test") == "completed"
    assert not job.dir.exists() and td.counts() == {"inbox": 0, "processing": 0, "done": 1, "failed": 0}


def test_recovery_requeues_with_attempts_then_fails(td):
    drop(td)
    for attempt in range(1, 4):
        job = td.claim_next("w1")
        assert job.record.attempts == attempt
        job.lease.abandon()
        outcome = td.recover(job.dir, "worker_died", "killed")
        assert outcome == ("requeued" if attempt < 3 else "failed")
    err = json.loads((td.failed / job.job_id / "error.json").read_text())
    assert err["reason"] == "max_attempts_exceeded" and err["last_reason"] == "worker_died"
    assert err["attempts"] == 3 and len(err["history"]) == 3 and err["original_name"] == "a.wav"


def test_recovery_of_a_claim_without_job_json(td):
    entry = drop(td)
    job_dir = td.processing / new_job_id("a.wav")
    job_dir.mkdir()
    os.rename(entry, job_dir / "a.wav")  # the claim rename happened; nothing after it did
    assert td.recover(job_dir, "worker_died", "x") == "requeued"
    job = td.claim_next("w1")
    assert job.record.original_name == "a.wav" and job.audio_path.read_bytes() == b"RIFF...."


def test_empty_claim_dir_is_dropped(td):
    d = td.processing / "x"
    d.mkdir()
    assert td.recover(d, "worker_died", "x") == "empty" and not d.exists()


def test_disk_full_at_commit_leaves_no_partial_result(td, monkeypatch):
    drop(td)
    job = td.claim_next("w1")
    monkeypatch.setenv("TRANSCRIBE_ENOSPC_AT", "result.before_rename")
    with pytest.raises(OSError) as e:
        td.complete(job, {"json": "{}", "srt": "1\n"}, keep_audio=False)
    assert e.value.errno == 28
    assert list(td.done.iterdir()) == [] and not any(p.name.startswith(".") for p in td.tmp.iterdir())
    assert job.dir.exists()


def test_symlink_hardlink_and_fifo_are_refused(td, tmp_path):
    outside = tmp_path / "secret.wav"
    outside.write_bytes(b"x")
    os.symlink("/etc/passwd", td.inbox / "passwd.wav")
    os.symlink(outside, td.inbox / "out.wav")
    os.link(outside, td.inbox / "hard.wav")
    os.mkfifo(td.inbox / "pipe.wav")
    for p in td.inbox.iterdir():
        os.utime(p, (time.time() - 5,) * 2, follow_symlinks=False)
    reasons = {}
    while (job := td.claim_next("w1")) is not None:
        with pytest.raises(errors.TranscribeError) as e:
            td.check_input(job)
        reasons[job.record.original_name] = e.value.reason
    assert reasons == {"passwd.wav": "symlink_refused", "out.wav": "symlink_refused",
                       "hard.wav": "hardlink_refused", "pipe.wav": "not_regular_file"}
    assert outside.read_bytes() == b"x"


def test_submit_and_retry(td, tmp_path):
    from transcribe.core.pool.jobs import JobOptions

    src = tmp_path / "in.wav"
    src.write_bytes(b"data")
    job_id = td.submit(src, JobOptions(speakers=2))
    assert (td.inbox / f"{job_id}{JOB_SUFFIX}").is_dir() and list(td.tmp.iterdir()) == []
    job = td.claim_next("w1")
    assert job.job_id == job_id and td.options(job).speakers == 2
    td.fail(job, {"reason": "audio_undecodable", "message": "bad"}, "w1")
    assert td.failed_ids() == [job_id]
    td.retry(job_id)
    again = td.claim_next("w2")
    assert again.job_id == job_id and again.record.attempts == 1 and td.failed_ids() == []


# --------------------------------------------------------------------------- fencing
def test_a_job_whose_lease_is_held_is_never_recovered(td):
    drop(td)
    job = td.claim_next("w1")
    assert td.recover_all("supervisor_restart", "x") == {} and td.sweep("worker_died", "x") == {}
    assert job.dir.is_dir() and td.counts()["processing"] == 1
    td.complete(job, {"json": "{}"}, keep_audio=False)
    assert td.counts() == {"inbox": 0, "processing": 0, "done": 1, "failed": 0}
    assert list(td.leases.iterdir()) == []  # the lock file goes with the job


def test_an_owner_that_lost_its_job_cannot_commit_fail_requeue_or_archive(td):
    """A lock-ignoring actor (an older server, a hand) requeues a leased job and it is claimed again: the
    first owner's complete/fail/release raise LeaseLost and touch nothing of the second owner's job."""
    from transcribe.core.pool.jobs import LeaseLost

    drop(td)
    first = td.claim_next("w1")
    os.unlink(first.lease.path)  # its lock file removed, the job moved back by hand
    os.rename(first.dir, td.inbox / f"{first.job_id}{JOB_SUFFIX}")
    second = td.claim_next("w2")
    assert second is not None and second.job_id == first.job_id and second.record.attempts == 2
    for act in (lambda: td.complete(first, {"json": '{"by": "w1"}', "txt": "w1"}, keep_audio=True),
                lambda: td.fail(first, {"reason": "x", "message": "x"}),
                lambda: td.release(first, {"reason": "x", "message": "x"})):
        with pytest.raises(LeaseLost):
            act()
    assert list(td.done.iterdir()) == [] and second.dir.is_dir() and (second.dir / "a.wav").exists()
    td.complete(second, {"json": '{"by": "w2"}'}, keep_audio=False)
    assert json.loads((td.done / f"{second.job_id}.json").read_text()) == {"by": "w2"}


def test_a_job_requeued_and_reclaimed_fences_out_its_old_token(td):
    from transcribe.core.pool.jobs import LeaseLost

    drop(td)
    job = td.claim_next("w1")
    stale = type(job.lease)(job.job_id, job.lease.path, os.dup(job.lease.fd), "some-older-token")
    with pytest.raises(LeaseLost, match="token"):
        td.complete(type(job)(job.dir, job.record, stale), {"json": "{}"}, keep_audio=False)
    assert list(td.done.iterdir()) == [] and job.dir.is_dir()


def test_claim_window_is_covered_by_the_lease(td):
    """Every processing/ entry, from before the claim rename to after the cleanup, has a held lease."""
    from transcribe.core import fault_injection

    drop(td)
    seen = []

    def probe(name):
        for job_id in td.processing_names():
            seen.append((name, TaskDir(td.root).recover(td.processing / job_id, "worker_died", "probe")))

    original = fault_injection.crash_point
    import transcribe.core.pool.task_dir as tdmod
    tdmod.crash_point = lambda name: (probe(name), original(name))
    try:
        job = td.claim_next("w1")
        td.complete(job, {"json": "{}"}, keep_audio=True)
    finally:
        tdmod.crash_point = original
    assert seen and all(outcome == "held" for _, outcome in seen), seen
    assert td.counts() == {"inbox": 0, "processing": 0, "done": 1, "failed": 0}


def test_supervisor_stops_give_the_attempt_back(td):
    drop(td)
    for _ in range(5):  # more than max_attempts stops, none counted
        job = td.claim_next("w1")
        assert job.record.attempts == 1
        assert td.release(job, {"reason": "worker_stopped", "message": "reload"}, counted=False) == "requeued"
    job = td.claim_next("w1")
    assert [h.get("counted") for h in job.record.history] == [False] * 5


# --------------------------------------------------------------------------- names and the filesystem
def test_a_non_utf8_name_fails_with_its_bytes_intact_and_the_next_job_runs(td):
    import base64

    raw = b"r\xe9union.wav"
    (td.inbox / os.fsdecode(raw)).write_bytes(b"RIFF-bytes")
    os.utime(td.inbox / os.fsdecode(raw), (time.time() - 5,) * 2)
    drop(td, "next.wav")
    job = td.claim_next("w1")
    assert job is not None and job.record.original_name == "next.wav"
    [failed] = list(td.failed.iterdir())
    err = json.loads((failed / "error.json").read_bytes().decode("utf-8"))
    assert err["reason"] == "name_invalid" and "UTF-8" in err["message"] and err["error_type"] == "UnprocessableName"
    assert base64.b64decode(err["original_name_b64"]) == raw and "\ufffd" in err["original_name"]
    assert (failed / os.fsdecode(raw)).read_bytes() == b"RIFF-bytes"
    json.loads((failed / "job.json").read_bytes().decode("utf-8"))
    td.retry(failed.name)  # retried as is, it fails the same way: the loop never breaks
    assert td.claim_next("w1") is None and len(td.failed_ids()) == 1


@pytest.mark.parametrize("length, reason", [(250, None), (251, "name_too_long"), (255, "name_too_long")])
def test_long_names(td, length, reason):
    name = "x" * (length - 4) + ".wav"
    drop(td, name)
    job = td.claim_next("w1")
    if reason is None:
        assert job is not None and job.audio_path.name == name
        td.complete(job, {"json": "{}"}, keep_audio=True)
        assert (td.done / job.job_id / name).exists()
    else:
        assert job is None
        [failed] = list(td.failed.iterdir())
        assert json.loads((failed / "error.json").read_text())["reason"] == reason
        assert (failed / name).read_bytes() == b"RIFF...."


def test_disk_full_while_claiming_puts_the_entry_back(td, monkeypatch):
    import errno

    import transcribe.core.pool.task_dir as tdmod

    drop(td, "a.wav")
    sidecar(td, "a.wav.json", '{"speakers": 2}')
    real = tdmod.write_atomic

    def full(path, *a, **k):
        if path.name == "job.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr(tdmod, "write_atomic", full)
    assert td.claim_next("w1") is None
    assert sorted(p.name for p in td.inbox.iterdir()) == ["a.wav", "a.wav.json"]
    assert list(td.processing.iterdir()) == [] and list(td.leases.iterdir()) == []
    monkeypatch.setattr(tdmod, "write_atomic", real)
    td.rescan_after = 0
    job = td.claim_next("w1")
    assert job is not None and td.options(job).speakers == 2


def test_disk_full_while_requeueing_still_requeues(td, monkeypatch):
    import errno

    import transcribe.core.pool.task_dir as tdmod

    drop(td)
    job = td.claim_next("w1")
    monkeypatch.setattr(tdmod, "write_atomic",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    assert td.release(job, {"reason": "ENOSPC", "message": "full"}) == "requeued"
    assert td.counts()["inbox"] == 1 and td.counts()["processing"] == 0


def test_a_cross_device_claim_is_logged_and_skipped_not_fatal(td, monkeypatch):
    import errno

    import transcribe.core.pool.task_dir as tdmod

    bad = drop(td, "bad.wav", age=10)
    drop(td, "good.wav")
    real = os.rename

    def rename(src, dst):
        if os.fspath(src) == os.fspath(bad):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(tdmod.os, "rename", rename)
    job = td.claim_next("w1")
    assert job is not None and job.record.original_name == "good.wav"
    td.rescan_after = 0
    assert td.claim_next("w1") is None  # the entry that cannot move is not retried in a loop
    assert bad.exists() and list(td.leases.iterdir()) == [job.lease.path]


def test_serve_refuses_a_task_dir_split_over_filesystems(tmp_path):
    from transcribe.core.errors import TranscribeError

    other = "/dev/shm" if os.path.isdir("/dev/shm") else None
    if other is None or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a second filesystem (/dev/shm)")
    elsewhere = tmp_path / "elsewhere"
    import tempfile
    done = tempfile.mkdtemp(dir=other)
    try:
        root = tmp_path / "tasks"
        root.mkdir()
        os.symlink(done, root / "done")  # like a separate bind mount of done/
        td = TaskDir(root).ensure()
        with pytest.raises(TranscribeError, match="done/.*different filesystem.*one volume"):
            td.check_one_filesystem()
    finally:
        os.rmdir(done)
    assert not elsewhere.exists()


def test_old_tmp_entries_are_swept(td):
    old_file, old_dir, fresh = td.tmp / ".w1-x.tmp", td.tmp / "123.job", td.tmp / ".w2-y.tmp"
    old_file.write_text("x")
    old_dir.mkdir()
    (old_dir / "a.wav").write_text("x")
    fresh.write_text("x")
    for p in (old_file, old_dir):
        os.utime(p, (time.time() - 2 * 86400,) * 2)
    assert sorted(td.sweep_tmp()) == sorted([old_file.name, old_dir.name])
    assert [p.name for p in td.tmp.iterdir()] == [fresh.name]


# --------------------------------------------------------------------------- sidecars and scanning
def test_an_unsettled_sidecar_holds_its_audio_back(td):
    a = drop(td, "talk.wav")
    (td.inbox / "talk.wav.json").write_text('{"speakers": 2}')  # just written
    assert td.scan() == []
    os.utime(td.inbox / "talk.wav.json", (time.time() - 5,) * 2)
    assert td.scan() == [a]


def test_a_claim_rechecks_its_entry(td):
    a = drop(td, "a.wav")
    [entry] = td.scan()
    a.write_bytes(b"more")  # written to again after the scan
    assert td.claim(entry, "w1") is None and a.exists() and list(td.processing.iterdir()) == []


def test_claims_from_a_backlog_scan_once_and_read_each_sidecar_once(td, monkeypatch):
    for i in range(200):
        drop(td, f"f{i:03d}.wav")
        sidecar(td, f"f{i:03d}.wav.json", json.dumps({"priority": i % 3}))
    scans, reads = [], []
    real_scan, real_prio = td._ready_names, td._sidecar_priority
    monkeypatch.setattr(td, "_ready_names", lambda *a: scans.append(1) or real_scan(*a))
    monkeypatch.setattr(td, "_sidecar_priority", lambda p: reads.append(p) or real_prio(p))
    td.rescan_after = 3600
    claimed = []
    while (job := td.claim_next("w1")) is not None:
        claimed.append(job.record.original_name)
    assert len(claimed) == 200 and len(scans) == 2 and len(reads) == 200  # the 2nd scan finds it empty
    assert all(int(n[1:4]) % 3 == 2 for n in claimed[:66]) and claimed[:66] == sorted(claimed[:66])


def test_a_rescan_sees_new_files_late_sidecars_and_gone_entries(td):
    a, b = drop(td, "a.wav", age=10), drop(td, "b.wav", age=5)
    assert td.scan() == [a, b]
    sidecar(td, "b.json", '{"priority": 9}')  # a late stem sidecar raises b's priority
    c = drop(td, "c.wav", age=3)
    assert td.scan() == [b, a, c]
    a.unlink()
    sidecar(td, "c.wav.json", '{"priority": -1}')
    assert td.scan() == [b, c]


def test_a_sidecar_whose_audio_never_comes_goes_to_failed(td):
    sidecar(td, "lonely.wav.json", '{"speakers": 2}', age=2 * 3600)
    sidecar(td, "fresh.wav.json", '{"speakers": 2}', age=60)  # its audio may still come
    sidecar(td, "talk.json", '{"speakers": 2}', age=2 * 3600)
    drop(td, "talk.wav", age=0)  # being written: its stem sidecar waits with it
    assert td.sweep_orphan_sidecars() == ["lonely.wav.json"]
    [failed] = list(td.failed.iterdir())
    err = json.loads((failed / "error.json").read_text())
    assert err["reason"] == "sidecar_orphaned" and err["original_name"] == "lonely.wav.json"
    assert json.loads((failed / "sidecar.json").read_text()) == {"speakers": 2}
    assert sorted(p.name for p in td.inbox.iterdir()) == ["fresh.wav.json", "talk.json", "talk.wav"]
