"""`transcribe run`, `doctor`, `submit`/`retry` from the command line, and compressed audio input."""

import json
import subprocess
import sys

import pytest

from tests.conftest import model_config, shared_audio, write_config
from transcribe.config import config_from_dict
from transcribe.core import errors


def cli(*args, cwd=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "transcribe", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


@pytest.fixture
def config_file(tmp_path, tiny_models):
    data = model_config(tiny_models)
    data["pool"] = {"task_dir": str(tmp_path / "tasks")}
    data["logging"] = {"dir": str(tmp_path / "logs")}
    return write_config(tmp_path / "config.json", data)


def test_run_writes_every_format_and_reports_the_failed_file(config_file, tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"not a wav at all")
    a, b = shared_audio("tts_1speaker_5s.wav"), shared_audio("podcast_2speakers_60s.wav")
    out = cli("--config", config_file, "run", a, b, bad, "-o", tmp_path / "out", "--format", "json,txt,srt,vtt,tsv",
              "--speakers", "2", "--json")
    assert out.returncode == 1, out.stderr
    summary = json.loads(out.stdout)
    by_name = {r["file"].rsplit("/", 1)[-1]: r for r in summary["files"]}
    assert by_name["broken.wav"]["ok"] is False and by_name["broken.wav"]["reason"] == "audio_undecodable"
    for src in (a, b):
        assert by_name[src.name]["ok"]
        for fmt in ("json", "txt", "srt", "vtt", "tsv"):
            assert (tmp_path / "out" / f"{src.stem}.{fmt}").stat().st_size > 0
    result = json.loads((tmp_path / "out" / f"{b.stem}.json").read_text())
    assert result["speakers"] == ["Speaker1", "Speaker2"]
    assert "broken.wav" in out.stderr and "Traceback" not in out.stderr


def test_doctor_json_on_the_fixture_config(config_file):
    out = cli("--config", config_file, "doctor", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] and report["devices"]["available"][-1] == "cpu"
    assert report["selection"]["device"] == "cpu" and report["versions"]["funasr"] == "1.4.16"
    assert all(m["resolvable"] and m["source"] == "local" for m in report["models"].values())
    assert len(report["models"]) == 4


def test_doctor_flags_an_alias_that_cannot_be_fetched(tiny_models, tmp_path, monkeypatch):
    from transcribe.core.doctor import run_checks

    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "empty-cache"))
    cfg = config_from_dict({**model_config(tiny_models, model="paraformer-zh"),
                            "pool": {"task_dir": str(tmp_path / "t")}, "logging": {"dir": str(tmp_path / "l")}},
                           tmp_path)
    report = run_checks(cfg, reachable=lambda hub: False)
    assert not report["ok"] and report["models"]["model"]["resolvable"] is False
    assert any("paraformer-zh" in p and "transcribe models download" in p for p in report["problems"])


def test_bad_config_is_one_clear_line(tmp_path):
    cfg = write_config(tmp_path / "config.json", {"pool": {"workers": "many"}})
    out = cli("--config", cfg, "status")
    assert out.returncode == 2 and "pool.workers" in out.stderr and "Traceback" not in out.stderr


def test_submit_status_retry_without_a_server(config_file, tmp_path):
    src = shared_audio("tts_1speaker_5s.wav")
    out = cli("--config", config_file, "submit", src, "--speakers", "2")
    assert out.returncode == 0 and "queued" in out.stdout
    status = json.loads(cli("--config", config_file, "status", "--json").stdout)
    assert status["counts"]["inbox"] == 1 and status["server"]["alive"] is False
    assert cli("--config", config_file, "retry").returncode == 2  # nothing named: says how


@pytest.fixture(scope="module")
def ffmpeg():
    from transcribe.core.engine.audio import ffmpeg_path

    exe = ffmpeg_path()
    if exe is None:
        pytest.skip("no ffmpeg (pip install imageio-ffmpeg, or apt-get install ffmpeg)")
    return exe


def test_mp3_transcribes_through_ffmpeg(transcriber, ffmpeg, tmp_path):
    mp3 = tmp_path / "clip.mp3"
    subprocess.run([ffmpeg, "-v", "error", "-i", shared_audio("tts_1speaker_5s.wav"), "-b:a", "64k", mp3], check=True)
    r = transcriber.transcribe(mp3)
    assert r.segments and r.duration == pytest.approx(6.4, abs=0.1)


def test_without_ffmpeg_the_error_names_it(transcriber, ffmpeg, tmp_path, monkeypatch):
    mp3 = tmp_path / "clip.mp3"
    subprocess.run([ffmpeg, "-v", "error", "-i", shared_audio("tts_1speaker_5s.wav"), mp3], check=True)
    monkeypatch.setattr("transcribe.core.engine.audio.ffmpeg_path", lambda: None)
    with pytest.raises(errors.FFmpegMissingError, match="needs ffmpeg"):
        transcriber.transcribe(mp3)


def test_undecodable_mp3_is_a_typed_error(transcriber, ffmpeg, tmp_path):
    fake = tmp_path / "notes.mp3"
    fake.write_text("meeting notes\n" * 50)
    with pytest.raises(errors.AudioDecodeError, match="could not be decoded by ffmpeg"):
        transcriber.transcribe(fake)
