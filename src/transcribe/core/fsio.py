"""Small filesystem primitives shared by the engine's outputs and the task directory: atomic writes
(write to a staging folder, fsync, rename, optionally fsync the target folder), directory fsync,
JSON that survives any file name, and timestamps."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

NAME_MAX = 255  # bytes in one path component on every filesystem we serve (ext4, xfs, btrfs, apfs, zfs)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def fsync_dir(path: Path) -> None:
    """Make the renames into `path` durable (a rename is only on disk once its folder is fsynced)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def printable(text: str) -> str:
    """`text` as valid Unicode: bytes a file name carried through surrogateescape become U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:  # a name from os.fsdecode: each undecodable byte becomes one U+FFFD
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a lone surrogate from elsewhere
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def loads_json_object(data: str | bytes) -> dict[str, Any]:
    """A JSON object from text another process wrote; {} for empty, invalid or non-object text (a file cut
    short by a crash or edited by hand must not stop a reader)."""
    try:
        value = json.loads(data or "{}")
    except ValueError:  # UnicodeDecodeError included
        return {}
    return value if isinstance(value, dict) else {}


def read_json_object(path: Path) -> dict[str, Any]:
    """`loads_json_object` of a file; {} when it cannot be read."""
    try:
        return loads_json_object(path.read_bytes())
    except OSError:
        return {}


def json_safe(value: Any) -> Any:
    """`value` with every string made valid Unicode (so `json.dumps(...).encode()` cannot fail)."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable(str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps_json(value: Any, **kwargs: Any) -> str:
    return json.dumps(json_safe(value), ensure_ascii=False, **kwargs)


def write_atomic(path: Path, data: str | bytes, staging: Path, mode: int = 0o640,
                 before_rename: Callable[[], None] | None = None, *, sync_dir: bool = False) -> None:
    """Write `data` to a file in `staging`, fsync it, rename it to `path` (same filesystem).

    The staging name is short and fixed-length whatever `path` is called (never over NAME_MAX).
    `sync_dir` also fsyncs `path`'s folder, so the rename itself survives a power cut.
    """
    tmp = staging / f".w{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp"
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
    if sync_dir:
        fsync_dir(path.parent)
