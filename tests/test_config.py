import json

import pytest

from transcribe.config import apply_env_overrides, config_from_dict, load_config
from transcribe.core.errors import ConfigError


def test_defaults_match_the_shipped_config_json():
    from pathlib import Path

    shipped = json.loads((Path(__file__).resolve().parents[1] / "config.json").read_text())
    assert config_from_dict(shipped).model_dump(mode="json") == config_from_dict({}).model_dump(mode="json")


def test_env_overrides_nested_keys_and_parse_json_values():
    data = apply_env_overrides({"funasr": {"device": "cuda"}},
                               {"TRANSCRIBE__FUNASR__DEVICE": "cpu", "TRANSCRIBE__POOL__WORKERS": "4",
                                "TRANSCRIBE__OUTPUT__FORMATS": '["srt"]', "OTHER": "x"})
    assert data == {"funasr": {"device": "cpu"}, "pool": {"workers": 4}, "output": {"formats": ["srt"]}}


def test_load_applies_file_then_env_then_overrides(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"funasr": {"device": "cuda", "ncpu": 2}, "pool": {"task_dir": "q"}}))
    cfg = load_config(f, environ={"TRANSCRIBE__FUNASR__NCPU": "3"}, overrides={"pool.workers": 5})
    assert (cfg.funasr.device, cfg.funasr.ncpu, cfg.pool.workers) == ("cuda", 3, 5)
    assert cfg.resolve_path(cfg.pool.task_dir) == tmp_path / "q"  # relative to the config file


def test_yaml_config(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("funasr:\n  device: mps\n")
    assert load_config(f, environ={}).funasr.device == "mps"


@pytest.mark.parametrize("data, key", [
    ({"funasr": {"device": "gpu"}}, "funasr.device"),
    ({"pool": {"workers": 0.5}}, "pool.workers"),
    ({"pool": {"wrokers": 2}}, "pool.wrokers"),
    ({"output": {"formats": ["docx"]}}, "output.formats"),
    ({"funasr": {"device_priority": []}}, "funasr.device_priority"),
])
def test_errors_name_the_key(tmp_path, data, key):
    f = tmp_path / "c.json"
    f.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as e:
        load_config(f, environ={})
    assert key in e.value.message


def test_broken_json_is_a_clear_error(tmp_path):
    f = tmp_path / "c.json"
    f.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid json"):
        load_config(f, environ={})
