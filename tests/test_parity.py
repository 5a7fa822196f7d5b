"""Output parity: Transcriber's segments equal bare FunASR's `sentence_info` on the same models and options.

Mapping (docs/lock-mode.md): start/end ms -> seconds (ms / 1000), clamped to the audio's duration
(FunASR's timestamps can overshoot the end by a frame); FunASR's numeric `spk` ->
"Speaker1".. in order of first appearance; text unchanged. Fast diarization (batched CAM++
windows) is on in `transcriber` and must not change a label. Bare FunASR runs as shipped: the fast
VAD frame loop (process-wide on FunASR's class) is uninstalled for its calls.
"""

import pytest
import soundfile as sf
from funasr import AutoModel

from tests.conftest import shared_audio
from transcribe.core.engine import fast_punc, fast_vad
from transcribe.core.engine.funasr_transcriber import build_generate_kwargs
from transcribe.core.engine.result import speaker_label_map


@pytest.fixture(scope="module")
def bare(tiny_models):
    return AutoModel(model=str(tiny_models["asr"]), vad_model=str(tiny_models["vad"]),
                     punc_model=str(tiny_models["punc"]), spk_model=str(tiny_models["spk"]), device="cpu",
                     ncpu=1, disable_update=True, disable_pbar=True)


def expected_segments(bare_model, cfg, path, **options):
    duration = round(sf.info(str(path)).frames / 16000, 3)
    # FunASR as shipped: fast_vad and fast_punc's sentence/speaker wraps are process-wide.
    with fast_vad.switched(False), fast_punc.funasr_own(None):
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
    assert transcriber.fast_diarization  # the fast paths are what is compared
    assert "fast_vad.GetFrameState" in transcriber.patches and fast_vad.installed()
    path = shared_audio(name)
    expected = expected_segments(bare, transcriber.config, path, speakers=speakers)
    got = [(s.start, s.end, s.text, s.speaker) for s in transcriber.transcribe(path, speakers=speakers).segments]
    assert got == expected
    if name != "silence_5s.wav":
        assert len(got) > 3


def test_a_seed_makes_speaker_labels_reproducible_and_equal_to_seeded_bare_funasr(tiny_models, bare, tmp_path):
    """FunASR's k-means draws its starting centres from numpy's global random state; `funasr.seed` resets that
    state before each job, so what ran before in the process no longer matters, and bare FunASR seeded the same
    way before `generate` gives the same labels."""
    import numpy as np

    from tests.conftest import model_config
    from transcribe.config import config_from_dict
    from transcribe.core.engine.funasr_transcriber import Transcriber

    cfg = config_from_dict(model_config(tiny_models, seed=11), tmp_path)
    seeded = Transcriber(cfg)
    path = shared_audio("podcast_2speakers_60s.wav")
    runs, states = [], []
    for draws_before in (3, 1000):  # different amounts drawn from the global state before the job
        np.random.random(draws_before)
        segments = seeded.transcribe(path, speakers=2).segments
        runs.append([(s.start, s.end, s.text, s.speaker) for s in segments])
        states.append(np.random.get_state()[1].copy())
    assert runs[0] == runs[1] and {r[3] for r in runs[0]} == {"Speaker1", "Speaker2"}
    assert (states[0] == states[1]).all()  # the clustering's draws started from the seed both times
    np.random.random(77)
    np.random.seed(11)
    assert expected_segments(bare, cfg, path, speakers=2) == runs[0]


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


@pytest.fixture(scope="module")
def seaco_models(tiny_models):
    """The paraformer-zh class (SeACo Paraformer, BiCif predictor), tiny; the other models as before."""
    from tests.conftest import CACHE
    from tests.support.model_factory import build_all, cache_key

    out = CACHE / "test-models" / cache_key("tiny", "SeacoParaformer")
    return {**tiny_models, "asr": build_all(out, "tiny", "SeacoParaformer", only=("asr",))["asr"]}


def test_fast_cif_keeps_parity_on_seaco_paraformer(seaco_models, tmp_path, monkeypatch):
    import importlib
    from importlib.metadata import version

    from tests.conftest import model_config
    from transcribe.config import config_from_dict
    from transcribe.core.engine import fast_cif
    from transcribe.core.engine.funasr_transcriber import Transcriber

    cfg = config_from_dict(model_config(seaco_models), tmp_path)
    t = Transcriber(cfg)
    assert "fast_cif.cif_predictor.cif" in t.patches
    bicif = importlib.import_module("funasr.models.bicif_paraformer.cif_predictor")
    calls = []
    monkeypatch.setattr(bicif, "cif", lambda *a: calls.append(1) or fast_cif.cif(*a))
    bare = AutoModel(model=str(seaco_models["asr"]), vad_model=str(seaco_models["vad"]),
                     punc_model=str(seaco_models["punc"]), spk_model=str(seaco_models["spk"]), device="cpu",
                     ncpu=1, disable_update=True, disable_pbar=True)
    for name in ("podcast_2speakers_60s.wav", "espeak_zh_en_30s.wav"):
        path = shared_audio(name)
        got = [(s.start, s.end, s.text, s.speaker) for s in t.transcribe(path, speakers=2).segments]
        assert calls, "the fast CIF scan was not used"
        fast_cif.uninstall()  # bare FunASR with its own loops
        try:
            expected = expected_segments(bare, cfg, path, speakers=2)
        finally:
            fast_cif.install(version("funasr"))
            monkeypatch.setattr(bicif, "cif", lambda *a: calls.append(1) or fast_cif.cif(*a))
        assert got == expected and len(got) > 3
