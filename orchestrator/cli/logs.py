"""Log set-up: loguru, human-readable by default, one flat JSON object per line with a flag.

Log collectors expect flat lines (``time``, ``level``, ``event``, ``message``), not
loguru's nested ``serialize`` record (~900 bytes a line). The session and agent
group a line is about come from ``logger.contextualize(session=..., group=...)``
around a session's pass, so every line of that pass carries them.

``event`` is a short, stable snake_case name to filter on (messages carry ids and
numbers; the event does not): the ``event=`` a line was bound with
(``logger.bind(event="reply_delivered")``) where set, else derived from where the
line was logged: the module's last part and the function, ``delivery_retry_later``
for ``orchestrator/engine/delivery.py: _retry_later`` (loguru keeps no message
template to derive it from). uvicorn's own lines (loggers ``uvicorn``,
``uvicorn.error``, ``uvicorn.access``) are routed through the same sink, with
``event`` = the logger's name (``uvicorn_error``).
"""

from __future__ import annotations

import json as jsonlib
import logging
import re
import sys
from datetime import timezone
from typing import Any, TextIO

from loguru import logger

from orchestrator.config.sections import LogConfig

CONTEXT_KEYS = ("session", "group")
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
_NOT_SNAKE = re.compile(r"[^a-z0-9]+")


def snake(text: str) -> str:
    return _NOT_SNAKE.sub("_", text.lower()).strip("_") or "log"


# Modules split out of another keep its name in ``event``: the names are a contract
# (docs/log-events.md, held by tests/cli/test_log_event_names.py), not the code's layout.
MOVED: dict[str, str] = {
    "orchestrator.api.connections": "server",
    "orchestrator.engine.discovery": "supervisor",
    "orchestrator.engine.sweep": "supervisor",
    "orchestrator.engine.session_ops": "session_worker",
    "orchestrator.engine.session_exit": "session_worker",
    "orchestrator.engine.session_reads": "session_worker",
    "orchestrator.runtime.docker.start": "runtime",
    "orchestrator.runtime.docker.reconcile": "runtime",
    "orchestrator.runtime.kubernetes.ending": "runtime",
}


def event_name(record: dict[str, Any]) -> str:
    """The ``event`` of a log record: its bound ``event`` (made snake_case), else its
    module's last part (or the name it had before a split, ``MOVED``) and function
    (``<module>`` at a module's top level)."""
    bound = record["extra"].get("event")
    if bound:
        return snake(str(bound))
    name = record.get("name") or ""
    module = MOVED.get(name) or name.rsplit(".", 1)[-1]
    function = record.get("function") or ""
    return snake(f"{module}_{function}" if function and function != "<module>" else module)


def flat_record(record: dict[str, Any]) -> dict[str, Any]:
    """The fields a collector indexes: time (UTC ISO-8601), level, message, context."""
    out: dict[str, Any] = {
        "time": record["time"].astimezone(timezone.utc).isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "event": event_name(record),
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


class InterceptHandler(logging.Handler):
    """A standard-library logger's records (uvicorn's) into loguru, so they reach the
    same sink in the same shape: the level kept, ``event`` the logger's name."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.bind(event=record.name).opt(exception=record.exc_info).log(
            level, "{}", record.getMessage())


def intercept_uvicorn() -> None:
    """uvicorn's loggers go to loguru only (no handler of their own, no propagation
    to the root logger, which would print them a second time)."""
    handler = InterceptHandler()
    for name in UVICORN_LOGGERS:
        std = logging.getLogger(name)
        std.handlers = [handler]
        std.propagate = False


def setup_logging(cfg: LogConfig, *, json: bool | None = None, level: str | None = None) -> None:
    """Route all logging to stderr. Called once by the CLI, never at import time."""
    logger.remove()
    intercept_uvicorn()
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
