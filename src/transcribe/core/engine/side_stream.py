"""Run independent model work beside the main thread, on its own thread and CUDA stream (issue 12).

One job's GPU time is mostly launches: a stage that waits on a cuDNN LSTM stepping frame by frame, or
on a few hundred small kernels, leaves the card idle in between. Two stages that do not read each
other's results can overlap: the BiCif timestamp predictor of one ASR batch (it reads the encoder's
output, not the decoder's) with the decoding of the next, and CAM++ (it reads only the audio of the
VAD segments) with ASR. Each `SideStream` is one worker thread with one CUDA stream; work handed to
it starts after everything the caller's stream has queued so far (an event), runs the same kernels
on the same inputs, so it computes the same values, and its device outputs are handed back behind an
event the caller's stream waits on. Device inputs it reads are marked as used on its stream, so the
caching allocator does not give their memory to the caller's next batch while it still reads them.

`overlap_enabled` decides from ``funasr.overlap_stages`` (auto: on CUDA only; on a CPU both stages
are compute-bound on the same cores, and true there is for tests: the same code path and results).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from transcribe.core.engine.device_manager import limit_cpu_threads

T = TypeVar("T")


def overlap_enabled(setting: bool | str, device: str) -> bool:
    """``funasr.overlap_stages``: true, false, or auto (on when the models run on CUDA)."""
    if setting == "auto":
        return device.startswith("cuda") and torch.cuda.is_available()
    return bool(setting)


_side = threading.local()


def _start_side_thread(ncpu: int) -> None:
    _side.on = True
    limit_cpu_threads(ncpu)  # OpenMP's thread count is per calling thread: the process's budget for this one too


def on_side_thread() -> bool:
    """Whether this thread is a `SideStream`'s (progress is reported from the caller's thread only)."""
    return getattr(_side, "on", False)


class SideResult:
    """A `SideStream` job's result; `get` waits for it and orders the caller's stream after its kernels."""

    def __init__(self, future: Future[tuple[Any, Any]], device: torch.device | None = None) -> None:
        self._future = future
        self._device = device

    def get(self) -> Any:
        value, done = self._future.result()  # re-raises the side thread's exception
        if done is not None:
            torch.cuda.current_stream(self._device).wait_event(done)
        return value

    def done(self) -> bool:
        return self._future.done()


class SideStream:
    """One worker thread (and, on CUDA, one stream) for work that overlaps the caller's."""

    def __init__(self, device: str, ncpu: int, name: str) -> None:
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        # Streams and events are named by device throughout: a worker on cuda:1 keeps cuda:0 as its current
        # device, and torch.cuda.current_stream() alone would be cuda:0's.
        self.device = torch.device(device)
        self._stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=_start_side_thread,
                                            initargs=(ncpu,))

    def submit(self, fn: Callable[..., T], *args: Any, reads: Iterable[torch.Tensor] = ()) -> SideResult:
        """Run ``fn(*args)`` on the side thread after the caller's stream's queued work; `reads`: the
        caller's device tensors it uses (kept from reuse until the side stream is past them)."""
        if not self.cuda:
            return SideResult(self._executor.submit(lambda: (fn(*args), None)))
        ready = torch.cuda.current_stream(self.device).record_event()
        for tensor in reads:
            tensor.record_stream(self._stream)
        stream = self._stream

        def run() -> tuple[Any, Any]:
            with torch.cuda.stream(stream):
                stream.wait_event(ready)
                value = fn(*args)
                return value, stream.record_event()

        return SideResult(self._executor.submit(run), self.device)

    def close(self) -> None:
        """Join the thread; the caller's stream then waits for whatever the side stream still has queued
        (work whose result nobody took, e.g. after an error)."""
        self._executor.shutdown(wait=True)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)


def keep_for_caller(tensors: Iterable[torch.Tensor]) -> None:
    """Mark side-stream outputs as used on the caller's stream (call after `SideResult.get`): their memory
    is not reused by the side stream before the caller's queued work on them is done."""
    for tensor in tensors:
        if tensor.is_cuda:
            tensor.record_stream(torch.cuda.current_stream(tensor.device))
