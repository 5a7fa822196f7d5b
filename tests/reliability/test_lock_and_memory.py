"""Lock mode under 100 callers with cancellations and timeouts; worker memory over 100 jobs; recycling."""

import asyncio
import random

import pytest

from tests.conftest import needs_shared, shared_audio
from tests.support.pool_helpers import (
    Server,
    assert_exactly_once,
    ready_workers,
    results,
    wait_until,
)
from transcribe.core import errors
from transcribe.core.engine.funasr_transcriber import AsyncTranscriber
from transcribe.core.pool.heartbeat import current_rss_mb
from transcribe.core.pool.task_dir import TaskDir

pytestmark = needs_shared


async def test_100_callers_half_cancelled(transcriber, tmp_path):
    good = shared_audio("tts_1speaker_5s.wav")
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    at = AsyncTranscriber(transcriber)
    rng = random.Random(3)
    inside, max_inside = 0, 0
    real = transcriber.model.generate

    def counting(**kw):
        nonlocal inside, max_inside
        inside += 1
        max_inside = max(max_inside, inside)
        try:
            return real(**kw)
        finally:
            inside -= 1

    transcriber.model.generate = counting
    try:
        calls = [asyncio.create_task(at.transcribe(bad if i % 10 == 0 else good)) for i in range(100)]
        to_cancel = rng.sample(range(100), 50)
        finished_first = set()
        for i in to_cancel:  # at random points: some queued, some running, a few already finished
            await asyncio.sleep(rng.uniform(0, 0.05))
            if calls[i].done():
                finished_first.add(i)  # a finished call cannot be cancelled: it must hold its own outcome
            calls[i].cancel()
        finished_before_cancel = finished_first
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        for i, o in enumerate(outcomes):
            if i in to_cancel and i not in finished_before_cancel:
                assert isinstance(o, asyncio.CancelledError), (i, o)  # cancel() of a pending call always wins
                continue
            if i % 10 == 0:
                assert isinstance(o, errors.AudioDecodeError)  # its own error, nobody else's
            else:
                assert not isinstance(o, BaseException) and o.segments
        assert max_inside == 1
        # per-call timeout, then the lock frees and later calls work
        with pytest.raises(errors.TranscriptionTimeout):
            await at.transcribe(shared_audio("podcast_2speakers_60s.wav"), timeout=0.01)
        assert (await at.transcribe(good, timeout=60)).segments
        assert not at.busy
    finally:
        transcriber.model.generate = real
        await at.aclose()


def test_memory_over_100_jobs(transcriber):
    """A leak is a cost per job. 100 jobs under a 5 % bound catch the same leak per job as 200 under 10 %
    (about 0.3-0.4 MB a job at a 560-810 MB worker); the allocator's own steps measured 2.2 % at most
    over 220 jobs on this machine (2026-11-26), so the bound still has twice that margin."""
    path = shared_audio("tts_1speaker_5s.wav")
    for _ in range(20):  # warm-up: allocator pools, caches
        transcriber.transcribe(path)
    before = current_rss_mb()
    for _ in range(100):
        transcriber.transcribe(path)
    after = current_rss_mb()
    growth = (after - before) / before
    print(f"\nRSS after warm-up {before:.0f} MB, after 100 jobs {after:.0f} MB: {growth * 100:+.1f}%")
    assert growth < 0.05


@pytest.mark.parametrize("limit", [{"max_jobs_per_worker": 2}, {"max_rss_mb": 1}])
def test_recycling_between_jobs_loses_nothing(pool_cfg, limit):
    cfg_path, task_dir = pool_cfg(workers=1, **limit)
    srv = Server(cfg_path, workers=1)
    names = [f"r{i}.wav" for i in range(5)]
    try:
        wait_until(lambda: ready_workers(task_dir, 1), 120, "worker ready")
        td = TaskDir(task_dir)
        for n in names:
            staged = task_dir.parent / n
            staged.write_bytes(shared_audio("tts_1speaker_5s.wav").read_bytes())
            td.submit(staged)
        wait_until(lambda: len(results(task_dir)) >= 5, 240, "all jobs")
        assert srv.terminate() == 0
    finally:
        srv.kill_group()
    assert_exactly_once(task_dir, names)
    out = srv.output()
    assert out.count("recycling") >= (2 if "max_jobs_per_worker" in limit else 4)
    assert "died" not in out
