#!/usr/bin/env python3
"""fsmn-vad as FunASR ships it vs with `core/engine/fast_vad.py`: time, per-frame tensor reads, syncs.

    python tests/performance/vad_bench.py --device cuda --minutes 10 --repeats 5

The podcast recording is tiled to --minutes and run through the real fsmn-vad (``AutoModel(model=
fsmn-vad)``, offline, as ``inference_with_vad`` calls it). Per variant it prints the median of
--repeats of the whole VAD call and of its frame loop (``DetectCommonFrames``/``DetectLastFrames``,
where the per-frame state machine runs), the tensor ``__getitem__`` and ``.item()`` calls per 10 ms
frame (one extra, untimed run with counters), on CUDA the synchronizing operations that
``torch.cuda.set_sync_debug_mode`` reports, and whether the segment lists are identical. --profile
prints the cProfile top of one fast run.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

FRAME_LOOPS = ("DetectCommonFrames", "DetectLastFrames")


@contextlib.contextmanager
def counting_tensor_reads() -> Iterator[dict[str, int]]:
    """Count ``Tensor.__getitem__`` and ``Tensor.item`` calls (slows them: never in a timed run)."""
    import torch

    counts = {"getitem": 0, "item": 0}
    real_getitem, real_item = torch.Tensor.__getitem__, torch.Tensor.item

    def getitem(self: Any, index: Any) -> Any:
        counts["getitem"] += 1
        return real_getitem(self, index)

    def item(self: Any) -> Any:
        counts["item"] += 1
        return real_item(self)

    torch.Tensor.__getitem__, torch.Tensor.item = getitem, item
    try:
        yield counts
    finally:
        torch.Tensor.__getitem__, torch.Tensor.item = real_getitem, real_item


@contextlib.contextmanager
def counting_syncs(device: str) -> Iterator[list]:
    """The synchronizing CUDA operations (torch's sync debug mode warns once per such call)."""
    import torch

    if not device.startswith("cuda"):
        yield []
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode("default")


def timed_frame_loops(vad: Any, spent: list[float]) -> None:
    """Instance-level wrappers adding up the time in the per-frame loops (FunASR calls self.Detect...)."""
    cls = type(vad)
    for name in FRAME_LOOPS:
        def loop(*args: Any, _name: str = name, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return getattr(cls, _name)(vad, *args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t0
        setattr(vad, name, loop)


def run_variant(label: str, model: Any, audio: Any, a: argparse.Namespace, sync: Callable[[], None]) -> dict:
    frames_in_loop = [0.0]
    timed_frame_loops(model.model, frames_in_loop)
    model.generate(input=audio)  # warm-up
    walls, loops, out = [], [], None
    for _ in range(a.repeats):
        frames_in_loop[0] = 0.0
        sync()
        t0 = time.perf_counter()
        out = model.generate(input=audio)
        sync()
        walls.append(time.perf_counter() - t0)
        loops.append(frames_in_loop[0])
    frames = len(audio) // 160
    with counting_syncs(a.device) as syncs:
        model.generate(input=audio)
    with counting_tensor_reads() as counts:
        model.generate(input=audio)
    row = {"variant": label, "vad_s": round(statistics.median(walls), 3),
           "frame_loop_s": round(statistics.median(loops), 3), "vad_runs_s": [round(w, 3) for w in walls],
           "getitem_per_frame": round(counts["getitem"] / frames, 3),
           "item_per_frame": round(counts["item"] / frames, 3), "segments": len(out[0]["value"])}
    if a.device.startswith("cuda"):
        row["cuda_syncs"] = len(syncs)
    print(json.dumps(row), flush=True)
    return {"row": row, "segments": out[0]["value"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ncpu", type=int, default=4)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--profile", action="store_true", help="print the cProfile top of one fast-VAD run")
    a = ap.parse_args()

    import numpy as np
    import soundfile as sf
    import torch
    from funasr import AutoModel

    from transcribe.core.engine import fast_vad

    podcast, _ = sf.read(str(a.shared / "audio" / "podcast_2speakers_60s.wav"), dtype="float32")
    audio = np.tile(podcast, int(np.ceil(a.minutes * 60 * 16000 / len(podcast))))[: int(a.minutes * 60 * 16000)]
    model = AutoModel(model=str(a.shared / "models" / "fsmn-vad"), device=a.device, ncpu=a.ncpu,
                      disable_update=True, disable_pbar=True, log_level="ERROR")
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    print(f"fsmn-vad on {a.device}, {a.minutes:g} min, {a.repeats} repeats, torch {torch.__version__}, "
          f"funasr {version('funasr')}", flush=True)

    with fast_vad.switched(False):
        shipped = run_variant("funasr as shipped", model, audio, a, sync)
    fast_vad.install(version("funasr"))
    fast = run_variant("fast_vad", model, audio, a, sync)
    same = shipped["segments"] == fast["segments"]
    before, after = shipped["row"], fast["row"]
    print(json.dumps({"identical_segments": same, "speedup_vad": round(before["vad_s"] / after["vad_s"], 2),
                      "speedup_frame_loop": round(before["frame_loop_s"] / max(after["frame_loop_s"], 1e-9), 2)}))
    if a.profile:
        prof = cProfile.Profile()
        prof.runcall(model.generate, input=audio)
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    if not same:
        sys.exit("segment lists differ")


if __name__ == "__main__":
    main()
