"""The pool supervisor (modelled on gunicorn's arbiter): one loop that keeps N workers alive.

Each turn of the loop: handle signals; reap dead workers and requeue the job each held; kill
workers whose heartbeat is stale; respawn what is missing, with backoff. A worker that cannot
boot (its models do not load) stops the pool with that error instead of respawning forever.

The supervisor never imports torch or FunASR: devices are probed in a short-lived subprocess,
and every GPU/MPS backend is initialised only inside workers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from transcribe.config import Config
from transcribe.core.errors import ConfigError
from transcribe.core.fsio import now_iso, write_atomic
from transcribe.core.metrics import PoolMetrics, worker_states
from transcribe.core.pool.task_dir import TaskDir
from transcribe.core.pool.worker_process import (
    EXIT_BOOT_FAILED,
    EXIT_OK,
    EXIT_RECYCLE,
    worker_main,
)

METRICS_INTERVAL = 2.0  # seconds between metrics text-file writes
TICK = 0.25  # seconds between loop turns when nothing wakes us
KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL for a stale worker
MAX_EARLY_DEATHS = 3  # workers dying before ready, in a row, that stop the pool


@dataclass
class Slot:
    """One worker position: the process in it now, and its history."""

    worker_id: str
    device: str | None
    process: Any = None
    spawned_at: float = 0.0
    ready: bool = False
    restarts: int = 0
    early_deaths: int = 0
    respawn_at: float = 0.0
    term_sent_at: float | None = None
    generation: int = 0
    stats: dict[str, Any] = field(default_factory=dict)


def probe_devices() -> list[str]:
    """What torch sees, asked of a subprocess so the supervisor never initialises a GPU backend."""
    code = "import json; from transcribe.core.engine.device_manager import DeviceManager as D; " \
           "print(json.dumps(D.detect_available_devices()))"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as e:
        logger.warning("device probe failed ({}); planning for cpu", e)
        return ["cpu"]


def plan_workers(cfg: Config, available: list[str], cpu_count: int | None = None) -> list[str | None]:
    """The device of each worker (None: let the worker's own device manager choose).

    - ``pool.devices`` given: one worker per entry (``pool.workers`` then only checks the count).
    - Several GPUs and a CUDA-bound config: workers are spread round-robin over cuda:0..k-1.
    - ``pool.workers: "auto"``: 2 per GPU; else 1 on MPS; else cores // funasr.ncpu (at least 1).
    """
    p, f = cfg.pool, cfg.funasr
    if p.devices:
        return list(p.devices)
    gpus = [d for d in available if d.startswith("cuda")]
    wants_cuda = f.device.startswith("cuda") or (f.device == "auto" and f.device_priority[0] == "cuda")
    if p.workers == "auto":
        if gpus and wants_cuda:
            n = 2 * len(gpus)
        elif "mps" in available and f.device in ("auto", "mps"):
            n = 1
        else:
            n = max(1, (cpu_count or os.cpu_count() or 1) // f.ncpu)
    else:
        n = int(p.workers)
    if n < 1:
        raise ConfigError("pool.workers must be at least 1")
    if len(gpus) > 1 and wants_cuda and f.device in ("auto", "cuda"):
        return [gpus[i % len(gpus)] for i in range(n)]
    return [None] * n


class Supervisor:
    def __init__(self, cfg: Config, *, config_path: str | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.td = TaskDir.from_config(cfg).ensure()
        self.slots: list[Slot] = []
        self.stopping = False
        self.fatal: str | None = None
        self.generation = 0
        self._signals: list[int] = []
        self._lock_fd: int | None = None
        self._ctx: Any = None
        self.restarts_total = 0
        self.metrics: PoolMetrics | None = None
        if cfg.metrics.textfile:
            self.metrics = PoolMetrics(self.td, cfg.resolve_path(cfg.metrics.textfile))
        self._metrics_due = 0.0

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        self._lock_fd = self.td.acquire_server_lock()
        os.umask(self.cfg.pool.umask)
        self._ctx = self._context()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        self.td.recover_all("supervisor_restart", "the previous supervisor stopped while the job ran",
                            keep_audio=self.cfg.pool.keep_audio)
        devices = plan_workers(self.cfg, probe_devices() if self._needs_probe() else ["cpu"])
        self.slots = [Slot(f"w{i + 1}", dev) for i, dev in enumerate(devices)]
        logger.info("pool: {} workers on {} (task dir {})", len(self.slots),
                    ", ".join(s.device or "auto" for s in self.slots), self.td.root)
        for slot in self.slots:
            self._spawn(slot)
        try:
            while True:
                self._handle_signals()
                self._reap()
                if self.stopping or self.fatal:
                    break
                self._check_workers()
                self._spawn_missing()
                self._roll_generation()
                self._write_status()
                self._write_metrics()
                time.sleep(TICK)
        finally:
            self._shutdown()
        if self.fatal:
            logger.error("pool stopped: {}", self.fatal)
            return 3
        logger.info("pool stopped cleanly")
        return 0

    def _needs_probe(self) -> bool:
        f = self.cfg.funasr
        return self.cfg.pool.workers == "auto" or f.device in ("auto", "cuda")

    def _context(self) -> Any:
        import multiprocess

        ctx = multiprocess.get_context(self.cfg.pool.start_method)
        if self.cfg.pool.start_method == "forkserver":
            ctx.set_forkserver_preload(["transcribe.core.pool.preload"])  # FunASR imported once, not per worker
        return ctx

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)

    def _handle_signals(self) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            if sig in (signal.SIGTERM, signal.SIGINT):
                logger.info("{}: stopping (running jobs get {}s to finish)", signal.Signals(sig).name,
                            self.cfg.pool.shutdown_timeout)
                self.stopping = True
            elif sig == signal.SIGHUP:
                self._reload()

    def _reload(self) -> None:
        from transcribe.config import load_config

        try:
            cfg = load_config(self.config_path)
        except ConfigError as e:
            logger.error("SIGHUP: config not reloaded: {}", e.message)
            return
        if Path(cfg.resolve_path(cfg.pool.task_dir)) != self.td.root:
            logger.warning("SIGHUP: pool.task_dir cannot change while serving; keeping {}", self.td.root)
            cfg.pool.task_dir = str(self.td.root)
        self.cfg = cfg
        self.generation += 1
        logger.info("SIGHUP: config reloaded; replacing workers one by one")

    def _roll_generation(self) -> None:
        """After a reload, retire one old worker at a time, only while all the others are ready."""
        if self.stopping or any(not s.ready or s.term_sent_at for s in self.slots if s.process is not None):
            return
        old = next((s for s in self.slots if s.process is not None and s.generation < self.generation), None)
        if old is not None:
            logger.info("worker {} retiring for the new config", old.worker_id)
            self._terminate(old)

    # ------------------------------------------------------------------ workers
    def _spawn(self, slot: Slot) -> None:
        payload = json.dumps({"config": self.cfg.model_dump(mode="json"), "base_dir": self.cfg.base_dir})
        proc = self._ctx.Process(target=worker_main, args=(payload, slot.worker_id, slot.device, os.getpid()),
                                 name=f"transcribe-{slot.worker_id}", daemon=False)
        proc.start()
        slot.process, slot.spawned_at, slot.ready, slot.term_sent_at = proc, time.time(), False, None
        slot.generation = self.generation
        logger.info("worker {} spawned (pid {}, device {})", slot.worker_id, proc.pid, slot.device or "auto")

    def _status_of(self, slot: Slot) -> tuple[dict[str, Any], float | None]:
        path = self.td.workers / f"{slot.worker_id}.json"
        try:
            mtime = path.stat().st_mtime
            return json.loads(path.read_text(encoding="utf-8")), mtime
        except (OSError, ValueError):
            return {}, None

    def _reap(self) -> None:
        for slot in self.slots:
            proc = slot.process
            if proc is None or proc.is_alive():
                continue
            proc.join(0)
            code, pid = proc.exitcode, proc.pid
            status, _ = self._status_of(slot)
            slot.process = None
            logger.debug("worker {} (pid {}) exited with code {}", slot.worker_id, pid, code)
            self._requeue_jobs_of(pid, f"worker {slot.worker_id} (pid {pid}) exited with code {code} during the job")
            if code == EXIT_BOOT_FAILED:
                err = (status.get("error") or {}).get("message", "unknown error")
                self.fatal = f"worker {slot.worker_id} could not boot: {err}"
                return
            if self.stopping:
                continue
            if code in (EXIT_OK, EXIT_RECYCLE):  # retired after a reload, or a planned recycle
                slot.respawn_at = time.time()
                continue
            self.restarts_total += 1
            slot.restarts += 1
            if not slot.ready:
                slot.early_deaths += 1
                if slot.early_deaths >= MAX_EARLY_DEATHS:
                    self.fatal = (f"worker {slot.worker_id} died {slot.early_deaths} times before becoming ready "
                                  f"(last exit code {code}); see logs/worker-{slot.worker_id}.log")
                    return
            delay = min(0.5 * 2 ** min(slot.early_deaths, 6), self.cfg.pool.respawn_backoff_max)
            slot.respawn_at = time.time() + (delay if not slot.ready else 0.5)
            logger.warning("worker {} (pid {}) died with exit code {}; respawning in {:.1f}s", slot.worker_id, pid,
                           code, slot.respawn_at - time.time())

    def _requeue_jobs_of(self, pid: int, message: str) -> None:
        for job_dir, lease in self.td.processing_jobs():
            if lease.get("pid") == pid:
                outcome = self.td.recover(job_dir, "worker_died", message, keep_audio=self.cfg.pool.keep_audio)
                logger.warning("job {}: {} ({})", job_dir.name, outcome, message)

    def _check_workers(self) -> None:
        now = time.time()
        p = self.cfg.pool
        for slot in self.slots:
            if slot.process is None:
                continue
            status, beat = self._status_of(slot)
            slot.stats = status
            if status.get("pid") == slot.process.pid and status.get("state") in ("ready", "busy") and not slot.ready:
                slot.ready, slot.early_deaths = True, 0
            if slot.term_sent_at is not None:
                if now - slot.term_sent_at > (p.shutdown_timeout if self.stopping else KILL_GRACE):
                    logger.warning("worker {} (pid {}) did not stop; SIGKILL", slot.worker_id, slot.process.pid)
                    self._kill(slot, signal.SIGKILL)
                continue
            if not slot.ready and now - slot.spawned_at > p.boot_timeout:
                logger.error("worker {} not ready after {}s (pool.boot_timeout); killing", slot.worker_id,
                             p.boot_timeout)
                self._kill(slot, signal.SIGKILL)
            elif slot.ready and beat is not None and now - beat > p.heartbeat_timeout:
                logger.error("worker {} heartbeat is {:.0f}s old (pool.heartbeat_timeout={}s); killing",
                             slot.worker_id, now - beat, p.heartbeat_timeout)
                self._terminate(slot)

    def _terminate(self, slot: Slot) -> None:
        self._kill(slot, signal.SIGTERM)
        slot.term_sent_at = time.time()

    @staticmethod
    def _kill(slot: Slot, sig: int) -> None:
        try:
            os.kill(slot.process.pid, sig)
        except ProcessLookupError:
            pass

    def _spawn_missing(self) -> None:
        if self.stopping:
            return
        now = time.time()
        for slot in self.slots:
            if slot.process is None and now >= slot.respawn_at:
                self._spawn(slot)

    # ------------------------------------------------------------------ shutdown and status
    def _shutdown(self) -> None:
        live = [s for s in self.slots if s.process is not None and s.process.is_alive()]
        for slot in live:
            self._kill(slot, signal.SIGTERM)
        deadline = time.time() + self.cfg.pool.shutdown_timeout
        for slot in live:
            slot.process.join(max(0.0, deadline - time.time()))
        for slot in live:
            if slot.process.is_alive():
                logger.warning("worker {} still running after {}s; SIGKILL, its job goes back to the inbox",
                               slot.worker_id, self.cfg.pool.shutdown_timeout)
                self._kill(slot, signal.SIGKILL)
                slot.process.join(10)
        for slot in live:
            self._requeue_jobs_of(slot.process.pid, f"worker {slot.worker_id} stopped by shutdown during the job")
        self._write_status(state="stopped")
        self._metrics_due = 0.0
        self._write_metrics()

    def _write_metrics(self) -> None:
        if self.metrics is None or time.time() < self._metrics_due:
            return
        self._metrics_due = time.time() + METRICS_INTERVAL
        try:
            self.metrics.update(worker_states(self.slots), self.restarts_total)
        except OSError as e:
            logger.warning("cannot write metrics to {}: {}", self.metrics.path, e)

    def _write_status(self, state: str = "running") -> None:
        info = {
            "pid": os.getpid(), "state": state, "updated": now_iso(), "mode": "pool",
            "workers": [{"worker_id": s.worker_id, "pid": s.process.pid if s.process else None,
                         "device": s.device, "restarts": s.restarts} for s in self.slots],
            "restarts_total": self.restarts_total,
        }
        try:
            write_atomic(self.td.root / "supervisor.json", json.dumps(info), self.td.tmp, 0o640)
        except OSError as e:
            logger.warning("cannot write supervisor.json: {}", e)
