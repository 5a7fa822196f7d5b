"""How far two transcripts of the same recording agree (batched-engine jobs against bare FunASR).

Segments are ``(start_s, end_s, text, speaker)``. Reported per job: the character-level edit
distance of the joined texts (and its ratio to the reference length), the share of the reference's
speech time whose speaker the other transcript gives too (best label mapping), and the largest start/end difference
when both have the same segments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rapidfuzz.distance import Levenshtein  # a FunASR dependency

Segment = tuple[float, float, str, str | None]


def agreement(reference: Sequence[Segment], other: Sequence[Segment]) -> dict[str, Any]:
    ref_text, other_text = "".join(s[2] for s in reference), "".join(s[2] for s in other)
    edits = Levenshtein.distance(ref_text, other_text)
    same_shape = len(reference) == len(other)
    max_dt = (max((max(abs(a[0] - b[0]), abs(a[1] - b[1])) for a, b in zip(reference, other)), default=0.0)
              if same_shape else None)
    return {"segments": (len(reference), len(other)), "char_edits": edits,
            "char_edit_ratio": round(edits / max(1, len(ref_text)), 5),
            "speaker_agreement": round(speaker_agreement(reference, other), 5),
            "max_time_diff_ms": None if max_dt is None else round(max_dt * 1000, 3),
            "identical": list(reference) == list(other)}


def speaker_agreement(reference: Sequence[Segment], other: Sequence[Segment]) -> float:
    """Share of the reference's segment time where `other` says the same speaker, under the best
    one-to-one mapping of labels (labels are names in order of first appearance: one early flip would
    otherwise rename every later segment)."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    ref_labels = sorted({str(s[3]) for s in reference})
    other_labels = sorted({str(s[3]) for s in other})
    total = sum(end - start for start, end, _, _ in reference)
    if not total or not other_labels:
        return 1.0 if not total else 0.0
    overlap = np.zeros((len(ref_labels), len(other_labels)))
    for start, end, _, label in reference:
        for o_start, o_end, _, o_label in other:
            shared = min(end, o_end) - max(start, o_start)
            if shared > 0:
                overlap[ref_labels.index(str(label)), other_labels.index(str(o_label))] += shared
    rows, cols = linear_sum_assignment(-overlap)
    return min(1.0, float(overlap[rows, cols].sum()) / total)
