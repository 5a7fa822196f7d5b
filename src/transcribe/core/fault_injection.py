"""Fault-injection hooks for the reliability suite (tests/reliability/). Inert unless set.

A few named points of the job lifecycle call `crash_point(name)`; environment variables make it
fail there, in whichever process reaches it (a pool worker included):

- ``TRANSCRIBE_CRASH_AT=<point>``: the process dies at once (``os._exit``), like a SIGKILL;
- ``TRANSCRIBE_ENOSPC_AT=<point>``: ``OSError(ENOSPC)`` is raised, like a full disk;
- ``TRANSCRIBE_HANG_AT=<point>``: the calling thread blocks forever, like a model call that never returns;
- ``TRANSCRIBE_OOM_AT=<point>``: ``torch.cuda.OutOfMemoryError`` is raised, like a GPU out of memory
  (the runtime device fallback's point is ``"model"``: each attempt of a job's model call);
- ``TRANSCRIBE_HOOK_ONCE=<path>``: fire only once across processes (the first to create ``<path>``);
  ``TRANSCRIBE_CRASH_ONCE`` / ``TRANSCRIBE_ENOSPC_ONCE`` / ``TRANSCRIBE_HANG_ONCE`` do the same per hook.

Each variable may name several points, comma-separated; with a once-path, each point fires once
(``<path>.<point>``), so one run can kill a worker at every step of the lifecycle in turn.
"""

from __future__ import annotations

import errno
import os
import threading

# The steps of a job's life, in order (plus "generate", before the model call, and "model", each attempt of it).
CRASH_POINTS = (
    "claim.before", "claim.after", "result.before_write", "result.before_rename", "result.after_rename",
    "cleanup.after",
)
# The steps of giving a job back (requeue) or failing it.
SETTLE_POINTS = ("requeue.before_rename", "requeue.after_rename", "fail.before_rename", "fail.after_rename")
CRASH_EXIT_CODE = 86
_exempt = False


def exempt() -> None:
    """Injected faults target workers; the supervisor (which also requeues jobs) calls this to stay up."""
    global _exempt
    _exempt = True


def _hook_fires(var: str, name: str) -> bool:
    points = os.environ.get(var, "").split(",")
    if name not in points:
        return False
    once = os.environ.get(f"{var.removesuffix('_AT')}_ONCE") or os.environ.get("TRANSCRIBE_HOOK_ONCE")
    if not once:
        return True
    if len(points) > 1:
        once = f"{once}.{name}"
    try:
        os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def crash_point(name: str) -> None:
    if _exempt:
        return
    if _hook_fires("TRANSCRIBE_CRASH_AT", name):
        os._exit(CRASH_EXIT_CODE)
    if _hook_fires("TRANSCRIBE_ENOSPC_AT", name):
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {name})")
    if _hook_fires("TRANSCRIBE_HANG_AT", name):
        threading.Event().wait()
    if _hook_fires("TRANSCRIBE_OOM_AT", name):
        import torch

        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected at {name})")
