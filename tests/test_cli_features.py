"""The WhisperX/FunASR-style flags of `run` and `submit`: parsing, validation before work, plumbing."""

import json

import pytest

from tests.conftest import model_config, shared_audio, write_config
from tests.test_cli import cli
from transcribe.cli import build_parser

JOB_FLAGS = ("--min-speakers", "--max-speakers", "--no-diarize", "--batch-size", "--word-timestamps",
             "--max-line-width", "--max-line-count", "--no-cache")


@pytest.mark.parametrize("command", ["run", "submit"])
def test_help_shows_the_job_flags(command):
    text = build_parser()._subparsers._group_actions[0].choices[command].format_help()
    assert all(flag in text for flag in JOB_FLAGS) and "all" in text
    assert ("--model" in text and "--threads" in text) == (command == "run")  # the server's choice for submit


@pytest.mark.parametrize("flags, message", [
    (["--speakers", "2", "--min-speakers", "1"], "not both"),
    (["--min-speakers", "4", "--max-speakers", "2"], "--min-speakers (4) is more than --max-speakers (2)"),
    (["--no-diarize", "--max-speakers", "2"], "need diarization"),
    (["--max-line-width", "0"], "argument --max-line-width: 0 is out of range"),
    (["--batch-size", "0"], "argument --batch-size: 0 is out of range"),
    (["--min-speakers", "0"], "argument --min-speakers: 0 is not a speaker count"),
])
def test_bad_flag_combinations_are_usage_errors_before_any_model_load(tmp_path, flags, message):
    # The config names a model that does not exist: reaching a model load would report that instead.
    cfg = write_config(tmp_path / "c.json", {"funasr": {"model": str(tmp_path / "no-model"), "device": "cpu"},
                                             "logging": {"dir": str(tmp_path / "logs")}})
    out = cli("--config", cfg, "run", shared_audio("tts_1speaker_5s.wav"), "-o", tmp_path / "out", *flags)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_run_with_the_new_flags(tiny_models, tmp_path):
    data = model_config(tiny_models, model=str(tmp_path / "not-this-one"), ncpu=4)
    data["logging"] = {"dir": str(tmp_path / "logs")}
    cfg = write_config(tmp_path / "c.json", data)
    src = shared_audio("espeak_zh_en_30s.wav")
    out = cli("--config", cfg, "run", src, "-o", tmp_path / "out", "--model", tiny_models["asr"], "--threads", "1",
              "--format", "all", "--no-diarize", "--word-timestamps", "--max-line-width", "10",
              "--max-line-count", "1", "--batch-size", "60", "--json")
    assert out.returncode == 0, out.stderr
    written = sorted(p.suffix for p in (tmp_path / "out").iterdir())
    assert written == [".json", ".rttm", ".srt", ".tsv", ".txt", ".vtt"]
    result = json.loads((tmp_path / "out" / f"{src.stem}.json").read_text())
    assert result["speakers"] == [] and all("words" in s for s in result["segments"])
    assert result["models"]["asr"] == str(tiny_models["asr"])  # --model replaced funasr.model
    cues = (tmp_path / "out" / f"{src.stem}.srt").read_text().split("\n\n")
    assert len(cues) > len(result["segments"])  # one line of at most 10 characters per cue
    assert all(len(cue.strip().splitlines()) == 3 for cue in cues if cue.strip())


def test_submit_records_the_per_job_flags(tmp_path):
    cfg = write_config(tmp_path / "c.json", {"pool": {"task_dir": str(tmp_path / "tasks")},
                                             "logging": {"dir": str(tmp_path / "logs")}})
    out = cli("--config", cfg, "submit", shared_audio("tts_1speaker_5s.wav"), "--min-speakers", "2",
              "--max-speakers", "3", "--batch-size", "60", "--word-timestamps", "--no-cache", "--format", "all",
              "--max-line-width", "42")
    assert out.returncode == 0, out.stderr
    [job] = (tmp_path / "tasks" / "inbox").iterdir()
    options = json.loads((job / "job.json").read_text())["options"]
    assert options == {"min_speakers": 2, "max_speakers": 3, "batch_size_s": 60,
                       "word_timestamps": True, "max_line_width": 42, "cache": False, "priority": 0,
                       "formats": ["json", "txt", "srt", "vtt", "tsv", "rttm"]}


def test_run_takes_a_repeated_recording_from_the_cache(tiny_models, tmp_path):
    data = model_config(tiny_models)
    data["logging"] = {"dir": str(tmp_path / "logs")}
    data["cache"] = {"enabled": True, "dir": str(tmp_path / "cache")}
    cfg = write_config(tmp_path / "c.json", data)
    first = tmp_path / "first.wav"
    first.write_bytes(shared_audio("tts_1speaker_5s.wav").read_bytes())
    again = tmp_path / "again.wav"
    again.write_bytes(first.read_bytes())
    out = cli("--config", cfg, "run", first, again, "-o", tmp_path / "out", "--format", "json")
    assert out.returncode == 0, out.stderr
    a, b = (json.loads((tmp_path / "out" / f"{n}.json").read_text()) for n in ("first", "again"))
    assert (a["cached"], b["cached"], b["source"]) == (False, True, "again.wav")
    assert b["segments"] == a["segments"] and b["processing_time"] == a["processing_time"]
