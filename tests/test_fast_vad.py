"""fast_vad: fsmn-vad's segments equal FunASR's as shipped, on the real fsmn-vad and real recordings.

Both sides run in this process: `fast_vad.uninstall()` restores FunASR's own methods on the class,
and every comparison asserts which side actually ran.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from importlib.metadata import version
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from funasr import AutoModel

from tests.conftest import shared_audio
from transcribe.core.engine import fast_vad


@pytest.fixture(scope="module")
def vad(tiny_models):
    return AutoModel(model=str(tiny_models["vad"]), device="cpu", ncpu=1, disable_update=True,
                     disable_pbar=True, log_level="ERROR")


@contextlib.contextmanager
def fast(enabled: bool) -> Iterator[None]:
    """fast_vad installed or not for the block, and checked."""
    with fast_vad.switched(enabled):
        assert fast_vad.installed() is enabled
        yield


def host_reads(model: Any) -> list[int]:
    """Counts the frames whose score came from the host copy (an instance-level spy on GetFrameState)."""
    hits = [0]
    cls = type(model.model)

    def spy(t: int, cache: dict) -> Any:
        hits[0] += cache["stats"].__dict__.get(fast_vad.HOST_SCORES) is not None
        return cls.GetFrameState(model.model, t, cache=cache)

    model.model.GetFrameState = spy
    return hits


def both(model: Any, audio: Any, **kwargs: Any) -> tuple[list, list]:
    """(FunASR as shipped, fast_vad) segment lists of one offline VAD call; checks the fast path ran
    and that both printed the same (FunASR prints its buffer warnings to stdout)."""
    printed = io.StringIO(), io.StringIO()
    with fast(False), contextlib.redirect_stdout(printed[0]):
        shipped = model.generate(input=audio, **kwargs)[0]["value"]
    hits = host_reads(model)
    try:
        with fast(True), contextlib.redirect_stdout(printed[1]):
            patched = model.generate(input=audio, **kwargs)[0]["value"]
    finally:
        del model.model.GetFrameState
    assert hits[0] > 0, "the host-score path did not run"
    assert printed[0].getvalue() == printed[1].getvalue()
    return shipped, patched


def read(name: str) -> np.ndarray:
    samples, rate = sf.read(str(shared_audio(name)), dtype="float32")
    assert rate == 16000
    return samples


@pytest.mark.parametrize("name", ["podcast_2speakers_60s.wav", "espeak_zh_en_30s.wav", "tts_1speaker_5s.wav",
                                  "silence_5s.wav"])
def test_segments_equal_funasr_as_shipped(vad, name):
    shipped, patched = both(vad, read(name))
    assert patched == shipped
    if name != "silence_5s.wav":
        assert shipped


def test_long_recording_with_max_segment_splits(vad):
    """3.5 minutes of tiled podcast: several 60 s chunks, dropped frames, and max_single_segment_time cuts."""
    audio = np.tile(read("podcast_2speakers_60s.wav"), 4)[: (210 * 16000)]
    shipped, patched = both(vad, audio)
    assert patched == shipped
    max_ms = vad.model.vad_opts.max_single_segment_time
    assert any(end - start >= max_ms - 1000 for start, end in shipped), "no segment reached the max-length cut"
    assert len(shipped) > 4


@pytest.mark.parametrize("kind", ["white", "hum"])
def test_noise(vad, kind):
    rng = np.random.default_rng(7)
    t = np.arange(20 * 16000) / 16000
    noise = 0.05 * rng.standard_normal(t.size) if kind == "white" else 0.2 * np.sin(2 * np.pi * 50 * t)
    shipped, patched = both(vad, noise.astype(np.float32))
    assert patched == shipped


def test_several_silence_pdfs(vad):
    """sil_pdf_ids of two classes: the summed score is FunASR's sum of .item() floats, in its order."""
    opts = vad.model.vad_opts
    saved = (opts.sil_pdf_ids, opts.silence_pdf_num)
    opts.sil_pdf_ids, opts.silence_pdf_num = [0, 3], 2
    try:
        shipped, patched = both(vad, read("espeak_zh_en_30s.wav"))
    finally:
        opts.sil_pdf_ids, opts.silence_pdf_num = saved
    assert patched == shipped and shipped


def streamed(model: Any, audio: np.ndarray, chunk_ms: int, switch_at: int | None = None) -> list:
    """FunASR's streaming use: chunks with one cache, is_final on the last; optionally patch mid-stream.

    Per chunk: the segment events and, when ``output_frame_probs`` is on, the frame probabilities
    FunASR's ``GetFrameState`` recorded so far (noise/speech log-probabilities, score, frame id)."""
    step = chunk_ms * 16
    starts = range(0, len(audio), step)
    cache: dict = {}
    out = []
    for i, start in enumerate(starts):
        if switch_at is not None and i == switch_at:
            fast_vad.install(version("funasr"))
        res = model.generate(input=audio[start:start + step], cache=cache, is_final=i == len(starts) - 1,
                             chunk_size=chunk_ms)
        probs = [(p.noise_prob, p.speech_prob, p.score, p.frame_id) for p in cache["stats"].frame_probs]
        out.append((res[0]["value"], probs))
    return out


@pytest.mark.parametrize("chunk_ms, frame_probs", [(200, True), (600, False)])
def test_streaming_chunks(vad, chunk_ms, frame_probs, monkeypatch):
    monkeypatch.setattr(vad.model.vad_opts, "output_frame_probs", frame_probs)
    audio = read("espeak_zh_en_30s.wav")[: 20 * 16000]
    with fast(False):
        shipped = streamed(vad, audio, chunk_ms)
    hits = host_reads(vad)
    try:
        with fast(True):
            patched = streamed(vad, audio, chunk_ms)
    finally:
        del vad.model.GetFrameState
    assert hits[0] > len(audio) // 160 // 2, "the host-score path did not run"
    with fast(False):
        switched = streamed(vad, audio, chunk_ms, switch_at=7)  # a cache begun by FunASR's own methods
    assert patched == shipped and switched == shipped
    assert sum(len(events) for events, _ in shipped) >= 2
    assert any(probs for _, probs in shipped) is frame_probs


def test_transcriber_without_fast_vad(tiny_models, tmp_path):
    from tests.conftest import model_config
    from transcribe.config import config_from_dict
    from transcribe.core.engine.funasr_transcriber import Transcriber

    with fast_vad.switched(False):
        t = Transcriber(config_from_dict(model_config(tiny_models, fast_vad=False), tmp_path))
        assert not fast_vad.installed() and not any(p.startswith("fast_vad") for p in t.patches)


def test_host_scores_are_the_floats_item_gives():
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(1, 500, 8, generator=g)
    scores[0, :5, 0] = torch.tensor([1e-38, 1 - 2**-24, 0.5, 2**-149, 1.0])
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        s = scores.to(dtype)
        assert fast_vad.silence_scores(s, [0]) == [s[0][t][0].item() for t in range(500)]
        assert fast_vad.silence_scores(s, [2, 0, 5]) == [sum(s[0][t][i].item() for i in (2, 0, 5)) for t in range(500)]
    assert fast_vad.silence_scores(torch.rand(2, 10, 4), [0]) is None  # batch of 2: FunASR's own path
    assert fast_vad.silence_scores(torch.rand(1, 10, 4), []) is None


def test_install_is_idempotent_reversible_and_version_gated():
    with fast(True):
        assert fast_vad.install(version("funasr")) == [f"fast_vad.{n}" for n in fast_vad.FAST]
        assert fast_vad.installed()
        fast_vad.uninstall()
        assert not fast_vad.installed()
        assert fast_vad.install("1.3.0") == [] and not fast_vad.installed()
