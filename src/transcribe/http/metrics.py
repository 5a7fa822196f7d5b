"""`GET /metrics`: the pool's metrics (queue depth, RTF, audio seconds, workers by state, restarts; the
same `PoolMetrics` the supervisor writes to a text file) refreshed per scrape from the task directory,
plus the HTTP layer's own counters."""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest

from transcribe.config import Config
from transcribe.core.metrics import PoolMetrics
from transcribe.core.pool.task_dir import TaskDir
from transcribe.core.status import collect_status

POOL_STATES = ("booting", "ready", "busy", "stopping")  # anything else (stale, gone, exited) counts as down


class HttpMetrics:
    def __init__(self, cfg: Config, td: TaskDir) -> None:
        self.cfg = cfg
        self.pool = PoolMetrics(td)
        self.registry = CollectorRegistry()
        self.requests = Counter("transcribe_http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.jobs = Counter("transcribe_http_jobs", "HTTP jobs by outcome: accepted, rejected, done, failed, "
                            "timeout (sync wait expired)", ["outcome"], registry=self.registry)
        self.upload_bytes = Counter("transcribe_http_upload_bytes", "Bytes of audio accepted over HTTP",
                                    registry=self.registry)
        self._lock = threading.Lock()  # scrapes run in a thread pool; PoolMetrics keeps state

    def render(self) -> bytes:
        info = collect_status(self.cfg)
        states = [w["state"] if w["state"] in POOL_STATES else "down" for w in info["workers"]]
        with self._lock:
            self.pool.refresh(states, int(info["server"].get("restarts_total") or 0))
            return generate_latest(self.pool.registry) + generate_latest(self.registry)


class RequestCounter:
    """ASGI middleware: count each request by its route template (not its raw path) and status."""

    def __init__(self, app: Any, metrics: HttpMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_and_note(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route=route, status=str(status[0])).inc()
