"""funasr.overlap_stages in FunASR's own loop (core/engine/speaker_prefetch.py): CAM++ made ahead in a
background thread, the same transcript.

Forced on for the CPU here (its default, "auto", is on for CUDA only). The real FunASR path with the tiny
models: every speaker call is made in the background thread and answered from it, and the transcript
(text, timestamps, speaker labels) equals bare FunASR's and the same engine's with the overlap off. Jobs
are seeded (`funasr.seed`, and numpy's state before bare FunASR) so that the tiny CAM++'s near-identical
embeddings cluster the same way in every run. What the GPU does besides (a side stream, an event per
hand-over) cannot run here.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.conftest import model_config, shared_audio
from tests.test_parity import bare, expected_segments  # noqa: F401 - fixture
from transcribe.config import config_from_dict
from transcribe.core.engine import speaker_prefetch
from transcribe.core.errors import ConfigError, TranscriptionError

SEED = 5
WAIT = 60.0  # generous: a wait that times out fails the test, it never passes it


def segs(result):
    return [(s.start, s.end, s.text, s.speaker) for s in result.segments]


def build(tiny_models, tmp_path, overlap):
    return funasr_loop(config_from_dict(model_config(tiny_models, overlap_stages=overlap, seed=SEED), tmp_path))


def funasr_loop(cfg):
    """A Transcriber whose jobs run FunASR's own loop: the prefetch's path. With the overlap on, diarized
    jobs otherwise go through the batch engine's stages (tests/test_batch_engine.py); FunASR's loop, and
    the prefetch in it, still serves the options the engine does not replay (word timestamps, extras)."""
    from transcribe.core.engine.funasr_transcriber import Transcriber

    tr = Transcriber(cfg)
    tr.stages_side_by_side = None
    return tr


@pytest.fixture(scope="module")
def on(tiny_models, tmp_path_factory):
    return build(tiny_models, tmp_path_factory.mktemp("on"), True)


@pytest.fixture(scope="module")
def off(tiny_models, tmp_path_factory):
    return build(tiny_models, tmp_path_factory.mktemp("off"), False)


@pytest.fixture(scope="module")
def tile(tmp_path_factory) -> Path:
    """Several VAD segments of different lengths (two recordings and two pieces of a third, 3 s of silence
    between), which FunASR's length sort reorders."""
    def read(name):
        return sf.read(str(shared_audio(name)), dtype="float32")[0]

    gap = np.zeros(3 * 16000, dtype=np.float32)
    podcast, tts = read("podcast_2speakers_60s.wav"), read("tts_1speaker_5s.wav")
    espeak = read("espeak_zh_en_30s.wav")
    audio = np.concatenate([tts, gap, podcast[:10 * 16000], gap, espeak[:12 * 16000], gap, tts[:3 * 16000]])
    path = tmp_path_factory.mktemp("tile") / "tile.wav"
    sf.write(str(path), audio, 16000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def tile_expected(bare, on, tile):  # noqa: F811
    np.random.seed(SEED)
    return expected_segments(bare, on.config, tile, speakers=2)


@pytest.fixture
def prefetches(monkeypatch):
    """Every background prefetch started (its segments and cancel flag stay readable after the job)."""
    made: list[speaker_prefetch._Prefetch] = []

    class Recorded(speaker_prefetch._Prefetch):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(speaker_prefetch, "_Prefetch", Recorded)
    return made


def in_background(name: str) -> bool:
    return name.startswith(speaker_prefetch.THREAD_NAME)


def spy_speaker_model(monkeypatch, transcriber, before=None, after=None):
    """The thread of every CAM++ call (FunASR's ``model.inference``); `before(n)` runs first in the nth call,
    `after(n)` last."""
    spk = transcriber.model.spk_model
    real = spk.inference
    threads: list[str] = []

    def inference(*args, **kwargs):
        threads.append(threading.current_thread().name)
        n = len(threads)
        if before is not None:
            before(n)
        out = real(*args, **kwargs)
        if after is not None:
            after(n)
        return out

    monkeypatch.setattr(spk, "inference", inference)
    return threads


def no_prefetch_thread() -> bool:
    return not [t for t in threading.enumerate() if in_background(t.name)]


def test_overlap_is_off_by_default_on_the_cpu_and_on_when_forced(transcriber, on, off):
    assert speaker_prefetch.NAME not in transcriber.patches and transcriber.speaker_overlap is None  # auto, CPU
    assert speaker_prefetch.NAME in on.patches and on.speaker_overlap is not None
    assert off.speaker_overlap is None
    for value in (True, False, "auto", "true"):
        config_from_dict({"funasr": {"overlap_stages": value}})
    with pytest.raises(ConfigError, match="overlap_stages"):
        config_from_dict({"funasr": {"overlap_stages": "sometimes"}})


def test_a_real_two_speaker_recording_equals_bare_funasr(on, bare, prefetches, monkeypatch):  # noqa: F811
    path = shared_audio("espeak_zh_en_30s.wav")
    threads = spy_speaker_model(monkeypatch, on)
    punc, quiet_at_punc = on.model.punc_model, []
    real_punc = punc.inference

    def punc_inference(*args, **kwargs):  # nothing runs beside punctuation (its CUDA graph captures)
        quiet_at_punc.append(no_prefetch_thread())
        return real_punc(*args, **kwargs)

    monkeypatch.setattr(punc, "inference", punc_inference)
    result = on.transcribe(path, speakers=2)
    assert quiet_at_punc and all(quiet_at_punc) and len(prefetches) == 1
    np.random.seed(SEED)
    assert segs(result) == expected_segments(bare, on.config, path, speakers=2)
    assert set(result.speakers) == {"Speaker1", "Speaker2"} and len(result.segments) > 3
    assert len(threads) == 1 and in_background(threads[0])  # one 30 s segment, embedded in the background
    assert no_prefetch_thread()  # joined before generate returned
    assert "spk" in result.timings and "spk_wait" in result.timings


def test_embeddings_are_computed_while_asr_waits_and_the_tile_equals_bare_funasr_and_overlap_off(
        on, off, tile, tile_expected, prefetches, monkeypatch):
    """The first ASR call waits until the background thread has embedded every segment: with the speaker
    calls made inside FunASR's ASR loop, as without the overlap, that wait could only time out."""
    all_embedded = threading.Event()
    threads = spy_speaker_model(monkeypatch, on,
                                after=lambda n: n == len(prefetches[-1].segments) and all_embedded.set())
    asr = on.model.model
    real_asr = asr.inference
    waited: list[bool] = []

    def asr_inference(*args, **kwargs):
        if not waited:
            waited.append(all_embedded.wait(WAIT))
        return real_asr(*args, **kwargs)

    monkeypatch.setattr(asr, "inference", asr_inference)
    got = segs(on.transcribe(tile, speakers=2))
    assert waited == [True]
    [segments] = [p.segments for p in prefetches]
    assert len(segments) >= 4 and [s.index for s in segments] != sorted(s.index for s in segments)
    assert len(threads) == len(segments) and all(map(in_background, threads))  # none in FunASR's loop
    assert got == tile_expected and len({s[3] for s in got}) == 2
    assert got == segs(off.transcribe(tile, speakers=2))
    assert no_prefetch_thread()


def test_a_different_speaker_call_runs_for_real_and_is_logged_once(tiny_models, tmp_path, tile, tile_expected,
                                                                    monkeypatch):
    """Should the prefetch's segments ever differ from FunASR's (here: reordered, or one missing, so that
    FunASR makes one call more), the call that differs and the rest of that job's speaker calls run in
    FunASR's loop: the same transcript, and one warning per engine."""
    from loguru import logger

    real_segments = speaker_prefetch.funasr_segments
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")
    try:
        for change, jobs in ((lambda s: s[::-1], 2), (lambda s: s[:-1], 1)):
            fresh = build(tiny_models, tmp_path, True)  # its own warn-once state
            threads = spy_speaker_model(monkeypatch, fresh)
            monkeypatch.setattr(speaker_prefetch, "funasr_segments",
                                lambda *a, change=change, **k: change(real_segments(*a, **k)))
            warnings.clear()
            for _ in range(jobs):
                threads.clear()
                assert segs(fresh.transcribe(tile, speakers=2)) == tile_expected
                assert threads.count("MainThread") >= 1 and no_prefetch_thread()
            assert len([w for w in warnings if "overlap_stages" in w]) == 1, warnings
    finally:
        logger.remove(sink)


def test_an_error_in_the_background_speaker_call_fails_the_job_as_without_overlap(on, off, prefetches,
                                                                                   monkeypatch):
    path = shared_audio("espeak_zh_en_30s.wav")
    errors = []
    for engine in (on, off):
        def boom(n):
            raise RuntimeError("CAM++ exploded")

        threads = spy_speaker_model(monkeypatch, engine, before=boom)
        with pytest.raises(TranscriptionError) as caught:
            engine.transcribe(path, speakers=2)
        errors.append((str(caught.value), type(caught.value.__cause__), threads))
    assert errors[0][:2] == errors[1][:2] and "CAM++ exploded" in errors[0][0]
    assert len(errors[0][2]) == 1 and in_background(errors[0][2][0]) and errors[1][2] == ["MainThread"]
    assert len(prefetches) == 1 and no_prefetch_thread()


def test_a_failing_job_stops_and_joins_the_background_thread_between_segments(on, tile, prefetches, monkeypatch):
    """The ASR fails while the first segment is being embedded: the job's end cancels the thread (it embeds
    no further segment) and joins it before the error reaches the caller."""
    embedding = threading.Event()
    cancelled: list[bool] = []

    def hold(n):
        embedding.set()
        cancelled.append(prefetches[-1].cancel.wait(WAIT))  # released by the job's end only

    threads = spy_speaker_model(monkeypatch, on, before=hold)
    asr = on.model.model

    def failing_asr(*args, **kwargs):
        assert embedding.wait(WAIT)
        raise RuntimeError("ASR failed")

    monkeypatch.setattr(asr, "inference", failing_asr)
    with pytest.raises(TranscriptionError, match="ASR failed"):
        on.transcribe(tile, speakers=2)
    assert cancelled == [True] and len(threads) == 1 and in_background(threads[0])  # 1 of 4+ segments
    assert no_prefetch_thread()


def test_without_diarization_no_thread_starts(on, prefetches, monkeypatch):
    threads = spy_speaker_model(monkeypatch, on)
    result = on.transcribe(shared_audio("tts_1speaker_5s.wav"), diarize=False)
    assert result.segments and prefetches == [] and threads == [] and "spk_wait" not in result.timings


def test_the_batch_engine_answers_speaker_calls_itself(on, prefetches):
    """The engine's assembly replays its own embeddings through generate_locked: no prefetch there."""
    from transcribe.core.engine.batch_engine import BatchTranscriber

    path = shared_audio("espeak_zh_en_30s.wav")
    got = segs(BatchTranscriber(on).transcribe(path, speakers=2))
    assert prefetches == []
    assert got == segs(on.transcribe(path, speakers=2)) and len(prefetches) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU path: side stream, events)")
def test_on_cuda_the_speaker_calls_run_on_a_side_stream_with_the_same_transcript(tiny_models, tmp_path, tile,
                                                                                 monkeypatch):
    """The device check of the GPU path (CI has no GPU): "auto" is on, every CAM++ call runs in the background
    thread on a stream other than the main thread's, capturing no CUDA graph there (FunASR's main thread
    empties the cache meanwhile), and the transcript equals the overlap off's, job after job."""
    from transcribe.core.engine.funasr_transcriber import Transcriber

    def cuda(overlap):
        return funasr_loop(config_from_dict(model_config(tiny_models, device="cuda", overlap_stages=overlap,
                                                         seed=SEED), tmp_path))

    on_gpu, off_gpu = cuda("auto"), cuda(False)
    assert speaker_prefetch.NAME in on_gpu.patches and off_gpu.speaker_overlap is None
    calls = []
    spy_speaker_model(monkeypatch, on_gpu, before=lambda n: calls.append(
        (threading.current_thread().name, torch.cuda.current_stream().cuda_stream)))
    main_stream = torch.cuda.current_stream().cuda_stream
    for _ in range(3):  # a few times: a missing wait would show as a changed label or time, now and then
        got = segs(on_gpu.transcribe(tile, speakers=2))
        assert got == segs(off_gpu.transcribe(tile, speakers=2)) and len({s[3] for s in got}) == 2
    assert calls and all(in_background(name) and stream != main_stream for name, stream in calls)
    assert no_prefetch_thread()
    graphs = {g.name: g for g in on_gpu.graphs}
    assert graphs["spk"].graphs == {} and graphs["punc.encoder.encoders0"].replays > 0  # punctuation: after the thread
    assert {g.name: g for g in off_gpu.graphs}["spk"].replays > 0  # CAM++ graphed in FunASR's own loop
