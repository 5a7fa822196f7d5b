"""The pool supervisor (modelled on gunicorn's arbiter): one loop that keeps N workers alive.

The decisions live in `PoolCore`, a small state machine driven by `tick()` with an injected clock,
process table and status reader (tests drive it without processes). Each turn: reap dead workers;
note heartbeats (on the monotonic clock: when a status file's mtime last *changed*, never mtime vs.
wall time); kill workers whose heartbeat is stale or that never became ready; respawn what is missing,
with exponential backoff; roll a reload forward. `Supervisor` wires it to real processes, signals and
the task directory, and sweeps processing/ for jobs whose lease nobody holds (a dead worker's).

Attempts mean "the job failed": a worker the supervisor itself stops (reload, shutdown) has its job
requeued without spending an attempt. Reload (SIGHUP) is graceful: new workers first, then each old
one drains (finishes its job, claims no more) within `pool.graceful_timeout`. A worker that cannot boot
stops the pool at start-up; after a reload the old workers are kept instead; a respawned worker's boot
failure stops the pool only after `MAX_BOOT_FAILURES` in a row.

The supervisor never imports torch or FunASR: devices are probed in a short-lived subprocess,
and every GPU/MPS backend is initialised only inside workers. With the forkserver start method the
workers are children of the fork server (itself a child of the supervisor), in the same process group.

CUDA MPS (`pool.cuda_mps`, cuda_mps.py): when the plan puts a worker on CUDA, the supervisor starts a
private MPS control daemon before the first worker and puts its pipe directory in os.environ, which the
fork server copies when it starts (at the first worker); it tells the daemon to quit after the last worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from loguru import logger

from transcribe.config import Config
from transcribe.core import fault_injection
from transcribe.core.errors import ConfigError
from transcribe.core.metrics import PoolMetrics, worker_states
from transcribe.core.pool.cuda_mps import MpsDaemon, MpsError, decide, private_pipe_dir
from transcribe.core.pool.heartbeat import read_worker_status
from transcribe.core.pool.task_dir import Housekeeping, TaskDir
from transcribe.core.status import ServerStatusFile
from transcribe.core.pool.worker_process import (
    EXIT_BOOT_FAILED,
    EXIT_OK,
    EXIT_RECYCLE,
    worker_main,
)

METRICS_INTERVAL = 2.0  # seconds between metrics text-file writes
TICK = 0.25  # seconds between loop turns when nothing wakes us
KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL for a stale worker
MAX_BOOT_FAILURES = 3  # a slot's workers dying before ready, in a row, that stop the pool
STABLE_AFTER = 60.0  # a worker that ran this long before dying resets its slot's crash backoff


class ProcessHandle(Protocol):
    pid: int | None
    exitcode: int | None

    def is_alive(self) -> bool: ...


@dataclass
class PoolParams:
    """The `pool.*` settings the loop's decisions use (reloadable)."""

    heartbeat_timeout: float = 60.0
    boot_timeout: float = 600.0
    shutdown_timeout: float = 30.0
    graceful_timeout: float = 600.0
    respawn_backoff_max: float = 30.0

    @classmethod
    def from_config(cls, cfg: Config) -> PoolParams:
        p = cfg.pool
        return cls(p.heartbeat_timeout, p.boot_timeout, p.shutdown_timeout, p.graceful_timeout,
                   p.respawn_backoff_max)


@dataclass
class WorkerProc:
    """One worker process and what the supervisor knows of it."""

    worker_id: str
    generation: int
    handle: Any
    spawned: float  # monotonic
    ready: bool = False
    ready_at: float | None = None
    beat_mtime: float | None = None  # the status file's mtime when last seen to change
    beat_seen: float = 0.0  # monotonic time of that change
    term_at: float | None = None  # SIGTERM sent (drain: finish the job in hand, claim no more)
    killed: bool = False  # SIGKILL sent
    stop_reason: str | None = None  # why we stopped it: reload, shutdown, stale, boot_timeout
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int | None:
        return self.handle.pid


@dataclass
class Slot:
    """One worker position of the current generation."""

    worker_id: str
    device: str | None
    generation: int
    proc: WorkerProc | None = None
    restarts: int = 0
    crashes: int = 0  # deaths after ready in a row (each within STABLE_AFTER of becoming ready)
    boot_failures: int = 0  # deaths before ready in a row
    respawn_at: float = 0.0
    ever_ready: bool = False

    @property
    def process(self) -> Any:  # what metrics.worker_states and status read
        return self.proc.handle if self.proc else None

    @property
    def stats(self) -> dict[str, Any]:
        return self.proc.stats if self.proc else {}


def backoff(failures: int, cap: float) -> float:
    """0.5 s, 1 s, 2 s, ... up to `cap`: the wait before respawning after `failures` deaths in a row."""
    return min(0.5 * 2 ** max(0, min(failures - 1, 16)), cap)


class PoolCore:
    """The supervisor's decisions, on an injected clock, process table and status reader.

    `spawn(slot) -> handle` starts a worker for a slot; `send(pid, sig)` signals one; `read_status(id)`
    returns (status dict, mtime or None). `tick()` returns the workers reaped this turn.
    """

    def __init__(self, devices: list[str | None], params: PoolParams, *, spawn: Callable[[Slot], Any],
                 send: Callable[[int, int], None], read_status: Callable[[str], tuple[dict[str, Any], float | None]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.params, self._spawn_fn, self._send, self._read_status, self.clock = params, spawn, send, read_status, clock
        self.generation = 0
        self._next_id = 0
        self.slots = [self._new_slot(dev) for dev in devices]
        self.legacy: list[WorkerProc] = []  # workers of an older generation, serving or draining
        self._previous: tuple[int, list[Slot], PoolParams] | None = None  # to revert a reload that cannot boot
        self.stopping = False
        self.fatal: str | None = None
        self.uncounted_pids: set[int] = set()  # workers we killed: their jobs are requeued without an attempt
        self.restarts_total = 0
        self.reverted: str | None = None  # set when a reload was abandoned (the supervisor reverts its config)

    def _new_slot(self, device: str | None) -> Slot:
        self._next_id += 1
        return Slot(f"w{self._next_id}", device, self.generation)

    # ------------------------------------------------------------------ commands
    def start(self) -> None:
        for slot in self.slots:
            self._spawn(slot)

    def reload(self, devices: list[str | None], params: PoolParams) -> None:
        """A new generation: new slots (new worker ids) spawn first; old workers drain as new ones are ready."""
        if self._previous is None:
            self._previous = (self.generation, self.slots, self.params)
        self.legacy += [s.proc for s in self.slots if s.proc is not None]
        self.generation += 1
        self.params = params
        self.slots = [self._new_slot(dev) for dev in devices]

    def begin_shutdown(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        for proc in self.live():
            if proc.term_at is None:
                self._terminate(proc, "shutdown")

    def live(self) -> list[WorkerProc]:
        return [*(s.proc for s in self.slots if s.proc is not None), *self.legacy]

    @property
    def finished(self) -> bool:
        return self.stopping and not self.live()

    # ------------------------------------------------------------------ one turn
    def tick(self) -> list[WorkerProc]:
        now = self.clock()
        reaped = self._reap(now)
        self._check(now)
        if not self.stopping and not self.fatal:
            self._spawn_missing(now)
            self._roll(now)
        return reaped

    def _spawn(self, slot: Slot) -> None:
        handle = self._spawn_fn(slot)
        now = self.clock()
        slot.proc = WorkerProc(slot.worker_id, slot.generation, handle, now, beat_seen=now)
        logger.info("worker {} spawned (pid {}, device {})", slot.worker_id, handle.pid, slot.device or "auto")

    def _reap(self, now: float) -> list[WorkerProc]:
        reaped = []
        for proc in list(self.legacy):
            if not proc.handle.is_alive():
                self.legacy.remove(proc)
                reaped.append(proc)
                logger.info("worker {} (pid {}, old config) exited with code {}", proc.worker_id, proc.pid,
                            proc.handle.exitcode)
        for slot in self.slots:
            proc = slot.proc
            if proc is None or proc.handle.is_alive():
                continue
            slot.proc = None
            reaped.append(proc)
            self._after_death(slot, proc, now)
        if self._previous is not None and not self.legacy and all(s.ever_ready for s in self.slots):
            self._previous = None  # the reload is complete: nothing to revert to any more
        return reaped

    def _after_death(self, slot: Slot, proc: WorkerProc, now: float) -> None:
        code = proc.handle.exitcode
        logger.debug("worker {} (pid {}) exited with code {}", slot.worker_id, proc.pid, code)
        if self.stopping or self.fatal:
            return
        if proc.stop_reason is None and code in (EXIT_OK, EXIT_RECYCLE):  # a planned recycle
            slot.respawn_at = now
            return
        if not proc.ready:
            slot.boot_failures += 1
            err = (proc.stats.get("error") or {}).get("message") or f"exit code {code}"
            if self._previous is not None and not slot.ever_ready:
                self._revert(f"worker {slot.worker_id} of the new config could not boot: {err}")
                return
            if code == EXIT_BOOT_FAILED and not any(s.ever_ready for s in self.slots):
                self.fatal = f"worker {slot.worker_id} could not boot: {err}"
                return
            if slot.boot_failures >= MAX_BOOT_FAILURES:
                self.fatal = (f"worker {slot.worker_id} died {slot.boot_failures} times before becoming ready "
                              f"(last: {err}); see logs/worker-{slot.worker_id}.log")
                return
            delay = backoff(slot.boot_failures, self.params.respawn_backoff_max)
        else:
            self.restarts_total += 1
            slot.restarts += 1
            stable = proc.ready_at is not None and now - proc.ready_at >= STABLE_AFTER
            slot.crashes = 1 if stable else slot.crashes + 1
            delay = backoff(slot.crashes, self.params.respawn_backoff_max)
        slot.respawn_at = now + delay
        logger.warning("worker {} (pid {}) died with exit code {}; respawning in {:.1f}s", slot.worker_id,
                       proc.pid, code, delay)

    def _revert(self, why: str) -> None:
        assert self._previous is not None
        generation, slots, params = self._previous
        logger.error("reload abandoned: {}; keeping the previous config's workers", why)
        for slot in self.slots:  # the new generation's workers go
            if slot.proc is not None:
                self.legacy.append(slot.proc)
                self._terminate(slot.proc, "reload")
        by_id = {p.worker_id: p for p in self.legacy if p.term_at is None}
        for slot in slots:  # the old ones come back; a slot whose worker already drained respawns
            slot.proc = by_id.get(slot.worker_id)
            if slot.proc is not None:
                self.legacy.remove(slot.proc)
        self.generation, self.slots, self.params, self._previous = generation, slots, params, None
        self.reverted = why

    def _check(self, now: float) -> None:
        p = self.params
        for slot in self.slots:
            if slot.proc is not None:
                self._observe(slot.proc, now, slot)
        for proc in self.legacy:
            self._observe(proc, now, None)
        for proc in self.live():
            if proc.killed:
                continue
            if proc.term_at is not None:
                limit = {"shutdown": p.shutdown_timeout, "reload": p.graceful_timeout}.get(proc.stop_reason or "",
                                                                                         KILL_GRACE)
                if now - proc.term_at > limit:
                    logger.warning("worker {} (pid {}) did not stop within {}s; SIGKILL", proc.worker_id, proc.pid,
                                   limit)
                    self._kill(proc)
                continue
            if not proc.ready and now - proc.spawned > p.boot_timeout:
                logger.error("worker {} not ready after {}s (pool.boot_timeout); killing", proc.worker_id,
                             p.boot_timeout)
                proc.stop_reason = "boot_timeout"
                self._kill(proc)
            elif proc.ready and now - proc.beat_seen > p.heartbeat_timeout:
                logger.error("worker {} heartbeat is {:.0f}s old (pool.heartbeat_timeout={}s); killing",
                             proc.worker_id, now - proc.beat_seen, p.heartbeat_timeout)
                self._terminate(proc, "stale")

    def _observe(self, proc: WorkerProc, now: float, slot: Slot | None) -> None:
        status, mtime = self._read_status(proc.worker_id)
        if status.get("pid") != proc.pid:
            return  # the file is still the previous process's
        proc.stats = status
        if mtime is not None and mtime != proc.beat_mtime:
            proc.beat_mtime, proc.beat_seen = mtime, now
        if not proc.ready and status.get("state") in ("ready", "busy"):
            proc.ready, proc.ready_at = True, now
            if slot is not None:
                slot.ever_ready, slot.boot_failures = True, 0

    def _spawn_missing(self, now: float) -> None:
        serving_legacy = [p for p in self.legacy if p.term_at is None]
        for slot in self.slots:
            if slot.proc is not None or now < slot.respawn_at:
                continue
            booting = sum(1 for s in self.slots if s.proc is not None and not s.proc.ready)
            if serving_legacy and booting >= 1:
                return  # during a reload, one new worker boots at a time (memory: at most N+1 models)
            self._spawn(slot)

    def _roll(self, now: float) -> None:
        """Retire old workers while ready new ones + serving old ones exceed the wanted count."""
        serving = [p for p in self.legacy if p.term_at is None]
        ready_new = sum(1 for s in self.slots if s.proc is not None and s.proc.ready)
        while serving and ready_new + len(serving) > len(self.slots):
            proc = serving.pop(0)
            logger.info("worker {} retiring for the new config (drains its job, up to {}s)", proc.worker_id,
                        self.params.graceful_timeout)
            self._terminate(proc, "reload")

    def _terminate(self, proc: WorkerProc, reason: str) -> None:
        proc.stop_reason, proc.term_at = reason, self.clock()
        self._signal(proc, signal.SIGTERM)

    def _kill(self, proc: WorkerProc) -> None:
        if proc.stop_reason in ("reload", "shutdown") and proc.pid is not None:
            self.uncounted_pids.add(proc.pid)  # our decision, not the job's fault
        proc.killed = True
        self._signal(proc, signal.SIGKILL)

    def _signal(self, proc: WorkerProc, sig: int) -> None:
        if proc.pid is not None:
            self._send(proc.pid, sig)


@dataclass(frozen=True)
class DeviceProbe:
    """What torch sees: the usable devices, best first, and the smallest CUDA card's memory (None: no CUDA)."""

    devices: list[str]
    gpu_memory: int | None = None


PROBE_CODE = """
import json, torch
from transcribe.core.engine.device_manager import DeviceManager as D
devices = D.detect_available_devices()
cards = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())
         if f"cuda:{i}" in devices]
print(json.dumps({"devices": devices, "gpu_memory": min(cards) if cards else None}))
"""


def probe_devices() -> DeviceProbe:
    """What torch sees, asked of a subprocess so the supervisor never initialises a GPU backend."""
    try:
        out = subprocess.run([sys.executable, "-c", PROBE_CODE], capture_output=True, text=True, timeout=120,
                             check=True)
        found = json.loads(out.stdout.strip().splitlines()[-1])
        return DeviceProbe(list(found["devices"]), found.get("gpu_memory"))
    except (subprocess.SubprocessError, ValueError, IndexError, KeyError, TypeError) as e:
        logger.warning("device probe failed ({}); planning for cpu", e)
        return DeviceProbe(["cpu"])


GIB = 2**30
WORKER_MEMORY = 4 * GIB  # host memory per CUDA worker that "auto" plans for (a large-model worker: ~3.2 GB RSS)
# GPU memory per CUDA worker that "auto" plans for, and per further job a batching worker holds at once
# (pool.batch_jobs): on an H100 under CUDA MPS, 16 large-model workers peaked at 3.2-3.8 GB each on 10-minute
# jobs, 4.4-5.0 GB with batch_jobs 2 (80.7 of 81.5 GB in all); a worker that runs out falls back to the CPU
GPU_WORKER_MEMORY = 4 * GIB
GPU_MEMORY_PER_BATCHED_JOB = 1 * GIB
MAX_WORKERS_PER_GPU = 16


@dataclass(frozen=True)
class PoolPlan:
    """What a pool runs: each worker's device (None: its own device manager chooses), the CPU threads each
    worker gets when the plan chose them (None: ``funasr.ncpu`` as configured), whether any worker is on CUDA."""

    devices: list[str | None]
    ncpu: int | None = None
    cuda: bool = False


def mem_available_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """The kernel's MemAvailable estimate, or None where it cannot be read (not Linux)."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def plan_pool(cfg: Config, available: list[str], cpu_count: int | None = None,
              mem_available: Callable[[], int | None] = mem_available_bytes,
              gpu_memory: int | None = None) -> PoolPlan:
    """The pool's workers and their devices.

    - ``pool.devices`` given: one worker per entry (``pool.workers`` then only checks the count).
    - Several GPUs and a CUDA-bound config: workers are spread round-robin over cuda:0..k-1.
    - ``pool.workers: "auto"``: on CUDA one worker per CPU core, 2 to 16 per GPU, no more than
      MemAvailable // 4 GiB, nor than the smallest card's memory (`gpu_memory`) // 4 GiB per GPU (1 GiB
      more per further job of ``pool.batch_jobs``); each then gets cores // workers CPU threads unless
      ``funasr.ncpu`` is set.
      Else 1 on MPS; else cores // funasr.ncpu (at least 1).
    """
    p, f = cfg.pool, cfg.funasr
    cores = cpu_count or os.cpu_count() or 1
    gpus = [d for d in available if d.startswith("cuda")]
    wants_cuda = f.device.startswith("cuda") or (f.device == "auto" and f.device_priority[0] == "cuda")
    if p.devices:
        devices: list[str | None] = list(p.devices)
        return PoolPlan(devices, cuda=any(d is not None and d.startswith("cuda") for d in devices))
    ncpu = None
    if p.workers == "auto":
        if gpus and wants_cuda:
            n = max(min(cores, MAX_WORKERS_PER_GPU * len(gpus)), 2 * len(gpus))
            mem = mem_available()
            if mem is not None:
                n = min(n, max(1, mem // WORKER_MEMORY))
            if gpu_memory is not None:
                per_worker = GPU_WORKER_MEMORY + (p.batch_jobs - 1) * GPU_MEMORY_PER_BATCHED_JOB
                n = min(n, max(1, gpu_memory // per_worker) * len(gpus))
            if "ncpu" not in f.model_fields_set:
                ncpu = max(1, cores // n)
        elif "mps" in available and f.device in ("auto", "mps"):
            n = 1
        else:
            n = max(1, cores // f.ncpu)
    else:
        n = int(p.workers)
    if n < 1:
        raise ConfigError("pool.workers must be at least 1")
    cuda = bool(gpus) and wants_cuda
    if len(gpus) > 1 and wants_cuda and f.device in ("auto", "cuda"):
        return PoolPlan([gpus[i % len(gpus)] for i in range(n)], ncpu, cuda)
    return PoolPlan([None] * n, ncpu, cuda)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def command_line_overrides(cfg: Config, config_path: str | None) -> dict[str, Any]:
    """The settings `cfg` holds that the config file (+ environment) does not: the command line's
    (--workers, --task-dir, --log-level). A reload re-applies them, so they survive SIGHUP."""
    from transcribe.config import load_config

    try:
        base = _flat(load_config(config_path).model_dump(mode="json"))
    except Exception:  # noqa: BLE001 - without a readable file, every setting counts as an override
        base = {}
    return {k: v for k, v in _flat(cfg.model_dump(mode="json")).items() if base.get(k, object()) != v}


class Supervisor:
    def __init__(self, cfg: Config, *, config_path: str | None = None,
                 overrides: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.overrides = command_line_overrides(cfg, config_path) if overrides is None else overrides
        self.td = TaskDir.from_config(cfg).ensure()
        self.configs: dict[int, Config] = {0: cfg}  # the config each generation of workers runs
        self.worker_ncpu: dict[int, int | None] = {}  # the CPU threads each generation's plan gave its workers
        self.mps: MpsDaemon | None = None
        self.mps_state: dict[str, Any] = {"state": "off", "reason": "not decided yet"}
        self.core: PoolCore | None = None
        self._signals: list[int] = []
        self.status_file = ServerStatusFile(self.td)
        self._lock_fd: int | None = None
        self._ctx: Any = None
        self.metrics: PoolMetrics | None = None
        if cfg.metrics.textfile:
            self.metrics = PoolMetrics(self.td, cfg.resolve_path(cfg.metrics.textfile))
        self._metrics_due = 0.0
        # a stop the supervisor decided (its pid in uncounted_pids) gives the job's attempt back
        self.housekeeping = Housekeeping(self.td, keep_audio=cfg.pool.keep_audio,
                                         counted=lambda holder: holder.get("pid") not in self._uncounted())

    @property
    def slots(self) -> list[Slot]:
        return self.core.slots if self.core else []

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        fault_injection.exempt()
        self.td.check_one_filesystem()
        self._lock_fd = self.td.acquire_server_lock()
        os.umask(self.cfg.pool.umask)
        self._ctx = self._context()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        self.td.recover_all("supervisor_restart", "the previous supervisor stopped while the job ran",
                            keep_audio=self.cfg.pool.keep_audio)
        plan = self._plan(self.cfg)
        self.worker_ncpu[0] = plan.ncpu
        self.core = core = PoolCore(plan.devices, PoolParams.from_config(self.cfg), spawn=self._spawn,
                                    send=self._send, read_status=self._status_of)
        logger.info("pool: {} workers on {}{} (task dir {})", len(core.slots),
                    ", ".join(s.device or "auto" for s in core.slots),
                    f", {plan.ncpu} CPU threads each" if plan.ncpu else "", self.td.root)
        try:
            self._start_mps(plan)  # before the first worker: the fork server copies os.environ when it starts
            core.start()
            while not core.finished:
                try:
                    self._turn(core)
                except Exception as exc:  # noqa: BLE001 - the loop never dies: log, and try again next turn
                    logger.opt(exception=exc).error("supervisor turn failed: {}", exc)
                if core.fatal and not core.stopping:
                    logger.error("pool stopping: {}", core.fatal)
                    core.begin_shutdown()
                time.sleep(TICK)
        finally:
            if self.mps is not None:  # after the workers: their CUDA contexts are gone
                self.mps.stop()
                self.mps_state["state"] = "stopped"
        self.housekeeping.tick(force=True)  # what the last workers left (a shutdown past its timeout): requeued, not counted
        self._write_status(state="stopped")
        self._metrics_due = 0.0
        self._write_metrics()
        if core.fatal:
            logger.error("pool stopped: {}", core.fatal)
            return 3
        logger.info("pool stopped cleanly")
        return 0

    def _start_mps(self, plan: PoolPlan) -> None:
        """Decide on CUDA MPS (`cuda_mps.decide`), start a private daemon if so, and give its pipe directory to
        every worker through os.environ. auto: a daemon that fails to start is a warning; true: an error."""
        setting = self.cfg.pool.cuda_mps
        decision = decide(setting, plan.cuda)
        self.mps_state = {"state": decision.action, "reason": decision.reason, "pipe_dir": decision.pipe_dir,
                          "cuda": plan.cuda}
        if decision.action != "start":
            logger.info("CUDA MPS: {} ({})", "off" if decision.action == "off" else "using a running daemon",
                        decision.reason)
            return
        assert decision.binary is not None
        pipe_dir, temporary = private_pipe_dir(self.td.root / "cuda-mps")
        daemon = MpsDaemon(decision.binary, pipe_dir, self.cfg.resolve_path(self.cfg.logging.dir) / "cuda-mps",
                           temporary=temporary)
        try:
            daemon.start()
        except MpsError as e:
            daemon.stop()
            if setting is True:
                raise MpsError(f"pool.cuda_mps is true but the MPS daemon did not start: {e.message}; fix it or "
                               "set pool.cuda_mps to \"auto\" (run without MPS when it cannot start)") from None
            logger.warning("CUDA MPS: off: the daemon did not start ({}); workers time-slice the GPU", e.message)
            self.mps_state = {"state": "off", "reason": f"the daemon did not start: {e.message}", "cuda": True}
            return
        self.mps = daemon
        os.environ.update(daemon.env)
        self.mps_state = {"state": "on", "reason": decision.reason, "pipe_dir": str(pipe_dir), "pid": daemon.pid,
                          "cuda": True}
        logger.info("CUDA MPS: on ({}; pipe dir {})", decision.reason, pipe_dir)

    def _check_mps(self) -> None:
        """A daemon that died while serving is reported once; it is not restarted (documented in operations.md)."""
        if self.mps is not None and self.mps_state["state"] == "on" and not self.mps.alive():
            code = self.mps.proc.returncode if self.mps.proc else None
            logger.error("CUDA MPS daemon (pid {}) exited unexpectedly with code {}; not restarted: workers "
                         "already running keep what CUDA gives them, new ones may run without MPS (see {})",
                         self.mps.pid, code, self.mps.log_dir)
            self.mps_state = {**self.mps_state, "state": "died", "reason": f"the daemon exited with code {code}"}

    def _turn(self, core: PoolCore) -> None:
        self._handle_signals(core)
        self._check_mps()
        reaped = core.tick()
        if core.reverted:
            self.cfg = self.configs[core.generation]
            core.reverted = None
        current = {s.worker_id for s in core.slots}
        for proc in reaped:
            if proc.worker_id not in current:  # a retired worker: its status file goes with it
                with contextlib.suppress(OSError):
                    (self.td.workers / f"{proc.worker_id}.json").unlink()
        self.housekeeping.tick(force=bool(reaped))
        self._write_status()
        self._write_metrics()

    def _uncounted(self) -> set[int]:
        return self.core.uncounted_pids if self.core else set()

    @staticmethod
    def _plan(cfg: Config) -> PoolPlan:
        """`plan_pool` on what torch sees, probed only where the plan depends on it."""
        needs_probe = cfg.pool.workers == "auto" or cfg.funasr.device in ("auto", "cuda")
        probe = probe_devices() if needs_probe else DeviceProbe(["cpu"])
        return plan_pool(cfg, probe.devices, gpu_memory=probe.gpu_memory)

    def _context(self) -> Any:
        import multiprocess

        ctx = multiprocess.get_context(self.cfg.pool.start_method)
        if self.cfg.pool.start_method == "forkserver":
            ctx.set_forkserver_preload(["transcribe.core.pool.preload"])  # FunASR imported once, not per worker
        return ctx

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)

    def _handle_signals(self, core: PoolCore) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            if sig in (signal.SIGTERM, signal.SIGINT) and not core.stopping:
                logger.info("{}: stopping (running jobs get {}s to finish)", signal.Signals(sig).name,
                            self.cfg.pool.shutdown_timeout)
                core.begin_shutdown()
            elif sig == signal.SIGHUP and not core.stopping:
                self._reload(core)

    def _reload(self, core: PoolCore) -> None:
        """Re-read the config file, re-apply the command-line overrides, start a new generation."""
        from transcribe.config import load_config

        try:
            cfg = load_config(self.config_path, overrides=self.overrides)
            plan = self._plan(cfg)
        except ConfigError as e:
            logger.error("SIGHUP: config not reloaded: {}", e.message)
            return
        if Path(cfg.resolve_path(cfg.pool.task_dir)) != self.td.root:
            logger.warning("SIGHUP: pool.task_dir cannot change while serving; keeping {}", self.td.root)
            cfg.pool.task_dir = str(self.td.root)
        self.cfg = cfg
        self.td.settle_seconds, self.td.max_attempts = cfg.pool.settle_seconds, cfg.pool.max_attempts
        if cfg.pool.cuda_mps != self.configs[0].pool.cuda_mps:
            logger.warning("SIGHUP: pool.cuda_mps is read at start only; MPS stays {}", self.mps_state["state"])
        core.reload(plan.devices, PoolParams.from_config(cfg))
        self.configs[core.generation] = cfg  # kept: a reload that cannot boot reverts to an older one
        self.worker_ncpu[core.generation] = plan.ncpu
        logger.info("SIGHUP: config reloaded; {} new workers start, then the old ones drain", len(core.slots))

    # ------------------------------------------------------------------ processes
    def _spawn(self, slot: Slot) -> Any:
        cfg = self.configs.get(slot.generation, self.cfg)
        data = cfg.model_dump(mode="json")
        if self.worker_ncpu.get(slot.generation):  # the plan's share of the cores (workers: auto on CUDA)
            data["funasr"]["ncpu"] = self.worker_ncpu[slot.generation]
        payload = json.dumps({"config": data, "base_dir": cfg.base_dir})
        proc = self._ctx.Process(target=worker_main, args=(payload, slot.worker_id, slot.device, os.getpid()),
                                 name=f"transcribe-{slot.worker_id}", daemon=False)
        proc.start()
        return proc

    @staticmethod
    def _send(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _status_of(self, worker_id: str) -> tuple[dict[str, Any], float | None]:
        return read_worker_status(self.td.workers / f"{worker_id}.json") or ({}, None)

    # ------------------------------------------------------------------ status
    def _write_metrics(self) -> None:
        if self.metrics is None or time.time() < self._metrics_due or self.core is None:
            return
        self._metrics_due = time.time() + METRICS_INTERVAL
        try:
            self.metrics.update(worker_states(self.core.slots), self.core.restarts_total)
        except OSError as e:
            logger.warning("cannot write metrics to {}: {}", self.metrics.path, e)

    def _write_status(self, state: str = "running") -> None:
        core = self.core
        self.status_file.write({
            "pid": os.getpid(), "state": state, "mode": "pool",
            "workers": [{"worker_id": s.worker_id, "pid": s.proc.pid if s.proc else None,
                         "device": s.device, "restarts": s.restarts} for s in (core.slots if core else [])],
            "draining": [{"worker_id": p.worker_id, "pid": p.pid} for p in (core.legacy if core else [])],
            "restarts_total": core.restarts_total if core else 0,
            "cuda_mps": self.mps_state,
        })
