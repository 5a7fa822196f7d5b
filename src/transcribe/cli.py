"""Command line: `transcribe run | serve | submit | status | retry | models | devices`.

Every command loads `config.json` (or --config FILE, or $TRANSCRIBE_CONFIG), applies
TRANSCRIBE__SECTION__KEY environment overrides, then its own flags. Errors print one line saying
what is wrong and how to fix it; exit codes: 0 ok, 1 a job/file failed, 2 bad usage or config,
3 the server could not start, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from transcribe import __version__
from transcribe.config import OUTPUT_FORMATS, Config, load_config, validate_formats
from transcribe.core.errors import ConfigError, TranscribeError

EPILOG = """\
examples:
  transcribe run meeting.wav -o out --format srt,json --speakers 2
  transcribe serve --mode pool --workers 2 --task-dir tasks
  transcribe submit call.mp3 --speakers 2 --wait
  transcribe status
  transcribe models download        # on a connected machine, fills the model cache

configuration: config.json in the current directory, --config FILE or $TRANSCRIBE_CONFIG;
override any key with TRANSCRIBE__SECTION__KEY=value (e.g. TRANSCRIBE__FUNASR__DEVICE=cpu).
docs: docs/quickstart.md, docs/configuration.md
"""


def _formats(text: str) -> list[str]:
    try:
        return validate_formats([f for f in text.split(",") if f.strip()])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    """The per-job options `run` and `submit` share (a sidecar's keys)."""
    parser.add_argument("--format", type=_formats, help=f"comma-separated, from {','.join(OUTPUT_FORMATS)} "
                                                        "(default: output.formats)")
    parser.add_argument("--speakers", type=int, metavar="N", help="number of speakers, if known")
    parser.add_argument("--hotwords", nargs="+", metavar="WORD", help="words to favour (SeACo Paraformer)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transcribe", description="Speech transcription with speaker labels, on FunASR.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"transcribe {__version__}")
    p.add_argument("--config", metavar="FILE", help="configuration file (default: ./config.json if present)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="override logging.level")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="transcribe files now, in this process (model loaded once)",
                         description="Transcribe FILEs in this process and write one output per format. "
                                     "Other files go on when one fails; the exit code is 1 if any failed.")
    run.add_argument("files", nargs="+", metavar="FILE", type=Path)
    run.add_argument("-o", "--output-dir", type=Path, default=Path("."), help="where outputs go (default: .)")
    _add_job_options(run)
    run.add_argument("--device", help="override funasr.device: auto, cuda, cuda:N, mps, cpu")
    run.add_argument("--quiet", action="store_true", help="no progress display")
    run.add_argument("--json", action="store_true", help="print a JSON summary on stdout")

    serve = sub.add_parser("serve", help="serve a task directory: drop audio into inbox/, get results in done/",
                           description="Serve the task directory until SIGTERM/SIGINT (running jobs finish "
                                       "within pool.shutdown_timeout). SIGHUP reloads the config and replaces "
                                       "workers one by one. See docs/task-directory.md.")
    serve.add_argument("--mode", choices=["pool", "lock", "ray"], default="pool",
                       help="pool: N worker processes (default); lock: one in-process model, jobs one at a time; "
                            "ray: Ray actors across a cluster (pip install 'transcribe[ray]'; docs/scaling.md)")
    serve.add_argument("--address", help="with --mode ray: join the Ray cluster at HOST:PORT ('auto': the one "
                                         "started on this machine); default ray.address, else a local instance")
    serve.add_argument("--workers", help="worker count or 'auto' (default: pool.workers)")
    serve.add_argument("--task-dir", help="task directory (default: pool.task_dir)")

    submit = sub.add_parser("submit", help="queue files into the task directory (safely, via tmp/)",
                            description="Copy FILEs into the task directory as complete jobs: each is staged in "
                                        "tmp/ and renamed into inbox/, so a server never sees half a file. "
                                        "Prints each job id; with --wait, waits and prints the result path or "
                                        "the failure reason (exit 1 if any failed).")
    submit.add_argument("files", nargs="+", metavar="FILE", type=Path)
    _add_job_options(submit)
    submit.add_argument("--priority", type=int, default=0, help="higher runs first (-100..100)")
    submit.add_argument("--task-dir")
    submit.add_argument("--wait", action="store_true", help="wait and print each result path or failure reason")
    submit.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")

    status = sub.add_parser("status", help="queue counts and workers (works while the server is down)",
                            description="Show jobs per folder (inbox, processing, done, failed), the oldest waiting "
                                        "job, and each worker: pid, device, state, current job and its elapsed "
                                        "time, jobs done, mean RTF, memory. Read from the task directory alone, "
                                        "so it works whether or not the server runs.")
    status.add_argument("--task-dir")
    status.add_argument("--json", action="store_true")

    retry = sub.add_parser("retry", help="move failed jobs back to the inbox, attempts reset",
                           description="Move failed jobs (by JOB id, the folder name under failed/, or --all) back "
                                       "to inbox/ with their attempts reset; the previous error.json is kept "
                                       "in the job folder as .error-<time>.json.")
    retry.add_argument("jobs", nargs="*", metavar="JOB")
    retry.add_argument("--all", action="store_true", help="every job in failed/")
    retry.add_argument("--task-dir")

    models = sub.add_parser("models", help="list or download the configured models",
                            description="list: where each configured model resolves (local directory, hub cache, "
                                        "or needs a download), without network. download: fill the hub cache "
                                        "(ModelScope, or Hugging Face with funasr.hub=hf) for every configured "
                                        "alias; re-running resumes. Copy the cache to offline machines.")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION")
    msub.required = True
    msub.add_parser("list", help="where each configured model resolves (no network)")
    msub.add_parser("download", help="fill the local cache for the configured models (resumable)")

    doctor = sub.add_parser("doctor", help="check versions, devices, models, ffmpeg and folders",
                            description="Check what `serve` needs: torch and funasr versions; CUDA devices (name, "
                                        "memory), MPS, CPU threads; the device and dtype the config selects and "
                                        "why; the patches that would apply; whether each configured model "
                                        "resolves locally (directory or cache) or its hub is reachable; ffmpeg; "
                                        "task and log dirs writable. Exit 1 on any problem that would stop serve.")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")

    sub.add_parser("devices", help="the devices found and the one the config selects, with why",
                   description="Print, as JSON, the devices torch can use (cuda:N, mps, cpu), the device and dtype "
                               "that funasr.device / device_priority / fallback_on_error / dtype select with the "
                               "reason, and the selected device's name, memory and library versions.")
    return p


def _load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Config:
    extra = dict(overrides or {})
    if getattr(args, "log_level", None):
        extra["logging.level"] = args.log_level
    if getattr(args, "task_dir", None):
        extra["pool.task_dir"] = str(Path(args.task_dir).resolve())
    return load_config(args.config, overrides=extra)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except TranscribeError as e:
        print(f"transcribe: error: {e.message}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 3 if args.command == "serve" else 1
    except KeyboardInterrupt:
        print("transcribe: interrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> int:
    from transcribe.core.run_files import run_files

    overrides = {"funasr.device": args.device} if args.device else {}
    cfg = _load(args, overrides)
    return run_files(cfg, args.files, args.output_dir, formats=args.format or cfg.output.formats,
                     speakers=args.speakers, hotwords=args.hotwords, quiet=args.quiet, as_json=args.json)


def cmd_serve(args: argparse.Namespace) -> int:
    from transcribe.logging_setup import setup_logging

    overrides: dict[str, Any] = {}
    if args.workers:
        overrides["pool.workers"] = args.workers if args.workers == "auto" else int(args.workers)
    if args.address and args.mode != "ray":
        raise ConfigError("--address joins a Ray cluster: use it with --mode ray")
    cfg = _load(args, overrides)
    if args.mode == "lock":
        setup_logging(cfg, "lock-server")
        from transcribe.core.pool.lock_server import serve_lock

        return asyncio.run(serve_lock(cfg))
    if args.mode == "ray":
        setup_logging(cfg, "ray-driver")
        from transcribe.core.cluster.driver import serve_ray

        return serve_ray(cfg, args.address)
    setup_logging(cfg, "supervisor")
    from transcribe.core.pool.supervisor import Supervisor

    return Supervisor(cfg, config_path=args.config).run()


def cmd_submit(args: argparse.Namespace) -> int:
    from transcribe.core.pool.jobs import JobOptions
    from transcribe.core.pool.task_dir import TaskDir

    cfg = _load(args)
    td = TaskDir.from_config(cfg).ensure()
    try:
        options = JobOptions(speakers=args.speakers, hotwords=args.hotwords, formats=args.format,
                             priority=args.priority)
    except ValueError as e:
        raise ConfigError(f"invalid job options: {e}") from None
    ids = []
    for f in args.files:
        if not f.is_file():
            raise TranscribeError(f"{f}: no such file")
        ids.append(td.submit(f, options))
        print(ids[-1] if args.wait else f"queued {f.name} as {ids[-1]}")
    if not args.wait:
        return 0
    return _wait_for(td, ids, args.timeout)


def _wait_for(td: Any, ids: list[str], timeout: float | None) -> int:
    deadline = None if timeout is None else time.time() + timeout
    pending, failed = list(ids), 0
    while pending:
        for job_id in list(pending):
            where = td.find(job_id)
            if where and where[0] == "done":
                print(f"done {job_id}: {where[1]}")
                pending.remove(job_id)
            elif where and where[0] == "failed":
                err = json.loads((where[1] / "error.json").read_text(encoding="utf-8"))
                print(f"failed {job_id}: {err.get('reason')}: {err.get('message')}")
                pending.remove(job_id)
                failed += 1
        if pending and deadline is not None and time.time() > deadline:
            print(f"timed out waiting for {len(pending)} job(s): {', '.join(pending)}", file=sys.stderr)
            return 1
        if pending:
            time.sleep(0.2)
    return 1 if failed else 0


def cmd_status(args: argparse.Namespace) -> int:
    from transcribe.core.status import collect_status, print_status

    cfg = _load(args)
    info = collect_status(cfg)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
    else:
        print_status(info)
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from transcribe.core.pool.task_dir import TaskDir

    cfg = _load(args)
    td = TaskDir.from_config(cfg).ensure()
    jobs = td.failed_ids() if args.all else args.jobs
    if not jobs:
        print("nothing to retry (name JOB ids, or --all)", file=sys.stderr)
        return 2 if not args.all else 0
    for job_id in jobs:
        td.retry(job_id)
        print(f"requeued {job_id}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from rich.console import Console

    from transcribe.core.engine import model_store

    cfg = _load(args)
    refs = model_store.resolve_models(cfg.funasr, cfg.base_dir)
    console = Console(stderr=True)
    if args.models_command == "list":
        for key, ref in refs.items():
            print(f"{key:11} {ref.source:7} {ref.path or ref.repo_id}")
        return 0
    with console.status("downloading models...") as spinner:
        done = model_store.download_models(refs, progress=lambda msg: spinner.update(f"downloading {msg}"))
    for key, path in done.items():
        print(f"{key:11} {path}")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from transcribe.core.engine.device_manager import DeviceManager

    cfg = _load(args)
    available = DeviceManager.detect_available_devices()
    choice = DeviceManager.select_device(cfg.funasr, available)
    print(json.dumps({"available": available, "selected": choice.to_dict(),
                      "info": DeviceManager.get_device_info(choice.device)}, indent=2))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from transcribe.core.doctor import print_report, run_checks
    from transcribe.logging_setup import setup_logging

    cfg = _load(args)
    setup_logging(cfg, "doctor", stderr_level="ERROR", to_file=False)
    report = run_checks(cfg)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print_report(report)
    return 0 if report["ok"] else 1


COMMANDS = {"run": cmd_run, "serve": cmd_serve, "submit": cmd_submit, "status": cmd_status, "retry": cmd_retry,
            "models": cmd_models, "devices": cmd_devices,
            "doctor": cmd_doctor}
