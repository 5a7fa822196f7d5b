"""The fast CIF scans are bit-identical to FunASR's loops (random and threshold-edge inputs)."""

import pytest
import torch

from transcribe.core.engine import fast_cif

BICIF = "funasr.models.bicif_paraformer.cif_predictor"
TS = "funasr.utils.timestamp_tools"


def alphas_cases():
    g = torch.Generator().manual_seed(0)
    yield torch.rand(3, 400, generator=g) * 0.6
    yield torch.rand(1, 1000, generator=g)  # frequent fires
    yield torch.full((2, 50), 0.25)  # sums land exactly on the threshold
    yield torch.full((2, 60), 1.0 - 1e-4) / 3  # exactly threshold - 1e-4 after 3 frames
    yield torch.zeros(1, 10)
    yield torch.rand(4, 1, generator=g)


@pytest.mark.parametrize("module", [BICIF, TS])
@pytest.mark.parametrize("threshold", [1.0, 1.0 - 1e-4])
def test_cif_wo_hidden_is_bit_identical(module, threshold):
    original = fast_cif.original(module, "cif_wo_hidden")
    for alphas in alphas_cases():
        assert torch.equal(fast_cif.cif_wo_hidden(alphas.clone(), threshold), original(alphas.clone(), threshold))


def test_cif_is_bit_identical():
    original = fast_cif.original(BICIF, "cif")
    g = torch.Generator().manual_seed(1)
    for alphas in alphas_cases():
        hidden = torch.randn(alphas.shape[0], alphas.shape[1], 16, generator=g)
        want_embeds, want_fires = original(hidden.clone(), alphas.clone(), 1.0)
        got_embeds, got_fires = fast_cif.cif(hidden.clone(), alphas.clone(), 1.0)
        assert torch.equal(got_fires, want_fires) and torch.equal(got_embeds, want_embeds)


def test_install_is_idempotent_and_reversible():
    import importlib

    bicif = importlib.import_module(BICIF)
    try:
        first = fast_cif.install("1.4.16")
        assert fast_cif.install("1.4.16") == first and bicif.cif is fast_cif.cif
        assert fast_cif.original(BICIF, "cif") is not fast_cif.cif
    finally:
        fast_cif.uninstall()
    assert bicif.cif is fast_cif.original(BICIF, "cif")
    assert fast_cif.install("1.3.0") == []
