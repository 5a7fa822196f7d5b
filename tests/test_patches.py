"""The MPS patch, with MPS faked available: the device that reaches the model is mps."""

import os

import pytest
import torch
from funasr import AutoModel

from transcribe.core.engine import patches
from transcribe.core.engine.patches import mps_patch


@pytest.fixture
def fake_mps(monkeypatch):
    """MPS 'available', and Module.to recording devices instead of moving to a backend we lack."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    moved = []
    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        dev = args[0] if args else kwargs.get("device")
        if isinstance(dev, (str, torch.device)) and str(dev).startswith("mps"):
            moved.append(str(dev))
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    return moved


def vad_kwargs(tiny_models):
    return {"model": str(tiny_models["vad"]), "device": "mps", "disable_update": True}


def test_installed_funasr_honours_mps_without_the_wrapper(tiny_models, fake_mps):
    assert not mps_patch.needs_build_model_wrapper("1.4.16")
    assert patches.apply_patches("mps", "1.4.16") == ["mps.fallback_env"]
    model, kw = AutoModel.build_model(**vad_kwargs(tiny_models))
    assert kw["device"] == "mps" and fake_mps == ["mps"]


def test_wrapper_restores_mps_where_old_funasr_coerces_to_cpu(tiny_models, fake_mps, monkeypatch):
    real = AutoModel.__dict__["build_model"].__func__

    def old_build_model(**kwargs):  # funasr 1.2.x: `device == "cuda"` or cpu, and batch_size forced to 1
        return real(**{**kwargs, "device": "cpu", "batch_size": 1})

    monkeypatch.setattr(AutoModel, "build_model", staticmethod(old_build_model))
    applied = mps_patch.apply("1.2.0")
    assert applied == ["mps.fallback_env", "mps.build_model"]
    assert mps_patch.apply("1.2.0") == applied  # idempotent: not wrapped twice
    assert getattr(AutoModel.__dict__["build_model"].__func__, "_transcribe_mps_wrapped")
    model, kw = AutoModel.build_model(**vad_kwargs(tiny_models), batch_size=8)
    assert kw["device"] == "mps" and kw["batch_size"] == 8 and fake_mps == ["mps"]


def test_wrapper_leaves_cpu_when_mps_is_absent(tiny_models, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    wrapped = mps_patch.wrap_build_model(AutoModel.__dict__["build_model"].__func__)
    _, kw = wrapped(**vad_kwargs(tiny_models))
    assert kw["device"] == "cpu"


@pytest.mark.parametrize("version, needed", [("1.2.0", True), ("1.2.6", True), ("1.2.7", False),
                                             ("1.4.16", False), ("1.3.0+local", False)])
def test_version_gate(version, needed):
    assert mps_patch.needs_build_model_wrapper(version) is needed


def test_fallback_env_is_set_and_user_choice_kept(monkeypatch):
    monkeypatch.delenv("PYTORCH_ENABLE_MPS_FALLBACK", raising=False)
    assert mps_patch.ensure_mps_fallback_env() and os.environ["PYTORCH_ENABLE_MPS_FALLBACK"] == "1"
    monkeypatch.setenv("PYTORCH_ENABLE_MPS_FALLBACK", "0")
    assert not mps_patch.ensure_mps_fallback_env()


def test_registry_per_backend():
    assert patches.apply_patches("cpu") == [] and patches.apply_patches("cuda:0") == []
    assert patches.patched_model_kwargs("mps") == {"vad_kwargs": {"device": "cpu"}}
    assert patches.patched_model_kwargs("cuda:1") == {}


def test_vad_stays_on_cpu_when_main_device_is_mps(tiny_models, fake_mps, tmp_path):
    from tests.conftest import model_config
    from transcribe.config import config_from_dict
    from transcribe.core.engine.device_manager import DeviceChoice
    from transcribe.core.engine.funasr_transcriber import Transcriber

    cfg = config_from_dict(model_config(tiny_models, device="mps"), tmp_path)
    t = Transcriber(cfg, DeviceChoice("mps", "float32", "test", "mps"))
    assert t.model.kwargs["device"] == "mps" and t.model.vad_kwargs["device"] == "cpu"
    assert t.model.punc_kwargs["device"] == "mps" and t.model.spk_kwargs["device"] == "mps"


def test_mps_cache_emptied_after_each_job(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: calls.append(1))
    patches.after_job("mps")
    patches.after_job("cpu")
    assert calls == [1]
