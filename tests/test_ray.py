"""`serve --mode ray` on a simulated cluster: real Ray (ray.cluster_utils.Cluster, one module-wide start),
real FunASR on the fixture models in every actor, the shared recordings.

The cluster: a head node with no CPUs (so no actor lands there and every actor's node can be removed) and
two 1-CPU worker nodes: one actor each. To hold a job mid-flight deterministically, the nodes start with
the fault-injection hang armed at ``generate`` but gated on a once-file that exists: a test deletes it,
and the next job to reach FunASR's ``generate`` creates it and hangs there; the file's existence says the
job is now mid-flight in that actor.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import AUDIO, model_config, needs_shared, write_config
from tests.support.pool_helpers import (
    Server,
    archived_record,
    assert_exactly_once,
    drop_file,
    failed,
    results,
    wait_until,
    workers_status,
)
from transcribe.config import config_from_dict
from transcribe.core.cluster.placement import (
    ActorSpec,
    NodeResources,
    actor_device,
    plan_actors,
)

ray = pytest.importorskip("ray")

BOOT = 180  # seconds: each actor imports FunASR (8-20 s) on 2 shared cores
JOB = 120


@contextlib.contextmanager
def environ(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ray_cfg(tiny_models, task_dir: Path, pool: dict | None = None, **ray_keys):
    data = model_config(tiny_models)
    data["pool"] = {"task_dir": str(task_dir), "settle_seconds": 0.2, "heartbeat_interval": 0.5,
                    "shutdown_timeout": 20, **(pool or {})}
    data["ray"] = {"resize_interval": 1.0, **ray_keys}
    data["logging"] = {"dir": str(task_dir.parent / "logs")}
    return data


# ---------------------------------------------------------------------------------------------- pure
def nodes(*specs: tuple[float, float]) -> list[NodeResources]:
    return [NodeResources(f"n{i}", cpus, gpus) for i, (cpus, gpus) in enumerate(specs)]


def cfg_with(**ray_keys):
    return config_from_dict({"ray": ray_keys, "funasr": {"ncpu": 2}})


def test_plan_fills_gpus_with_fractional_actors_and_caps_memory():
    plan = plan_actors(nodes((16, 2), (8, 0)), cfg_with(num_gpus=0.5))
    assert plan["n0"] == (4, ActorSpec(num_cpus=1.0, num_gpus=0.5, memory_fraction=0.5))
    assert plan["n1"] == (4, ActorSpec(num_cpus=2.0))  # CPU-only node: funasr.ncpu CPUs per actor
    whole = plan_actors(nodes((16, 2)), cfg_with(num_gpus=1))
    assert whole["n0"] == (2, ActorSpec(1.0, 1.0, None))  # one engine per card: no cap
    tenth = plan_actors(nodes((16, 1)), cfg_with(num_gpus=0.1))
    assert tenth["n0"][0] == 10  # 1 / 0.1 is 10 actors, not 9


def test_plan_respects_cpus_and_caps():
    assert plan_actors(nodes((2, 4)), cfg_with(num_gpus=0.5))["n0"][0] == 2  # 2 CPUs bound 8 GPU slots
    assert plan_actors(nodes((16, 2)), cfg_with(num_gpus=0.5, actors_per_node=3))["n0"][0] == 3
    assert plan_actors(nodes((8, 0)), cfg_with(cpu_nodes=False))["n0"][0] == 0
    capped = plan_actors(nodes((8, 0), (16, 2)), cfg_with(max_actors=3))
    assert capped["n1"][0] == 2 and capped["n0"][0] == 1  # GPU nodes are served first
    assert plan_actors([], cfg_with()) == {}


def test_actor_device_follows_what_ray_assigned():
    assert actor_device("auto", ["cuda", "mps", "cpu"], ["3"]) == ("cuda:0", ["cuda", "mps", "cpu"])
    assert actor_device("cuda:1", ["cuda", "cpu"], ["1"])[0] == "cuda:0"  # Ray renumbers its card to 0
    assert actor_device("auto", ["cuda", "mps", "cpu"], []) == ("auto", ["mps", "cpu"])  # never an unassigned GPU
    assert actor_device("cuda", ["cuda"], []) == ("auto", ["cpu"])
    assert actor_device("mps", ["cuda", "mps", "cpu"], []) == ("mps", ["mps", "cpu"])


def test_ray_config_rejects_more_than_one_gpu_per_actor():
    from transcribe.core.errors import ConfigError

    with pytest.raises(ConfigError, match="ray.num_gpus"):
        config_from_dict({"ray": {"num_gpus": 2}})


# --------------------------------------------------------------------------------------- the cluster
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray.cluster_utils import Cluster

    once = tmp_path_factory.mktemp("hooks") / "hang.once"
    once.touch()  # disarmed until a test deletes it
    hang = {"TRANSCRIBE_HANG_AT": "generate", "TRANSCRIBE_HOOK_ONCE": str(once)}
    with environ(**hang):  # the nodes' raylets, hence their actors, inherit the armed hook
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        for _ in range(2):
            c.add_node(num_cpus=1)
    c.hang_once, c.hang_env = once, hang
    ray.init(address=c.address)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def add_node(cluster, **args):
    with environ(**cluster.hang_env):
        return cluster.add_node(**args)


def ready_actors(task_dir: Path) -> dict[str, dict]:
    return {k: w for k, w in workers_status(task_dir).items() if w.get("state") in ("ready", "busy")}


def hold_next_job(cluster, task_dir: Path, name: str) -> dict:
    """Drop `name`; return the status of the actor that is now hung inside its FunASR call."""
    cluster.hang_once.unlink()
    drop_file(AUDIO / "tts_1speaker_5s.wav", task_dir / "inbox", name)
    wait_until(cluster.hang_once.exists, JOB, "the job to reach generate")
    return wait_until(lambda: next((w for w in workers_status(task_dir).values()
                                    if w.get("job") and name.rsplit(".", 1)[0] in w["job"]), None), 30, "busy actor")


@pytest.fixture(scope="class")
def server(cluster, tiny_models, tmp_path_factory):
    """TestDriver's driver loop in this process (a thread), its actors on the cluster's two worker nodes."""
    from transcribe.core.cluster.driver import RayServer

    tmp = tmp_path_factory.mktemp("ray-driver")
    srv = RayServer(config_from_dict(ray_cfg(tiny_models, tmp / "tasks"), tmp))
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(srv.run()), daemon=True)
    thread.start()
    srv.task_dir = srv.td.root
    wait_until(lambda: len(ready_actors(srv.task_dir)) == 2 or codes, BOOT, "two actors ready")
    assert not codes, f"the driver stopped: {srv.fatal}"
    yield srv
    srv.stop()
    thread.join(60)
    assert codes == [0]
    assert all(w["state"] == "exited" for w in workers_status(srv.task_dir).values())


@needs_shared
class TestDriver:
    """The driver loop in this process (a thread), its actors on the cluster's two worker nodes."""

    def test_dropped_jobs_give_one_result_each_equal_to_one_process(self, server, transcriber):
        names = ["tts_1speaker_5s.wav", "silence_5s.wav", "espeak_zh_en_30s.wav"]
        for n in names:
            drop_file(AUDIO / n, server.task_dir / "inbox")
        wait_until(lambda: len(results(server.task_dir)) == 3, JOB, "three results")
        assert assert_exactly_once(server.task_dir, names) == {"done": 3, "failed": 0}
        by_source = {r["source"]: r for r in results(server.task_dir)}
        alone = transcriber.transcribe(AUDIO / "espeak_zh_en_30s.wav")
        assert by_source["espeak_zh_en_30s.wav"]["text"] == alone.text
        assert by_source["espeak_zh_en_30s.wav"]["segments"] == [s.to_dict() for s in alone.segments]
        assert by_source["silence_5s.wav"]["text"] == ""
        nodes_used = {w["node"] for w in ready_actors(server.task_dir).values()}
        assert len(nodes_used) == 2  # one actor per worker node

    def test_bad_file_fails_with_reason_and_the_actor_survives(self, server):
        before = {k: w["actor_pid"] for k, w in ready_actors(server.task_dir).items()}
        (server.task_dir / "inbox" / "broken.wav").write_bytes(b"RIFF but not audio" * 64)
        wait_until(lambda: "broken" in " ".join(failed(server.task_dir)), JOB, "broken.wav in failed/")
        (error,) = [e for e in failed(server.task_dir).values() if e["original_name"] == "broken.wav"]
        assert error["reason"] == "audio_undecodable" and "broken.wav" in error["message"]
        assert error["attempts"] == 1 and error["worker"] in before
        actor = workers_status(server.task_dir)[error["worker"]]
        assert actor["state"] == "ready" and actor["jobs_failed"] == 1
        assert actor["actor_pid"] == before[error["worker"]]  # the same process, alive
        os.kill(actor["actor_pid"], 0)

    def test_actor_killed_mid_job_is_retried_once_with_the_attempt_counted(self, server, cluster):
        busy = hold_next_job(cluster, server.task_dir, "killed.wav")
        os.kill(busy["actor_pid"], signal.SIGKILL)
        wait_until(lambda: any(r["source"] == "killed.wav" for r in results(server.task_dir)), JOB, "retry done")
        assert [r["source"] for r in results(server.task_dir)].count("killed.wav") == 1
        record = archived_record(server.task_dir, "killed.wav")
        assert record["attempts"] == 2 and record["history"][0]["reason"] == "actor_lost"
        assert list((server.task_dir / "processing").iterdir()) == []
        # the lost actor is replaced on its node
        wait_until(lambda: len(ready_actors(server.task_dir)) == 2
                   and busy["actor_pid"] not in {w["actor_pid"] for w in ready_actors(server.task_dir).values()},
                   BOOT, "a replacement actor")

    def test_node_removed_mid_job_completes_once_elsewhere_and_a_new_node_gets_an_actor(self, server, cluster):
        busy = hold_next_job(cluster, server.task_dir, "node-lost.wav")
        (node,) = [n for n in cluster.list_all_nodes() if n.node_id == busy["node"]]
        cluster.remove_node(node)
        wait_until(lambda: any(r["source"] == "node-lost.wav" for r in results(server.task_dir)), JOB, "retry")
        assert [r["source"] for r in results(server.task_dir)].count("node-lost.wav") == 1
        record = archived_record(server.task_dir, "node-lost.wav")
        assert record["attempts"] == 2 and record["history"][0]["reason"] == "actor_lost"
        survivors = ready_actors(server.task_dir)
        assert len(survivors) == 1 and busy["node"] not in {w["node"] for w in survivors.values()}
        new = add_node(cluster, num_cpus=1)
        wait_until(lambda: new.node_id in {w["node"] for w in ready_actors(server.task_dir).values()}, BOOT,
                   "an actor on the node that joined")

    def test_everything_dropped_ended_exactly_once(self, server):
        names = ["tts_1speaker_5s.wav", "silence_5s.wav", "espeak_zh_en_30s.wav", "broken.wav", "killed.wav",
                 "node-lost.wav"]
        assert assert_exactly_once(server.task_dir, names) == {"done": 5, "failed": 1}


def test_an_actor_that_cannot_load_its_models_stops_the_server_with_the_reason(tmp_path):
    from transcribe.core.cluster.driver import ActorSlot, RayServer
    from transcribe.core.pool.heartbeat import WorkerStatus

    srv = RayServer(config_from_dict({"pool": {"task_dir": str(tmp_path / "tasks")}}, tmp_path))
    slot = ActorSlot("r1", "node", ActorSpec(1.0), None, WorkerStatus("r1", os.getpid()), boot_ref="pending")
    srv.slots["r1"] = slot
    srv._booted(slot, {"pid": 1, "error": {"reason": "model_load_failed", "message": "no such model dir /x"}})
    assert srv.fatal and "could not boot: no such model dir /x" in srv.fatal
    status = workers_status(srv.td.root)["r1"]
    assert status["state"] == "boot_failed" and status["error"]["reason"] == "model_load_failed"


@needs_shared
def test_a_job_that_makes_no_progress_has_its_actor_dropped_and_is_requeued(tiny_models, tmp_path):
    from transcribe.core.cluster.driver import ActorSlot, Dispatch, RayServer
    from transcribe.core.pool.heartbeat import WorkerStatus

    cfg = ray_cfg(tiny_models, tmp_path / "tasks", pool={"job_stall_timeout": 30})
    srv = RayServer(config_from_dict(cfg, tmp_path))
    drop_file(AUDIO / "tts_1speaker_5s.wav", srv.td.inbox)
    os.utime(srv.td.inbox / "tts_1speaker_5s.wav", (0, 0))
    slot = ActorSlot("r1", "node", ActorSpec(1.0), None, WorkerStatus("r1", os.getpid()))
    srv.slots["r1"] = slot
    job = srv.td.claim_next("r1")
    slot.status.start_job(job.job_id)
    slot.dispatch = Dispatch(job, srv.td.options(job), ref=None, attempt=1)
    srv._progress(slot, {"stage": "asr", "progress_ts": time.time() - 5, "rss_mb": 1.0})
    assert slot.dispatch is not None  # progressing: left alone
    srv._progress(slot, {"stage": "asr", "progress_ts": time.time() - 60, "rss_mb": 1.0})
    assert "r1" not in srv.slots and workers_status(srv.td.root)["r1"]["state"] == "exited"
    (requeued,) = list(srv.td.inbox.glob("*.job"))
    history = json.loads((requeued / "job.json").read_text())["history"]
    assert history[0]["reason"] == "actor_lost" and "no progress" in history[0]["message"]


def test_address_needs_ray_mode(tmp_path):
    out = subprocess.run([sys.executable, "-m", "transcribe", "serve", "--mode", "pool", "--address", "auto"],
                         capture_output=True, text=True, cwd=tmp_path, check=False, timeout=60)
    assert out.returncode == 2 and "--mode ray" in out.stderr


@needs_shared
def test_a_late_answer_for_a_job_no_longer_held_is_never_committed(tiny_models, tmp_path):
    """Fencing at commit: after the job was requeued (its actor declared lost), the old answer is dropped."""
    from transcribe.core.cluster.driver import ActorSlot, Dispatch, RayServer
    from transcribe.core.engine.result import Result, Segment
    from transcribe.core.pool.heartbeat import WorkerStatus

    srv = RayServer(config_from_dict(ray_cfg(tiny_models, tmp_path / "tasks"), tmp_path))
    drop_file(AUDIO / "tts_1speaker_5s.wav", srv.td.inbox)
    os.utime(srv.td.inbox / "tts_1speaker_5s.wav", (0, 0))  # settled
    slot = ActorSlot("r1", "node", ActorSpec(1.0), None, WorkerStatus("r1", os.getpid(), state="busy"))
    job = srv.td.claim_next("r1")
    answer = {"ok": True, "result": Result("hi", [Segment(0.0, 1.0, "hi")], [], 6.4, 0.1, 0.02, "cpu", {}).to_dict()}
    lost = Dispatch(job, srv.td.options(job), ref=None, attempt=job.record.attempts)
    slot.dispatch = lost
    assert srv._settle(slot, lost, None, lost="node gone") == "requeued"
    assert srv._settle(slot, lost, answer) == "stale"  # the lost actor's answer arrives late
    job2 = srv.td.claim_next("r1")
    assert job2.job_id == job.job_id and job2.record.attempts == 2
    retry = Dispatch(job2, srv.td.options(job2), ref=None, attempt=2)
    slot.dispatch = retry
    assert srv._settle(slot, lost, answer) == "stale"  # still not: it is attempt 1's
    assert srv._settle(slot, retry, answer) == "done"
    assert srv._settle(slot, retry, answer) == "stale"  # and never twice
    assert len(results(srv.td.root)) == 1


def test_gpu_actors_get_their_own_card_from_declared_gpus(cluster):
    """Ray schedules declared GPUs by count on a CPU machine: four half-GPU actors share two cards."""
    from transcribe.core.cluster.actor import gpu_assignment
    from transcribe.core.cluster.driver import actor_options, live_nodes

    node = add_node(cluster, num_cpus=2, num_gpus=2)
    try:
        (gpu_node,) = [n for n in live_nodes() if n.gpus == 2]
        count, spec = plan_actors([gpu_node], cfg_with(num_gpus=0.5, num_cpus=0.5))[gpu_node.node_id]
        assert (count, spec.num_gpus, spec.memory_fraction) == (4, 0.5, 0.5)

        @ray.remote
        class Probe:
            def assignment(self):
                return gpu_assignment()

        probes = [Probe.options(**actor_options(spec, gpu_node.node_id)).remote() for _ in range(count)]
        seen = ray.get([p.assignment.remote() for p in probes], timeout=BOOT)
        assert {s["node_id"] for s in seen} == {gpu_node.node_id}
        assert all(len(s["gpu_ids"]) == 1 and s["cuda_visible_devices"] == s["gpu_ids"][0] for s in seen)
        assert sorted(s["gpu_ids"][0] for s in seen) == ["0", "0", "1", "1"]  # two engines per card
        for p in probes:
            ray.kill(p)
    finally:
        cluster.remove_node(node)


@needs_shared
def test_cli_serve_against_the_cluster_address(cluster, tiny_models, tmp_path):
    """As a user runs it: `transcribe serve --mode ray --address HOST:PORT`, then status, then SIGTERM."""
    cfg = write_config(tmp_path / "config.json", ray_cfg(tiny_models, tmp_path / "tasks"))
    task_dir = tmp_path / "tasks"
    srv = Server(cfg, mode="ray", args=("--address", cluster.address))
    try:
        wait_until(lambda: len(ready_actors(task_dir)) == 2, BOOT, "two actors ready")
        for name in ("tts_1speaker_5s.wav", "podcast_2speakers_60s.wav"):
            drop_file(AUDIO / name, task_dir / "inbox")
        wait_until(lambda: len(results(task_dir)) == 2, JOB, "two results")
        out = subprocess.run([sys.executable, "-m", "transcribe", "--config", str(cfg), "status", "--json"],
                             check=True, capture_output=True, text=True, timeout=60)
        info = json.loads(out.stdout)
        assert info["server"]["alive"] and info["server"]["mode"] == "ray"
        assert sorted(w["state"] for w in info["workers"]) == ["ready", "ready"]
        assert sum(w["jobs_done"] for w in info["workers"]) == 2
        actors = ready_actors(task_dir).values()
        assert {w["pid"] for w in info["workers"]} == {a["actor_pid"] for a in actors}  # the actors' processes
        assert {w["node"] for w in info["workers"]} == {a["node"] for a in actors} and len(actors) == 2
    finally:
        code = srv.terminate()
    assert code == 0, srv.output()[-3000:]
    assert assert_exactly_once(task_dir, ["tts_1speaker_5s.wav", "podcast_2speakers_60s.wav"])["done"] == 2
    assert json.loads((task_dir / "supervisor.json").read_text())["state"] == "stopped"
    assert all(w["state"] == "exited" for w in workers_status(task_dir).values())


@needs_shared
def test_cli_serve_without_address_starts_a_local_instance_and_requeues_on_sigterm(tiny_models, tmp_path):
    """No --address: a local Ray instance of its own. SIGTERM while a job hangs: the driver waits
    pool.shutdown_timeout, requeues the job (a stop the server decided: the attempt is given back), ends
    its actor and Ray, and exits 0."""
    once = tmp_path / "hang.once"
    once.touch()  # disarmed for the first job
    cfg = write_config(tmp_path / "config.json",
                       ray_cfg(tiny_models, tmp_path / "tasks", pool={"shutdown_timeout": 2}, local_num_cpus=1))
    task_dir = tmp_path / "tasks"
    srv = Server(cfg, mode="ray", env={"TRANSCRIBE_HANG_AT": "generate", "TRANSCRIBE_HOOK_ONCE": str(once)})
    try:
        wait_until(lambda: len(ready_actors(task_dir)) == 1, BOOT, "one actor ready")
        drop_file(AUDIO / "tts_1speaker_5s.wav", task_dir / "inbox")
        wait_until(lambda: len(results(task_dir)) == 1, JOB, "a result")
        status = json.loads((task_dir / "supervisor.json").read_text())
        assert status["started_ray"] is True and status["ray_address"] is None
        once.unlink()
        drop_file(AUDIO / "tts_1speaker_5s.wav", task_dir / "inbox", "interrupted.wav")
        wait_until(once.exists, JOB, "the second job to reach generate")
    finally:
        code = srv.terminate()
    assert code == 0, srv.output()[-3000:]
    assert "started a local instance" in srv.output()
    assert [r["source"] for r in results(task_dir)] == ["tts_1speaker_5s.wav"]
    assert list((task_dir / "processing").iterdir()) == []
    (requeued,) = list((task_dir / "inbox").glob("*.job"))
    record = json.loads((requeued / "job.json").read_text())
    assert record["original_name"] == "interrupted.wav" and record["attempts"] == 0
    assert record["history"][0]["reason"] == "server_stopped" and "shutdown_timeout" in record["history"][0]["message"]
    assert record["history"][0]["counted"] is False
