"""fast_punc: ct-punc's output equals FunASR's own loop, with one host transfer per mini-sentence.

The reference is FunASR's unpatched code in the same process: `fast_punc.funasr_own` switches the
wrapper off at call time (the original bound method runs, with no instance attribute left) and puts
FunASR's own sentence builders back in ``funasr.auto.auto_model`` for the duration.
`tests.support.host_syncs` marks the punctuation logits as if they lived on a GPU and counts every
read of them (or of anything computed from them) into Python: the syncs CUDA would pay.
"""

from __future__ import annotations

import contextlib
import random
from importlib.metadata import version

import numpy as np
import pytest
import torch
from funasr import AutoModel

from tests.conftest import model_config, shared_audio
from tests.support.host_syncs import counting, punc_logits_on_device
from transcribe.core.engine import fast_punc

SPLIT_SIZE = 20  # FunASR's default mini-sentence length (tokens)


@pytest.fixture(scope="module")
def punc(tiny_models):
    am = AutoModel(model=str(tiny_models["punc"]), device="cpu", ncpu=1, disable_update=True, disable_pbar=True,
                   log_level="ERROR")
    wrapper = fast_punc.install(am.model, version("funasr"))
    assert wrapper is not None
    return am, wrapper


def mixed_text(seed: int, words: int) -> str:
    """Chinese characters (in and out of the model's vocabulary), English words, digits, odd spacing."""
    rng = random.Random(seed)
    english = ["hello", "World", "GPU", "okay", "it's", "FunASR", "api", "Zoom", "x", "COVID"]
    parts = []
    for _ in range(words):
        kind = rng.random()
        if kind < 0.7:
            parts.append("".join(chr(rng.choice([0x4E00 + rng.randrange(600), 0x9000 + rng.randrange(500)]))
                                 for _ in range(rng.randint(1, 6))))
        elif kind < 0.9:
            parts.append(rng.choice(english))
        else:
            parts.append(str(rng.randrange(10 ** rng.randint(1, 6))))
    text = ""
    for part in parts:  # Chinese runs joined as ASR output is; spaces around Latin words and digits
        text += part if part[0] >= "\u4e00" and text and text[-1] >= "\u4e00" else " " + part
    return text.strip()


def run(am, wrapper, text: str, enabled: bool, **kwargs):
    reference = contextlib.nullcontext() if enabled else fast_punc.funasr_own(wrapper)
    with reference, punc_logits_on_device(type(am.model)), counting() as syncs:
        [out] = am.generate(input=text, **kwargs)
    assert "punc_forward" not in am.model.__dict__  # nothing left behind on the model
    return out, syncs.total


def assert_same(ref: dict, got: dict) -> None:
    assert got["text"] == ref["text"]
    if ref["punc_array"] is None:
        assert got["punc_array"] is None
    else:
        assert got["punc_array"].dtype == ref["punc_array"].dtype
        assert got["punc_array"].tolist() == ref["punc_array"].tolist()


@pytest.fixture(params=["as_built", "no_sentence_end", "tied_logits", "sentence_end_heavy"])
def decoder_variant(request, punc):
    """Bias the tiny model's output layer so that every branch of FunASR's loop is taken.

    no_sentence_end: never 。/？, so the carried tail grows past 200 tokens and is cut at a comma;
    tied_logits: every row has exactly equal logits for "，", "。" and "？" (topk's tie rule decides);
    sentence_end_heavy: short sentences, carries of a token or two.
    """
    decoder = punc[0].model.decoder
    saved = decoder.weight.detach().clone(), decoder.bias.detach().clone()
    with torch.no_grad():
        if request.param == "no_sentence_end":
            decoder.bias[3] = decoder.bias[4] = -30.0
            decoder.bias[2] += 1.5
        elif request.param == "tied_logits":
            decoder.weight.zero_()
            decoder.bias.copy_(torch.tensor([-30.0, -1.0, 0.5, 0.5, 0.5, -1.0]))
        elif request.param == "sentence_end_heavy":
            decoder.bias[3] += 3.0
    yield request.param
    with torch.no_grad():
        decoder.weight.copy_(saved[0])
        decoder.bias.copy_(saved[1])


@pytest.mark.parametrize("seed, words", [(1, 1500), (2, 400)])
def test_long_mixed_text_equals_funasr(punc, decoder_variant, seed, words):
    am, wrapper = punc
    text = mixed_text(seed, words)
    assert len(text) > 1000
    ref, ref_syncs = run(am, wrapper, text, enabled=False)
    got, got_syncs = run(am, wrapper, text, enabled=True)
    assert_same(ref, got)
    marks = ref["punc_array"].tolist()
    assert len(marks) > 1000
    if decoder_variant == "no_sentence_end":
        assert 4 not in marks and marks.count(3) > 1  # the 200-token cut at a comma ran (and the final period)
    if decoder_variant == "tied_logits":
        assert set(marks) == {2, 3}  # topk picks one tied mark (the comma here); periods at FunASR's 200-token cuts
    # One transfer per mini-sentence (FunASR cuts ceil(tokens / split_size) of them), where FunASR reads
    # the device tensor several times per token.
    assert got_syncs == -(-len(marks) // SPLIT_SIZE)
    assert ref_syncs > 2 * len(marks)


@pytest.mark.parametrize("text", ["", "好", "hello", "今天 hello world 123", "a b c d e f g h i j k l m n o p q r s t u v",
                                  "天" * 21, "这个 GPU 很快" * 9])
@pytest.mark.parametrize("split_size", [2, 5, SPLIT_SIZE])
def test_short_and_edge_texts_equal_funasr(punc, text, split_size):
    am, wrapper = punc
    ref, _ = run(am, wrapper, text, enabled=False, split_size=split_size)
    got, _ = run(am, wrapper, text, enabled=True, split_size=split_size)
    assert_same(ref, got)


@pytest.mark.parametrize("builder", fast_punc.SENTENCE_FUNCTIONS)
@pytest.mark.parametrize("seed, tokens, words", [(3, 3000, 3000), (4, 500, 480), (5, 40, 45), (6, 0, 0), (7, 1, 1)])
def test_sentence_builders_equal_funasr_with_one_read(punc, builder, seed, tokens, words):
    """FunASR's timestamp_sentence(_en) on a list of the marks equals it on the tensor, lengths
    mismatched or not (zip_longest), with one read of the (device) tensor instead of one per token."""
    from funasr.utils import timestamp_tools

    from tests.support.host_syncs import mark

    original = getattr(timestamp_tools, builder)
    wrapped = fast_punc.marks_as_list(original)
    rng = random.Random(seed)
    marks = torch.tensor([rng.choice([1, 1, 1, 2, 3, 4, 5]) for _ in range(tokens)], dtype=torch.int64)
    stamps = [[i * 60, i * 60 + rng.randint(10, 59)] for i in range(tokens)]
    text = " ".join(rng.choice(["好", "天", "GPU", "hello", "42", "气"]) for _ in range(words))
    for raw in (False, True):
        with counting() as ref_reads:
            expected = original(mark(marks), stamps, text, return_raw_text=raw)
        with counting() as reads:
            got = wrapped(mark(marks), stamps, text, return_raw_text=raw)
        assert got == expected
        assert reads.total <= 1 and ref_reads.total >= (tokens if words else 0)
    assert wrapped(None, stamps, text) == original(None, stamps, text)


def speaker_turns(rng: random.Random, n: int, ordered: bool) -> list:
    """Turns in seconds as FunASR's ``postprocess`` returns them: chronological, touching or apart."""
    turns, t = [], 0.0
    for _ in range(n):
        start = t + rng.choice([0.0, 0.0, rng.uniform(0.0, 2.0)])
        t = start + rng.uniform(0.01, 6.0)
        turns.append([round(start, rng.choice([2, 3, 6])), round(t, 3), rng.randrange(4)])
    if not ordered:
        rng.shuffle(turns)
    return turns


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ordered", [True, False])
def test_speaker_assignment_equals_funasr(seed, ordered):
    """`overlapping_turns_only` assigns each sentence the speaker FunASR's full scan assigns: sentences
    inside a turn, across turns, on boundaries, zero-length, before and after all turns, inverted."""
    import copy

    from funasr.models.campplus.utils import distribute_spk

    rng = random.Random(seed)
    turns = speaker_turns(rng, rng.choice([0, 1, 40, 300]), ordered)
    end_ms = int((turns[-1][1] if turns and ordered else 2000) * 1000) + 3000
    sentences = []
    for _ in range(500):
        start = rng.choice([rng.randrange(-1000, end_ms), int(rng.choice(turns)[0] * 1000) if turns else 0])
        length = rng.choice([0, rng.randrange(1, 400), rng.randrange(400, 20000), -rng.randrange(1, 500)])
        sentences.append({"start": start, "end": start + length, "text": "x"})
    expected = distribute_spk(copy.deepcopy(sentences), turns)
    fallbacks = []
    fast = fast_punc.overlapping_turns_only(lambda *a: fallbacks.append(1) or distribute_spk(*a))
    got = fast(copy.deepcopy(sentences), turns)
    assert got == expected
    assert bool(fallbacks) == (not ordered and len(turns) > 1)  # unsorted turns: FunASR's own full scan
    assert len({s["spk"] for s in expected}) > (1 if len(turns) > 1 else 0)


def test_installs_only_on_ct_transformer_and_the_verified_version(punc):
    am, wrapper = punc
    assert fast_punc.install(am.model, version("funasr")) is wrapper  # idempotent
    assert fast_punc.install(am.model, "1.4.15") is None  # unverified version: nothing (more) installed
    assert fast_punc.install(None, version("funasr")) is None
    assert fast_punc.install(torch.nn.Linear(1, 1), version("funasr")) is None
    assert not fast_punc.supported("1.4.15") and not fast_punc.supported("1.5.0") and fast_punc.supported("1.4.16")


def test_transcriber_uses_it_and_keeps_the_transcript(transcriber):
    """The Transcriber's ct-punc runs the fast path (one transfer per mini-sentence) with the same result
    as with FunASR's own loop (tests/test_parity.py compares it with bare FunASR, too)."""
    assert "fast_punc" in transcriber.patches and transcriber.fast_punc.enabled
    path = shared_audio("podcast_2speakers_60s.wav")
    results, syncs = {}, {}
    for enabled in (False, True):
        np.random.seed(0)  # FunASR's k-means (sklearn, random_state=None) draws from numpy's global RNG
        reference = contextlib.nullcontext() if enabled else fast_punc.funasr_own(transcriber.fast_punc)
        with reference, punc_logits_on_device(type(transcriber.model.punc_model)), counting() as counted:
            result = transcriber.transcribe(path, speakers=2)
        results[enabled] = [(s.start, s.end, s.text, s.speaker) for s in result.segments]
        syncs[enabled] = counted.total
    assert results[True] == results[False] and len(results[True]) > 3
    chars = sum(len(s[2]) for s in results[True])
    # One transfer per mini-sentence and one for the sentence building, where FunASR reads each token's
    # mark from the device several times in the punctuation loop and once more building sentences.
    assert syncs[True] <= chars / SPLIT_SIZE * 2 + 2 < chars < syncs[False]


def test_config_key_turns_it_off(tiny_models, tmp_path):
    from transcribe.config import config_from_dict
    from transcribe.core.engine.funasr_transcriber import Transcriber

    t = Transcriber(config_from_dict(model_config(tiny_models, fast_punc=False), tmp_path))
    assert t.fast_punc is None and "fast_punc" not in t.patches
    assert "inference" not in t.model.punc_model.__dict__
