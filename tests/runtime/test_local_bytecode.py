"""The reference agent's byte code is compiled by the host (``runtime.local.bytecode``):
an agent started from a fresh copy of the package, with no ``__pycache__`` anywhere,
compiles nothing and writes nothing, whether the byte code went into the package or
into the data dir's compiled copy (``agent-code/``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.runtime.local import bytecode
from orchestrator.runtime.local.runtime import AGENT_MAIN, PACKAGE_ROOT, quick_start

# Imports what the agent imports on its way to a reply, counting every module the
# import system had to compile from source (no current .pyc) and every file it wrote.
PROBE = """
import json, sys, _frozen_importlib_external as ext
compiled = []
original = ext.SourceLoader.source_to_code
def source_to_code(self, data, path, *a, **k):
    compiled.append(path)
    return original(self, data, path, *a, **k)
ext.SourceLoader.source_to_code = source_to_code
import orchestrator.agent.agent, orchestrator.agent.files, orchestrator.contract.inotify
print(json.dumps({"compiled": compiled, "dont_write": sys.flags.dont_write_bytecode,
                  "agent": orchestrator.agent.agent.__file__}))
"""


def fresh_copy(tmp_path: Path) -> Path:
    """The agent's part of the package, copied without any byte code."""
    root = tmp_path / "pkg"
    src = Path(PACKAGE_ROOT) / "orchestrator"
    (root / "orchestrator").mkdir(parents=True)
    shutil.copy2(src / "__init__.py", root / "orchestrator" / "__init__.py")
    for sub in ("contract", "agent"):
        shutil.copytree(src / sub, root / "orchestrator" / sub,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    assert not list(root.rglob("*.pyc"))
    return root


def files_under(*roots: Path) -> set[Path]:
    return {p for r in roots for p in r.rglob("*") if p.is_file()}


def probe(root: Path, env_extra: dict[str, str], cwd: Path) -> dict:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(root),
           **env_extra}
    out = subprocess.run([sys.executable, "-S", "-P", "-c", PROBE], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("into_package", [True, False])
def test_an_agent_start_compiles_and_writes_nothing(tmp_path: Path, into_package: bool) -> None:
    root = fresh_copy(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    package = str(root / "orchestrator")

    # without the host's compile, a start compiles every module it imports
    before = probe(root, {"PYTHONDONTWRITEBYTECODE": "1"}, tmp_path)
    assert len([p for p in before["compiled"] if "/orchestrator/" in p]) >= 8

    got = bytecode.prepare(package, data, own_uid_agents=True, into_package=into_package)
    assert got is not None
    assert got.compiled == len(bytecode.agent_sources(package)) and got.current == 0
    if into_package:
        assert got.root is None
    else:
        assert got.root == str(data / bytecode.CODE_DIR)
        assert not list(root.rglob("*.pyc"))  # nothing written into the package
        assert (data / bytecode.CODE_DIR).stat().st_mode & 0o777 == 0o700

    runs_from = Path(got.root) if got.root else root
    written = files_under(root, data)
    after = probe(runs_from, got.env(), tmp_path)
    assert after["compiled"] == []  # nothing at all: the standard library's is current too
    assert after["dont_write"] == 1
    assert after["agent"].startswith(str(runs_from))
    assert files_under(root, data) == written  # the start wrote no byte code

    again = bytecode.prepare(package, data, own_uid_agents=True, into_package=into_package)
    if into_package:
        assert again == bytecode.Bytecode(None, 0, got.compiled)  # a restart: stats only
    else:  # the copy's byte code is made afresh at each runtime start
        assert again == bytecode.Bytecode(got.root, got.compiled, 0)


def test_the_copy_follows_the_package_byte_for_byte(tmp_path: Path) -> None:
    root = fresh_copy(tmp_path)
    package = str(root / "orchestrator")
    first = bytecode.prepare(package, tmp_path, own_uid_agents=True, into_package=False)
    assert first is not None and first.root is not None
    beat = root / "orchestrator" / "agent" / "beat.py"
    beat.write_text(beat.read_text() + "\n# changed\n")
    (root / "orchestrator" / "agent" / "files.py").unlink()
    copy = Path(first.root) / "orchestrator" / "agent"
    # an edit of the copy that keeps its size and mtime is undone too
    decide = copy / "decide.py"
    st = decide.stat()
    decide.write_bytes(decide.read_bytes().replace(b"echo: ", b"evil: "))
    os.utime(decide, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = bytecode.prepare(package, tmp_path, own_uid_agents=True, into_package=False)
    assert again == bytecode.Bytecode(first.root, first.compiled - 1, 0)
    assert (copy / "beat.py").read_text().endswith("# changed\n")
    assert not (copy / "files.py").exists()  # gone from the package, gone from the copy
    assert b"evil: " not in decide.read_bytes()


def test_agents_of_another_uid_run_from_the_package(tmp_path: Path) -> None:
    """A private folder of the data dir is unreadable to agents with uids of their own:
    no copy then; a package that has its byte code is used as it is."""
    root = fresh_copy(tmp_path)
    package = str(root / "orchestrator")
    assert bytecode.prepare(package, tmp_path, own_uid_agents=False, into_package=False) is None
    assert not (tmp_path / bytecode.CODE_DIR).exists()
    bytecode.prepare(package, tmp_path, own_uid_agents=True, into_package=True)
    count = len(bytecode.agent_sources(package))
    assert bytecode.prepare(package, tmp_path, own_uid_agents=False,
                            into_package=False) == bytecode.Bytecode(None, 0, count)


def test_quick_start_runs_the_compiled_copy_without_writing() -> None:
    configured = ("{python}", "-m", "orchestrator.agent")
    cmd = [sys.executable, "-m", "orchestrator.agent", "--workspace", "/w"]
    got_cmd, env = quick_start(configured, cmd, {"PYTHONPATH": "/g"},
                               bytecode.Bytecode("/d/agent-code", 0, 13))
    assert got_cmd == [sys.executable, "-S", "-P", "/d/agent-code/orchestrator/agent/__main__.py",
                       "--workspace", "/w"]
    assert env == {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": "/d/agent-code" + os.pathsep + "/g"}
    got_cmd, env = quick_start(configured, cmd, {}, bytecode.Bytecode(None, 0, 13))
    assert got_cmd[3] == AGENT_MAIN and env["PYTHONPATH"] == PACKAGE_ROOT
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    got_cmd, env = quick_start(("python3", "agent.py"), ["python3", "agent.py"], {},
                               bytecode.Bytecode("/d/x", 0, 1))
    assert env == {}  # another agent's interpreter: its byte code is its own business
