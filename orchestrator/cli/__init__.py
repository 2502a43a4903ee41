"""The faces and the composition root: the command line, the demo, logging set-up.

The only layer that names concrete runtimes, channels and the API server.
``orchestrator.cli:main`` is the console script (and the image's entry point).
``main`` is imported when called: importing ``orchestrator.cli.compose`` (the
composition root, which ``bench.host`` and tests import directly) does not pay for
every subcommand's parser and client (~0.35 s, issue 28's restart).
"""

from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from orchestrator.cli.commands import main as run_main

    return run_main(argv)


__all__ = ["main"]
