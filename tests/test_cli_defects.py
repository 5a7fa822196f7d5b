"""Issue 14, "defects to fix": the CLI driven as a user would (subprocess `python -m transcribe ...`,
or `cli.main([...])` for argument parsing), on the real FunASR fixture models where a model is needed.
Each test names the defect number it covers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import pytest

from tests.conftest import REPO, model_config, shared_audio, write_config
from tests.support.pool_helpers import Server, wait_until
from transcribe import cli
from transcribe.core import errors


def cli_run(*args, cwd=None, env=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "transcribe", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, **(env or {})})


def parse_error(capsys, *argv) -> str:
    """`cli.main(argv)` must stop in argument parsing with exit 2; returns stderr."""
    with pytest.raises(SystemExit) as stop:
        cli.main(list(argv))
    assert stop.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def config_file(tmp_path, tiny_models):
    data = model_config(tiny_models)
    data["pool"] = {"task_dir": str(tmp_path / "tasks")}
    return write_config(tmp_path / "config.json", data)


# ------------------------------------------------------------------ one real run covers 1, 2, 3, 10, 13, 14
def test_run_names_outputs_apart_accepts_config_after_the_command_and_reports_progress(config_file, tmp_path):
    src = shared_audio("tts_1speaker_5s.wav")
    for d in ("d1", "d2"):
        (tmp_path / d).mkdir()
        shutil.copy(src, tmp_path / d / "call.wav")
    # --config after the command (2); --hotwords WORDS then a file: the file is not swallowed (3);
    # FORCE_COLOR makes rich draw its live progress on a pipe, as on a terminal (13).
    out = cli_run("run", "--config", config_file, "--log-level", "WARNING", "--hotwords", "alpha,beta",
                  "d1/call.wav", "d2/call.wav", "-o", "out", "--json", cwd=tmp_path, env={"FORCE_COLOR": "1"})
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    outputs = sorted(Path(o).name for row in summary["files"] for o in row["outputs"])
    assert outputs == ["d1_call.wav.json", "d1_call.wav.txt", "d2_call.wav.json", "d2_call.wav.txt"]  # (1)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == outputs
    # (3) the fixture's plain Paraformer cannot use hotwords: said once, for two files
    assert out.stderr.count("hotwords ignored") == 1 and "Paraformer" in out.stderr
    # (13) per-file progress with FunASR's stage and, for the second file, an ETA from the first file's RTF
    assert "[1/2] call.wav" in out.stderr and "[2/2] call.wav" in out.stderr
    assert re.search(r"(vad|asr|punc|spk)\s+~\d+s left", out.stderr), out.stderr[-2000:]
    # (10) no false ffmpeg notice, no FunASR INFO lines; (14) no logs/ folder in the current directory
    assert "ffmpeg is not installed" not in out.stderr and "download models from model hub" not in out.stderr
    assert not (tmp_path / "logs").exists()


def test_inputs_sharing_a_stem_or_a_name_get_distinct_outputs(tmp_path):
    from transcribe.core.run_files import output_stems

    files = [Path("real.mp3"), Path("real.m4a"), Path("d1/call.wav"), Path("d2/call.wav"), Path("solo.wav"),
             Path("Solo.flac")]
    stems = output_stems(files)
    assert stems == {Path("real.mp3"): "real.mp3", Path("real.m4a"): "real.m4a", Path("d1/call.wav"): "d1_call.wav",
                     Path("d2/call.wav"): "d2_call.wav", Path("solo.wav"): "solo.wav", Path("Solo.flac"): "Solo.flac"}
    assert len({s.casefold() for s in stems.values()}) == len(files)


def test_names_that_cannot_be_told_apart_are_refused_before_any_work(tmp_path):
    from transcribe.core.run_files import output_stems

    with pytest.raises(errors.ConfigError, match="same outputs"):
        output_stems([Path("p_q/r/n.wav"), Path("p/q_r/n.wav")])


def test_progress_without_a_terminal_is_one_line_per_file_with_an_eta():
    from rich.console import Console

    from transcribe.core.run_files import RunProgress

    buf = StringIO()
    with RunProgress(Console(file=buf, width=80), 2, 100) as progress:
        progress.start_file(1, Path("a.wav"))
        progress.decoded(1, Path("a.wav"), 10.0)
        progress.end_file(50, 10.0, 2.0)  # RTF 0.2
        progress.start_file(2, Path("b.wav"))
        progress.decoded(2, Path("b.wav"), 30.0)
        progress.end_file(50, 30.0, 6.0)
    lines = buf.getvalue().splitlines()
    assert lines == ["[1/2] a.wav: 10.0s of audio", "[2/2] b.wav: 30.0s of audio, ETA ~6s at RTF 0.200"]


# ------------------------------------------------------------------ 2: global options in both places
def test_config_and_log_level_are_accepted_after_the_command_and_the_later_wins(tmp_path):
    parser = cli.build_parser()
    args = parser.parse_args(["--config", "a.json", "status", "--config", "b.json"])
    assert args.config == "b.json"
    args = parser.parse_args(["--log-level", "debug", "serve"])
    assert args.config is None and args.log_level == "DEBUG"
    args = parser.parse_args(["serve", "--config", "x.json", "--log-level", "ERROR"])
    assert args.config == "x.json" and args.log_level == "ERROR"


@pytest.mark.parametrize("command", ["run", "serve", "submit", "status", "retry", "models", "doctor", "devices"])
def test_every_command_help_mentions_config_and_log_level(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    assert "--config FILE" in text and "--log-level" in text and "before the command name" in text


# ------------------------------------------------------------------ 3: hotwords
def test_hotwords_take_one_comma_separated_value_or_repeat(capsys):
    args = cli.build_parser().parse_args(["run", "--hotwords", "foo,bar", "--hotword", "baz", "f.wav"])
    assert cli._hotwords(args) == ["foo", "bar", "baz"] and args.files == [Path("f.wav")]
    args = cli.build_parser().parse_args(["run", "--hotwords", "foo", "bar", "f.wav"])
    assert args.files == [Path("bar"), Path("f.wav")]  # the second word is a file, as the usage says
    assert "ONE comma-separated" in cli.build_parser()._subparsers._group_actions[0].choices["run"].format_help()


def test_only_seaco_paraformer_accepts_hotwords(transcriber, tiny_models, tmp_path):
    from tests.conftest import CACHE
    from tests.support.model_factory import build_all, cache_key
    from transcribe.config import config_from_dict
    from transcribe.core.engine.funasr_transcriber import Transcriber

    assert transcriber.accepts_hotwords is False  # the fixture's plain Paraformer: run warns (test above)
    seaco = build_all(CACHE / "test-models" / cache_key("tiny", "SeacoParaformer"), "tiny", "SeacoParaformer",
                      only=("asr",))["asr"]
    cfg = config_from_dict(model_config(tiny_models, model=str(seaco), spk_model=None, punc_model=None), tmp_path)
    assert Transcriber(cfg).accepts_hotwords is True


# ------------------------------------------------------------------ 4: speakers
@pytest.mark.parametrize("value, words", [("0", "leave it out for automatic detection"), ("-1", "give 1 to 64"),
                                          ("100", "give 1 to 64"), ("two", "not a whole number")])
@pytest.mark.parametrize("command", ["run", "submit"])
def test_speakers_is_range_checked_by_the_flag(command, value, words, capsys):
    err = parse_error(capsys, command, "--speakers", value, "f.wav")
    assert "argument --speakers: " in err and words in err
    assert "pydantic" not in err and "validation error" not in err.lower()


def test_sidecar_speakers_zero_and_misspelt_key_say_what_to_do():
    from transcribe.core.pool.jobs import parse_options

    with pytest.raises(errors.SidecarError, match="leave it out for automatic detection"):
        parse_options(b'{"speakers": 0}', 1000)
    with pytest.raises(errors.SidecarError, match="speaker: unknown key \\(did you mean 'speakers'\\?\\)"):
        parse_options(b'{"speaker": 2}', 1000)


def test_speakers_without_a_speaker_model_is_an_error_before_loading(tmp_path, tiny_models):
    cfg = write_config(tmp_path / "c.json", model_config(tiny_models, spk_model=None))
    out = cli_run("run", "--config", cfg, "--speakers", "2", shared_audio("tts_1speaker_5s.wav"), "-o", tmp_path)
    assert out.returncode == 2 and "--speakers needs a speaker model" in out.stderr
    assert "Traceback" not in out.stderr and not list(tmp_path.glob("*.txt"))


def test_more_speakers_than_the_audio_holds_is_a_user_error(transcriber):
    with pytest.raises(errors.SpeakerCountError, match="cannot split into 64 speakers") as e:
        transcriber.transcribe(shared_audio("espeak_zh_en_30s.wav"), speakers=64)
    assert e.value.retryable is False and e.value.reason == "speakers_invalid"


# ------------------------------------------------------------------ 5: inputs before models
def test_a_mistyped_path_costs_no_model_load(tmp_path):
    # The default config names hub aliases (paraformer-zh...); with no network and an empty cache a
    # model load would fail with a model-hub error. The input check must come first.
    # the path as a user types it (relative): an absolute one under a long temp dir wraps in the 80-column report
    out = cli_run("run", "no-such-file.wav", "-o", tmp_path, cwd=tmp_path,
                  env={"MODELSCOPE_CACHE": str(tmp_path / "empty-cache")}, timeout=60)
    assert out.returncode == 1
    assert "audio file not found" in out.stderr and "no-such-file.wav" in out.stderr
    assert "model" not in out.stderr.lower().replace("no-such", "")  # no hub / model error at all


def test_a_folder_or_unreadable_file_is_refused_before_loading(tmp_path, tiny_models):
    from transcribe.config import config_from_dict
    from transcribe.core.run_files import check_input

    cfg = config_from_dict(model_config(tiny_models), tmp_path)
    (tmp_path / "folder.wav").mkdir()
    with pytest.raises(errors.AudioNotFoundError, match="not a regular file"):
        check_input(tmp_path / "folder.wav", cfg)
    locked = tmp_path / "locked.wav"
    shutil.copy(shared_audio("tts_1speaker_5s.wav"), locked)
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as root: permissions do not stop reading")
        with pytest.raises(errors.AudioNotFoundError, match="cannot read"):
            check_input(locked, cfg)
    finally:
        locked.chmod(0o644)


# ------------------------------------------------------------------ 6 and 11: flag and config errors
def test_serve_workers_two_is_a_clean_flag_error(capsys):
    err = parse_error(capsys, "serve", "--workers", "two")
    assert "argument --workers: 'two' is not a worker count" in err and "Traceback" not in err


def test_run_device_gpu_blames_the_flag_not_the_config(capsys, tmp_path):
    err = parse_error(capsys, "run", "--device", "gpu", "f.wav")
    assert "argument --device: 'gpu' is not a device" in err and "invalid configuration" not in err


@pytest.mark.parametrize("data, expected", [
    ({"pool": {"workers": "many"}}, "pool.workers: 'many' is not a worker count"),
    ({"pool": {"workers": 0}}, "pool.workers: 0 is not a worker count"),
    ({"funasr": {"device_priority": ["gpu"]}}, "funasr.device_priority[0]: 'gpu' is not valid: expected"),
    ({"pool": {"wokers": 2}}, "pool.wokers: unknown key (did you mean 'workers'?)"),
])
def test_config_errors_are_one_line_without_pydantic_internals(tmp_path, data, expected):
    cfg = write_config(tmp_path / "config.json", data)
    out = cli_run("status", "--config", cfg, timeout=60)
    assert out.returncode == 2 and expected in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "literal[" not in out.stderr and "Traceback" not in out.stderr and "pydantic" not in out.stderr


def test_a_bad_environment_override_is_named_by_its_variable(tmp_path):
    cfg = write_config(tmp_path / "config.json", {})
    out = cli_run("status", "--config", cfg, env={"TRANSCRIBE__FUNASR__DEVICE": "gpu"}, timeout=60)
    assert out.returncode == 2
    assert "TRANSCRIBE__FUNASR__DEVICE: 'gpu' is not a device" in out.stderr and "funasr.device" not in out.stderr


# ------------------------------------------------------------------ 7: task dir typos, submit --wait
def test_status_and_retry_on_a_missing_task_dir_exit_2_and_create_nothing(tmp_path):
    out = cli_run("status", "--task-dir", tmp_path / "no" / "such", cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and "does not exist" in out.stderr and "--task-dir" in out.stderr
    out = cli_run("retry", "--all", "--task-dir", tmp_path / "typo", cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and "does not exist" in out.stderr
    assert not (tmp_path / "typo").exists() and not (tmp_path / "no").exists()


def test_submit_wait_without_a_server_says_so(tmp_path):
    out = cli_run("submit", shared_audio("tts_1speaker_5s.wav"), "--task-dir", tmp_path / "tasks", "--wait",
                  "--timeout", "1", cwd=tmp_path, timeout=60)
    assert out.returncode == 1
    assert "no server is serving" in out.stderr and "transcribe serve --task-dir" in out.stderr
    assert "timed out" in out.stderr and out.stderr.count("no server is serving") == 1


def test_submit_wait_reports_a_failed_job_whose_error_json_is_unreadable(tmp_path, capsys):
    """A truncated or hand-edited error.json must not end `submit --wait` in a traceback."""
    from transcribe.core.pool.task_dir import TaskDir

    td = TaskDir(tmp_path / "tasks").ensure()
    for job_id, content in (("j-trunc", '{"reason": "audio_undec'), ("j-list", "[1, 2]"), ("j-bytes", b"\xff\xfe")):
        (td.failed / job_id).mkdir()
        path = td.failed / job_id / "error.json"
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    (td.failed / "j-ok").mkdir()
    (td.failed / "j-ok" / "error.json").write_text('{"reason": "audio_undecodable", "message": "not audio"}')
    assert cli._wait_for(td, ["j-trunc", "j-list", "j-bytes", "j-ok"], timeout=5) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [f"failed {j}: unknown: no readable error.json in {td.failed / j}"
                       for j in ("j-trunc", "j-list", "j-bytes")]
    assert out[3] == "failed j-ok: audio_undecodable: not audio"


# ------------------------------------------------------------------ 8: status
def test_status_sees_a_lock_mode_server_and_hides_gone_workers(tmp_path, tiny_models):
    data = model_config(tiny_models)
    data["pool"] = {"task_dir": "tasks", "heartbeat_interval": 0.5, "settle_seconds": 0.2}
    cfg = write_config(tmp_path / "config.json", data)
    tasks = tmp_path / "tasks"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    srv = Server(cfg, mode="lock")
    try:
        wait_until(lambda: json.loads((tasks / "workers" / "lock.json").read_text()).get("state") == "ready"
                   if (tasks / "workers" / "lock.json").exists() else False, 120, "lock mode ready")
        # a worker of an earlier server, long gone
        (tasks / "workers" / "w9.json").write_text(json.dumps({"worker_id": "w9", "pid": dead.pid, "state": "exited"}))
        info = json.loads(cli_run("status", "--config", cfg, "--json", timeout=60).stdout)
        assert info["server"]["alive"] is True and info["server"]["mode"] == "lock"
        assert info["server"]["pid"] == srv.proc.pid
        assert [w["worker_id"] for w in info["workers"]] == ["lock"] and info["workers_gone_hidden"] == 1
        shown = json.loads(cli_run("status", "--config", cfg, "--json", "--all", timeout=60).stdout)
        assert sorted(w["worker_id"] for w in shown["workers"]) == ["lock", "w9"]
        text = cli_run("status", "--config", cfg, env={"COLUMNS": "80"}, timeout=60).stdout
        assert f"server running (lock mode, pid {srv.proc.pid})" in text
        assert "1 worker no longer running not shown (--all shows them)" in text
        assert "requeued attempts not counted" in " ".join(text.split())  # what done/failed per worker count
    finally:
        assert srv.terminate() == 0
    info = json.loads(cli_run("status", "--config", cfg, "--json", timeout=60).stdout)
    assert info["server"]["alive"] is False


def test_status_table_is_readable_at_80_columns(tmp_path):
    tasks = tmp_path / "tasks"
    (tasks / "workers").mkdir(parents=True)
    job = "20261123T190812123-1f3a9c2b-podcast_2speakers_60s"
    (tasks / "workers" / "w1.json").write_text(json.dumps({
        "worker_id": "w1", "pid": os.getpid(), "device": "cuda:0", "state": "busy", "job": job,
        "job_started_ts": time.time() - 12, "job_stage": "asr", "jobs_done": 3, "mean_rtf": 0.01234,
        "rss_mb": 2345.6}))
    out = cli_run("status", "--task-dir", tasks, env={"COLUMNS": "80"}, cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "…" not in out.stdout and max(map(len, out.stdout.splitlines())) <= 80
    assert "podcast_2speakers" in out.stdout.replace("\n", "").replace("│", "").replace(" ", "")


# ------------------------------------------------------------------ 9: model folders
def test_doctor_and_run_name_the_model_role_and_the_missing_file(tmp_path, tiny_models):
    broken = tmp_path / "asr-copy"
    shutil.copytree(tiny_models["asr"], broken)
    (broken / "model.pt").unlink()
    data = model_config(tiny_models, model=str(broken))
    data["pool"] = {"task_dir": "tasks"}
    cfg = write_config(tmp_path / "config.json", data)
    doctor = cli_run("doctor", "--config", cfg, cwd=tmp_path, env={"COLUMNS": "80"}, timeout=120)
    assert doctor.returncode == 1 and "…" not in doctor.stdout
    report = json.loads(cli_run("doctor", "--json", "--config", cfg, cwd=tmp_path, timeout=120).stdout)
    assert not report["ok"]
    assert any(p.startswith("model asr:") and f"asr model at {broken}: model.pt missing" in p
               for p in report["problems"]), report["problems"]
    assert not (tmp_path / "tasks").exists() and not (tmp_path / "logs").exists()  # (14) doctor creates nothing
    run = cli_run("run", "--config", cfg, shared_audio("tts_1speaker_5s.wav"), "-o", tmp_path / "out", cwd=tmp_path)
    assert run.returncode == 1 and f"asr model at {broken}: model.pt missing" in run.stderr
    assert "init_param" not in run.stderr and "Traceback" not in run.stderr


def test_missing_tokens_and_cmvn_are_named_for_a_config_yaml_folder(tmp_path, tiny_models):
    from transcribe.core.engine.model_store import missing_model_files

    folder = tmp_path / "asr"
    shutil.copytree(tiny_models["asr"], folder)
    assert missing_model_files(folder) == []
    for name in ("configuration.json", "tokens.json", "am.mvn"):
        (folder / name).unlink()
    assert missing_model_files(folder) == ["tokens.json (or tokens.txt)", "am.mvn"]


# ------------------------------------------------------------------ 10: log noise
def test_python_api_and_devices_print_no_funasr_noise(tiny_models, tmp_path):
    # An application that logs at INFO itself (root logger) must still not get FunASR's build chatter.
    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            f"from transcribe.config import config_from_dict\n"
            f"from transcribe.core.engine.funasr_transcriber import Transcriber\n"
            f"Transcriber(config_from_dict({model_config(tiny_models)!r}, {str(tmp_path)!r}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert out.returncode == 0, out.stderr
    for noise in ("download models from model hub", "Loading pretrained params", "ffmpeg is not installed",
                  "INFO:root", "funasr said", "funasr version", "trust_remote_code"):
        assert noise not in out.stderr + out.stdout
    devices = cli_run("devices", cwd=tmp_path, timeout=120)
    assert devices.returncode == 0 and devices.stderr == "" and json.loads(devices.stdout)["available"]


# ------------------------------------------------------------------ 14: smaller ones
def test_job_log_says_1_speaker_and_retry_keeps_the_error_under_a_readable_time(transcriber, tmp_path):
    from loguru import logger

    from transcribe.config import config_from_dict
    from transcribe.core.pool.job_runner import run_job
    from transcribe.core.pool.task_dir import TaskDir

    cfg = config_from_dict({"pool": {"task_dir": str(tmp_path / "tasks")}}, tmp_path)
    td = TaskDir.from_config(cfg).ensure()
    td.submit(shared_audio("tts_1speaker_5s.wav"))
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="INFO")
    try:
        job = td.claim_next("w1")
        assert run_job(td, job, transcriber.transcribe, cfg, "w1")[0] == "done"
    finally:
        logger.remove(sink)
    assert any(re.search(r", 1 speaker -> ", m) for m in messages), messages

    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    job_id = td.submit(bad)
    job = td.claim_next("w1")
    assert run_job(td, job, transcriber.transcribe, cfg, "w1")[0] == "failed"
    td.retry(job_id)
    kept = [p.name for p in (td.inbox / f"{job_id}.job").iterdir() if p.name.startswith(".error-")]
    assert len(kept) == 1 and re.fullmatch(r"\.error-\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d\.\d{3}Z\.json", kept[0])


def test_lock_mode_doc_example_runs_on_silence(tiny_models, tmp_path):
    import soundfile as sf

    text = (REPO / "docs" / "lock-mode.md").read_text()
    example = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    assert "segments[0]" not in example
    silence = shared_audio("silence_5s.wav")
    data, rate = sf.read(silence)
    sf.write(tmp_path / "call.flac", data, rate)
    write_config(tmp_path / "config.json", model_config(tiny_models))
    shutil.copy(silence, tmp_path / "meeting.wav")
    (tmp_path / "example.py").write_text(example)
    out = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "(no speech) []"


def test_run_summary_is_readable_at_80_columns():
    from rich.console import Console

    from transcribe.core.run_files import _summary

    rows = [{"file": "recordings/2026-11-23/podcast_2speakers_60s.wav", "ok": True, "duration": 60.0, "speakers": 2,
             "rtf": 0.0512, "outputs": ["out/podcast_2speakers_60s.json", "out/podcast_2speakers_60s.srt"]},
            {"file": "recordings/2026-11-23/broken_recording_from_the_field.wav", "ok": False,
             "reason": "audio_undecodable", "error": "'broken_recording_from_the_field.wav' is not a readable audio "
                                                     "file (Format not recognised)"}]
    buf = StringIO()
    Console(file=buf, width=80).print(_summary(rows))
    text = buf.getvalue()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    flat = "".join(text.split()).replace("│", "")
    assert "podcast_2speakers_60s.json" in flat and "audio_undecodable" in flat


def test_names_with_brackets_are_shown_as_they_are(tmp_path):
    """A file or job name such as "[draft].wav" is data, not rich markup (dropped, or a MarkupError)."""
    from rich.console import Console

    from transcribe.core.run_files import RunProgress, _summary

    buf = StringIO()
    console = Console(file=buf, width=80)
    rows = [{"file": "[draft] [/].wav", "ok": False, "reason": "audio_undecodable", "error": "'[/]' is bad"}]
    console.print(_summary(rows))
    with RunProgress(console, 1, 1) as progress:
        progress.start_file(1, Path("[draft].wav"))
        progress.decoded(1, Path("[draft].wav"), 1.0)
        progress.end_file(1, 1.0, 0.1)
    text = buf.getvalue()
    assert "[draft]" in text and "[/]" in text and "[1/1] [draft].wav: 1.0s of audio" in text
    tasks = tmp_path / "tasks"
    (tasks / "workers").mkdir(parents=True)
    (tasks / "workers" / "w1.json").write_text(json.dumps({"worker_id": "[/]", "pid": os.getpid(), "state": "ready",
                                                           "device": "[bold]cpu"}))
    out = cli_run("status", "--task-dir", tasks, cwd=tmp_path, timeout=60)
    flat = "".join(out.stdout.split())
    assert out.returncode == 0 and "[/]" in flat and "[bold]cpu" in flat, out.stderr


def test_an_output_dir_or_task_dir_that_is_a_file_is_one_clear_line(tmp_path, config_file):
    (tmp_path / "afile").write_text("x")
    src = shared_audio("tts_1speaker_5s.wav")
    out = cli_run("run", "--config", config_file, src, "-o", tmp_path / "afile", timeout=60)
    assert out.returncode == 2 and "--output-dir" in out.stderr and "is not a folder" in out.stderr
    out = cli_run("submit", src, "--task-dir", tmp_path / "afile" / "tasks", timeout=60)
    assert out.returncode == 1 and "Not a directory" in out.stderr and "Traceback" not in out.stderr


def test_a_failure_line_keeps_a_long_path_whole_however_narrow_the_console(tmp_path):
    """Users copy the path out of the report: rich must not wrap it (nor read `[...]` in a name as markup)."""
    import io

    from rich.console import Console

    from transcribe.core.run_files import _print_failure

    path = tmp_path / ("a-rather-long-folder-name-" * 4) / "take [2] of the meeting.wav"
    buffer = io.StringIO()
    _print_failure(Console(file=buffer, width=40), path, "audio file not found")
    assert buffer.getvalue() == f"failed {path}: audio file not found\n"
