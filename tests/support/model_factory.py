"""Build small FunASR model directories with FunASR's own classes: random weights, real code path.

`AutoModel(model=<dir>/asr, vad_model=<dir>/vad, punc_model=<dir>/punc, spk_model=<dir>/spk)` then
runs exactly the code a user's real models run, with no hub. Adapted from
../shared/reference/make_tiny_models.py. Deterministic tweaks so random models give non-empty,
reproducible output:
- ASR: the output bias of <blank>/<s>/</s>/<unk> is -30, so text is never empty.
- VAD (only if the real ../shared/models/fsmn-vad is absent): an energy VAD (zeroed output layer).
- PUNC: never "<unk>"; "_" (no mark) favoured.
- SPK: plain seeded random init; random CAM++ embeddings are alike, so pass speakers=N to split.

`--size large` gives the real paraformer-zh architecture (SeACo Paraformer, 247 M params) and
real-size CAM++ for benchmarks.

    python tests/support/model_factory.py --out DIR [--size large] [--asr-class SeacoParaformer]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

SPECIALS = ["<blank>", "<s>", "</s>"]
TEST_TEXT = "今天天气很好我们去公园散步吧这个项目的目标是把会议录音转成文字我觉得这个方案可以试一试好的那我们明天再讨论细节"
SHARED = Path(os.environ.get("TRANSCRIBE_SHARED", Path(__file__).resolve().parents[3] / "shared"))
REAL_VAD = SHARED / "models" / "fsmn-vad"
BUILDER_VERSION = "1"  # bump when a model recipe changes: the fixture cache key includes it


def _vocab(n: int) -> list[str]:
    chars: list[str] = []
    for c in TEST_TEXT:
        if c not in chars:
            chars.append(c)
    cp = 0x4E00
    while len(chars) < n:
        if chr(cp) not in chars:
            chars.append(chr(cp))
        cp += 1
    return SPECIALS + chars[:n] + ["<unk>"]


def _write_mvn(path: Path, dim: int) -> None:
    zeros, ones = " ".join(["0"] * dim), " ".join(["1"] * dim)
    path.write_text(f"<Nnet>\n<Splice> {dim} {dim}\n[ 0 ]\n<AddShift> {dim} {dim}\n<LearnRateCoef> 0 [ {zeros} ]\n"
                    f"<Rescale> {dim} {dim}\n<LearnRateCoef> 0 [ {ones} ]\n</Nnet>\n")


def _build_and_save(d: Path, cfg: dict, task: str, metas: dict, seed: int, tweak=None) -> None:
    import torch
    import yaml
    from funasr.auto.auto_model import AutoModel

    kw = json.loads(json.dumps(cfg))
    kw.setdefault("model_conf", {})
    if (d / "tokens.json").exists():
        kw.setdefault("tokenizer_conf", {})["token_list"] = str(d / "tokens.json")
    if (d / "am.mvn").exists():
        kw.setdefault("frontend_conf", {})["cmvn_file"] = str(d / "am.mvn")
    kw.update(device="cpu", disable_update=True)
    torch.manual_seed(seed)
    model, _ = AutoModel.build_model(**kw)
    if tweak:
        with torch.no_grad():
            tweak(model)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False))
    torch.save(model.state_dict(), d / "model.pt")
    conf = {"framework": "pytorch", "task": task, "model": {"type": "funasr"},
            "pipeline": {"type": "funasr-pipeline"}, "file_path_metas": metas}
    (d / "configuration.json").write_text(json.dumps(conf, indent=2))


def _sanm(size: str, blocks_large: int, blocks_tiny: int, **extra) -> dict:
    large = size == "large"
    return dict(output_size=512 if large else 64, attention_heads=4, linear_units=2048 if large else 128,
                num_blocks=blocks_large if large else blocks_tiny, dropout_rate=0.1, positional_dropout_rate=0.1,
                attention_dropout_rate=0.1, input_layer="pe", pos_enc_class="SinusoidalPositionEncoder",
                normalize_before=True, kernel_size=11, sanm_shfit=0, selfattention_layer_type="sanm", **extra)


def make_asr(out: Path, size: str = "tiny", asr_class: str = "Paraformer", seed: int = 0) -> Path:
    d = out / "asr"
    d.mkdir(parents=True, exist_ok=True)
    large = size == "large"
    tokens = _vocab(8400 if large else 500)
    (d / "tokens.json").write_text(json.dumps(tokens, ensure_ascii=False))
    _write_mvn(d / "am.mvn", 80 * 7)
    d_model = 512 if large else 64
    dec = dict(attention_heads=4, linear_units=2048 if large else 128, num_blocks=16 if large else 1,
               att_layer_num=16 if large else 1, dropout_rate=0.1, positional_dropout_rate=0.1,
               self_attention_dropout_rate=0.1, src_attention_dropout_rate=0.1, kernel_size=11, sanm_shfit=0)
    cfg = {
        "model": asr_class,
        "model_conf": dict(ctc_weight=0.0, lsm_weight=0.1, length_normalized_loss=True, predictor_weight=1.0,
                           predictor_bias=1, sampling_ratio=0.75),
        "encoder": "SANMEncoder", "encoder_conf": _sanm(size, 50, 2),
        "decoder": "ParaformerSANMDecoder", "decoder_conf": dec,
        "predictor": "CifPredictorV2",
        "predictor_conf": dict(idim=d_model, threshold=1.0, l_order=1, r_order=1, tail_threshold=0.45),
        "frontend": "WavFrontend",
        "frontend_conf": dict(fs=16000, window="hamming", n_mels=80, frame_length=25, frame_shift=10,
                              lfr_m=7, lfr_n=6, dither=0.0),
        "tokenizer": "CharTokenizer", "tokenizer_conf": {"unk_symbol": "<unk>", "split_with_space": True},
        "ctc_conf": {"dropout_rate": 0.0, "ctc_type": "builtin", "reduce": True, "ignore_nan_grad": True},
        "normalize": None,
    }
    if asr_class == "SeacoParaformer":  # the real paraformer-zh class
        cfg["model_conf"].update(inner_dim=d_model, bias_encoder_type="lstm", bias_encoder_bid=False,
                                 seaco_lsm_weight=0.1, seaco_length_normal=True, train_decoder=True,
                                 NO_BIAS=len(tokens) - 1)
        cfg["seaco_decoder"] = "ParaformerSANMDecoder"
        cfg["seaco_decoder_conf"] = dict(attention_heads=4, linear_units=1024 if large else 128,
                                         num_blocks=4 if large else 1, dropout_rate=0.1, positional_dropout_rate=0.1,
                                         self_attention_dropout_rate=0.1, src_attention_dropout_rate=0.1,
                                         kernel_size=21, sanm_shfit=0, use_output_layer=False, wo_input_layer=True)
        cfg["predictor"] = "CifPredictorV3"
        cfg["predictor_conf"] = dict(idim=d_model, threshold=1.0, l_order=1, r_order=1, tail_threshold=0.45,
                                     smooth_factor2=0.25, noise_threshold2=0.01, upsample_times=3,
                                     use_cif1_cnn=False, upsample_type="cnn_blstm")

    def tweak(model):
        for i in (0, 1, 2, len(tokens) - 1):  # never emit blank/sos/eos/unk
            model.decoder.output_layer.bias[i] = -30.0

    _build_and_save(d, cfg, "auto-speech-recognition",
                    {"init_param": "model.pt", "config": "config.yaml",
                     "tokenizer_conf": {"token_list": "tokens.json"}, "frontend_conf": {"cmvn_file": "am.mvn"}},
                    seed, tweak)
    return d


def make_vad(out: Path, seed: int = 0) -> Path:
    """The real fsmn-vad when ../shared has it (copied: FunASR writes nothing, but tests may); else an energy VAD."""
    d = out / "vad"
    if REAL_VAD.is_dir():
        shutil.copytree(REAL_VAD, d, dirs_exist_ok=True)
        for f in d.iterdir():
            f.chmod(0o644)
        return d
    d.mkdir(parents=True, exist_ok=True)
    _write_mvn(d / "am.mvn", 80 * 5)
    cfg = {
        "frontend": "WavFrontendOnline",
        "frontend_conf": dict(fs=16000, window="hamming", n_mels=80, frame_length=25, frame_shift=10, dither=0.0,
                              lfr_m=5, lfr_n=1),
        "model": "FsmnVADStreaming",
        "model_conf": dict(sample_rate=16000, detect_mode=1, snr_mode=0, max_end_silence_time=300,
                           max_start_silence_time=3000, do_start_point_detection=True, do_end_point_detection=True,
                           window_size_ms=200, sil_to_speech_time_thres=150, speech_to_sil_time_thres=150,
                           speech_2_noise_ratio=1.0, do_extend=1, lookback_time_start_point=200,
                           lookahead_time_end_point=100, max_single_segment_time=60000, snr_thres=-100.0,
                           noise_frame_num_used_for_snr=100, decibel_thres=-40.0, speech_noise_thres=0.6,
                           fe_prior_thres=0.0001, silence_pdf_num=1, sil_pdf_ids=[0], speech_noise_thresh_low=-0.1,
                           speech_noise_thresh_high=0.3, output_frame_probs=False, frame_in_ms=10,
                           frame_length_ms=25),
        "dynamic_silence": False,
        "encoder": "FSMN",
        "encoder_conf": dict(input_dim=400, input_affine_dim=140, fsmn_layers=4, linear_dim=250, proj_dim=128,
                             lorder=20, rorder=0, lstride=1, rstride=0, output_affine_dim=140, output_dim=248),
    }

    def tweak(model):
        model.encoder.out_linear2.linear.weight.zero_()
        model.encoder.out_linear2.linear.bias.zero_()

    _build_and_save(d, cfg, "voice-activity-detection",
                    {"init_param": "model.pt", "config": "config.yaml", "frontend_conf": {"cmvn_file": "am.mvn"}},
                    seed, tweak)
    return d


def make_punc(out: Path, size: str = "tiny", seed: int = 0) -> Path:
    d = out / "punc"
    d.mkdir(parents=True, exist_ok=True)
    large = size == "large"
    tokens = _vocab(8400 if large else 500)
    (d / "tokens.json").write_text(json.dumps(tokens, ensure_ascii=False))
    unit = 516 if large else 64
    enc = _sanm(size, 12, 1, input_size=unit, padding_idx=0)
    enc.update(output_size=unit, attention_heads=12 if large else 4)
    cfg = {
        "model": "CTTransformer",
        "model_conf": dict(ignore_id=0, embed_unit=unit, att_unit=unit, dropout_rate=0.1,
                           punc_list=["<unk>", "_", "，", "。", "？", "、"], punc_weight=[1.0] * 6, sentence_end_id=3),
        "encoder": "SANMEncoder", "encoder_conf": enc,
        "tokenizer": "CharTokenizer", "tokenizer_conf": {"unk_symbol": "<unk>"},
    }

    def tweak(model):
        model.decoder.bias[0] = -30.0  # never "<unk>" punctuation
        model.decoder.bias[1] += 1.0  # favour "_" (no mark): longer sentences

    _build_and_save(d, cfg, "punctuation",
                    {"init_param": "model.pt", "config": "config.yaml",
                     "tokenizer_conf": {"token_list": "tokens.json"}}, seed, tweak)
    return d


def make_spk(out: Path, size: str = "tiny", seed: int = 0) -> Path:
    d = out / "spk"
    d.mkdir(parents=True, exist_ok=True)
    if size == "large":  # the real cam++ sizes (~7 M params)
        mc = dict(feat_dim=80, embedding_size=192, growth_rate=32, bn_size=4, init_channels=128)
    else:
        mc = dict(feat_dim=80, embedding_size=192, growth_rate=8, bn_size=2, init_channels=16)
    mc.update(config_str="batchnorm-relu", memory_efficient=True, output_level="segment")
    _build_and_save(d, {"model": "CAMPPlus", "model_conf": mc}, "speaker-verification",
                    {"init_param": "model.pt", "config": "config.yaml"}, seed)
    return d


def cache_key(size: str, asr_class: str) -> str:
    import funasr

    vad = "real" if REAL_VAD.is_dir() else "energy"
    src = Path(__file__).read_bytes()
    digest = hashlib.sha256(src + f"{size}{asr_class}{vad}{funasr.__version__}".encode()).hexdigest()[:12]
    return f"{size}-{asr_class}-{digest}"


def build_all(out: Path, size: str = "tiny", asr_class: str = "Paraformer", seed: int = 0,
              only: tuple[str, ...] = ("asr", "vad", "punc", "spk")) -> dict[str, Path]:
    """Build into `out` (complete or not at all: a temp dir renamed into place)."""
    out = Path(out)
    if (out / ".complete").exists():
        return {p: out / p for p in only}
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    makers = {"asr": lambda: make_asr(tmp, size, asr_class, seed), "vad": lambda: make_vad(tmp, seed),
              "punc": lambda: make_punc(tmp, size, seed), "spk": lambda: make_spk(tmp, size, seed)}
    for part in only:
        makers[part]()
    (tmp / ".complete").write_text(BUILDER_VERSION)
    try:
        os.replace(tmp, out)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return {p: out / p for p in only}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--size", choices=["tiny", "large"], default="tiny")
    ap.add_argument("--asr-class", choices=["Paraformer", "SeacoParaformer"], default="Paraformer")
    ap.add_argument("--only", default="asr,vad,punc,spk")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    dirs = build_all(a.out, a.size, a.asr_class, a.seed, tuple(a.only.split(",")))
    for name, d in dirs.items():
        print(f"{name}: {d}")


if __name__ == "__main__":
    main()
