#!/usr/bin/env python3
"""Benchmark: claim latency of the task directory with a large backlog waiting in inbox/.

Drops N settled files (a third with a sidecar), then claims them all from one `TaskDir`, as a pool
worker does, and reports the first claim (it pays for the one O(N) scan), the median and p99 of the
following claims, and the worst; a second run measures claims while the scan is refreshed every
claim (`rescan_after=0`: the bound when a backlog changes constantly). No models; files only.

    python tests/performance/claim_latency.py --files 10000 [--dir /path/on/the/real/disk]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from transcribe.core.pool.task_dir import TaskDir


def fill(td: TaskDir, n: int) -> None:
    old = time.time() - 60
    for i in range(n):
        p = td.inbox / f"call-{i:06d}.wav"
        p.write_bytes(b"RIFF" + b"\0" * 60)
        os.utime(p, (old + i * 1e-3,) * 2)
        if i % 3 == 0:
            side = td.inbox / f"call-{i:06d}.wav.json"
            side.write_text(json.dumps({"priority": i % 5}))
            os.utime(side, (old,) * 2)


def claim_all(td: TaskDir, limit: int) -> list[float]:
    times = []
    while len(times) < limit:
        t = time.perf_counter()
        job = td.claim_next("bench")
        if job is None:
            break
        times.append((time.perf_counter() - t) * 1000)
        td.complete(job, {"json": "{}"}, keep_audio=False)
    return times


def summary(ms: list[float]) -> dict[str, float]:
    rest = sorted(ms[1:]) or [0.0]
    return {"claims": len(ms), "first_ms": round(ms[0], 2), "median_ms": round(statistics.median(rest), 3),
            "p99_ms": round(rest[int(len(rest) * 0.99) - 1 if len(rest) > 1 else 0], 3),
            "max_ms": round(max(ms), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--dir", default=None, help="where to build the task dir (default: a temp dir)")
    ap.add_argument("--rescan-claims", type=int, default=50, help="claims measured with rescan_after=0")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        td = TaskDir(Path(root) / "tasks", settle_seconds=1.0, rescan_after=3600).ensure()
        fill(td, args.files)
        cached = summary(claim_all(td, args.files))
        fill(td, args.files)
        td = TaskDir(td.root, settle_seconds=1.0, rescan_after=0)
        rescan = summary(claim_all(td, args.rescan_claims))
    print(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": args.files,
                      "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
                                 f"Python {platform.python_version()}",
                      "claim_from_scan": cached, "claim_with_rescan_each_time": rescan}, indent=2))


if __name__ == "__main__":
    main()
