"""The HTTP API end to end: `transcribe serve --http` as a subprocess on the fixture models, called with the
official `openai` client and httpx; SRT/VTT checked with third-party parsers (srt, webvtt-py).

One pool server (1 worker) serves the module; the last test kills it with SIGKILL mid-request and
restarts it. Expected transcripts come from the project's `Transcriber` in this process (itself checked
against bare FunASR in test_parity.py), so the API is shown to return exactly the worker's result.
"""

from __future__ import annotations

import json
import socket
import threading
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import srt
import webvtt

from tests.conftest import model_config, needs_shared, shared_audio, write_config
from tests.support.pool_helpers import Server, tile_audio, wait_until
from transcribe.core.engine.result import Result

pytestmark = needs_shared
API_KEY = "test-key-0123456789abcdef"
BOOT = 180  # seconds: a worker importing FunASR on a busy 2-core machine
JOB_WAIT = 120
MAX_UPLOAD_MB = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`serve --mode MODE --http 127.0.0.1:PORT` plus clients for it; restartable on the same port."""

    def __init__(self, config: Path, mode: str = "pool") -> None:
        self.config, self.mode, self.port = config, mode, free_port()
        self.task_dir = config.parent / "tasks"
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: Server | None = None

    def start(self) -> "LiveServer":
        self.server = Server(self.config, mode=self.mode, workers=1, args=("--http", f"127.0.0.1:{self.port}"))
        wait_until(self.healthy, BOOT, f"/healthz to answer 200 (log: {self.server.log})", interval=0.2)
        return self

    def healthy(self) -> bool:
        assert self.server is not None and self.server.proc.poll() is None, self.server and self.server.output()
        try:
            return httpx.get(self.url + "/healthz", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> int:
        assert self.server is not None
        return self.server.terminate()

    def openai(self, key: str = API_KEY) -> openai.OpenAI:
        # max_retries=0: a retried POST would upload the job again
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=JOB_WAIT)

    def http(self, key: str | None = API_KEY) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=JOB_WAIT,
                            headers={"Authorization": f"Bearer {key}"} if key else {})


def http_config(root: Path, tiny_models: dict[str, Path]) -> Path:
    data = model_config(tiny_models)
    data["pool"] = {"task_dir": "tasks", "settle_seconds": 0.3, "heartbeat_interval": 0.5, "shutdown_timeout": 10}
    data["logging"] = {"dir": "logs"}
    data["http"] = {"max_upload_mb": MAX_UPLOAD_MB, "api_keys": [API_KEY], "sync_timeout_s": JOB_WAIT}
    return write_config(root / "config.json", data)


@pytest.fixture(scope="module")
def live(tiny_models, tmp_path_factory):
    srv = LiveServer(http_config(tmp_path_factory.mktemp("http"), tiny_models)).start()
    yield srv
    code = srv.stop()
    assert code == 0, srv.server.output()[-3000:]


@pytest.fixture(scope="module")
def expected(transcriber):
    """The project's own result for a file and options, computed once per pair."""
    cache: dict[tuple[str, int | None], object] = {}

    def get(name: str, speakers: int | None = None):
        if (name, speakers) not in cache:
            cache[name, speakers] = transcriber.transcribe(shared_audio(name), speakers=speakers)
        return cache[name, speakers]
    return get


TWO_SPEAKERS = "espeak_zh_en_30s.wav"  # long enough for CAM++ clustering (20+ windows), short enough for CI
SHORT = "tts_1speaker_5s.wav"


def transcribe(client: openai.OpenAI, name: str, fmt: str, **extra):
    """The openai client's call; returns (parsed body, the job id the server answered with)."""
    with open(shared_audio(name), "rb") as f:
        raw = client.audio.transcriptions.with_raw_response.create(
            model="paraformer-zh", file=f, response_format=fmt, extra_body=extra or None)
    return raw.parse(), raw.headers["x-transcribe-job-id"]


def stored_result(live: LiveServer, job_id: str) -> Result:
    """The worker's committed result for the job, as the task directory holds it."""
    return Result.from_json((live.task_dir / "done" / f"{job_id}.json").read_text())


def same_words_and_times(got: Result, want: Result) -> bool:
    """Text and segment times equal the in-process Transcriber's. Speaker labels are compared with the
    job's own stored result instead: CAM++ with random tiny weights clusters unstably from run to run."""
    return got.text == want.text and [(s.start, s.end, s.text) for s in got.segments] == \
        [(s.start, s.end, s.text) for s in want.segments]


# ---------------------------------------------------------------------------------------------- formats
def test_json(live, expected):
    resp, job_id = transcribe(live.openai(), SHORT, "json")
    assert resp.text == expected(SHORT).text != ""
    assert same_words_and_times(stored_result(live, job_id), expected(SHORT))


def test_text(live, expected):
    body, _ = transcribe(live.openai(), SHORT, "text")
    assert isinstance(body, str) and body.strip() == expected(SHORT).text


def test_verbose_json_has_speakers_duration_and_timings(live, expected):
    resp, job_id = transcribe(live.openai(), TWO_SPEAKERS, "verbose_json", speakers=2)
    stored = stored_result(live, job_id)
    assert same_words_and_times(stored, expected(TWO_SPEAKERS, 2))
    assert resp.duration == pytest.approx(stored.duration) and resp.text == stored.text
    got = [(s.start, s.end, s.text, s.model_extra["speaker"]) for s in resp.segments]
    assert got == [(s.start, s.end, s.text, s.speaker) for s in stored.segments]
    extra = resp.model_extra
    assert extra["speakers"] == stored.speakers and sorted({g[3] for g in got}) == ["Speaker1", "Speaker2"]
    assert {"vad", "asr", "spk"} <= set(extra["timings"]) and extra["rtf"] > 0 and extra["job_id"] == job_id


def test_word_timestamps_through_the_openai_client(live):
    """timestamp_granularities=["word"] (the openai client's own argument) gives verbose_json `words`: every
    token of the text with its time, inside its segment, as the worker committed them."""
    with open(shared_audio(SHORT), "rb") as f:
        raw = live.openai().audio.transcriptions.with_raw_response.create(
            model="paraformer-zh", file=f, response_format="verbose_json", timestamp_granularities=["word"])
    resp, job_id = raw.parse(), raw.headers["x-transcribe-job-id"]
    stored = stored_result(live, job_id)
    assert resp.words and all(s.words for s in stored.segments)
    assert [(w.word, w.start, w.end) for w in resp.words] == \
        [(w.text, w.start, w.end) for s in stored.segments for w in s.words]
    def letters(text: str) -> str:  # words are tokens: the text less its punctuation and spaces
        return "".join(c for c in text if not c.isspace() and not unicodedata.category(c).startswith("P"))

    assert letters("".join(w.word for w in resp.words)) == letters(resp.text) != ""
    assert all(a.start <= a.end <= b.start + 1e-6 for a, b in zip(resp.words, resp.words[1:]))


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_subtitles_parse_with_third_party_parsers(live, expected, fmt):
    body, job_id = transcribe(live.openai(), TWO_SPEAKERS, fmt, speakers=2)
    stored = stored_result(live, job_id)
    assert same_words_and_times(stored, expected(TWO_SPEAKERS, 2))
    if fmt == "srt":
        cues = [(c.start.total_seconds(), c.end.total_seconds(), c.content) for c in srt.parse(body)]
    else:
        cues = [(c.start_in_seconds + c.start_time.milliseconds / 1000, c.end_in_seconds + c.end_time.milliseconds
                 / 1000, c.text) for c in webvtt.from_string(body)]
    assert len(cues) == len(stored.segments) > 1
    for (start, end, text), seg in zip(cues, stored.segments):
        assert start == pytest.approx(seg.start, abs=5e-4) and end == pytest.approx(seg.end, abs=5e-4)
        assert text == f"[{seg.speaker}] {seg.text}"
    assert {c[2].split("]")[0] for c in cues} == {"[Speaker1", "[Speaker2"}


def test_async_job_state_and_result(live, expected):
    with live.http() as client, open(shared_audio(SHORT), "rb") as f:
        r = client.post("/v1/jobs", files={"file": (SHORT, f, "audio/wav")}, data={"priority": "3"})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert r.headers["location"] == f"/v1/jobs/{job_id}"
        seen = set()

        def finished() -> bool:
            state = client.get(f"/v1/jobs/{job_id}").json()
            seen.add(state["status"])
            return state["status"] in ("done", "failed")
        wait_until(finished, JOB_WAIT, f"job {job_id} to finish")
        state = client.get(f"/v1/jobs/{job_id}").json()
        assert state["status"] == "done" and state["duration"] == pytest.approx(expected(SHORT).duration)
        assert seen <= {"queued", "processing", "done"}
        cues = list(srt.parse(client.get(f"/v1/jobs/{job_id}/result", params={"format": "srt"}).text))
        assert [c.content for c in cues] == [f"[{s.speaker}] {s.text}" for s in expected(SHORT).segments]
        assert client.get(f"/v1/jobs/{job_id}/result").json()["text"] == expected(SHORT).text
        missing = client.get("/v1/jobs/20990101T000000000-00000000-nothing")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"


# ---------------------------------------------------------------------------------------------- concurrency
def test_20_simultaneous_uploads_all_answered_while_healthz_answers(live, expected):
    stop = threading.Event()
    health: list[int] = []

    def probe_health() -> None:
        with httpx.Client(base_url=live.url, timeout=10) as c:
            while not stop.is_set():
                health.append(c.get("/healthz").status_code)
                stop.wait(0.2)

    def one(i: int) -> str:
        with live.http() as client, open(shared_audio(SHORT), "rb") as f:
            r = client.post("/v1/audio/transcriptions", files={"file": (f"call-{i}.wav", f, "audio/wav")})
        assert r.status_code == 200, r.text
        assert r.json()["text"] == expected(SHORT).text
        return r.json()["job_id"]

    prober = threading.Thread(target=probe_health)
    prober.start()
    try:
        with ThreadPoolExecutor(20) as pool:
            ids = list(pool.map(one, range(20)))
    finally:
        stop.set()
        prober.join()
    assert len(set(ids)) == 20
    done = {p.stem for p in (live.task_dir / "done").glob("*.json")}
    assert set(ids) <= done
    assert len(health) >= 3 and set(health) == {200}


# ---------------------------------------------------------------------------------------------- bad requests
BAD = {
    # name: (files, data, key, status, param, code)
    "no file": ({"model": (None, "x")}, {}, API_KEY, 400, "file", "missing_file"),
    "not multipart": (None, {"model": "x"}, API_KEY, 400, "file", "invalid_content_type"),
    "empty file": ({"file": ("a.wav", b"", "audio/wav")}, {}, API_KEY, 400, "file", "audio_empty"),
    "text named .wav": ({"file": ("notes.wav", b"hello, this is not audio\n" * 40, "audio/wav")}, {}, API_KEY,
                        400, "file", "audio_unrecognized"),
    "unsupported extension": ("WAV:setup.exe", {}, API_KEY, 400, "file", "audio_unsupported_format"),
    "speakers not a number": ("WAV", {"speakers": "two"}, API_KEY, 400, "speakers", "invalid_value"),
    "speakers zero": ("WAV", {"speakers": "0"}, API_KEY, 400, "speakers", "invalid_value"),
    "unknown format": ("WAV", {"response_format": "docx"}, API_KEY, 400, "response_format", "invalid_value"),
    "unknown field": ("WAV", {"speeker": "2"}, API_KEY, 400, "speeker", "unknown_parameter"),
    "wrong key": ("WAV", {}, "wrong-key-0123456789abcdef", 401, None, "invalid_api_key"),
    "no key": ("WAV", {}, None, 401, None, "invalid_api_key"),
    "oversize": ("BIG", {}, API_KEY, 413, "file", "file_too_large"),
    # refused at the first bytes or by the key check while the client is still sending megabytes:
    # it must read the error, not a reset connection (which clients retry by uploading again)
    "large text named .wav": ({"file": ("big.wav", b"not audio, just text\n" * 120_000, "audio/wav")}, {},
                              API_KEY, 400, "file", "audio_unrecognized"),
    "wrong key, large upload": ("BIG_UNDER_LIMIT", {}, "wrong-key-0123456789abcdef", 401, None, "invalid_api_key"),
    "truncated wav (fails in the worker)": ("TRUNCATED", {}, API_KEY, 400, "file", "audio_undecodable"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_json_error_and_server_keeps_serving(live, tmp_path, case):
    files, data, key, status, param, code = BAD[case]
    wav = shared_audio(SHORT).read_bytes()
    if isinstance(files, str) and files.startswith("WAV"):
        files = {"file": (files.partition(":")[2] or SHORT, wav, "audio/wav")}
    elif files == "BIG":
        big = tile_audio(shared_audio(SHORT), tmp_path / "big.wav", 18)
        assert big.stat().st_size > MAX_UPLOAD_MB * 2**20
        files = {"file": ("big.wav", big.read_bytes(), "audio/wav")}
    elif files == "BIG_UNDER_LIMIT":
        files = {"file": ("big.wav", tile_audio(shared_audio(SHORT), tmp_path / "b.wav", 12).read_bytes(), "audio/wav")}
    elif files == "TRUNCATED":
        files = {"file": ("cut.wav", b"RIFF\x24\x00\x00\x00WAVE" + b"no fmt chunk " * 20, "audio/wav")}
    inbox_before = set((live.task_dir / "inbox").iterdir())
    with live.http(key) as client:
        r = client.post("/v1/audio/transcriptions", files=files, data=data)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] == code and err["param"] == param and err["message"] and "Traceback" not in r.text
    assert set(err) >= {"message", "type", "param", "code"}
    if status != 400 or code != "audio_undecodable":
        assert set((live.task_dir / "inbox").iterdir()) == inbox_before  # nothing queued
    assert not list((live.task_dir / "tmp").glob("*.job"))  # nothing left staged
    assert httpx.get(live.url + "/healthz", timeout=10).status_code == 200


def test_openai_client_raises_with_the_server_message(live):
    with pytest.raises(openai.BadRequestError) as info:
        transcribe(live.openai(), SHORT, "json", speakers="lots")
    assert info.value.status_code == 400 and "speakers" in str(info.value)
    with pytest.raises(openai.AuthenticationError):
        transcribe(live.openai("wrong-key-0123456789abcdef"), SHORT, "json")


def test_metrics(live):
    text = live.http().get("/metrics").text
    for name in ("transcribe_queue_depth", "transcribe_job_rtf_bucket", "transcribe_job_audio_seconds_total",
                 "transcribe_workers", "transcribe_http_jobs_total", "transcribe_http_requests_total"):
        assert name in text, name
    done = next(line for line in text.splitlines() if line.startswith('transcribe_queue_depth{folder="done"}'))
    assert float(done.split()[-1]) == len(list((live.task_dir / "done").glob("*.json")))
    assert 'transcribe_workers{state="ready"} 1.0' in text or 'transcribe_workers{state="busy"} 1.0' in text
    assert httpx.get(live.url + "/metrics", timeout=10).status_code == 401


def test_lock_mode_serves_the_same_api(tiny_models, tmp_path, expected):
    srv = LiveServer(http_config(tmp_path, tiny_models), mode="lock").start()
    try:
        resp, job_id = transcribe(srv.openai(), SHORT, "verbose_json", speakers=1)
        assert same_words_and_times(stored_result(srv, job_id), expected(SHORT))
        assert [s.text for s in resp.segments] == [s.text for s in expected(SHORT).segments]
        # the worker's status file says busy until the job's bookkeeping ends, just after the commit
        wait_until(lambda: httpx.get(srv.url + "/healthz", timeout=10).json()["workers"] == {"lock": "ready"}, 30,
                   "the lock worker to be ready again")
    finally:
        assert srv.stop() == 0, srv.server.output()[-3000:]


# ---------------------------------------------------------------------------------------------- crash
def test_sigkill_mid_request_then_restart_completes_every_accepted_job(live):
    """Kill the serving process group (supervisor, worker, HTTP thread) while a job is being transcribed,
    sync requests wait and one upload is half sent; restart; every accepted job completes exactly once."""
    td = live.task_dir
    before = {p.stem for p in (td / "done").glob("*.json")}
    long_audio = shared_audio(TWO_SPEAKERS).read_bytes()
    short_audio = shared_audio(SHORT).read_bytes()
    accepted: set[str] = set()
    with live.http() as client:
        for i in range(3):
            r = client.post("/v1/jobs", files={"file": (f"long-{i}.wav", long_audio, "audio/wav")})
            assert r.status_code == 202, r.text
            accepted.add(r.json()["id"])

    def sync_upload(i: int) -> None:
        try:
            with live.http() as client:
                client.post("/v1/audio/transcriptions", files={"file": (f"sync-{i}.wav", short_audio, "audio/wav")})
        except httpx.TransportError:
            pass  # the server died under this request: expected

    half_sent, release = threading.Event(), threading.Event()

    def body():  # a multipart body whose second half never comes before the kill
        yield b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"partial.wav\"\r\n\r\n"
        yield long_audio[: len(long_audio) // 2]
        half_sent.set()
        release.wait(JOB_WAIT)
        yield b"\r\n--B--\r\n"

    def partial_upload() -> None:
        try:
            httpx.post(live.url + "/v1/jobs", content=body(), timeout=JOB_WAIT,
                       headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "multipart/form-data; boundary=B"})
        except httpx.TransportError:
            pass

    threads = [threading.Thread(target=sync_upload, args=(i,)) for i in range(2)]
    threads.append(threading.Thread(target=partial_upload))
    for t in threads:
        t.start()

    def sync_jobs_accepted() -> bool:
        names = [json.loads(p.read_text())["original_name"] for p in (td / "inbox").glob("*/job.json")]
        names += [json.loads(p.read_text())["original_name"] for p in (td / "processing").glob("*/job.json")]
        names += [json.loads(p.read_text())["source"] for p in (td / "done").glob("*.json")]
        return sum(n.startswith("sync-") for n in names) == 2
    wait_until(half_sent.is_set, 30, "the partial upload to be half sent")
    wait_until(lambda: list((td / "tmp").glob("*.job")), 30, "the partial upload to be staged in tmp/")
    wait_until(sync_jobs_accepted, 30, "both sync uploads to reach the inbox")
    wait_until(lambda: list((td / "processing").iterdir()), JOB_WAIT, "a job being transcribed")

    live.server.kill_group()  # SIGKILL to supervisor, worker and the HTTP thread's process
    release.set()
    for t in threads:
        t.join(30)
    # Accepted: an id was returned, or the upload reached the inbox (and so may be mid-transcription).
    in_flight = {p.name.removesuffix(".job") for folder in ("inbox", "processing") for p in (td / folder).iterdir()}
    mid_transcription = {p.name for p in (td / "processing").iterdir()}
    assert mid_transcription  # the kill came a moment after a job was seen in processing/ (jobs take seconds)
    accepted |= in_flight
    finished_before_kill = {p.stem for p in (td / "done").glob("*.json")} - before
    assert len(accepted | finished_before_kill) == 5  # 3 async + 2 sync; the partial upload is not a job

    live.start()
    with live.http() as client:
        for job_id in sorted(accepted):
            wait_until(lambda job_id=job_id: client.get(f"/v1/jobs/{job_id}").json()["status"] in ("done", "failed"),
                       JOB_WAIT, f"job {job_id}")
            assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "done"
    done = {p.stem for p in (td / "done").glob("*.json")} - before
    assert done == accepted | finished_before_kill  # every accepted job once; the half upload never became one
    assert not any("partial" in job_id for job_id in done)
    for job_id in mid_transcription:  # killed mid-transcription: recovered, requeued and run once more
        record = json.loads((td / "done" / job_id / "job.json").read_text())
        assert record["attempts"] == 2 and record["history"][0]["reason"] == "supervisor_restart", record
    assert list((td / "inbox").iterdir()) == [] and list((td / "processing").iterdir()) == []
