"""The engine: device selection, FunASR patches, transcriber, task directory, pool."""

import os

# torch reads this when it first initialises MPS: it must be in the environment before any
# worker imports torch (see patches/mps_patch.py). Harmless on machines without MPS.
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
