"""The batch engine: many jobs through one loaded FunASR model, the GPU's work batched across them.

``BatchTranscriber(transcriber).transcribe_many(items) -> list[Result | Exception]``

FunASR's ``AutoModel.inference_with_vad`` handles one recording at a time: VAD, then ASR on that
recording's segments in length-sorted batches, one CAM++ call per segment, punctuation, clustering
and assembly. On a GPU most of that time is launches and host syncs of small calls, so several jobs
in parallel only time-slice the card. The engine splits the pipeline at the model calls:

1. decode every job (threads), then run FunASR's VAD call per job;
2. ASR over the speech segments of *all* jobs, length-sorted, in padded batches of at most
   ``funasr.engine_batch_s`` seconds (the job's own ``batch_size_s`` when it runs alone, so a lone job
   is batched exactly as FunASR batches it), through `batched_asr.decode_asr_batch` and
   `finish_asr_batch` (FunASR's own model modules; the per-utterance Python on host copies); with
   ``funasr.overlap_stages`` on (CUDA), each batch's BiCif timestamps and text finish on a side thread
   and CUDA stream while the next batch decodes (side_stream.py);
3. CAM++ on every 1.5 s window of every segment of every job, ``funasr.engine_spk_batch`` windows
   per forward call, features computed in CPU threads (a job alone: FunASR's calls, segment by segment);
   with the overlap on, on its own side thread and stream while step 2 runs;
4. per job, FunASR's own ``inference_with_vad`` *replays* those results: its calls to the VAD, ASR
   and speaker models are answered from step 1-3 in the order it makes them, while punctuation,
   timestamp merging, sentence splitting, clustering and every other line of its assembly run as
   shipped. So a job alone gives bare FunASR's result, and a job batched with others differs only
   where padding changes a float (tests/test_batch_engine.py checks both).

Each job gets its own `Result` or its own exception: a batch that fails is retried job by job, so
one bad job cannot fail the others. Models or options the engine does not cover (another ASR class,
beam search, ``merge_vad``, ...) run FunASR's whole path for that job, logged once.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger

from transcribe.core.engine.audio import SAMPLE_RATE, Audio, load_audio
from transcribe.core.engine.batched_asr import (
    UtteranceAsr,
    asr_support,
    decode_asr_batch,
    empty_batch_output,
    finish_asr_batch,
)
from transcribe.core.engine.funasr_transcriber import Transcriber, build_generate_kwargs
from transcribe.core.engine.patches import after_job
from transcribe.core.engine.result import Result
from transcribe.core.engine.side_stream import (
    SideResult,
    SideStream,
    keep_for_caller,
    on_side_thread,
    overlap_enabled,
)
from transcribe.core.errors import TranscribeError, TranscriptionError

UNSUPPORTED_OPTIONS = ("merge_vad",)  # inference_with_vad options whose effect the engine does not replay
# The generate options a job routed from the Transcriber may carry (build_generate_kwargs): what the replay
# reproduces. Others (return_raw_text for word timestamps, funasr.generate_kwargs extras) run FunASR's path.
ENGINE_GENERATE_KWARGS = frozenset({"batch_size_s", "sentence_timestamp", "preset_spk_num", "hotword"})
MAX_PENDING_TIMESTAMPS = 4  # decoded ASR batches waiting for the timestamp predictor (bounds GPU memory)


@dataclass
class EngineJob:
    """One job for the engine: a file (decoded here) or decoded audio, and its options."""

    source: str | Path | Audio
    speakers: int | None = None
    hotwords: Sequence[str] | None = None
    batch_size_s: int | None = None
    extension: str | None = None
    source_name: str | None = None


@dataclass
class _Utterance:
    """One VAD segment of one job, in the job's length-sorted order (FunASR's order)."""

    job: int
    start_ms: int
    end_ms: int
    samples: Any  # 1-D tensor: a slice of the job's audio
    asr: UtteranceAsr | None = None
    spk: torch.Tensor | None = None

    @property
    def length_ms(self) -> int:
        return self.end_ms - self.start_ms


@dataclass
class _PendingTimestamps:
    """A decoded ASR batch whose timestamps and text are being finished on the side stream."""

    batch: list[_Utterance]
    kwargs: dict[str, Any]
    result: SideResult


@dataclass
class _Job:
    index: int
    item: EngineJob
    started: float
    audio: Audio | None = None
    error: BaseException | None = None
    gen_kwargs: dict[str, Any] = field(default_factory=dict)
    asr_kwargs: dict[str, Any] = field(default_factory=dict)
    vad_output: list[dict[str, Any]] = field(default_factory=list)
    utterances: list[_Utterance] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    fallback: str | None = None
    result: Result | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.audio is not None

    @property
    def group(self) -> tuple[Any, ...]:
        """Jobs whose segments may share an ASR batch: the same decoding options."""
        return (self.asr_kwargs.get("hotword"),)


class BatchTranscriber:
    """Many jobs through one `Transcriber`'s loaded model, with the model calls batched across jobs."""

    def __init__(self, transcriber: Transcriber, *, pad_batches: bool | None = None,
                 overlap: bool | None = None) -> None:
        """`pad_batches`: ASR segments in padded batches (default: off the CPU only, as FunASR does);
        `overlap`: stages side by side (default: ``funasr.overlap_stages``)."""
        self.transcriber = transcriber
        self.model = transcriber.model
        self.config = transcriber.config
        self.batch_ms = int(self.config.funasr.engine_batch_s * 1000)
        self.spk_batch = self.config.funasr.engine_spk_batch
        self._logged: set[str] = set()
        # FunASR batches ASR segments only off the CPU (on the CPU each segment runs alone).
        self.pad_batches = self.model.kwargs.get("device", "cpu") != "cpu" if pad_batches is None else pad_batches
        device = transcriber.device.device
        ncpu = self.config.funasr.ncpu
        # funasr.overlap_stages: CAM++ beside ASR, and each ASR batch's timestamp predictor beside the next
        # batch's decoding, on their own threads and CUDA streams (core/engine/side_stream.py)
        self.overlap = overlap_enabled(self.config.funasr.overlap_stages, device) if overlap is None else overlap
        self._speaker_side = SideStream(device, ncpu, "engine-spk") if self.overlap else None
        self._timestamp_side = SideStream(device, ncpu, "engine-ts") if self.overlap else None

    # -- public API ---------------------------------------------------------------------------------
    def transcribe_many(self, items: Sequence[EngineJob]) -> list[Result | BaseException]:
        """Transcribe every item; each gets its `Result` or the exception that failed it (never raises)."""
        now = time.perf_counter()
        jobs = [_Job(i, item, now) for i, item in enumerate(items)]
        self._decode(jobs)
        with self.transcriber._lock:  # one model: FunASR's calls are not thread-safe
            try:
                self._run_locked(jobs)
            finally:
                after_job(self.transcriber.device.device)
        for job in jobs:  # outside the lock: Transcriber takes it per call
            if job.ok and job.fallback is not None:
                self._guard(job, "fallback", self._fallback, job)
        return [job.error if job.error is not None else job.result for job in jobs]

    def transcribe(self, path: str | Path, **options: Any) -> Result:
        """One job (same options as `Transcriber.transcribe`); raises its error."""
        [out] = self.transcribe_many([EngineJob(path, **options)])
        if isinstance(out, BaseException):
            raise out
        return out

    # -- stages -------------------------------------------------------------------------------------
    def _decode(self, jobs: list[_Job]) -> None:
        inp = self.config.input

        def decode(job: _Job) -> None:
            t0 = time.perf_counter()
            try:
                job.audio = load_audio(job.item.source, inp.allowed_extensions, inp.max_file_mb,
                                       extension=job.item.extension)
            except Exception as e:  # noqa: BLE001 - the job's own failure (AudioError names the fix)
                job.error = e
            job.timings["decode"] += time.perf_counter() - t0

        todo = [j for j in jobs if not isinstance(j.item.source, Audio)]
        for job in jobs:
            if isinstance(job.item.source, Audio):
                job.audio = job.item.source
        if len(todo) > 1:
            with ThreadPoolExecutor(max_workers=min(len(todo), self.config.funasr.ncpu)) as ex:
                list(ex.map(decode, todo))
        elif todo:
            decode(todo[0])

    def _run_locked(self, jobs: list[_Job]) -> None:
        for job in jobs:
            if job.ok:
                self._guard(job, "vad", self._vad, job)
        batched = [j for j in jobs if j.ok and j.fallback is None]
        self._run_stages(batched)
        for job in jobs:
            if job.ok and job.fallback is None:
                self._guard(job, "assemble", self._assemble, job)

    def _run_stages(self, batched: list[_Job]) -> None:
        """ASR and CAM++ for jobs past VAD: side by side with the overlap on, else one after the other."""
        diarize = getattr(self.model, "spk_model", None) is not None
        speakers: SideResult | None = None
        if diarize and self._speaker_side is not None:  # CAM++ reads only the VAD segments' audio
            speakers = self._speaker_side.submit(self._speakers, [j for j in batched if j.ok])
        try:
            self._asr(batched)
        finally:  # the side thread is done with the model before this returns, whatever happened
            if speakers is not None:
                self._settle_speakers(speakers, batched)
        if diarize and speakers is None:
            self._speakers([j for j in batched if j.ok])

    def _settle_speakers(self, speakers: SideResult, jobs: list[_Job]) -> None:
        """Wait for the side thread's embeddings; if it failed there (outside any one job's batch), embed
        again here, where a failure is attributed to its job."""
        try:
            speakers.get()
        except Exception as e:  # noqa: BLE001 - retried below, batch by batch with the usual guard
            logger.warning("speaker embeddings failed on the side stream ({}: {}); running them again",
                           type(e).__name__, e)
            self._speakers([j for j in jobs if j.ok])
            return
        keep_for_caller(u.spk for j in jobs for u in j.utterances if u.spk is not None)

    def close(self) -> None:
        """Stop the side threads (an engine kept for a process's life need not)."""
        for side in (self._speaker_side, self._timestamp_side):
            if side is not None:
                side.close()

    def _guard(self, job: _Job, stage: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except TranscribeError as e:
            job.error = e
        except Exception as e:  # noqa: BLE001 - one job's failure stays that job's, typed as Transcriber's
            name = job.item.source_name or job.index
            logger.warning("job {} failed in {}: {}: {}", name, stage, type(e).__name__, e)
            job.error = TranscriptionError(f"FunASR failed on {job.item.source_name or 'input'} ({stage}): "
                                           f"{type(e).__name__}: {e}")
            job.error.__cause__ = e

    def _progress(self, stage: str) -> None:
        # from the caller's thread only: the worker's status shows the stage its own thread is in
        if self.transcriber.on_progress is not None and not on_side_thread():
            self.transcriber.on_progress(stage)

    def _vad(self, job: _Job) -> None:
        """FunASR's VAD call for the job, with the runtime options ``inference_with_vad`` sets."""
        am, item = self.model, job.item
        cfg = dict(job.gen_kwargs) or build_generate_kwargs(self.config, speakers=item.speakers,
                                                            hotwords=item.hotwords, batch_size_s=item.batch_size_s)
        job.gen_kwargs = dict(cfg)
        unsupported = [k for k in UNSUPPORTED_OPTIONS if cfg.get(k)]
        am._reset_runtime_configs()
        if am.vad_model is None or unsupported:
            job.fallback = f"option {unsupported[0]}" if unsupported else "no VAD model"
            return
        if am.spk_model is not None and "output_timestamp" not in cfg:
            cfg["output_timestamp"] = True
            cfg["return_time_stamps"] = True
        kwargs = am.kwargs
        am._merge_runtime_config(kwargs, cfg)
        kwargs["batch_size"] = max(int(kwargs.get("batch_size_s", 300)) * 1000, 1)
        reason = asr_support(am.model, kwargs)
        if reason:
            job.fallback = reason
            return
        job.asr_kwargs = dict(kwargs)
        t0 = time.perf_counter()  # the progress report ("vad") comes from the Transcriber's stage timer
        am._reset_runtime_configs()
        job.vad_output = am.inference(job.audio.samples, model=am.vad_model, kwargs=am.vad_kwargs, **cfg)
        job.timings["vad"] += time.perf_counter() - t0
        [vad] = job.vad_output
        for start_ms, end_ms, piece in funasr_segments(job.audio.samples, vad["value"], frontend=kwargs["frontend"],
                                                       audio_fs=kwargs.get("fs", 16000)):
            job.utterances.append(_Utterance(job.index, int(start_ms), int(end_ms), piece))

    def _asr(self, jobs: list[_Job]) -> None:
        """ASR over the segments of all jobs, grouped by decoding options, in length-sorted batches."""
        groups: dict[tuple[Any, ...], list[_Job]] = defaultdict(list)
        for job in jobs:
            groups[job.group].append(job)
        for group_jobs in groups.values():
            utts = sorted((u for j in group_jobs for u in j.utterances), key=lambda u: (u.length_ms, u.job))
            if not utts:
                continue
            kwargs = group_jobs[0].asr_kwargs
            if len(group_jobs) == 1:  # alone: exactly FunASR's batches
                batch_ms = kwargs["batch_size"]
            else:
                batch_ms = self.batch_ms
            threshold_ms = int(kwargs.get("batch_size_threshold_s", 60)) * 1000
            by_index = {j.index: j for j in group_jobs}
            self._progress("asr")
            pending: list[_PendingTimestamps] = []
            try:
                for batch in funasr_batches(utts, batch_ms if self.pad_batches else 0, threshold_ms):
                    self._run_batch(batch, by_index, "asr", functools.partial(self._asr_batch, kwargs=kwargs,
                                                                              pending=pending))
                    while len(pending) > MAX_PENDING_TIMESTAMPS:
                        self._settle_timestamps(pending.pop(0), by_index)
            finally:  # taken (or waited for) before this returns, whatever happened
                while pending:
                    self._settle_timestamps(pending.pop(0), by_index)

    def _asr_batch(self, batch: list[_Utterance], kwargs: dict[str, Any],
                   pending: list[_PendingTimestamps] | None = None) -> None:
        """One ASR batch; with overlap on, its timestamps and text finish on the side stream (`pending`)."""
        decoded = decode_asr_batch(self.model.model, [u.samples for u in batch], kwargs)
        if self._timestamp_side is not None and pending is not None:
            result = self._timestamp_side.submit(finish_asr_batch, decoded, reads=decoded.device_tensors())
            pending.append(_PendingTimestamps(batch, kwargs, result))
            return
        for u, rec in zip(batch, finish_asr_batch(decoded)):
            u.asr = rec

    def _settle_timestamps(self, item: _PendingTimestamps, jobs: dict[int, _Job]) -> None:
        """Take a batch's records from the side stream; if it failed there, run the batch again here (job by
        job if it fails again, as any batch)."""
        t0 = time.perf_counter()
        try:
            records = item.result.get()
        except Exception as e:  # noqa: BLE001 - retried below, where a failure is attributed to its job
            logger.warning("ASR timestamps of a batch failed on the side stream ({}: {}); running it again",
                           type(e).__name__, e)
            self._run_batch(item.batch, jobs, "asr", functools.partial(self._asr_batch, kwargs=item.kwargs))
            return
        for u, rec in zip(item.batch, records):
            u.asr = rec
        self._share_time(item.batch, jobs, "asr", time.perf_counter() - t0)


    def _run_batch(self, batch: list[_Utterance], jobs: dict[int, _Job], stage: str,
                   fn: Callable[[list[_Utterance]], None]) -> None:
        """Run `fn` on a cross-job batch, timing each job's share; if it fails, retry job by job."""
        batch = [u for u in batch if jobs[u.job].ok]
        if not batch:
            return
        self._progress(stage)  # every batch is progress: a long stage never looks stalled to the heartbeat
        t0 = time.perf_counter()
        try:
            fn(batch)
            self._share_time(batch, jobs, stage, time.perf_counter() - t0)
            return
        except Exception as e:  # noqa: BLE001 - find which job it belongs to
            if len({u.job for u in batch}) == 1:
                self._guard(jobs[batch[0].job], stage, _reraise, e)
                return
            logger.warning("a {} batch of {} jobs failed ({}: {}); retrying job by job", stage,
                           len({u.job for u in batch}), type(e).__name__, e)
        for index in sorted({u.job for u in batch}):
            own = [u for u in batch if u.job == index]
            t1 = time.perf_counter()
            self._guard(jobs[index], stage, fn, own)
            jobs[index].timings[stage] += time.perf_counter() - t1

    @staticmethod
    def _share_time(batch: list[_Utterance], jobs: dict[int, _Job], stage: str, seconds: float) -> None:
        total = sum(u.length_ms for u in batch) or 1
        for u in batch:
            jobs[u.job].timings[stage] += seconds * u.length_ms / total

    def _speakers(self, jobs: list[_Job]) -> None:
        """CAM++ on every 1.5 s window of every segment of every job: few large forward calls."""
        by_index = {j.index: j for j in jobs}
        utts = [u for j in jobs for u in j.utterances]
        if not utts:
            return
        self._progress("spk")
        if len(jobs) == 1:  # alone: FunASR's calls (one segment at a time), as the Transcriber makes them
            for u in utts:
                self._run_batch([u], by_index, "spk", self._embed)
            return
        batch: list[_Utterance] = []
        windows = 0
        for u in utts:  # batches of whole segments, about spk_batch windows each
            n = n_windows(len(u.samples))
            if batch and windows + n > self.spk_batch:
                self._run_batch(batch, by_index, "spk", self._embed)
                batch, windows = [], 0
            batch.append(u)
            windows += n
        if batch:
            self._run_batch(batch, by_index, "spk", self._embed)

    def _embed(self, batch: list[_Utterance]) -> None:
        """CAM++ embeddings of the batch's windows. One segment alone is embedded in calls of the
        speaker model's batch size, as ``AutoModel.inference`` makes them (the same shapes, so the
        same floats: with near-identical embeddings, clustering can turn on the last bit)."""
        from funasr.models.campplus.utils import extract_feature, sv_chunk
        from funasr.utils.load_utils import load_audio_text_image_video

        spk, spk_kwargs = self.model.spk_model, self.model.spk_kwargs
        counts, chunks = [], []
        for u in batch:  # as inference_with_vad cuts them
            segs = sv_chunk([[u.start_ms / 1000.0, u.end_ms / 1000.0, np.array(u.samples)]])
            counts.append(len(segs))
            chunks.extend(s[2] for s in segs)
        samples = load_audio_text_image_video(chunks, fs=16000, audio_fs=spk_kwargs.get("fs", 16000),
                                              data_type="sound")
        per_call = max(1, int(spk_kwargs.get("batch_size", 1))) if len(batch) == 1 else len(samples)
        embs = []
        with torch.no_grad():
            for beg in range(0, len(samples), per_call):
                feats = self._features(extract_feature, samples[beg:beg + per_call])
                embs.append(spk.forward(feats.to(device=spk_kwargs["device"]).to(torch.float32)))
        emb = torch.cat(embs, dim=0)
        for u, piece in zip(batch, torch.split(emb, counts)):
            u.spk = piece

    def _features(self, extract_feature: Callable[..., Any], samples: list[Any]) -> torch.Tensor:
        """CAM++'s fbank per window (FunASR's ``extract_feature``), in CPU threads; windows are 1.5 s each."""
        from funasr.models.campplus.utils import pad_list

        workers = max(1, min(self.config.funasr.ncpu, len(samples) // 32))
        if workers == 1:
            return extract_feature(samples)[0]
        parts = np.array_split(np.arange(len(samples)), workers)
        with ThreadPoolExecutor(max_workers=workers) as ex:
            outs = list(ex.map(lambda idx: extract_feature([samples[i] for i in idx])[0], parts))
        return pad_list([f for out in outs for f in out], pad_value=0)

    def _assemble(self, job: _Job) -> None:
        """FunASR's ``generate`` for the job, its VAD/ASR/speaker calls answered from the batches."""
        tr = self.transcriber
        output = self._replayed_output(job)
        finished = time.perf_counter()
        job.result = tr.result_from_output(
            output, job.audio, elapsed=finished - job.started, source_name=job.item.source_name,
            timings={**job.timings, "generate": finished - job.started - job.timings["decode"]})

    def _replayed_output(self, job: _Job, speaker_bounds: tuple[int, int] | None = None) -> list[dict[str, Any]]:
        """FunASR's ``generate`` output for the job (punctuation and assembly run for real), timed."""
        am = self.model
        self._progress("punc")
        t0 = time.perf_counter()
        real = am.inference
        am.inference = Replay(am, job.vad_output, job.utterances, real)
        try:
            output, stages = self.transcriber.generate_locked(job.audio.samples, speaker_bounds=speaker_bounds,
                                                              **job.gen_kwargs)
        finally:
            am.inference = real
        elapsed = time.perf_counter() - t0
        punc = stages.get("punc", 0.0)
        job.timings["punc"] += punc
        job.timings["assemble"] += elapsed - punc
        return output

    def generate_locked(self, samples: np.ndarray, *, speaker_bounds: tuple[int, int] | None = None,
                        **gen_kwargs: Any) -> tuple[list[dict[str, Any]], dict[str, float]] | None:
        """One decoded job through the engine's stages, for the `Transcriber` (which holds the model lock):
        ``Transcriber.generate_locked``'s output and stage times, or None where the engine does not cover
        the job's options (the caller then runs FunASR's path; it builds this engine only for models with a
        speaker model that the engine covers). A failure raises the model's
        own exception, so the caller's device fallback sees an out-of-memory error as such."""
        if not set(gen_kwargs) <= ENGINE_GENERATE_KWARGS:
            return None
        job = _Job(0, EngineJob(source=""), time.perf_counter(), audio=Audio(samples, SAMPLE_RATE, 1),
                   gen_kwargs=dict(gen_kwargs))
        self._vad(job)
        if job.fallback is not None:
            return None
        self._run_stages([job])
        if job.error is not None:  # the model's own exception where `_guard` wrapped one
            raise job.error.__cause__ if isinstance(job.error.__cause__, Exception) else job.error
        output = self._replayed_output(job, speaker_bounds)
        return output, {k: v for k, v in job.timings.items() if k != "decode"}

    def _fallback(self, job: _Job) -> None:
        """FunASR's whole path (the `Transcriber`) for a job the engine does not cover."""
        if job.fallback not in self._logged:
            self._logged.add(job.fallback)
            logger.info("batch engine does not cover {}: those jobs run FunASR's own path", job.fallback)
        item = job.item
        job.result = self.transcriber.transcribe_audio(
            job.audio, speakers=item.speakers, hotwords=item.hotwords, batch_size_s=item.batch_size_s,
            source_name=item.source_name, started=job.started, decode_time=job.timings["decode"])


class Replay:
    """Stands in for ``AutoModel.inference`` while FunASR assembles one job.

    The VAD call gets the job's VAD output; each ASR call gets the next utterances' records in
    FunASR's (length-sorted) order, or FunASR's empty-batch quirk when none of them has a token; each
    speaker call gets the next utterance's embeddings. Any other call (punctuation) runs for real.
    """

    def __init__(self, am: Any, vad_output: list[dict[str, Any]], utterances: list[_Utterance],
                 real: Callable[..., Any]) -> None:
        self.am, self.vad_output, self.real = am, vad_output, real
        self._asr: Iterator[_Utterance] = iter(utterances)
        self._spk: Iterator[_Utterance] = iter(utterances)

    def __call__(self, input: Any, input_len: Any = None, model: Any = None, kwargs: Any = None,
                 **cfg: Any) -> list[dict[str, Any]]:
        am = self.am
        if model is am.vad_model:
            return self.vad_output
        if model is None or model is am.model:
            batch = [next(self._asr) for _ in range(len(input))]
            if max(u.asr.n_tokens for u in batch) < 1:
                return empty_batch_output(am.model)
            return [dict(u.asr.result) for u in batch]
        if model is am.spk_model:
            return [{"spk_embedding": next(self._spk).spk}]
        return self.real(input, input_len=input_len, model=model, kwargs=kwargs, **cfg)


def funasr_batches(utts: list[_Utterance], batch_ms: int, threshold_ms: int) -> Iterator[list[_Utterance]]:
    """Length-sorted utterances cut into batches by ``inference_with_vad``'s rule (padded length x count).

    A segment joins while the batch so far stays under ``batch_ms``; the one that crosses it closes the
    batch, so a batch holds at most ``batch_ms`` plus one segment; segments of ``threshold_ms`` or more
    close a batch at once. ``batch_ms`` 0 gives one utterance per batch (FunASR on the CPU)."""
    n = len(utts)
    if not n:
        return
    if batch_ms:
        batch_ms = max(batch_ms, utts[0].length_ms)
    beg, end, max_len = 0, 1, 0
    for j in range(n):
        length = utts[j].length_ms
        if j < n - 1 and length < threshold_ms and max(max_len, length) * (j + 1 - beg) < batch_ms:
            max_len = max(max_len, length)
            end += 1
            continue
        yield utts[beg:end]
        beg, end, max_len = end, end + 1, length


def funasr_segments(samples: Any, vad_segments: list[list[Any]], *, frontend: Any,
                    audio_fs: int) -> list[tuple[Any, Any, Any]]:
    """(start_ms, end_ms, samples) of each VAD segment of one input as ``inference_with_vad`` cuts them
    (funasr 1.4.16): the input loaded by ``load_audio_text_image_video``, segments sorted by duration
    (a stable sort), each sliced by ``slice_padding_audio_samples``. `frontend` and `audio_fs` are the
    ASR kwargs' ``frontend`` and ``fs``."""
    from funasr.utils.load_utils import load_audio_text_image_video
    from funasr.utils.vad_utils import slice_padding_audio_samples

    fs = frontend.fs if hasattr(frontend, "fs") else 16000
    speech = load_audio_text_image_video(samples, fs=fs, audio_fs=audio_fs)
    ordered = sorted([(seg, i) for i, seg in enumerate(vad_segments)], key=lambda x: x[0][1] - x[0][0])
    out = []
    for seg, i in ordered:
        [piece], _ = slice_padding_audio_samples(speech, len(speech), [(seg, i)])
        out.append((seg[0], seg[1], piece))
    return out


def n_windows(n_samples: int, fs: int = 16000) -> int:
    """How many 1.5 s CAM++ windows (0.75 s shift) FunASR's ``sv_chunk`` cuts from a segment."""
    chunk, shift = int(1.5 * fs), int(0.75 * fs)
    count, last_end = 0, 0
    for start in range(0, n_samples, shift):
        end = min(start + chunk, n_samples)
        if end <= last_end:
            break
        last_end = end
        count += 1
    return count


def _reraise(e: BaseException) -> None:
    raise e
