"""``[docker] mounts``: which extra mounts the config allows, as plain records.

Validation only, no Docker: ``groups.preflight`` refuses a bad mount before ``run``
starts (one line, exit code 2), and ``runtime.docker.spec`` turns the same records
into docker ``Mount`` objects at each start, so the two can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from orchestrator.config.sections import DockerConfig

WORKSPACE = "/workspace"  # the session folder inside the container: no extra mount there


class MountNotAllowed(ValueError):
    """An extra mount (or a session folder) that the config does not allow."""


@dataclass(frozen=True, slots=True)
class ExtraMount:
    """One ``HOST:CONTAINER[:ro]`` entry, checked: ``source`` is the real host path."""

    source: str
    target: str
    read_only: bool


def is_under(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def extra_mounts(config: DockerConfig) -> list[ExtraMount]:
    """``[docker] mounts`` as records; each host path must be under an allowed root.

    Paths are resolved (symlinks followed) before the check, so a symlink cannot
    smuggle a folder in. Targets may not be /workspace or inside it (the session
    folder belongs to the contract). Raises MountNotAllowed with a one-line message.
    """
    allowed = [Path(a).expanduser().resolve() for a in config.allowed_mounts]
    mounts: list[ExtraMount] = []
    for spec in config.mounts:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise MountNotAllowed(f"[docker] mounts entry {spec!r}: use 'HOST:CONTAINER[:ro]'")
        host, target = Path(parts[0]).expanduser(), PurePosixPath(parts[1])
        read_only = len(parts) == 3 and parts[2] == "ro"
        if not host.is_absolute() or not target.is_absolute():
            raise MountNotAllowed(f"[docker] mounts entry {spec!r}: both paths must be absolute")
        ws = PurePosixPath(WORKSPACE)
        if target == ws or ws in target.parents:
            raise MountNotAllowed(
                f"[docker] mounts entry {spec!r}: {WORKSPACE} is the session folder; "
                "mount somewhere else")
        real = host.resolve()
        if not any(is_under(real, root) for root in allowed):
            raise MountNotAllowed(
                f"[docker] mounts entry {spec!r}: {real} is not under any [docker] "
                f"allowed_mounts ({', '.join(map(str, allowed)) or 'none configured'})")
        mounts.append(ExtraMount(source=str(real), target=str(target), read_only=read_only))
    return mounts
