"""A one-job worker for the kill-at-every-step tests: claim one job and run it, as a pool worker does.

    python tests/reliability/crash_child.py CONFIG      (with TRANSCRIBE_CRASH_AT=<point> set)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from transcribe.config import load_config  # noqa: E402
from transcribe.core.engine.funasr_transcriber import Transcriber  # noqa: E402
from transcribe.core.pool.job_runner import run_job  # noqa: E402
from transcribe.core.pool.task_dir import TaskDir  # noqa: E402

cfg = load_config(sys.argv[1])
td = TaskDir.from_config(cfg)
transcriber = Transcriber(cfg)
job = td.claim_next("crash-child")
if job is not None:
    print(run_job(td, job, transcriber.transcribe, cfg, "crash-child")[0])
