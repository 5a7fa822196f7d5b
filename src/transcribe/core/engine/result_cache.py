"""Result cache (opt-in, ``cache.enabled``): the same audio bytes, options and models give the stored Result.

The key is the sha256 of a canonical JSON document holding:
- the sha256 of the input file's bytes and the extension it is decoded by;
- the job's options (`TranscribeOptions`) and FunASR's generate kwargs as the engine builds them;
- the output-relevant ``funasr.*`` configuration (models, revisions, hub, dtype, fast paths,
  model/generate kwargs) and the device kind;
- each model's identity: its configured name and revision, its resolved directory, and for every
  file in that directory its name, size and modification time (a retrained model in place is
  a new key);
- the versions of transcribe and funasr.
Anything that is not in the key cannot change the output, so a hit never answers other options.

Entries are ``<dir>/<key[:2]>/<key>.json`` written atomically (core/fsio.write_atomic). An entry that
does not parse, or whose stored key differs, is ignored (and replaced by the next store). A hit
touches the entry; when the cache grows past ``cache.max_mb`` the least recently used entries go.
Several processes may share the directory (pool workers): writes are renames, reads tolerate loss.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

from loguru import logger

from transcribe.core.engine.result import Result
from transcribe.core.fsio import now_iso, write_atomic

FORMAT = 1  # bump when the entry layout changes
_CHUNK = 1 << 20
# funasr.* keys that cannot change a transcript (where and how fast it runs, not what it says).
_NOT_IN_KEY = ("device", "device_priority", "fallback_on_error", "runtime_fallback", "ncpu", "disable_update")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def model_identity(role: str, name: str, path: str | None, revision: str | None) -> dict[str, Any]:
    """A model's name, revision and directory, with each file's size and mtime (a changed file changes it)."""
    files: list[list[Any]] = []
    if path and Path(path).is_dir():
        for f in sorted(Path(path).rglob("*")):
            if f.is_file():
                st = f.stat()
                files.append([str(f.relative_to(path)), st.st_size, st.st_mtime_ns])
    return {"role": role, "name": name, "path": path, "revision": revision, "files": files}


def cache_key(audio_digest: str, extension: str, options: dict[str, Any], engine: dict[str, Any]) -> str:
    doc = {"format": FORMAT, "audio": audio_digest, "extension": extension, "options": options, "engine": engine}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, ensure_ascii=True, default=str).encode()).hexdigest()


def engine_identity(funasr_config: dict[str, Any], device_kind: str, models: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """What about the engine goes into every key: config, device kind, models, versions."""
    from importlib.metadata import version

    from transcribe import __version__

    return {"funasr_config": {k: v for k, v in funasr_config.items() if k not in _NOT_IN_KEY},
            "device_kind": device_kind, "models": list(models), "transcribe": __version__,
            "funasr": version("funasr")}


class ResultCache:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> Result | None:
        path = self._path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            if entry.get("key") != key:
                raise ValueError("stored key differs")
            result = Result.from_dict(entry["result"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("result cache: ignoring unreadable entry {} ({}: {})", path.name, type(e).__name__, e)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: evicted last
        return replace(result, cached=True)

    def put(self, key: str, result: Result) -> None:
        """Store atomically; a full disk or a read-only cache only logs (the job's result is unaffected)."""
        path = self._path(key)
        entry = {"key": key, "stored": now_iso(), "result": replace(result, cached=False).to_dict()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(entry, ensure_ascii=False), path.parent, 0o640)
            self._evict()
        except OSError as e:
            logger.warning("result cache: could not store {}: {}", path.name, e)

    def _evict(self) -> None:
        entries = []
        for f in self.directory.glob("*/*.json"):
            with contextlib.suppress(OSError):
                st = f.stat()
                entries.append((st.st_mtime, st.st_size, f))
        total = sum(size for _, size, _ in entries)
        for _, size, f in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            with contextlib.suppress(OSError):
                f.unlink()
                total -= size
