"""WhisperX/FunASR-style options on the real FunASR path: speaker bounds, --no-diarize, word timestamps,
from_config, runtime device fallback, the result cache, and their plumbing through job options."""

import json
import os
import time

import numpy as np
import pytest
import torch
from funasr import AutoModel

from tests.conftest import model_config, shared_audio
from tests.test_parity import expected_segments
from transcribe.config import config_from_dict
from transcribe.core.engine.device_manager import DeviceChoice
from transcribe.core.engine.fallback import (
    OUT_OF_MEMORY,
    UNSUPPORTED_OPERATOR,
    device_failure_reason,
    retry_plan,
)
from transcribe.core.engine.funasr_transcriber import (
    AsyncTranscriber,
    Transcriber,
    build_generate_kwargs,
)
from transcribe.core.engine.patches.cluster_bounds import BoundedClustering
from transcribe.core.engine.result import Result, speaker_label_map, words_from_sentence
from transcribe.core.engine.result_cache import ResultCache, model_identity
from transcribe.core.errors import (
    InvalidOptionsError,
    SidecarError,
    SpeakerCountError,
    TranscriptionError,
)
from transcribe.core.notify import Notifier
from transcribe.core.pool.job_runner import run_job
from transcribe.core.pool.jobs import JobOptions, parse_options
from transcribe.core.pool.task_dir import TaskDir

PODCAST = "podcast_2speakers_60s.wav"
MIXED = "espeak_zh_en_30s.wav"  # 30 s: enough CAM++ windows (~40) to cluster, half the podcast's time
SHORT = "tts_1speaker_5s.wav"


def rows(result):
    return [(s.start, s.end, s.text, s.speaker) for s in result.segments]


@pytest.fixture(scope="module")
def bare_without_speakers(tiny_models):
    return AutoModel(model=str(tiny_models["asr"]), vad_model=str(tiny_models["vad"]),
                     punc_model=str(tiny_models["punc"]), device="cpu", ncpu=1, disable_update=True,
                     disable_pbar=True)


@pytest.fixture(scope="module")
def bare(tiny_models):
    return AutoModel(model=str(tiny_models["asr"]), vad_model=str(tiny_models["vad"]),
                     punc_model=str(tiny_models["punc"]), spk_model=str(tiny_models["spk"]), device="cpu",
                     ncpu=1, disable_update=True, disable_pbar=True)


# --------------------------------------------------------------------------- no-diarize
@pytest.mark.parametrize("name", [MIXED])
def test_no_diarize_equals_bare_funasr_without_a_speaker_model(transcriber, bare_without_speakers, name):
    path = shared_audio(name)
    expected = [(s, e, t, None) for s, e, t, _ in expected_segments_no_spk(bare_without_speakers,
                                                                           transcriber.config, path)]
    r = transcriber.transcribe(path, diarize=False)
    assert rows(r) == expected and expected and r.speakers == []
    assert "spk" not in r.timings  # the speaker model did not run
    # The speaker model is back for the next call.
    assert transcriber.transcribe(path, speakers=2).speakers == ["Speaker1", "Speaker2"]


def expected_segments_no_spk(bare_model, cfg, path):
    import soundfile as sf

    duration = round(sf.info(str(path)).frames / 16000, 3)
    out = bare_model.generate(input=str(path), **build_generate_kwargs(cfg))
    return [(min(s["start"] / 1000, duration), min(s["end"] / 1000, duration), s["text"], None)
            for s in out[0]["sentence_info"]]


# --------------------------------------------------------------------------- speaker bounds
def test_no_bounds_equals_bare_funasr_with_the_bounds_wrapper_installed(transcriber, bare):
    assert transcriber.clustering is not None and "cluster_bounds" in transcriber.patches
    path = shared_audio(MIXED)
    transcriber.transcribe(path, min_speakers=3, max_speakers=5)  # a bounded call first: it must leave no trace
    spectral = transcriber.model.cb_model.spectral_cluster
    assert (spectral.min_num_spks, spectral.max_num_spks, transcriber.clustering.bounds) == (1, 15, None)
    assert rows(transcriber.transcribe(path)) == expected_segments(bare, transcriber.config, path)


def test_bounds_hold_on_the_real_path(transcriber):
    path = shared_audio(MIXED)
    assert len(transcriber.transcribe(path, min_speakers=3).speakers) >= 3
    assert transcriber.transcribe(path, max_speakers=1).speakers == ["Speaker1"]
    assert len(transcriber.transcribe(path, min_speakers=2, max_speakers=2).speakers) == 2  # FunASR's exact count


def clusters(n_per, centres, seed=0):
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((centres, 192))
    return torch.tensor(np.concatenate([d + 0.05 * rng.standard_normal((n_per, 192)) for d in dirs]),
                        dtype=torch.float32)


def partition(labels):
    names = speaker_label_map(labels)
    return [names[x] for x in labels]


def test_bounded_clustering_on_three_clear_speakers():
    from funasr.models.campplus.cluster_backend import ClusterBackend

    x = clusters(30, 3)
    backend = ClusterBackend()
    funasr_labels = backend(x)
    wrapper = BoundedClustering(backend)
    # No bounds: FunASR's clustering (k-means is unseeded in FunASR: compare partitions, not label numbers)
    assert partition(wrapper(x)) == partition(funasr_labels) and funasr_labels.max() + 1 == 3
    for low, high in ((1, 2), (4, 6), (3, 3), (2, 5)):
        wrapper.bounds = (low, high)
        found = wrapper(x).max() + 1
        assert low <= found <= high, (low, high, found)
    wrapper.bounds = (40, 64)
    with pytest.raises(SpeakerCountError, match="min_speakers 40"):
        wrapper(clusters(10, 3))
    wrapper.bounds = (2, 3)
    assert set(wrapper(clusters(5, 3))) == {0}  # under 20 windows FunASR does not cluster


@pytest.mark.parametrize("options, match", [
    ({"speakers": 2, "min_speakers": 1}, "not both"),
    ({"min_speakers": 3, "max_speakers": 2}, "more than max_speakers"),
    ({"max_speakers": 65}, "64"),
    ({"diarize": False, "speakers": 2}, "need diarization"),
])
def test_contradictory_options_are_refused_before_work(transcriber, options, match):
    with pytest.raises(InvalidOptionsError, match=match):
        transcriber.transcribe(shared_audio(SHORT), **options)
    with pytest.raises(SidecarError, match=match):
        parse_options(json.dumps(options).encode(), 4096)


# --------------------------------------------------------------------------- word timestamps
def test_word_timestamps_are_funasrs_tokens_and_leave_segments_unchanged(transcriber, bare):
    path = shared_audio(MIXED)
    plain = transcriber.transcribe(path, speakers=2)
    worded = transcriber.transcribe(path, speakers=2, word_timestamps=True)
    assert rows(worded) == rows(plain) and all(s.words is None for s in plain.segments)
    out = bare.generate(input=str(path), **build_generate_kwargs(transcriber.config, speakers=2,
                                                                 word_timestamps=True))
    expected = [words_from_sentence(s, worded.duration) for s in out[0]["sentence_info"]]
    assert [s.words for s in worded.segments] == expected and sum(map(len, expected)) > 20
    for seg in worded.segments:
        assert all(seg.start <= w.start <= w.end <= seg.end for w in seg.words)
    assert Result.from_json(worded.to_json()) == worded
    assert '"words"' not in plain.to_json() and '"words"' in worded.to_json()


def test_words_pair_funasr_tokens_with_times():
    stamps = [[0, 100], [100, 200], [200, 300], [300, 700]]
    spaced = words_from_sentence({"raw_text": "欢 迎 大家 hello", "timestamp": stamps}, 10)
    surface = words_from_sentence({"raw_text": "欢迎大家 hello", "timestamp": stamps + [[700, 900]]}, 10)
    assert [w.text for w in spaced] == ["欢", "迎", "大家", "hello"] and spaced[-1].end == 0.7
    assert [w.text for w in surface] == ["欢", "迎", "大", "家", "hello"]
    assert words_from_sentence({"raw_text": "a b", "timestamp": [[0, 50000]]}, 10)[0].end == 10  # clamped


# --------------------------------------------------------------------------- from_config
def test_from_config_takes_a_path_a_dict_or_a_config(tiny_models, tmp_path, monkeypatch):
    data = model_config(tiny_models)
    (tmp_path / "c.json").write_text(json.dumps(data))
    monkeypatch.chdir(tmp_path)
    for source in (tmp_path / "c.json", str(tmp_path / "c.json"), data, config_from_dict(data, tmp_path)):
        t = Transcriber.from_config(source)
        assert t.models["asr"] == str(tiny_models["asr"])
    without_fast_cif = Transcriber.from_config(model_config(tiny_models, fast_cif=False))
    assert without_fast_cif.clustering is not None and not any("fast_cif" in p for p in without_fast_cif.patches)
    from transcribe.core.errors import ConfigError

    with pytest.raises(ConfigError, match="not found"):
        Transcriber.from_config(tmp_path / "missing.json")


async def test_async_from_config_takes_a_dict(tiny_models):
    async with AsyncTranscriber.from_config(model_config(tiny_models)) as t:
        r = await t.transcribe(shared_audio(SHORT), diarize=False)
    assert r.segments and r.speakers == []


# --------------------------------------------------------------------------- runtime device fallback
def test_device_failures_are_classified():
    assert device_failure_reason(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")) \
        == OUT_OF_MEMORY
    assert device_failure_reason(RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)")) == OUT_OF_MEMORY
    assert device_failure_reason(NotImplementedError("aten::foo")) == UNSUPPORTED_OPERATOR
    assert device_failure_reason(RuntimeError(
        "The operator 'aten::index_select' is not currently implemented for the MPS device")) == UNSUPPORTED_OPERATOR
    assert device_failure_reason(ValueError("bad shape")) is None
    assert device_failure_reason(RuntimeError("shape mismatch")) is None
    assert [(a.device, a.batch_size_s) for a in retry_plan(OUT_OF_MEMORY, "cuda:0", 300)] == [("cuda:0", 150),
                                                                                              ("cpu", 300)]
    assert [(a.device, a.batch_size_s) for a in retry_plan(UNSUPPORTED_OPERATOR, "mps", 300)] == [("cpu", 300)]
    assert retry_plan(UNSUPPORTED_OPERATOR, "cpu", 300) == []


@pytest.fixture(scope="module")
def gpu(tiny_models, tmp_path_factory):
    """An engine that believes it is on cuda:0 (FunASR builds it on the CPU here): failures are injected."""
    cfg = config_from_dict(model_config(tiny_models), tmp_path_factory.mktemp("gpu"))
    return Transcriber(cfg, DeviceChoice("cuda:0", "float32", "test", "cuda:0"))


class FailingModel:
    """Raise `error` on the next `failures` calls of the AutoModel's generate, then run it."""

    def __init__(self, monkeypatch, engine, error, failures):
        self.real, self.error, self.failures, self.calls = engine.model.generate, error, failures, []
        monkeypatch.setattr(engine.model, "generate", self)

    def __call__(self, **kwargs):
        self.calls.append(kwargs["batch_size_s"])
        if len(self.calls) <= self.failures:
            raise self.error
        return self.real(**kwargs)


def oom():
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_retries_with_half_the_batch_on_the_same_device(gpu, transcriber, monkeypatch):
    path = shared_audio(SHORT)
    failing = FailingModel(monkeypatch, gpu, oom(), failures=1)
    r = gpu.transcribe(path, speakers=2)
    assert failing.calls == [300, 150]
    assert r.device == "cuda:0" and r.fallback["reason"] == OUT_OF_MEMORY
    assert (r.fallback["from"], r.fallback["to"], r.fallback["batch_size_s"]) == ("cuda:0", "cuda:0", 150)
    assert rows(r) == rows(transcriber.transcribe(path, speakers=2))
    assert json.loads(r.to_json())["fallback"]["reason"] == OUT_OF_MEMORY


def test_persistent_failure_runs_the_job_on_a_cpu_copy_and_the_next_job_stays_on_the_device(gpu, transcriber,
                                                                                             monkeypatch):
    path = shared_audio(SHORT)
    failing = FailingModel(monkeypatch, gpu, oom(), failures=2)
    r = gpu.transcribe(path, speakers=2)
    assert failing.calls == [300, 150]  # the device model twice; the third attempt is the CPU copy's
    assert r.device == "cpu" and r.fallback["to"] == "cpu" and r.fallback["from"] == "cuda:0"
    assert rows(r) == rows(transcriber.transcribe(path, speakers=2))
    copy = gpu._cpu_copy
    assert copy is not None and copy.device.device == "cpu"
    # An operator the device lacks goes straight to the CPU copy, built once and kept.
    failing.calls.clear()
    failing.failures, failing.error = 1, NotImplementedError("aten::_cif_index_select not implemented for mps")
    r2 = gpu.transcribe(path)
    assert failing.calls == [300] and r2.device == "cpu" and r2.fallback["reason"] == UNSUPPORTED_OPERATOR
    assert gpu._cpu_copy is copy
    # The next job that fits runs on the worker's own device again.
    r3 = gpu.transcribe(path)
    assert failing.calls == [300, 300] and r3.device == "cuda:0" and r3.fallback is None


def test_other_failures_do_not_fall_back(gpu, monkeypatch):
    failing = FailingModel(monkeypatch, gpu, ValueError("a bug"), failures=1)
    with pytest.raises(TranscriptionError, match="a bug"):
        gpu.transcribe(shared_audio(SHORT))
    assert failing.calls == [300]


def test_fallback_can_be_turned_off(tiny_models, tmp_path, monkeypatch):
    cfg = config_from_dict(model_config(tiny_models, runtime_fallback=False), tmp_path)
    engine = Transcriber(cfg, DeviceChoice("cuda:0", "float32", "test", "cuda:0"))
    failing = FailingModel(monkeypatch, engine, oom(), failures=1)
    with pytest.raises(TranscriptionError, match="out of memory") as info:
        engine.transcribe(shared_audio(SHORT))
    assert info.value.retryable and failing.calls == [300]


class Recorder(Notifier):
    def __init__(self):
        super().__init__(None)
        self.events = []

    def send(self, event, **data):
        self.events.append((event, data))


def settled_job(cfg, audio, sidecar=None):
    td = TaskDir.from_config(cfg).ensure()
    if sidecar is not None:
        (td.inbox / f"{audio.name}.json").write_text(json.dumps(sidecar))
    (td.inbox / audio.name).write_bytes(audio.read_bytes())
    for p in td.inbox.iterdir():
        os.utime(p, (time.time() - 10,) * 2)
    return td, td.claim_next("w1")


def test_a_job_that_falls_back_sends_a_webhook_event(gpu, fixture_config, monkeypatch):
    FailingModel(monkeypatch, gpu, oom(), failures=1)
    td, job = settled_job(fixture_config, shared_audio(SHORT))
    notifier = Recorder()
    outcome, result = run_job(td, job, gpu.transcribe, fixture_config, "w1", notifier)
    assert outcome == "done" and result.fallback
    events = dict(notifier.events)
    assert events["job.fallback"]["reason"] == OUT_OF_MEMORY and events["job.fallback"]["job_id"] == job.job_id
    assert events["job.fallback"]["device"] == "cuda:0" and "job.done" in events


# --------------------------------------------------------------------------- job options through run_job
def test_sidecar_options_reach_the_engine_and_the_outputs(transcriber, fixture_config):
    sidecar = {"diarize": False, "word_timestamps": True, "formats": ["all"], "max_line_width": 12,
               "max_line_count": 1, "batch_size_s": 60}
    td, job = settled_job(fixture_config, shared_audio(MIXED), sidecar)
    outcome, result = run_job(td, job, transcriber.transcribe, fixture_config, "w1")
    assert outcome == "done" and result.speakers == [] and result.segments[0].words is not None
    done = {p.suffix: p for p in td.done.iterdir() if p.is_file()}
    assert set(done) == {".json", ".txt", ".srt", ".vtt", ".tsv", ".rttm"}
    assert done[".rttm"].read_text() == ""  # no diarization: no speaker turns
    srt_lines = [line for line in done[".srt"].read_text().splitlines() if line and "-->" not in line
                 and not line.isdigit()]
    assert srt_lines and max(map(len, srt_lines)) <= 12
    # the key is there (the tiny model's unpunctuated VAD segments carry no token times to fill it)
    assert "words" in json.loads(done[".json"].read_text())["segments"][0]


def test_job_options_defaults_come_from_the_config(fixture_config):
    opts = JobOptions()
    assert opts.engine_kwargs(fixture_config)["word_timestamps"] is False
    assert opts.layout(fixture_config).limited is False
    cfg = fixture_config.model_copy(update={"output": fixture_config.output.model_copy(
        update={"word_timestamps": True, "max_line_width": 40})})
    assert opts.engine_kwargs(cfg)["word_timestamps"] and opts.layout(cfg).max_line_width == 40
    assert JobOptions(word_timestamps=False).engine_kwargs(cfg)["word_timestamps"] is False


# --------------------------------------------------------------------------- result cache
@pytest.fixture(scope="module")
def cached_engine(tiny_models, tmp_path_factory):
    base = tmp_path_factory.mktemp("cache")
    data = model_config(tiny_models)
    data["cache"] = {"enabled": True, "dir": str(base / "results")}
    return Transcriber(config_from_dict(data, base))


def cache_entries(engine):
    return sorted(engine.cache.directory.glob("*/*.json"))


def test_the_same_bytes_and_options_come_from_the_cache(cached_engine, tmp_path):
    src = shared_audio(SHORT)
    first = cached_engine.transcribe(src, word_timestamps=True)
    copy = tmp_path / "renamed.wav"
    copy.write_bytes(src.read_bytes())
    again = cached_engine.transcribe(copy, word_timestamps=True)
    assert not first.cached and again.cached and json.loads(again.to_json())["cached"] is True
    assert rows(again) == rows(first) and again.segments == first.segments
    assert (again.processing_time, again.timings) == (first.processing_time, first.timings)  # the original run's
    assert again.source == "renamed.wav"


def test_other_options_or_bytes_never_get_a_cached_result(cached_engine, tmp_path):
    src = shared_audio(SHORT)
    cached_engine.transcribe(src)
    assert cached_engine.transcribe(src).cached
    for options in ({"speakers": 2}, {"diarize": False}, {"word_timestamps": True, "batch_size_s": 100},
                    {"hotwords": ["你好"]}, {"max_speakers": 3}):
        assert not cached_engine.transcribe(src, **options).cached, options
    other = tmp_path / "other.wav"
    other.write_bytes(src.read_bytes()[:-3200])  # 0.1 s shorter: other bytes
    assert not cached_engine.transcribe(other).cached
    before = cache_entries(cached_engine)
    assert not cached_engine.transcribe(src, use_cache=False).cached
    assert cache_entries(cached_engine) == before  # --no-cache neither reads nor writes


def test_a_corrupt_entry_is_ignored_and_replaced(cached_engine, tmp_path):
    src = tmp_path / "c.wav"
    src.write_bytes(shared_audio(SHORT).read_bytes()[:-6400])
    cached_engine.transcribe(src)
    [entry] = [p for p in cache_entries(cached_engine) if p.stat().st_mtime > time.time() - 30
               and json.loads(p.read_text())["result"]["source"] == "c.wav"]
    entry.write_text('{"key": "truncated')
    assert not cached_engine.transcribe(src).cached
    assert json.loads(entry.read_text())["result"]["source"] == "c.wav"
    assert cached_engine.transcribe(src).cached


def test_model_identity_changes_with_a_model_file(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.pt").write_bytes(b"weights")
    before = model_identity("asr", "m", str(model), None)
    os.utime(model / "model.pt", ns=(0, 123_000_000_000))
    assert model_identity("asr", "m", str(model), None) != before


def test_the_cache_evicts_least_recently_used_entries(tmp_path):
    cache = ResultCache(tmp_path, max_bytes=1500)
    r = Result("x" * 300, [], [], 1.0, 0.1, 0.1, "cpu", {})
    for i, key in enumerate(("aa" + "0" * 62, "bb" + "0" * 62, "cc" + "0" * 62)):
        cache.put(key, r)
        os.utime(cache._path(key), (1000 + i, 1000 + i))
    cache.put("dd" + "0" * 62, r)
    assert cache.get("aa" + "0" * 62) is None and cache.get("dd" + "0" * 62).cached


def test_jobs_use_the_cache_unless_their_sidecar_says_no(cached_engine, tmp_path):
    cfg = cached_engine.config.model_copy(update={"pool": cached_engine.config.pool.model_copy(
        update={"task_dir": str(tmp_path / "tasks"), "settle_seconds": 0.0})})
    audio = tmp_path / "job.wav"
    audio.write_bytes(shared_audio(SHORT).read_bytes()[:-9600])  # bytes of its own: a cold cache
    outcomes = []
    for sidecar in (None, {"cache": False}, None):
        td, job = settled_job(cfg, audio, sidecar)
        outcome, result = run_job(td, job, cached_engine.transcribe, cfg, "w1")
        outcomes.append((outcome, result.cached))
        done = json.loads((td.done / f"{job.job_id}.json").read_text())
        assert done["cached"] is result.cached
    assert outcomes == [("done", False), ("done", False), ("done", True)]
