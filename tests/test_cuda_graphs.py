"""cuda_graphs: CUDA-graph replays give the eager forward's results, bit for bit.

The graph tests need a CUDA device (they run in the GPU benchmark call, `tests/performance/gpu_bench.sh`
with ``BENCH_SCRIPT`` unset and ``pytest tests/test_cuda_graphs.py``); on the CPU only the rules that
decide what is graphed run, and the check that a CPU engine installs nothing.
"""

from __future__ import annotations

import random

import pytest
import torch
from funasr import AutoModel

from tests.conftest import model_config, shared_audio
from transcribe.config import Config
from transcribe.core.engine import cuda_graphs
from transcribe.core.engine.funasr_transcriber import Transcriber

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def test_only_cuda_tensors_and_none_make_a_signature():
    assert cuda_graphs.signature((torch.zeros(2),)) is None  # a CPU tensor
    assert cuda_graphs.signature((1.0,)) is None
    assert cuda_graphs.signature((None,)) == (None,)


def test_a_cpu_engine_installs_no_graph(tiny_models, tmp_path):
    tr = Transcriber(Config.model_validate(model_config(tiny_models, device="cpu")))
    assert tr.graphs == []
    assert not any(p.startswith("cuda_graphs") for p in tr.patches)
    if not torch.cuda.is_available():
        assert cuda_graphs.wrap(torch.nn.Linear(2, 2), "x") is None


@pytest.fixture(scope="module")
def cuda_punc(tiny_models):
    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a CUDA device")
    am = AutoModel(model=str(tiny_models["punc"]), device="cuda", ncpu=1, disable_update=True, disable_pbar=True,
                   log_level="ERROR")
    return am


@needs_cuda
def test_punctuation_layers_replayed_equal_eager(cuda_punc):
    model = cuda_punc.model
    rng = random.Random(0)
    vocab = model.embed.num_embeddings
    lengths = [rng.choice([3, 17, 20, 25, 40]) for _ in range(30)]
    inputs = [torch.randint(1, vocab, (1, n), device="cuda") for n in lengths]

    def logits() -> list[torch.Tensor]:
        with torch.no_grad():
            return [model.punc_forward(t, torch.tensor([t.shape[1]], device="cuda"))[0].cpu() for t in inputs]

    eager = logits()
    graphs = cuda_graphs.install_punc_graphs(model)
    try:
        # the stacks with layers (the tiny model's second stack is empty: nothing to record)
        assert [g.name for g in graphs] == [f"punc.encoder.{n}" for n in ("encoders0", "encoders")
                                            if len(getattr(model.encoder, n))]
        graphed = logits()
        again = logits()
    finally:
        for g in graphs:
            del g.module.forward
    assert all(g.replays > 0 for g in graphs)
    assert len(graphs[-1].graphs) == len({n for n in lengths if lengths.count(n) > 1})  # seen twice: captured
    for a, b, c in zip(eager, graphed, again):
        assert torch.equal(a, b) and torch.equal(a, c)


class _Stack(torch.nn.Module):
    """(x, mask) -> (x', mask): a layer stack's calling convention, the mask passed through."""

    def __init__(self, host_read: bool = False) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)
        self.host_read = host_read

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        y = torch.relu(self.linear(x)) * mask
        if self.host_read:
            y = y * float(y.sum().item() > -1)  # a host read: cannot be captured
        return y, mask, None


@needs_cuda
@pytest.mark.parametrize("host_read", [False, True])
def test_outputs_are_the_callers_not_the_graphs(host_read):
    stack = _Stack(host_read).cuda().eval()
    wrapper = cuda_graphs.wrap(stack, "stack", max_graphs=2)
    assert wrapper is not None
    mask = torch.ones(1, 5, 1, device="cuda")
    with torch.no_grad():
        xs = [torch.randn(1, 5, 8, device="cuda") for _ in range(4)]
        outs = [stack(x, mask) for x in xs]
        expected = [stack.__class__.forward(stack, x, mask) for x in xs]
    for (y, m, none), (ref, _, _) in zip(outs, expected):
        assert torch.equal(y, ref) and m is mask and none is None
    assert len({o[0].data_ptr() for o in outs}) == len(outs)  # copies, not the graph's buffer
    if host_read:
        assert wrapper.replays == 0 and wrapper.uncapturable
        torch.randn(3, device="cuda")  # the failed capture gave the random generator back
    else:
        assert wrapper.replays == len(xs) - 1


@needs_cuda
def test_least_recently_used_graphs_are_dropped():
    stack = _Stack().cuda().eval()
    wrapper = cuda_graphs.wrap(stack, "stack", max_graphs=2)
    with torch.no_grad():
        for n in (2, 3, 4, 2, 3, 4, 4):
            stack(torch.randn(1, n, 8, device="cuda"), torch.ones(1, n, 1, device="cuda"))
    assert len(wrapper.graphs) == 2


@needs_cuda
def test_autograd_or_training_runs_the_eager_forward():
    stack = _Stack().cuda()
    wrapper = cuda_graphs.wrap(stack, "stack")
    x, mask = torch.randn(1, 3, 8, device="cuda"), torch.ones(1, 3, 1, device="cuda")
    for _ in range(3):
        stack(x, mask)  # grad enabled
    stack.eval()
    with torch.no_grad():
        stack.train()
        for _ in range(3):
            stack(x, mask)
    assert wrapper.replays == 0 and not wrapper.graphs


@needs_cuda
@pytest.mark.parametrize("overlap", [False, "auto"])
def test_transcriber_on_cuda_with_graphs_equals_without(tiny_models, tmp_path, overlap):
    """A whole diarized job replayed from graphs equals the same engine's eager job, with its stages one
    after another and side by side (the CUDA default: CAM++ graphs replayed on the engine's side stream)."""
    path = shared_audio("podcast_2speakers_60s.wav")
    tr = Transcriber(Config.model_validate(model_config(tiny_models, device="cuda", seed=0, overlap_stages=overlap)))
    assert [g.name for g in tr.graphs][-1] == "spk" and tr.graphs[0].name == "punc.encoder.encoders0"
    first = tr.transcribe(path, speakers=2)
    second = tr.transcribe(path, speakers=2)  # every shape seen before: replays
    assert all(g.replays > 0 for g in tr.graphs)
    for g in tr.graphs:
        g.enabled = False
    eager = tr.transcribe(path, speakers=2)
    assert first.segments and first.segments == second.segments == eager.segments
    assert first.text == eager.text


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_module_on_the_second_gpu_is_recorded_there():
    """A worker on cuda:1 keeps cuda:0 as its current device: graphs must still record cuda:1's kernels."""
    assert torch.cuda.current_device() == 0
    stack = _Stack().to("cuda:1").eval()
    wrapper = cuda_graphs.wrap(stack, "stack")
    mask = torch.ones(1, 5, 1, device="cuda:1")
    with torch.no_grad():
        xs = [torch.randn(1, 5, 8, device="cuda:1") for _ in range(4)]
        got = [stack(x, mask)[0] for x in xs]
        expected = [stack.__class__.forward(stack, x, mask)[0] for x in xs]
    assert wrapper.replays == 3 and not wrapper.uncapturable
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_side_stream_on_the_second_gpu_orders_against_that_gpus_stream():
    from transcribe.core.engine.side_stream import SideStream

    side = SideStream("cuda:1", 1, "test-side")
    x = torch.randn(2048, 2048, device="cuda:1")
    y = x @ x  # queued on cuda:1's current stream; the side work must start after it
    result = side.submit(lambda t: (t @ t).sum(), y, reads=[y]).get()
    assert torch.equal(result.cpu(), (y @ y).sum().cpu())
    side.close()
