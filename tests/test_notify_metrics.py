"""Webhooks against a local HTTP server, and the Prometheus text file against the folders."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import shared_audio
from transcribe.core.metrics import PoolMetrics
from transcribe.core.notify import Notifier
from transcribe.core.pool.job_runner import run_job
from transcribe.core.pool.task_dir import TaskDir


@pytest.fixture
def webhook_server():
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()


def run_two_jobs(transcriber, cfg, notifier=None):
    """A good and a bad job through run_job, as a worker runs them; returns the task dir and outcomes."""
    import os
    import time

    td = TaskDir.from_config(cfg).ensure()
    (td.inbox / "good.wav").write_bytes(shared_audio("tts_1speaker_5s.wav").read_bytes())
    (td.inbox / "bad.wav").write_text("not audio")
    for p in td.inbox.iterdir():
        os.utime(p, (time.time() - 10,) * 2)
    outcomes = []
    while (job := td.claim_next("w1")) is not None:
        outcomes.append(run_job(td, job, transcriber.transcribe, cfg, "w1", notifier)[0])
    if notifier:
        notifier.close()
    return td, sorted(outcomes)


def test_one_post_per_finished_job(transcriber, fixture_config, webhook_server, tmp_path):
    url, received = webhook_server
    _, outcomes = run_two_jobs(transcriber, fixture_config, Notifier(url, timeout_s=2, retries=0))
    assert outcomes == ["done", "failed"]
    events = {e["source"]: e for e in received}
    assert len(received) == 2
    assert events["good.wav"]["event"] == "job.done"
    assert events["good.wav"]["result_path"].endswith(".json")
    assert json.loads(open(events["good.wav"]["result_path"]).read())["source"] == "good.wav"
    assert events["bad.wav"]["event"] == "job.failed" and events["bad.wav"]["reason"] == "audio_undecodable"


def test_a_dead_webhook_does_not_fail_jobs(transcriber, fixture_config, tmp_path):
    import socket

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/hook"
    td, outcomes = run_two_jobs(transcriber, fixture_config, Notifier(dead, timeout_s=0.5, retries=1))
    assert outcomes == ["done", "failed"]
    assert td.counts() == {"inbox": 0, "processing": 0, "done": 1, "failed": 1}


def test_metrics_text_file_parses_and_matches_the_folders(transcriber, fixture_config, tmp_path):
    td, _ = run_two_jobs(transcriber, fixture_config)
    (td.inbox / "waiting.wav").write_bytes(b"x")
    path = tmp_path / "metrics" / "transcribe.prom"
    metrics = PoolMetrics(td, path)
    metrics.update(["ready", "busy", "down"], restarts_total=2)
    families = {f.name: f for f in text_string_to_metric_families(path.read_text())}
    depth = {s.labels["folder"]: s.value for s in families["transcribe_queue_depth"].samples}
    assert depth == {k: float(v) for k, v in td.counts().items()} == {"inbox": 1.0, "processing": 0.0,
                                                                     "done": 1.0, "failed": 1.0}
    rtf_count = next(s.value for s in families["transcribe_job_rtf"].samples if s.name.endswith("_count"))
    assert rtf_count == 1.0
    restarts = next(s.value for s in families["transcribe_worker_restarts"].samples if s.name.endswith("_total"))
    assert restarts == 2.0
    workers = {s.labels["state"]: s.value for s in families["transcribe_workers"].samples}
    assert workers["ready"] == 1 and workers["busy"] == 1 and workers["down"] == 1
