"""`transcribe run`: transcribe files in this process, one model for all, with progress and a summary.

Every input is checked (exists, is a regular readable file of an allowed type) before the models
load, so a mistyped path costs nothing. Outputs are named after their input; inputs that would
write the same output get longer, distinct names (`output_stems`), so no output is ever overwritten
by another input of the same run.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from transcribe.config import Config
from transcribe.core.engine.formats import render
from transcribe.core.errors import AudioNotFoundError, ConfigError, TranscribeError
from transcribe.core.fsio import write_atomic
from transcribe.core.pool.jobs import JobOptions


def output_stems(files: Sequence[Path]) -> dict[Path, str]:
    """The output name (before ``.fmt``) of each input, distinct across the run.

    The stem when it is unique (``call.wav`` -> ``call``); for inputs that share it, the file name
    (``real.mp3``, ``real.m4a``); for inputs that share that too, the path below their common folder
    with ``_`` for ``/`` (``d1/call.wav`` -> ``d1_call.wav``). Compared case-insensitively, as macOS
    and Windows folders do. Raises `ConfigError` (before any work) if names still collide.
    """
    resolved = {f: f.resolve() for f in files}
    common = Path(os.path.commonpath([str(r.parent) for r in resolved.values()])) if files else Path()

    def relative(f: Path) -> str:
        return "_".join(resolved[f].relative_to(common).parts)

    names = {f: f.stem for f in files}
    for longer in (lambda f: f.name, relative):
        counts = Counter(n.casefold() for n in names.values())
        names = {f: longer(f) if counts[n.casefold()] > 1 else n for f, n in names.items()}
    clashes = sorted({n for n, c in Counter(n.casefold() for n in names.values()).items() if c > 1})
    if clashes:
        raise ConfigError(f"inputs would write the same outputs ({', '.join(clashes)}); rename them or run "
                          "them into different --output-dir folders")
    return names


def output_paths(stem: str, out_dir: Path, formats: Sequence[str]) -> dict[str, Path]:
    return {fmt: out_dir / f"{stem}.{fmt}" for fmt in formats}


def check_input(path: Path, cfg: Config) -> None:
    """Everything that can be known about an input without decoding it; raises an `AudioError`."""
    from transcribe.core.engine.audio import check_file

    check_file(path, cfg.input.allowed_extensions, cfg.input.max_file_mb)
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise AudioNotFoundError(f"cannot read {str(path)!r}: {e.strerror} (check its permissions)") from None


def prepare_output_dir(out_dir: Path) -> None:
    """Create the output folder (before any model loads), or say why it cannot be used."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"--output-dir {out_dir} exists and is not a folder") from None
    except OSError as e:
        raise ConfigError(f"--output-dir {out_dir} cannot be created: {e.strerror}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir {out_dir} is not writable (check its permissions)")


class EtaColumn(ProgressColumn):
    """A file's FunASR stage and time left, from its audio length and the RTF measured on earlier files."""

    def render(self, task: Task) -> Text:
        stage = task.fields.get("stage") or ""
        estimate = task.fields.get("estimate")
        if task.finished or estimate is None:
            left = "" if task.finished else "ETA after the first file"
        else:
            left = f"~{max(0.0, estimate - (task.elapsed or 0.0)):.0f}s left"
        return Text(f"{stage:<6} {left}".rstrip())


class RunProgress:
    """Per-file progress: a live display on a terminal (stage, bar, ETA), one line per file otherwise."""

    def __init__(self, console: Console, total_files: int, total_bytes: int) -> None:
        self.console, self.total_files = console, total_files
        self.live = console.is_terminal and not console.quiet
        # markup=False everywhere a file name is shown: "[draft].wav" is a name, not a style
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False),
                                 BarColumn(bar_width=20), EtaColumn(), TimeRemainingColumn(), console=console,
                                 disable=not self.live)
        self.overall = self.progress.add_task(f"{total_files} file(s)", total=max(total_bytes, 1), stage="",
                                              estimate=None)
        self.file_task: Any = None
        self.audio_s = self.processing_s = 0.0

    def __enter__(self) -> "RunProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def measured_rtf(self) -> float | None:
        return self.processing_s / self.audio_s if self.audio_s else None

    def start_file(self, index: int, path: Path) -> None:
        self.file_task = self.progress.add_task(f"[{index}/{self.total_files}] {path.name}", total=100,
                                                stage="decode", estimate=None)

    def decoded(self, index: int, path: Path, duration: float) -> None:
        rtf = self.measured_rtf()
        estimate = duration * rtf if rtf is not None else None
        self.progress.update(self.file_task, estimate=estimate)
        if not self.live and not self.console.quiet:
            eta = f", ETA ~{estimate:.0f}s at RTF {rtf:.3f}" if estimate is not None else ""
            self.console.print(f"[{index}/{self.total_files}] {path.name}: {duration:.1f}s of audio{eta}", markup=False,
                               soft_wrap=True)

    def stage(self, stage: str) -> None:
        task = self.progress.tasks[self.file_task] if self.file_task is not None else None
        if task is None:
            return
        estimate = task.fields.get("estimate")
        done = min(95.0, 100 * (task.elapsed or 0.0) / estimate) if estimate else task.completed
        self.progress.update(self.file_task, stage=stage, completed=done)

    def end_file(self, size: int, duration: float | None, seconds: float) -> None:
        if duration:
            self.audio_s += duration
            self.processing_s += seconds
        self.progress.update(self.file_task, completed=100, visible=False)
        self.progress.advance(self.overall, size)
        self.file_task = None


def run_files(cfg: Config, files: Sequence[Path], out_dir: Path, *, options: JobOptions | None = None,
              quiet: bool = False, as_json: bool = False, console: Console | None = None) -> int:
    """Transcribe `files` with one model; `options` as a job's (the `run` flags), formats default to config."""
    from transcribe.logging_setup import file_logging_configured, setup_logging

    options = options or JobOptions()

    console = console or Console(stderr=True, quiet=quiet)
    # Warnings and errors on stderr, beside the progress display; more only when asked (--log-level).
    stderr_level = cfg.logging.level if "level" in cfg.logging.model_fields_set else "WARNING"
    setup_logging(cfg, "run", stderr_level=stderr_level, to_file=file_logging_configured(cfg))
    unique: dict[Path, Path] = {}
    for f in files:  # the same file named twice (even as d/../d/f.wav) is transcribed once
        unique.setdefault(f.resolve(), f)
    files = list(unique.values())
    stems = output_stems(files)
    rows: dict[Path, dict] = {}
    for path in files:
        try:
            check_input(path, cfg)
        except TranscribeError as e:
            rows[path] = {"file": str(path), "ok": False, "reason": e.reason, "error": e.message}
            _print_failure(console, path, e.message)
    todo = [p for p in files if p not in rows]
    device = None
    if todo:
        prepare_output_dir(out_dir)
        done, device = _transcribe_all(cfg, todo, stems, out_dir, options, console)
        rows.update(done)
    ordered = [rows[p] for p in files]
    if as_json:
        print(json.dumps({"files": ordered, "device": device}, ensure_ascii=False, indent=2))
    elif not quiet:
        console.print(_summary(ordered))
    return 0 if all(r["ok"] for r in ordered) else 1


def _transcribe_all(cfg: Config, files: list[Path], stems: dict[Path, str], out_dir: Path, options: JobOptions,
                    console: Console) -> tuple[dict[Path, dict], str]:
    from transcribe.core.engine.audio import load_audio
    from transcribe.core.engine.funasr_transcriber import Transcriber

    with console.status("loading models..."):
        transcriber = Transcriber(cfg)
    rows: dict[Path, dict] = {}
    sizes = {p: p.stat().st_size for p in files}
    with RunProgress(console, len(files), sum(sizes.values())) as progress:
        transcriber.on_progress = progress.stage
        for index, path in enumerate(files, 1):
            row: dict = {"file": str(path)}
            started = time.perf_counter()
            duration = None
            progress.start_file(index, path)
            try:
                kwargs = options.engine_kwargs(cfg)
                if transcriber.cache is not None and kwargs.pop("use_cache"):
                    result = transcriber.transcribe(path, **kwargs)  # the result cache keys on the file's bytes
                else:
                    kwargs.pop("use_cache", None)
                    audio = load_audio(path, cfg.input.allowed_extensions, cfg.input.max_file_mb)
                    duration = audio.duration
                    progress.decoded(index, path, duration)
                    result = transcriber.transcribe_audio(audio, **kwargs, source_name=path.name, started=started,
                                                          decode_time=time.perf_counter() - started)
                if result.fallback and not result.cached:
                    console.print(Text.assemble(("fell back", "yellow"), f" {path}: {result.fallback['reason']} on "
                                                f"{result.fallback['from']}, ran on {result.device}"), soft_wrap=True)
                written = []
                for fmt, target in output_paths(stems[path], out_dir, options.formats or cfg.output.formats).items():
                    write_atomic(target, render(result, fmt, options.layout(cfg)), out_dir, 0o644)
                    written.append(str(target))
                row.update(ok=True, duration=result.duration, speakers=len(result.speakers), rtf=result.rtf,
                           outputs=written)
            except TranscribeError as e:
                row.update(ok=False, reason=e.reason, error=e.message)
                _print_failure(console, path, e.message)
            except OSError as e:
                row.update(ok=False, reason="write_failed", error=str(e))
                _print_failure(console, path, f"cannot write outputs: {e}")
            rows[path] = row
            progress.end_file(sizes[path], duration, time.perf_counter() - started)
        transcriber.on_progress = None
    return rows, transcriber.device.device


def _print_failure(console: Console, path: Path, message: str) -> None:
    # soft_wrap: a path stays on one line (copyable) however narrow the console; Text: no markup in names
    console.print(Text.assemble(("failed", "red"), f" {path}: {message}"), soft_wrap=True)


def _summary(rows: list[dict]) -> Table:
    # Folding cells and short headers: readable at 80 columns (no "podcast_2speakers_60s…").
    table = Table(title="transcribe run")
    table.add_column("file", overflow="fold")
    table.add_column("audio", no_wrap=True)
    table.add_column("spk", no_wrap=True)
    table.add_column("RTF", no_wrap=True)
    table.add_column("outputs / error", overflow="fold")
    for r in rows:
        if r["ok"]:
            table.add_row(Text(r["file"]), f"{r['duration']:.1f}s", str(r["speakers"]), f"{r['rtf']:.3f}",
                          Text(", ".join(Path(o).name for o in r["outputs"])))
        else:
            table.add_row(Text(r["file"]), "-", "-", "-", Text.assemble((r["reason"], "red"), f": {r['error']}"))
    return table
