import pytest

from tests.conftest import model_config, write_config


@pytest.fixture
def pool_cfg(tmp_path, tiny_models):
    """Write a config.json for a server on the fixture models; returns (path, task_dir)."""
    def make(**pool):
        data = model_config(tiny_models)
        data["pool"] = {"task_dir": "tasks", "settle_seconds": 0.5, "heartbeat_interval": 0.5,
                        "heartbeat_timeout": 30, "shutdown_timeout": 20, **pool}
        data["output"] = {"formats": ["json"]}
        return write_config(tmp_path / "config.json", data), tmp_path / "tasks"
    return make
