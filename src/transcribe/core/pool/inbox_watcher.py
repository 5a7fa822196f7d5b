"""Wakes a claim loop as soon as something lands in inbox/ (watchdog: inotify, FSEvents, kqueue).

Events are only a hint: the loop still rescans every `pool.rescan_interval` seconds, so a missed
event (network filesystems send none) costs latency, never a job.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any


class InboxWatcher:
    """Wakes the worker when something lands in inbox/ (watchdog/inotify); the loop also rescans."""

    def __init__(self, inbox: Path, wake: threading.Event) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                wake.set()

        self._observer = Observer()
        self._observer.schedule(_Handler(), str(inbox), recursive=False)

    def __enter__(self) -> "InboxWatcher":
        self._observer.daemon = True
        self._observer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._observer.stop()
