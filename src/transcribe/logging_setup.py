"""loguru everywhere: stderr plus a rotated file per process under `logging.dir`.

FunASR logs through the standard `logging` module (and calls ``basicConfig`` itself); those records
are routed into loguru at WARNING and above so the logs stay one stream and readable.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from loguru import logger

from transcribe.config import Config
from transcribe.core.engine.model_store import is_funasr_noise

_FORMAT = "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> | <level>{level: <7}</level> | {extra[proc]} | {message}"


class _InterceptHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if is_funasr_noise(record):
            return
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, "[{}] {}", record.name, record.getMessage())


def file_logging_configured(cfg: Config) -> bool:
    """Whether the configuration names `logging.dir` itself (file, environment or override) rather than
    leaving the default: one-shot commands such as `run` write a log file only then, so they never
    create ``logs/`` in whatever folder they are run from."""
    return "dir" in cfg.logging.model_fields_set


def setup_logging(cfg: Config | None, name: str, *, stderr_level: str | None = None, to_file: bool = True) -> Path | None:
    """Configure loguru for this process; returns the log file path (None when not writing one)."""
    logger.remove()
    logger.configure(extra={"proc": name})
    level = cfg.logging.level if cfg else "INFO"
    logger.add(sys.stderr, level=stderr_level or level, format=_FORMAT, colorize=None)
    path = None
    if cfg and to_file:
        log_dir = cfg.resolve_path(cfg.logging.dir)
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            path = log_dir / f"{name}.log"
            logger.add(path, level=level, rotation=cfg.logging.rotation, retention=cfg.logging.retention,
                       serialize=cfg.logging.json_lines, format=_FORMAT, enqueue=False, encoding="utf-8")
        except OSError as e:
            logger.warning("cannot write logs under {}: {} (logging to stderr only)", log_dir, e.strerror)
            path = None
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.WARNING, force=True)
    return path
