"""The reference agent's byte code, compiled by the host once, so no agent start compiles.

A Python start that finds no current ``.pyc`` for a module compiles its source
(and writes the ``.pyc`` if it can). For the reference agent that is ~25 ms of a
~60 ms cold round trip on the bench's VM: every start of a fresh checkout run
with ``PYTHONDONTWRITEBYTECODE=1``, of an install whose package folder is
read-only, or of any agent whose uid may not write the package, paid it again.

So the local runtime compiles the agent's modules (the package root,
``contract/`` and ``agent/``: everything it imports, ``AGENT_SOURCES``) when it is
built (``prepare``), and starts every reference agent with
``PYTHONDONTWRITEBYTECODE=1`` (a start never writes byte code):

- into the package's own ``__pycache__`` when this process may write there and
  ``PYTHONDONTWRITEBYTECODE`` is not set (what pip and ``compileall`` do);
- otherwise into a copy of those sources, ``<data_dir>/agent-code/`` (private to
  the host's uid), compiled there; the agents run from the copy. Not
  ``PYTHONPYCACHEPREFIX``: under a prefix the interpreter looks for the standard
  library's byte code there too, and compiled ``sqlite3``, ``datetime``,
  ``threading``… at every start. Agents with a uid of their own (``uid_range``)
  cannot read a private folder: then a package without current byte code is said
  once, with the fix (``python -m compileall``).

In the package, ``.pyc`` files that are already current (their header holds the
source's mtime and size) are left alone, so a restart costs a ``stat`` per module.
The data dir's copy is checked byte for byte against the package and compiled
afresh at each start of the runtime (13 small files, ~25 ms): an agent of the
host's uid could have edited it.
"""

from __future__ import annotations

import importlib.util
import os
import py_compile
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from orchestrator.host.private import make_dirs

CODE_DIR = "agent-code"  # under the data dir, when the package's own folder is not used
AGENT_SOURCES = ("__init__.py", "contract", "agent")  # relative to the package folder
_DONT_WRITE = {"PYTHONDONTWRITEBYTECODE": "1"}


@dataclass(frozen=True)
class Bytecode:
    """Where the agents run from: ``root`` None = the package itself, else the folder
    holding the compiled copy's ``orchestrator/``; ``compiled`` = modules (re)compiled
    now, ``current`` = already fine."""

    root: str | None
    compiled: int
    current: int

    def env(self) -> dict[str, str]:
        """The agent's environment additions: it never writes byte code."""
        return dict(_DONT_WRITE)


def agent_sources(package_dir: str) -> list[str]:
    """The ``.py`` files the reference agent imports, relative to the package's
    parent (``orchestrator/...``), sorted; links are skipped."""
    parent = os.path.dirname(os.path.abspath(package_dir))
    out: list[str] = []
    for rel in AGENT_SOURCES:
        top = os.path.join(package_dir, rel)
        if os.path.isfile(top) and not os.path.islink(top):
            out.append(os.path.relpath(top, parent))
            continue
        for name in sorted(os.listdir(top)) if os.path.isdir(top) else []:
            path = os.path.join(top, name)
            if name.endswith(".py") and os.path.isfile(path) and not os.path.islink(path):
                out.append(os.path.relpath(path, parent))
    return sorted(out)


def is_current(source: str, pyc: str) -> bool:
    """Whether ``pyc`` is one this interpreter loads for ``source`` without compiling:
    its magic number, a timestamp-checked header, and the source's mtime and size."""
    try:
        st = os.stat(source)
        with open(pyc, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return False
    return (len(head) == 16 and head[:4] == importlib.util.MAGIC_NUMBER
            and int.from_bytes(head[4:8], "little") == 0
            and int.from_bytes(head[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
            and int.from_bytes(head[12:16], "little") == st.st_size & 0xFFFFFFFF)


def compile_all(root: str, sources: list[str], *, force: bool = False) -> tuple[int, int]:
    """(compiled, already current) for ``sources`` (relative to ``root``) into their
    ``__pycache__``; OSError when one cannot be written. ``force``: compile even what
    looks current (the data dir's copy: its byte code is never trusted across runs)."""
    compiled = current = 0
    for rel in sources:
        source = os.path.join(root, rel)
        pyc = importlib.util.cache_from_source(source)
        if not force and is_current(source, pyc):
            current += 1
            continue
        try:
            py_compile.compile(source, cfile=pyc, doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
        except py_compile.PyCompileError as exc:
            raise OSError(f"{source}: {exc.msg}") from None
        compiled += 1
    return compiled, current


def _same_bytes(a: str, b: str) -> bool:
    try:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            return fa.read() == fb.read()
    except FileNotFoundError:
        return False


def mirror(parent: str, sources: list[str], dest: str) -> None:
    """Copy ``sources`` (relative to ``parent``) under ``dest`` where the copy is missing
    or its bytes differ (copy2 keeps the mtime the byte code is checked against);
    ``.py`` files there that are no longer sources are removed. Bytes, not size and
    mtime: an agent of the host's uid could edit a copy and keep both."""
    wanted = set(sources)
    for rel in sources:
        src, dst = os.path.join(parent, rel), os.path.join(dest, rel)
        if _same_bytes(src, dst):
            continue
        make_dirs(Path(dst).parent)
        tmp = dst + ".tmp"
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    for dirpath, _dirs, files in os.walk(dest):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), dest)
            if name.endswith(".py") and rel not in wanted:
                os.unlink(os.path.join(dirpath, name))


def prepare(package_dir: str, data_dir: Path, own_uid_agents: bool, *,
            into_package: bool | None = None) -> Bytecode | None:
    """Compile the agent's modules where its starts will find them (module docstring);
    None (one warning line) when no place works: the agent then runs from the package
    and compiles what it lacks. ``own_uid_agents``: agents run as this process's uid,
    so a private folder of the data dir is readable to them. ``into_package``: try the
    package's ``__pycache__`` first (default: unless ``PYTHONDONTWRITEBYTECODE`` is set)."""
    parent = os.path.dirname(os.path.abspath(package_dir))
    sources = agent_sources(package_dir)
    if into_package if into_package is not None else not sys.dont_write_bytecode:
        try:
            compiled, current = compile_all(parent, sources)
            return Bytecode(None, compiled, current)
        except OSError as exc:
            logger.debug("agent byte code not written into the package ({}); using {}/",
                         exc, CODE_DIR)
    if not own_uid_agents:
        if all(is_current(os.path.join(parent, s),
                          importlib.util.cache_from_source(os.path.join(parent, s)))
               for s in sources):
            return Bytecode(None, 0, len(sources))
        logger.warning("the reference agent's modules in {} have no current byte code and "
                       "agents with their own uid cannot read {}/: each start compiles them "
                       "(~25 ms); fix: python -m compileall {}", package_dir, CODE_DIR,
                       package_dir)
        return None
    root = str(make_dirs(Path(data_dir) / CODE_DIR))
    try:
        mirror(parent, sources, root)
        compiled, current = compile_all(root, sources, force=True)
    except OSError as exc:
        logger.warning("the reference agent's byte code could not be written to {} ({}): "
                       "each start compiles its modules (~25 ms)", root, exc)
        return None
    return Bytecode(root, compiled, current)
