"""Fast, exact CIF scans for SeACo/BiCif Paraformer (paraformer-zh), installed by the Transcriber.

FunASR's ``cif`` and ``cif_wo_hidden`` (``funasr.models.bicif_paraformer.cif_predictor``, and the
copy in ``funasr.utils.timestamp_tools``) integrate the predictor's weights frame by frame with 4-8
torch ops per frame. On a GPU each op is a kernel launch: profiled on an H100 they took ~8 s of a
10-minute job's 20 s. The scan is inherently sequential, so here it runs on the CPU in float32 numpy:
the same IEEE single-precision additions, subtractions, products and comparisons in the same order
(no fused multiply-add: each FunASR op is its own kernel, and each is its own numpy op here), so the
results are bit-identical. `tests/test_fast_cif.py` checks that against FunASR's functions on random
and edge-case inputs, and the parity tests check whole transcripts.

Only the loop is replaced; everything around it (the padding and gathering after the loop) keeps
FunASR's own torch code path by calling the same tensor operations on the scan's output.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch
from loguru import logger

# Verified bit-exact against these FunASR versions' loops; others keep FunASR's own functions.
VERIFIED_FUNASR = ("1.4.",)
TARGETS = {
    "funasr.models.bicif_paraformer.cif_predictor": ("cif", "cif_wo_hidden"),
    "funasr.utils.timestamp_tools": ("cif_wo_hidden",),
}
_ORIGINALS: dict[tuple[str, str], Any] = {}


def cif_wo_hidden(alphas: torch.Tensor, threshold: float) -> torch.Tensor:
    """The fires of FunASR's ``cif_wo_hidden``: running sum of alphas, minus threshold at each fire."""
    a = alphas.detach().to("cpu", torch.float32).numpy()
    thr = np.float32(threshold)  # FunASR: ones([B]) * threshold, a float32 tensor
    fires = np.empty_like(a)
    integrate = np.zeros(a.shape[0], dtype=np.float32)
    for t in range(a.shape[1]):
        integrate = integrate + a[:, t]
        fires[:, t] = integrate
        integrate = np.where(integrate >= thr, integrate - thr, integrate)
    return torch.from_numpy(fires).to(alphas.device)


def cif(hidden: torch.Tensor, alphas: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FunASR's bicif ``cif``: acoustic embeddings (one per fire) and fires."""
    batch_size, len_time, hidden_size = hidden.size()
    h = hidden.detach().to("cpu", torch.float32).numpy()
    a = alphas.detach().to("cpu", torch.float32).numpy()
    one, thr = np.float32(1.0), np.float32(threshold)
    integrate = np.zeros(batch_size, dtype=np.float32)
    frame = np.zeros((batch_size, hidden_size), dtype=np.float32)
    fires = np.empty((batch_size, len_time), dtype=np.float32)
    frames = np.empty((batch_size, len_time, hidden_size), dtype=np.float32)
    for t in range(len_time):
        alpha = a[:, t]
        completion = one - integrate
        integrate = integrate + alpha
        fires[:, t] = integrate
        fire = integrate >= thr
        integrate = np.where(fire, integrate - one, integrate)
        cur = np.where(fire, completion, alpha)
        remainder = alpha - cur
        h_t = h[:, t, :]
        frame = frame + cur[:, None] * h_t
        frames[:, t] = frame
        frame = np.where(fire[:, None], remainder[:, None] * h_t, frame)
    device = hidden.device
    fires_t = torch.from_numpy(fires).to(device)
    frames_t = torch.from_numpy(frames).to(device)
    # After the loop: FunASR's own gathering and padding, op for op.
    len_labels = torch.round(alphas.sum(-1)).int()
    max_label_len = len_labels.max()
    list_ls = []
    for b in range(batch_size):
        fire_b = fires_t[b, :]
        l_b = torch.index_select(frames_t[b, :, :], 0, torch.nonzero(fire_b >= threshold).squeeze(-1))
        pad = torch.zeros([max_label_len - l_b.size(0), hidden_size], device=device)
        list_ls.append(torch.cat([l_b, pad], 0))
    return torch.stack(list_ls, 0), fires_t


FAST = {"cif": cif, "cif_wo_hidden": cif_wo_hidden}


def install(funasr_version: str) -> list[str]:
    """Point FunASR's modules at the fast scans (idempotent); returns what was installed."""
    if not funasr_version.startswith(VERIFIED_FUNASR):
        logger.info("fast CIF not verified for funasr {}: using FunASR's own loops", funasr_version)
        return []
    from transcribe.core.engine.model_store import quiet_funasr

    installed = []
    for module_name, names in TARGETS.items():
        with quiet_funasr():
            module = importlib.import_module(module_name)
        for name in names:
            key = (module_name, name)
            _ORIGINALS.setdefault(key, getattr(module, name))
            setattr(module, name, FAST[name])
            installed.append(f"{module_name.rsplit('.', 1)[-1]}.{name}")
    return installed


def uninstall() -> None:
    """Restore FunASR's own functions (tests and benchmarks compare both)."""
    for (module_name, name), original in _ORIGINALS.items():
        setattr(importlib.import_module(module_name), name, original)


def original(module_name: str, name: str) -> Any:
    """FunASR's own function, whether or not the fast one is installed."""
    return _ORIGINALS.get((module_name, name)) or getattr(importlib.import_module(module_name), name)
