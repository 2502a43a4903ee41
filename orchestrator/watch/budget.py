"""How many inotify watches the host may use, and what it says when that is too few.

The kernel counts watches per user (``fs.inotify.max_user_watches``, and in a user
namespace also ``user.max_inotify_watches`` of that namespace and of every one above
it: the lowest counts). The host needs one watch for the sessions root, one per agent
group and one per session folder (a session's ``outbox/`` gets one too, but only once
the session shows activity: ``folder_watch``). Before, it needed two per session and
switched the *whole host* to polling when the tree took more than half the budget: at
100 000 sessions every session was polled each second (83-99 % of a core).

Now the watch takes what the budget allows, less a reserve for the user's other
programs (``usable``), and the sessions past it are polled (``polled``: two ``stat``
calls each, a few thousand a second at most), counted in a metric and in ``orchestrator
status``, and named once at start with the sysctl to raise (``warning``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

# the limits, most general first: the lowest of those readable is the budget
LIMIT_FILES = (("fs.inotify.max_user_watches", Path("/proc/sys/fs/inotify/max_user_watches")),
               ("user.max_inotify_watches", Path("/proc/sys/user/max_inotify_watches")))
RESERVE_MIN = 512  # watches left for the user's other programs (editors, dockerd, …)
RESERVE_SHARE = 20  # … or 1/20 of the budget, whichever is more
SUGGEST_MIN = 65536  # the value named in the warning: never less than this


@dataclass(frozen=True, slots=True)
class Limit:
    """The kernel's watch limit for this process: its value and the sysctl that sets it."""

    value: int
    name: str


def read_limit() -> Limit | None:
    """The lowest readable watch limit (None: none can be read, e.g. not Linux)."""
    found: list[Limit] = []
    for name, path in LIMIT_FILES:
        try:
            found.append(Limit(int(path.read_text()), name))
        except (OSError, ValueError):
            continue
    return min(found, key=lambda lim: lim.value) if found else None


def usable(budget: int | None) -> int | None:
    """Watches the host lets itself add out of ``budget`` (None: no limit known): the
    rest is left to the user's other programs, which count against the same limit."""
    if budget is None:
        return None
    return max(1, budget - max(RESERVE_MIN, budget // RESERVE_SHARE))


def suggested(sessions: int, groups: int) -> int:
    """The limit to set so that every session, its ``outbox/`` and the reserve fit, with
    room to grow: twice that, rounded up to a power of two, at least ``SUGGEST_MIN``."""
    need = 1 + groups + 2 * sessions
    need += max(RESERVE_MIN, need // RESERVE_SHARE)
    value = SUGGEST_MIN
    while value < 2 * need:
        value *= 2
    return value


@dataclass(frozen=True, slots=True)
class Shortfall:
    """What a watch past its budget holds (``FolderWatch.shortfall``): the facts of the
    start-up line."""

    sessions: int  # session folders, watched and polled
    groups: int
    polled: int  # sessions past the budget
    kernel_refused: bool  # ENOSPC below the limit: other programs hold the rest
    poll_round: float  # seconds between two looks at one polled session


def warning(*, sessions: int, groups: int, polled: int, limit: Limit | None,
            allowed: int | None, kernel_refused: bool, poll_round: float) -> str | None:
    """The one line said at start when sessions are past the budget (None: none is)."""
    if polled <= 0:
        return None
    name = limit.name if limit is not None else "fs.inotify.max_user_watches"
    if kernel_refused:
        why = "the kernel refused more watches (other programs of this user hold the rest)"
    else:
        why = f"this host uses at most {allowed} (a reserve is left to other programs)"
    have = f"{name}={limit.value}" if limit is not None else name
    return (f"inotify watch budget too small: {sessions} session folders, {have}, {why}; "
            f"{polled} sessions past it are polled instead (each looked at about every "
            f"{poll_round:.1f}s, so their replies are that much slower): set "
            f"'sysctl -w {name}={suggested(sessions, groups)}' "
            "(see README, 'inotify limits')")


def poll_round(polled: int, rate: float, interval: float) -> float:
    """Seconds between two looks at one polled session: every ``interval`` s while at
    most ``rate`` sessions a second cover them all, longer past that."""
    if polled <= 0:
        return interval
    return max(interval, polled / rate)


STATE_FILE = "watch-state.json"  # in the data dir: what ``orchestrator status`` shows


def write_state(data_dir: Path, *, watches: int, polled: int, warning: str | None) -> None:
    """Say what the watch holds for ``orchestrator status`` (another process), atomically;
    a failure (read-only data dir) only costs that line."""
    path = data_dir / STATE_FILE
    tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps({"pid": os.getpid(), "watches": watches,
                                   "polled_sessions": polled, "warning": warning}))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def read_state(data_dir: Path) -> dict | None:
    """What the running host last wrote (None: no host runs, or it said nothing)."""
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if isinstance(state, dict) else None


def status_line(state: dict | None) -> str | None:
    """The line ``orchestrator status`` prints when sessions are polled."""
    if not state or not state.get("polled_sessions"):
        return None
    return (f"{state['polled_sessions']} sessions are past the inotify watch budget and "
            f"polled (slower replies); {state.get('watches', 0)} watches held. "
            + (state.get("warning") or ""))
