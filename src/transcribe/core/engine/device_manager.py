"""Choose the torch device and dtype a worker runs on, and say why.

Selection is a pure function of the configuration and of what torch reports, so every branch
is testable by faking `torch.cuda.is_available`, `torch.cuda.device_count` and
`torch.backends.mps.is_available` / `is_built`.

Policy
- ``device: "auto"`` takes the first kind in ``device_priority`` that is present.
- A forced device (``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"cpu"``) that is absent either falls back
  down the priority list with a WARNING naming what was asked, what was found and what was taken
  (``fallback_on_error: true``), or raises `DeviceUnavailableError` (``false``).
- dtype ``"auto"`` is float32 on every device: lower precision is offered only through
  ``torch.autocast`` (FunASR's own ``bf16=True`` crashes in the SANM encoder's LayerNorm on CUDA) and
  only where a benchmark has shown parity. Half precision on the CPU is refused (slower, no gain).

Importing this module does not import torch: the supervisor uses it for planning (how many
workers, which GPU each gets) and must never initialise a GPU backend itself.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from loguru import logger

from transcribe.core.errors import DeviceUnavailableError

if TYPE_CHECKING:
    from transcribe.config import FunasrConfig

HALF_DTYPES = ("float16", "bfloat16")


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # "cuda:0", "mps" or "cpu"
    dtype: str  # "float32", "float16" or "bfloat16"
    reason: str  # one sentence: why this device and dtype
    requested: str  # what the configuration asked for
    fell_back: bool = False

    @property
    def kind(self) -> str:
        return device_kind(self.device)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def device_kind(device: str) -> str:
    return device.split(":", 1)[0]


class DeviceManager:
    """Detects devices and picks one for a configuration. Stateless; methods are static."""

    @staticmethod
    def detect_available_devices() -> list[str]:
        """Every usable device, best first by kind: ``["cuda:0", "cuda:1", "mps", "cpu"]``."""
        import torch

        found: list[str] = []
        if torch.cuda.is_available():
            found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_built() and mps.is_available():
            found.append("mps")
        found.append("cpu")
        return found

    @staticmethod
    def select_device(cfg: FunasrConfig, available: list[str] | None = None) -> DeviceChoice:
        """Pick the device and dtype for `cfg` (a `FunasrConfig`); logs one INFO line saying why."""
        if available is None:
            available = DeviceManager.detect_available_devices()
        choice = _choose(cfg.device, list(cfg.device_priority), cfg.fallback_on_error, available)
        choice = _with_dtype(choice, cfg.dtype)
        if choice.fell_back:
            logger.warning("device: {} ({})", choice.device, choice.reason)
        logger.info("device: {} dtype {} — {}", choice.device, choice.dtype, choice.reason)
        return choice

    @staticmethod
    def get_device_info(device: str) -> dict[str, Any]:
        """Name, memory and library versions for `device`, for logs, `status` and `doctor`."""
        import torch

        info: dict[str, Any] = {
            "device": device,
            "torch": torch.__version__,
            "funasr": _funasr_version(),
            "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
        }
        kind = device_kind(device)
        if kind == "cuda" and torch.cuda.is_available():
            index = int(device.split(":")[1]) if ":" in device else 0
            props = torch.cuda.get_device_properties(index)
            info.update(name=props.name, memory_total_mb=props.total_memory // 2**20,
                        capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
        elif kind == "mps":
            info.update(name="Apple GPU (MPS)", memory_total_mb=None)
        else:
            info.update(name=platform.processor() or platform.machine(), memory_total_mb=None)
        return info


def limit_cpu_threads(n: int) -> dict[str, int]:
    """Give the whole process one budget of `n` CPU threads (``funasr.ncpu``); returns the pools it set.

    FunASR sets only torch's intra-op pool from ``ncpu``. The OpenBLAS and OpenMP pools that numpy, scipy
    and scikit-learn load (CAM++ clustering, fbank, VAD post-processing) start one thread per core by
    default, so N workers on a C-core machine ran N x C spinning BLAS threads against each other: on a
    2-GPU host, two pool workers per GPU took 14.7 s per 10-minute job against 8.2 s in Ray actors, whose
    environment Ray limits to the actor's CPUs. threadpoolctl sets the pools already loaded (a forkserver
    worker inherits them loaded) and the environment covers what loads later.
    """
    from threadpoolctl import threadpool_info, threadpool_limits

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    threadpool_limits(limits=n)
    import torch

    torch.set_num_threads(n)
    return {f"{i['internal_api']}:{os.path.basename(i['filepath'])}": i["num_threads"] for i in threadpool_info()}


def _funasr_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("funasr")
    except PackageNotFoundError:
        return None


def _first_of_kind(kind: str, available: list[str]) -> str | None:
    return next((d for d in available if device_kind(d) == kind), None)


def _choose(requested: str, priority: list[str], fallback: bool, available: list[str]) -> DeviceChoice:
    found = ", ".join(available)
    if requested == "auto":
        for kind in priority:
            dev = _first_of_kind(kind, available)
            if dev:
                return DeviceChoice(dev, "float32", f"auto: first present of priority {priority} (found: {found})",
                                    requested)
        raise DeviceUnavailableError(
            f"funasr.device is 'auto' but none of funasr.device_priority {priority} is present "
            f"(found: {found}); add 'cpu' to funasr.device_priority"
        )

    if requested in available:
        return DeviceChoice(requested, "float32", f"configured funasr.device={requested!r} is present", requested)
    if requested == "cuda" and (dev := _first_of_kind("cuda", available)):
        return DeviceChoice(dev, "float32", f"configured funasr.device='cuda': using the first GPU (found: {found})",
                            requested)

    problem = f"funasr.device is {requested!r} but it is not available (found: {found})"
    if not fallback:
        raise DeviceUnavailableError(
            f"{problem}; set funasr.device to 'auto' or one of the devices found, "
            f"or set funasr.fallback_on_error to true"
        )
    for kind in priority:
        if dev := _first_of_kind(kind, available):
            return DeviceChoice(dev, "float32", f"{problem}; fell back to {dev}, the first present in priority "
                                f"{priority}", requested, fell_back=True)
    # The priority list may exclude cpu; the cpu is always there and beats not running.
    return DeviceChoice("cpu", "float32", f"{problem}; fell back to cpu (nothing in priority {priority} present)",
                        requested, fell_back=True)


def _with_dtype(choice: DeviceChoice, wanted: str) -> DeviceChoice:
    if wanted in ("auto", "float32"):
        why = "float32 (dtype auto: no lower precision has shown parity yet)" if wanted == "auto" else "float32"
        return DeviceChoice(choice.device, "float32", f"{choice.reason}; {why}", choice.requested, choice.fell_back)
    if choice.kind == "cpu":
        logger.warning("funasr.dtype={} is not used on the cpu (slower, no gain): running float32", wanted)
        return DeviceChoice(choice.device, "float32", f"{choice.reason}; {wanted} ignored on cpu", choice.requested,
                            choice.fell_back)
    return DeviceChoice(choice.device, wanted, f"{choice.reason}; {wanted} via torch.autocast (funasr.dtype)",
                        choice.requested, choice.fell_back)
