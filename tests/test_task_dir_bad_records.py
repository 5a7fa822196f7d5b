"""A job record (job.json) that is not what the project writes — hand-edited, truncated, from another version —
must never block the inbox, a sweep, a start-up recovery or a retry; on files alone (no models)."""

import json
import os
import time

import pytest

from transcribe.core import errors
from transcribe.core.pool.task_dir import JOB_SUFFIX, TaskDir


@pytest.fixture
def td(tmp_path):
    return TaskDir(tmp_path / "tasks", settle_seconds=1.0, max_attempts=3).ensure()


def settled(path, age=5.0):
    t = time.time() - age
    os.utime(path, (t, t))
    return path


def bad_job(td, job_id, record):
    job = td.inbox / f"{job_id}{JOB_SUFFIX}"
    job.mkdir()
    (job / "a.wav").write_bytes(b"RIFF....")
    (job / "job.json").write_text(record if isinstance(record, str) else json.dumps(record))
    return settled(job)


BAD_RECORDS = [
    {"job_id": "x", "original_name": "a.wav", "audio_name": "a.wav", "created": "t", "options": ["x"]},
    {"job_id": "x", "original_name": "a.wav", "audio_name": "a.wav", "created": "t", "options": "fast"},
    {"job_id": "x", "original_name": "a.wav", "audio_name": "a.wav", "created": "t", "history": None},
    {"job_id": "x", "original_name": "a.wav", "audio_name": "a.wav", "created": "t", "attempts": None},
    [],
    "not json at all",
]


@pytest.mark.parametrize("record", BAD_RECORDS, ids=range(len(BAD_RECORDS)))
def test_a_bad_record_never_blocks_claims_of_the_other_files(td, record):
    bad_job(td, "20260101T000000000-00000000-bad", record)
    good = td.inbox / "good.wav"
    good.write_bytes(b"RIFF....")
    settled(good)
    claimed = []
    while (job := td.claim_next("w1")) is not None:
        claimed.append(job.record.original_name)
        td.release(job, {"reason": "test", "message": "given back", "retryable": True}, counted=False)
        if len(claimed) >= 4:
            break
    assert "good.wav" in claimed


@pytest.mark.parametrize("record", BAD_RECORDS, ids=range(len(BAD_RECORDS)))
def test_a_bad_record_in_processing_is_recovered_at_start_up_and_by_the_sweep(td, record):
    for n, recover in enumerate((lambda: td.recover_all("supervisor_restart", "test"),
                                 lambda: td.sweep("worker_died", "test"))):
        job_dir = td.processing / f"20260101T00000000{n}-00000000-bad"
        job_dir.mkdir()
        (job_dir / "a.wav").write_bytes(b"RIFF....")
        (job_dir / "job.json").write_text(record if isinstance(record, str) else json.dumps(record))
        outcomes = recover()
        assert outcomes[job_dir.name] in ("requeued", "failed"), outcomes
        assert not job_dir.exists()


@pytest.mark.parametrize("job_id", ["../processing/x", "..", ".", "", "a/b"])
def test_retry_takes_a_job_id_never_a_path(td, job_id):
    (td.processing / "x").mkdir()
    with pytest.raises(errors.TranscribeError, match="no failed job"):
        td.retry(job_id)
    assert (td.processing / "x").is_dir()
