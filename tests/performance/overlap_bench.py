#!/usr/bin/env python3
"""`funasr.overlap_stages` on one recording: the Transcriber with it off and on, alternating, medians.

    python tests/performance/overlap_bench.py --size large --device cuda --minutes 10 --out DIR

Both engines are seeded (`funasr.seed`), so their transcripts must be identical (checked, as `parity`).
Reports the wall time, RTF and stage timings (median per stage) of each; with the overlap on, `spk` is
the background thread's time and `spk_wait` how long FunASR's loop waited for an embedding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from tests.performance.bench import compare
from tests.performance.profile_stages import models_and_recording, profile_args


def main() -> None:
    ap = profile_args(argparse.ArgumentParser(), "cuda", "/tmp/overlap-work")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    from transcribe.config import config_from_dict
    from transcribe.core.engine.funasr_transcriber import Transcriber

    models, (label, path, seconds) = models_and_recording(a)
    base = {"model": str(models["asr"]), "vad_model": str(models["vad"]), "punc_model": str(models["punc"]),
            "spk_model": str(models["spk"]), "device": a.device, "ncpu": a.ncpu, "seed": 0}
    engines = {name: Transcriber(config_from_dict({"funasr": {**base, "overlap_stages": on}}, REPO))
               for name, on in (("off", False), ("on", True))}
    runs: dict[str, list] = {name: [] for name in engines}
    for name, t in engines.items():  # warm-up
        t.transcribe(path, speakers=2)
    for _ in range(a.repeats):  # alternating, so that drift hits both alike
        for name, t in engines.items():
            t0 = time.perf_counter()
            r = t.transcribe(path, speakers=2)
            runs[name].append((time.perf_counter() - t0, r))
    report = {"recording": label, "device": engines["on"].device.device, "repeats": a.repeats,
              "patches_on": engines["on"].patches}
    for name, rs in runs.items():
        wall = statistics.median(w for w, _ in rs)
        stages = sorted({k for _, r in rs for k in r.timings})
        report[name] = {"wall": round(wall, 3), "rtf": round(wall / seconds, 5),
                        "timings": {k: round(statistics.median(r.timings.get(k, 0.0) for _, r in rs), 3)
                                    for k in stages}}
    segs = {name: [[(s.start, s.end, s.text, s.speaker) for s in r.segments] for _, r in rs]
            for name, rs in runs.items()}
    report["parity"] = compare(segs["off"][0], segs["on"][0])
    report["all_runs_identical"] = all(s == segs["off"][0] for runs_ in segs.values() for s in runs_)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "overlap.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
