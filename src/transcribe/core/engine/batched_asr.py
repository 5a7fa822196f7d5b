"""One batched forward of FunASR's Paraformer / SeACo Paraformer, with per-utterance Python off the device.

FunASR's ``Paraformer.inference`` and ``SeacoParaformer.inference`` run the encoder, the CIF
predictor, the decoder and (SeACo) the BiCif timestamp predictor on a padded batch, then loop over
the utterances in Python: ``argmax`` and ``.tolist()`` per utterance, the timestamp scan on device
tensors (one host sync per ``torch.where`` and per ``.item()``), token decoding. On a GPU that loop
is a few host syncs and a dozen tiny kernels per utterance. `decode_asr_batch` then `finish_asr_batch`
call the same model modules in the same order on the same batch, then move the few per-utterance
tensors they need to the host in one transfer each and runs FunASR's own per-utterance functions
(``ts_prediction_lfr6_standard``, ``sentence_postprocess``, the tokenizer) on host copies. The
values are the same: ``argmax`` of a row and the threshold comparisons do not depend on where they
run; the one device reduction inside the timestamp function (``alphas.sum()``, taken only when the
number of fires disagrees with the tokens) is given the device tensor, exactly as FunASR does.

`asr_support` says whether a loaded model and options are covered; anything else runs FunASR's own
``model.inference`` (the caller logs that once).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_ASR_CLASSES = ("Paraformer", "SeacoParaformer")
FIRE_THRESHOLD = 1.0 - 1e-4  # FunASR's ts_prediction_lfr6_standard


@dataclass
class UtteranceAsr:
    """One utterance's ASR output as FunASR's ``inference`` returns it, and its predicted token count."""

    result: dict[str, Any]
    n_tokens: int


def asr_support(model: Any, kwargs: dict[str, Any]) -> str | None:
    """None if `decode_asr_batch` + `finish_asr_batch` reproduce ``model.inference`` for these options, else why not."""
    name = type(model).__name__
    if name not in SUPPORTED_ASR_CLASSES:
        return f"ASR model class {name}"
    if getattr(model, "beam_search", None) is not None:
        return "beam search"
    if kwargs.get("decoding_ctc_weight", 0.0) > 0.00001 and getattr(model, "ctc", None) is not None:
        return "CTC rescoring (decoding_ctc_weight)"
    if kwargs.get("lm_weight", 0.0) > 0.00001 and kwargs.get("lm_file") is not None:
        return "language model (lm_file)"
    if kwargs.get("output_dir") is not None:
        return "output_dir"
    if kwargs.get("fp16", False):
        return "fp16"
    if kwargs.get("data_type", "sound") != "sound":
        return f"data_type {kwargs.get('data_type')}"
    tokenizer = kwargs.get("tokenizer")
    if tokenizer is None:
        return "no tokenizer"
    if name == "Paraformer" and hasattr(tokenizer, "bpemodel"):
        return "BPE tokenizer"
    return None


def empty_batch_output(model: Any) -> list[dict[str, Any]]:
    """What ``AutoModel.inference`` returns for a batch whose every utterance predicts no token.

    SeACo returns ``([],)`` (no result at all: FunASR then drops the job's text); Paraformer returns
    ``[]``, which ``AutoModel.inference`` turns into one ``{"text": ""}``. Kept as FunASR does it.
    """
    return [] if type(model).__name__ == "SeacoParaformer" else [{"text": ""}]


@dataclass
class DecodedBatch:
    """A batch through the encoder, CIF predictor and decoder; the timestamps and text are still to do."""

    model: Any
    seaco: bool
    keys: list[str]
    kwargs: dict[str, Any]
    n_tokens: list[int]
    enc_lens: list[int]
    with_timestamps: bool
    token_ids: torch.Tensor | None  # host (batch, tokens); None when no utterance has a token
    encoder_out: torch.Tensor | None = None  # SeACo: the BiCif timestamp predictor's inputs
    encoder_out_lens: torch.Tensor | None = None
    pre_token_length: torch.Tensor | None = None
    ts_alphas: torch.Tensor | None = None  # Paraformer: the predictor's own (alphas, peaks)
    ts_peaks: torch.Tensor | None = None

    def device_tensors(self) -> list[torch.Tensor]:
        """The tensors `finish_asr_batch` reads on the device (for a caller running it on another stream)."""
        return [t for t in (self.encoder_out, self.encoder_out_lens, self.pre_token_length, self.ts_alphas,
                            self.ts_peaks) if t is not None]


@torch.no_grad()
def decode_asr_batch(model: Any, speech: Sequence[Any], kwargs: dict[str, Any]) -> DecodedBatch:
    """FunASR's encoder, CIF predictor and decoder on the batch, in ``inference``'s order; token ids to the host.

    SeACo's BiCif timestamp predictor (``calc_predictor_timestamp``, a bidirectional LSTM stepping frame by
    frame) reads only the encoder's output and the token counts, not the decoder's: `finish_asr_batch`
    runs it, so a caller may run it on another CUDA stream while the next batch decodes."""
    from funasr.utils.load_utils import extract_fbank, load_audio_text_image_video

    seaco = type(model).__name__ == "SeacoParaformer"
    frontend, tokenizer, device = kwargs["frontend"], kwargs["tokenizer"], kwargs["device"]
    keys = [f"utt{i}" for i in range(len(speech))]
    samples = load_audio_text_image_video(list(speech), fs=frontend.fs, audio_fs=kwargs.get("fs", 16000),
                                          data_type=kwargs.get("data_type", "sound"), tokenizer=tokenizer)
    feats, feat_lens = extract_fbank(samples, data_type=kwargs.get("data_type", "sound"), frontend=frontend)
    feats, feat_lens = feats.to(device=device), feat_lens.to(device=device)
    if seaco:
        model.hotword_list = model.generate_hotwords_list(kwargs.get("hotword"), tokenizer=tokenizer,
                                                          frontend=frontend)
    encoder_out, encoder_out_lens = model.encode(feats, feat_lens)
    if isinstance(encoder_out, tuple):
        encoder_out = encoder_out[0]
    predictor_outs = model.calc_predictor(encoder_out, encoder_out_lens)
    pre_acoustic_embeds = predictor_outs[0]
    pre_token_length = predictor_outs[1].round().long()
    n_tokens = pre_token_length.tolist()
    enc_lens = encoder_out_lens.tolist()
    with_timestamps = (model.predictor_name == "CifPredictorV3" if seaco
                       else bool(kwargs.get("pred_timestamp", kwargs.get("output_timestamp", False))))
    batch = DecodedBatch(model, seaco, keys, kwargs, n_tokens, enc_lens, with_timestamps, None)
    if max(n_tokens) < 1:  # FunASR returns before the decoder; each utterance is empty
        return batch
    if seaco:
        decoder_out = model._seaco_decode_with_ASF(encoder_out, encoder_out_lens, pre_acoustic_embeds,
                                                   pre_token_length, hw_list=model.hotword_list)
        if with_timestamps:
            batch.encoder_out, batch.encoder_out_lens = encoder_out, encoder_out_lens
            batch.pre_token_length = pre_token_length
    else:
        decoder_out = model.cal_decoder_with_predictor(encoder_out, encoder_out_lens, pre_acoustic_embeds,
                                                       pre_token_length)[0]
        if with_timestamps:
            batch.ts_alphas, batch.ts_peaks = predictor_outs[3], predictor_outs[2]  # (pre_peak_index, alphas)
    batch.token_ids = decoder_out.argmax(dim=-1).cpu()  # one transfer for the whole batch
    return batch


@torch.no_grad()
def finish_asr_batch(batch: DecodedBatch) -> list[UtteranceAsr]:
    """The timestamp predictor (SeACo) and FunASR's per-utterance text and timestamps, on host copies."""
    from funasr.utils import postprocess_utils
    from funasr.utils.timestamp_tools import ts_prediction_lfr6_standard

    model, seaco, kwargs, n_tokens = batch.model, batch.seaco, batch.kwargs, batch.n_tokens
    if batch.token_ids is None:
        return [UtteranceAsr(_empty_result(key, batch.with_timestamps), 0) for key in batch.keys]
    ts_alphas, ts_peaks = batch.ts_alphas, batch.ts_peaks  # device tensors, in FunASR's argument order
    if batch.encoder_out is not None:
        _, _, ts_alphas, ts_peaks = model.calc_predictor_timestamp(batch.encoder_out, batch.encoder_out_lens,
                                                                   batch.pre_token_length)
    host_alphas = ts_alphas.cpu() if ts_alphas is not None else None
    host_peaks = ts_peaks.cpu() if ts_peaks is not None else None

    tokenizer = kwargs["tokenizer"]
    special = {model.eos, model.sos, model.blank_id}
    out = []
    for i, key in enumerate(batch.keys):
        token_int = [t for t in batch.token_ids[i, : n_tokens[i]].tolist() if t not in special]
        token = tokenizer.ids2tokens(token_int)
        if host_alphas is None:
            if seaco or not hasattr(tokenizer, "bpemodel"):
                text, _ = postprocess_utils.sentence_postprocess(token)
            else:
                text = tokenizer.tokens2text(token)
            out.append(UtteranceAsr({"key": key, "text": text}, n_tokens[i]))
            continue
        span = _timestamp_span(model, seaco, batch.enc_lens[i], host_alphas.shape[-1], host_peaks.shape[-1])
        a, p = host_alphas[i][:span], host_peaks[i][:span]
        chars = token[:-1] if token and token[-1] == "</s>" else token
        if chars and int((p >= FIRE_THRESHOLD).sum()) != len(chars) + 1:
            a, p = ts_alphas[i][:span], ts_peaks[i][:span]  # FunASR rescales on the device: same tensors
        _, timestamp = ts_prediction_lfr6_standard(a, p, copy.copy(token), vad_offset=kwargs.get("begin_time", 0),
                                                   upsample_rate=3 if seaco else 1)
        text, timestamp, _ = postprocess_utils.sentence_postprocess(token, timestamp)
        out.append(UtteranceAsr({"key": key, "text": text, "timestamp": timestamp}, n_tokens[i]))
    return out


def _timestamp_span(model: Any, seaco: bool, enc_len: int, alphas_len: int, peaks_len: int) -> int:
    """How many timestamp frames of an utterance FunASR reads (SeACo: 3x upsampled; Paraformer: tail mask)."""
    if seaco:
        return enc_len * 3
    predictor = getattr(model, "predictor", None)
    if getattr(predictor, "tail_mask", None) is True:
        span = enc_len + (1 if float(getattr(predictor, "tail_threshold", 0.0)) > 0.0 else 0)
        return min(span, alphas_len, peaks_len)
    return max(alphas_len, peaks_len)


def _empty_result(key: str, with_timestamps: bool) -> dict[str, Any]:
    """An utterance with no token, as FunASR's per-utterance loop would give it inside a larger batch."""
    from funasr.utils import postprocess_utils

    if not with_timestamps:
        return {"key": key, "text": postprocess_utils.sentence_postprocess([])[0]}
    text, timestamp, _ = postprocess_utils.sentence_postprocess([], [])
    return {"key": key, "text": text, "timestamp": timestamp}
