"""The events mode's watch thread: drives the inotify watch (a ``Notifier``,
``folder_watch.FolderWatch``) for its whole life and tells the loop what it saw.

Separate from ``watcher``, which is the loop's side (the probe, the log lines, the
batches it yields) and the mode choice: this module is everything that runs in the
thread (the step of each wait, signs of lost events, the status it keeps current) and
the messages it posts across to the loop.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Container, Protocol, Self

from orchestrator.config.sections import WatchConfig
from orchestrator.host.private import make_dirs
from orchestrator.watch import budget
from orchestrator.watch import health as watch_health
from orchestrator.watch.activity import Activity, only_muted_heartbeats, to_activities, unmuted
from orchestrator.watch.changes import Change
from orchestrator.watch.folder_watch import FolderWatch, StopEvent

# What the watch holds now, for /metrics and the status file: set by the watch thread.
WATCH_STATE: dict[str, int] = {"watches": 0, "polled_sessions": 0}


def short_budget_warning(shortfall: budget.Shortfall | None, limit: budget.Limit | None,
                         allowed: int | None) -> str | None:
    """The start-up line when the watch polls sessions past the budget, else None."""
    if shortfall is None:
        return None
    return budget.warning(sessions=shortfall.sessions, groups=shortfall.groups,
                          polled=shortfall.polled, limit=limit, allowed=allowed,
                          kernel_refused=shortfall.kernel_refused,
                          poll_round=shortfall.poll_round)


PROBE = ".orchestrator-watch-probe"
# s after a (re)start before the watched inodes are first compared with the folders
# (``watch_health.Gate``): 100 000 sessions are ~0.1 s of walking, which delayed the
# probe's event, and so the start-up reconcile, when it came first
FIRST_VERIFY_IN = 3.0


def watch_step(quiet_for: float, cfg: WatchConfig) -> tuple[int, int, int]:
    """(step, debounce, timeout) in ms for the next wait of the watch.

    Each wake-up of a watch costs CPU: on a VM ~40-80 µs, so 3 ms steps are
    1-1.7 % of a core with nothing to do (measured with watchfiles' watcher, which
    woke every step; ``FolderWatch`` does only while a batch is open). So the short
    ``step_ms`` (a batch ends that soon after the last change) is used while changes
    keep coming, and ``quiet_step_ms`` once
    there were none for ``quiet_after`` s. On the long step the batch ends at the
    wake-up after the one that saw the first change (debounce 1 ms), so a burst
    that starts after a silence is not held for the whole debounce: the first
    change costs one to two long steps, every change after it the short ones.
    The timeout brings a short-step wait back when the quiet spell begins.
    """
    if cfg.quiet_step_ms <= cfg.step_ms:  # turned off
        return (cfg.step_ms, cfg.debounce_ms, 0)
    if quiet_for >= cfg.quiet_after:
        return (cfg.quiet_step_ms, 1, 0)
    return (cfg.step_ms, cfg.debounce_ms, max(1, int((cfg.quiet_after - quiet_for) * 1000)))


# --- the watch thread and what it tells the loop -----------------------------------------


@dataclass(frozen=True, slots=True)
class Started:
    """The watch is (re)starting: confirm it with the probe."""


@dataclass(frozen=True, slots=True)
class Ended:
    """The watch ended without an error (was the root removed?); it restarts."""


@dataclass(frozen=True, slots=True)
class Failed:
    error: Exception
    retry_in: float


@dataclass(frozen=True, slots=True)
class Changes:
    batch: list[Activity]
    probed: bool = False  # the probe file's event was in it: the watch is in place


@dataclass(frozen=True, slots=True)
class Lost:
    """Events may have been lost (see ``watch_health``): rescan every session."""

    reason: str
    warn: bool = True  # the first sign of an episode is logged; the rest only rescan


@dataclass(frozen=True, slots=True)
class Restarting:
    """Folders are not watched: the watch restarts (and rescans once confirmed)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Short:
    """The watch budget does not cover every session: the line to say (once)."""

    warning: str


@dataclass(frozen=True, slots=True)
class Finished:
    """The thread is done (halted)."""


WatchMessage = Started | Ended | Failed | Changes | Lost | Restarting | Short | Finished


class Notifier(Protocol):
    """What the watch thread drives: ``folder_watch.FolderWatch``, or a test's stand-in."""

    @property
    def fd(self) -> int | None:
        """Its inotify instance (queue checks by FIONREAD), None if it has none."""
        ...

    def watch(self, *, debounce_ms: int, step_ms: int, timeout_ms: int,
              stop_event: StopEvent | None) -> set[tuple[Change, str]] | str:
        """A batch of changes, or "timeout", "stop" (``stop_event`` set) or "signal"."""
        ...

    def watched_inodes(self) -> set[int] | None:
        """The inodes it watches (None: it cannot say)."""
        ...

    def take_lost(self) -> str | None:
        """Why events were lost since the last call (e.g. a queue overflow), or None."""
        ...

    def counts(self) -> tuple[int, int]:
        """(watches held, session folders polled): read at every step, so cheap."""
        ...

    def shortfall(self) -> budget.Shortfall | None:
        """The facts of the over-budget line, None while no session is polled."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


STATE_EVERY = 5.0  # s: the status file is rewritten at most this often


class StateNote:
    """What the watch holds, kept current for /metrics (``WATCH_STATE``) and
    ``orchestrator status`` (the status file: rewritten when the polled count changed,
    at most every ``STATE_EVERY`` s). One per watch thread."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.at = 0.0
        self.polled = -1

    def note(self, notify: Notifier, warning: str | None, force: bool = False) -> None:
        watches, polled = notify.counts()
        WATCH_STATE["watches"], WATCH_STATE["polled_sessions"] = watches, polled
        now = time.monotonic()
        if force or (polled != self.polled and now - self.at >= STATE_EVERY):
            self.at, self.polled = now, polled
            budget.write_state(self.data_dir, watches=watches, polled=polled,
                               warning=warning if polled else None)

    def announce(self, notify: Notifier, limits: tuple[budget.Limit | None, int | None],
                 post: Callable[[WatchMessage], None]) -> str | None:
        """A new watch: its counts, and the warning if it polls sessions (returned:
        ``note`` repeats it in the status file)."""
        short = short_budget_warning(notify.shortfall(), *limits)
        if short is not None:
            post(Short(short))
        self.note(notify, short, force=True)
        return short


NotifierFactory = Callable[[Path], Notifier]  # the sessions root → a running watch on it


def watch_thread(root: Path, cfg: WatchConfig, halt: threading.Event,
                 post: Callable[[WatchMessage], None], muted: Container[str],
                 notifier: NotifierFactory = FolderWatch,
                 limits: tuple[budget.Limit | None, int | None] = (None, None)) -> None:
    """The inotify watch (``folder_watch.FolderWatch``) in one long-lived thread.

    A worker-thread call per batch (watchfiles' ``awatch``) was a third of the
    supervisor's CPU with 100 agents heartbeating. Here the watch runs in one thread
    for its whole life, its step can change between waits (``watch_step``), batches
    are classified here, and only a batch with something the loop wants costs a
    ``call_soon_threadsafe``. ``notifier`` makes the watch (a ``Notifier``; tests
    script a stand-in).
    (Re)starts are announced so the probe can run; signs of lost events
    (``watch_health``) are announced so the loop rescans.
    """
    probe = os.path.normpath(os.path.join(root, PROBE))
    prefix = os.path.join(str(root), "")
    failures = 0
    state = StateNote(root.parent)
    while not halt.is_set():
        make_dirs(root)
        post(Started())
        try:
            queue = watch_health.queue_limit()  # what the new instance gets
            notify = notifier(root)
            with notify:
                short = state.announce(notify, limits, post)
                # (a walk of every session folder: once per dormant cycle, not per sweep)
                gate = watch_health.Gate(halt, root, notify.fd, queue,
                                         max(cfg.sweep_interval, cfg.dormant_sweep_interval),
                                         notify.watched_inodes, FIRST_VERIFY_IN)
                last_change = time.monotonic()
                episodes = watch_health.Episodes()
                while True:
                    step, debounce, timeout = watch_step(time.monotonic() - last_change, cfg)
                    owed = episodes.due_in(time.monotonic())
                    if owed is not None:  # come back in time for the owed rescan
                        due = max(1, int(owed * 1000))
                        timeout = min(timeout, due) if timeout else due
                    gate.arm()
                    raw = notify.watch(debounce_ms=debounce, step_ms=step, timeout_ms=timeout,
                                       stop_event=gate)
                    now = time.monotonic()
                    sign = (gate.take_sign() or notify.take_lost()
                            or (None if isinstance(raw, str) else watch_health.loss_sign(
                                gap=0.0, pending=0, batch=len(raw), queue=queue)))
                    rescan = episodes.step(sign, now)
                    if rescan is not None:
                        post(Lost(*rescan))
                    state.note(notify, short)
                    if raw == "timeout":
                        continue
                    if isinstance(raw, str):  # "stop" (halt or restart) or "signal"
                        break
                    last_change = now
                    failures = 0
                    if muted and only_muted_heartbeats(prefix, raw, muted):
                        continue
                    probed = any(p.endswith(PROBE) and os.path.normpath(p) == probe
                                 for _, p in raw)
                    batch = unmuted(to_activities(root, raw), muted)
                    if batch or probed:
                        post(Changes(batch, probed))
            if gate.restart is not None and not halt.is_set():
                post(Restarting(gate.restart))
            elif not halt.is_set():  # the watch ended without an error
                post(Ended())
        except Exception as exc:  # noqa: BLE001 - reported to the loop, then retried
            failures += 1
            post(Failed(exc, min(30, failures)))
            halt.wait(min(30, failures))
    post(Finished())

