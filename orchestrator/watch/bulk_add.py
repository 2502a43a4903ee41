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

It runs ``python -I -S`` with only the standard library (~25 ms to start), reads
the names on stdin and writes one record per name. Anything unexpected (no
interpreter, a crash, a short answer) returns None and the caller adds the watches
itself, as before (a watch the child added is found again: adding it again returns
the same descriptor).
"""

from __future__ import annotations

import array
import os
import subprocess
import sys

CHILD_FROM = 2000  # sessions in a group: fewer are added in-process (a spawn is ~25 ms)
FIELDS = 6  # per name: wd (or -errno), st_dev, st_ino, st_mode, st_mtime_ns, st_ctime_ns
TIMEOUT = 120.0  # s: 100 000 adds take ~1 s

CHILD = r"""
import array, ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
add = libc.inotify_add_watch
add.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
add.restype = ctypes.c_int
fd, group_fd, mask, room = (int(a) for a in sys.argv[1:5])
data = sys.stdin.buffer.read()
names = data.split(b"\0") if data else []
os.fchdir(group_fd)
out = array.array("q")
stat = os.stat
for n, name in enumerate(names):
    if n >= room:
        out.extend((-errno.ENOSPC, 0, 0, 0, 0, 0))
        continue
    wd = add(fd, name, mask)
    if wd < 0:
        out.extend((-ctypes.get_errno(), 0, 0, 0, 0, 0))
        if ctypes.get_errno() == errno.ENOSPC:
            room = n
        continue
    try:
        st = stat(name, follow_symlinks=False)
        out.extend((wd, st.st_dev, st.st_ino, st.st_mode, st.st_mtime_ns, st.st_ctime_ns))
    except OSError:
        out.extend((wd, 0, 0, 0, 0, 0))
sys.stdout.buffer.write(out.tobytes())
"""

def add_in_child(inotify_fd: int, group_fd: int, names: list[str], mask: int,
                 room: int) -> array.array | None:
    """``FIELDS`` values per name, in order: wd or -errno, then st_dev, st_ino,
    st_mode, st_mtime_ns, st_ctime_ns (0: no ``lstat``); past ``room`` adds, -ENOSPC.
    (Flat, 48 bytes a session: 100 000 tuples of ints would be ~25 MB.) None: the
    child failed, nothing is known (add them here)."""
    if not sys.executable:  # (an embedded interpreter: no program to run)
        return None
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", CHILD, str(inotify_fd), str(group_fd),
             str(mask), str(room)],
            input=b"\0".join(os.fsencode(n) for n in names), capture_output=True,
            pass_fds=(inotify_fd, group_fd), timeout=TIMEOUT, check=False)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    values = array.array("q")
    if done.returncode != 0 or len(done.stdout) != len(names) * FIELDS * values.itemsize:
        return None
    values.frombytes(done.stdout)
    return values
