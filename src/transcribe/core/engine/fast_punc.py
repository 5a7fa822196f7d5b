"""Punctuation (CT-Transformer, ct-punc) with one device-to-host transfer per mini-sentence, for FunASR 1.4.16.

FunASR's ``CTTransformer.inference`` (funasr/models/ct_transformer/model.py) splits the text into
mini-sentences of ``split_size`` tokens and, for each one in turn, runs the transformer and picks
each token's mark with ``y.view(-1, C).topk(1, dim=1)``. That index tensor stays on the model's
device, and the rest of the loop reads it one element at a time from Python:
``self.punc_list[punctuations[i]]`` up to three times per token in the search for the carried tail
and up to four times per token while building the text, each an ``__index__`` (a ``.item()``);
then ``punctuations.cpu()`` and a ``torch.cat`` into ``punc_array``. After ``inference`` returns,
FunASR's sentence building (``timestamp_sentence`` in funasr/utils/timestamp_tools.py, called from
``AutoModel.inference_with_vad``) iterates ``punc_array`` with ``int(punc_id)`` per token. On a GPU
each of those reads is a host sync: about five per token (3.9 in the loop, measured, and one building
sentences), some 22,000 for the 4,495 tokens of a 10-minute job (docs/benchmarks.md#punctuation).

Here, for the duration of one ``inference`` call, ``punc_forward`` hands FunASR a host one-hot of
the device's decision instead of the device logits: FunASR's own ``topk(1)`` runs on the device
(the same op, so the same choice among equal logits), the indices come to the host in one transfer,
and a one-hot row (a single 1 among 0s) makes FunASR's ``topk(1)`` on the host pick that same index.
Every later line of FunASR's loop then runs unchanged on host tensors holding the same values: the
same text and the same ``punc_array`` values (a CPU tensor, where FunASR's is on the model's device;
FunASR's assembly reads it only through ``int()`` and ``len()``). The wrap runs on the CPU as well
(where it changes nothing but costs one small topk per mini-sentence), so CI exercises the code the
GPU runs. ``tests/test_fast_punc.py`` checks text and ``punc_array`` against FunASR's own on long
mixed texts, and tests/test_parity.py whole transcripts.

Then the sentence building: ``timestamp_sentence`` and ``timestamp_sentence_en`` iterate ``punc_array``
(``Tensor.__iter__``, one 0-d tensor per token) and ``int()`` each element: a sync per token on a GPU
(FunASR's own array lives there), ~1 us per token on the host. Their names in
``funasr.auto.auto_model`` are wrapped to hand them ``punc_array.tolist()`` instead (one transfer):
``int()`` of a Python int is the same number, ``len`` the same length, so the same sentences. And the
speaker assignment: ``distribute_spk`` (funasr/models/campplus/utils.py) compares every sentence with
every speaker turn (2,650 sentences x 60 turns for the tiny models' 10-minute tile: 60 ms on the 2-core
CPU). The turns come sorted (FunASR's ``postprocess`` output is chronological), so
`overlapping_turns_only` (a short replacement: restricting the turns means running the loop itself)
visits, for each sentence, only the turns that can overlap it (found by bisection), in FunASR's order
and with FunASR's loop body, copied: a turn
ending at or before the sentence's start, or starting at or after its end, has an overlap <= 0 and
changes nothing in FunASR's loop. Unsorted turns run FunASR's own function. These wraps are
process-wide (module names in ``funasr.auto.auto_model``), like `fast_cif`; `funasr_own` restores
FunASR's functions for a comparison.

Only ``CTTransformer`` on FunASR 1.4.16 is wrapped (the lines above were read from that version);
other punctuation models and versions run FunASR's own code. ``funasr.fast_punc: false`` turns it off.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import importlib
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from loguru import logger

NAME = "fast_punc"
VERIFIED_FUNASR = ("1.4.16",)
MODEL_CLASSES = ("CTTransformer",)  # not CTTransformerStreaming (VadRealtimeTransformer): another loop
ASSEMBLY_MODULE = "funasr.auto.auto_model"  # imports these by name (timestamp_tools, campplus.utils)
SENTENCE_FUNCTIONS = ("timestamp_sentence", "timestamp_sentence_en")
_ORIGINAL_ASSEMBLY: dict[str, Callable[..., Any]] = {}
_WRAPPED = "fast_punc_wrapped"


def host_decision(forward: Callable[..., tuple[torch.Tensor, Any]]) -> Callable[..., tuple[torch.Tensor, Any]]:
    """`forward` (a ``punc_forward``) whose logits are replaced by a host one-hot of their device argmax."""

    def punc_forward(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        y, rest = forward(*args, **kwargs)
        flat = y.view(-1, y.shape[-1])
        _, indices = flat.topk(1, dim=1)  # FunASR's op, on the model's device
        one_hot = torch.zeros(flat.shape, dtype=torch.float32).scatter_(1, indices.cpu(), 1.0)  # one transfer
        return one_hot.view(y.shape), rest

    return punc_forward


class HostDecisionInference:
    """Replaces one CTTransformer instance's ``inference``; ``enabled`` is read at each call."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.original: Callable[..., Any] = model.inference
        self.enabled = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return self.original(*args, **kwargs)
        model = self.model
        shadowed = model.__dict__.get("punc_forward")  # an instance-level wrapper someone else set, if any
        model.punc_forward = host_decision(model.punc_forward)
        try:
            return self.original(*args, **kwargs)
        finally:
            if shadowed is None:
                del model.punc_forward  # the class's own method again
            else:
                model.punc_forward = shadowed


def marks_as_list(original: Callable[..., Any]) -> Callable[..., Any]:
    """FunASR's sentence builder, handed its first argument (punc_array) as a list of ints."""

    @functools.wraps(original)
    def sentences(punc_id_list: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.is_tensor(punc_id_list) and punc_id_list.dim() == 1 and not punc_id_list.is_floating_point():
            punc_id_list = punc_id_list.tolist()  # one transfer; FunASR int()s each element
        return original(punc_id_list, *args, **kwargs)

    return sentences


def ascending(values: list[float]) -> bool:
    return all(a <= b for a, b in itertools.pairwise(values))  # False with a NaN


def overlapping_turns_only(original: Callable[..., Any]) -> Callable[..., Any]:
    """FunASR's ``distribute_spk``, each sentence compared only with the speaker turns that can overlap it."""

    @functools.wraps(original)
    def distribute_spk(sentence_list: list[dict[str, Any]], sd_time_list: list) -> list[dict[str, Any]]:
        turns = [(spk_st * 1000, spk_ed * 1000, spk) for spk_st, spk_ed, spk in sd_time_list]  # FunASR's line
        starts, ends = [t[0] for t in turns], [t[1] for t in turns]
        if not (ascending(starts) and ascending(ends)):
            return original(sentence_list, sd_time_list)  # unsorted (or NaN): FunASR's full scan
        for d in sentence_list:
            sentence_start, sentence_end = d["start"], d["end"]
            if sentence_start <= sentence_end:
                near = turns[bisect.bisect_right(ends, sentence_start):bisect.bisect_left(starts, sentence_end)]
            else:
                near = turns
            sentence_spk = 0
            max_overlap = 0
            for spk_st, spk_ed, spk in near:  # FunASR's loop body, unchanged
                overlap = max(min(sentence_end, spk_ed) - max(sentence_start, spk_st), 0)
                if overlap > max_overlap:
                    max_overlap = overlap
                    sentence_spk = spk
                if overlap > 0 and sentence_spk == spk:
                    max_overlap += overlap
            d["spk"] = int(sentence_spk)
        return sentence_list

    return distribute_spk


ASSEMBLY_WRAPS: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    **dict.fromkeys(SENTENCE_FUNCTIONS, marks_as_list), "distribute_spk": overlapping_turns_only}


def install_assembly() -> None:
    module = importlib.import_module(ASSEMBLY_MODULE)
    for name, wrap in ASSEMBLY_WRAPS.items():
        current = getattr(module, name, None)
        if current is not None and not getattr(current, _WRAPPED, False):
            _ORIGINAL_ASSEMBLY[name] = current
            wrapped = wrap(current)
            setattr(wrapped, _WRAPPED, True)
            setattr(module, name, wrapped)


def uninstall_assembly() -> None:
    module = importlib.import_module(ASSEMBLY_MODULE)
    for name, original in _ORIGINAL_ASSEMBLY.items():
        setattr(module, name, original)


@contextlib.contextmanager
def funasr_own(wrapper: HostDecisionInference | None) -> Iterator[None]:
    """FunASR's own punctuation loop, sentence building and speaker assignment for the duration."""
    module = importlib.import_module(ASSEMBLY_MODULE)
    installed = any(getattr(getattr(module, n, None), _WRAPPED, False) for n in ASSEMBLY_WRAPS)
    if wrapper is not None:
        wrapper.enabled = False
    uninstall_assembly()
    try:
        yield
    finally:
        if wrapper is not None:
            wrapper.enabled = True
        if installed:
            install_assembly()


def supported(funasr_version: str) -> bool:
    return funasr_version.split("+")[0] in VERIFIED_FUNASR


def install(punc_model: Any, funasr_version: str) -> HostDecisionInference | None:
    """Wrap this punctuation model's ``inference`` (idempotent); None where FunASR's own code runs."""
    if punc_model is None:
        return None
    if type(punc_model).__name__ not in MODEL_CLASSES or not supported(funasr_version):
        logger.info("fast punctuation not verified for {} on funasr {}: FunASR's own loop runs",
                    type(punc_model).__name__, funasr_version)
        return None
    install_assembly()
    current = punc_model.__dict__.get("inference")
    if isinstance(current, HostDecisionInference):
        return current
    wrapper = HostDecisionInference(punc_model)
    punc_model.inference = wrapper  # instance attribute: found before the class's method
    return wrapper
