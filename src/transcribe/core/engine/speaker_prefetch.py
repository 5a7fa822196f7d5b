"""CAM++ speaker embeddings made beside FunASR's ASR loop (``funasr.overlap_stages``), for FunASR 1.4.16.

FunASR's ``AutoModel.inference_with_vad`` embeds speakers inside its ASR loop: after each ASR batch it
makes one speaker call per segment of that batch (``sv_chunk`` cuts the segment into 1.5 s windows,
then ``self.inference(windows, model=self.spk_model, kwargs=self.spk_kwargs, **cfg)``), so on a GPU the
CAM++ time adds to the ASR time. Those calls need only each segment's audio, which is known as soon as
the VAD call has returned, and most of the ASR time is spent in calls that release the GIL.

`SpeakerOverlap` is an instance-level wrapper of ``AutoModel.inference`` (around the Transcriber's stage
timer). Within one `Transcriber.generate_locked` call (`job`), when FunASR's VAD call returns with the
speaker model on, it cuts the segments exactly as ``inference_with_vad`` will (`funasr_segments`: the
same audio load, the same length sort, the same slices) and hands them, in that order, to a
`SideStream` (side_stream.py: one thread and, on CUDA, one stream of its own), which makes for each the
speaker call FunASR will make (``sv_chunk``, then the real ``AutoModel.inference`` with ``am.spk_kwargs``
and the same options). Each speaker call FunASR's loop then makes is answered with the next result,
waiting for it if needed, once it is checked to be the same call (window count and lengths, first and
last window, options, the same kwargs dict); any difference stops the thread and runs FunASR's call
for real from then on (logged once). An exception in a background call is raised from the matching
speaker call, so the job fails exactly as it would have. However the job ends, the segments not
started are skipped (a cancel flag checked before each) and the thread is joined before
``generate_locked`` returns: no background work outlives its job. The thread is also joined once the
last segment's result is taken, and before any other sub-model call (punctuation).

The speaker calls touch only ``am.spk_kwargs`` (``_merge_runtime_config``) and CAM++; the main
thread's ASR calls merge into ``am.kwargs``; ``_reset_runtime_configs`` runs only at the start of
``inference_with_vad`` and for calls without kwargs, both before the thread starts. Beyond its own
kwargs, ``AutoModel.inference`` reads only ``am.kwargs["disable_pbar"]`` (true in our build: no tqdm
bars), one dict read. CAM++ draws no random numbers, so numpy's state (the clustering's) is untouched.
The thread gets its own copy of the options and the process's thread budget (``funasr.ncpu``, as the
main thread: CPU numerics depend on it).

On CUDA (CAM++'s parameters on a CUDA device) the side stream's work starts behind an event on the
main stream, each result comes back behind an event the main stream waits on (no host wait), and the
embedding tensors are marked in use on the main stream for the caching allocator (`SideResult.get`,
`keep_for_caller`). CUDA graphs (cuda_graphs.py): a capture asserts in PyTorch's caching allocator if
another thread empties the cache meanwhile, and FunASR calls ``torch.cuda.empty_cache()`` after every
``inference`` call, so the background calls replay CAM++ graphs already recorded but capture none
(`cuda_graphs.captures_off`), and the punctuation graphs are captured after the thread has ended.
``"auto"`` turns it on for CUDA only: on a small CPU both stages are compute-bound and nothing is
gained. Timings: the background call time is the ``spk`` stage, as before; ``spk_wait`` is how long
the main thread waited for an embedding it needed.

The batch engine is unaffected: its assembly replaces ``am.inference`` with its own `Replay`, which
answers the VAD and speaker calls itself, so this wrapper sees no VAD call and starts nothing.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from loguru import logger

from transcribe.core.engine import cuda_graphs
from transcribe.core.engine.side_stream import SideResult, SideStream, keep_for_caller

NAME = "overlap_stages.speakers"
VERIFIED_FUNASR = ("1.4.16",)  # inference_with_vad's segment order and speaker call, read from this version
THREAD_NAME = "speaker-prefetch"


@dataclass(frozen=True)
class Segment:
    """One VAD segment in ``inference_with_vad``'s (length-sorted) order."""

    start_ms: Any  # as the VAD gave it (FunASR divides it by 1000.0 for sv_chunk)
    end_ms: Any
    index: int  # its position in the VAD output
    samples: Any  # 1-D tensor: FunASR's slice of the job's audio


def speaker_windows(start_ms: Any, end_ms: Any, samples: Any) -> list[list[Any]]:
    """The CAM++ windows of one segment as ``inference_with_vad`` cuts them: ``sv_chunk`` of
    ``[[start_s, end_s, samples]]`` (1.5 s windows, 0.75 s shift), each ``[start_s, end_s, samples]``."""
    from funasr.models.campplus.utils import sv_chunk

    return sv_chunk([[start_ms / 1000.0, end_ms / 1000.0, np.array(samples)]])


def funasr_segments(samples: Any, vad_segments: list[list[Any]], *, frontend: Any, audio_fs: int) -> list[Segment]:
    """The segments of one input as ``inference_with_vad`` cuts them (funasr 1.4.16): the input loaded
    by ``load_audio_text_image_video``, segments sorted by duration (a stable sort), each sliced by
    ``slice_padding_audio_samples``. `frontend` and `audio_fs` are the ASR kwargs' ``frontend`` and ``fs``."""
    from funasr.utils.load_utils import load_audio_text_image_video
    from funasr.utils.vad_utils import slice_padding_audio_samples

    fs = frontend.fs if hasattr(frontend, "fs") else 16000
    speech = load_audio_text_image_video(samples, fs=fs, audio_fs=audio_fs)
    ordered = sorted([(seg, i) for i, seg in enumerate(vad_segments)], key=lambda x: x[0][1] - x[0][0])
    out = []
    for seg, i in ordered:
        [piece], _ = slice_padding_audio_samples(speech, len(speech), [(seg, i)])
        out.append(Segment(seg[0], seg[1], i, piece))
    return out


def supported(funasr_version: str) -> bool:
    return funasr_version.split("+")[0] in VERIFIED_FUNASR


@dataclass
class _Embedded:
    """One segment's speaker call, made in the background: what it was given and what it returned."""

    windows: tuple[int, ...]  # each window's length
    first: np.ndarray | None  # copies of the first and last window, to recognise the call
    last: np.ndarray | None
    output: list[dict[str, Any]]

    @classmethod
    def of(cls, speech: list[np.ndarray], output: list[dict[str, Any]]) -> _Embedded:
        return cls(tuple(len(w) for w in speech), np.array(speech[0]) if speech else None,
                   np.array(speech[-1]) if speech else None, output)

    def same_windows(self, speech: Any) -> bool:
        if not isinstance(speech, list) or tuple(len(w) for w in speech) != self.windows:
            return False
        return not speech or (np.array_equal(speech[0], self.first) and np.array_equal(speech[-1], self.last))


class _Prefetch:
    """One job's speaker calls, made ahead on a `SideStream` (one thread, on CUDA one stream) in FunASR's order."""

    def __init__(self, segments: list[Segment], call: Callable[..., list[dict[str, Any]]], spk_model: Any,
                 spk_kwargs: dict[str, Any], cfg: dict[str, Any], device: str, ncpu: int) -> None:
        self.segments, self.call, self.spk_model, self.spk_kwargs, self.cfg = segments, call, spk_model, spk_kwargs, cfg
        self.cancel = threading.Event()  # checked before each segment
        self.seconds = 0.0  # spent in the speaker calls
        self.calls = 0
        self.side = SideStream(device, ncpu, THREAD_NAME)
        self.pending: collections.deque[SideResult] = collections.deque(
            self.side.submit(self._embed, seg) for seg in segments)

    def _embed(self, seg: Segment) -> _Embedded | None:
        """On the side thread: inference_with_vad's lines for one segment of a batch, ahead of it."""
        if self.cancel.is_set():
            return None
        windows = speaker_windows(seg.start_ms, seg.end_ms, seg.samples)
        speech = [w[2] for w in windows]
        t0 = time.perf_counter()
        try:
            with cuda_graphs.captures_off():  # FunASR's main thread empties the CUDA cache meanwhile
                output = self.call(speech, input_len=None, model=self.spk_model, kwargs=self.spk_kwargs, **self.cfg)
        except BaseException:
            self.cancel.set()  # raised from the matching speaker call; nothing after it
            raise
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1
        return _Embedded.of(speech, output)

    def next(self) -> _Embedded | None:
        """The next segment's result (waiting for it; its error raised here), ready for the caller's stream;
        None when every segment's has been taken."""
        if not self.pending:
            return None
        item = self.pending.popleft().get()
        if item is not None:
            keep_for_caller(_tensors(item.output))
        return item

    def stop(self) -> None:
        """Segments not started are skipped; the one running finishes; the thread is joined."""
        self.cancel.set()
        self.side.close()


def _tensors(output: list[dict[str, Any]]) -> Iterator[Any]:
    import torch

    for item in output:
        for value in item.values() if isinstance(item, dict) else ():
            if torch.is_tensor(value):
                yield value


@dataclass
class _Job:
    """One ``generate``: the prefetch started at its VAD call, if any, and how it is going."""

    prefetch: _Prefetch | None = None
    vad_seen: bool = False
    live: bool = False  # speaker calls are answered from the prefetch
    waited: float = 0.0

    def stop(self) -> None:
        """No more answers from the prefetch; the thread cancelled and joined."""
        self.live = False
        self.end_thread()

    def end_thread(self) -> None:
        if self.prefetch is not None:
            self.prefetch.stop()


class SpeakerOverlap:
    """Stands in for one ``AutoModel.inference``: speaker calls answered from a background thread's results.

    `inner` is what ``am.inference`` was (the stage timer, which every other call goes through); `real`
    is ``AutoModel.inference`` itself, which the background thread calls (no progress callbacks from it).
    """

    def __init__(self, am: Any, inner: Callable[..., Any], real: Callable[..., Any], *, times: dict[str, float],
                 progress: Callable[[str], None], ncpu: int) -> None:
        self.am, self.inner, self.real = am, inner, real
        self.times = times
        self.progress = progress
        self.ncpu = ncpu
        self._job: _Job | None = None
        self._warned = False

    @contextlib.contextmanager
    def job(self) -> Iterator[None]:
        """The span of one ``generate`` call (under the model's lock). On exit, however it ends, the
        background thread is stopped and joined, and its time added to the stage times."""
        job = self._job = _Job()
        try:
            yield
        finally:
            self._job = None
            job.stop()
            p = job.prefetch
            if p is not None and p.calls:
                self.times["spk"] = self.times.get("spk", 0.0) + p.seconds
                self.times["spk_wait"] = self.times.get("spk_wait", 0.0) + job.waited

    def __call__(self, input: Any, input_len: Any = None, model: Any = None, kwargs: Any = None, **cfg: Any) -> Any:
        job, am = self._job, self.am
        if job is not None and model is not None:
            if model is am.vad_model and not job.vad_seen:
                job.vad_seen = True
                out = self.inner(input, input_len=input_len, model=model, kwargs=kwargs, **cfg)
                try:
                    self._start(job, input, input_len, out, cfg)
                except Exception as e:  # noqa: BLE001 - the prefetch is an optimisation: FunASR's own calls run
                    logger.warning("speaker prefetch not started ({}: {}); FunASR's own speaker calls run",
                                   type(e).__name__, e)
                return out
            if model is am.spk_model and job.live:
                answer = self._answer(job, input, input_len, kwargs, cfg)
                if answer is not None:
                    return answer
            elif model is not am.model and model is not am.spk_model:
                job.stop()  # punctuation: FunASR's speaker calls are over; nothing runs beside it (CUDA graphs)
        return self.inner(input, input_len=input_len, model=model, kwargs=kwargs, **cfg)

    def _start(self, job: _Job, input: Any, input_len: Any, vad_out: Any, cfg: dict[str, Any]) -> None:
        """After FunASR's VAD call: start the background thread, when this is the case it covers."""
        am = self.am
        if am.spk_model is None or input_len is not None or not isinstance(input, np.ndarray):
            return
        if cfg.get("merge_vad", False) or not isinstance(vad_out, list) or len(vad_out) != 1:
            return
        segments = funasr_segments(input, vad_out[0]["value"], frontend=cfg.get("frontend", am.kwargs.get("frontend")),
                                   audio_fs=cfg.get("fs", am.kwargs.get("fs", 16000)))
        if not segments:
            return
        param = next(iter(am.spk_model.parameters()), None)
        device = str(param.device) if param is not None else "cpu"  # where CAM++ runs, with its index
        job.prefetch = _Prefetch(segments, self.real, am.spk_model, am.spk_kwargs, copy.deepcopy(cfg), device,
                                 self.ncpu)
        job.live = True

    def _answer(self, job: _Job, speech: Any, input_len: Any, kwargs: Any,
                cfg: dict[str, Any]) -> list[dict[str, Any]] | None:
        """The next prefetched result if this is its call; None: run the call for real (the thread stopped)."""
        p = job.prefetch
        assert p is not None
        self.progress("spk")
        t0 = time.perf_counter()
        try:
            item = p.next()  # the background call's error, if it failed, is raised here
        except BaseException:
            job.live = False
            raise
        finally:
            job.waited += time.perf_counter() - t0
        if (item is None or input_len is not None or kwargs is not p.spk_kwargs or not _same_options(cfg, p.cfg)
                or not item.same_windows(speech)):
            self._mismatch(job, "more speaker calls than segments" if item is None else "a different call")
            return None
        if not p.pending:
            job.end_thread()  # every segment's result taken: the thread has nothing left to do
        return item.output

    def _mismatch(self, job: _Job, what: str) -> None:
        job.stop()
        if not self._warned:
            self._warned = True
            logger.warning("overlap_stages: FunASR's speaker calls differ from the prefetched ones ({}); the rest "
                           "of such a job's speaker calls run in FunASR's loop", what)


def _same_options(a: dict[str, Any], b: dict[str, Any]) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - e.g. an array value: cannot tell, so not the same
        return False


def install(am: Any, *, times: dict[str, float], progress: Callable[[str], None], ncpu: int) -> SpeakerOverlap:
    """Wrap this AutoModel's ``inference`` (what it is now: the stage timer) in a `SpeakerOverlap`."""
    real = functools.partial(type(am).inference, am)
    overlap = SpeakerOverlap(am, am.inference, real, times=times, progress=progress, ncpu=ncpu)
    am.inference = overlap
    return overlap
