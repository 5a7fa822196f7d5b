"""Output parity: Transcriber's segments equal bare FunASR's `sentence_info` on the same models and options.

Mapping (docs/lock-mode.md): start/end ms -> seconds (ms / 1000), clamped to the audio's duration
(FunASR's timestamps can overshoot the end by a frame); FunASR's numeric `spk` ->
"Speaker1".. in order of first appearance; text unchanged. Fast diarization (batched CAM++
windows) is on in `transcriber` and must not change a label.
"""

import pytest
import soundfile as sf
from funasr import AutoModel

from tests.conftest import shared_audio
from transcribe.core.funasr_transcriber import build_generate_kwargs
from transcribe.core.result import speaker_label_map


@pytest.fixture(scope="module")
def bare(tiny_models):
    return AutoModel(model=str(tiny_models["asr"]), vad_model=str(tiny_models["vad"]),
                     punc_model=str(tiny_models["punc"]), spk_model=str(tiny_models["spk"]), device="cpu",
                     ncpu=1, disable_update=True, disable_pbar=True)


def expected_segments(bare_model, cfg, path, **options):
    duration = round(sf.info(str(path)).frames / 16000, 3)
    out = bare_model.generate(input=str(path), **build_generate_kwargs(cfg, **options))
    if not out or "sentence_info" not in out[0]:
        return []
    info = out[0]["sentence_info"]
    labels = speaker_label_map(s["spk"] for s in info)
    return [(min(s["start"] / 1000, duration), min(s["end"] / 1000, duration), s["text"], labels[s["spk"]])
            for s in info]


@pytest.mark.parametrize("name, speakers", [("podcast_2speakers_60s.wav", 2), ("espeak_zh_en_30s.wav", 2),
                                            ("tts_1speaker_5s.wav", None), ("silence_5s.wav", None)])
def test_segments_equal_bare_funasr(transcriber, bare, name, speakers):
    assert transcriber.fast_diarization  # the fast path is what is compared
    path = shared_audio(name)
    expected = expected_segments(bare, transcriber.config, path, speakers=speakers)
    got = [(s.start, s.end, s.text, s.speaker) for s in transcriber.transcribe(path, speakers=speakers).segments]
    assert got == expected
    if name != "silence_5s.wav":
        assert len(got) > 3


def test_fast_diarization_batches_the_cam_windows(transcriber, monkeypatch):
    """The speaker model gets all windows of a segment in one forward call, not one call per window."""
    spk = transcriber.model.spk_model
    calls = []
    real = spk.forward

    def counting(x):
        calls.append(x.shape[0])
        return real(x)

    monkeypatch.setattr(spk, "forward", counting)
    transcriber.transcribe(shared_audio("podcast_2speakers_60s.wav"), speakers=2)
    assert max(calls) > 50 and len(calls) < 5  # ~79 windows of 1.5 s in the 60 s VAD segment
