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
    archived_record,
    assert_exactly_once,
    drop_file,
    failed,
    ready_workers,
    results,
    tile_audio,
    wait_until,
    workers_status,
)
from transcribe.core.pool.heartbeat import pid_alive

pytestmark = needs_shared
BOOT = 120  # seconds: importing FunASR in two workers at once on 2 cores


def pool_config(tmp_path, tiny_models, **pool):
    data = model_config(tiny_models)
    # settle 0.5 s: every file here is written in one call (drop_file), and the one test of a file still being
    # written holds its mtime in the future, so no test depends on a longer settle; each drop waits less
    data["pool"] = {"task_dir": "tasks", "settle_seconds": 0.5, "heartbeat_interval": 0.5, "heartbeat_timeout": 30,
                    "shutdown_timeout": 30, **pool}
    data["output"] = {"formats": ["json", "txt", "srt"]}
    return write_config(tmp_path / "config.json", data)


@pytest.fixture(scope="module", params=["pool", "lock"])
def server(request, tiny_models, tmp_path_factory):
    """A running server (pool with 2 workers, or lock mode) shared by the module's tests (booting one costs
    a minute). Each test drops files under names of its own and asserts only on those (`mine`), so the
    tests do not depend on each other or on their order."""
    tmp = tmp_path_factory.mktemp(request.param)
    cfg = pool_config(tmp, tiny_models)
    srv = Server(cfg, mode=request.param)
    srv.task_dir = tmp / "tasks"
    srv.mode = request.param
    wait_until(lambda: ready_workers(srv.task_dir, 2 if request.param == "pool" else 1), BOOT, "workers ready")
    yield srv
    code = srv.terminate()
    assert code == 0, srv.output()[-3000:]


def mine(td, names):
    """(results, failures) of the jobs whose source is one of `names`."""
    names = set(names)
    return ([r for r in results(td) if r["source"] in names],
            {e["original_name"]: e for e in failed(td).values() if e["original_name"] in names})


def test_processes_dropped_files(server):
    td = server.task_dir
    names = {"podcast_2speakers_60s.wav": None, "silence_5s.wav": None, "tts_1speaker_5s.wav": None,
             "espeak_zh_en_30s.wav": None}
    (td / "inbox" / "podcast_2speakers_60s.wav.json").write_text('{"speakers": 2}')  # sidecar first
    for n in names:
        drop_file(AUDIO / n, td / "inbox")
    drop_file(AUDIO / "tts_1speaker_5s.wav", td / "inbox", "会议 记录 1.wav")
    drop_file(AUDIO / "podcast_2speakers_60s.wav", td / "inbox", "-leading dash.wav")
    expected = [*names, "会议 记录 1.wav", "-leading dash.wav"]
    wait_until(lambda: len(mine(td, expected)[0]) >= 6, 120, "6 results")
    done, bad = mine(td, expected)
    assert sorted(r["source"] for r in done) == sorted(expected) and bad == {}
    by_source = {r["source"]: r for r in done}
    podcast = by_source["podcast_2speakers_60s.wav"]
    assert podcast["speakers"] == ["Speaker1", "Speaker2"] and podcast["segments"]
    assert all(s["speaker"] in podcast["speakers"] for s in podcast["segments"])
    assert by_source["silence_5s.wav"]["segments"] == [] and by_source["silence_5s.wav"]["text"] == ""
    for r in done:
        for s in r["segments"]:
            assert 0 <= s["start"] <= s["end"] <= r["duration"]
    some = next(td.joinpath("done").glob("*podcast*.json")).stem
    assert (td / "done" / f"{some}.srt").read_text().startswith("1\n00:00:")


def test_a_file_being_written_is_claimed_only_when_complete(server, tmp_path):
    """A writer that is still writing keeps the mtime moving; here it is held in the future, so no amount of
    scheduling delay can make it look settled. A later file being transcribed proves the pool scanned it."""
    td = server.task_dir
    data = (AUDIO / "espeak_zh_en_30s.wav").read_bytes()
    target = td / "inbox" / "slow.wav"
    target.write_bytes(data[: len(data) // 3])
    os.utime(target, (time.time() + 3600,) * 2)  # "still being written"
    drop_file(AUDIO / "tts_1speaker_5s.wav", td / "inbox", "after-slow.wav")
    wait_until(lambda: mine(td, ["after-slow.wav"])[0], 60, "the later file's result")
    assert target.exists() and not mine(td, ["slow.wav"])[0]  # scanned, and left alone
    with open(target, "ab") as f:
        f.write(data[len(data) // 3:])  # the writer finishes: the mtime is now, then settles
    wait_until(lambda: mine(td, ["slow.wav"])[0], 60, "slow.wav result")
    [r] = mine(td, ["slow.wav"])[0]
    assert r["duration"] == pytest.approx(30.0, abs=0.1)  # the whole file, not a prefix


def test_corrupt_file_and_bad_sidecar_fail_with_reasons_and_workers_live_on(server):
    td = server.task_dir
    pids_before = {w["pid"] for w in workers_status(td).values()}
    (td / "inbox" / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" * 100)
    (td / "inbox" / "sidecar.wav.json").write_text('{"speakers": "many"')
    drop_file(AUDIO / "tts_1speaker_5s.wav", td / "inbox", "sidecar.wav")
    drop_file(AUDIO / "tts_1speaker_5s.wav", td / "inbox", "after.wav")
    names = ["corrupt.wav", "sidecar.wav", "after.wav"]
    wait_until(lambda: len(mine(td, names)[1]) >= 2 and mine(td, names)[0], 60, "2 failures and the next job done")
    done, bad = mine(td, names)
    assert {n: e["reason"] for n, e in bad.items()} == {"corrupt.wav": "audio_undecodable",
                                                        "sidecar.wav": "sidecar_invalid"}
    assert [r["source"] for r in done] == ["after.wav"]
    for e in bad.values():
        assert e["message"] and e["error_type"] and e["attempts"] == 1 and e["worker"]
        assert not e["error_type"].startswith("_")
    assert {w["pid"] for w in workers_status(td).values()} == pids_before


def test_status_json_reflects_the_running_server(server, tmp_path):
    td = server.task_dir
    drop_file(AUDIO / "tts_1speaker_5s.wav", td / "inbox", "status-probe.wav")
    wait_until(lambda: mine(td, ["status-probe.wav"])[0], 60, "the probe's result")

    def status():
        out = subprocess.run([sys.executable, "-m", "transcribe", "--config", str(td.parent / "config.json"),
                              "status", "--json"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    # two independent sources agree: the folder count, and the workers' own counters of what they finished
    # (a worker counts a job a moment after its commit, when its next heartbeat is written)
    info = wait_until(lambda: (i := status())["counts"]["done"] == sum(w["jobs_done"] for w in i["workers"]) and i,
                      30, "status counts and worker counters to agree")
    assert info["server"]["alive"] and info["counts"]["done"] >= 1
    assert len(info["workers"]) == (2 if server.mode == "pool" else 1)
    assert all(w["device"] == "cpu" and w["state"] in ("ready", "busy") for w in info["workers"])


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
    # the kill lands as soon as the claim shows in status; 3 minutes of audio (seconds of work) is ample
    srv, td, victim = start_with_long_job(tmp_path, tiny_models, 3)
    try:
        os.kill(victim["pid"], signal.SIGKILL)
        wait_until(lambda: results(td), 120, "the requeued job's result")
        assert_exactly_once(td, ["long.wav"])
        [r] = results(td)
        assert r["duration"] == pytest.approx(180, abs=0.1)
        wait_until(lambda: workers_status(td)[victim["worker_id"]]["pid"] != victim["pid"]
                   and ready_workers(td, 2), BOOT, "the worker respawned")
        record = archived_record(td, "long.wav")
        assert record["attempts"] == 2 and record["history"][0]["reason"] == "worker_died"
        assert srv.terminate() == 0
    finally:
        srv.kill_group()


def test_supervisor_and_workers_killed_then_restarted(tmp_path, tiny_models):
    cfg = pool_config(tmp_path, tiny_models)
    td = tmp_path / "tasks"
    srv = Server(cfg)
    tile_audio(shared_audio("podcast_2speakers_60s.wav"), tmp_path / "long.wav", 3)  # killed once seen claimed
    names = ["long.wav", *(f"job{i}.wav" for i in range(5))]
    try:
        wait_until(lambda: ready_workers(td, 2), BOOT, "workers ready")
        drop_file(tmp_path / "long.wav", td / "inbox")
        for n in names[1:]:  # 30 s each: the other worker is mid-job too when the group is killed
            drop_file(AUDIO / "espeak_zh_en_30s.wav", td / "inbox", n)
        wait_until(lambda: any(w.get("job") and "long" in w["job"] for w in workers_status(td).values()), 60,
                   "the long job in progress")
    finally:
        srv.kill_group()  # SIGKILL to the supervisor and every worker at once
    in_flight = [p.name for p in (td / "processing").iterdir()]
    assert any("long" in n for n in in_flight)  # the crash did hit a job in progress
    again = Server(cfg)
    try:
        wait_until(lambda: len(results(td)) + len(failed(td)) >= 6, BOOT + 120, "all jobs settled")
        assert again.terminate() == 0
    finally:
        again.kill_group()
    assert assert_exactly_once(td, names) == {"done": 6, "failed": 0}


def done_lines(log_dir, job_id):
    """How many times a worker logged the job as done (across every worker log of every run)."""
    return sum(p.read_text(errors="replace").count(f"job {job_id} done:") for p in log_dir.glob("worker-*.log"))


def test_supervisor_killed_alone_then_restarted_runs_the_job_once(tmp_path, tiny_models):
    """Reproduction 1 of issue 11: only the supervisor is SIGKILLed mid-job and `serve` starts again. The
    orphaned worker must stop, and the new server must not run the job while the orphan still holds it."""
    srv, td, busy = start_with_long_job(tmp_path, tiny_models, 3)  # the orphan is killed within a second
    job_id = busy["job"]
    orphan = busy["pid"]
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(10)
    again = Server(tmp_path / "config.json")
    try:
        wait_until(lambda: not pid_alive(orphan), 20, "the orphaned worker to exit")
        wait_until(lambda: (td / "done" / f"{job_id}.json").exists(), BOOT + 120, "the job's result")
        wait_until(lambda: len(results(td)) >= 1 and not list((td / "processing").iterdir()), 60, "settled")
        assert again.terminate() == 0
    finally:
        again.kill_group()
        srv.kill_group()
    assert assert_exactly_once(td, ["long.wav"]) == {"done": 1, "failed": 0}
    assert done_lines(tmp_path / "logs", job_id) == 1


def test_undecodable_names_fail_with_a_reason_and_the_pool_keeps_serving(tmp_path, tiny_models):
    """Reproductions 2 and 3 of issue 11: a name that is not UTF-8 and one near the 255-byte limit."""
    cfg = pool_config(tmp_path, tiny_models, settle_seconds=0.5)
    td = tmp_path / "tasks"
    srv = Server(cfg, workers=1)
    bad_names = {os.fsdecode(b"r\xe9union.wav"): "name_invalid", "n" * 247 + ".wav": "name_too_long"}
    try:
        wait_until(lambda: ready_workers(td, 1), BOOT, "worker ready")
        pid = workers_status(td)["w1"]["pid"]
        for name in bad_names:
            drop_file(AUDIO / "tts_1speaker_5s.wav", td / "inbox", name)
        drop_file(AUDIO / "tts_1speaker_5s.wav", td / "inbox", "n" * 246 + ".wav")  # 250 bytes: fine
        drop_file(AUDIO / "tts_1speaker_5s.wav", td / "inbox", "after.wav")
        wait_until(lambda: len(failed(td)) >= 2 and len(results(td)) >= 2, 90, "all four settled")
        assert workers_status(td)["w1"]["pid"] == pid  # the worker never died
        assert srv.terminate() == 0
    finally:
        srv.kill_group()
    reasons = {}
    for d in (td / "failed").iterdir():
        err = json.loads((d / "error.json").read_bytes().decode("utf-8"))
        [audio] = [p for p in d.iterdir() if p.name not in ("error.json", "job.json")]
        assert audio.read_bytes() == (AUDIO / "tts_1speaker_5s.wav").read_bytes()  # bytes intact
        reasons[audio.name] = err["reason"]
    assert reasons == bad_names
    again = Server(cfg, workers=1)  # and it restarts cleanly
    try:
        wait_until(lambda: ready_workers(td, 1) and workers_status(td)["w1"]["pid"] != pid, BOOT, "restarted")
        assert again.terminate() == 0
    finally:
        again.kill_group()
    assert "Traceback" not in srv.output() + again.output()


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
    srv = Server(cfg, workers=1)  # --workers 1 on the command line, 2 in the file: the override must survive
    try:
        wait_until(lambda: ready_workers(td, 1), BOOT, "worker ready")
        old_pid = workers_status(td)["w1"]["pid"]
        data = json.loads(cfg.read_text())
        data["output"]["formats"] = ["json", "vtt"]
        cfg.write_text(json.dumps(data))
        srv.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "w1" not in workers_status(td) and ready_workers(td, 1), BOOT, "the worker replaced")
        assert [w["pid"] != old_pid for w in workers_status(td).values()] == [True]
        drop_file(AUDIO / "tts_1speaker_5s.wav", td / "inbox")
        wait_until(lambda: results(td), 60, "a result")
        assert srv.terminate() == 0
    finally:
        srv.kill_group()
    assert list((td / "done").glob("*.vtt")) and not list((td / "done").glob("*.srt"))
    assert "config reloaded" in srv.output()


def test_three_sighups_during_one_long_job_do_not_fail_or_repeat_it(tmp_path, tiny_models):
    cfg = pool_config(tmp_path, tiny_models, max_attempts=1)
    td = tmp_path / "tasks"
    srv = Server(cfg, workers=1)
    # 5 minutes: the three reloads are logged within a second of the claim; the job lasts many seconds more
    tile_audio(shared_audio("podcast_2speakers_60s.wav"), tmp_path / "long.wav", 5)
    try:
        wait_until(lambda: ready_workers(td, 1), BOOT, "worker ready")
        drop_file(tmp_path / "long.wav", td / "inbox")
        busy = wait_until(lambda: busy_worker(td), 30, "the long job in progress")
        for n in range(1, 4):
            srv.proc.send_signal(signal.SIGHUP)
            wait_until(lambda n=n: srv.output().count("config reloaded") >= n, 30, f"reload {n}")
        assert list((td / "processing").iterdir()), "the job must still be running after the third reload"
        wait_until(lambda: results(td), 600, "the long job's result")
        wait_until(lambda: ready_workers(td, 1), BOOT, "a worker of the last config")
        assert srv.terminate() == 0
    finally:
        srv.kill_group()
    assert assert_exactly_once(td, ["long.wav"]) == {"done": 1, "failed": 0}
    record = json.loads(next((td / "done").glob("*/job.json")).read_text())
    assert record["attempts"] == 1 and record["history"] == []
    assert done_lines(tmp_path / "logs", busy["job"]) == 1
