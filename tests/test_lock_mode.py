"""Lock mode: one model behind an asyncio.Lock, generate in a worker thread."""

import asyncio
import random
import threading

import pytest

from tests.conftest import shared_audio
from transcribe.core import errors
from transcribe.core.engine.funasr_transcriber import AsyncTranscriber


class OverlapProbe:
    """Wraps the model's generate: counts callers inside it at once, and slows it a little."""

    def __init__(self, model, delay=0.0):
        self.real, self.delay = model.generate, delay
        self.inside = self.max_inside = self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, **kwargs):
        with self.lock:
            self.inside += 1
            self.calls += 1
            self.max_inside = max(self.max_inside, self.inside)
        try:
            if self.delay:
                threading.Event().wait(self.delay)
            return self.real(**kwargs)
        finally:
            with self.lock:
                self.inside -= 1


@pytest.fixture
def probe(transcriber, monkeypatch):
    p = OverlapProbe(transcriber.model, delay=0.02)
    monkeypatch.setattr(transcriber.model, "generate", p)
    return p


async def test_from_config_context_manager(fixture_config):
    async with AsyncTranscriber.from_config(fixture_config) as t:
        r = await t.transcribe(shared_audio("tts_1speaker_5s.wav"))
    assert r.segments


async def test_20_concurrent_calls_never_overlap_while_the_loop_ticks(transcriber, probe):
    path = shared_audio("tts_1speaker_5s.wav")
    at = AsyncTranscriber(transcriber)
    ticks = 0
    done = asyncio.Event()

    async def ticker():
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    tick_task = asyncio.create_task(ticker())
    results = await asyncio.gather(*(at.transcribe(path) for _ in range(20)))
    done.set()
    await tick_task
    await at.aclose()
    assert len(results) == 20 and all(r.segments for r in results)
    assert probe.calls == 20 and probe.max_inside == 1
    assert ticks > 20  # the event loop kept running while generate ran in the thread
    assert results[0].segments == results[-1].segments


async def wait_for(pred, timeout=60.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_cancelling_five_leaves_the_rest_working(transcriber, probe):
    path = shared_audio("tts_1speaker_5s.wav")
    at = AsyncTranscriber(transcriber)
    tasks = [asyncio.create_task(at.transcribe(path)) for _ in range(12)]
    await wait_for(lambda: probe.inside == 1)  # one call holds the lock; the other 11 wait behind it
    assert probe.calls == 1
    queued = [t for t in tasks if not t.done()]
    victims = random.Random(1).sample(queued[-8:], 5)  # none of these can have run yet: calls are serialised
    for t in victims:
        t.cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    cancelled = [o for t, o in zip(tasks, outcomes) if isinstance(o, asyncio.CancelledError)]
    ok = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(cancelled) == 5 and len(ok) == 7 and all(o.segments for o in ok)
    assert all(isinstance(outcomes[tasks.index(t)], asyncio.CancelledError) for t in victims)
    assert probe.calls == 7 and probe.max_inside == 1  # a cancelled waiter never reached the model
    # the lock is free once the in-flight call has returned, and later calls work
    r = await at.transcribe(path)
    assert r.segments and not at.busy
    await at.aclose()


async def test_an_error_does_not_poison_later_calls(transcriber, tmp_path):
    at = AsyncTranscriber(transcriber)
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    with pytest.raises(errors.AudioDecodeError):
        await at.transcribe(bad)
    assert (await at.transcribe(shared_audio("tts_1speaker_5s.wav"))).segments
    await at.aclose()


async def test_timeout_raises_and_the_lock_is_released_after_the_call_returns(transcriber, monkeypatch):
    slow = OverlapProbe(transcriber.model, delay=0.5)
    monkeypatch.setattr(transcriber.model, "generate", slow)
    at = AsyncTranscriber(transcriber)
    path = shared_audio("tts_1speaker_5s.wav")
    with pytest.raises(errors.TranscriptionTimeout):
        await at.transcribe(path, timeout=0.1)
    assert at.busy  # the model call is still running: the next caller must wait for it
    r = await at.transcribe(path, timeout=30)
    assert r.segments and slow.max_inside == 1
    await at.aclose()
