"""`transcribe run`: transcribe files in this process, one model for all, with progress and a summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from transcribe.config import Config
from transcribe.core.engine.formats import render
from transcribe.core.errors import TranscribeError
from transcribe.core.fsio import write_atomic
from transcribe.core.pool.jobs import JobOptions


def output_paths(source: Path, out_dir: Path, formats: Sequence[str]) -> dict[str, Path]:
    return {fmt: out_dir / f"{source.stem}.{fmt}" for fmt in formats}


def run_files(cfg: Config, files: Sequence[Path], out_dir: Path, *, options: JobOptions | None = None,
              quiet: bool = False, as_json: bool = False) -> int:
    """Transcribe `files` with one model; `options` as a job's (the `run` flags), formats default to config."""
    from transcribe.core.engine.funasr_transcriber import Transcriber
    from transcribe.logging_setup import setup_logging

    options = options or JobOptions()
    formats = options.formats or cfg.output.formats
    layout = options.layout(cfg)

    console = Console(stderr=True, quiet=quiet)
    setup_logging(cfg, "run", stderr_level="WARNING")
    out_dir.mkdir(parents=True, exist_ok=True)
    with console.status("loading models..."):
        transcriber = Transcriber(cfg)
    rows: list[dict] = []
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console, disable=quiet)
    with progress:
        overall = progress.add_task(f"{len(files)} file(s)", total=len(files))
        for path in files:
            task = progress.add_task(path.name, total=None)
            row: dict = {"file": str(path)}
            try:
                result = transcriber.transcribe(path, **options.engine_kwargs(cfg))
                if result.fallback and not result.cached:
                    console.print(f"[yellow]fell back[/yellow] {path}: {result.fallback['reason']} on "
                                  f"{result.fallback['from']}, ran on {result.device}")
                written = []
                for fmt, target in output_paths(path, out_dir, formats).items():
                    write_atomic(target, render(result, fmt, layout), out_dir, 0o644)
                    written.append(str(target))
                row.update(ok=True, duration=result.duration, speakers=len(result.speakers), rtf=result.rtf,
                           outputs=written)
            except TranscribeError as e:
                row.update(ok=False, reason=e.reason, error=e.message)
                console.print(f"[red]failed[/red] {path}: {e.message}")
            except OSError as e:
                row.update(ok=False, reason="write_failed", error=str(e))
                console.print(f"[red]failed[/red] {path}: cannot write outputs: {e}")
            rows.append(row)
            progress.update(task, total=1, completed=1, visible=False)
            progress.advance(overall)
    if as_json:
        print(json.dumps({"files": rows, "device": transcriber.device.device}, ensure_ascii=False, indent=2))
    elif not quiet:
        console.print(_summary(rows))
    return 0 if all(r["ok"] for r in rows) else 1


def _summary(rows: list[dict]) -> Table:
    table = Table(title="transcribe run")
    for col in ("file", "duration", "speakers", "RTF", "outputs / error"):
        table.add_column(col)
    for r in rows:
        if r["ok"]:
            table.add_row(Path(r["file"]).name, f"{r['duration']:.1f}s", str(r["speakers"]), f"{r['rtf']:.3f}",
                          ", ".join(Path(o).name for o in r["outputs"]))
        else:
            table.add_row(Path(r["file"]).name, "-", "-", "-", f"[red]{r['reason']}[/red]: {r['error']}")
    return table
