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
COMMITTED, OPEN, BUSY = "committed", "open", "busy"
# how many times the step may double while a busy batch keeps growing: 3 → 6 → 12 ms
MAX_STRETCH = 2


def commit_state(root: str, changes: set[tuple[Change, str]]) -> str | None:
    """Where a batch of ONE session's changes stands with a commit of its databases:
    ``COMMITTED`` (a journal was deleted: a write is over, ``journal_mode=DELETE``,
    contract §2), ``OPEN`` (a journal was made or written but not deleted yet: a
    write is under way), else None; ``BUSY`` for a batch that also holds
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
        return BUSY
    prefix = root + "/"
    session: tuple[str, str] | None = None
    ended = begun = False
    for change, path in changes:
        parts = path[len(prefix):].split("/", 3)
        if len(parts) < 3 or not path.startswith(prefix):
            return BUSY  # a group or the root itself changed
        if session is None:
            session = (parts[0], parts[1])
        elif session != (parts[0], parts[1]):
            return BUSY
        if len(parts) == 3 and parts[2] in COMMIT_ENDS:
            if change == Change.deleted:
                ended = True
            else:
                begun = True
    return COMMITTED if ended else OPEN if begun else None


def stretch_after(stretch: int, state: str | None, fresh: bool) -> int:
    """How many times the step is doubled before the next read of an open batch.

    Why (issue 28): a ``BUSY`` batch (several sessions, or many changes) ends a quiet
    step after its last change or at the debounce. Under a steady load the quiet step
    never comes: every step read a few new events and the batch ran to the debounce
    anyway, at one wake-up of the watch thread per step (each taking the GIL from the
    loop) — most of what events mode cost per reply more than poll mode. So each read
    that finds a busy batch still growing doubles the step, up to ``MAX_STRETCH``
    doublings: ~6 reads per 50 ms batch instead of ~17; the end of a burst is seen at
    most 12 ms (not 3) after its last change. A lone session's batch (a round trip)
    never stretches: it ends at its commit (``commit_state``)."""
    if state == BUSY and fresh:
        return min(stretch + 1, MAX_STRETCH)
    return stretch
