"""Time the result cache (miss vs hit) and the speaker options on the fixture models (CPU).

    .venv/bin/python tests/performance/bench_features.py [--audio PATH] [--repeats 3]

Prints JSON: median seconds for a full transcription (cache miss, stored), a cache hit of the same
bytes and options, and transcriptions with --speakers 2, --min/--max-speakers 2..4 and --no-diarize.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.conftest import AUDIO, CACHE, model_config  # noqa: E402
from tests.support.model_factory import build_all, cache_key  # noqa: E402
from transcribe.config import config_from_dict  # noqa: E402
from transcribe.core.engine.funasr_transcriber import Transcriber  # noqa: E402


def median_time(call, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 4), result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--audio", type=Path, default=AUDIO / "podcast_2speakers_60s.wav")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    models = build_all(CACHE / "test-models" / cache_key("tiny", "Paraformer"))
    with tempfile.TemporaryDirectory() as tmp:
        data = model_config(models)
        data["cache"] = {"enabled": True, "dir": str(Path(tmp) / "cache")}
        t = Transcriber(config_from_dict(data, tmp))
        t.warm_up()
        out = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "audio": args.audio.name}
        out["full_no_cache"], _ = median_time(lambda: t.transcribe(args.audio, use_cache=False), args.repeats)
        out["cache_miss_and_store"], _ = median_time(lambda: t.transcribe(args.audio, speakers=3), 1)
        out["cache_hit"], hit = median_time(lambda: t.transcribe(args.audio, speakers=3), args.repeats)
        assert hit.cached
        for name, options in {"speakers_2": {"speakers": 2}, "min2_max4": {"min_speakers": 2, "max_speakers": 4},
                              "no_diarize": {"diarize": False}}.items():
            out[name], _ = median_time(lambda: t.transcribe(args.audio, use_cache=False, **options), args.repeats)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
