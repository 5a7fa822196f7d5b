"""Every bad input ends as a correct result or in failed/ with a reason; workers live on; nothing escapes.

One pool run takes the whole catalogue (dropped the careless way, straight into inbox/).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import needs_shared, shared_audio
from tests.support.pool_helpers import (
    Server,
    failed,
    ready_workers,
    results,
    wait_until,
    workers_status,
)

pytestmark = needs_shared
SRC = Path(__file__).resolve().parents[2] / "src"


def catalogue(inbox: Path, outside: Path) -> tuple[dict[str, str], list[str]]:
    """Write the bad inputs; returns {name: expected failure reason} and the names that must succeed."""
    tts, _ = sf.read(shared_audio("tts_1speaker_5s.wav"), dtype="float32")
    expect_fail: dict[str, str] = {}
    expect_ok: list[str] = []

    def put(name, data, reason=None):
        (inbox / name).write_bytes(data)
        (expect_ok.append(name) if reason is None else expect_fail.__setitem__(name, reason))

    wav = shared_audio("tts_1speaker_5s.wav").read_bytes()
    put("zero.wav", b"", "audio_empty")
    put("truncated-header.wav", wav[:30], "audio_undecodable")
    put("random.wav", np.random.default_rng(0).bytes(50_000), "audio_undecodable")
    put("text.mp3", b"these are notes\n" * 100, "audio_undecodable")
    put("notes", wav, "audio_unsupported_format")  # no extension
    sf.write(inbox / "no-samples.wav", np.zeros(0, dtype=np.float32), 16000)
    expect_fail["no-samples.wav"] = "audio_empty"
    sf.write(inbox / "8k-stereo-24bit.wav", np.stack([tts[::2], tts[::2]], 1), 8000, subtype="PCM_24")
    sf.write(inbox / "float32.wav", tts, 16000, subtype="FLOAT")
    sf.write(inbox / "tenth-second.wav", tts[:1600], 16000)
    expect_ok += ["8k-stereo-24bit.wav", "float32.wav", "tenth-second.wav"]
    put("silence.wav", shared_audio("silence_5s.wav").read_bytes())
    for name in ("with spaces.wav", "ünïcödé 会议.wav", "new\nline.wav", "-leading-dash.wav", "n" * 246 + ".wav"):
        put(name, wav)
    # names that can never be processed: failed with a reason, bytes intact (keys: as error.json prints them)
    (inbox / os.fsdecode(b"caf\xe9 latin-1.wav")).write_bytes(wav)
    expect_fail["caf\ufffd latin-1.wav"] = "name_invalid"
    put("l" * 247 + ".wav", wav, "name_too_long")
    for name, side in (("bad-json.wav", b"{speakers: 2"), ("huge-sidecar.wav", b'{"hotwords": ["' + b"x" * 70_000 + b'"]}'),
                       ("unknown-key.wav", b'{"speakers": 2, "output_name": "../../escaped"}'),
                       ("wrong-type.wav", b'{"speakers": "two"}'),
                       ("traversal.wav", b'{"formats": ["../../../tmp/x"]}')):
        put(name, wav, "sidecar_invalid")
        (inbox / f"{name}.json").write_bytes(side)
    secret = outside / "secret.wav"
    secret.write_bytes(wav)
    os.symlink("/etc/passwd", inbox / "passwd.wav")
    os.symlink(secret, inbox / "outside-link.wav")
    os.link(secret, inbox / "hardlink.wav")
    os.mkfifo(inbox / "fifo.wav")
    expect_fail.update({"passwd.wav": "symlink_refused", "outside-link.wav": "symlink_refused",
                        "hardlink.wav": "hardlink_refused", "fifo.wav": "not_regular_file"})
    return expect_fail, expect_ok


def test_bad_inputs_in_a_running_pool(pool_cfg, tmp_path):
    cfg_path, task_dir = pool_cfg(workers=2)
    srv = Server(cfg_path, workers=2)
    outside = tmp_path / "outside"
    outside.mkdir()
    before = {p.name for p in tmp_path.iterdir()}
    try:
        wait_until(lambda: ready_workers(task_dir, 2), 120, "workers ready")
        pids = {w["pid"] for w in workers_status(task_dir).values()}
        expect_fail, expect_ok = catalogue(task_dir / "inbox", outside)
        total = len(expect_fail) + len(expect_ok)
        wait_until(lambda: len(results(task_dir)) + len(failed(task_dir)) >= total, 180, "all inputs settled")
        # the next ordinary job after all that is fine
        (task_dir / "inbox" / "after.wav").write_bytes(shared_audio("tts_1speaker_5s.wav").read_bytes())
        wait_until(lambda: any(r["source"] == "after.wav" for r in results(task_dir)), 60, "the next job")
        assert {w["pid"] for w in workers_status(task_dir).values()} == pids  # no worker died
        assert srv.terminate() == 0
    finally:
        srv.kill_group()
    got_fail = {e["original_name"]: e["reason"] for e in failed(task_dir).values()}
    assert got_fail == expect_fail
    for e in failed(task_dir).values():
        assert e["message"] and "Traceback" not in e["message"]
        assert e["error_type"] and not e["error_type"].startswith("_")  # public names only
    by_source = {r["source"]: r for r in results(task_dir)}
    assert set(by_source) == set(expect_ok) | {"after.wav"}
    assert by_source["silence.wav"]["segments"] == []
    assert by_source["8k-stereo-24bit.wav"]["duration"] == pytest.approx(6.44, abs=0.05)
    assert by_source["tenth-second.wav"]["duration"] == pytest.approx(0.1, abs=0.01)
    assert list((task_dir / "inbox").iterdir()) == [] and list((task_dir / "processing").iterdir()) == []
    # nothing was written outside the task dir and the logs; the symlink targets are untouched
    new = {p.name for p in tmp_path.iterdir()} - before
    assert {n for n in new if not n.startswith("serve-")} <= {"logs", "tasks"}, new
    assert sorted(p.name for p in outside.iterdir()) == ["secret.wav"] and (outside / "secret.wav").stat().st_nlink == 2
    for p in (task_dir / "done").rglob("*"):
        assert not p.is_symlink() and p.resolve().is_relative_to(task_dir.resolve())


def test_no_pickle_eval_or_shell_in_the_code():
    code = "\n".join(p.read_text() for p in SRC.rglob("*.py"))
    for pattern in (r"^\s*import pickle", r"^\s*from pickle", r"\beval\(", r"\bexec\(", r"shell\s*=\s*True",
                    r"os\.system\(", r"os\.popen\(", r"yaml\.load\((?!.*Loader)", r"torch\.load\("):
        assert not re.search(pattern, code, re.MULTILINE), pattern


def test_status_executes_nothing_from_the_task_dir(pool_cfg, tmp_path):
    """A hostile status file is data: status reads it and prints, and runs nothing."""
    cfg_path, task_dir = pool_cfg()
    (task_dir / "workers").mkdir(parents=True)
    marker = tmp_path / "pwned"
    (task_dir / "workers" / "evil.json").write_text(json.dumps(
        {"worker_id": f"$(touch {marker})", "pid": 1, "state": "__import__('os').system('touch x')",
         "job": "`touch y`"}))
    out = subprocess.run([sys.executable, "-m", "transcribe", "--config", str(cfg_path), "status"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0 and not marker.exists() and not (tmp_path / "x").exists()
