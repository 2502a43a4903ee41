"""orchestrator: runs AI agent sessions in containers and watches their session folders.

The package root holds only what every layer may ask for, the distribution's name and
version. It is copied into the agent image as well, so it stays stdlib-only and imports
nothing at import time (the agent's cold start is measured in milliseconds).
"""

DISTRIBUTION = "agent-session-orchestrator"  # the distribution is not named orchestrator


def version() -> str:
    """The installed distribution's version, or a plain word when run from a source tree."""
    from importlib import metadata  # only when asked: the agent never asks

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"
