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


def test_folders_are_0750(td):
    for d in ("inbox", "tmp", "processing", "done", "failed", "workers"):
        assert stat.S_IMODE((td.root / d).stat().st_mode) == 0o750


def test_unsettled_partial_and_hidden_files_are_not_claimed(td):
    drop(td, "fresh.wav", age=0)
    for name in (".hidden.wav", "x.wav.part", "y.tmp", "z.crdownload", "a.wav.json"):
        drop(td, name)
    (td.inbox / "somedir").mkdir()
    assert td.candidates() == []
    old = drop(td, "old.wav")
    assert td.candidates() == [old]


def test_priority_then_age_ordering(td):
    a = drop(td, "a.wav", age=10)
    b = drop(td, "b.wav", age=5)
    (td.inbox / "b.wav.json").write_text('{"priority": 5}')
    assert td.candidates() == [b, a]


def test_claim_race_has_exactly_one_winner(td):
    entry = drop(td)
    other = TaskDir(td.root)
    first = td.claim(entry, "w1")
    second = other.claim(entry, "w2")
    assert first is not None and second is None
    assert list(td.processing.iterdir()) == [first.dir]  # the loser left nothing behind
    lease = json.loads((first.dir / "lease.json").read_text())
    assert lease["worker"] == "w1" and lease["pid"] == os.getpid() and lease["attempt"] == 1


def test_sidecar_travels_and_validates(td):
    drop(td, "talk.wav")
    (td.inbox / "talk.wav.json").write_text('{"speakers": 2, "hotwords": ["会议"], "formats": ["srt"]}')
    job = td.claim_next("w1")
    opts = td.options(job)
    assert (opts.speakers, opts.hotwords, opts.formats) == (2, ["会议"], ["srt"])
    assert not (td.inbox / "talk.wav.json").exists()


def test_stem_sidecar_is_accepted(td):
    drop(td, "talk.wav")
    (td.inbox / "talk.json").write_text('{"speakers": 3}')
    assert td.options(td.claim_next("w1")).speakers == 3


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
    (td.inbox / "talk.wav.json").write_bytes(content)
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
    assert td.recover(job.dir, "worker_died", "test") == "completed"
    assert not job.dir.exists() and td.counts() == {"inbox": 0, "processing": 0, "done": 1, "failed": 0}


def test_recovery_requeues_with_attempts_then_fails(td):
    drop(td)
    for attempt in range(1, 4):
        job = td.claim_next("w1")
        assert job.record.attempts == attempt
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
