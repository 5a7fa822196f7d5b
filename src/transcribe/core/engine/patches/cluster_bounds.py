"""Bounds on CAM++'s estimated speaker count (``--min-speakers`` / ``--max-speakers``), for FunASR 1.4.16.

FunASR clusters the CAM++ window embeddings in ``ClusterBackend.forward(X, oracle_num=k)``
(funasr/models/campplus/cluster_backend.py), called once per job from
``AutoModel.inference_with_vad`` with ``oracle_num=preset_spk_num``:

- fewer than 20 windows: everything is one speaker;
- fewer than 2048 windows: ``SpectralCluster``, whose ``get_spec_embs`` takes the count ``k``
  from the largest gap between consecutive Laplacian eigenvalues among
  ``lambdas[min_num_spks - 1 : max_num_spks + 1]`` (fixed at 1..15), unless ``k`` is given;
- more: k-means with a given ``k``, else UMAP + HDBSCAN;
- with no ``k``, speakers whose centres are closer than cosine 0.78 are merged (``merge_by_cos``).

Bounds wrap that one call, per AutoModel instance (never the class): with bounds set, the
eigengap search runs over FunASR's own ``min_num_spks``/``max_num_spks`` set to the bounds for
that call, FunASR's merge follows, and a count that still falls outside the bounds (the merge, or
the UMAP path) is re-clustered by FunASR's own ``oracle_num`` path at the nearest bound. Without
bounds the call is FunASR's, untouched (tests/test_features.py checks parity with bare FunASR).
The bounds are set by the `Transcriber` under its lock for one ``generate`` call.
"""

from __future__ import annotations

from typing import Any, Callable

from loguru import logger

from transcribe.core.errors import SpeakerCountError

NAME = "cluster_bounds"
VERIFIED_FUNASR = ("1.4.16",)  # the attribute names and thresholds above, read from this version
FEWEST_WINDOWS_TO_CLUSTER = 20  # ClusterBackend.forward: below this, one speaker
SPECTRAL_BELOW = 2048  # ClusterBackend.forward: spectral clustering below this many windows


class BoundedClustering:
    """Replaces one ``cb_model.forward``; `bounds` (min, max) is read at each call (None: FunASR's own)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.original: Callable[..., Any] = backend.forward
        self.bounds: tuple[int, int] | None = None

    def __call__(self, X: Any, **params: Any) -> Any:
        if self.bounds is None or params.get("oracle_num") is not None:
            return self.original(X, **params)
        return self.bounded_labels(X, *self.bounds)

    def bounded_labels(self, X: Any, low: int, high: int) -> Any:
        windows = X.shape[0]
        if windows < FEWEST_WINDOWS_TO_CLUSTER:
            return self.original(X)  # FunASR: too little speech to cluster, one speaker
        if low >= windows:
            raise SpeakerCountError(
                f"min_speakers {low} is more than this audio can hold ({windows} speaker windows of 1.5 s); "
                "lower min_speakers")
        if low == high:
            return self.original(X, oracle_num=low)
        if windows < SPECTRAL_BELOW:
            spectral = self.backend.spectral_cluster
            saved = spectral.min_num_spks, spectral.max_num_spks
            spectral.min_num_spks, spectral.max_num_spks = low, high
            try:
                labels = spectral(X, None)
            finally:
                spectral.min_num_spks, spectral.max_num_spks = saved
            labels = self.backend.merge_by_cos(labels, X, self.backend.model_config["merge_thr"])
        else:
            labels = self.original(X)
        found = int(labels.max()) + 1
        if low <= found <= high:
            return labels
        return self.original(X, oracle_num=min(max(found, low), high))


def supported(funasr_version: str) -> bool:
    return funasr_version.split("+")[0] in VERIFIED_FUNASR


def install(automodel: Any, funasr_version: str) -> BoundedClustering | None:
    """Wrap this AutoModel's clustering call; None when it has no speaker model or FunASR is unverified."""
    backend = getattr(automodel, "cb_model", None)
    if getattr(automodel, "spk_model", None) is None or backend is None:
        return None
    if not supported(funasr_version) or not hasattr(backend, "spectral_cluster"):
        logger.info("speaker-count bounds not verified for funasr {}: min/max speakers unavailable", funasr_version)
        return None
    current = backend.__dict__.get("forward")
    if isinstance(current, BoundedClustering):
        return current
    wrapper = BoundedClustering(backend)
    backend.forward = wrapper  # instance attribute: nn.Module.__call__ finds it before the class's forward
    return wrapper
