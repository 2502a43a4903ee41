"""Removing a tree an agent controls: by descriptor, iteratively, a bounded step at a time.

``shutil.rmtree(dir_fd=...)`` never follows a link, but it recurses (a 3 000-deep
folder tree fails with RecursionError and is never removed), holds a descriptor per
level, and removes everything in one call (200 000 files kept the event loop for
seconds). ``remove_tree`` instead:

- never follows a link: every folder is opened ``O_NOFOLLOW | O_DIRECTORY`` relative to
  the one above it (``safefs.open_dir``); a link, a FIFO, anything not a folder is
  unlinked, never opened;
- is iterative, and holds at most ``max_depth`` folders open: a folder deeper than that
  is moved up (renamed into the tree's top folder, within the same tree) and removed
  from there later, so any depth is removed with bounded descriptors;
- does at most ``budget`` operations (an unlink, an rmdir, an open or a move) per call
  and says whether it finished; the next call picks up where the tree now stands
  (what was removed is gone), so a caller spreads a huge tree over many short steps.

A tree the agent keeps filling is removed as fast as it is filled, a step at a time;
a folder whose entries cannot be removed at all (e.g. no permission) ends the removal
with ``stuck`` set rather than rescanning it forever.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import Iterator

from orchestrator.host.safefs import Refused, lstat_at, open_dir

MAX_DEPTH = 32  # folders held open at once (two descriptors each while listed)


@dataclass
class Removal:
    ops: int = 0  # unlinks, rmdirs, opens and moves done
    done: bool = False  # the tree is gone (or was never there)
    hoisted: int = 0  # folders moved up because they were deeper than max_depth
    stuck: str | None = None  # why the rest cannot be removed (then done is False)


@dataclass
class _Level:
    fd: int
    name: str  # its name in the folder above
    entries: Iterator[os.DirEntry[str]]  # closed by close_listing
    progress: int = 0  # entries removed or moved from it in this listing


def remove_tree(parent_fd: int, name: str, budget: int, max_depth: int = MAX_DEPTH) -> Removal:
    """Remove ``name`` in the folder ``parent_fd`` (a file, a link, or a whole tree),
    doing at most about ``budget`` operations; ``done`` says whether it is gone.

    Each call walks down again from the top, at most ``max_depth`` opens before it
    removes or moves something, so a budget is never smaller than that: every call
    makes progress."""
    budget = max(budget, max_depth + 2)
    r = Removal()
    st = lstat_at(parent_fd, name)
    if st is None:
        r.done = True
        return r
    if not stat.S_ISDIR(st.st_mode):
        _unlink(parent_fd, name, r)
        r.done = r.stuck is None
        return r
    try:
        top = open_dir(name, parent_fd, name)
    except FileNotFoundError:
        r.done = True
        return r
    except Refused:  # swapped for a link or a file meanwhile
        _unlink(parent_fd, name, r)
        r.done = r.stuck is None
        return r
    stack = [_Level(top, name, os.scandir(top))]
    try:
        _walk(stack, parent_fd, budget, max_depth, r)
    finally:
        for level in stack:
            _close_listing(level)
            os.close(level.fd)
    return r


def _walk(stack: list[_Level], parent_fd: int, budget: int, max_depth: int,
          r: Removal) -> None:
    while stack and r.stuck is None:
        if r.ops >= budget:
            return
        level = stack[-1]
        entry = next(level.entries, None)
        if entry is None:
            _finish(stack, parent_fd, r)
        elif not entry.is_dir(follow_symlinks=False):
            if _unlink(level.fd, entry.name, r):
                level.progress += 1
        elif len(stack) >= max_depth:
            _hoist(level, stack[0].fd, entry.name, r)
        else:
            _descend(stack, entry.name, r)


def _finish(stack: list[_Level], parent_fd: int, r: Removal) -> None:
    """A folder listed to its end: remove it, or list it again if something came in
    (the agent wrote more, or a folder was moved up into it)."""
    level = stack.pop()
    _close_listing(level)
    above = stack[-1].fd if stack else parent_fd
    r.ops += 1
    try:
        os.rmdir(level.name, dir_fd=above)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.ENOTEMPTY or not level.progress:
            r.stuck = f"{level.name}: {exc.strerror}"
            os.close(level.fd)
            return
        stack.append(_Level(level.fd, level.name, os.scandir(level.fd)))
        return
    os.close(level.fd)
    if stack:
        stack[-1].progress += 1
    else:
        r.done = True


def _descend(stack: list[_Level], name: str, r: Removal) -> None:
    level = stack[-1]
    r.ops += 1
    try:
        fd = open_dir(name, level.fd, name)
    except FileNotFoundError:
        return
    except Refused:  # swapped for a link or a file since it was listed
        if _unlink(level.fd, name, r):
            level.progress += 1
        return
    except OSError as exc:
        r.stuck = f"{name}: {exc.strerror}"
        return
    stack.append(_Level(fd, name, os.scandir(fd)))


def _hoist(level: _Level, top_fd: int, name: str, r: Removal) -> None:
    """Move a folder too deep to open into the tree's top folder (removed from there)."""
    r.ops += 1
    for _ in range(3):
        try:
            os.rename(name, f".rm-{os.urandom(8).hex()}", src_dir_fd=level.fd,
                      dst_dir_fd=top_fd)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                continue  # the name is taken (vanishingly unlikely): another one
            r.stuck = f"{name}: cannot move it up ({exc.strerror})"
            return
        r.hoisted += 1
        level.progress += 1
        return


def _close_listing(level: _Level) -> None:
    close = getattr(level.entries, "close", None)  # os.scandir's iterator
    if close is not None:
        close()


def _unlink(dir_fd: int, name: str, r: Removal) -> bool:
    r.ops += 1
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    except IsADirectoryError:  # swapped for a folder since it was listed: next listing
        return True
    except OSError as exc:
        r.stuck = f"{name}: {exc.strerror}"
        return False
    return True
