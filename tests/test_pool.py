"""Pool and lock-mode servers end to end: real subprocesses, fixture models, the shared recordings."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import AUDIO, model_config, needs_shared, shared_audio, write_config
from tests.support.pool_helpers import (
    Server,
    assert_exactly_once,
    drop_file,
    failed,
    ready_workers,
    results,
    tile_audio,
    wait_until,
    workers_status,
)

pytestmark = needs_shared
BOOT = 120  # seconds: importing FunASR in two workers at once on 2 cores


def pool_config(tmp_path, tiny_models, **pool):
    data = model_config(tiny_models)
    data["pool"] = {"task_dir": "tasks", "settle_seconds": 2.0, "heartbeat_interval": 0.5, "heartbeat_timeout": 30,
                    "shutdown_timeout": 30, **pool}
    data["output"] = {"formats": ["json", "txt", "srt"]}
    return write_config(tmp_path / "config.json", data)


@pytest.fixture(scope="module", params=["pool", "lock"])
def server(request, tiny_models, tmp_path_factory):
    """A running server (pool with 2 workers, or lock mode) shared by the module's tests."""
    tmp = tmp_path_factory.mktemp(request.param)
    cfg = pool_config(tmp, tiny_models)
    srv = Server(cfg, mode=request.param)
    srv.task_dir = tmp / "tasks"
    srv.mode = request.param
    wait_until(lambda: ready_workers(srv.task_dir, 2 if request.param == "pool" else 1), BOOT, "workers ready")
    yield srv
    code = srv.terminate()
    assert code == 0, srv.output()[-3000:]


def test_processes_dropped_files(server):
    td = server.task_dir
    names = {"podcast_2speakers_60s.wav": None, "silence_5s.wav": None, "tts_1speaker_5s.wav": None,
             "espeak_zh_en_30s.wav": None}
    for n in names:
        drop_file(AUDIO / n, td / "inbox")
    drop_file(AUDIO / "tts_1speaker_5s.wav", td / "inbox", "会议 记录 1.wav")
    drop_file(AUDIO / "podcast_2speakers_60s.wav", td / "inbox", "-leading dash.wav")
    (td / "inbox" / "podcast_2speakers_60s.wav.json").write_text('{"speakers": 2}')
    expected = [*names, "会议 记录 1.wav", "-leading dash.wav"]
    wait_until(lambda: len(results(td)) >= 6, 120, "6 results")
    counts = assert_exactly_once(td, expected)
    assert counts == {"done": 6, "failed": 0}
    by_source = {r["source"]: r for r in results(td)}
    podcast = by_source["podcast_2speakers_60s.wav"]
    assert podcast["speakers"] == ["Speaker1", "Speaker2"] and podcast["segments"]
    assert all(s["speaker"] in podcast["speakers"] for s in podcast["segments"])
    assert by_source["silence_5s.wav"]["segments"] == [] and by_source["silence_5s.wav"]["text"] == ""
    for r in results(td):
        for s in r["segments"]:
            assert 0 <= s["start"] <= s["end"] <= r["duration"]
    some = next(td.joinpath("done").glob("*podcast*.json")).stem
    assert (td / "done" / f"{some}.srt").read_text().startswith("1\n00:00:")


def test_slowly_written_file_is_claimed_only_when_complete(server, tmp_path):
    td = server.task_dir
    data = (AUDIO / "espeak_zh_en_30s.wav").read_bytes()
    target = td / "inbox" / "slow.wav"
    chunks = [data[i:i + len(data) // 6 + 1] for i in range(0, len(data), len(data) // 6 + 1)]
    with open(target, "wb") as f:
        for chunk in chunks:  # ~3 s of appending
            f.write(chunk)
            f.flush()
            time.sleep(0.5)
            assert target.exists(), "claimed while still being written"
    wait_until(lambda: any(r["source"] == "slow.wav" for r in results(td)), 60, "slow.wav result")
    r = next(r for r in results(td) if r["source"] == "slow.wav")
    assert r["duration"] == pytest.approx(30.0, abs=0.1)  # the whole file, not a prefix


def test_corrupt_file_and_bad_sidecar_fail_with_reasons_and_workers_live_on(server):
    td = server.task_dir
    pids_before = {w["pid"] for w in workers_status(td).values()}
    (td / "inbox" / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" * 100)
    drop_file(AUDIO / "tts_1speaker_5s.wav", td / "inbox", "sidecar.wav")
    (td / "inbox" / "sidecar.wav.json").write_text('{"speakers": "many"')
    drop_file(AUDIO / "tts_1speaker_5s.wav", td / "inbox", "after.wav")
    wait_until(lambda: len(failed(td)) >= 2 and any(r["source"] == "after.wav" for r in results(td)), 60,
               "2 failures and the next job done")
    reasons = {e["original_name"]: e["reason"] for e in failed(td).values()}
    assert reasons == {"corrupt.wav": "audio_undecodable", "sidecar.wav": "sidecar_invalid"}
    for e in failed(td).values():
        assert e["message"] and e["error_type"] and e["attempts"] == 1 and e["worker"]
    assert {w["pid"] for w in workers_status(td).values()} == pids_before


def test_status_json_reflects_the_running_server(server, tmp_path):
    out = subprocess.run([sys.executable, "-m", "transcribe", "--config", str(server.task_dir.parent / "config.json"),
                          "status", "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["server"]["alive"]
    assert len(info["workers"]) == (2 if server.mode == "pool" else 1)
    assert all(w["device"] == "cpu" and w["state"] in ("ready", "busy") for w in info["workers"])
    assert info["counts"]["done"] == len(results(server.task_dir))


# --------------------------------------------------------------------------- crashes and signals
def busy_worker(td):
    return next((w for w in workers_status(td).values() if w.get("state") == "busy" and w.get("job")), None)


def start_with_long_job(tmp_path, tiny_models, minutes, *extra):
    """A 2-worker pool busy with `long.wav` (`minutes` long); returns (server, task dir, busy worker)."""
    td = tmp_path / "tasks"
    srv = Server(pool_config(tmp_path, tiny_models))
    wait_until(lambda: ready_workers(td, 2), BOOT, "workers ready")
    tile_audio(shared_audio("podcast_2speakers_60s.wav"), tmp_path / "long.wav", minutes)
    for src in (tmp_path / "long.wav", *extra):
        drop_file(src, td / "inbox")
    return srv, td, wait_until(lambda: busy_worker(td), 30, "a busy worker")


def test_killed_worker_job_is_requeued_and_done_once(tmp_path, tiny_models):
    srv, td, victim = start_with_long_job(tmp_path, tiny_models, 6)
    try:
        os.kill(victim["pid"], signal.SIGKILL)
        wait_until(lambda: results(td), 120, "the requeued job's result")
        assert_exactly_once(td, ["long.wav"])
        [r] = results(td)
        assert r["duration"] == pytest.approx(360, abs=0.1)
        wait_until(lambda: workers_status(td)[victim["worker_id"]]["pid"] != victim["pid"]
                   and ready_workers(td, 2), BOOT, "the worker respawned")
        job_dir = next(p for p in (td / "done").iterdir() if p.is_dir())
        record = json.loads((job_dir / "job.json").read_text())
        assert record["attempts"] == 2 and record["history"][0]["reason"] == "worker_died"
        assert srv.terminate() == 0
    finally:
        srv.kill_group()


def test_supervisor_and_workers_killed_then_restarted(tmp_path, tiny_models):
    cfg = pool_config(tmp_path, tiny_models)
    td = tmp_path / "tasks"
    srv = Server(cfg)
    names = [f"job{i}.wav" for i in range(6)]
    try:
        wait_until(lambda: ready_workers(td, 2), BOOT, "workers ready")
        for n in names:
            drop_file(AUDIO / "podcast_2speakers_60s.wav", td / "inbox", n)
        wait_until(lambda: busy_worker(td), 30, "a job in progress")
    finally:
        srv.kill_group()  # SIGKILL to the supervisor and every worker at once
    assert any((td / "processing").iterdir()) or len(results(td)) < 6
    again = Server(cfg)
    try:
        wait_until(lambda: len(results(td)) + len(failed(td)) >= 6, BOOT + 60, "all jobs settled")
        assert again.terminate() == 0
    finally:
        again.kill_group()
    assert assert_exactly_once(td, names) == {"done": 6, "failed": 0}


def test_sigterm_during_a_job_finishes_it_and_exits_0(tmp_path, tiny_models):
    srv, td, _ = start_with_long_job(tmp_path, tiny_models, 3, AUDIO / "tts_1speaker_5s.wav")
    try:
        assert srv.terminate() == 0
    finally:
        srv.kill_group()
    done = {r["source"] for r in results(td)}
    waiting = [p.name for p in (td / "inbox").iterdir()]
    assert list((td / "processing").iterdir()) == []
    assert done | {n.split("-", 2)[-1].replace(".job", ".wav") for n in waiting} >= {"long.wav"}
    assert "long.wav" in done  # the job in hand finished within shutdown_timeout


def test_model_that_cannot_load_stops_the_pool(tmp_path, tiny_models):
    bad = tmp_path / "broken-asr"
    bad.mkdir()
    (bad / "config.yaml").write_text("model: NoSuchModelClass\n")
    data = json.loads(pool_config(tmp_path, tiny_models).read_text())
    data["funasr"]["model"] = str(bad)
    cfg = write_config(tmp_path / "config.json", data)
    started = time.time()
    srv = Server(cfg)
    try:
        code = srv.proc.wait(BOOT)
    finally:
        srv.kill_group()
    out = srv.output()
    assert code == 3 and time.time() - started < BOOT
    assert "could not boot" in out and "broken-asr" in out and "model.pt missing" in out
    assert out.count("spawned") == 2  # the two first workers, no respawn loop


def test_sighup_reloads_config_and_replaces_workers(tmp_path, tiny_models):
    cfg = pool_config(tmp_path, tiny_models)
    td = tmp_path / "tasks"
    srv = Server(cfg, workers=1)
    try:
        wait_until(lambda: ready_workers(td, 1), BOOT, "worker ready")
        old_pid = workers_status(td)["w1"]["pid"]
        data = json.loads(cfg.read_text())
        data["output"]["formats"] = ["json", "vtt"]
        cfg.write_text(json.dumps(data))
        srv.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: workers_status(td)["w1"]["pid"] != old_pid and ready_workers(td, 1), BOOT,
                   "the worker replaced")
        drop_file(AUDIO / "tts_1speaker_5s.wav", td / "inbox")
        wait_until(lambda: results(td), 60, "a result")
        assert srv.terminate() == 0
    finally:
        srv.kill_group()
    assert list((td / "done").glob("*.vtt")) and not list((td / "done").glob("*.srt"))
    assert "config reloaded" in srv.output()
