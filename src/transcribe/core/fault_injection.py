"""Fault-injection hooks for the reliability suite (tests/reliability/). Inert unless set.

A few named points of the job lifecycle call `crash_point(name)`; environment variables make it
fail there, in whichever process reaches it (a pool worker included):

- ``TRANSCRIBE_CRASH_AT=<point>``: the process dies at once (``os._exit``), like a SIGKILL;
- ``TRANSCRIBE_ENOSPC_AT=<point>``: ``OSError(ENOSPC)`` is raised, like a full disk;
- ``TRANSCRIBE_HANG_AT=<point>``: the calling thread blocks forever, like a model call that never returns;
- ``TRANSCRIBE_OOM_AT=<point>``: ``torch.cuda.OutOfMemoryError`` is raised, like a GPU out of memory
  (the runtime device fallback's point is ``"model"``: each attempt of a job's model call);
- ``TRANSCRIBE_HOOK_ONCE=<path>``: fire only once across processes (the first to create ``<path>``).
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
CRASH_EXIT_CODE = 86


def _hook_fires(var: str, name: str) -> bool:
    if os.environ.get(var) != name:
        return False
    once = os.environ.get("TRANSCRIBE_HOOK_ONCE")
    if not once:
        return True
    try:
        os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def crash_point(name: str) -> None:
    if _hook_fires("TRANSCRIBE_CRASH_AT", name):
        os._exit(CRASH_EXIT_CODE)
    if _hook_fires("TRANSCRIBE_ENOSPC_AT", name):
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {name})")
    if _hook_fires("TRANSCRIBE_HANG_AT", name):
        threading.Event().wait()
    if _hook_fires("TRANSCRIBE_OOM_AT", name):
        import torch

        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected at {name})")
