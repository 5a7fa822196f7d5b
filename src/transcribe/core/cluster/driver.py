"""`serve --mode ray`: the driver owns the task directory; Ray actors on the cluster's nodes run the engine.

The driver is the pool supervisor's counterpart (one readable loop, gunicorn's arbiter again). It
holds the server lock, recovers processing/ at start-up, and each turn:

1. re-plans the actors from the live nodes (`placement.plan_actors`): a node that joined gets actors,
   a node that left has its actors dropped (their jobs come back through step 4);
2. claims a job for each idle actor (`TaskDir.claim_next`: the lease is held by this process), checks it
   (`prepare_job`, `check_file`) and sends it: the audio BYTES through the object store, so worker nodes
   need no shared mount (or the path, with ``ray.audio_transfer: shared_mount``);
3. waits on every outstanding call (boots, jobs, progress pings) at once;
4. settles what came back: a result is committed with `finish_job` — only if this driver still holds that
   job's lease for that attempt (a late answer is dropped); a job's own error goes to `settle_failed_job`;
   an actor's death (`RayActorError`: node lost, OOM, SIGKILL) requeues its job with `TaskDir.release`
   (the attempt counts) and the actor is replaced.

Ray never retries behind our back (``max_restarts=0, max_task_retries=0``): the task directory's lease
protocol is the one retry mechanism, so a job is committed at most once whatever Ray does. Actors never
write to the task directory. The driver writes each actor's ``workers/<id>.json`` (so `transcribe status`
shows actors) and ``supervisor.json``. SIGTERM/SIGINT: stop claiming, let running jobs finish within
`pool.shutdown_timeout`, requeue the rest, kill the actors, and ``ray.shutdown()`` if this driver started Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from transcribe.config import Config
from transcribe.core.cluster.actor import ACTOR_CONCURRENCY, TranscribeActor
from transcribe.core.cluster.placement import ActorSpec, NodeResources, plan_actors
from transcribe.core.engine.audio import check_file
from transcribe.core.engine.result import Result
from transcribe.core.errors import TranscribeError
from transcribe.core.fsio import write_atomic
from transcribe.core.metrics import PoolMetrics
from transcribe.core.notify import Notifier
from transcribe.core.pool.heartbeat import WorkerStatus
from transcribe.core.pool.inbox_watcher import InboxWatcher
from transcribe.core.pool.job_runner import (
    commit_result,
    prepare_job,
)
from transcribe.core.pool.jobs import Job, JobOptions, LeaseLost, ReportedError
from transcribe.core.pool.task_dir import Housekeeping, TaskDir
from transcribe.core.status import ServerStatusFile

TICK = 0.25  # longest wait on outstanding calls per loop turn
MAX_EARLY_DEATHS = 3  # actors dying before ready, in a row, that stop the server
EXIT_OK, EXIT_FATAL = 0, 3


@dataclass
class Dispatch:
    """A job sent to an actor: what the driver must settle when the call comes back."""

    job: Job
    options: JobOptions
    ref: Any  # the ObjectRef of the actor's `transcribe` call
    attempt: int
    sent_ts: float = field(default_factory=time.time)


@dataclass
class ActorSlot:
    actor_id: str
    node_id: str
    spec: ActorSpec
    handle: Any
    status: WorkerStatus
    boot_ref: Any = None  # pending `ready` call; None once booted
    ping_ref: Any = None  # pending `progress` call
    dispatch: Dispatch | None = None

    @property
    def ready(self) -> bool:
        return self.boot_ref is None

    @property
    def idle(self) -> bool:
        return self.ready and self.dispatch is None


def actor_options(spec: ActorSpec, node_id: str, runtime_env: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ray options of one actor: its resources, pinned to its node, never restarted or retried by Ray."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    opts: dict[str, Any] = {
        "num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus, "max_restarts": 0, "max_task_retries": 0,
        "max_concurrency": ACTOR_CONCURRENCY,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    }
    if runtime_env:
        opts["runtime_env"] = runtime_env
    return opts


def kill_actor(handle: Any) -> None:
    """End an actor now; one already dead is what we want. Never starts Ray (ray.kill would, unconnected)."""
    import ray

    if handle is not None and ray.is_initialized():
        with contextlib.suppress(Exception):
            ray.kill(handle, no_restart=True)


def live_nodes() -> list[NodeResources]:
    import ray

    return [NodeResources.from_ray(n) for n in ray.nodes() if n.get("Alive")]


class RayServer:
    def __init__(self, cfg: Config, address: str | None = None) -> None:
        self.cfg = cfg
        self.address = address if address is not None else cfg.ray.address
        self.td = TaskDir.from_config(cfg).ensure()
        self.status_file = ServerStatusFile(self.td)
        self.slots: dict[str, ActorSlot] = {}
        self.stop_event = threading.Event()  # set by SIGTERM/SIGINT, or by whoever embeds the server
        self.wake = threading.Event()  # inbox changed, or an actor went idle: claim now
        self.fatal: str | None = None
        self.notifier = Notifier.from_config(cfg)
        self.restarts_total = 0
        self.early_deaths = 0
        self._started_ray = False
        self._actor_cls: Any = None
        self._config_json = json.dumps({"config": cfg.model_dump(mode="json"), "base_dir": cfg.base_dir})
        self._next_resize = self._next_scan = self._next_beat = self._respawn_at = 0.0
        self._nodes_seen: set[str] = set()
        # jobs this driver holds are skipped by the sweep (their flock is held); a shutdown's are uncounted
        self.housekeeping = Housekeeping(self.td, keep_audio=cfg.pool.keep_audio)
        self.metrics = PoolMetrics(self.td, cfg.resolve_path(cfg.metrics.textfile)) if cfg.metrics.textfile else None

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        lock_fd = self.td.acquire_server_lock()
        try:
            os.umask(self.cfg.pool.umask)
            self.td.check_one_filesystem()
            self.td.recover_all("supervisor_restart", "the previous server stopped while the job ran",
                                keep_audio=self.cfg.pool.keep_audio)
            self._connect()
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own
                    signal.signal(sig, lambda signum, frame: self.stop_event.set())
                signal.signal(signal.SIGHUP, lambda signum, frame: logger.warning(
                    "SIGHUP: ray mode does not reload its config; restart the server to apply changes"))
            try:
                with InboxWatcher(self.td.inbox, self.wake):
                    while not self.stop_event.is_set() and not self.fatal:
                        self._resize()
                        self._dispatch()
                        self._wait_and_settle(TICK)
                        self._beat()
                        self.housekeeping.tick()
                    self._drain()
            finally:
                self._stop_actors()
                self._write_server_status("stopped")
                self.notifier.close()
                if self._started_ray:
                    import ray

                    ray.shutdown()
        finally:
            os.close(lock_fd)
        if self.fatal:
            logger.error("ray server stopped: {}", self.fatal)
            return EXIT_FATAL
        logger.info("ray server stopped cleanly")
        return EXIT_OK

    def stop(self) -> None:
        self.stop_event.set()

    def _connect(self) -> None:
        try:
            import ray
        except ImportError:
            raise TranscribeError("serve --mode ray needs Ray: pip install 'transcribe[ray]'") from None
        rc = self.cfg.ray
        if not ray.is_initialized():
            common: dict[str, Any] = {"namespace": rc.namespace, "log_to_driver": True}
            if rc.runtime_env:
                common["runtime_env"] = rc.runtime_env
            try:
                if self.address:
                    ray.init(address=self.address, **common)
                else:
                    # "local": a new instance even where `ray start` left one (join that with --address auto)
                    ray.init(address="local", num_cpus=rc.local_num_cpus, include_dashboard=False, **common)
                    self._started_ray = True
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"the Ray cluster at {self.address!r}" if self.address else "a local Ray instance"
                raise TranscribeError(f"could not start or join {where}: {e}; start the head with `ray start "
                                      f"--head` and pass its address (HOST:6379), or omit --address to start "
                                      f"a local instance") from None
        self._actor_cls = ray.remote(TranscribeActor)
        resources = ray.cluster_resources()
        logger.info("ray: {} ({} CPUs, {} GPUs); task dir {}", "started a local instance" if self._started_ray
                    else f"joined {self.address or 'the running cluster'}", resources.get("CPU", 0),
                    resources.get("GPU", 0), self.td.root)

    # ------------------------------------------------------------------ actors
    def _resize(self) -> None:
        """Start the actors the plan wants on each live node; drop those on nodes that left."""
        now = time.time()
        if now < self._next_resize:
            return
        self._next_resize = now + self.cfg.ray.resize_interval
        nodes = live_nodes()
        alive = {n.node_id for n in nodes}
        for slot in [s for s in self.slots.values() if s.node_id not in alive]:
            self._lose(slot, f"node {slot.node_id[:12]} left the cluster")
        if alive != self._nodes_seen:
            logger.info("ray: {} live nodes: {}", len(nodes), ", ".join(
                f"{n.node_id[:8]}({n.address}, {n.cpus:g} CPU, {n.gpus:g} GPU)" for n in nodes))
            self._nodes_seen = alive
        if now < self._respawn_at:
            self._next_resize = min(self._next_resize, self._respawn_at)
            return
        plan = plan_actors(nodes, self.cfg)
        if not any(count for count, _ in plan.values()) and not self.slots:
            logger.warning("ray: no node can host an actor (ray.num_gpus={}, ray.num_cpus={}, cpu_nodes={}); "
                           "waiting for one to join", self.cfg.ray.num_gpus, self.cfg.ray.num_cpus,
                           self.cfg.ray.cpu_nodes)
        for node_id, (count, spec) in plan.items():
            have = sum(s.node_id == node_id for s in self.slots.values())
            for _ in range(count - have):
                self._start_actor(node_id, spec)

    def _start_actor(self, node_id: str, spec: ActorSpec) -> None:
        actor_id = next(f"r{i}" for i in range(1, len(self.slots) + 2) if f"r{i}" not in self.slots)
        handle = self._actor_cls.options(**actor_options(spec, node_id, self.cfg.ray.runtime_env)).remote(
            self._config_json, actor_id, spec.memory_fraction)
        status = WorkerStatus(actor_id, os.getpid(), node=node_id)
        slot = ActorSlot(actor_id, node_id, spec, handle, status, boot_ref=handle.ready.remote())
        self.slots[actor_id] = slot
        self._write_worker_status(slot)
        logger.info("actor {} starting on node {} ({:g} CPU, {:g} GPU)", actor_id, node_id[:12], spec.num_cpus,
                    spec.num_gpus)

    def _booted(self, slot: ActorSlot, info: dict[str, Any]) -> None:
        slot.boot_ref = None
        s = slot.status
        s.actor_pid, s.device, s.dtype = info.get("pid"), info.get("device"), info.get("dtype")
        s.patches, s.ready_after_s = list(info.get("patches") or []), info.get("ready_after_s")
        if info.get("error"):
            s.state, s.error = "boot_failed", info["error"]
            self._write_worker_status(slot)
            self.fatal = f"actor {slot.actor_id} on node {slot.node_id[:12]} could not boot: {info['error']['message']}"
            return
        s.state = "ready"
        self.early_deaths = 0
        self._write_worker_status(slot)
        self.wake.set()
        logger.info("actor {} ready on {} (pid {}, GPUs {}, CUDA_VISIBLE_DEVICES={}) in {}s", slot.actor_id,
                    s.device, s.actor_pid, info.get("gpu_ids") or "none", info.get("cuda_visible_devices"),
                    s.ready_after_s)

    def _lose(self, slot: ActorSlot, why: str) -> None:
        """The actor is gone (or must go): requeue its job, forget it, and replan soon."""
        if slot.dispatch is not None:
            self._settle(slot, slot.dispatch, None, lost=why)
        kill_actor(slot.handle)
        self.slots.pop(slot.actor_id, None)
        slot.status.state, slot.status.job = "exited", None
        slot.status.error = {"reason": "actor_lost", "message": why}
        self._write_worker_status(slot)
        if self.stop_event.is_set():
            return
        self.restarts_total += 1
        if not slot.ready and slot.node_id in {n.node_id for n in live_nodes()}:  # a node leaving is no boot fault
            self.early_deaths += 1
            if self.early_deaths >= MAX_EARLY_DEATHS:
                self.fatal = f"{self.early_deaths} actors in a row died before becoming ready (last: {why})"
        delay = min(0.5 * 2 ** min(self.early_deaths, 6), self.cfg.pool.respawn_backoff_max)
        self._respawn_at, self._next_resize = time.time() + delay, 0.0
        logger.warning("actor {} lost: {}; replacing it in {:.1f}s", slot.actor_id, why, delay)

    def _stop_actors(self) -> None:
        for slot in list(self.slots.values()):
            if slot.dispatch is not None:  # drained already; anything left goes back to the inbox
                self._settle(slot, slot.dispatch, None, lost=f"the server stopped during the job (not finished "
                             f"within pool.shutdown_timeout={self.cfg.pool.shutdown_timeout:g}s)",
                             reason="server_stopped")
            kill_actor(slot.handle)
            slot.status.state, slot.status.job = "exited", None
            self._write_worker_status(slot)
        self.slots.clear()

    # ------------------------------------------------------------------ jobs
    def _dispatch(self) -> None:
        idle = [s for s in self.slots.values() if s.idle]
        now = time.time()
        if not idle or not (self.wake.is_set() or now >= self._next_scan):
            return
        self.wake.clear()
        self._next_scan = now + min(self.cfg.pool.rescan_interval, max(self.cfg.pool.settle_seconds, 0.05))
        for slot in idle:
            while slot.idle:
                job = self.td.claim_next(slot.actor_id)
                if job is None:
                    return
                self._send(slot, job)

    def _send(self, slot: ActorSlot, job: Job) -> None:
        """Check the job here (no bytes shipped for a file that cannot be audio), then send it."""
        import ray

        logger.info("job {} ({!r}, attempt {}) -> actor {}", job.job_id, job.record.original_name,
                    job.record.attempts, slot.actor_id)
        sent = time.time()  # the hand-off starts here: reading the bytes and the object-store put count
        try:
            options = prepare_job(self.td, job)
            check_file(job.audio_path, self.cfg.input.allowed_extensions, self.cfg.input.max_file_mb,
                       extension=job.extension)
            payload = {"job_id": job.job_id, "name": job.record.original_name, "extension": job.extension,
                       "options": options.engine_kwargs(self.cfg)}
            audio = None
            if self.cfg.ray.audio_transfer == "shared_mount":
                payload["path"] = str(job.audio_path.resolve())
            else:
                audio = ray.put(job.audio_path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - the job's own fault: recorded, the actor stays idle
            self._count(slot, commit_result(self.td, job, None, exc, self.cfg, slot.actor_id, self.notifier)[0], None)
            return
        slot.dispatch = Dispatch(job, options, slot.handle.transcribe.remote(payload, audio), job.record.attempts,
                                 sent)
        slot.status.start_job(job.job_id)
        self._write_worker_status(slot)

    def _holds(self, slot: ActorSlot, dispatch: Dispatch) -> bool:
        """Fencing: this dispatch is the actor's current one and this process still holds the job's lease
        (`TaskDir.check_owner`; `complete`/`release`/`fail` check it again before they touch anything)."""
        if slot.dispatch is not dispatch:
            return False
        try:
            self.td.check_owner(dispatch.job)
        except LeaseLost:
            return False
        return True

    def _settle(self, slot: ActorSlot, dispatch: Dispatch, reply: dict[str, Any] | None, *,
                lost: str | None = None, reason: str = "actor_lost") -> str:
        """Commit, fail or requeue one dispatch, exactly once; a dispatch no longer held is dropped."""
        if not self._holds(slot, dispatch):
            if slot.dispatch is dispatch:  # the lease was lost (recovered elsewhere): free the actor, touch nothing
                slot.dispatch = None
                self.td.abandon(dispatch.job)
                self._count(slot, "lost", None)
            logger.warning("job {}: dropped an answer from actor {} for attempt {}: the job is no longer held",
                           dispatch.job.job_id, slot.actor_id, dispatch.attempt)
            return "stale"
        slot.dispatch = None
        job = dispatch.job
        if lost is not None:
            # a stop this server decided (shutdown) gives the attempt back; a lost actor counts
            try:
                outcome = self.td.release(job, {"reason": reason, "error_type": "WorkerLost", "message": lost,
                                                "retryable": True, "worker": slot.actor_id},
                                          counted=reason != "server_stopped")
            except (LeaseLost, OSError) as e:  # cannot requeue it: the sweep does, later
                logger.error("job {}: cannot requeue it ({}); left for the sweep", job.job_id, e)
                self.td.abandon(job)
                outcome = "lost" if isinstance(e, LeaseLost) else "abandoned"
            self._count(slot, outcome, None)
            return outcome
        answer: Result | BaseException
        if reply and reply.get("ok"):
            try:
                answer = Result.from_dict(reply["result"])
            except Exception as exc:  # noqa: BLE001 - a malformed answer: retryable, like a failed commit
                answer = exc
        else:
            answer = ReportedError((reply or {}).get("error") or {"reason": "internal_error", "message": "no answer"})
        # the pool's commit: the same fence, the same settling of a failed commit or a lost lease
        outcome, result = commit_result(self.td, job, dispatch.options, answer, self.cfg, slot.actor_id,
                                        self.notifier)
        if result is not None:  # what Ray added: send + call + answer, beyond the actor's own processing time
            logger.info("job {} (actor {}): Ray hand-off {:.0f} ms", job.job_id, slot.actor_id,
                        (time.time() - dispatch.sent_ts - result.processing_time) * 1000)
        self._count(slot, outcome, result)
        return outcome

    def _count(self, slot: ActorSlot, outcome: str, result: Result | None) -> None:
        if slot.status.state in ("busy", "ready"):
            slot.status.end_job(outcome, result)
        self._write_worker_status(slot)
        self.wake.set()

    # ------------------------------------------------------------------ waiting
    def _pending(self) -> dict[Any, tuple[str, ActorSlot]]:
        refs: dict[Any, tuple[str, ActorSlot]] = {}
        for slot in self.slots.values():
            if slot.boot_ref is not None:
                refs[slot.boot_ref] = ("boot", slot)
            if slot.dispatch is not None:
                refs[slot.dispatch.ref] = ("job", slot)
            if slot.ping_ref is not None:
                refs[slot.ping_ref] = ("ping", slot)
        return refs

    def _wait_and_settle(self, timeout: float) -> None:
        import ray

        pending = self._pending()
        if not pending:
            self.stop_event.wait(timeout)
            return
        done, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
        if done:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        for ref in done:
            kind, slot = pending[ref]
            if self.slots.get(slot.actor_id) is not slot:
                continue  # lost earlier in this turn
            try:
                value = ray.get(ref)
            except ray.exceptions.RayError as e:
                self._lose(slot, f"{type(e).__name__} during {kind}: {str(e).splitlines()[0][:300]}")
                continue
            if kind == "boot":
                self._booted(slot, value)
            elif kind == "job":
                self._settle(slot, slot.dispatch, value)
            else:
                slot.ping_ref = None
                self._progress(slot, value)

    def _progress(self, slot: ActorSlot, info: dict[str, Any]) -> None:
        s = slot.status
        s.rss_mb = info.get("rss_mb") or s.rss_mb
        if slot.dispatch is None or not info.get("stage"):
            return
        s.job_stage, s.progress_ts = info["stage"], info.get("progress_ts")
        stalled = time.time() - (s.progress_ts or time.time())
        if stalled > self.cfg.pool.job_stall_timeout:
            self._lose(slot, f"job {s.job} made no progress for {stalled:.0f}s (pool.job_stall_timeout)")

    def _beat(self) -> None:
        """Every heartbeat_interval: ping each actor (progress, memory, liveness) and rewrite the status files."""
        now = time.time()
        if now < self._next_beat:
            return
        self._next_beat = now + self.cfg.pool.heartbeat_interval
        for slot in self.slots.values():
            if slot.ready and slot.ping_ref is None:
                slot.ping_ref = slot.handle.progress.remote()
            self._write_worker_status(slot)
        self._write_server_status("running")
        if self.metrics is not None:
            try:
                self.metrics.update([s.status.state for s in self.slots.values()], self.restarts_total)
            except OSError as e:
                logger.warning("cannot write metrics to {}: {}", self.metrics.path, e)

    def _drain(self) -> None:
        """Stop claiming; give running jobs `pool.shutdown_timeout` to finish."""
        busy = sum(s.dispatch is not None for s in self.slots.values())
        logger.info("stopping: {} running jobs get {}s to finish", busy, self.cfg.pool.shutdown_timeout)
        deadline = time.time() + self.cfg.pool.shutdown_timeout
        while any(s.dispatch is not None for s in self.slots.values()) and time.time() < deadline:
            self._wait_and_settle(TICK)

    # ------------------------------------------------------------------ status files
    def _write_worker_status(self, slot: ActorSlot) -> None:
        try:
            write_atomic(self.td.workers / f"{slot.actor_id}.json", slot.status.to_json(), self.td.tmp, 0o640)
        except OSError as e:
            logger.warning("cannot write the status of actor {}: {}", slot.actor_id, e)

    def _write_server_status(self, state: str) -> None:
        self.status_file.write({
            "pid": os.getpid(), "state": state, "mode": "ray",
            "ray_address": self.address, "started_ray": self._started_ray, "nodes": len(self._nodes_seen),
            "workers": [{"worker_id": s.actor_id, "pid": s.status.actor_pid, "node": s.node_id,
                         "num_gpus": s.spec.num_gpus, "num_cpus": s.spec.num_cpus} for s in self.slots.values()],
            "restarts_total": self.restarts_total,
        })


def serve_ray(cfg: Config, address: str | None = None) -> int:
    return RayServer(cfg, address).run()
