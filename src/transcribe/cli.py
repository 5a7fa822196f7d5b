"""Command line: `transcribe run | serve | submit | status | retry | models | doctor | devices`.

Every command loads `config.json` (or --config FILE, or $TRANSCRIBE_CONFIG), applies
TRANSCRIBE__SECTION__KEY environment overrides, then its own flags. --config and --log-level are
accepted before or after the command name (after wins). Flag values are checked by the flag's own
parser, so a bad one is reported as ``argument --device: ...``, never as a config-file error. Errors
print one line saying what is wrong and how to fix it; exit codes: 0 ok, 1 a job/file failed,
2 bad usage or config, 3 the server could not start, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

from transcribe import __version__
from transcribe.config import (
    OUTPUT_FORMATS,
    Config,
    check_bind,
    check_device,
    describe_validation_errors,
    load_config,
    parse_workers,
    validate_formats,
)
from transcribe.core.errors import ConfigError, TranscribeError

EPILOG = """\
examples:
  transcribe run meeting.wav -o out --format srt,json --speakers 2
  transcribe run talk.wav --format all --min-speakers 2 --max-speakers 4 --word-timestamps
  transcribe run --config prod.json call.mp3 --hotwords "FunASR,Paraformer"
  transcribe serve --mode pool --workers 2 --task-dir tasks
  transcribe submit call.mp3 --speakers 2 --wait
  transcribe status
  transcribe models download        # on a connected machine, fills the model cache

configuration: config.json in the current directory, --config FILE or $TRANSCRIBE_CONFIG;
override any key with TRANSCRIBE__SECTION__KEY=value (e.g. TRANSCRIBE__FUNASR__DEVICE=cpu).
--config and --log-level go before or after the command name.
docs: docs/quickstart.md, docs/configuration.md
"""

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]

COMMAND_HELP: dict[str, tuple[str, str]] = {
    # command: (one line for `transcribe --help`, the description for `transcribe COMMAND --help`)
    "run": ("transcribe files now, in this process (model loaded once)",
            ("Transcribe FILEs in this process and write one output per format, named after each\n"
             "input (call.wav -> call.json). Inputs that share a name get distinct outputs\n"
             "(real.mp3 -> real.mp3.json, d1/call.wav -> d1_call.wav.json). Every input is checked\n"
             "before the models load; other files go on when one fails; exit 1 if any failed.\n"
             "A log file is written only when logging.dir is set in the configuration.")),
    "serve": ("serve a task directory: drop audio into inbox/, get results in done/",
              ("Serve the task directory until SIGTERM/SIGINT (running jobs finish within\n"
               "pool.shutdown_timeout). SIGHUP reloads the config and replaces workers one by one\n"
               "(docs/operations.md says which keys a reload applies). See docs/task-directory.md.\n"
               "--mode ray serves it with Ray actors on every node of a Ray cluster (--address to\n"
               "join one, else a local instance); SIGHUP does not reload there. See docs/scaling.md.")),
    "submit": ("queue files into the task directory (safely, via tmp/)",
               ("Copy FILEs into the task directory as complete jobs: each is staged in tmp/ and\n"
                "renamed into inbox/, so a server never sees half a file. Every FILE is checked\n"
                "before any is queued. Prints each job id; with --wait, waits and prints the result\n"
                "path or the failure reason (exit 1 if any failed). If no server serves the task\n"
                "directory, --wait says so and keeps waiting (a server started later picks the\n"
                "jobs up); --timeout bounds the wait.")),
    "status": ("queue counts and workers (works while the server is down)",
               ("Show whether a server (pool or lock mode) serves the task directory, the jobs\n"
                "per folder (inbox, processing, done, failed), the oldest waiting job, and each\n"
                "running worker: pid, device, state, current job with its elapsed time and stage,\n"
                "jobs it finished into done/ and failed/, mean RTF, memory. Read from the task\n"
                "directory alone. Exit 2 if the task directory does not exist.")),
    "retry": ("move failed jobs back to the inbox, attempts reset",
              ("Move failed jobs (by JOB id, the folder name under failed/, or --all) back to\n"
               "inbox/ with their attempts reset; the previous error.json is kept in the job folder\n"
               "as .error-<UTC time>.json (e.g. .error-2026-11-25T20-48-12.123Z.json).")),
    "models": ("list or download the configured models",
               ("list: where each configured model resolves (local directory, hub cache, or needs\n"
                "a download), without network. download: fill the hub cache (ModelScope, or\n"
                "Hugging Face with funasr.hub=hf) for every configured alias; re-running resumes.\n"
                "Copy the cache to offline machines.")),
    "list": ("where each configured model resolves (no network)",
             "Print each configured model's role, source (local, cached, remote) and folder or hub id."),
    "download": ("fill the local cache for the configured models (resumable)",
                 "Download every configured hub model into the local cache; local folders are skipped."),
    "doctor": ("check versions, devices, models, ffmpeg and folders",
               ("Check what `serve` needs: torch and funasr versions; CUDA devices (name, memory),\n"
                "MPS, CPU threads; the device and dtype the config selects and why; the patches\n"
                "that would apply; whether each configured model resolves locally with every file\n"
                "FunASR needs (config, weights, tokens, CMVN) or its hub is reachable; ffmpeg;\n"
                "whether the task and log dirs can be written (nothing is created). Exit 1 on any\n"
                "problem that would stop serve.")),
    "devices": ("the devices found and the one the config selects, with why",
                ("Print, as JSON, the devices torch can use (cuda:N, mps, cpu), the device and dtype\n"
                 "that funasr.device / device_priority / fallback_on_error / dtype select with the\n"
                 "reason, and the selected device's name, memory and library versions.")),
}


def _flag(check: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse `type` from a checker that raises ValueError: argparse then blames the flag itself."""
    def parse(text: str) -> Any:
        try:
            return check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = check.__name__
    return parse


def _int_in(low: float, high: float, what: str) -> Callable[[str], int]:
    def check(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
        if not low <= n <= high:
            raise ValueError(f"{n} is out of range: {what}")
        return n
    return check


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{text} must be more than 0 seconds")
    return value


def _formats(text: str) -> list[str]:
    return validate_formats([f for f in text.split(",") if f.strip()])


def _speakers(text: str) -> int:
    from transcribe.core.pool.jobs import check_speakers

    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number of speakers") from None
    return check_speakers(n)


def _hotword_list(text: str) -> list[str]:
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise ValueError("give one or more words, separated by commas: --hotwords 'FunASR,Paraformer'")
    return words


def _common_options(default: Any) -> argparse.ArgumentParser:
    """--config and --log-level, for the top-level parser (default None) and every command's parser
    (default SUPPRESS: a command's parser sets them only when given there, so the later one wins)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", metavar="FILE", default=default,
                   help="configuration file (default: $TRANSCRIBE_CONFIG, else ./config.json if present); "
                        "also accepted before the command name")
    p.add_argument("--log-level", choices=LOG_LEVELS, default=default, type=str.upper,
                   help="override logging.level for this command; also accepted before the command name")
    return p


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    """The per-job options `run` and `submit` share (a sidecar's keys)."""
    parser.add_argument("--format", type=_flag(_formats), metavar="FMT[,FMT...]",
                        help=f"output formats, comma-separated, from {','.join(OUTPUT_FORMATS)}, or all "
                             "(default: output.formats)")
    parser.add_argument("--speakers", type=_flag(_speakers), metavar="N",
                        help="the number of speakers, 1 to 64, if known; leave it out for automatic detection. "
                             "Needs a speaker model (funasr.spk_model)")
    parser.add_argument("--min-speakers", type=_flag(_speakers), metavar="N",
                        help="at least N speakers: bounds the automatic count (not with --speakers)")
    parser.add_argument("--max-speakers", type=_flag(_speakers), metavar="N",
                        help="at most N speakers: bounds the automatic count (not with --speakers)")
    parser.add_argument("--no-diarize", dest="diarize", action="store_false", default=None,
                        help="no speaker labels for this job (the speaker model does not run)")
    parser.add_argument("--hotwords", type=_flag(_hotword_list), metavar="WORD[,WORD...]",
                        help="words to favour, as ONE comma-separated value (--hotwords 'FunASR,Paraformer'). "
                             "Only SeACo/contextual Paraformer models use them (paraformer-zh does); with "
                             "others a warning says they were ignored")
    parser.add_argument("--hotword", action="append", metavar="WORD",
                        help="one word to favour; repeat the flag for more (adds to --hotwords)")
    parser.add_argument("--batch-size", dest="batch_size_s", type=_flag(_int_in(1, 10**6, "give 1 or more")),
                        metavar="SECONDS", help="seconds of audio per ASR batch (default: funasr.batch_size_s); "
                                                "lower it if the GPU runs out of memory")
    parser.add_argument("--word-timestamps", action="store_true", default=None,
                        help="add each segment's words (characters for Chinese) with times to the JSON")
    parser.add_argument("--max-line-width", type=_flag(_int_in(1, 10**4, "give 1 or more")), metavar="N",
                        help="srt/vtt: wrap cue lines at N characters (default: output.max_line_width)")
    parser.add_argument("--max-line-count", type=_flag(_int_in(1, 10**4, "give 1 or more")), metavar="N",
                        help="srt/vtt: at most N lines per cue; longer segments become several cues")
    parser.add_argument("--no-cache", dest="cache", action="store_false", default=None,
                        help="neither read nor write the result cache for these files (with cache.enabled)")


# `_add_job_options` flags whose argparse dest is the JobOptions field of the same name.
JOB_FLAG_FIELDS = ("speakers", "min_speakers", "max_speakers", "diarize", "batch_size_s", "word_timestamps",
                   "max_line_width", "max_line_count", "cache")


def _job_options(args: argparse.Namespace, **extra: Any) -> Any:
    """The `JobOptions` of `run`/`submit` flags, validated as a sidecar is; a bad combination is a usage error."""
    from pydantic import ValidationError

    from transcribe.core.pool.jobs import JobOptions

    try:
        return JobOptions(formats=args.format, hotwords=_hotwords(args),
                          **{name: getattr(args, name) for name in JOB_FLAG_FIELDS}, **extra)
    except ValidationError as e:
        flags = {name: "--" + name.replace("_", "-") for name in JobOptions.model_fields}
        flags.update(batch_size_s="--batch-size", diarize="--no-diarize", cache="--no-cache")
        fields = re.compile(r"(?<![\w-])(" + "|".join(sorted(flags, key=len, reverse=True)) + r")\b")
        problems = "; ".join(p.removeprefix("value: ") for p in describe_validation_errors(e, JobOptions))
        raise ConfigError(f"invalid options: {fields.sub(lambda m: flags[m.group(1)], problems)}") from None


def _hotwords(args: argparse.Namespace) -> list[str] | None:
    words = [*(args.hotwords or []), *(args.hotword or [])]
    return list(dict.fromkeys(words)) or None


def _add_task_dir(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--task-dir", metavar="DIR", help=f"the task directory {what} (default: pool.task_dir)")


def _add_command(sub: Any, name: str) -> argparse.ArgumentParser:
    summary, description = COMMAND_HELP[name]
    return sub.add_parser(name, help=summary, description=description, parents=[_common_options(argparse.SUPPRESS)],
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transcribe", description="Speech transcription with speaker labels, on FunASR.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[_common_options(None)])
    p.add_argument("--version", action="version", version=f"transcribe {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = _add_command(sub, "run")
    run.add_argument("files", nargs="+", metavar="FILE", type=Path, help="audio or video files")
    run.add_argument("-o", "--output-dir", type=Path, default=Path("."), metavar="DIR",
                     help="where outputs go (default: the current folder)")
    _add_job_options(run)
    run.add_argument("--device", type=_flag(check_device), metavar="DEVICE",
                     help="override funasr.device: auto, cuda, cuda:N, mps or cpu")
    run.add_argument("--model", metavar="DIR_OR_ALIAS", help="override funasr.model, the ASR model (a directory "
                                                             "or an alias such as paraformer-zh)")
    run.add_argument("--threads", type=_flag(_int_in(1, 1024, "give 1 or more")), metavar="N",
                     help="override funasr.ncpu: CPU threads for torch")
    run.add_argument("--quiet", action="store_true", help="no progress display and no summary table")
    run.add_argument("--json", action="store_true", help="print a JSON summary on stdout")

    serve = _add_command(sub, "serve")
    serve.add_argument("--mode", choices=["pool", "lock", "ray"], default="pool",
                       help="pool: N worker processes (default); lock: one in-process model, jobs one at a time; "
                            "ray: Ray actors across a cluster (pip install 'transcribe[ray]'; docs/scaling.md)")
    serve.add_argument("--workers", type=_flag(parse_workers), metavar="N|auto",
                       help="worker processes (pool mode): a whole number from 1, or auto (default: pool.workers)")
    serve.add_argument("--address", metavar="HOST:PORT",
                       help="ray mode: join the Ray cluster whose head is HOST:PORT ('auto': the one `ray start` "
                            "began on this machine; default: ray.address, else start a local instance)")
    _add_task_dir(serve, "to serve; created if missing")
    serve.add_argument("--http", type=_flag(check_bind), metavar="HOST:PORT",
                       help="also serve the OpenAI-compatible HTTP API (POST /v1/audio/transcriptions; "
                            "docs/http.md) on HOST:PORT, or PORT on 127.0.0.1 (default: http.bind)")

    submit = _add_command(sub, "submit")
    submit.add_argument("files", nargs="+", metavar="FILE", type=Path, help="audio or video files")
    _add_job_options(submit)
    submit.add_argument("--priority", type=_flag(_int_in(-100, 100, "use -100 to 100")), default=0, metavar="P",
                        help="-100 to 100; higher runs first (default: 0)")
    _add_task_dir(submit, "to queue into; created if missing")
    submit.add_argument("--wait", action="store_true", help="wait and print each result path or failure reason")
    submit.add_argument("--timeout", type=_flag(_positive_seconds), metavar="SECONDS",
                        help="with --wait: give up after this many seconds (exit 1; the jobs stay queued)")

    status = _add_command(sub, "status")
    _add_task_dir(status, "to inspect; must exist")
    status.add_argument("--all", action="store_true", help="also list workers that are no longer running")
    status.add_argument("--json", action="store_true", help="print the status as JSON")

    retry = _add_command(sub, "retry")
    retry.add_argument("jobs", nargs="*", metavar="JOB", help="job ids (folder names under failed/)")
    retry.add_argument("--all", action="store_true", help="every job in failed/")
    _add_task_dir(retry, "holding the failed jobs; must exist")

    models = _add_command(sub, "models")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION")
    msub.required = True
    _add_command(msub, "list")
    _add_command(msub, "download")

    doctor = _add_command(sub, "doctor")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")

    _add_command(sub, "devices")
    return p


def _load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Config:
    """The configuration with the command's flags applied; logging set for a one-shot command: warnings
    and errors on stderr (or --log-level), no log file (`run` and `serve` set up their own)."""
    from transcribe.logging_setup import setup_logging

    extra = dict(overrides or {})
    if args.log_level:
        extra["logging.level"] = args.log_level
    if getattr(args, "task_dir", None):
        extra["pool.task_dir"] = str(Path(args.task_dir).resolve())
    cfg = load_config(args.config, overrides=extra)
    setup_logging(cfg, args.command, stderr_level=args.log_level or "WARNING", to_file=False)
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except TranscribeError as e:
        print(f"transcribe {args.command}: error: {e.message}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 3 if args.command == "serve" else 1
    except OSError as e:  # a folder that cannot be created or read: one line, never a traceback
        from loguru import logger

        logger.opt(exception=e).debug("{} failed", args.command)  # the traceback, with --log-level DEBUG
        where = f" {e.filename}" if e.filename else ""
        print(f"transcribe {args.command}: error:{where} {e.strerror or e}", file=sys.stderr)
        return 3 if args.command == "serve" else 1
    except KeyboardInterrupt:
        print("transcribe: interrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> int:
    from transcribe.core.run_files import run_files

    options = _job_options(args)
    overrides = {key: value for key, value in (("funasr.device", args.device), ("funasr.model", args.model),
                                               ("funasr.ncpu", args.threads)) if value is not None}
    cfg = _load(args, overrides)
    if options.speakers and not cfg.funasr.spk_model:
        raise ConfigError("--speakers needs a speaker model, and funasr.spk_model is not set: set it "
                          "(e.g. \"cam++\") or leave --speakers out")
    return run_files(cfg, args.files, args.output_dir, options=options, quiet=args.quiet, as_json=args.json)


def cmd_serve(args: argparse.Namespace) -> int:
    from transcribe.logging_setup import setup_logging

    if args.address and args.mode != "ray":
        raise ConfigError("--address joins a Ray cluster: use it with --mode ray")
    overrides: dict[str, Any] = {"pool.workers": args.workers} if args.workers else {}
    if args.http:
        overrides["http.bind"] = args.http
    cfg = _load(args, overrides)
    setup_logging(cfg, {"lock": "lock-server", "ray": "ray-driver"}.get(args.mode, "supervisor"))
    with _http_api(cfg):
        if args.mode == "lock":
            from transcribe.core.pool.lock_server import serve_lock

            return asyncio.run(serve_lock(cfg))
        if args.mode == "ray":
            from transcribe.core.cluster.driver import serve_ray

            return serve_ray(cfg, args.address)
        from transcribe.core.pool.supervisor import Supervisor

        return Supervisor(cfg, config_path=args.config).run()


def _http_api(cfg: Config) -> contextlib.AbstractContextManager[Any]:
    """The HTTP API in a thread beside the serve loop, when http.bind (or --http) is set."""
    if not cfg.http.bind:
        return contextlib.nullcontext()
    from transcribe.http.server import HttpServer

    return HttpServer(cfg)


def _existing_task_dir(cfg: Config) -> Any:
    """The configured task directory, which must exist: reading or retrying never creates one from a typo."""
    from transcribe.core.pool.task_dir import TaskDir

    td = TaskDir.from_config(cfg)
    if not td.root.is_dir():
        raise ConfigError(f"task directory {td.root} does not exist: check --task-dir or pool.task_dir "
                          "(`transcribe serve` and `transcribe submit` create it)")
    return td


def cmd_submit(args: argparse.Namespace) -> int:
    from transcribe.core.pool.task_dir import TaskDir
    from transcribe.core.run_files import check_input

    options = _job_options(args, priority=args.priority)
    cfg = _load(args)
    for f in args.files:  # all of them before queuing any
        check_input(f, cfg)
    if args.speakers and not cfg.funasr.spk_model:
        print("transcribe submit: warning: --speakers is ignored by a server without a speaker model, and "
              "funasr.spk_model is not set in this configuration", file=sys.stderr)
    td = TaskDir.from_config(cfg).ensure()
    ids = []
    for f in args.files:
        ids.append(td.submit(f, options))
        print(ids[-1] if args.wait else f"queued {f.name} as {ids[-1]}")
    if not args.wait:
        return 0
    return _wait_for(td, ids, args.timeout)


def _wait_for(td: Any, ids: list[str], timeout: float | None) -> int:
    from transcribe.core.status import server_state

    deadline = None if timeout is None else time.time() + timeout
    pending, failed = list(ids), 0
    serving: bool | None = None
    while pending:
        alive = bool(server_state(td).get("alive"))
        if alive != serving:  # say so when no server runs, and again when that changes
            if not alive:
                print(f"transcribe submit: no server is serving {td.root}; the jobs wait in inbox/ until "
                      f"`transcribe serve --task-dir {td.root}` runs. Still waiting (Ctrl-C stops waiting; the "
                      "jobs stay queued).", file=sys.stderr)
            elif serving is not None:
                print("transcribe submit: a server is serving the task directory now", file=sys.stderr)
            serving = alive
        for job_id in list(pending):
            where = td.find(job_id)
            if where and where[0] == "done":
                print(f"done {job_id}: {where[1]}")
                pending.remove(job_id)
            elif where and where[0] == "failed":
                err = td.failure_info(job_id)
                print(f"failed {job_id}: {err.get('reason') or 'unknown'}: "
                      f"{err.get('message') or f'no readable error.json in {where[1]}'}")
                pending.remove(job_id)
                failed += 1
        if pending and deadline is not None and time.time() > deadline:
            print(f"timed out waiting for {len(pending)} job(s): {', '.join(pending)} (still queued)",
                  file=sys.stderr)
            return 1
        if pending:
            time.sleep(0.2)
    return 1 if failed else 0


def cmd_status(args: argparse.Namespace) -> int:
    from transcribe.core.status import collect_status, print_status

    cfg = _load(args)
    _existing_task_dir(cfg)
    info = collect_status(cfg, include_gone=args.all)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
    else:
        print_status(info)
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    cfg = _load(args)
    td = _existing_task_dir(cfg)
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

    cfg = _load(args)
    report = run_checks(cfg)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print_report(report)
    return 0 if report["ok"] else 1


COMMANDS = {"run": cmd_run, "serve": cmd_serve, "submit": cmd_submit, "status": cmd_status, "retry": cmd_retry,
            "models": cmd_models, "devices": cmd_devices, "doctor": cmd_doctor}
