"""The worker status file's GPU memory fields: what the worker's PyTorch allocator holds (None off CUDA)."""

from __future__ import annotations

import json

import pytest
import torch

from transcribe.core.pool.heartbeat import WorkerStatus, cuda_memory_mb


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine: the test below covers it")
def test_a_process_without_cuda_reports_no_gpu_memory():
    assert cuda_memory_mb() is None
    status = json.loads(WorkerStatus(worker_id="w1", pid=1).to_json())
    assert status["gpu_reserved_mb"] is None and status["gpu_peak_mb"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_memory_is_what_the_allocator_holds():
    x = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")  # 64 MiB
    reserved, peak = cuda_memory_mb()
    assert reserved >= 64 and peak >= reserved
    del x
