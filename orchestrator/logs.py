"""Log set-up: loguru, human-readable by default, one JSON object per line with a flag."""

from __future__ import annotations

import sys

from loguru import logger

from orchestrator.config import LogConfig


def setup_logging(cfg: LogConfig, *, json: bool | None = None, level: str | None = None) -> None:
    """Route all logging to stderr. Called once by the CLI, never at import time."""
    logger.remove()
    logger.add(
        sys.stderr,
        level=level or cfg.level,
        serialize=cfg.json if json is None else json,
        format="<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> {message}",
        backtrace=False,
        diagnose=False,
    )
