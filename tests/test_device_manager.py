"""Every branch of device selection, with torch's availability faked."""

import pytest
import torch

from transcribe.config import FunasrConfig
from transcribe.core.engine.device_manager import DeviceManager
from transcribe.core.errors import DeviceUnavailableError


@pytest.fixture
def fake_devices(monkeypatch):
    def set_(cuda: int = 0, mps: bool = False, mps_built: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        monkeypatch.setattr(torch.backends.mps, "is_built", lambda: mps_built)
    return set_


@pytest.mark.parametrize("cuda, mps, built, expected", [
    (0, False, True, ["cpu"]),
    (2, False, True, ["cuda:0", "cuda:1", "cpu"]),
    (0, True, True, ["mps", "cpu"]),
    (0, True, False, ["cpu"]),  # available but not built: not usable
    (1, True, True, ["cuda:0", "mps", "cpu"]),
])
def test_detect(fake_devices, cuda, mps, built, expected):
    fake_devices(cuda, mps, built)
    assert DeviceManager.detect_available_devices() == expected


def select(**kw):
    return DeviceManager.select_device(FunasrConfig(**kw))


def test_auto_follows_priority(fake_devices):
    fake_devices(cuda=2, mps=True)
    assert select().device == "cuda:0"
    assert select(device_priority=["mps", "cuda", "cpu"]).device == "mps"
    assert select(device_priority=["cpu"]).device == "cpu"
    fake_devices(cuda=0, mps=False)
    choice = select()
    assert choice.device == "cpu" and "auto" in choice.reason and not choice.fell_back


def test_auto_with_nothing_in_priority_is_an_error_naming_the_fix(fake_devices):
    fake_devices(cuda=0)
    with pytest.raises(DeviceUnavailableError, match="add 'cpu'"):
        select(device_priority=["cuda", "mps"])


def test_forced_devices_present(fake_devices):
    fake_devices(cuda=2, mps=True)
    assert select(device="cuda").device == "cuda:0"
    assert select(device="cuda:1").device == "cuda:1"
    assert select(device="mps").device == "mps"
    assert select(device="cpu").device == "cpu"


def test_forced_absent_falls_back_with_a_warning(fake_devices, caplog):
    from loguru import logger

    messages = []
    handler = logger.add(lambda m: messages.append(m), level="WARNING")
    try:
        fake_devices(cuda=0, mps=True)
        choice = select(device="cuda")
    finally:
        logger.remove(handler)
    assert choice.device == "mps" and choice.fell_back
    assert "'cuda' but it is not available" in choice.reason and "fell back to mps" in choice.reason
    assert any("fell back" in m for m in messages)


def test_missing_gpu_index_falls_back_to_another_gpu(fake_devices):
    fake_devices(cuda=1)
    choice = select(device="cuda:3")
    assert choice.device == "cuda:0" and choice.fell_back


def test_priority_without_cpu_still_falls_back_to_cpu(fake_devices):
    fake_devices(cuda=0)
    choice = select(device="cuda", device_priority=["mps"])
    assert choice.device == "cpu" and choice.fell_back


def test_forced_absent_without_fallback_is_an_error(fake_devices):
    fake_devices(cuda=0, mps=False)
    with pytest.raises(DeviceUnavailableError) as e:
        select(device="cuda:0", fallback_on_error=False)
    assert "cuda:0" in e.value.message and "found: cpu" in e.value.message


def test_dtype_policy(fake_devices):
    fake_devices(cuda=1)
    assert select(device="cuda").dtype == "float32"  # auto = float32
    assert select(device="cuda", dtype="bfloat16").dtype == "bfloat16"
    assert select(device="cpu", dtype="float16").dtype == "float32"  # half refused on cpu
    assert select(device="cpu", dtype="float32").dtype == "float32"


def test_selection_logs_one_info_line_with_the_reason(fake_devices):
    from loguru import logger

    lines = []
    handler = logger.add(lambda m: lines.append(m.record), level="INFO")
    try:
        fake_devices(cuda=0)
        select(device="cpu")
    finally:
        logger.remove(handler)
    infos = [r for r in lines if r["level"].name == "INFO"]
    assert len(infos) == 1 and "cpu" in infos[0]["message"] and "present" in infos[0]["message"]


def test_device_info_on_cpu():
    info = DeviceManager.get_device_info("cpu")
    assert info["torch"] == torch.__version__ and info["funasr"] and info["device"] == "cpu"


def test_device_info_on_faked_cuda(fake_devices, monkeypatch):
    class Props:
        name, total_memory, major, minor = "H100", 80 * 2**30, 9, 0

    fake_devices(cuda=1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props)
    info = DeviceManager.get_device_info("cuda:0")
    assert info["name"] == "H100" and info["memory_total_mb"] == 80 * 1024


def test_a_transcriber_gives_every_cpu_thread_pool_of_its_process_the_ncpu_budget(transcriber):
    """FunASR limits only torch; the BLAS/OpenMP pools of numpy, scipy and scikit-learn (clustering) default
    to one thread per core, which oversubscribes a machine running several workers."""
    import os

    import torch
    from threadpoolctl import threadpool_info

    assert transcriber.config.funasr.ncpu == 1
    assert any(name.startswith("openblas") for name in transcriber.cpu_threads), transcriber.cpu_threads
    assert set(transcriber.cpu_threads.values()) == {1}
    assert {pool["num_threads"] for pool in threadpool_info()} == {1}
    assert torch.get_num_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == "1"
