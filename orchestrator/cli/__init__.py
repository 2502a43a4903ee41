"""The faces and the composition root: the command line, the demo, logging set-up.

The only layer that names concrete runtimes, channels and the API server.
``orchestrator.cli:main`` is the console script (and the image's entry point).
``main`` is imported when called: importing ``orchestrator.cli.compose`` or
``orchestrator.cli.logs`` directly (``bench.host``, tests) does not import every
subcommand's parser and client first (~0.35 s, before ``bench.host`` can begin its
``watch.head_start``).
"""

from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from orchestrator.cli.commands import main as run_main

    return run_main(argv)


__all__ = ["main"]
