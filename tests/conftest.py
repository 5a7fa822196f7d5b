"""Shared fixtures: offline FunASR model dirs (built once, cached), the shared recordings, configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.model_factory import build_all, cache_key

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRANSCRIBE_SHARED", REPO.parent / "shared"))
AUDIO = SHARED / "audio"
CACHE = Path(os.environ.get("TRANSCRIBE_TEST_CACHE", REPO / ".cache"))

needs_shared = pytest.mark.skipif(not AUDIO.is_dir(), reason=f"shared recordings not found at {AUDIO} "
                                                              "(set TRANSCRIBE_SHARED to the shared/ folder)")


def shared_audio(name: str) -> Path:
    path = AUDIO / name
    if not path.is_file():
        pytest.skip(f"shared recording {path} is absent (set TRANSCRIBE_SHARED)")
    return path


# The modules that take most of the suite's wall time, slowest first (measured with --durations on the 2-core
# CI machine). They run first: with `-n 2 --dist loadfile` a module is the unit of work, and starting the
# long ones first keeps the two processes busy to the end instead of one finishing a long module alone.
SLOW_MODULES = ("test_pool.py", "test_batch_engine.py", "test_lock_and_memory.py", "test_cli_defects.py",
                "test_fault_injection.py", "test_ray.py", "test_http.py", "test_parity.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow modules first, each module's tests in their own order (a stable sort by module rank)."""
    rank = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_MODULES)))


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """asr/vad/punc/spk dirs: tiny random Paraformer, ct-punc and CAM++; the real fsmn-vad from ../shared."""
    out = CACHE / "test-models" / cache_key("tiny", "Paraformer")
    return build_all(out)


def model_config(models: dict[str, Path], **funasr: object) -> dict:
    return {"funasr": {"model": str(models["asr"]), "vad_model": str(models["vad"]),
                       "punc_model": str(models["punc"]), "spk_model": str(models["spk"]),
                       "device": "cpu", "ncpu": 1, **funasr}}


@pytest.fixture
def fixture_config(tiny_models, tmp_path):
    """A Config on the fixture models with its task dir and logs under tmp_path."""
    from transcribe.config import config_from_dict

    data = model_config(tiny_models)
    data["pool"] = {"task_dir": str(tmp_path / "tasks"), "settle_seconds": 0.3, "heartbeat_interval": 0.5}
    data["logging"] = {"dir": str(tmp_path / "logs")}
    return config_from_dict(data, tmp_path)


@pytest.fixture(scope="session")
def transcriber(tiny_models, tmp_path_factory):
    """One Transcriber on the fixture models for the whole session (model load is the slow part)."""
    from transcribe.config import config_from_dict
    from transcribe.core.engine.funasr_transcriber import Transcriber

    return Transcriber(config_from_dict(model_config(tiny_models), tmp_path_factory.mktemp("cfg")))


def write_config(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False))
    return path
