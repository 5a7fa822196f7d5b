#!/usr/bin/env python3
"""One long recording through the `Transcriber` (memory check for issue 12: a 3-hour job must not run out of
memory): wall time, RTF, stage times, peak GPU memory (torch's allocator), peak RSS, segments and speakers.

    python tests/performance/long_job.py --size large --device cuda --minutes 180 --out DIR

The recording is the shared 60 s podcast tiled to --minutes. Writes long_job.json to --out.
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

from tests.performance.bench import gpu_peak_mb, peak_rss_mb, reset_gpu_peak
from tests.performance.profile_stages import models_and_recording, profile_args


def main() -> None:
    a = profile_args(argparse.ArgumentParser(description=__doc__), "cpu", "/tmp/long-job-work").parse_args()
    from transcribe.config import config_from_dict
    from transcribe.core.engine.funasr_transcriber import Transcriber

    models, (label, path, seconds) = models_and_recording(a)
    t = Transcriber(config_from_dict({"funasr": {
        "model": str(models["asr"]), "vad_model": str(models["vad"]), "punc_model": str(models["punc"]),
        "spk_model": str(models["spk"]), "device": a.device, "ncpu": a.ncpu}}, REPO))
    reset_gpu_peak(a.device)
    t0 = time.perf_counter()
    r = t.transcribe(path, speakers=2)
    wall = time.perf_counter() - t0
    report = {"audio": label, "audio_s": seconds, "wall_s": round(wall, 2), "rtf": round(wall / seconds, 5),
              "timings": r.timings, "segments": len(r.segments), "speakers": r.speakers,
              "characters": len(r.text), "gpu_peak_mb": gpu_peak_mb(a.device), "peak_rss_mb": peak_rss_mb(),
              "device": r.device}
    (a.out / "long_job.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
