"""Runtime device fallback inside a real pool worker: an out-of-memory on a job's model call (injected
with the project's fault-injection hook) is retried with half the batch, the result says so, a
`job.fallback` webhook goes out through the job runner, and the worker goes on with the next job."""

import json

from tests.conftest import model_config, shared_audio, write_config
from tests.support.pool_helpers import (
    Server,
    drop_file,
    ready_workers,
    results,
    wait_until,
)
from tests.test_notify_metrics import webhook_server  # noqa: F401 - the fixture


def test_a_worker_falls_back_for_one_job_and_reports_it(tiny_models, tmp_path, webhook_server):  # noqa: F811
    url, received = webhook_server
    data = model_config(tiny_models)
    task_dir = tmp_path / "tasks"
    data["pool"] = {"task_dir": str(task_dir), "settle_seconds": 0.2, "heartbeat_interval": 0.5}
    data["logging"] = {"dir": str(tmp_path / "logs")}
    data["notify"] = {"webhook_url": url, "retries": 0}
    cfg = write_config(tmp_path / "config.json", data)
    env = {"TRANSCRIBE_OOM_AT": "model", "TRANSCRIBE_HOOK_ONCE": str(tmp_path / "oom-once")}
    server = Server(cfg, workers=1, env=env)
    try:
        wait_until(lambda: ready_workers(task_dir, 1), 240, "the worker to boot")
        drop_file(shared_audio("tts_1speaker_5s.wav"), task_dir / "inbox", "first.wav")
        wait_until(lambda: len(results(task_dir)) == 1, 120, "the first job")
        drop_file(shared_audio("tts_1speaker_5s.wav"), task_dir / "inbox", "second.wav")
        wait_until(lambda: len(results(task_dir)) == 2, 120, "the second job")
        by_source = {r["source"]: r for r in results(task_dir)}
        first, second = by_source["first.wav"], by_source["second.wav"]
        assert first["fallback"]["reason"] == "out_of_memory" and first["fallback"]["batch_size_s"] == 150
        assert second["fallback"] is None and second["segments"] == first["segments"]
        events = wait_until(lambda: [e for e in received if e["event"] == "job.fallback"], 30, "the webhook")
        assert len(events) == 1 and events[0]["source"] == "first.wav" and events[0]["reason"] == "out_of_memory"
    finally:
        assert server.terminate() == 0, server.output()
    assert json.loads((task_dir / "done" / f"{events[0]['job_id']}.json").read_text())["fallback"]
