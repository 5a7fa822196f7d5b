"""CAM++ speaker embeddings computed beside ASR (``funasr.overlap_speakers``), for FunASR 1.4.16.

FunASR's ``AutoModel.inference_with_vad`` embeds speakers inside its ASR loop: after each ASR batch it
makes one speaker call per segment of that batch (``sv_chunk`` cuts the segment into 1.5 s windows,
then ``self.inference(windows, model=self.spk_model, kwargs=self.spk_kwargs, **cfg)``), so on a GPU the
CAM++ time adds to the ASR time. Those calls need only each segment's audio, which is known as soon as
the VAD call has returned, and most of the ASR time is spent in calls that release the GIL.

`SpeakerOverlap` is an instance-level wrapper of ``AutoModel.inference`` (around the Transcriber's stage
timer). Within one `Transcriber.generate_locked` call (`job`), when FunASR's VAD call returns with the
speaker model on, it cuts the segments exactly as ``inference_with_vad`` will (`funasr_segments`: the
same audio load, the same length sort, the same slices) and starts one background thread that makes,
segment by segment in that order, the speaker call FunASR will make (``sv_chunk``, then the real
``AutoModel.inference`` with ``am.spk_kwargs`` and the same options), keeping the results in order.
Each speaker call FunASR's loop then makes is answered with the next result, waiting for it if needed,
once it is checked to be the same call (window count and lengths, first and last window, options, the
same kwargs dict); any difference stops the thread and runs FunASR's call for real from then on
(logged once). An exception in the background call is raised from the matching speaker call, so the
job fails exactly as it would have. However the job ends, the thread is cancelled (between segments)
and joined before ``generate_locked`` returns: no background work outlives its job. It is also joined
once the last segment's result is handed over, and before any other sub-model call (punctuation), so
nothing runs beside those.

CUDA graphs (`cuda_graphs.py`): a graph capture asserts in PyTorch's caching allocator if another
thread empties the cache meanwhile, and FunASR calls ``torch.cuda.empty_cache()`` after every
``inference`` call (ASR batches in the main thread, speaker calls in the background). So no capture may
run while both threads work: with the overlap on, CAM++ is not graphed (the Transcriber leaves it out;
its calls are hidden behind the ASR instead), and the punctuation graphs are captured only after the
background thread has ended (above).

The speaker calls touch only ``am.spk_kwargs`` (``_merge_runtime_config``) and CAM++; the main
thread's ASR calls merge into ``am.kwargs``; ``_reset_runtime_configs`` runs only at the start of
``inference_with_vad`` and for calls without kwargs, both before the thread starts. Beyond its own
kwargs, ``AutoModel.inference`` reads only ``am.kwargs["disable_pbar"]`` (true in our build: no tqdm
bars), one dict read. CAM++ draws no random numbers, so numpy's state (the clustering's) is untouched.
The thread gets its own copy of the options and the main thread's torch thread count (CPU numerics
depend on it).

On CUDA (CAM++'s parameters on a CUDA device) the background calls run under that device on a side
stream of their own (``torch.cuda.stream``: the current stream and device are per thread); each result is handed over with an event recorded on the side stream, which
the main stream waits for before FunASR reads the embeddings, and the embedding tensors are marked in
use on the main stream (``record_stream``) for the caching allocator. On the CPU neither applies.
``overlap_speakers: "auto"`` (the default) turns it on for CUDA only: on a small CPU both stages are
compute-bound and nothing is gained. Timings: the background call time is the ``spk`` stage, as
before; ``spk_wait`` is how long the main thread waited for an embedding it needed.

The batch engine is unaffected: its assembly replaces ``am.inference`` with its own `Replay`, which
answers the VAD and speaker calls itself, so this wrapper sees no VAD call and starts nothing.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from loguru import logger

NAME = "overlap_speakers"
VERIFIED_FUNASR = ("1.4.16",)  # inference_with_vad's segment order and speaker call, read from this version
Setting = bool | Literal["auto"]


@dataclass(frozen=True)
class Segment:
    """One VAD segment in ``inference_with_vad``'s (length-sorted) order."""

    start_ms: Any  # as the VAD gave it (FunASR divides it by 1000.0 for sv_chunk)
    end_ms: Any
    index: int  # its position in the VAD output
    samples: Any  # 1-D tensor: FunASR's slice of the job's audio


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


def wanted(setting: Setting, device_kind: str) -> bool:
    """``funasr.overlap_speakers``: "auto" is on for CUDA only."""
    return device_kind == "cuda" if setting == "auto" else bool(setting)


def supported(funasr_version: str) -> bool:
    return funasr_version.split("+")[0] in VERIFIED_FUNASR


@dataclass
class _Embedded:
    """One segment's speaker call, made in the background: what it was given and what it returned."""

    windows: tuple[int, ...]  # each window's length
    first: np.ndarray | None  # copies of the first and last window, to recognise the call
    last: np.ndarray | None
    output: list[dict[str, Any]]
    ready: Any = None  # CUDA: an event on the side stream after the call's work

    @classmethod
    def of(cls, speech: list[np.ndarray], output: list[dict[str, Any]], ready: Any) -> _Embedded:
        return cls(tuple(len(w) for w in speech), np.array(speech[0]) if speech else None,
                   np.array(speech[-1]) if speech else None, output, ready)

    def same_windows(self, speech: Any) -> bool:
        if not isinstance(speech, list) or tuple(len(w) for w in speech) != self.windows:
            return False
        return not speech or (np.array_equal(speech[0], self.first) and np.array_equal(speech[-1], self.last))


@dataclass
class _Failed:
    error: BaseException


_END = object()  # the background thread put everything it will put


class _CudaHandover:
    """Side-stream execution for the background thread, and the hand-over of its tensors to the main stream."""

    def __init__(self, device: Any, side: Any) -> None:
        import torch

        self.device = device
        self.side = side
        self.main = torch.cuda.current_stream(device)  # the job's (main thread's) stream

    def context(self) -> contextlib.AbstractContextManager[Any]:
        import torch

        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self.device))  # a new thread starts on device 0
        stack.enter_context(torch.cuda.stream(self.side))
        return stack

    def after_call(self, output: list[dict[str, Any]]) -> Any:
        """In the background thread: an event after the call's work; the tensors marked in use on the main stream."""
        import torch

        for tensor in _tensors(output):
            if tensor.is_cuda:
                tensor.record_stream(self.main)
        event = torch.cuda.Event()
        event.record(self.side)
        return event

    def before_use(self, ready: Any) -> None:
        """In the main thread: the main stream waits for the side stream's work (no host wait)."""
        import torch

        torch.cuda.current_stream(self.device).wait_event(ready)


def _tensors(output: list[dict[str, Any]]) -> Iterator[Any]:
    import torch

    for item in output:
        for value in item.values() if isinstance(item, dict) else ():
            if torch.is_tensor(value):
                yield value


class _Prefetch:
    """One job's background thread: the speaker call of every segment, in order, results in a queue."""

    def __init__(self, segments: list[Segment], call: Callable[..., list[dict[str, Any]]], spk_model: Any,
                 spk_kwargs: dict[str, Any], cfg: dict[str, Any], cuda: _CudaHandover | None) -> None:
        import torch

        self.segments, self.call, self.spk_model, self.spk_kwargs, self.cfg = segments, call, spk_model, spk_kwargs, cfg
        self.cuda = cuda
        self.num_threads = torch.get_num_threads()  # the main thread's; CPU results depend on it
        self.results: queue.Queue[Any] = queue.Queue()
        self.cancel = threading.Event()
        self.seconds = 0.0  # spent in the speaker calls
        self.calls = 0
        self.thread = threading.Thread(target=self._run, name="speaker-prefetch", daemon=True)

    def _run(self) -> None:
        import torch
        from funasr.models.campplus.utils import sv_chunk

        try:
            torch.set_num_threads(self.num_threads)
            with self.cuda.context() if self.cuda is not None else contextlib.nullcontext():
                for seg in self.segments:
                    if self.cancel.is_set():
                        return
                    # inference_with_vad's lines for one segment of a batch
                    windows = sv_chunk([[seg.start_ms / 1000.0, seg.end_ms / 1000.0, np.array(seg.samples)]])
                    speech = [w[2] for w in windows]
                    t0 = time.perf_counter()
                    try:
                        output = self.call(speech, input_len=None, model=self.spk_model, kwargs=self.spk_kwargs,
                                           **self.cfg)
                        ready = self.cuda.after_call(output) if self.cuda is not None else None
                    finally:
                        self.seconds += time.perf_counter() - t0
                        self.calls += 1
                    self.results.put(_Embedded.of(speech, output, ready))
        except BaseException as e:  # noqa: BLE001 - raised again by the main thread's matching speaker call
            self.results.put(_Failed(e))
        finally:
            self.results.put(_END)

    def stop(self) -> None:
        self.cancel.set()
        self.thread.join()


@dataclass
class _Job:
    """One ``generate``: the prefetch started at its VAD call, if any, and how it is going."""

    prefetch: _Prefetch | None = None
    vad_seen: bool = False
    live: bool = False  # speaker calls are answered from the prefetch
    answered: int = 0
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
                 progress: Callable[[str], None]) -> None:
        self.am, self.inner, self.real = am, inner, real
        self.times = times
        self.progress = progress
        self._job: _Job | None = None
        self._side_stream: Any = None
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

    @property
    def running(self) -> bool:
        """A background thread is alive (tests: none outlives its job)."""
        job = self._job
        return job is not None and job.prefetch is not None and job.prefetch.thread.is_alive()

    def __call__(self, input: Any, input_len: Any = None, model: Any = None, kwargs: Any = None, **cfg: Any) -> Any:
        job, am = self._job, self.am
        if job is not None and model is not None:
            if model is am.vad_model and not job.vad_seen:
                job.vad_seen = True
                out = self.inner(input, input_len=input_len, model=model, kwargs=kwargs, **cfg)
                self._start(job, input, input_len, out, cfg)
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
        p = _Prefetch(segments, self.real, am.spk_model, am.spk_kwargs, copy.deepcopy(cfg), self._cuda())
        job.prefetch, job.live = p, True
        p.thread.start()

    def _cuda(self) -> _CudaHandover | None:
        import torch

        param = next(iter(self.am.spk_model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")  # where CAM++ runs, with its index
        if device.type != "cuda":
            return None
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=device)
        return _CudaHandover(device, self._side_stream)

    def _answer(self, job: _Job, speech: Any, input_len: Any, kwargs: Any,
                cfg: dict[str, Any]) -> list[dict[str, Any]] | None:
        """The next prefetched result if this is its call; None: run the call for real (the thread stopped)."""
        p = job.prefetch
        assert p is not None
        self.progress("spk")
        t0 = time.perf_counter()
        item = p.results.get()
        job.waited += time.perf_counter() - t0
        if isinstance(item, _Failed):
            job.live = False
            raise item.error
        if (item is _END or input_len is not None or kwargs is not p.spk_kwargs or not _same_options(cfg, p.cfg)
                or not item.same_windows(speech)):
            self._mismatch(job, "more speaker calls than segments" if item is _END else "a different call")
            return None
        if p.cuda is not None:
            p.cuda.before_use(item.ready)
        job.answered += 1
        if job.answered == len(p.segments):
            job.end_thread()  # it has put its last result and only ends now (a further call still gets _END)
        return item.output

    def _mismatch(self, job: _Job, what: str) -> None:
        job.stop()
        if not self._warned:
            self._warned = True
            logger.warning("overlap_speakers: FunASR's speaker calls differ from the prefetched ones ({}); the rest "
                           "of such a job's speaker calls run in FunASR's loop", what)


def _same_options(a: dict[str, Any], b: dict[str, Any]) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - e.g. an array value: cannot tell, so not the same
        return False


def install(am: Any, *, times: dict[str, float], progress: Callable[[str], None]) -> SpeakerOverlap:
    """Wrap this AutoModel's ``inference`` (what it is now: the stage timer) in a `SpeakerOverlap`."""
    real = functools.partial(type(am).inference, am)
    overlap = SpeakerOverlap(am, am.inference, real, times=times, progress=progress)
    am.inference = overlap
    return overlap
