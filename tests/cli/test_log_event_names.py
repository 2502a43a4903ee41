"""The ``event`` names of the JSON logs are a contract (README, "JSON logs"): the list in
``docs/log-events.md`` is every name a log call of the code can derive (module and
function, ``cli.logs.event_name``). Moving a function to another module must not rename
its events (``cli.logs.MOVED`` keeps the old module name); a new or removed event is a
deliberate change of that list."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from orchestrator.cli.logs import event_name

ROOT = Path(__file__).parents[2]
LEVELS = {"trace", "debug", "info", "success", "warning", "error", "critical", "exception",
          "log"}
LISTED = re.compile(r"^- `([a-z0-9_]+)`")


def _logger_call(node: ast.AST) -> bool:
    """``logger.<level>(…)``, also through ``logger.opt(…)`` / ``logger.bind(…)``."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in LEVELS):
        return False
    base: ast.AST = node.func.value
    while isinstance(base, (ast.Call, ast.Attribute)):
        if isinstance(base, ast.Call) and isinstance(base.func, ast.Attribute) \
                and base.func.attr == "bind":
            return False  # an explicitly bound event is its own name
        base = base.func if isinstance(base, ast.Call) else base.value
    return isinstance(base, ast.Name) and base.id == "logger"


def derived_events() -> set[str]:
    found: set[str] = set()
    for path in sorted((ROOT / "orchestrator").rglob("*.py")):
        if "agent" in path.relative_to(ROOT).parts[1:2]:
            continue  # the agent image logs nothing through loguru
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)

        def visit(node: ast.AST, function: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    visit(child, child.name)
                    continue
                if _logger_call(child):
                    found.add(event_name({"extra": {}, "name": module,
                                          "function": function}))
                visit(child, function)

        visit(ast.parse(path.read_text()), "<module>")
    return found


def listed_events() -> set[str]:
    text = (ROOT / "docs" / "log-events.md").read_text()
    return {m.group(1) for line in text.splitlines() if (m := LISTED.match(line))}


def test_every_derived_log_event_is_listed_and_every_listed_one_is_logged() -> None:
    derived, listed = derived_events(), listed_events()
    assert derived == listed, (
        f"new events {sorted(derived - listed)}, gone {sorted(listed - derived)}: if code "
        "moved, keep its old module name in orchestrator/cli/logs.py MOVED; if the change "
        "is meant, update docs/log-events.md")
