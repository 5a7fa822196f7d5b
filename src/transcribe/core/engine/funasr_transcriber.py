"""The engine: one FunASR `AutoModel` (ASR + VAD + punctuation + CAM++) and the calls around it.

`Transcriber` is synchronous and guards its model with a thread lock (FunASR's ``generate`` is
not thread-safe, FunASR #2475). `AsyncTranscriber` is lock mode: the same engine behind an
``asyncio.Lock``, ``generate`` running in a worker thread so the event loop keeps serving.

Fast diarization: FunASR cuts each VAD segment into 1.5 s CAM++ windows (all padded to the same
length) and then embeds them one forward call per window. Raising the speaker sub-model's batch
size makes FunASR's own ``inference`` embed them in one batched call instead: the same windows,
the same model, the same clustering, so the same labels (tests/test_parity.py checks it against
bare FunASR). It applies to CAM++ only; any other speaker model runs FunASR's path, logged once.

Per call, under the lock: ``diarize=False`` skips the speaker model for that call only (FunASR runs
its speaker stage when ``AutoModel.spk_model is not None``, so the attribute is None for the call
and restored after: the output equals an AutoModel built without ``spk_model``); speaker-count
bounds go to the clustering wrapper (`patches/cluster_bounds.py`). Around the call: the result
cache (`result_cache.py`, opt-in) and the runtime device fallback (`fallback.py`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from loguru import logger

from transcribe.config import Config, as_config
from transcribe.core.engine import cuda_graphs, fast_punc, model_store
from transcribe.core.engine.audio import SAMPLE_RATE, Audio, check_file, load_audio
from transcribe.core.engine.device_manager import (
    DeviceChoice,
    DeviceManager,
    limit_cpu_threads,
)
from transcribe.core.engine.fallback import (
    device_failure_reason,
    release_device_memory,
    retry_plan,
)
from transcribe.core.engine.options import TranscribeOptions, option_problems
from transcribe.core.engine.patches import (
    after_job,
    apply_patches,
    cluster_bounds,
    patched_model_kwargs,
)
from transcribe.core.engine.result import Result, segments_from_funasr
from transcribe.core.engine.result_cache import (
    ResultCache,
    cache_key,
    engine_identity,
    file_digest,
    model_identity,
)
from transcribe.core.engine.side_stream import overlap_enabled
from transcribe.core.errors import (
    InvalidOptionsError,
    ModelLoadError,
    SpeakerCountError,
    TranscribeError,
    TranscriptionError,
    TranscriptionTimeout,
)
from transcribe.core.fault_injection import crash_point

FAST_DIARIZATION_BATCH = 256  # CAM++ windows per forward call (1.5 s each: ~150 frames x 80 mels)
FAST_DIARIZATION_MODELS = ("CAMPPlus",)
# The ASR classes whose FunASR 1.4 `inference` reads the `hotword` argument (grep of funasr/models);
# every other model ignores it silently (FunASRNano reads a different key, `hotwords`).
HOTWORD_MODELS = ("SeacoParaformer", "ContextualParaformer")


def build_automodel_kwargs(cfg: Config, device: DeviceChoice, refs: dict[str, model_store.ModelRef]) -> dict[str, Any]:
    """The keyword arguments for ``AutoModel(...)``: a pure function of config, device and models."""
    f = cfg.funasr
    kwargs: dict[str, Any] = {
        "model": refs["model"].load_arg,
        "hub": f.hub,
        "device": device.device,
        "disable_update": f.disable_update,
        "ncpu": f.ncpu,
        "disable_pbar": True,  # progress is ours (rich); FunASR's tqdm bars would garble logs
        "log_level": "WARNING",
    }
    for key in ("vad_model", "punc_model", "spk_model"):
        if key in refs:
            kwargs[key] = refs[key].load_arg
    for key, ref in refs.items():
        if ref.revision:
            kwargs[f"{key}_revision"] = ref.revision
    if f.fast_diarization and "spk_model" in refs and spk_model_class(refs["spk_model"]) in FAST_DIARIZATION_MODELS:
        # FunASR snapshots sub-model kwargs at construction and resets to them on every call,
        # so the batch size must be given here, not set afterwards.
        kwargs["spk_kwargs"] = {"batch_size": FAST_DIARIZATION_BATCH}
    for name, value in patched_model_kwargs(device.device).items():
        if name.endswith("_kwargs"):
            kwargs[name] = {**kwargs.get(name, {}), **value}
        else:
            kwargs[name] = value
    kwargs.update(f.model_kwargs)
    return kwargs


def spk_model_class(ref: model_store.ModelRef) -> str | None:
    """The speaker model's class from its config.yaml (``model: CAMPPlus``); the cam++ alias is CAM++."""
    if ref.path:
        import yaml

        try:
            conf = yaml.safe_load((Path(ref.path) / "config.yaml").read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            return None
        return conf.get("model") if isinstance(conf, dict) else None
    return "CAMPPlus" if ref.name == "cam++" else None


def build_generate_kwargs(cfg: Config, *, speakers: int | None = None, hotwords: Sequence[str] | None = None,
                          batch_size_s: int | None = None, word_timestamps: bool = False) -> dict[str, Any]:
    """The keyword arguments for ``generate(...)`` besides ``input``: pure, shared with the parity tests."""
    kwargs: dict[str, Any] = {"batch_size_s": batch_size_s or cfg.funasr.batch_size_s, "sentence_timestamp": True}
    if speakers:
        kwargs["preset_spk_num"] = int(speakers)
    if hotwords:
        kwargs["hotword"] = " ".join(hotwords)
    if word_timestamps:
        # Each sentence then carries its tokens (raw_text) beside its per-token timestamps; text is unchanged.
        kwargs["return_raw_text"] = True
    kwargs.update(cfg.funasr.generate_kwargs)
    return kwargs


def warmup_clip(seconds: float = 1.0) -> np.ndarray:
    """A short built-in clip (a tone with a little noise) to run every stage once at start-up."""
    t = np.arange(int(seconds * SAMPLE_RATE), dtype=np.float32) / SAMPLE_RATE
    rng = np.random.default_rng(0)
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


class Transcriber:
    """Synchronous engine: build once, then `transcribe` files one at a time (thread-safe)."""

    def __init__(self, config: Config, device: DeviceChoice | None = None, *,
                 check_network: Callable[[str], bool] = model_store.hub_reachable) -> None:
        self.config = config
        self.device = device or DeviceManager.select_device(config.funasr)
        self.patches = apply_patches(self.device.device)
        self.cpu_threads = limit_cpu_threads(config.funasr.ncpu)
        if config.funasr.fast_cif:
            from transcribe.core.engine import fast_cif

            self.patches += [f"fast_cif.{name}" for name in fast_cif.install(version("funasr"))]
        if config.funasr.fast_vad:
            from transcribe.core.engine import fast_vad

            self.patches += fast_vad.install(version("funasr"))
        self.refs = model_store.resolve_models(config.funasr, config.base_dir)
        model_store.check_remote_refs(self.refs, check_network)
        self.models = {ref.role: ref.load_arg for ref in self.refs.values()}
        self._lock = threading.Lock()
        # Called with the stage name ("vad", "asr", "punc", "spk") as each FunASR sub-model call starts:
        # a worker's heartbeat uses it to tell a long job that progresses from one that hangs.
        self.on_progress: Callable[[str], None] | None = None
        started = time.perf_counter()
        self.model = self._build()
        self.load_time = time.perf_counter() - started
        self._stage_times: dict[str, float] = {}
        self._time_stages()
        self._autocast_encoder()
        self.fast_diarization = self._enable_fast_diarization()
        self.fast_punc = (fast_punc.install(getattr(self.model, "punc_model", None), version("funasr"))
                          if config.funasr.fast_punc else None)
        if self.fast_punc is not None:
            self.patches.append(fast_punc.NAME)
        self.graphs = self._install_cuda_graphs()
        self.clustering = cluster_bounds.install(self.model, version("funasr"))
        if self.clustering is not None:
            self.patches.append(cluster_bounds.NAME)
        self.cache = self._open_cache()
        # funasr.overlap_stages: a diarized job runs through the batch engine's stages, CAM++ beside ASR and
        # each batch's timestamps beside the next batch's decoding (the same result: tests/test_batch_engine.py);
        # options the engine does not replay run FunASR's own loop.
        self.stages_side_by_side = self._side_by_side_engine()
        self._cpu_copy: Transcriber | None = None  # built on the first job that falls back to the CPU
        self._cpu_copy_lock = threading.Lock()
        self.accepts_hotwords = type(getattr(self.model, "model", None)).__name__ in HOTWORD_MODELS
        self._hotwords_warned = False
        logger.info("models loaded in {:.1f}s on {} (patches: {}; fast diarization: {})", self.load_time,
                    self.device.device, ", ".join(self.patches) or "none", self.fast_diarization)

    @classmethod
    def from_config(cls, config: Config | dict[str, Any] | str | os.PathLike[str]) -> "Transcriber":
        """Build from a `Config`, a dict of config keys, or a path to a config file."""
        return cls(as_config(config))

    def _open_cache(self) -> ResultCache | None:
        c = self.config.cache
        if not c.enabled:
            return None
        self._engine_identity = engine_identity(
            self.config.funasr.model_dump(), self.device.kind,
            (model_identity(r.role, r.name, r.path, r.revision) for r in self.refs.values()))
        return ResultCache(self.config.resolve_path(c.dir), int(c.max_mb * 2**20))

    def _build(self) -> Any:
        kwargs = build_automodel_kwargs(self.config, self.device, self.refs)
        try:
            with model_store.quiet_funasr():
                from funasr import AutoModel

                return AutoModel(**kwargs)
        except Exception as e:  # noqa: BLE001 - FunASR raises anything from a bad model dir; we name it
            remote = [r for r in self.refs.values() if r.source == "remote"]
            if remote and ("not registered" in str(e) or "download" in str(e).lower()):
                raise model_store.unavailable_error(remote[0], f"{type(e).__name__}: {e}") from e
            where = ", ".join(f"{r.role}={r.load_arg}" for r in self.refs.values())
            raise ModelLoadError(f"could not load the FunASR models ({where}): {type(e).__name__}: {e}") from e

    def _time_stages(self) -> None:
        """Time each sub-model's share of ``generate`` (vad, asr, punc, spk) for the result's timings.

        FunASR routes every sub-model call through ``AutoModel.inference(..., model=sub_model)``; an
        instance-level wrapper adds up the time per sub-model. Nothing else about the call changes.
        """
        real = self.model.inference
        names = {id(getattr(self.model, f"{role}_model", None)): role for role in ("vad", "punc", "spk")}
        names.pop(id(None), None)
        times = self._stage_times

        @functools.wraps(real)
        def timed(*args: Any, model: Any = None, **kwargs: Any) -> Any:
            stage = names.get(id(model), "asr")
            if self.on_progress is not None:
                self.on_progress(stage)
            t0 = time.perf_counter()
            try:
                return real(*args, model=model, **kwargs)
            finally:
                times[stage] = times.get(stage, 0.0) + time.perf_counter() - t0

        self.model.inference = timed

    def _enable_fast_diarization(self) -> bool:
        spk = getattr(self.model, "spk_model", None)
        if spk is None or not self.config.funasr.fast_diarization:
            return False
        if type(spk).__name__ not in FAST_DIARIZATION_MODELS:
            logger.info("fast diarization does not cover speaker model {}: using FunASR's per-window path",
                        type(spk).__name__)
            return False
        return self.model.spk_kwargs.get("batch_size") == FAST_DIARIZATION_BATCH

    def _side_by_side_engine(self) -> Any:
        """The batch engine for this transcriber's diarized jobs (``funasr.overlap_stages``), where it covers
        the models; None: every job runs FunASR's own loop."""
        from transcribe.core.engine.batch_engine import BatchTranscriber
        from transcribe.core.engine.batched_asr import asr_support

        if not overlap_enabled(self.config.funasr.overlap_stages, self.device.device):
            return None
        if getattr(self.model, "spk_model", None) is None or getattr(self.model, "vad_model", None) is None:
            return None
        reason = asr_support(self.model.model, self.model.kwargs)
        if reason:
            logger.info("stages side by side do not cover {}: FunASR's own loop runs", reason)
            return None
        self.patches.append("overlap_stages.engine")
        return BatchTranscriber(self)

    def _install_cuda_graphs(self) -> list[cuda_graphs.ShapeGraphs]:
        if not self.config.funasr.cuda_graphs or self.device.kind != "cuda":
            return []
        graphs = (cuda_graphs.install_punc_graphs(getattr(self.model, "punc_model", None))
                  + cuda_graphs.install_speaker_graphs(getattr(self.model, "spk_model", None)))
        if graphs:
            self.patches.append(f"cuda_graphs({', '.join(g.name for g in graphs)})")
        return graphs

    def _autocast_encoder(self) -> None:
        """Lower precision (funasr.dtype) for the ASR encoder only, through ``torch.autocast``.

        The encoder holds nearly all of the ASR arithmetic. Autocast over the whole of ``generate``
        breaks FunASR's CIF predictor (``index_put`` of bf16 into a float32 tensor), and FunASR's own
        ``bf16=True`` crashes in the encoder's LayerNorm; scoping autocast to the encoder and
        returning float32 runs. The wrapper reads the dtype at each call; float32 passes straight through.
        """
        import torch

        encoder = getattr(self.model.model, "encoder", None)
        if encoder is None:
            return
        real = encoder.forward

        @functools.wraps(real)
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.device.dtype == "float32":
                return real(*args, **kwargs)
            with torch.autocast(device_type=self.device.kind, dtype=getattr(torch, self.device.dtype)):
                out = real(*args, **kwargs)
            as_float = (lambda t: t.float() if torch.is_tensor(t) and t.is_floating_point() else t)
            return tuple(as_float(o) for o in out) if isinstance(out, tuple) else as_float(out)

        encoder.forward = forward

    def generate(self, samples: np.ndarray, *, diarize: bool = True, speaker_bounds: tuple[int, int] | None = None,
                 **kwargs: Any) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """FunASR's ``generate`` on decoded samples, serialised, in the configured precision.

        ``diarize=False`` skips the speaker model for this call; ``speaker_bounds`` (min, max) bound
        CAM++'s estimated count for this call. Returns the output and the seconds spent per stage
        (vad, asr, spk, punc; through the engine's stages also assemble, with spk beside asr, so the
        stages add up to more than the call)."""
        with self._lock:
            try:
                if diarize and self.stages_side_by_side is not None:
                    out = self.stages_side_by_side.generate_locked(samples, speaker_bounds=speaker_bounds, **kwargs)
                    if out is not None:
                        return out
                return self.generate_locked(samples, diarize=diarize, speaker_bounds=speaker_bounds, **kwargs)
            finally:
                after_job(self.device.device)

    def generate_locked(self, samples: np.ndarray, *, diarize: bool = True,
                        speaker_bounds: tuple[int, int] | None = None,
                        **kwargs: Any) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """`generate` for a caller that already holds the model's lock (the batch engine's assembly)."""
        self._stage_times.clear()
        seed_clustering(self.config.funasr.seed)
        spk_model = self.model.spk_model
        try:
            if not diarize:
                self.model.spk_model = None  # FunASR's test for its speaker stage; restored below
            if self.clustering is not None:
                self.clustering.bounds = speaker_bounds
            return self.model.generate(input=samples, **kwargs), dict(self._stage_times)
        finally:
            self.model.spk_model = spk_model
            if self.clustering is not None:
                self.clustering.bounds = None

    def warm_up(self) -> float:
        started = time.perf_counter()
        self.generate(warmup_clip(), **build_generate_kwargs(self.config))
        return time.perf_counter() - started

    def check_options(self, options: TranscribeOptions) -> TranscribeOptions:
        """Refuse contradictory options, and bounds this engine cannot honour, before any work."""
        problems = option_problems(speakers=options.speakers, min_speakers=options.min_speakers,
                                   max_speakers=options.max_speakers, diarize=options.diarize)
        if options.speaker_bounds and self.clustering is None:
            problems.append("min_speakers/max_speakers need a CAM++ speaker model (funasr.spk_model) "
                            f"on funasr {', '.join(cluster_bounds.VERIFIED_FUNASR)}")
        if problems:
            raise InvalidOptionsError("; ".join(problems))
        return options

    def transcribe(self, path: str | Path, *, speakers: int | None = None, min_speakers: int | None = None,
                   max_speakers: int | None = None, diarize: bool = True, hotwords: Sequence[str] | None = None,
                   batch_size_s: int | None = None, word_timestamps: bool = False, use_cache: bool = True,
                   extension: str | None = None, source_name: str | None = None) -> Result:
        """Transcribe one file. Raises `AudioError` for bad input, `InvalidOptionsError` for bad options,
        `TranscriptionError` if FunASR fails. With ``cache.enabled``, the same bytes and options come
        from the result cache (``cached: true``) unless ``use_cache=False``."""
        started = time.perf_counter()
        path = Path(path)
        options = self.check_options(TranscribeOptions.of(
            speakers=speakers, min_speakers=min_speakers, max_speakers=max_speakers, diarize=diarize,
            hotwords=hotwords, batch_size_s=batch_size_s, word_timestamps=word_timestamps))
        name = source_name or path.name
        allowed, max_mb = self.config.input.allowed_extensions, self.config.input.max_file_mb
        key = None
        if self.cache is not None and use_cache:
            check_file(path, allowed, max_mb, extension=extension)
            key = self._cache_key(path, (extension or path.suffix).lower(), options)
            hit = self.cache.get(key)
            if hit is not None:
                logger.info("{}: result cache hit", name)
                return dataclasses.replace(hit, source=name)
        audio = load_audio(path, allowed, max_mb, extension=extension)
        decoded = time.perf_counter()
        result = self._transcribe(audio, options, name, started, decoded - started)
        if key is not None and self.cache is not None:
            self.cache.put(key, result)
        return result

    def transcribe_audio(self, audio: Audio, *, source_name: str | None = None, started: float | None = None,
                         decode_time: float = 0.0, **options: Any) -> Result:
        """Transcribe decoded audio (options as `transcribe`, less the cache, which keys on file bytes)."""
        started = time.perf_counter() if started is None else started
        return self._transcribe(audio, self.check_options(TranscribeOptions.of(**options)), source_name, started,
                                decode_time)

    def _generate_kwargs(self, options: TranscribeOptions, batch_size_s: int | None = None) -> dict[str, Any]:
        return build_generate_kwargs(self.config, speakers=options.speakers, hotwords=options.hotwords,
                                     batch_size_s=batch_size_s or options.batch_size_s,
                                     word_timestamps=options.word_timestamps)

    def _cache_key(self, path: Path, extension: str, options: TranscribeOptions) -> str:
        return cache_key(file_digest(path), extension,
                         {"options": options.to_dict(), "generate": self._generate_kwargs(options)},
                         self._engine_identity)

    def _transcribe(self, audio: Audio, options: TranscribeOptions, source_name: str | None, started: float,
                    decode_time: float) -> Result:
        if options.hotwords and not self.accepts_hotwords and not self._hotwords_warned:
            self._hotwords_warned = True
            logger.warning("hotwords ignored: the ASR model ({}) does not use them; only SeACo and contextual "
                           "Paraformer models do (e.g. funasr.model: paraformer-zh)", type(self.model.model).__name__)
        gen_start = time.perf_counter()
        try:
            crash_point("generate")  # test hook (reliability suite: a model call that never returns)
            output, stages, device, fallback = self._generate_with_fallback(audio.samples, options, source_name)
        except TranscribeError:
            raise
        except Exception as e:  # noqa: BLE001 - surfaced as a typed, retryable error with the cause
            if options.speakers and "n_clusters" in str(e):  # sklearn's k-means: more clusters than CAM++ windows
                raise SpeakerCountError(
                    f"{source_name or 'input'}: cannot split into {options.speakers} speakers ({e}); give fewer "
                    "speakers, or leave the count out for automatic detection") from e
            raise TranscriptionError(f"FunASR failed on {source_name or 'input'}: {type(e).__name__}: {e}") from e
        finished = time.perf_counter()
        return self.result_from_output(output, audio, elapsed=finished - started, source_name=source_name,
                                       timings={"decode": decode_time, "generate": finished - gen_start, **stages},
                                       device=device, fallback=fallback, words=options.word_timestamps)

    def result_from_output(self, output: list[dict[str, Any]], audio: Audio, *, elapsed: float,
                           source_name: str | None, timings: dict[str, float], device: str | None = None,
                           fallback: dict[str, Any] | None = None, words: bool = False) -> Result:
        """A `Result` from FunASR's ``generate`` output for `audio` (shared with the batch engine)."""
        text, segments, speakers_found = segments_from_funasr(output, audio.duration, words=words)
        return Result(
            text=text, segments=segments, speakers=speakers_found, duration=round(audio.duration, 3),
            processing_time=round(elapsed, 4), rtf=round(elapsed / audio.duration, 5) if audio.duration else 0.0,
            device=device or self.device.device, models=dict(self.models),
            timings={stage: round(t, 4) for stage, t in timings.items()},
            source=source_name, fallback=fallback,
        )

    def _run_on(self, engine: "Transcriber", samples: np.ndarray, options: TranscribeOptions,
                batch_size_s: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
        crash_point("model")  # test hook: TRANSCRIBE_OOM_AT=model fails an attempt as a full GPU would
        return engine.generate(samples, diarize=options.diarize, speaker_bounds=options.speaker_bounds,
                               **self._generate_kwargs(options, batch_size_s))

    def _generate_with_fallback(self, samples: np.ndarray, options: TranscribeOptions, source_name: str | None,
                                ) -> tuple[list[dict[str, Any]], dict[str, float], str, dict[str, Any] | None]:
        """Run on this engine's device; on a device failure (out of memory, a missing operator) retry this
        job as `fallback.retry_plan` says. Returns output, stage times, the device used and the fallback
        record (None when the first try ran)."""
        batch = options.batch_size_s or self.config.funasr.batch_size_s
        try:
            return (*self._run_on(self, samples, options, batch), self.device.device, None)
        except TranscribeError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified here; anything else propagates unchanged
            reason = device_failure_reason(exc) if self.config.funasr.runtime_fallback else None
            plan = retry_plan(reason, self.device.device, batch) if reason else []
            if not plan:
                raise
            first = exc
        for attempt in plan:
            release_device_memory(self.device.device)
            logger.warning("{} on {} ({}: {}): retrying this job on {} with batch_size_s {}", source_name or "input",
                           self.device.device, reason, type(first).__name__, attempt.device, attempt.batch_size_s)
            engine = self if attempt.device == self.device.device else self._cpu_engine()
            try:
                output, stages = self._run_on(engine, samples, options, attempt.batch_size_s)
            except TranscribeError:
                raise
            except Exception as exc:  # noqa: BLE001 - a device failure moves on to the next attempt
                if device_failure_reason(exc) is None:
                    raise
                continue
            fallback = {"reason": reason, "message": f"{type(first).__name__}: {str(first)[:500]}",
                        "from": self.device.device, "to": engine.device.device,
                        "batch_size_s": attempt.batch_size_s}
            return output, stages, engine.device.device, fallback
        raise first

    def _forward_progress(self, stage: str) -> None:
        if self.on_progress is not None:
            self.on_progress(stage)

    def _cpu_engine(self) -> "Transcriber":
        """The CPU copy of the models for jobs that fall back (built once, on first need, then kept)."""
        with self._cpu_copy_lock:
            if self._cpu_copy is None:
                logger.warning("building a CPU copy of the models for jobs that {} cannot run", self.device.device)
                choice = DeviceChoice("cpu", "float32", f"runtime fallback from {self.device.device}",
                                      self.device.device, fell_back=True)
                # no cache, and stages one after another (on a CPU they only compete for the same cores)
                no_cache = self.config.model_copy(update={
                    "cache": self.config.cache.model_copy(update={"enabled": False}),
                    "funasr": self.config.funasr.model_copy(update={"overlap_stages": False})})
                cpu = Transcriber(no_cache, choice, check_network=lambda _hub: True)
                cpu.on_progress = self._forward_progress
                self._cpu_copy = cpu
            return self._cpu_copy


def seed_clustering(seed: int | None) -> None:
    """Reset numpy's global random state to `seed` (``funasr.seed``) before a job; None: leave it alone.

    FunASR's speaker clustering calls scikit-learn's ``k_means`` without a ``random_state``
    (funasr/models/campplus/cluster_backend.py), so the starting centres, and with them the labels of an
    ambiguous recording, depend on whatever drew from that state earlier in the process. Bare FunASR
    seeded the same way before ``generate`` gives the same labels (tests/test_parity.py).
    """
    if seed is not None:
        np.random.seed(seed)


def share_main_malloc_arena() -> bool:
    """Make threads allocate from glibc's main malloc arena (``mallopt(M_ARENA_MAX, 1)``).

    Lock mode runs FunASR in a worker thread. glibc gives each new thread its own arena, whose heaps
    are capped at 64 MB, so the tens-of-MB activations of CAM++ and the encoder are mmapped and
    page-faulted afresh on every call there, while the main arena reuses them: measured on the
    2-core machine, the same 60 s job took 8.6 s in a thread against 5.7 s in the main thread, and
    6.8 s in the thread with one arena. Must run before the thread first allocates. No-op off glibc.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-8, 1))  # M_ARENA_MAX = -8 in glibc's malloc.h
    except (OSError, AttributeError):
        return False


class AsyncTranscriber:
    """Lock mode: one in-process model shared by coroutines.

    ``async with AsyncTranscriber.from_config(cfg) as t: result = await t.transcribe(path, speakers=2)``

    Calls queue on an ``asyncio.Lock``; the model runs in a single worker thread. A caller cancelled
    while waiting never takes the lock. A caller cancelled (or timed out) while its call runs gets
    its `CancelledError` (or `TranscriptionTimeout`) at once, but the lock is released only when the
    model call has really returned — FunASR cannot be interrupted mid-call, and releasing early
    would let the next call overlap it.
    """

    def __init__(self, transcriber: Transcriber) -> None:
        self.transcriber = transcriber
        self._lock = asyncio.Lock()
        share_main_malloc_arena()  # before the model thread exists: see the function
        # OpenMP's thread count is per calling thread: the model thread sets the budget for itself too
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="funasr", initializer=limit_cpu_threads,
                                            initargs=(transcriber.config.funasr.ncpu,))

    @classmethod
    def from_config(cls, config: Config | dict[str, Any] | str | os.PathLike[str]) -> "AsyncTranscriber":
        """``async with AsyncTranscriber.from_config(x) as t``: x is a `Config`, a dict or a config file path."""
        return _Pending(as_config(config))  # type: ignore[return-value]

    @classmethod
    async def create(cls, config: Config | dict[str, Any] | str | os.PathLike[str]) -> "AsyncTranscriber":
        """Build the model in a thread (seconds to minutes) without blocking the event loop."""
        transcriber = await asyncio.get_running_loop().run_in_executor(None, Transcriber, as_config(config))
        return cls(transcriber)

    async def __aenter__(self) -> "AsyncTranscriber":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        async with self._lock:  # wait for the call in flight
            self._executor.shutdown(wait=True)

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    async def transcribe(self, path: str | Path, *, timeout: float | None = None, **options: Any) -> Result:
        """Transcribe `path` (options as `Transcriber.transcribe`); `timeout` in seconds stops waiting."""
        return await self._run(functools.partial(self.transcriber.transcribe, path, **options), timeout)

    async def _run(self, call: Callable[[], Result], timeout: float | None) -> Result:
        loop = asyncio.get_running_loop()
        await self._lock.acquire()
        try:
            future = loop.run_in_executor(self._executor, call)
        except BaseException:
            self._lock.release()
            raise
        future.add_done_callback(self._release)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            raise TranscriptionTimeout(f"transcription did not finish within {timeout:g}s") from None

    def _release(self, future: asyncio.Future[Result]) -> None:
        self._lock.release()
        if not future.cancelled():
            future.exception()  # retrieved here: an abandoned call's error is not "never retrieved"


class _Pending:
    """`AsyncTranscriber.from_config(cfg)` as an async context manager that builds off the loop."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._instance: AsyncTranscriber | None = None

    async def __aenter__(self) -> AsyncTranscriber:
        self._instance = await AsyncTranscriber.create(self._config)
        return self._instance

    async def __aexit__(self, *exc: object) -> None:
        if self._instance is not None:
            await self._instance.aclose()
