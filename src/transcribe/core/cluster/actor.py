"""One Ray actor = one pool worker: it picks its device, patches FunASR, loads the engine once in
``__init__`` (Ray's batch-inference pattern: a stateful actor per model copy) and transcribes jobs.

The actor never touches the task directory: the driver claims each job, sends the audio bytes through
the object store (or, with ``ray.audio_transfer: shared_mount``, the path on a mount every node shares),
and commits the result the actor returns. So a lost actor can leave nothing half-written, and its
late answer has nowhere to go but the driver, which checks it still holds the job before committing.

Only plain data crosses: the configuration as JSON text in, dicts of str/float/list out (the Result's
JSON form, or an error record). A job's own error (bad audio) comes back as ``{"ok": False, "error":
{...}}``: the actor survives it. No process pool is nested here; one actor runs one job at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from loguru import logger

from transcribe.core.cluster.placement import actor_device
from transcribe.core.pool.heartbeat import current_rss_mb
from transcribe.core.pool.jobs import error_info

ACTOR_CONCURRENCY = 2  # one job call, plus `progress` answered while that job runs


def gpu_assignment() -> dict[str, Any]:
    """What Ray gave this process: its GPU ids and the CUDA_VISIBLE_DEVICES it set."""
    import ray

    return {"gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "host": socket.gethostname()}


def cap_gpu_memory(device: str, fraction: float | None) -> bool:
    """Cap this process's CUDA caching allocator to `fraction` of its card (two actors at 0.5 share one)."""
    if fraction is None or not device.startswith("cuda"):
        return False
    import torch

    torch.cuda.set_per_process_memory_fraction(fraction, torch.device(device))
    return True


class TranscribeActor:
    """Wrapped with ``ray.remote`` by the driver (so importing this module needs no Ray)."""

    def __init__(self, config_json: str, actor_id: str, memory_fraction: float | None = None) -> None:
        started = time.perf_counter()
        self.actor_id = actor_id
        self.info: dict[str, Any] = {"actor_id": actor_id, **gpu_assignment()}
        self.stage: str | None = None
        self.progress_ts: float | None = None
        self.scratch = Path(tempfile.mkdtemp(prefix=f"transcribe-{actor_id}-"))
        self.transcriber: Any = None
        try:
            self.transcriber = self._boot(config_json, memory_fraction)
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which stops like the pool does
            self.info["error"] = error_info(exc)
            logger.error("actor {} could not boot: {}", actor_id, self.info["error"]["message"])
        self.info["ready_after_s"] = round(time.perf_counter() - started, 2)

    def _boot(self, config_json: str, memory_fraction: float | None) -> Any:
        from transcribe.config import config_from_dict
        from transcribe.core.engine.device_manager import DeviceManager
        from transcribe.core.engine.funasr_transcriber import Transcriber
        from transcribe.logging_setup import setup_logging

        data = json.loads(config_json)
        cfg = config_from_dict(data["config"], data["base_dir"])
        # stderr only (Ray keeps it per actor and forwards it to the driver): a remote node may lack logging.dir
        setup_logging(cfg, f"actor-{self.actor_id}", to_file=False)
        device, priority = actor_device(cfg.funasr.device, list(cfg.funasr.device_priority), self.info["gpu_ids"])
        funasr_cfg = cfg.funasr.model_copy(update={"device": device, "device_priority": priority})
        choice = DeviceManager.select_device(funasr_cfg)
        self.info["memory_capped"] = cap_gpu_memory(choice.device, memory_fraction)
        transcriber = Transcriber(cfg, choice)
        transcriber.on_progress = self._progress
        transcriber.warm_up()
        self.info.update(device=choice.device, dtype=choice.dtype, device_reason=choice.reason,
                         fell_back=choice.fell_back, requested=choice.requested, patches=transcriber.patches)
        logger.info("actor {} ready on {} (pid {}, GPUs {})", self.actor_id, choice.device, os.getpid(),
                    self.info["gpu_ids"] or "none")
        return transcriber

    def _progress(self, stage: str) -> None:
        self.stage, self.progress_ts = stage, time.time()

    def ready(self) -> dict[str, Any]:
        """Boot report: pid, node, GPUs, device and why; ``error`` if the engine did not load."""
        return self.info

    def progress(self) -> dict[str, Any]:
        return {"stage": self.stage, "progress_ts": self.progress_ts, "rss_mb": round(current_rss_mb(), 1)}

    def transcribe(self, job: dict[str, Any], audio: bytes | None) -> dict[str, Any]:
        """Run one job. `job`: job_id, name (original), extension, options (`Transcriber.transcribe`'s keyword
        arguments, from `JobOptions.engine_kwargs`), path (shared mount)."""
        staged: Path | None = None
        self.stage, self.progress_ts = "decode", time.time()
        try:
            if audio is not None:  # under its own name, so errors name the user's file
                staged = self.scratch / job["job_id"] / job["name"]
                staged.parent.mkdir()
                staged.write_bytes(audio)
            path = staged or Path(job["path"])
            result = self.transcriber.transcribe(path, **job.get("options", {}), extension=job.get("extension"),
                                                 source_name=job["name"])
            return {"ok": True, "result": result.to_dict()}
        except Exception as exc:  # noqa: BLE001 - a job's error is the driver's to record; the actor lives on
            return {"ok": False, "error": error_info(exc)}
        finally:
            self.stage = self.progress_ts = None
            if staged is not None:
                shutil.rmtree(staged.parent, ignore_errors=True)

    def shutdown(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
