"""A group's session watches added at start-up by a child process, and each folder's
``lstat`` taken just after its watch exists.

Why a process: 100 000 ``inotify_add_watch`` calls are ~1 s, mostly in the kernel,
but each is a ctypes call that gives the GIL up and takes it back. A thread doing
them beside a busy event loop (the registry read at start-up) or beside the imports
(``head_start``) waits for the GIL at every call: measured, the walk took 2.9 s
instead of 1.1 and the imports twice as long. A child has its own interpreter: the
watch thread only waits for its answer (no GIL held), and the rest of start-up
runs on the other core.

The child adds to the parent's inotify instance (a watch belongs to the instance,
whichever process holds its descriptor), after ``fchdir`` into the group folder
the parent opened without following a link: each session is named relative to that
very folder (no ``/proc`` walk per name: half the kernel's cost of each add) and
``IN_DONT_FOLLOW|IN_ONLYDIR`` refuse a link or a non-folder in its place, as before.
Just after each add it ``lstat``s the folder: what the start-up check
(``engine.startup_state``) compares with the saved state, taken after the watch
exists, so a later change has its event.

It runs ``python -I -S`` with only the standard library (~25 ms to start), lists
the group folder itself (``scandir``: the folders, and the links, which it neither
follows nor watches) and writes the names and one record per folder. Anything
unexpected (no interpreter, a crash, a short answer) returns None and the caller
lists the folder and adds the watches itself, as before (a watch the child added
is found again: adding it again returns the same descriptor).
"""

from __future__ import annotations

import array
import os
import subprocess
import sys
from dataclasses import dataclass, field

CHILD_FROM = 2000  # sessions in a group: fewer are added in-process (a spawn is ~25 ms)
# per session: wd (or -errno), st_dev, st_ino, st_mode, st_mtime_ns, st_ctime_ns, and the
# inode the listing gave
FIELDS = 7
TIMEOUT = 120.0  # s: 100 000 adds take ~1 s
_HEAD = 4  # values before the names: sessions, links, bytes of names, bytes of texts

CHILD = r"""
import array, ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
add = libc.inotify_add_watch
add.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
add.restype = ctypes.c_int
fd, group_fd, mask, room = (int(a) for a in sys.argv[1:5])
os.fchdir(group_fd)
names, inos, links = [], [], []
with os.scandir(b".") as listing:
    for e in listing:
        if e.is_dir(follow_symlinks=False):
            names.append(e.name)
            inos.append(e.inode())
        elif e.is_symlink():
            links.append(e.name)
out = array.array("q")
texts = [b"\0"] * len(names)  # per folder: "dev:ino", "mtime:ctime" (none: no lstat)
stat = os.stat
for n, name in enumerate(names):
    if n >= room:
        out.extend((-errno.ENOSPC, 0, 0, 0, 0, 0, inos[n]))
        continue
    wd = add(fd, name, mask)
    if wd < 0:
        out.extend((-ctypes.get_errno(), 0, 0, 0, 0, 0, inos[n]))
        if ctypes.get_errno() == errno.ENOSPC:
            room = n
        continue
    try:
        st = stat(name, follow_symlinks=False)
        out.extend((wd, st.st_dev, st.st_ino, st.st_mode, st.st_mtime_ns, st.st_ctime_ns,
                    inos[n]))
        texts[n] = b"%d:%d\0%d:%d" % (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    except OSError:
        out.extend((wd, 0, 0, 0, 0, 0, inos[n]))
blob = b"\0".join(names + links)
text = b"\0".join(texts)
head = array.array("q", (len(names), len(links), len(blob), len(text)))
sys.stdout.buffer.write(head.tobytes() + blob + out.tobytes() + text)
"""


@dataclass(frozen=True)
class Listing:
    """What the child found and did in one group folder: its session folders (in the
    order of ``values``), the links beside them (never followed, never watched: listed
    for whoever refuses them), and ``FIELDS`` values per session folder."""

    names: list[str]
    links: list[str]
    values: array.array
    # per session folder, its lstat as text: "st_dev:st_ino", and "st_mtime_ns:st_ctime_ns"
    # ("" without one). Formatted here, on the other core: 100 000 of them were ~0.2 s
    # of the start-up check (``engine.startup_state.unchanged``), the last step of a
    # restart, which now compares them with the saved rows by C loops
    idents: list[str] = field(default_factory=list)
    times: list[str] = field(default_factory=list)


def big_group(st: os.stat_result) -> bool:
    """Whether a group folder (its ``fstat``) may hold ``CHILD_FROM`` session folders or
    more, without listing it: a folder's link count is 2 + its subfolders, except
    where the filesystem does not count them (1: btrfs, and ext4 past 65 000
    subfolders, where 100 000 sessions are)."""
    return st.st_nlink == 1 or st.st_nlink - 2 >= CHILD_FROM


def add_in_child(inotify_fd: int, group_fd: int, mask: int, room: int) -> Listing | None:
    """The group folder open as ``group_fd`` listed, and a watch added to each session
    folder in it, by a child: ``FIELDS`` values per folder, in order (wd or -errno,
    then st_dev, st_ino, st_mode, st_mtime_ns, st_ctime_ns (0: no ``lstat``), then the
    listing's inode); past ``room`` adds, -ENOSPC. (Flat, 56 bytes a session: 100 000
    tuples of ints would be ~25 MB.) None: the child failed, nothing is known (list
    and add them here).

    The child lists the folder too: in the parent, 100 000 names were ~0.3 s of the
    GIL taken from the imports beside it, before the child could even start."""
    if not sys.executable:  # (an embedded interpreter: no program to run)
        return None
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", CHILD, str(inotify_fd), str(group_fd),
             str(mask), str(room)],
            stdin=subprocess.DEVNULL, capture_output=True,
            pass_fds=(inotify_fd, group_fd), timeout=TIMEOUT, check=False)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return parse_answer(done.returncode, done.stdout)


def parse_answer(returncode: int, answer: bytes) -> Listing | None:
    """The child's answer, or None if it failed or is not whole."""
    top = array.array("q")
    size = top.itemsize
    if returncode != 0 or len(answer) < _HEAD * size:
        return None
    top.frombytes(answer[:_HEAD * size])
    count, links, length, text = top
    at = _HEAD * size + length
    end = at + count * FIELDS * size
    if min(top) < 0 or len(answer) != end + text:
        return None
    names = os.fsdecode(answer[_HEAD * size:at]).split("\0") if count + links else []
    texts = answer[end:].decode("ascii", "replace").split("\0") if count else []
    if len(texts) != 2 * count:
        return None
    values = array.array("q")
    values.frombytes(answer[at:end])
    return Listing(names[:count], names[count:], values, texts[0::2], texts[1::2])
