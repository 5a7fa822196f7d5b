#!/usr/bin/env python3
"""Benchmark `serve --mode ray` against `serve --mode pool` on the same machine and the same jobs.

For each engine count (GPUs on a CUDA machine, with --engines-per-gpu engines on each; CPU engines
otherwise) it runs both servers as a user would (`python -m transcribe serve ...`, a local Ray instance
for ray mode), submits the same mixed-length job set at once and times first-submit to last-result.
Reported, in one run:

- throughput of each (audio seconds per wall second) and the ray/pool ratio per engine count;
- Ray's overhead per job: the wall time the engines spend not transcribing, per job ((wall x engines -
  sum of the results' processing_time) / jobs), in ray mode minus in pool mode, also as a share of the
  mean job time (target <= 3 %): what Ray adds (object-store transfer of the audio, the driver's round
  trip, the actor call) beyond the pool's own claim and commit; and, measured directly by the driver, each
  job's hand-off (dispatch to answer minus the actor's processing time; median and max);
- scaling from the first to the last engine count in ray mode (target >= 1.9x for 1 -> 2 GPUs).

    python tests/performance/ray_bench.py --size tiny --device cpu --engines 1 --jobs 4        # smoke test
    python tests/performance/ray_bench.py --size large --device cuda --engines 1,2 --minutes 1,10 --jobs 16

Model weights are random (no hub here): speed is real, text is not. Writes ray_results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import job_set, make_audio, time_job_set

from tests.support.model_factory import build_all, cache_key
from tests.support.pool_helpers import results


def server_config(args: argparse.Namespace, models: dict[str, Path], mode: str, engines: int) -> dict[str, Any]:
    cuda = args.device.startswith("cuda")
    ncpu = args.ncpu if cuda else max(1, min(args.ncpu, (os.cpu_count() or 1) // engines))
    cfg: dict[str, Any] = {
        "funasr": {"model": str(models["asr"]), "vad_model": str(models["vad"]), "punc_model": str(models["punc"]),
                   "spk_model": str(models["spk"]), "device": args.device, "ncpu": ncpu},
        "pool": {"task_dir": "tasks", "heartbeat_timeout": 300, "keep_audio": True, "settle_seconds": 1.0},
        "output": {"formats": ["json"]}, "logging": {"dir": "logs"},
    }
    if mode == "pool":
        cfg["pool"]["workers"] = engines * (args.engines_per_gpu if cuda else 1)
        if cuda:
            cfg["pool"]["devices"] = [f"cuda:{g}" for g in range(engines) for _ in range(args.engines_per_gpu)]
    else:
        cfg["ray"] = {"num_gpus": 1 / args.engines_per_gpu, "num_cpus": 1 if cuda else ncpu}
        if not cuda:
            cfg["ray"]["local_num_cpus"] = engines * ncpu
    return cfg


def run_server(args: argparse.Namespace, models: dict[str, Path], jobs: list, mode: str, engines: int) -> dict:
    root = args.work / f"{mode}-{engines}"
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(server_config(args, models, mode, engines)))
    cuda = args.device.startswith("cuda")
    n_engines = engines * (args.engines_per_gpu if cuda else 1)
    # Ray sees only the GPUs it is shown; the pool is told its devices in pool.devices.
    env = {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in range(engines))} if cuda and mode == "ray" else {}
    ready, wall, _ = time_job_set(root, mode, n_engines, jobs, env)
    done = results(root / "tasks")
    audio = sum(r["duration"] for r in done)
    row = {"mode": mode, "engines": n_engines, "gpus": engines if cuda else 0, "jobs": len(done),
           "audio_s": round(audio, 1), "wall_s": round(wall, 3), "x_realtime": round(audio / wall, 2),
           "ready_s": round(ready, 1),
           "mean_job_processing_s": round(statistics.mean(r["processing_time"] for r in done), 3),
           # decoding runs inside the engine's process (actor or worker): its share of the job time
           "decode_share": round(sum(r["timings"].get("decode", 0.0) for r in done)
                                 / sum(r["processing_time"] for r in done), 4),
           # wall time the engines were not transcribing, per job: claim, transfer, commit, hand-offs
           "between_jobs_s": round((wall * n_engines - sum(r["processing_time"] for r in done)) / len(done), 4)}
    if mode == "ray":  # the driver logs, per job, what Ray added beyond the actor's processing time
        log = (root / "logs" / "ray-driver.log").read_text()
        hand_offs = [float(m) for m in re.findall(r"Ray hand-off (-?\d+) ms", log)]
        row["hand_off_ms"] = {"median": statistics.median(hand_offs), "max": max(hand_offs)} if hand_offs else None
    print(json.dumps(row), flush=True)
    return row


def summarise(rows: list[dict]) -> dict[str, Any]:
    by = {(r["mode"], r["engines"]): r for r in rows}
    engines = sorted({r["engines"] for r in rows})
    out: dict[str, Any] = {"throughput_ratio_ray_over_pool": {
        e: round(by[("ray", e)]["x_realtime"] / by[("pool", e)]["x_realtime"], 3)
        for e in engines if ("ray", e) in by and ("pool", e) in by}}
    first = engines[0]
    if ("ray", first) in by and ("pool", first) in by:
        # what Ray adds between jobs, over the pool's own hand-off time, against the job's processing time
        extra = by[("ray", first)]["between_jobs_s"] - by[("pool", first)]["between_jobs_s"]
        out["ray_overhead_per_job_s"] = round(extra, 4)
        out["ray_overhead_share_of_job"] = round(extra / by[("ray", first)]["mean_job_processing_s"], 4)
    if len(engines) > 1 and ("ray", first) in by and ("ray", engines[-1]) in by:
        out[f"ray_scaling_{first}_to_{engines[-1]}"] = round(
            by[("ray", engines[-1])]["x_realtime"] / by[("ray", first)]["x_realtime"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "large"], default="tiny")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (engines are then GPUs)")
    ap.add_argument("--engines", default="1,2", help="GPU counts (cuda) or CPU engine counts to time")
    ap.add_argument("--engines-per-gpu", type=int, default=1, help="ray.num_gpus = 1/this; pool: this many per GPU")
    ap.add_argument("--minutes", default="1", help="recording lengths (tiles of the 60 s podcast)")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--ncpu", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--modes", default="pool,ray")
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("TRANSCRIBE_SHARED", REPO.parent / "shared")))
    ap.add_argument("--models", type=Path, help="model cache dir (default .cache/bench-models)")
    ap.add_argument("--out", type=Path, default=REPO / "bench-out")
    ap.add_argument("--work", type=Path)
    args = ap.parse_args()
    args.work = args.work or args.out / "ray-work"
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    asr_class = "SeacoParaformer" if args.size == "large" else "Paraformer"
    models = build_all((args.models or REPO / ".cache" / "bench-models") / cache_key(args.size, asr_class),
                       args.size, asr_class)
    audio = make_audio(args.shared / "audio", args.work, [float(m) for m in args.minutes.split(",")])
    jobs = job_set(audio, args.jobs)
    rows = [run_server(args, models, jobs, mode, int(e))
            for e in args.engines.split(",") for mode in args.modes.split(",")]
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                          "platform": platform.platform()},
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "rows": rows, "summary": summarise(rows)}
    (args.out / "ray_results.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
