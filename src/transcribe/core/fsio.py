"""Small filesystem primitives shared by the engine's outputs and the task directory: atomic writes
(write to a staging folder, fsync, rename), directory fsync, and timestamps."""

from __future__ import annotations

import contextlib
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: str | bytes, staging: Path, mode: int = 0o640,
                 before_rename: Callable[[], None] | None = None) -> None:
    """Write `data` to a file in `staging`, fsync it, rename it to `path` (same filesystem)."""
    tmp = staging / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp"
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
