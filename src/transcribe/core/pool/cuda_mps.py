"""CUDA MPS for the pool: several worker processes on one GPU run their kernels side by side.

Without MPS, the processes sharing a GPU time-slice it: one process's kernels at a time. The MPS control
daemon (``nvidia-cuda-mps-control``) funnels every client process's work through one MPS server, so the
kernels of all workers run concurrently (on one H100, 16 diarized jobs: 8 workers 247x -> 358x real time,
16 workers 254x -> 426x; docs/operations.md "CUDA MPS").

`decide` is the pure policy (``pool.cuda_mps``: auto, true, false); `MpsDaemon` runs a private daemon as
the supervisor's own child: started in the foreground (``-f``) before any worker, with its own pipe and
log directories, told ``quit`` after the workers have exited, and killed by the kernel if the supervisor
dies (PR_SET_PDEATHSIG). Workers reach it through ``CUDA_MPS_PIPE_DIRECTORY`` in their environment.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loguru import logger

from transcribe.core.errors import ConfigError, TranscribeError
from transcribe.core.pool.heartbeat import parent_death_signal_setter

MPS_CONTROL = "nvidia-cuda-mps-control"
PIPE_VAR, LOG_VAR = "CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"
SYSTEM_PIPE_DIR = "/tmp/nvidia-mps"  # where a daemon started without CUDA_MPS_PIPE_DIRECTORY listens
# A unix socket's path holds at most 107 bytes; the daemon makes sockets named up to ~20 characters
# (control, control_privileged, ...) in its pipe directory, so a longer directory goes under /tmp.
MAX_PIPE_DIR_BYTES = 80
START_TIMEOUT = 15.0  # seconds for the daemon to create its control socket
STOP_TIMEOUT = 10.0  # seconds for the daemon to exit after `quit` before it is killed

Setting = bool | Literal["auto"]


class MpsError(TranscribeError):
    reason = "cuda_mps_failed"


@dataclass(frozen=True)
class MpsPlan:
    """What the pool does about MPS: nothing (off), start its own daemon (start) or use one that runs (external)."""

    action: Literal["off", "start", "external"]
    reason: str  # one sentence for the log and `transcribe status`
    binary: str | None = None  # start: the control program
    pipe_dir: str | None = None  # external: where that daemon listens


def decide(setting: Setting, cuda: bool, *, which: Callable[[str], str | None] = shutil.which,
           environ: Mapping[str, str] = os.environ, exists: Callable[[str], bool] = os.path.exists) -> MpsPlan:
    """The MPS plan for ``pool.cuda_mps`` = `setting` when the pool's planned devices include CUDA (`cuda`).

    Raises `ConfigError` for ``true`` on CUDA without the control program (the pool does not start).
    """
    if setting is False:
        return MpsPlan("off", "pool.cuda_mps is false")
    if not cuda:
        return MpsPlan("off", "no worker is planned on a CUDA device" +
                       (" (pool.cuda_mps: true has nothing to do)" if setting is True else ""))
    if environ.get(PIPE_VAR):
        return MpsPlan("external", f"{PIPE_VAR} is set: the workers use the MPS daemon there", pipe_dir=environ[PIPE_VAR])
    if exists(f"{SYSTEM_PIPE_DIR}/control"):
        return MpsPlan("external", f"a system MPS daemon runs ({SYSTEM_PIPE_DIR}/control exists): the workers use it",
                       pipe_dir=SYSTEM_PIPE_DIR)
    binary = which(MPS_CONTROL)
    if binary is None:
        if setting is True:
            raise ConfigError(f"pool.cuda_mps is true but {MPS_CONTROL} is not on PATH: install the NVIDIA driver's "
                              "utilities (the package that provides nvidia-smi) or add their folder to PATH, or set "
                              "pool.cuda_mps to \"auto\" (MPS when available) or false")
        return MpsPlan("off", f"{MPS_CONTROL} is not on PATH (workers time-slice the GPU)")
    return MpsPlan("start", f"{'pool.cuda_mps is true' if setting is True else 'auto'}: workers on CUDA share "
                   "the GPU through a private MPS daemon", binary=binary)


def private_pipe_dir(preferred: Path) -> tuple[Path, bool]:
    """`preferred` when its sockets' paths fit, else a fresh private folder under /tmp; (folder, is_temporary)."""
    if len(os.fsencode(str(preferred.absolute()))) <= MAX_PIPE_DIR_BYTES:
        return preferred.absolute(), False
    return Path(tempfile.mkdtemp(prefix="transcribe-mps-")), True


class MpsDaemon:
    """One ``nvidia-cuda-mps-control -f``, the caller's child, with private pipe and log directories."""

    def __init__(self, binary: str, pipe_dir: Path, log_dir: Path, *, temporary: bool = False) -> None:
        self.binary, self.pipe_dir, self.log_dir, self.temporary = binary, Path(pipe_dir), Path(log_dir), temporary
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """The variables every client (worker) needs to reach this daemon."""
        return {PIPE_VAR: str(self.pipe_dir), LOG_VAR: str(self.log_dir)}

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the daemon and wait for its control socket; `MpsError` says why it did not come up."""
        if not self.temporary:  # ours alone (the server lock): what a killed daemon left is stale
            shutil.rmtree(self.pipe_dir, ignore_errors=True)
        self.pipe_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        output = self.log_dir / "daemon-output.log"
        on_parent_death = parent_death_signal_setter(signal.SIGTERM)  # SIGTERM: it may still stop its server
        with open(output, "ab") as out:
            try:
                # its own session: a Ctrl-C to the terminal's group must not stop it before the workers
                self.proc = subprocess.Popen([self.binary, "-f"], env={**os.environ, **self.env},
                                             stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                             start_new_session=True,
                                             # prctl is resolved above: the child only makes one system call
                                             preexec_fn=on_parent_death)  # noqa: PLW1509
            except OSError as e:
                raise MpsError(f"cannot run {self.binary}: {e.strerror}") from None
        deadline = time.monotonic() + timeout
        while not (self.pipe_dir / "control").exists():
            if self.proc.poll() is not None:
                raise MpsError(f"{MPS_CONTROL} exited with code {self.proc.returncode} at start: "
                               f"{_tail(output) or 'no output'} (see {output})")
            if time.monotonic() > deadline:
                self._kill()
                raise MpsError(f"{MPS_CONTROL} made no control socket in {self.pipe_dir} within {timeout:.0f}s "
                               f"(see {output})")
            time.sleep(0.05)
        logger.info("CUDA MPS daemon started (pid {}, pipe dir {}, logs {})", self.proc.pid, self.pipe_dir,
                    self.log_dir)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """`quit` through the control program (the documented way), wait for the daemon, kill it if it stays."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                subprocess.run([self.binary], input=b"quit\n", env={**os.environ, **self.env}, capture_output=True,
                               timeout=timeout, check=False)
            except (OSError, subprocess.TimeoutExpired) as e:
                logger.warning("CUDA MPS: `quit` not delivered ({}); killing the daemon", e)
            try:
                self.proc.wait(timeout)
                logger.info("CUDA MPS daemon stopped (exit code {})", self.proc.returncode)
            except subprocess.TimeoutExpired:
                logger.warning("CUDA MPS daemon (pid {}) did not quit within {:.0f}s; killing it", self.proc.pid,
                               timeout)
                self._kill()
        if self.temporary:
            shutil.rmtree(self.pipe_dir, ignore_errors=True)

    def _kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


def _tail(path: Path, limit: int = 500) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip()
    except OSError:
        return ""
