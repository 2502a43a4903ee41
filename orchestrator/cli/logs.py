"""Log set-up: loguru, human-readable by default, one flat JSON object per line with a flag.

Log collectors expect flat lines (``time``, ``level``, ``message``), not loguru's
nested ``serialize`` record (~900 bytes a line). The session and agent group a
line is about come from ``logger.contextualize(session=..., group=...)`` around a
session's pass, so every line of that pass carries them.
"""

from __future__ import annotations

import json as jsonlib
import sys
from datetime import timezone
from typing import Any, TextIO

from loguru import logger

from orchestrator.config.model import LogConfig

CONTEXT_KEYS = ("session", "group")


def flat_record(record: dict[str, Any]) -> dict[str, Any]:
    """The fields a collector indexes: time (UTC ISO-8601), level, message, context."""
    out: dict[str, Any] = {
        "time": record["time"].astimezone(timezone.utc).isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "message": record["message"],
    }
    extra = record["extra"]
    for key in CONTEXT_KEYS:
        if extra.get(key) is not None:
            out[key] = extra[key]
    exc = record["exception"]
    if exc is not None and exc.type is not None:
        out["exception"] = f"{exc.type.__name__}: {exc.value}"
    return out


def json_sink(stream: TextIO):
    def sink(message: Any) -> None:
        stream.write(jsonlib.dumps(flat_record(message.record), ensure_ascii=False,
                                   default=str) + "\n")
        stream.flush()

    return sink


def setup_logging(cfg: LogConfig, *, json: bool | None = None, level: str | None = None) -> None:
    """Route all logging to stderr. Called once by the CLI, never at import time."""
    logger.remove()
    as_json = cfg.json if json is None else json
    if as_json:
        logger.add(json_sink(sys.stderr), level=level or cfg.level, backtrace=False,
                   diagnose=False)
        return
    logger.add(
        sys.stderr,
        level=level or cfg.level,
        format="<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> {message}",
        backtrace=False,
        diagnose=False,
    )
