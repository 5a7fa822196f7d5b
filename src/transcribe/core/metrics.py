"""Prometheus metrics as a text file (node_exporter's textfile collector), written by the supervisor.

- ``transcribe_queue_depth{folder}``: entries in inbox/, processing/, done/ (results), failed/;
- ``transcribe_job_rtf``: histogram of the real-time factor of each result seen in done/;
- ``transcribe_job_audio_seconds_total``: audio transcribed, from the same results;
- ``transcribe_workers{state}``: workers by state; ``transcribe_worker_restarts_total``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    write_to_textfile,
)

from transcribe.core.pool.task_dir import TaskDir

RTF_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class PoolMetrics:
    def __init__(self, td: TaskDir, path: Path | None = None) -> None:
        self.td, self.path = td, path
        self.registry = CollectorRegistry()
        self.queue = Gauge("transcribe_queue_depth", "Jobs per task-directory folder", ["folder"],
                           registry=self.registry)
        self.rtf = Histogram("transcribe_job_rtf", "Real-time factor of finished jobs", buckets=RTF_BUCKETS,
                             registry=self.registry)
        self.audio = Counter("transcribe_job_audio_seconds", "Seconds of audio transcribed", registry=self.registry)
        self.workers = Gauge("transcribe_workers", "Workers by state", ["state"], registry=self.registry)
        self.restarts = Counter("transcribe_worker_restarts", "Unplanned worker restarts", registry=self.registry)
        self._seen: set[str] = set()
        self._restarts_seen = 0

    def _observe_new_results(self) -> None:
        for p in self.td.done.glob("*.json"):
            if p.name in self._seen or p.name.startswith("."):
                continue
            self._seen.add(p.name)
            try:
                r = json.loads(p.read_text(encoding="utf-8"))
                self.rtf.observe(float(r["rtf"]))
                self.audio.inc(float(r["duration"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue

    def update(self, worker_states: list[str], restarts_total: int) -> None:
        """Refresh, then write the text file."""
        self.refresh(worker_states, restarts_total)
        assert self.path is not None, "PoolMetrics.update writes a file: give it a path"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(self.path), self.registry)

    def refresh(self, worker_states: list[str], restarts_total: int) -> None:
        """Bring every metric up to date from the task directory (also what the HTTP /metrics serves)."""
        for folder, n in self.td.counts().items():
            self.queue.labels(folder=folder).set(n)
        self._observe_new_results()
        for state in ("booting", "ready", "busy", "stopping", "down"):
            self.workers.labels(state=state).set(sum(s == state for s in worker_states))
        self.restarts.inc(max(0, restarts_total - self._restarts_seen))
        self._restarts_seen = restarts_total


def worker_states(slots: list[Any]) -> list[str]:
    return [(s.stats.get("state") or "booting") if s.process is not None else "down" for s in slots]
