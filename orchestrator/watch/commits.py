"""Where a batch of one session's changes stands with a commit of its databases.

The host's inotify watch (``folder_watch``) ends a batch a quiet step (3 ms) after
its last change. Both session databases are written with ``journal_mode=DELETE``
(contract §2): a write makes ``<db>-journal``, writes it and the database (with an
fsync or two between) and deletes the journal at its commit. So a batch of one
session that holds a journal's deletion is a finished write, and one that holds a
journal made or written but not yet deleted is a write under way (issue 28).
"""

from __future__ import annotations

from orchestrator.watch.changes import Change

# a session database's rollback journal: made when a write begins, deleted at its commit
COMMIT_ENDS = frozenset({"inbound.db-journal", "outbound.db-journal"})
LONE_COMMIT_MAX = 12  # changes; a reply's commit with a heartbeat is ~5
COMMITTED, OPEN = "committed", "open"
# a batch this big (changes) that still grows is a busy host's: its step may double …
STRETCH_FROM = 32
MAX_STRETCH = 2  # … twice at most: 3 → 6 → 12 ms between reads


def commit_state(root: str, changes: set[tuple[Change, str]]) -> str | None:
    """Where a batch of ONE session's changes stands with a commit of its databases:
    ``COMMITTED`` (a journal was deleted: a write is over, ``journal_mode=DELETE``,
    contract §2), ``OPEN`` (a journal was made or written but not deleted yet: a
    write is under way), else None, and always None for a batch that also holds
    another session's changes, a group's or the root's, or more than
    ``LONE_COMMIT_MAX`` changes.

    Why (issue 28): a batch ends a quiet step (3 ms) after its last change. A
    committed one now ends at once: ~3 ms of every round trip, twice in a cold one
    (the message's commit that starts the agent, the reply's that is delivered). An
    open one waits for its commit (up to the debounce) instead of ending in the
    fsync's quiet: a pass then would read the rows before the write, and the host
    made two or three passes per commit on a loaded machine. Several sessions keep
    the step, so a busy host still gets few, large batches, and nobody waits for
    another session's commit."""
    if len(changes) > LONE_COMMIT_MAX:
        return None
    prefix = root + "/"
    session: tuple[str, str] | None = None
    ended = begun = False
    for change, path in changes:
        parts = path[len(prefix):].split("/", 3)
        if len(parts) < 3 or not path.startswith(prefix):
            return None  # a group or the root itself changed
        if session is None:
            session = (parts[0], parts[1])
        elif session != (parts[0], parts[1]):
            return None
        if len(parts) == 3 and parts[2] in COMMIT_ENDS:
            if change == Change.deleted:
                ended = True
            else:
                begun = True
    return COMMITTED if ended else OPEN if begun else None


def stretch_after(stretch: int, size: int, fresh: bool) -> int:
    """How many times the step is doubled before the next read of an open batch of
    ``size`` changes (``fresh``: the last read found events).

    Why (issue 28): under a steady load from many sessions a batch never sees its
    quiet step and runs to the debounce anyway, at one wake-up of the watch thread
    per step; each takes the GIL from the loop, and the loop's own work then costs
    ~10 % more CPU (measured: a thread waking every 3 ms beside a busy one). So a
    batch of ``STRETCH_FROM`` changes or more (6+ commits: at 100 sessions writing
    flat out it gets there within a step or two) that keeps growing doubles its step,
    up to ``MAX_STRETCH`` times: ~6 reads per 50 ms batch instead of ~17, and the end
    of such a burst is seen at most 12 ms (not 3) after its last change. A round
    trip's batch (one session, a few changes: ``commit_state``) and a paced load's
    (a commit or two per step) never stretch."""
    if fresh and size >= STRETCH_FROM:
        return min(stretch + 1, MAX_STRETCH)
    return stretch
