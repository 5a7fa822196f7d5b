#!/usr/bin/env python3
"""Punctuation (ct-punc) and FunASR's assembly, FunASR's own loop against `funasr.fast_punc`.

    python tests/performance/punc_bench.py --size large --device cuda --minutes 10 --out DIR
    python tests/performance/punc_bench.py --size large --device cpu --jobs 0 --repeats 5   # punc stage only

One job on the tiled podcast (the warm-up) records the text FunASR hands the punctuation model; the
punctuation call is then timed alone, alternating FunASR's loop (the wrapper switched off at call
time) and the fast path, `--repeats` times each (medians), after checking that both give the same
text and punc_array. Host syncs per call: on CUDA counted by torch's sync debug mode, on the CPU by
`tests.support.host_syncs` (the logits marked as device tensors). With `--jobs N`, whole jobs are
timed too (N each, alternating): the punc stage, and the assembly (generate less vad, asr, punc,
spk: FunASR's sorting, offsets, sentence building, speaker assignment). The input text is kept in
--out (punc_input_<size>_<minutes>min.txt) so a CPU rerun skips the ASR.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from tests.performance.profile_stages import models_and_recording, profile_args


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def count_syncs(device: str, punc_class: type, call: Callable[[], Any]) -> int:
    """Device-to-host syncs of one call: torch's sync debug mode on CUDA, marked logits (or a marked
    punc_array, `call` marking it itself) on the CPU."""
    if device.startswith("cuda"):
        import torch

        synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                call()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)
    from tests.support.host_syncs import counting, punc_logits_on_device

    with punc_logits_on_device(punc_class), counting() as syncs:
        call()
    return syncs.total


def alternate(modes: dict[str, Callable[[], Any]], repeats: int, device: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(repeats):
        for mode, call in modes.items():
            synchronize(device)
            t0 = time.perf_counter()
            call()
            synchronize(device)
            times[mode].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = profile_args(argparse.ArgumentParser(description=__doc__), "cpu", "/tmp/punc-bench-work")
    ap.add_argument("--repeats", type=int, default=5, help="punctuation calls per mode")
    ap.add_argument("--jobs", type=int, default=3, help="whole jobs per mode (0: punctuation stage only)")
    a = ap.parse_args()
    import numpy as np
    import torch

    from transcribe.config import config_from_dict
    from transcribe.core.engine import fast_punc
    from transcribe.core.engine.funasr_transcriber import (
        Transcriber,
        build_generate_kwargs,
    )

    models, (_, path, _) = models_and_recording(a)
    cfg = config_from_dict({"funasr": {"model": str(models["asr"]), "vad_model": str(models["vad"]),
                                       "punc_model": str(models["punc"]), "spk_model": str(models["spk"]),
                                       "device": a.device, "ncpu": a.ncpu}}, REPO)
    t = Transcriber(cfg)
    assert t.fast_punc is not None, "fast_punc did not install (FunASR version?)"
    am = t.model
    text_file = a.out / f"punc_input_{a.size}_{a.minutes:g}min.txt"
    if a.jobs or not text_file.exists():
        real = am.inference
        seen: list[str] = []

        def recording(*args: Any, model: Any = None, **kwargs: Any) -> Any:
            if model is am.punc_model:
                seen.append(args[0])
            return real(*args, model=model, **kwargs)

        am.inference = recording
        t.transcribe(path, speakers=2)  # warm-up
        am.inference = real
        text_file.write_text(seen[0], encoding="utf-8")
    text = text_file.read_text(encoding="utf-8")
    gen = build_generate_kwargs(cfg, speakers=2)

    @contextlib.contextmanager
    def mode(name: str) -> Any:
        """funasr: FunASR's own loop; fast_punc: the fast path without CUDA graphs; cuda_graphs: both."""
        for g in t.graphs:
            g.enabled = name == "cuda_graphs"
        try:
            with fast_punc.funasr_own(t.fast_punc) if name == "funasr" else contextlib.nullcontext():
                yield
        finally:
            for g in t.graphs:
                g.enabled = True

    def punctuate(name: str) -> Callable[[], Any]:
        def call() -> Any:
            with mode(name), torch.no_grad():
                return am.inference(text, model=am.punc_model, kwargs=am.punc_kwargs, **gen)[0]
        return call

    names = ["funasr", "fast_punc"] + (["cuda_graphs"] if t.graphs else [])
    modes = {m: punctuate(m) for m in names}
    outs = {m: call() for m, call in modes.items()}  # warm-up, and parity
    if t.graphs:
        outs["cuda_graphs"] = modes["cuda_graphs"]()  # every length seen twice: replayed from graphs
    same = all(outs["funasr"]["text"] == o["text"] and outs["funasr"]["punc_array"].tolist() == o["punc_array"].tolist()
               for o in outs.values())
    tokens = len(outs["funasr"]["punc_array"])
    syncs = {m: count_syncs(a.device, type(am.punc_model), call) for m, call in modes.items()}
    times = alternate(modes, a.repeats, a.device)

    # Sentence building (FunASR's assembly) on each mode's punc_array: FunASR's on the model's device.
    from funasr.utils.timestamp_tools import timestamp_sentence

    from tests.support.host_syncs import mark

    stamps = [[i * 100, i * 100 + 80] for i in range(tokens)]
    on_device = a.device.startswith("cuda")
    builders = {"funasr": (timestamp_sentence, outs["funasr"]["punc_array"]),
                "fast_punc": (fast_punc.marks_as_list(timestamp_sentence), outs["fast_punc"]["punc_array"])}
    # On the CPU, FunASR's array is marked as the device tensor it is on a GPU; the fast path's is a host one.
    sentence_calls = {m: functools.partial(build, marks if on_device or m == "fast_punc" else mark(marks),
                                           stamps, text) for m, (build, marks) in builders.items()}
    sentences_same = sentence_calls["funasr"]() == sentence_calls["fast_punc"]()
    sentence_syncs = {m: count_syncs(a.device, type(am.punc_model), call) for m, call in sentence_calls.items()}
    sentence_times = alternate(sentence_calls, a.repeats, a.device)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
        "size": a.size, "minutes": a.minutes, "text_chars": len(text), "tokens": tokens, "parity": same,
        "punc_s": {m: {"median": round(statistics.median(v), 4), "all": [round(x, 4) for x in v]}
                   for m, v in times.items()},
        "punc_syncs": syncs,
        "sentences_parity": sentences_same,
        "sentences_s": {m: round(statistics.median(v), 5) for m, v in sentence_times.items()},
        "sentences_syncs": sentence_syncs,
    }
    report["cuda_graphs"] = {g.name: {"graphs": len(g.graphs), "replays": g.replays,
                                      "uncapturable": [str(k) for k in g.uncapturable]} for g in t.graphs}
    if a.jobs:
        jobs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        segments: dict[str, list[list[tuple]]] = {m: [] for m in modes}
        for _ in range(a.jobs):
            for name in modes:
                np.random.seed(0)  # FunASR's k-means (sklearn, random_state=None) uses numpy's global RNG
                with mode(name):
                    r = t.transcribe(path, speakers=2)
                tm = r.timings
                # through the engine's stages (overlap_stages) the assembly is timed; in FunASR's loop, the rest
                assembly = tm["assemble"] if "assemble" in tm else tm["generate"] - sum(
                    tm.get(s, 0.0) for s in ("vad", "asr", "spk", "punc"))
                jobs[name].append({"generate": tm["generate"], "punc": tm.get("punc", 0.0), "assembly": assembly})
                segments[name].append([(s.start, s.end, s.text, s.speaker) for s in r.segments])
        report["job_parity"] = all(segments["funasr"] == v for v in segments.values())
        report["job_s"] = {m: {k: round(statistics.median(j[k] for j in v), 4) for k in v[0]}
                           for m, v in jobs.items()}
    print(json.dumps(report, indent=2, ensure_ascii=False))
    (a.out / f"punc_bench_{a.device.split(':')[0]}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
