"""fsmn-vad's frame decisions from a host-side copy of the scores, installed by the Transcriber.

FunASR's ``FsmnVADStreaming`` (``funasr.models.fsmn_vad_streaming.model``) runs the FSMN net once per
chunk (``ComputeScores``, 60 s of audio in offline use) and then walks a per-frame Python state
machine over every 10 ms frame. Its ``GetFrameState`` reads the frame's silence score with
``cache["stats"].scores[0][t][sil_pdf_id].item()``: three tensor indexings and an ``.item()`` per
frame, and on CUDA each ``.item()`` is a device-to-host sync (~60,000 per 10 minutes of audio).

Here the scores of each chunk are copied to the host once, right after ``ComputeScores``, as the
Python floats ``.item()`` would have returned (``Tensor.tolist()`` gives the same float64 value of
each float32 score), summed over ``sil_pdf_ids`` in FunASR's order. ``GetFrameState`` then reads that
list; everything else it computes (``math.log``/``math.exp`` on Python floats, the decibel and SNR
tests, the noise average) is FunASR's code, line for line, so every frame decision is the same.
The copy follows ``stats.scores`` through ``DropCachedFrames`` (it keeps exactly as many trailing
frames), and wherever it cannot be kept in step (a batch of more than one, a length mismatch),
``GetFrameState`` falls back to FunASR's own method.
`tests/test_fast_vad.py` checks segment lists and printed warnings against FunASR as shipped.

What remains per frame is FunASR's own state machine (``DetectOneFrame``, ``WindowDetector``), unchanged.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Iterator
from importlib.metadata import version
from typing import Any

from loguru import logger

VERIFIED_FUNASR = ("1.4.",)  # the methods in FAST follow 1.4's, statement for statement
MODULE = "funasr.models.fsmn_vad_streaming.model"
NAME = "fast_vad"
HOST_SCORES = "_fast_vad_silence_scores"  # the Stats attribute holding the host copy (list of floats)
_ORIGINALS: dict[str, Any] = {}


def _vad_module() -> Any:
    from transcribe.core.engine.model_store import quiet_funasr

    with quiet_funasr():
        return importlib.import_module(MODULE)


def silence_scores(scores: Any, sil_pdf_ids: list[int]) -> list[float] | None:
    """Per frame, the silence score FunASR's ``GetFrameState`` reads, as the same Python float.

    One device-to-host copy for the whole chunk. ``None`` where FunASR's path must run instead
    (it asserts a batch of one, which the per-frame fallback then does as before).
    """
    if scores.dim() != 3 or scores.shape[0] != 1 or not sil_pdf_ids:
        return None
    rows = scores[0].detach()[:, list(sil_pdf_ids)].cpu().tolist()  # float32 -> the float .item() gives
    if len(sil_pdf_ids) == 1:
        return [row[0] for row in rows]
    return [sum(row) for row in rows]  # FunASR: sum(... .item() for sil_pdf_id in sil_pdf_ids), same order


def compute_scores(self: Any, feats: Any, cache: dict | None = None) -> None:
    """FunASR's ``ComputeScores``, then the new frames' silence scores appended to the host copy."""
    _ORIGINALS["ComputeScores"](self, feats, cache=cache)
    stats = cache["stats"]
    host = stats.__dict__.get(HOST_SCORES)
    new_frames = self.vad_opts.nn_eval_block_size  # ComputeScores sets it to this chunk's frame count
    total = stats.scores.shape[1]
    if host is None and total != new_frames:  # a cache whose earlier chunks ran unpatched
        return
    new = silence_scores(stats.scores[:, total - new_frames:], stats.sil_pdf_ids)
    if new is None:
        stats.__dict__.pop(HOST_SCORES, None)
        return
    host = new if host is None else host + new
    stats.__dict__[HOST_SCORES] = host if len(host) == total else None


def drop_cached_frames(self: Any, drop_frames: int, cache: dict | None = None) -> None:
    """FunASR's ``DropCachedFrames``; the host copy keeps the same trailing frames as ``stats.scores``."""
    _ORIGINALS["DropCachedFrames"](self, drop_frames, cache=cache)
    stats = cache["stats"]
    host = stats.__dict__.get(HOST_SCORES)
    if host is not None and stats.scores is not None:
        keep = stats.scores.shape[1]
        stats.__dict__[HOST_SCORES] = host[len(host) - keep:] if keep <= len(host) else None


def get_frame_state(self: Any, t: int, cache: dict | None = None) -> Any:
    """FunASR's ``GetFrameState`` with the score read from the host copy (same values, same decisions)."""
    if cache is None:
        cache = {}
    stats = cache["stats"]
    host = stats.__dict__.get(HOST_SCORES)
    if host is None:
        return _ORIGINALS["GetFrameState"](self, t, cache=cache)
    FrameState = _FRAME_STATE
    vad_opts = self.vad_opts
    decibel = stats.decibel
    if t >= len(decibel):
        return FrameState.kFrameStateSil
    cur_decibel = decibel[t]
    cur_snr = cur_decibel - stats.noise_average_decibel
    if cur_decibel < vad_opts.decibel_thres:
        return FrameState.kFrameStateSil

    assert len(stats.sil_pdf_ids) == vad_opts.silence_pdf_num
    # silence_scores() returned None for an empty sil_pdf_ids, so FunASR's branch is always taken here.
    sum_score = host[t]
    noise_prob = math.log(sum_score) * vad_opts.speech_2_noise_ratio
    total_score = 1.0
    sum_score = total_score - sum_score
    speech_prob = math.log(sum_score)
    if vad_opts.output_frame_probs:
        frame_prob = _FRAME_PROB()
        frame_prob.noise_prob = noise_prob
        frame_prob.speech_prob = speech_prob
        frame_prob.score = sum_score
        frame_prob.frame_id = t
        stats.frame_probs.append(frame_prob)
    if math.exp(speech_prob) >= math.exp(noise_prob) + stats.speech_noise_thres:
        if cur_snr >= vad_opts.snr_thres and cur_decibel >= vad_opts.decibel_thres:
            return FrameState.kFrameStateSpeech
        return FrameState.kFrameStateSil
    if stats.noise_average_decibel < -99.9:
        stats.noise_average_decibel = cur_decibel
    else:
        stats.noise_average_decibel = (
            cur_decibel + stats.noise_average_decibel * (vad_opts.noise_frame_num_used_for_snr - 1)
        ) / vad_opts.noise_frame_num_used_for_snr
    return FrameState.kFrameStateSil


FAST = {"ComputeScores": compute_scores, "DropCachedFrames": drop_cached_frames, "GetFrameState": get_frame_state}
# FunASR's FrameState enum and E2EVadFrameProb class, bound at install.
_FRAME_STATE: Any = None
_FRAME_PROB: Any = None


def install(funasr_version: str) -> list[str]:
    """Point ``FsmnVADStreaming`` at the host-score methods (idempotent); returns what was installed."""
    if not funasr_version.startswith(VERIFIED_FUNASR):
        logger.info("fast VAD not verified for funasr {}: using FunASR's own frame loop", funasr_version)
        return []
    global _FRAME_STATE, _FRAME_PROB
    module = _vad_module()
    cls = module.FsmnVADStreaming
    _FRAME_STATE, _FRAME_PROB = module.FrameState, module.E2EVadFrameProb
    for name, fast in FAST.items():
        _ORIGINALS.setdefault(name, cls.__dict__[name])
        setattr(cls, name, fast)
    return [f"{NAME}.{name}" for name in FAST]


def uninstall() -> None:
    """Restore FunASR's own methods (tests and benchmarks compare both in one process)."""
    if not _ORIGINALS:
        return
    cls = _vad_module().FsmnVADStreaming
    for name, original in _ORIGINALS.items():
        setattr(cls, name, original)


def installed() -> bool:
    """Whether ``FsmnVADStreaming`` runs the host-score methods now."""
    cls = _vad_module().FsmnVADStreaming
    return all(cls.__dict__.get(name) is fast for name, fast in FAST.items())


@contextlib.contextmanager
def switched(enabled: bool) -> Iterator[None]:
    """The block runs with the fast methods installed or FunASR's own; the process is left as it was.

    For tests and benchmarks that compare both sides in one process (the methods are process-wide).
    """
    was = installed()
    if enabled:
        install(version("funasr"))
    else:
        uninstall()
    try:
        yield
    finally:
        if was:
            install(version("funasr"))
        else:
            uninstall()
