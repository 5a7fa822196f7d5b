#!/usr/bin/env python3
"""Kernel-level profile (torch.profiler) of one recording: Transcriber vs the batch engine (1 and N jobs).

    python tests/performance/kernel_profile.py --size large --device cuda --minutes 10 --jobs 4 --out DIR

Per mode: wall time, GPU kernel time (sum of kernel durations) and its ratio to wall, kernel launches
and device-to-host syncs (``aten::_local_scalar_dense``, i.e. ``.item()``/``.tolist()``, plus explicit
stream/device synchronisations), each also per audio minute, peak GPU memory. Writes kernel_profile.json
and the top CUDA kernels per mode (kernels_<mode>.txt).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from tests.performance.profile_stages import models_and_recording, profile_args

LAUNCH_NAMES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")
PROFILER_EVENTS = ("Buffer Flush", "Activity Buffer Request")
SYNC_NAMES = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")


def profile(fn, audio_minutes: float, out: Path, name: str) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in LAUNCH_NAMES)
    syncs = {k: sum(e.count for e in events if e.key == k) for k in SYNC_NAMES}
    # Device-only rows (kernels, memcpy/memset) have no CPU time; the profiler's own buffer events are not work.
    kernel_us = sum(e.self_device_time_total for e in events
                    if e.self_cpu_time_total == 0 and e.key not in PROFILER_EVENTS and not e.key.startswith("Mem"))
    (out / f"kernels_{name}.txt").write_text(events.table(sort_by="self_device_time_total", row_limit=40))
    return {"wall_s": round(wall, 3), "gpu_kernel_s": round(kernel_us / 1e6, 3),
            "kernel_time_over_wall": round(kernel_us / 1e6 / wall, 3), "kernel_launches": launches,
            "launches_per_audio_min": round(launches / audio_minutes), "syncs": syncs,
            "syncs_per_audio_min": round(sum(syncs.values()) / audio_minutes),
            "gpu_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1), "note": "wall under the profiler"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", default="4", help="engine batch sizes (jobs together) to profile, e.g. 4,8")
    a = profile_args(ap, "cuda", "/tmp/kernel-profile-work").parse_args()
    from transcribe.config import config_from_dict
    from transcribe.core.engine.batch_engine import BatchTranscriber, EngineJob
    from transcribe.core.engine.funasr_transcriber import Transcriber

    models, (label, path, seconds) = models_and_recording(a)
    cfg = config_from_dict({"funasr": {"model": str(models["asr"]), "vad_model": str(models["vad"]),
                                       "punc_model": str(models["punc"]), "spk_model": str(models["spk"]),
                                       "device": a.device, "ncpu": a.ncpu}}, REPO)
    t = Transcriber(cfg)
    engine = BatchTranscriber(t)
    for _ in range(2):  # warm-up of both paths; CUDA graphs are recorded on a shape's second call
        t.transcribe(path, speakers=2)
        engine.transcribe(path, speakers=2)
    minutes = seconds / 60
    report = {"audio": label, "device": a.device}
    report["transcriber"] = profile(lambda: t.transcribe(path, speakers=2), minutes, a.out, "transcriber")
    print("transcriber", report["transcriber"], flush=True)
    report["engine_1"] = profile(lambda: engine.transcribe(path, speakers=2), minutes, a.out, "engine_1")
    print("engine_1", report["engine_1"], flush=True)
    for n in [int(x) for x in a.jobs.split(",") if x]:
        items = [EngineJob(path, speakers=2) for _ in range(n)]
        report[f"engine_{n}"] = profile(lambda: engine.transcribe_many(items), minutes * n, a.out, f"engine_{n}")
        t0 = time.perf_counter()
        outs = engine.transcribe_many(items)
        wall = time.perf_counter() - t0
        report[f"engine_{n}"]["wall_unprofiled_s"] = round(wall, 3)
        report[f"engine_{n}"]["x_realtime_unprofiled"] = round(n * seconds / wall, 1)
        report[f"engine_{n}"]["stages_job0"] = getattr(outs[0], "timings", repr(outs[0]))
        print(f"engine_{n}", report[f"engine_{n}"], flush=True)
    (a.out / "kernel_profile.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
