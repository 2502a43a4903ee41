"""The faces and the composition root: the command line, the demo, logging set-up.

The only layer that names concrete runtimes, channels and the API server.
``orchestrator.cli:main`` is the console script (and the image's entry point).
"""

from orchestrator.cli.commands import main

__all__ = ["main"]
