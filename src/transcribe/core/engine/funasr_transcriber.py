"""The engine: one FunASR `AutoModel` (ASR + VAD + punctuation + CAM++) and the calls around it.

`Transcriber` is synchronous and guards its model with a thread lock (FunASR's ``generate`` is
not thread-safe, FunASR #2475). `AsyncTranscriber` is lock mode: the same engine behind an
``asyncio.Lock``, ``generate`` running in a worker thread so the event loop keeps serving.

Fast diarization: FunASR cuts each VAD segment into 1.5 s CAM++ windows (all padded to the same
length) and then embeds them one forward call per window. Raising the speaker sub-model's batch
size makes FunASR's own ``inference`` embed them in one batched call instead: the same windows,
the same model, the same clustering, so the same labels (tests/test_parity.py checks it against
bare FunASR). It applies to CAM++ only; any other speaker model runs FunASR's path, logged once.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from loguru import logger

from transcribe.config import Config
from transcribe.core.engine import model_store
from transcribe.core.engine.audio import SAMPLE_RATE, Audio, load_audio
from transcribe.core.engine.device_manager import DeviceChoice, DeviceManager
from transcribe.core.engine.patches import (
    after_job,
    apply_patches,
    patched_model_kwargs,
)
from transcribe.core.engine.result import Result, segments_from_funasr
from transcribe.core.errors import (
    ModelLoadError,
    TranscribeError,
    TranscriptionError,
    TranscriptionTimeout,
)
from transcribe.core.fault_injection import crash_point

FAST_DIARIZATION_BATCH = 256  # CAM++ windows per forward call (1.5 s each: ~150 frames x 80 mels)
FAST_DIARIZATION_MODELS = ("CAMPPlus",)


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
                          batch_size_s: int | None = None) -> dict[str, Any]:
    """The keyword arguments for ``generate(...)`` besides ``input``: pure, shared with the parity tests."""
    kwargs: dict[str, Any] = {"batch_size_s": batch_size_s or cfg.funasr.batch_size_s, "sentence_timestamp": True}
    if speakers:
        kwargs["preset_spk_num"] = int(speakers)
    if hotwords:
        kwargs["hotword"] = " ".join(hotwords)
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
        if config.funasr.fast_cif:
            from importlib.metadata import version

            from transcribe.core.engine import fast_cif

            self.patches += [f"fast_cif.{name}" for name in fast_cif.install(version("funasr"))]
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
        logger.info("models loaded in {:.1f}s on {} (patches: {}; fast diarization: {})", self.load_time,
                    self.device.device, ", ".join(self.patches) or "none", self.fast_diarization)

    @classmethod
    def from_config(cls, config: Config) -> "Transcriber":
        return cls(config)

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

    def generate(self, samples: np.ndarray, **kwargs: Any) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """FunASR's ``generate`` on decoded samples, serialised, in the configured precision.

        Returns the output and the seconds spent per stage (vad, asr, punc, spk)."""
        with self._lock:
            self._stage_times.clear()
            try:
                return self.model.generate(input=samples, **kwargs), dict(self._stage_times)
            finally:
                after_job(self.device.device)

    def warm_up(self) -> float:
        started = time.perf_counter()
        self.generate(warmup_clip(), **build_generate_kwargs(self.config))
        return time.perf_counter() - started

    def transcribe(self, path: str | Path, *, speakers: int | None = None, hotwords: Sequence[str] | None = None,
                   batch_size_s: int | None = None, extension: str | None = None,
                   source_name: str | None = None) -> Result:
        """Transcribe one file. Raises `AudioError` for bad input, `TranscriptionError` if FunASR fails."""
        started = time.perf_counter()
        audio = load_audio(path, self.config.input.allowed_extensions, self.config.input.max_file_mb,
                           extension=extension)
        decoded = time.perf_counter()
        return self.transcribe_audio(audio, speakers=speakers, hotwords=hotwords, batch_size_s=batch_size_s,
                                     source_name=source_name or Path(path).name, started=started,
                                     decode_time=decoded - started)

    def transcribe_audio(self, audio: Audio, *, speakers: int | None = None, hotwords: Sequence[str] | None = None,
                         batch_size_s: int | None = None, source_name: str | None = None,
                         started: float | None = None, decode_time: float = 0.0) -> Result:
        started = time.perf_counter() if started is None else started
        kwargs = build_generate_kwargs(self.config, speakers=speakers, hotwords=hotwords, batch_size_s=batch_size_s)
        gen_start = time.perf_counter()
        try:
            crash_point("generate")  # test hook (reliability suite: a model call that never returns)
            output, stages = self.generate(audio.samples, **kwargs)
        except TranscribeError:
            raise
        except Exception as e:  # noqa: BLE001 - surfaced as a typed, retryable error with the cause
            raise TranscriptionError(f"FunASR failed on {source_name or 'input'}: {type(e).__name__}: {e}") from e
        finished = time.perf_counter()
        return self.result_from_output(output, audio, elapsed=finished - started, source_name=source_name,
                                       timings={"decode": decode_time, "generate": finished - gen_start, **stages})

    def result_from_output(self, output: list[dict[str, Any]], audio: Audio, *, elapsed: float,
                           source_name: str | None, timings: dict[str, float]) -> Result:
        """A `Result` from FunASR's ``generate`` output for `audio` (shared with the batch engine)."""
        text, segments, speakers_found = segments_from_funasr(output, audio.duration)
        return Result(
            text=text, segments=segments, speakers=speakers_found, duration=round(audio.duration, 3),
            processing_time=round(elapsed, 4), rtf=round(elapsed / audio.duration, 5) if audio.duration else 0.0,
            device=self.device.device, models=dict(self.models),
            timings={stage: round(t, 4) for stage, t in timings.items()},
            source=source_name,
        )


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
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="funasr")

    @classmethod
    def from_config(cls, config: Config) -> "AsyncTranscriber":
        return _Pending(config)  # type: ignore[return-value]

    @classmethod
    async def create(cls, config: Config) -> "AsyncTranscriber":
        """Build the model in a thread (seconds to minutes) without blocking the event loop."""
        transcriber = await asyncio.get_running_loop().run_in_executor(None, Transcriber, config)
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
