"""Webhooks: POST a JSON event when a job is done or failed, or a worker fell back to another device.

Events: ``job.done``, ``job.failed``, ``device.fallback`` (a worker booted on another device than
configured) and ``job.fallback`` (one job left its device at run time: out of memory or an operator
the backend lacks; sent by the job runner with the Result's ``fallback`` record and ``device``).

Sending happens on a background thread from a bounded queue, so a slow or dead endpoint never
holds a worker for longer than enqueueing takes. Each event is tried 1 + `notify.retries` times
with `notify.timeout_s` per try and a short backoff; failures are logged, never raised, never
failing the job. At exit the queue gets at most one timeout's worth of time to drain.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from loguru import logger

from transcribe.core.fsio import now_iso

QUEUE_SIZE = 1000


class Notifier:
    def __init__(self, url: str | None, timeout_s: float = 5.0, retries: int = 2) -> None:
        self.url, self.timeout_s, self.retries = url, timeout_s, retries
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(QUEUE_SIZE)
        self._thread: threading.Thread | None = None
        if url:
            self._thread = threading.Thread(target=self._run, name="webhook", daemon=True)
            self._thread.start()

    @classmethod
    def from_config(cls, cfg: Any) -> "Notifier":
        n = cfg.notify
        return cls(n.webhook_url, n.timeout_s, n.retries)

    def send(self, event: str, **data: Any) -> None:
        if not self.url:
            return
        try:
            self._queue.put_nowait({"event": event, "time": now_iso(), **data})
        except queue.Full:
            logger.warning("webhook queue full ({} events); dropping {}", QUEUE_SIZE, event)

    def _post(self, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=body, method="POST",  # type: ignore[arg-type]
                                             headers={"Content-Type": "application/json",
                                                      "User-Agent": "transcribe-webhook"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:  # noqa: S310 - configured URL
                    if 200 <= resp.status < 300:
                        return
                    problem = f"HTTP {resp.status}"
            except urllib.error.HTTPError as e:
                problem = f"HTTP {e.code}"
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                problem = str(getattr(e, "reason", e))
            if attempt < self.retries:
                time.sleep(min(0.5 * 2 ** attempt, 5.0))
        logger.warning("webhook {} for {} failed after {} tries: {}", self.url, payload["event"], self.retries + 1,
                       problem)

    def _run(self) -> None:
        while True:
            payload = self._queue.get()
            if payload is None:
                return
            self._post(payload)

    def close(self) -> None:
        if self._thread is not None:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass
            self._thread.join(self.timeout_s)
