"""The start-up walk of the events mode, begun before the rest of the process is built.

A restart of 100 000 sessions spends ~1 s adding their inotify watches, nearly all
of it in the kernel (``inotify_add_watch`` releases the GIL), and before that ~0.7 s
importing and building the API, the runtime, the stores: one core busy, the other
idle. The supervisor cannot reconcile before the watches exist (a change made
before its folder's watch is never reported), so the walk was on the restart's
critical path after all of that.

``HeadStart.begin`` (called by the command line as soon as the configuration is
read, before the composition root is imported) builds the ``FolderWatch`` in a
thread of its own; the watch thread takes it (``notifier``) instead of building
one, and every later (re)start of the watch builds a new one as before. Nothing
else changes: the probe still confirms the watch before the start-up reconcile,
and the events that arrive meanwhile wait in the instance's queue (an overflow is
reported as lost events and rescanned, as always).
"""

from __future__ import annotations

import array
import os
import threading
from pathlib import Path
from typing import Container

from loguru import logger

from orchestrator.config.sections import WatchConfig
from orchestrator.watch import budget
from orchestrator.watch.folder_watch import FolderWatch

# ``WatchTable.seen``'s, for one group
Seen = tuple[array.array, dict[str, int], tuple[list[str], list[str]]]


class HeadStart:
    """One ``FolderWatch`` being built in a thread, for the watch thread's first start."""

    def __init__(self, root: Path, cfg: WatchConfig,
                 limit: tuple[budget.Limit | None, int | None]) -> None:
        self.root = root
        self.limits = limit
        self._cfg = cfg
        self._watch: FolderWatch | None = None
        self._taken_watch: FolderWatch | None = None  # for ``seen``, ``listed``
        self._taken = False
        self._thread = threading.Thread(target=self._build, name="folder-watch-start",
                                        daemon=True)

    @classmethod
    def begin(cls, root: Path, cfg: WatchConfig,
              limits: tuple[budget.Limit | None, int | None]) -> HeadStart | None:
        """Start the walk (``limits``: ``watcher.limits()``); None in the poll mode, or
        where the root is not there yet (the first start makes it: nothing to walk)."""
        if cfg.mode == "poll" or not root.is_dir():
            return None
        head = cls(root, cfg, limits)
        head._thread.start()
        return head

    def _build(self) -> None:
        cfg = self._cfg
        try:
            self._watch = FolderWatch(self.root, limit=self.limits[1],
                                      poll_interval=cfg.poll_interval, read_gap_ms=cfg.step_ms,
                                      keep_seen=True)
        except Exception as exc:  # noqa: BLE001 - the watch thread builds one and says why
            logger.debug("{}: the early watch could not be built ({}); building it at start",
                         self.root, exc)

    def take(self, root: Path, muted: Container[str],
             retiring: Container[str] = frozenset()) -> FolderWatch | None:
        """The watch built ahead (once, for ``root``; waits for the walk to end), given
        the worker's ``muted`` set and the supervisor's ``retiring`` one; None: build
        one now."""
        if self._taken or Path(root) != Path(self.root):
            return None
        self._taken = True
        self._thread.join()
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.hear(muted, retiring)
        self._taken_watch = watch
        return watch

    def seen(self) -> dict[str, Seen]:
        """Agent group → (records, session → offset): each session folder's ``lstat``
        taken just after its watch was added (``bulk_add``), if the watch built ahead
        was taken and still runs (a restarted watch's folders were unwatched for a
        while: they are ``lstat``-ed now). Given once, then forgotten (~10 MB)."""
        watch = self._running()
        if watch is None:
            return {}
        seen, watch.seen = watch.seen, {}
        self._taken_watch = None if not watch.listed else watch
        return {os.path.basename(group): records for group, records in seen.items()}

    def listed(self) -> dict[str, list[str]]:
        """Agent group → the names in its folder (session folders and links), as the
        child listed them after the group's watch was added, if the watch built ahead
        was taken and still runs: a folder made since has its event. Given once."""
        watch = self._running()
        if watch is None:
            return {}
        listed, watch.listed = watch.listed, {}
        self._taken_watch = None if not watch.seen else watch
        return {os.path.basename(group): names for group, names in listed.items()}

    def _running(self) -> FolderWatch | None:
        watch = self._taken_watch
        if watch is None or watch.fd < 0:
            self._taken_watch = None
            return None
        return watch

    def close(self) -> None:
        """Never taken (start-up failed first): its walk ended and its watches closed."""
        self._taken = True
        self._thread.join()
        if self._watch is not None:
            self._watch.close()
            self._watch = None
