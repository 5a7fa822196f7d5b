"""The HTTP layer in-process (no workers, no model): admission control, auth, upload safety, options
mapping and the task-directory staging it builds on. tests/test_http.py runs it end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from starlette.testclient import TestClient

from tests.conftest import shared_audio, write_config
from transcribe.core.pool.jobs import JobOptions
from transcribe.core.pool.task_dir import TaskDir
from transcribe.http.app import create_app
from transcribe.http.errors import ApiError
from transcribe.http.fields import parse_fields
from transcribe.http.upload import audio_name, sniff_container

KEY = "app-test-key-0123456789"
WAV_HEAD = b"RIFF\x24\x00\x00\x00WAVEfmt "


def wav_bytes() -> bytes:
    return shared_audio("tts_1speaker_5s.wav").read_bytes()


@pytest.fixture
def app_for(fixture_config):
    def make(**http):
        for key, value in http.items():
            setattr(fixture_config.http, key, value)
        client = TestClient(create_app(fixture_config), raise_server_exceptions=False)
        client.td = TaskDir.from_config(fixture_config)
        return client
    return make


def error(response) -> dict:
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()["error"]
    assert set(body) >= {"message", "type", "param", "code"} and "Traceback" not in response.text
    return body


# ---------------------------------------------------------------------------------------------- staging
def test_staging_renames_into_inbox_only_on_success(tmp_path):
    td = TaskDir(tmp_path / "tasks").ensure()
    with pytest.raises(RuntimeError), td.staging("a.wav") as staged:
        staged.audio.write_bytes(b"half")
        raise RuntimeError("upload broke")
    assert list(td.tmp.iterdir()) == [] and list(td.inbox.iterdir()) == []
    with td.staging("b.wav", JobOptions(speakers=2)) as staged:
        assert list(td.inbox.iterdir()) == []  # invisible to servers until the rename
        staged.audio.write_bytes(b"audio")
        staged.options = JobOptions(speakers=3)
    job_dir = td.inbox / f"{staged.job_id}.job"
    assert sorted(p.name for p in job_dir.iterdir()) == ["b.wav", "job.json"]
    assert json.loads((job_dir / "job.json").read_text())["options"] == {"speakers": 3, "priority": 0}
    assert td.find(staged.job_id) == ("inbox", job_dir) and list(td.tmp.iterdir()) == []


# ---------------------------------------------------------------------------------------------- pure parts
@pytest.mark.parametrize("head, ext", [
    (WAV_HEAD, ".wav"), (b"fLaC\x00\x00\x00\x22", ".flac"), (b"OggS\x00\x02", ".ogg"), (b"ID3\x04\x00", ".mp3"),
    (b"\xff\xfb\x90\x64", ".mp3"), (b"\xff\xf1\x50\x80", ".aac"), (b"\x00\x00\x00\x20ftypM4A ", ".m4a"),
    (b"\x1a\x45\xdf\xa3\x9f", ".webm"), (b"hello world!", None), (b"{\"a\": 1}", None), (b"", None)])
def test_sniff_container(head, ext):
    assert sniff_container(head) == ext


@pytest.mark.parametrize("filename, name", [
    ("../../etc/evil name.wav", "evil_name.wav"), ("C:\\Users\\me\\call.WAV", "call.wav"),
    ("upload", "upload.wav"), (None, "audio.wav"), ("..wav", "audio.wav"), ("会议 记录.wav", "会议_记录.wav")])
def test_audio_name_is_never_a_path(filename, name):
    assert audio_name(filename, WAV_HEAD, [".wav", ".mp3"]) == name


def test_audio_name_refuses_what_is_not_audio_or_not_allowed():
    with pytest.raises(ApiError) as e:
        audio_name("notes.wav", b"plain text here", [".wav"])
    assert e.value.code == "audio_unrecognized" and e.value.param == "file"
    with pytest.raises(ApiError) as e:
        audio_name("x.exe", WAV_HEAD, [".wav"])
    assert e.value.code == "audio_unsupported_format"


def test_fields_map_to_job_options():
    options, req = parse_fields({"speakers": ["2"], "prompt": ["alpha, beta gamma"], "priority": ["5"],
                                 "response_format": ["SRT"], "model": ["whisper-1"], "language": ["zh"],
                                 "temperature": ["0"], "timestamp_granularities[]": ["segment"]})
    assert options == JobOptions(speakers=2, hotwords=["alpha", "beta", "gamma"], priority=5)
    assert (req.response_format, req.language) == ("srt", "zh")
    options, _ = parse_fields({"hotwords": ["one", "two,three"], "prompt": ["ignored when hotwords are given"]})
    assert options.hotwords == ["one", "two", "three"]
    options, _ = parse_fields({"min_speakers": ["2"], "max_speakers": ["4"]})
    assert (options.min_speakers, options.max_speakers) == (2, 4)
    options, _ = parse_fields({"diarize": ["false"]})
    assert options.diarize is False
    options, _ = parse_fields({"timestamp_granularities[]": ["word", "segment"], "response_format": ["verbose_json"]})
    assert options.word_timestamps is True
    options, _ = parse_fields({"timestamp_granularities[]": ["segment"], "response_format": ["verbose_json"]})
    assert options.word_timestamps is None  # the server's output.word_timestamps decides


@pytest.mark.parametrize("fields, param, code", [
    ({"speakers": ["1", "2"]}, "speakers", "duplicate_field"),
    ({"speakers": ["99"]}, "speakers", "invalid_value"),
    ({"max_speakers": ["x"]}, "max_speakers", "invalid_value"),
    ({"min_speakers": ["4"], "max_speakers": ["2"]}, "min_speakers", "invalid_value"),
    ({"speakers": ["2"], "min_speakers": ["2"]}, "speakers", "invalid_value"),
    ({"prompt": ["x" * 101]}, "prompt", "invalid_value"),
    ({"stream": ["true"]}, "stream", "unsupported_parameter"),
    ({"timestamp_granularities[]": ["word"]}, "timestamp_granularities", "invalid_value"),  # not verbose_json
    ({"timestamp_granularities[]": ["char"], "response_format": ["verbose_json"]}, "timestamp_granularities",
     "invalid_value"),
    ({"file_name": ["a"]}, "file_name", "unknown_parameter")])
def test_bad_fields_name_the_field(fields, param, code):
    with pytest.raises(ApiError) as e:
        parse_fields(fields)
    assert e.value.status == 400 and e.value.param == param and (code is None or e.value.code == code)


# ---------------------------------------------------------------------------------------------- the app
def test_healthz_is_ready_only_with_a_ready_worker(app_for):
    client = app_for()
    r = client.get("/healthz")
    assert r.status_code == 503 and r.json()["status"] == "not_ready"
    status = {"worker_id": "w1", "pid": os.getpid(), "state": "booting"}
    (client.td.workers / "w1.json").write_text(json.dumps(status))
    assert client.get("/healthz").status_code == 503
    (client.td.workers / "w1.json").write_text(json.dumps({**status, "state": "ready"}))
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["workers"] == {"w1": "ready"}


def test_job_options_and_a_safe_name_reach_the_inbox(app_for, tmp_path):
    client = app_for()
    r = client.post("/v1/jobs", files={"file": ("../../evil name.wav", wav_bytes(), "audio/wav")},
                    data={"speakers": "2", "hotwords": "alpha beta", "priority": "5"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    job_dir = client.td.inbox / f"{job_id}.job"
    assert sorted(p.name for p in job_dir.iterdir()) == ["evil_name.wav", "job.json"]
    assert (job_dir / "evil_name.wav").read_bytes() == wav_bytes()
    record = json.loads((job_dir / "job.json").read_text())
    assert record["options"] == {"speakers": 2, "hotwords": ["alpha", "beta"], "priority": 5}
    assert record["original_name"] == "evil_name.wav"
    assert not list(tmp_path.parent.glob("evil*")) and not list(tmp_path.glob("evil*"))
    state = client.get(f"/v1/jobs/{job_id}").json()
    assert state["status"] == "queued" and state["attempts"] == 0
    r = client.get(f"/v1/jobs/{job_id}/result", params={"format": "srt"})
    assert r.status_code == 409 and error(r)["code"] == "job_not_finished"
    assert error(client.get(f"/v1/jobs/{job_id}/result", params={"format": "docx"}))["param"] == "format"


def test_a_full_disk_during_the_upload_answers_507_and_leaves_nothing_behind(app_for, monkeypatch):
    client = app_for()
    monkeypatch.setenv("TRANSCRIBE_ENOSPC_AT", "upload.write")
    r = client.post("/v1/jobs", files={"file": ("meeting.wav", wav_bytes(), "audio/wav")})
    body = error(r)
    assert r.status_code == 507 and body["code"] == "insufficient_storage" and r.headers["retry-after"] == "60"
    assert "disk is full" in body["message"] and str(client.td.root) in body["message"]
    assert list(client.td.tmp.iterdir()) == [] and list(client.td.inbox.iterdir()) == []
    monkeypatch.delenv("TRANSCRIBE_ENOSPC_AT")
    assert client.post("/v1/jobs", files={"file": ("meeting.wav", wav_bytes(), "audio/wav")}).status_code == 202


def test_full_queue_answers_503_with_retry_after(app_for):
    client = app_for(max_queue_depth=2)
    for _ in range(2):
        assert client.post("/v1/jobs", files={"file": ("a.wav", wav_bytes())}).status_code == 202
    r = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav_bytes())})
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert error(r)["code"] == "queue_full"
    assert len(list(client.td.inbox.iterdir())) == 2


def test_sync_wait_expires_with_a_504_that_says_how_to_poll(app_for):
    client = app_for(sync_timeout_s=0.3)
    r = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav_bytes())},
                    data={"response_format": "vtt"})
    assert r.status_code == 504 and r.headers["x-should-retry"] == "false"
    err = error(r)
    job_id = err["job_id"]
    assert err["code"] == "sync_timeout" and f"/v1/jobs/{job_id}/result?format=vtt" in err["message"]
    assert r.headers["location"] == f"/v1/jobs/{job_id}"
    assert client.get(r.headers["location"]).json()["status"] == "queued"  # the job goes on


def test_oversize_is_refused_while_streaming_and_leaves_nothing(app_for):
    client = app_for(max_upload_mb=0.1)
    body = b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n" + wav_bytes() \
        + b"\r\n--B--\r\n"

    def chunks():  # no Content-Length: the limit can only be enforced as the bytes arrive
        for i in range(0, len(body), 16384):
            yield body[i:i + 16384]
    for content in (chunks(), body):
        r = client.post("/v1/jobs", content=content, headers={"Content-Type": "multipart/form-data; boundary=B"})
        assert r.status_code == 413 and error(r)["code"] == "file_too_large"
    assert list(client.td.tmp.iterdir()) == [] and list(client.td.inbox.iterdir()) == []


def test_api_keys(app_for):
    client = app_for(api_keys=[KEY, "second-key-0123456789"])
    files = {"file": ("a.wav", wav_bytes())}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEY}"}):
        r = client.post("/v1/jobs", files=files, headers=headers)
        assert r.status_code == 401 and error(r)["code"] == "invalid_api_key"
    assert client.get("/metrics").status_code == 401 and client.get("/v1/jobs/x").status_code == 401
    assert client.post("/v1/jobs", files=files, headers={"Authorization": f"Bearer {KEY}"}).status_code == 202
    assert client.get("/healthz").status_code == 503  # open (no worker here), never 401
    assert len(list(client.td.inbox.iterdir())) == 1


def test_unknown_paths_and_ids_are_json_404s(app_for):
    client = app_for()
    r = client.get("/v1/jobs/..%2F..%2Fetc%2Fpasswd")
    assert r.status_code == 404 and error(r)["code"] in ("not_found", "job_not_found")
    for job_id in ("..x", ".hidden", "a b", "x" * 300):
        r = client.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 404 and error(r)["code"] == "job_not_found"
    assert error(client.get("/v2/nothing"))["code"] == "not_found"
    assert client.get("/v1/audio/transcriptions").status_code == 405


def test_serve_refuses_a_port_in_use_and_a_bad_address(tmp_path):
    config = write_config(tmp_path / "config.json", {"pool": {"task_dir": "tasks"}, "logging": {"dir": "logs"}})
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for address, code, says in ((f"127.0.0.1:{port}", 3, "cannot listen on"), ("localhost:http", 2, "HOST:PORT")):
            out = subprocess.run([sys.executable, "-m", "transcribe", "--config", str(config), "serve", "--http",
                                  address], check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path)
            assert out.returncode == code and says in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_http_config_keys_from_the_environment_and_bind_forms():
    from transcribe.config import load_config
    from transcribe.core.errors import ConfigError

    env = {"TRANSCRIBE__HTTP__API_KEYS": "first-key-0123456789, second-key-0123456789",
           "TRANSCRIBE__HTTP__BIND": "8000"}
    cfg = load_config(None, environ=env)
    assert cfg.http.api_keys == ["first-key-0123456789", "second-key-0123456789"]
    assert cfg.http.bind == "127.0.0.1:8000"
    assert load_config(None, environ={"TRANSCRIBE__HTTP__BIND": "[::1]:9000"}).http.bind == "[::1]:9000"
    with pytest.raises(ConfigError, match="TRANSCRIBE__HTTP__API_KEYS: each API key"):
        load_config(None, environ={"TRANSCRIBE__HTTP__API_KEYS": "short"})
    with pytest.raises(ConfigError, match="TRANSCRIBE__HTTP__BIND: .*HOST:PORT"):
        load_config(None, environ={"TRANSCRIBE__HTTP__BIND": "example.org"})


@pytest.mark.parametrize("retryable, status", [(False, 400), (True, 500)])
def test_job_state_follows_the_task_directory(app_for, retryable, status):
    """queued -> processing (stage from the worker's status file) -> failed, moved by TaskDir's own methods."""
    client = app_for()
    job_id = client.post("/v1/jobs", files={"file": ("call.wav", wav_bytes())}).json()["id"]
    job = client.td.claim(client.td.inbox / f"{job_id}.job", "w1")
    (client.td.workers / "w1.json").write_text(json.dumps({
        "worker_id": "w1", "pid": os.getpid(), "state": "busy", "job": job_id, "job_stage": "spk",
        "job_started_ts": time.time() - 3}))
    state = client.get(f"/v1/jobs/{job_id}").json()
    assert (state["status"], state["stage"], state["worker"], state["attempts"]) == ("processing", "spk", "w1", 1)
    assert state["elapsed_s"] >= 3 and state["source"] == "call.wav"
    client.td.fail(job, {"reason": "audio_undecodable" if not retryable else "max_attempts_exceeded",
                         "error_type": "X", "message": "it broke", "retryable": retryable}, "w1")
    state = client.get(f"/v1/jobs/{job_id}").json()
    assert state["status"] == "failed" and state["error"]["message"] == "it broke"
    r = client.get(f"/v1/jobs/{job_id}/result")
    assert r.status_code == status and error(r)["code"] == state["error"]["reason"]
    assert error(r)["job_id"] == job_id


def test_subtitles_are_the_files_the_worker_committed(app_for):
    """srt/vtt over HTTP are byte for byte the job's committed files (rendered with its line limits)."""
    from transcribe.core.engine.formats import render
    from transcribe.core.engine.result import Result, Segment

    client = app_for()
    job_id = client.post("/v1/jobs", files={"file": ("call.wav", wav_bytes())}).json()["id"]
    job = client.td.claim(client.td.inbox / f"{job_id}.job", "w1")
    result = Result(text="你好世界", segments=[Segment(0.0, 1.5, "你好世界", "Speaker1")], speakers=["Speaker1"],
                    duration=1.5, processing_time=0.1, rtf=0.07, device="cpu", models={})
    wrapped = "1\n00:00:00,000 --> 00:00:01,500\n[Speaker1] 你好\n世界\n"  # as a 2-character line limit gives
    client.td.complete(job, {"json": result.to_json(), "srt": wrapped}, keep_audio=False)
    assert client.get(f"/v1/jobs/{job_id}/result", params={"format": "srt"}).text == wrapped
    assert client.get(f"/v1/jobs/{job_id}/result", params={"format": "vtt"}).text == render(result, "vtt")
