"""Small fixed-shape sub-model calls replayed from CUDA graphs (issue 12).

On a GPU, a 10-minute job makes ~225 punctuation forwards (CT-Transformer, one mini-sentence of ~20-40
tokens each, 12 SANM layers of ~30 tiny kernels) and ~160 CAM++ calls. Each forward is a few hundred
kernels of a few microseconds: the time goes to launching them from Python, not to the arithmetic.
A CUDA graph records one call's kernels once and replays them in one launch.

`ShapeGraphs` wraps a module's ``forward`` (an instance attribute, like the other fast paths). For each
distinct signature of its tensor arguments (shape, dtype, device) seen a second time, it records one
graph of the module's own forward; later calls with that signature copy their inputs into the graph's
input buffers, replay it, and return copies of its outputs. A replay runs the very kernels the capture
recorded, with the same launch parameters, so it computes what the eager call computes; the first call
of a signature runs eagerly, a signature seen once (a one-off length) never pays for a capture. The
capture's own replay is compared with the module's eager forward once, bit for bit; a graph that differs
is dropped and that signature runs eagerly. At most ``max_graphs`` graphs are kept (least recently used
dropped); they share one memory pool, which is safe because replays are ordered (a replay from another
CUDA stream than the last one first waits for it) and every graph's outputs stay referenced while the
graph is kept. Capture and replay run on the inputs' device (a worker on ``cuda:1`` keeps ``cuda:0``
as its current device).

Only a forward with tensor arguments (and None) is graphed, only with autograd off and the module in
eval mode, only on CUDA, and only up to ``max_batch`` in the first dimension where one is set (CAM++:
a large batch of windows is few launches and a large input buffer to keep). A forward that cannot be captured (one that reads a value to the host, or
copies from host memory) is run eagerly from then on for that signature, logged once. Which modules
are wrapped is decided by the caller (`install_punc_graphs`, `install_speaker_graphs`): modules whose
forward is a fixed sequence of device ops on their inputs (tests/test_cuda_graphs.py on a GPU, and
the benchmark's parity rows, docs/benchmarks.md).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from loguru import logger

DEFAULT_MAX_GRAPHS = 128
CAPTURE_AFTER_CALLS = 2  # a signature is captured on its second call: a one-off shape stays eager
MAX_TRACKED_SIGNATURES = 4096

Signature = tuple[Any, ...]


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: list[torch.Tensor | None]  # static input buffers (None where the argument is None)
    outputs: Any  # the forward's return value as captured: tensors in the graph's pool
    input_slots: dict[int, int]  # id(output tensor) -> argument index, where the forward returns an input


def signature(args: tuple[Any, ...]) -> Signature | None:
    """The graph key of a call, or None where the call cannot be graphed (a non-tensor argument)."""
    key: list[Any] = []
    for a in args:
        if a is None:
            key.append(None)
        elif torch.is_tensor(a) and a.is_cuda and not a.requires_grad:
            key.append((tuple(a.shape), a.dtype, a.device.index, a.is_contiguous()))
        else:
            return None
    return tuple(key)


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    return value


class ShapeGraphs:
    """Stands in for a module's ``forward``: CUDA-graph replays per argument signature (see module doc)."""

    def __init__(self, module: torch.nn.Module, name: str, max_graphs: int = DEFAULT_MAX_GRAPHS,
                 max_batch: int | None = None) -> None:
        self.module = module
        self.name = name
        self.forward: Callable[..., Any] = module.forward  # the module's own forward (bound method)
        self.max_graphs = max_graphs
        self.max_batch = max_batch  # larger first dimensions run eagerly (their buffers are large, launches few)
        self.enabled = True
        self.graphs: OrderedDict[Signature, _Graph] = OrderedDict()
        self.calls: dict[Signature, int] = {}
        self.uncapturable: set[Signature] = set()
        self.replays = 0
        self._pool: Any = None
        self._stream: Any = None
        self._last_replay: tuple[Any, Any] | None = None  # (stream, event) of the last replay

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = None if (kwargs or not self.enabled) else self._key(args)
        if key is None:
            return self.forward(*args, **kwargs)
        device = next(a.device for a in args if a is not None)
        # Everything below on the inputs' device: a worker on cuda:1 keeps cuda:0 as its current device,
        # and a capture on another device's stream would record nothing (an empty graph).
        with torch.cuda.device(device):
            entry = self.graphs.get(key)
            if entry is None:
                if len(self.calls) >= MAX_TRACKED_SIGNATURES:  # a long-running server seeing ever new shapes
                    self.calls.clear()
                count = self.calls.get(key, 0) + 1
                self.calls[key] = count
                if count < CAPTURE_AFTER_CALLS or key in self.uncapturable:
                    return self.forward(*args)
                return self._capture(key, args)
            self.graphs.move_to_end(key)
            return self._replay(entry, args)

    def _key(self, args: tuple[Any, ...]) -> Signature | None:
        if (torch.is_grad_enabled() or self.module.training or torch.cuda.is_current_stream_capturing()):
            return None
        key = signature(args)
        if key is None or all(a is None for a in args):
            return None
        if self.max_batch is not None and args[0] is not None and args[0].dim() and args[0].shape[0] > self.max_batch:
            return None
        return key

    def _replay(self, entry: _Graph, args: tuple[Any, ...]) -> Any:
        stream = torch.cuda.current_stream()
        if self._last_replay is not None and self._last_replay[0] != stream:
            stream.wait_event(self._last_replay[1])  # one graph's buffers, used from another stream before
        for static, a in zip(entry.inputs, args):
            if static is not None:
                static.copy_(a)
        entry.graph.replay()
        self.replays += 1
        # An output that is one of the forward's inputs (a mask passed through) is the caller's own
        # argument; every other output is copied out of the graph's pool, which the next replay overwrites.
        out = _map_tensors(entry.outputs, lambda t: args[entry.input_slots[id(t)]]
                           if id(t) in entry.input_slots else t.clone())
        self._last_replay = (stream, stream.record_event())
        return out

    def _capture(self, key: Signature, args: tuple[Any, ...]) -> Any:
        """Record this signature's graph; returns this call's result (eager where the graph is not kept)."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream()  # on the current device: the inputs' (see __call__)
        inputs = [None if a is None else a.clone() for a in args]
        graph = torch.cuda.CUDAGraph()
        caller = torch.cuda.current_stream()
        if self._last_replay is not None:
            caller.wait_event(self._last_replay[1])
        self._stream.wait_stream(caller)  # the input buffers are written on the caller's stream
        # A capture registers the device's default random generator; one that fails (a host read inside the
        # forward) ends before torch returns the generator to normal use, and every later CUDA random draw in
        # the process would raise. Its state is put back from this copy (the failed capture drew nothing).
        generator = torch.cuda.default_generators[caller.device.index or 0]
        saved_rng = generator.clone_state()
        try:
            with torch.cuda.stream(self._stream):
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    outputs = self.forward(*inputs)
                finally:
                    graph.capture_end()
        except Exception as e:  # noqa: BLE001 - a forward that syncs or reads host memory: eager from now on
            generator.graphsafe_set_state(saved_rng)
            torch.cuda.synchronize()
            return self._give_up(key, args, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        caller.wait_stream(self._stream)
        slots = {id(static): i for i, static in enumerate(inputs) if static is not None}
        input_slots: dict[int, int] = {}
        _map_tensors(outputs, lambda t: input_slots.__setitem__(id(t), slots[id(t)]) if id(t) in slots else None)
        entry = _Graph(graph, inputs, outputs, input_slots)
        replayed = self._replay(entry, args)
        # Checked once per signature: the replay must give what the module's own forward gives, bit for bit
        # (a graph that recorded nothing, or recorded something else, would return stale or wrong values).
        if not _equal(replayed, self.forward(*args)):
            return self._give_up(key, args, "the replay differs from the eager forward")
        self.graphs[key] = entry
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return replayed

    def _give_up(self, key: Signature, args: tuple[Any, ...], why: str) -> Any:
        self.uncapturable.add(key)
        logger.info("CUDA graph of {} not used for inputs {} ({}); that shape runs eagerly", self.name, key, why)
        return self.forward(*args)


def _equal(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype \
            and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a is b or a == b


def wrap(module: torch.nn.Module | None, name: str, max_graphs: int = DEFAULT_MAX_GRAPHS,
         max_batch: int | None = None) -> ShapeGraphs | None:
    """Graph this module's forward (idempotent); None where there is no module or no CUDA."""
    if module is None or not torch.cuda.is_available():
        return None
    current = module.__dict__.get("forward")
    if isinstance(current, ShapeGraphs):
        return current
    if current is not None:  # someone else's instance-level forward: leave it alone
        return None
    wrapper = ShapeGraphs(module, name, max_graphs, max_batch)
    module.forward = wrapper  # instance attribute: nn.Module.__call__ finds it before the class's method
    return wrapper


def on_cuda(module: torch.nn.Module) -> bool:
    return any(p.is_cuda for p in module.parameters())


PUNC_LAYER_STACKS = ("encoders0", "encoders")  # SANMEncoder's layer stacks (funasr/models/sanm/encoder.py)


def install_punc_graphs(punc_model: Any) -> list[ShapeGraphs]:
    """Graph a CT-Transformer's SANM layer stacks (its encoder's ``encoders0`` and ``encoders``).

    Their forward is a fixed sequence of device ops on (x, mask); the encoder's own forward around them
    (the padding mask from the lengths, which reads the length to the host, and the positional
    encoding) stays eager."""
    encoder = getattr(punc_model, "encoder", None)
    if type(punc_model).__name__ != "CTTransformer" or type(encoder).__name__ != "SANMEncoder" \
            or not on_cuda(punc_model):
        return []
    stacks = [(name, getattr(encoder, name, None)) for name in PUNC_LAYER_STACKS]
    wrapped = [wrap(stack, f"punc.encoder.{name}") for name, stack in stacks if stack is not None and len(stack)]
    return [w for w in wrapped if w is not None]


def install_speaker_graphs(spk_model: Any, max_graphs: int = 64, max_batch: int = 128) -> list[ShapeGraphs]:
    """Graph CAM++'s forward (fbank windows -> embeddings): convolutions, batch norms and pooling on the
    device, one call per VAD segment with the segment's windows as the batch. Fewer graphs are kept
    than for punctuation: a graph keeps its input buffer (windows x 150 frames x 80 mels)."""
    if type(spk_model).__name__ != "CAMPPlus" or not on_cuda(spk_model):
        return []
    wrapper = wrap(spk_model, "spk", max_graphs, max_batch)
    return [] if wrapper is None else [wrapper]
