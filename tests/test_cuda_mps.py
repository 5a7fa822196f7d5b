"""CUDA MPS managed by the pool (core/pool/cuda_mps.py) and `pool.workers: auto` on CUDA (plan_pool).

There is no GPU in CI: the daemon is a fake `nvidia-cuda-mps-control` (tests/support/fake_mps.py) run for
real, and a pool planned on CUDA (`pool.devices: ["cuda:0"]`) boots its worker on the CPU (device fallback),
which is all the supervisor's MPS handling depends on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import model_config, needs_shared, write_config
from tests.support.fake_mps import events, fake_path_env, install_fake_mps, running
from tests.support.pool_helpers import Server, ready_workers, wait_until, workers_status
from transcribe.config import config_from_dict
from transcribe.core.errors import ConfigError
from transcribe.core.pool.cuda_mps import (
    LOG_VAR,
    MAX_PIPE_DIR_BYTES,
    PIPE_VAR,
    SYSTEM_PIPE_DIR,
    MpsDaemon,
    MpsError,
    decide,
    private_pipe_dir,
)
from transcribe.core.pool.supervisor import GIB, Slot, Supervisor, plan_pool

BOOT = 120  # seconds: a worker importing FunASR on 2 shared cores

# ---------------------------------------------------------------------------- the decision, pure


def _decide(setting, cuda, *, binary=True, environ=None, system=False):
    return decide(setting, cuda, which=lambda name: f"/usr/bin/{name}" if binary else None,
                  environ=environ or {}, exists=lambda path: system and path == f"{SYSTEM_PIPE_DIR}/control")


@pytest.mark.parametrize("setting", ["auto", True, False])
@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("system", [True, False])
def test_nothing_happens_without_a_cuda_worker_or_when_off(setting, binary, system):
    assert _decide(setting, False, binary=binary, system=system).action == "off"
    assert _decide(False, True, binary=binary, system=system).action == "off"


@pytest.mark.parametrize("setting", ["auto", True])
def test_on_cuda_a_private_daemon_is_started_when_the_program_is_there(setting):
    plan = _decide(setting, True)
    assert plan.action == "start" and plan.binary == "/usr/bin/nvidia-cuda-mps-control"


@pytest.mark.parametrize("setting", ["auto", True])
@pytest.mark.parametrize("binary", [True, False])
def test_a_daemon_already_running_is_used_and_nothing_started(setting, binary):
    plan = _decide(setting, True, binary=binary, system=True)
    assert (plan.action, plan.pipe_dir) == ("external", SYSTEM_PIPE_DIR)
    plan = _decide(setting, True, binary=binary, environ={PIPE_VAR: "/run/mps"})
    assert (plan.action, plan.pipe_dir) == ("external", "/run/mps") and PIPE_VAR in plan.reason


def test_a_missing_program_is_off_on_auto_and_an_error_naming_the_fix_on_true():
    plan = _decide("auto", True, binary=False)
    assert plan.action == "off" and "nvidia-cuda-mps-control is not on PATH" in plan.reason
    with pytest.raises(ConfigError, match=r"pool.cuda_mps is true but nvidia-cuda-mps-control is not on PATH.*"
                                          r"set pool.cuda_mps to \"auto\""):
        _decide(True, True, binary=False)


def test_the_setting_is_validated():
    assert config_from_dict({"pool": {"cuda_mps": True}}).pool.cuda_mps is True
    assert config_from_dict({}).pool.cuda_mps == "auto"
    with pytest.raises(ConfigError, match="pool.cuda_mps"):
        config_from_dict({"pool": {"cuda_mps": "sometimes"}})


def test_the_pipe_dir_is_the_preferred_one_when_its_sockets_fit_else_a_private_tmp_folder(tmp_path):
    short = tmp_path / "m"
    if len(str(short)) <= MAX_PIPE_DIR_BYTES:
        assert private_pipe_dir(short) == (short, False)
    long_dir, temporary = private_pipe_dir(tmp_path / ("x" * 100) / "cuda-mps")
    try:
        assert temporary and long_dir.name.startswith("transcribe-mps-") and long_dir.is_dir()
        assert oct(long_dir.stat().st_mode & 0o777) == "0o700"
    finally:
        long_dir.rmdir()


# ---------------------------------------------------------------------------- the daemon, against the fake


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The fake program on PATH; returns (its path, the record file)."""
    exe = install_fake_mps(tmp_path / "bin")
    record = tmp_path / "record.jsonl"
    for name, value in fake_path_env(exe.parent, record).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(PIPE_VAR, raising=False)
    return exe, record


def test_daemon_starts_in_the_foreground_with_private_dirs_and_quits_when_told(tmp_path, fake):
    exe, record = fake
    daemon = MpsDaemon(str(exe), tmp_path / "pipe", tmp_path / "logs" / "cuda-mps")
    daemon.start(timeout=30)
    assert daemon.alive() and daemon.env == {PIPE_VAR: str(tmp_path / "pipe"), LOG_VAR: str(tmp_path / "logs/cuda-mps")}
    started = events(record)
    assert started == [{**started[0], "event": "daemon", "argv": ["-f"], "pipe": str(tmp_path / "pipe"),
                        "log": str(tmp_path / "logs" / "cuda-mps"), "pid": daemon.pid}]
    daemon.stop(timeout=30)
    client, exited = events(record)[1:]
    assert (client["event"], client["argv"], client["stdin"], client["pipe"]) == ("client", [], "quit\n",
                                                                                  str(tmp_path / "pipe"))
    assert exited["event"] == "exit" and exited["pid"] == daemon.pid
    assert daemon.proc.returncode == 0 and not running(daemon.pid)


def test_a_daemon_that_ignores_quit_is_killed_after_the_timeout(tmp_path, fake, monkeypatch):
    exe, record = fake
    monkeypatch.setenv("FAKE_MPS_IGNORE_QUIT", "1")
    daemon = MpsDaemon(str(exe), tmp_path / "pipe", tmp_path / "logs")
    daemon.start(timeout=30)
    daemon.stop(timeout=0.5)
    seen = [e["event"] for e in events(record)]
    assert seen[:1] == ["daemon"] and "exit" not in seen
    assert daemon.proc.returncode == -signal.SIGKILL and not running(daemon.pid)


def test_a_daemon_that_fails_at_start_says_why(tmp_path, fake, monkeypatch):
    exe, _ = fake
    monkeypatch.setenv("FAKE_MPS_FAIL", "1")
    daemon = MpsDaemon(str(exe), tmp_path / "pipe", tmp_path / "logs")
    with pytest.raises(MpsError, match="exited with code 1 at start: fake mps: cannot open the GPU"):
        daemon.start(timeout=30)
    daemon.stop()
    assert not daemon.alive()


def test_a_temporary_pipe_dir_is_removed_at_stop(tmp_path, fake):
    exe, _ = fake
    pipe, temporary = private_pipe_dir(tmp_path / ("x" * 100))
    daemon = MpsDaemon(str(exe), pipe, tmp_path / "logs", temporary=temporary)
    daemon.start(timeout=30)
    daemon.stop(timeout=30)
    assert temporary and not pipe.exists()


def test_the_daemon_never_outlives_the_process_that_started_it(tmp_path, fake):
    """PR_SET_PDEATHSIG: a supervisor killed with SIGKILL takes its daemon with it."""
    exe, record = fake
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from transcribe.core.pool.cuda_mps import MpsDaemon
        d = MpsDaemon({str(exe)!r}, Path({str(tmp_path / 'pipe')!r}), Path({str(tmp_path / 'logs')!r}))
        d.start(timeout=30)
        print(d.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        daemon_pid = int(parent.stdout.readline())
        assert running(daemon_pid)
    finally:
        parent.kill()
        parent.wait()
    wait_until(lambda: not running(daemon_pid), 30, "the daemon to die with its parent")
    assert [e["event"] for e in events(record)] == ["daemon"]  # no quit: the kernel's signal ended it


# ---------------------------------------------------------------------------- plan_pool: workers auto on CUDA


def _cfg(**funasr):
    return config_from_dict({"pool": {"workers": "auto"}, "funasr": funasr})


def _plan(cfg, available, cores, mem=64 * GIB):
    return plan_pool(cfg, available, cpu_count=cores, mem_available=lambda: mem)


def test_auto_on_cuda_is_one_worker_per_core_up_to_16_per_gpu_with_the_cores_shared_out():
    plan = _plan(_cfg(), ["cuda:0", "cpu"], 16)
    assert (plan.devices, plan.ncpu, plan.cuda) == ([None] * 16, 1, True)
    plan = _plan(_cfg(), ["cuda:0", "cpu"], 64, mem=None)  # MemAvailable unreadable: no memory cap
    assert (len(plan.devices), plan.ncpu) == (16, 4)
    plan = _plan(_cfg(), ["cuda:0", "cuda:1", "cpu"], 64, mem=512 * GIB)
    assert plan.devices == ["cuda:0", "cuda:1"] * 16 and plan.ncpu == 2


def test_auto_on_cuda_keeps_two_per_gpu_on_few_cores_and_fits_host_memory():
    plan = _plan(_cfg(), ["cuda:0", "cpu"], 1)
    assert (len(plan.devices), plan.ncpu) == (2, 1)
    plan = _plan(_cfg(), ["cuda:0", "cpu"], 16, mem=10 * GIB)  # 10 GiB // 4 GiB
    assert (len(plan.devices), plan.ncpu) == (2, 8)
    plan = _plan(_cfg(), ["cuda:0", "cpu"], 16, mem=GIB)
    assert len(plan.devices) == 1


def test_auto_on_cuda_fits_the_cards_memory():
    """A worker that runs out of GPU memory falls back to the CPU: auto plans 4 GiB of the card per worker."""
    plan = plan_pool(_cfg(), ["cuda:0", "cpu"], cpu_count=32, mem_available=lambda: 512 * GIB, gpu_memory=24 * GIB)
    assert (len(plan.devices), plan.ncpu) == (6, 5)
    plan = plan_pool(_cfg(), ["cuda:0", "cuda:1", "cpu"], cpu_count=32, mem_available=lambda: 512 * GIB,
                     gpu_memory=24 * GIB)
    assert plan.devices == ["cuda:0", "cuda:1"] * 6
    plan = plan_pool(_cfg(), ["cuda:0", "cpu"], cpu_count=16, mem_available=lambda: 512 * GIB, gpu_memory=80 * GIB)
    assert len(plan.devices) == 16  # an H100: the 16 per GPU measured best
    plan = plan_pool(_cfg(), ["cuda:0", "cpu"], cpu_count=16, mem_available=lambda: 512 * GIB, gpu_memory=2 * GIB)
    assert len(plan.devices) == 1
    batching = config_from_dict({"pool": {"workers": "auto", "batch_jobs": 2}})  # 5 GiB per worker
    plan = plan_pool(batching, ["cuda:0", "cpu"], cpu_count=16, mem_available=lambda: 512 * GIB,
                     gpu_memory=int(79.2 * GIB))  # an H100 80GB's total_memory
    assert len(plan.devices) == 15


def test_the_device_probe_reports_devices_and_card_memory():
    from transcribe.core.pool.supervisor import probe_devices

    probe = probe_devices()  # a real subprocess importing torch, as the supervisor runs it
    assert probe.devices[-1] == "cpu"
    assert (probe.gpu_memory is None) == (not any(d.startswith("cuda") for d in probe.devices))


def test_an_explicit_ncpu_is_kept():
    plan = _plan(_cfg(ncpu=2), ["cuda:0", "cpu"], 16)
    assert (len(plan.devices), plan.ncpu) == (16, None)


def test_cpu_and_explicit_plans_are_unchanged():
    assert _plan(_cfg(), ["cpu"], 16) == _plan(_cfg(device="cpu"), ["cuda:0", "cpu"], 16)
    assert _plan(_cfg(), ["cpu"], 16).devices == [None] * 4 and _plan(_cfg(), ["cpu"], 16).cuda is False
    plan = _plan(config_from_dict({"pool": {"workers": 3}}), ["cuda:0", "cpu"], 16)
    assert (plan.devices, plan.ncpu, plan.cuda) == ([None] * 3, None, True)
    plan = _plan(config_from_dict({"pool": {"devices": ["cuda:1", "cpu"]}}), ["cpu"], 16)
    assert (plan.devices, plan.ncpu, plan.cuda) == (["cuda:1", "cpu"], None, True)


def test_a_planned_thread_budget_reaches_the_worker_config(tmp_path):
    cfg = config_from_dict({"pool": {"task_dir": str(tmp_path / "tasks")}}, tmp_path)
    sup = Supervisor(cfg, overrides={})
    started = []

    class Ctx:
        def Process(self, target, args, **kw):  # multiprocess's name
            started.append(args)
            return type("P", (), {"start": lambda self: None, "pid": 1})()

    sup._ctx = Ctx()
    sup.worker_ncpu[0] = 3
    sup._spawn(Slot("w1", None, 0))
    assert json.loads(started[0][0])["config"]["funasr"]["ncpu"] == 3
    sup.worker_ncpu[0] = None
    sup._spawn(Slot("w2", None, 0))
    assert json.loads(started[1][0])["config"]["funasr"]["ncpu"] == cfg.funasr.ncpu


# ---------------------------------------------------------------------------- the real supervisor


def _pool(tmp_path, tiny_models, **pool):
    data = model_config(tiny_models)
    data["pool"] = {"task_dir": "tasks", "settle_seconds": 0.5, "heartbeat_interval": 0.5, "shutdown_timeout": 3,
                    **pool}
    return write_config(tmp_path / "config.json", data)


def _supervisor_state(td):
    try:
        return json.loads((td / "supervisor.json").read_text())
    except (OSError, ValueError):
        return {}


@needs_shared
def test_a_pool_on_cuda_runs_its_own_daemon_for_its_workers_and_quits_it_after_them(tmp_path, tiny_models, fake):
    _, record = fake
    td = tmp_path / "tasks"
    cfg = _pool(tmp_path, tiny_models, devices=["cuda:0"], cuda_mps="auto", shutdown_timeout=30)
    srv = Server(cfg, workers=1)
    try:
        wait_until(lambda: ready_workers(td, 1), BOOT, "the worker ready")
        mps = _supervisor_state(td)["cuda_mps"]
        daemon = events(record)[0]
        assert mps["state"] == "on" and daemon["event"] == "daemon" and daemon["argv"] == ["-f"]
        assert daemon["pipe"] == mps["pipe_dir"] and daemon["log"] == str(tmp_path / "logs" / "cuda-mps")
        (worker,) = workers_status(td).values()
        assert worker["cuda_mps_pipe_dir"] == mps["pipe_dir"]  # the worker's CUDA would reach our daemon
        status = subprocess.run([sys.executable, "-m", "transcribe", "--config", str(cfg), "status"],
                                capture_output=True, text=True, cwd=tmp_path, timeout=60, check=True)
        assert f"CUDA MPS: on, pipe dir {mps['pipe_dir']}" in status.stdout.replace("\n", "")
        assert srv.terminate() == 0, srv.output()[-3000:]
    finally:
        srv.kill_group()
    client, exited = events(record)[1:]
    assert client["stdin"] == "quit\n" and client["pipe"] == mps["pipe_dir"] and exited["event"] == "exit"
    assert (td / "workers" / "w1.json").stat().st_mtime <= client["t"]  # quit only after the worker exited
    assert json.loads((td / "workers" / "w1.json").read_text())["state"] == "exited"
    assert not running(daemon["pid"]) and _supervisor_state(td)["cuda_mps"]["state"] == "stopped"
    assert "CUDA MPS: on (auto: workers on CUDA share the GPU" in srv.output()


@needs_shared
def test_a_pool_on_cpu_starts_no_daemon_even_with_cuda_mps_true(tmp_path, tiny_models, fake):
    """(auto on the CPU: the decision table above; this is the supervisor's wiring of it.)"""
    _, record = fake
    td = tmp_path / "tasks"
    srv = Server(_pool(tmp_path, tiny_models, cuda_mps=True, start_method="spawn"), workers=1)  # no fork server wait
    try:
        wait_until(lambda: _supervisor_state(td).get("cuda_mps"), 60, "the supervisor's status")
        mps = _supervisor_state(td)["cuda_mps"]
        assert mps["state"] == "off" and "no worker is planned on a CUDA device" in mps["reason"]
        status = subprocess.run([sys.executable, "-m", "transcribe", "--config", str(td.parent / "config.json"),
                                 "status"], capture_output=True, text=True, cwd=tmp_path, timeout=60, check=True)
        assert "server running" in status.stdout and "CUDA MPS" not in status.stdout  # not on a CPU pool
        assert srv.terminate() == 0, srv.output()[-3000:]
    finally:
        srv.kill_group()
    assert not record.exists() and "CUDA MPS: off (no worker is planned on a CUDA device" in srv.output()


@needs_shared
def test_cuda_mps_true_without_the_program_does_not_start_the_pool(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv(PIPE_VAR, raising=False)
    if os.path.exists(f"{SYSTEM_PIPE_DIR}/control"):
        pytest.skip("a system MPS daemon runs here")
    srv = Server(_pool(tmp_path, tiny_models, devices=["cuda:0"], cuda_mps=True), workers=1)
    try:
        code = srv.proc.wait(60)
    finally:
        srv.kill_group()
    assert code == 2 and "pool.cuda_mps is true but nvidia-cuda-mps-control is not on PATH" in srv.output()
    assert not (tmp_path / "tasks" / "workers" / "w1.json").exists()


@needs_shared
def test_a_daemon_that_cannot_start_is_a_warning_on_auto(tmp_path, tiny_models, fake, monkeypatch):
    _, record = fake
    monkeypatch.setenv("FAKE_MPS_FAIL", "1")
    td = tmp_path / "tasks"
    srv = Server(_pool(tmp_path, tiny_models, devices=["cuda:0"], start_method="spawn"), workers=1)
    try:
        wait_until(lambda: _supervisor_state(td).get("cuda_mps"), 60, "the supervisor's status")
        assert _supervisor_state(td)["cuda_mps"]["state"] == "off"
        assert srv.terminate() == 0, srv.output()[-3000:]
    finally:
        srv.kill_group()
    assert [e["event"] for e in events(record)] == ["daemon"]
    assert "CUDA MPS: off: the daemon did not start (nvidia-cuda-mps-control exited with code 1" in srv.output()


# ---------------------------------------------------------------------------- doctor


def test_doctor_says_what_serve_would_do_about_mps_on_a_cuda_machine(tmp_path, fake, monkeypatch):
    from transcribe.core.doctor import _mps_check

    check = _mps_check(config_from_dict({}))
    assert (check.ok, check.fatal) == (True, False) and check.detail.startswith("on: a private daemon")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    check = _mps_check(config_from_dict({}))
    assert (check.ok, check.fatal) == (False, False) and "not on PATH" in check.detail  # a warning
    check = _mps_check(config_from_dict({"pool": {"cuda_mps": True}}))
    assert (check.ok, check.fatal) == (False, True) and "set pool.cuda_mps to" in check.detail
    assert _mps_check(config_from_dict({"pool": {"cuda_mps": False}})).ok


def test_mem_available_is_read_from_meminfo_and_none_where_unreadable(tmp_path):
    from transcribe.core.pool.supervisor import mem_available_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       131072000 kB\nMemFree:  1000 kB\nMemAvailable:   8388608 kB\n")
    assert mem_available_bytes(str(meminfo)) == 8 * GIB
    assert mem_available_bytes(str(tmp_path / "absent")) is None
    meminfo.write_text("MemTotal: 1 kB\n")
    assert mem_available_bytes(str(meminfo)) is None


@needs_shared
def test_cuda_mps_true_with_a_daemon_that_cannot_start_does_not_start_the_pool(tmp_path, tiny_models, fake,
                                                                              monkeypatch):
    monkeypatch.setenv("FAKE_MPS_FAIL", "1")
    srv = Server(_pool(tmp_path, tiny_models, devices=["cuda:0"], cuda_mps=True), workers=1)
    try:
        code = srv.proc.wait(60)
    finally:
        srv.kill_group()
    assert code != 0 and "pool.cuda_mps is true but the MPS daemon did not start" in srv.output()
    assert "fake mps: cannot open the GPU" in srv.output() and "Traceback" not in srv.output()
    assert not (tmp_path / "tasks" / "workers" / "w1.json").exists()


@needs_shared
def test_a_daemon_that_dies_while_serving_is_reported_and_the_pool_carries_on(tmp_path, tiny_models, fake):
    _, record = fake
    td = tmp_path / "tasks"
    srv = Server(_pool(tmp_path, tiny_models, devices=["cuda:0"], start_method="spawn"), workers=1)
    try:
        wait_until(lambda: _supervisor_state(td).get("cuda_mps", {}).get("state") == "on", 60, "MPS on")
        os.kill(events(record)[0]["pid"], signal.SIGKILL)
        wait_until(lambda: _supervisor_state(td)["cuda_mps"]["state"] == "died", 30, "the death noticed")
        assert srv.proc.poll() is None  # the pool carries on
        assert srv.terminate() == 0, srv.output()[-3000:]
    finally:
        srv.kill_group()
    assert "CUDA MPS daemon (pid" in srv.output() and "exited unexpectedly" in srv.output()
    assert [e["event"] for e in events(record)] == ["daemon"]  # no quit sent to a dead daemon
