#!/usr/bin/env python3
"""Profile the fast path on one recording (cProfile, top functions) and try placement variants.

    python tests/performance/profile_stages.py --size large --device cuda --minutes 10 --out DIR

Variants are checked for parity against the default placement (same segments, text, labels).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from tests.performance.bench import compare, make_audio
from tests.support.model_factory import build_all, cache_key


def profile_args(ap: argparse.ArgumentParser, device: str, work: str) -> argparse.ArgumentParser:
    """The options every profile script takes (shared with kernel_profile.py)."""
    ap.add_argument("--size", default="large")
    ap.add_argument("--device", default=device)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--ncpu", type=int, default=4)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--models", type=Path, default=REPO / ".cache" / "bench-models")
    ap.add_argument("--work", type=Path, default=Path(work))
    ap.add_argument("--out", type=Path, default=REPO / "bench-out")
    return ap


def models_and_recording(a: argparse.Namespace) -> tuple[dict[str, Path], tuple[str, Path, float]]:
    """Build (or reuse) the models for --size and tile the podcast to --minutes."""
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    asr_class = "SeacoParaformer" if a.size == "large" else "Paraformer"
    models = build_all(a.models / cache_key(a.size, asr_class), a.size, asr_class)
    [recording] = make_audio(a.shared / "audio", a.work, [a.minutes])
    return models, recording


def main() -> None:
    a = profile_args(argparse.ArgumentParser(), "cpu", "/tmp/profile-work").parse_args()
    from transcribe.config import config_from_dict
    from transcribe.core.engine.funasr_transcriber import Transcriber

    models, (_, path, _) = models_and_recording(a)
    base = {"model": str(models["asr"]), "vad_model": str(models["vad"]), "punc_model": str(models["punc"]),
            "spk_model": str(models["spk"]), "device": a.device, "ncpu": a.ncpu}
    report = {}
    t = Transcriber(config_from_dict({"funasr": base}, REPO))
    t.transcribe(path, speakers=2)
    prof = cProfile.Profile()
    prof.enable()
    ref = t.transcribe(path, speakers=2)
    prof.disable()
    text = io.StringIO()
    st = pstats.Stats(prof, stream=text)
    st.sort_stats("tottime").print_stats(35)
    st.sort_stats("cumulative").print_stats(60)
    (a.out / "profile.txt").write_text(text.getvalue())
    report["default"] = {"wall": ref.processing_time, "timings": ref.timings}
    ref_segs = [(s.start, s.end, s.text, s.speaker) for s in ref.segments]
    variants = {
        "vad_on_cpu": {"model_kwargs": {"vad_kwargs": {"device": "cpu"}}},
        "vad_punc_on_cpu": {"model_kwargs": {"vad_kwargs": {"device": "cpu"}, "punc_kwargs": {"device": "cpu"}}},
    }
    del t
    for name, extra in variants.items():
        v = Transcriber(config_from_dict({"funasr": {**base, **extra}}, REPO))
        v.transcribe(path, speakers=2)
        t0 = time.perf_counter()
        r = v.transcribe(path, speakers=2)
        report[name] = {"wall": round(time.perf_counter() - t0, 3), "timings": r.timings,
                        "parity": compare(ref_segs, [(s.start, s.end, s.text, s.speaker) for s in r.segments])}
        print(name, report[name], flush=True)
        del v
    (a.out / "variants.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
