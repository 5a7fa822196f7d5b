#!/usr/bin/env python3
"""Benchmark transcribe against bare FunASR on the same models, audio and options.

Times, in one run: (a) bare ``AutoModel.generate``, (b) ``Transcriber``, (c) lock mode
(``AsyncTranscriber``), optionally (b) again under bf16/fp16 autocast, (e) the batch engine on one
job, (f) N jobs batched together in the engine, (d) the pool with 1, 2, N workers and (g) pools of
batching workers (throughput = audio seconds per wall second over a mixed-length job set). Warm-up first,
median of repeats; model load and worker ready time reported separately; peak RSS and GPU memory;
a parity check of (b) against (a) on every recording. Writes results.json and table.md to --out.

    make bench                                              # tiny fixture models, CPU, quick
    python tests/performance/bench.py --size large          # paraformer-zh architecture (247 M params)
    python tests/performance/bench.py --size large --device cuda --minutes 1,10 --dtypes bfloat16

Model weights are random (no hub here): speed is real, text is not.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from tests.support.model_factory import REAL_VAD, build_all, cache_key


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_peak_mb(device: str) -> float | None:
    import torch

    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return None


def reset_gpu_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def segments_of(output: list[dict], duration: float) -> list[tuple]:
    from transcribe.core.engine.result import segments_from_funasr

    _, segs, _ = segments_from_funasr(output, duration)
    return [(s.start, s.end, s.text, s.speaker) for s in segs]


def compare(a: list[tuple], b: list[tuple]) -> dict[str, Any]:
    """Parity of two segment lists: identical text and labels, max timestamp difference."""
    same_shape = len(a) == len(b)
    text = same_shape and all(x[2] == y[2] for x, y in zip(a, b))
    labels = same_shape and all(x[3] == y[3] for x, y in zip(a, b))
    dt = max((max(abs(x[0] - y[0]), abs(x[1] - y[1])) for x, y in zip(a, b)), default=0.0) if same_shape else None
    return {"segments": (len(a), len(b)), "text_equal": text, "labels_equal": labels,
            "max_time_diff_ms": None if dt is None else round(dt * 1000, 3),
            "parity": bool(text and labels and dt is not None and dt <= 0.010)}


def make_audio(shared: Path, out: Path, minutes: list[float]) -> list[tuple[str, Path, float]]:
    import numpy as np
    import soundfile as sf

    base, rate = sf.read(shared / "podcast_2speakers_60s.wav", dtype="float32")
    items = []
    for m in minutes:
        path = out / f"podcast_{m:g}min.wav"
        if not path.exists():
            reps = int(np.ceil(m * 60 * rate / len(base)))
            sf.write(path, np.tile(base, reps)[: int(m * 60 * rate)], rate)
        items.append((f"{m:g} min", path, m * 60))
    return items


def run_single_process(args: argparse.Namespace, models: dict[str, Path], audio: list, report: dict) -> None:
    import numpy as np
    import torch

    from transcribe.config import config_from_dict
    from transcribe.core.engine.funasr_transcriber import (
        AsyncTranscriber,
        Transcriber,
        build_generate_kwargs,
    )

    t0 = time.perf_counter()
    from funasr import AutoModel

    report["funasr_import_s"] = round(time.perf_counter() - t0, 2)
    device = args.device
    cfg = config_from_dict({"funasr": {"model": str(models["asr"]), "vad_model": str(models["vad"]),
                                       "punc_model": str(models["punc"]), "spk_model": str(models["spk"]),
                                       "device": device, "ncpu": args.ncpu, "batch_size_s": 300, "seed": args.seed,
                                       "engine_batch_s": args.engine_batch_s,
                                       "engine_spk_batch": args.engine_spk_batch}}, REPO)
    gen = build_generate_kwargs(cfg, speakers=2)
    rows, parity = [], {}

    from transcribe.core.engine import fast_cif, fast_punc, fast_vad

    fast_cif.uninstall()  # (a) is FunASR as shipped, whatever ran before in this process
    fast_vad.uninstall()
    fast_punc.uninstall_assembly()
    t0 = time.perf_counter()
    bare = AutoModel(model=str(models["asr"]), vad_model=str(models["vad"]), punc_model=str(models["punc"]),
                     spk_model=str(models["spk"]), device=device, ncpu=args.ncpu, disable_update=True,
                     disable_pbar=True)
    report["load_s"] = {"bare": round(time.perf_counter() - t0, 2)}
    bare.generate(input=str(audio[0][1]), **gen)  # warm-up
    bare_out = {}
    for label, path, seconds in audio:
        reset_gpu_peak(device)
        # seeded as the Transcriber seeds each job (funasr.seed): speaker labels compare like with like
        wall, out = median_time(lambda: (np.random.seed(args.seed), bare.generate(input=str(path), **gen))[1],
                                args.repeats)
        bare_out[label] = segments_of(out, seconds)
        rows.append({"mode": "(a) bare FunASR", "audio": label, "wall_s": round(wall, 3),
                     "rtf": round(wall / seconds, 5), "gpu_peak_mb": gpu_peak_mb(device)})
        print(f"bare {label}: {wall:.2f}s rtf {wall / seconds:.4f}", flush=True)
    bare = None  # free its GPU memory before the Transcriber loads
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    t0 = time.perf_counter()
    tr = Transcriber(cfg)
    report["load_s"]["transcriber"] = round(time.perf_counter() - t0, 2)
    tr.transcribe(audio[0][1], speakers=2)  # warm-up
    variants = [("(b) Transcriber", tr.device.dtype)] + [(f"(b) Transcriber {d}", d) for d in args.dtypes]
    base_choice = tr.device
    for mode, dtype in variants:
        tr.device = dataclasses.replace(base_choice, dtype=dtype)
        if dtype != base_choice.dtype:
            tr.transcribe(audio[0][1], speakers=2)  # warm-up in this precision
        for label, path, seconds in audio:
            reset_gpu_peak(device)
            wall, result = median_time(lambda: tr.transcribe(path, speakers=2), args.repeats)
            got = [(s.start, s.end, s.text, s.speaker) for s in result.segments]
            parity[f"{mode} / {label}"] = compare(bare_out[label], got)
            rows.append({"mode": mode, "audio": label, "wall_s": round(wall, 3), "rtf": round(wall / seconds, 5),
                         "stages": result.timings, "gpu_peak_mb": gpu_peak_mb(device),
                         "parity": parity[f"{mode} / {label}"]["parity"]})
            print(f"{mode} {label}: {wall:.2f}s rtf {wall / seconds:.4f} {result.timings} "
                  f"parity={parity[f'{mode} / {label}']}", flush=True)
    tr.device = base_choice

    run_engine(args, tr, audio, bare_out, rows, parity, report)

    if args.vad_cpu:  # placement variant: fsmn-vad on the CPU while the rest runs on the GPU
        vcfg = cfg.model_copy(deep=True)
        vcfg.funasr.model_kwargs = {"vad_kwargs": {"device": "cpu"}}
        vt = Transcriber(vcfg)
        vt.transcribe(audio[0][1], speakers=2)
        for label, path, seconds in audio:
            wall, result = median_time(lambda: vt.transcribe(path, speakers=2), args.repeats)
            got = [(s.start, s.end, s.text, s.speaker) for s in result.segments]
            p = compare(bare_out[label], got)
            parity[f"(b) vad on cpu / {label}"] = p
            rows.append({"mode": "(b) Transcriber, VAD on cpu", "audio": label, "wall_s": round(wall, 3),
                         "rtf": round(wall / seconds, 5), "stages": result.timings, "parity": p["parity"]})
            print(f"vad-cpu {label}: {wall:.2f}s {result.timings} parity={p}", flush=True)
        del vt

    async def lock_mode(path: Path) -> Any:
        return await at.transcribe(path, speakers=2)

    at = AsyncTranscriber(tr)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(lock_mode(audio[0][1]))  # warm-up, as (a) and (b) had: the model thread's first call
    for label, path, seconds in audio:
        # Lock mode against direct calls in turn (direct, lock, direct, lock, ...): drift in the machine's
        # load or clocks over the run falls on both alike, which timing them in separate blocks does not.
        direct, locked = [], []
        for _ in range(max(args.repeats, 3)):
            for times, call in ((direct, lambda: tr.transcribe(path, speakers=2)),
                                (locked, lambda: loop.run_until_complete(lock_mode(path)))):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
        wall, base = statistics.median(locked), statistics.median(direct)
        rows.append({"mode": "(c) lock mode", "audio": label, "wall_s": round(wall, 3),
                     "rtf": round(wall / seconds, 5), "direct_call_s": round(base, 3),
                     "vs_direct_call": round(wall / base - 1, 4)})
        print(f"lock {label}: {wall:.2f}s; direct calls in turn {base:.2f}s: {100 * (wall / base - 1):+.1f} %",
              flush=True)
    loop.run_until_complete(at.aclose())
    loop.close()

    # The pool's reference: the same job set run back to back in one Transcriber.
    jobs = job_set(audio, args.pool_jobs)
    t0 = time.perf_counter()
    for _, path, _ in jobs:
        tr.transcribe(path, speakers=2)
    wall = time.perf_counter() - t0
    report["transcriber_jobset"] = {"wall_s": round(wall, 3), "audio_s": sum(j[2] for j in jobs),
                                    "x_realtime": round(sum(j[2] for j in jobs) / wall, 1)}
    report["rows"] += rows
    report["parity"] = parity
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)


def run_engine(args: argparse.Namespace, tr: Any, audio: list, bare_out: dict, rows: list, parity: dict,
               report: dict) -> None:
    """(e) the batch engine, one job alone (parity with bare), and (f) N copies of the longest recording
    batched together (throughput; agreement of each job with bare FunASR)."""
    from tests.support.agreement import agreement
    from transcribe.core.engine.batch_engine import BatchTranscriber, EngineJob

    engine = BatchTranscriber(tr)
    # with funasr.overlap_stages on (CUDA), the same engine without it too: what the overlap buys
    variants = [("(e) batch engine, 1 job", engine)]
    if engine.overlap:
        variants.append(("(e) batch engine, 1 job, stages in sequence", BatchTranscriber(tr, overlap=False)))
    for mode, eng in variants:
        eng.transcribe(audio[0][1], speakers=2)  # warm-up
        for label, path, seconds in audio:
            reset_gpu_peak(args.device)
            wall, result = median_time(lambda: eng.transcribe(path, speakers=2), args.repeats)
            got = [(s.start, s.end, s.text, s.speaker) for s in result.segments]
            key = f"{mode} / {label}"
            parity[key] = compare(bare_out[label], got)
            rows.append({"mode": mode, "audio": label, "wall_s": round(wall, 3), "rtf": round(wall / seconds, 5),
                         "stages": result.timings, "gpu_peak_mb": gpu_peak_mb(args.device),
                         "parity": parity[key]["parity"]})
            print(f"{mode} {label}: {wall:.2f}s rtf {wall / seconds:.4f} {result.timings} parity={parity[key]}",
                  flush=True)
    label, path, seconds = audio[-1]
    for n in args.engine_jobs:
        reset_gpu_peak(args.device)
        t0 = time.perf_counter()
        outs = engine.transcribe_many([EngineJob(path, speakers=2, source_name=f"job{i}") for i in range(n)])
        wall = time.perf_counter() - t0
        agree = [agreement(bare_out[label], [(s.start, s.end, s.text, s.speaker) for s in o.segments])
                 if not isinstance(o, BaseException) else {"error": repr(o)} for o in outs]
        report.setdefault("engine_agreement", {})[f"{n} x {label}"] = agree
        ok = [a for a in agree if "error" not in a]
        summary = {"jobs": n, "errors": n - len(ok), "identical": sum(a["identical"] for a in ok),
                   "max_char_edit_ratio": max((a["char_edit_ratio"] for a in ok), default=None),
                   "min_speaker_agreement": min((a["speaker_agreement"] for a in ok), default=None),
                   "max_time_diff_ms": max((a["max_time_diff_ms"] or 0 for a in ok), default=None)}
        rows.append({"mode": f"(f) batch engine, {n} jobs together", "audio": f"{n} x {label}", "wall_s": round(wall, 3),
                     "x_realtime": round(n * seconds / wall, 1), "gpu_peak_mb": gpu_peak_mb(args.device),
                     "agreement": summary, "stages": outs[0].timings if not isinstance(outs[0], BaseException) else {}})
        print(f"engine x{n} {label}: {wall:.2f}s = {n * seconds / wall:.1f}x realtime; agreement {summary}", flush=True)


def job_set(audio: list, n: int) -> list:
    """n jobs of mixed lengths: cycle through the recordings (short and long)."""
    return [audio[i % len(audio)] for i in range(n)]


def time_job_set(root: Path, mode: str, engines: int, jobs: list, env: dict | None = None) -> tuple[float, float, list]:
    """`serve --mode MODE` on root/config.json: wait for `engines` ready, submit `jobs` at once, wait for every
    result, stop it. Returns (seconds to ready, seconds from first submit to last result, worker statuses)."""
    from tests.support.pool_helpers import Server, ready_workers, results, wait_until
    from transcribe.core.pool.jobs import JobOptions
    from transcribe.core.pool.task_dir import TaskDir

    t0 = time.time()
    srv = Server(root / "config.json", mode=mode, workers=engines, env=env)
    try:
        wait_until(lambda: ready_workers(root / "tasks", engines), 900, f"{mode}: {engines} ready", interval=0.05)
        ready = time.time() - t0
        td = TaskDir(root / "tasks")
        t1 = time.time()
        for _, path, _ in jobs:
            td.submit(path, JobOptions(speakers=2))
        wait_until(lambda: len(results(root / "tasks")) >= len(jobs), 7200, "all jobs", interval=0.05)
        wall = time.time() - t1
        statuses = [json.loads(p.read_text()) for p in (root / "tasks" / "workers").glob("*.json")]
        assert srv.terminate(120) == 0, srv.output()[-2000:]
    finally:
        srv.kill_group()
    return ready, wall, statuses


def run_pool(args: argparse.Namespace, models: dict[str, Path], audio: list, report: dict, out: Path) -> None:
    jobs = job_set(audio, args.pool_jobs)
    audio_total = sum(j[2] for j in jobs)
    shapes = [(n, 1) for n in args.pool_workers] + args.engine_pool
    for (n, batch), mps in [(shape, mps) for mps in (args.cuda_mps.split(",") if args.cuda_mps else [""])
                            for shape in shapes]:
        root = out / f"pool-{n}x{batch}{f'-mps-{mps}' if mps else ''}"
        root.mkdir(parents=True, exist_ok=True)
        cfg = {"funasr": {"model": str(models["asr"]), "vad_model": str(models["vad"]),
                          "punc_model": str(models["punc"]), "spk_model": str(models["spk"]),
                          "device": args.device, "ncpu": max(1, min(args.ncpu, (os.cpu_count() or 1) // n)),
                          "engine_batch_s": args.engine_batch_s,
                          "engine_spk_batch": args.engine_spk_batch},
               "pool": {"task_dir": "tasks", "workers": n, "heartbeat_timeout": 300, "keep_audio": True,
                        "settle_seconds": 1.0, "batch_jobs": batch},
               "output": {"formats": ["json"]}, "logging": {"dir": "logs"}}
        if mps:
            cfg["pool"]["cuda_mps"] = {"true": True, "false": False}.get(mps, mps)
        (root / "config.json").write_text(json.dumps(cfg))
        ready, wall, statuses = time_job_set(root, "pool", n, jobs)
        mode = f"(d) pool x{n}" if batch == 1 else f"(g) engine pool x{n}, {batch} jobs per batch"
        mode += f", cuda_mps {mps}" if mps else ""
        row = {"mode": mode, "audio": f"{len(jobs)} jobs, {audio_total / 60:.0f} min", "wall_s": round(wall, 3),
               "x_realtime": round(audio_total / wall, 1), "ready_s": round(ready, 2),
               "worker_ready_s": sorted(s.get("ready_after_s") for s in statuses),
               "worker_rss_mb": sorted(s.get("rss_mb") for s in statuses),
               "worker_gpu_peak_mb": sorted(s.get("gpu_peak_mb") or 0 for s in statuses)}
        row["claim_latency_ms"] = claim_latencies(root / "tasks")
        row["job_stages_median_s"] = job_stage_medians(root / "tasks")
        report["rows"].append(row)
        print(f"{mode}: {wall:.1f}s for {audio_total:.0f}s audio = {audio_total / wall:.1f}x realtime; "
              f"ready {ready:.1f}s {row['claim_latency_ms']}", flush=True)


def job_stage_medians(task_dir: Path) -> dict[str, float]:
    """Median seconds per stage over the pool's finished jobs (each result's ``timings``): which stage
    slows down when the workers share the machine."""
    from tests.support.pool_helpers import results

    per_stage: dict[str, list[float]] = {}
    for result in results(task_dir):
        for stage, seconds in (result.get("timings") or {}).items():
            per_stage.setdefault(stage, []).append(seconds)
    return {stage: round(statistics.median(v), 3) for stage, v in per_stage.items()}


def claim_latencies(task_dir: Path) -> dict[str, float] | None:
    """Inbox-to-claim latency (submit -> claim, ms). `idle` is the first claim after the drop, when a
    worker was waiting; later jobs wait in the queue for a busy worker, which is not claim latency."""
    lat = []
    for job_json in task_dir.glob("done/*/job.json"):
        rec = json.loads(job_json.read_text())
        if rec.get("claimed"):
            created = datetime.fromisoformat(rec["created"]).timestamp()
            lat.append((rec["claimed"] - created) * 1000)
    if not lat:
        return None
    lat.sort()
    return {"idle": round(lat[0], 1), "queued_median": round(statistics.median(lat), 1)}


def print_table(report: dict) -> str:
    base = {r["audio"]: r["wall_s"] for r in report["rows"] if r["mode"] == "(a) bare FunASR"}
    lines = ["| mode | audio | wall s | RTF | vs bare | x realtime | parity | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        ratio = f"{base[r['audio']] / r['wall_s']:.2f}x" if r["audio"] in base and r["mode"] != "(a) bare FunASR" else ""
        notes = []
        if r.get("agreement"):
            notes.append(f"agreement with bare {r['agreement']}")
        if r.get("stages"):
            notes.append(" ".join(f"{k} {v:.2f}" for k, v in r["stages"].items() if k != "decode"))
        if r.get("gpu_peak_mb"):
            notes.append(f"GPU peak {r['gpu_peak_mb']:.0f} MB")
        if "vs_direct_call" in r:
            notes.append(f"direct calls in turn {r['direct_call_s']} s: lock mode {100 * r['vs_direct_call']:+.1f} %")
        if r.get("job_stages_median_s"):
            notes.append("job stages (median s) " + " ".join(f"{k} {v:.2f}" for k, v in r["job_stages_median_s"].items()))
        if r.get("ready_s") is not None:
            notes.append(f"ready {r['ready_s']}s (workers {r['worker_ready_s']}), claim latency ms "
                         f"{r['claim_latency_ms']}, worker RSS MB {r['worker_rss_mb']}")
        lines.append(f"| {r['mode']} | {r['audio']} | {r['wall_s']} | {r.get('rtf', '')} | {ratio} | "
                     f"{r.get('x_realtime', '')} | {r.get('parity', '')} | {'; '.join(notes)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "large"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--minutes", default="1", help="recording lengths (tiles of the 60 s podcast), e.g. 1,10,60")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ncpu", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--dtypes", default="", help="extra autocast dtypes to time and check, e.g. bfloat16,float16")
    ap.add_argument("--pool-workers", default="1,2", help="pool sizes to time; empty to skip")
    ap.add_argument("--pool-jobs", type=int, default=6)
    ap.add_argument("--engine-jobs", default="4", help="(f): jobs batched together in one engine call, e.g. 4,8")
    ap.add_argument("--engine-batch-s", type=int, default=300, help="funasr.engine_batch_s for (f) and (g)")
    ap.add_argument("--engine-spk-batch", type=int, default=128, help="funasr.engine_spk_batch (CAM++ windows per call)")
    ap.add_argument("--seed", type=int, default=0, help="funasr.seed, and numpy's seed before each bare call")
    ap.add_argument("--cuda-mps", default="", help="pool.cuda_mps values to time every pool row with, e.g. false,auto")
    ap.add_argument("--engine-pool", default="", help="(g): pools of batching workers as WORKERS:BATCH_JOBS, e.g. 1:8,2:4")
    ap.add_argument("--skip-single", action="store_true", help="only the pool rows (no bare/Transcriber/lock)")
    ap.add_argument("--vad-cpu", action="store_true", help="also time the Transcriber with fsmn-vad on the cpu")
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("TRANSCRIBE_SHARED", REPO.parent / "shared")))
    ap.add_argument("--models", type=Path, help="model cache dir (default .cache/bench-models)")
    ap.add_argument("--out", type=Path, default=REPO / "bench-out", help="results.json and table.md go here")
    ap.add_argument("--work", type=Path, help="scratch: tiled audio, pool task dirs (default: OUT/work)")
    args = ap.parse_args()
    args.work = args.work or args.out / "work"
    args.work.mkdir(parents=True, exist_ok=True)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    if args.dtypes and args.device == "cpu":
        print("note: --dtypes applies to cuda/mps only (half precision is refused on the cpu)")
        args.dtypes = []
    args.pool_workers = [int(n) for n in args.pool_workers.split(",") if n]
    args.engine_jobs = [int(n) for n in args.engine_jobs.split(",") if n]
    args.engine_pool = [tuple(int(x) for x in spec.split(":")) for spec in args.engine_pool.split(",") if spec]
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    asr_class = "SeacoParaformer" if args.size == "large" else "Paraformer"
    cache = args.models or REPO / ".cache" / "bench-models"
    t0 = time.perf_counter()
    models = build_all(cache / cache_key(args.size, asr_class), args.size, asr_class)
    built = time.perf_counter() - t0
    audio = make_audio(args.shared / "audio", args.work, [float(m) for m in args.minutes.split(",")])
    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "platform": platform.platform()},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": {"size": args.size, "asr_class": asr_class, "vad": "real fsmn-vad" if REAL_VAD.is_dir() else "energy",
                   "build_s": round(built, 1)},
        "rows": [],
    }
    if not args.skip_single:
        run_single_process(args, models, audio, report)
    if args.pool_workers or args.engine_pool:
        run_pool(args, models, audio, report, args.work)
    table = print_table(report)
    report["table"] = table
    (args.out / "results.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
