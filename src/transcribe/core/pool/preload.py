"""Imported once by the pool's forkserver, so every worker forked from it starts with FunASR loaded.

Importing FunASR costs 8-20 s; with ``pool.start_method: forkserver`` (the default on Linux) a
respawned worker skips it and is ready after the model load and warm-up. Importing torch does not
initialise CUDA or MPS: that still happens only in the workers.
"""

from transcribe.core.engine import funasr_transcriber  # noqa: F401
from transcribe.core.engine.model_store import quiet_funasr
from transcribe.core.pool import worker_process  # noqa: F401

with quiet_funasr():
    import funasr.auto.auto_model  # noqa: F401
