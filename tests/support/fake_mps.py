"""A stand-in for `nvidia-cuda-mps-control` (no GPU in CI), written into a folder the test puts first on PATH.

``-f`` (the daemon): records its arguments and MPS variables, creates ``<pipe>/control`` and waits until a
client delivers ``quit``, then exits 0. No arguments (a client): reads stdin, records it, and on ``quit``
tells the daemon through ``<pipe>/quit``. Every event is one JSON line in $FAKE_MPS_RECORD, with a time.
$FAKE_MPS_FAIL: the daemon exits 1 at start; $FAKE_MPS_IGNORE_QUIT: the daemon never quits.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

SCRIPT = r'''
import json, os, sys, time

pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
record = os.environ["FAKE_MPS_RECORD"]


def note(**event):
    with open(record, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "t": time.time(), **event}) + "\n")


if sys.argv[1:] == ["-f"]:
    note(event="daemon", argv=sys.argv[1:], pipe=pipe, log=os.environ.get("CUDA_MPS_LOG_DIRECTORY"))
    if os.environ.get("FAKE_MPS_FAIL"):
        print("fake mps: cannot open the GPU", file=sys.stderr)
        sys.exit(1)
    open(os.path.join(pipe, "control"), "w").close()
    flag = os.path.join(pipe, "quit")
    while not os.path.exists(flag) or os.environ.get("FAKE_MPS_IGNORE_QUIT"):
        time.sleep(0.05)
    os.unlink(os.path.join(pipe, "control"))
    note(event="exit")
else:
    text = sys.stdin.read()
    note(event="client", argv=sys.argv[1:], stdin=text, pipe=pipe)
    if text.strip() == "quit":
        open(os.path.join(pipe, "quit"), "w").close()
'''


def install_fake_mps(folder: Path) -> Path:
    """Write the fake `nvidia-cuda-mps-control` into `folder` (run by this interpreter); returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "nvidia-cuda-mps-control"
    exe.write_text(f"#!{sys.executable}\n{SCRIPT}")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def events(record: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting to be reaped counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] != "Z"


def fake_path_env(folder: Path, record: Path, **extra: str) -> dict[str, str]:
    """The environment that puts the fake first on PATH and records into `record`."""
    return {"PATH": f"{folder}{os.pathsep}{os.environ.get('PATH', '')}", "FAKE_MPS_RECORD": str(record), **extra}
