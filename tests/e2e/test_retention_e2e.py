"""Retention end to end (issue 26.1): a real ``orchestrator`` process SIGKILLed in the
middle of a prune and in the middle of an archive; the next start finishes or undoes
what was cut short, nothing is lost, and a restored session answers again.

Invariants checked after the restart, for every session: either it is whole (registry
row, folder, its files byte for byte) or it is archived (no row, no folder, a complete
archive holding its files and rows) — never both, never neither; no journal row, no
folder left in ``.removing/``, no ``.part`` file. Sessions with pending work are never
taken, and their messages are answered exactly once.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import tomli_w

from orchestrator.config.load import load_config
from orchestrator.contract.layout import registry_path, session_dir
from orchestrator.host import removals, session_archive
from orchestrator.host.registry import Registry
from orchestrator.host.retention import REMOVING, archive_dir
from orchestrator.host.sessions import MessagingGroup, Sessions
from tests.support.e2e import OrchestratorProcess, config_dict, replies
from tests.support.helpers import wait_for
from tests.support.retention import age, settled_session

SESSIONS = 240
PAYLOAD = 64 * 1024


def write_config(tmp_path: Path, archive_after: float) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps(config_dict(tmp_path, retention={
        "archive_after": archive_after, "sweep_interval": 1.0, "batch": 5})))
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_whole_or_archived(data: Path, arch: Path, reg: Registry,
                            blobs: dict[str, str]) -> tuple[int, int]:
    """(whole, archived); fails on any session that is neither or both."""
    whole = archived = 0
    for sid, blob in blobs.items():
        folder = session_dir(data, "g", sid)
        archive = session_archive.archive_path(arch, "g", sid)
        row = reg.session(sid)
        if row is not None:
            assert folder.is_dir() and not archive.exists(), sid
            assert digest(folder / "notes" / "blob") == blob, sid
            whole += 1
        else:
            assert not folder.exists() and archive.is_file(), sid
            with tarfile.open(archive) as tar:
                names = set(tar.getnames())
                assert {"registry.json", "session/inbound.db", "session/notes/blob"} <= names
                member = tar.extractfile("session/notes/blob")
                assert member is not None
                assert hashlib.sha256(member.read()).hexdigest() == blob, sid
                rows = json.loads(tar.extractfile("registry.json").read())  # type: ignore[union-attr]
                assert rows["sessions"][0]["id"] == sid
            archived += 1
    assert removals.pending(reg) == []
    assert not list((data / REMOVING).glob("*")) if (data / REMOVING).exists() else True
    assert not list(arch.rglob("*.part"))
    return whole, archived


def test_sigkill_mid_prune_loses_nothing_and_a_restored_session_answers(
        tmp_path: Path, reap_agents) -> None:
    config = write_config(tmp_path, archive_after=3600)
    cfg = load_config(config_dict(tmp_path), tmp_path)
    data = cfg.data_dir
    reg = Registry(registry_path(data))
    sessions = Sessions(data, reg, 1 << 20)
    blobs: dict[str, str] = {}
    for i in range(SESSIONS):
        sid = settled_session(sessions, reg, data, platform=f"old-{i}", payload=PAYLOAD)
        blobs[sid] = digest(session_dir(data, "g", sid) / "notes" / "blob")
    age(reg, list(blobs))
    # old but busy: a pending message each (never taken, answered after the restart)
    busy = []
    for i in range(3):
        row = sessions.resolve("g", MessagingGroup("cli", f"busy-{i}"), None, "shared")
        mid, _ = sessions.write_message(row, {"text": f"busy {i}"}, process_after=None)
        busy.append((row.id, mid))
    age(reg, [sid for sid, _ in busy])
    reg.close()
    arch = archive_dir(data, cfg.retention)

    orch = OrchestratorProcess(config, tmp_path / "run1.log")
    try:
        orch.wait_up()
        wait_for(lambda: len(list(arch.glob("g/*.tar.gz"))) >= SESSIONS // 4
                 or orch.proc.poll() is not None, timeout=60, interval=0.005,
                 message="a quarter of the sessions archived")
        orch.proc.send_signal(signal.SIGKILL)  # in the middle of the prune
        assert orch.proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if orch.proc.poll() is None:
            orch.proc.kill()
    done_before = len(list(arch.glob("g/*.tar.gz")))
    assert done_before < SESSIONS, "the prune ended before the kill: nothing was cut short"
    with Registry(registry_path(data)) as reg1:
        cut_short = len(removals.pending(reg1))  # usually 1: the thread is rarely idle

    # the next start, retention off: it finishes or undoes what the kill cut short
    write_config(tmp_path, archive_after=0)
    restored = next(iter(sorted(arch.glob("g/*.tar.gz")))).name.removesuffix(".tar.gz")
    orch = OrchestratorProcess(config, tmp_path / "run2.log")
    try:
        orch.wait_up()
        with Registry(registry_path(data)) as reg2:
            whole, archived = check_whole_or_archived(data, arch, reg2, blobs)
            assert whole + archived == SESSIONS and archived >= SESSIONS // 4
            for sid, _ in busy:  # never taken
                assert reg2.session(sid) is not None
        # a restored session works again: its chat's next message is answered by it
        out = subprocess.run([sys.executable, "-m", "orchestrator", "sessions", "restore",
                              restored, "--config", str(config), "--json"],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["action"] == "restored"
        platform = None
        with Registry(registry_path(data)) as reg2:
            row = reg2.session(restored)
            assert row is not None and row.messaging_group_id is not None
            platform = reg2.messaging_group(row.messaging_group_id)[1]  # type: ignore[index]
            s2 = Sessions(data, reg2, 1 << 20)
            again = s2.resolve("g", MessagingGroup("cli", platform), None, "shared")
            assert again.id == restored
            mid, _ = s2.write_message(again, {"text": "are you back?"})
        wait_for(lambda: any(r.get("in_reply_to") == mid for r in replies(cfg)),
                 timeout=60, message="the restored session's reply")
        wait_for(lambda: all(any(r.get("in_reply_to") == m for r in replies(cfg))
                             for _, m in busy), timeout=60, message="the busy sessions' replies")
    finally:
        orch.end(signal.SIGTERM)
    counts = [sum(1 for r in replies(cfg) if r.get("in_reply_to") == m) for _, m in busy]
    assert counts == [1, 1, 1]
    if cut_short:
        assert "removals cut short" in orch.text()
    print(f"\nSIGKILL after {done_before} of {SESSIONS} archives ({cut_short} removal under "
          f"way); restart: {archived} archived, {whole} whole, nothing half-done")


def test_sigkill_mid_archive_of_one_session_is_undone(tmp_path: Path) -> None:
    """``orchestrator sessions archive ID`` (a real process, offline) killed while the
    archive is being written: the next command's start undoes it, the session is whole."""
    config = write_config(tmp_path, archive_after=0)
    cfg = load_config(config_dict(tmp_path), tmp_path)
    data = cfg.data_dir
    with Registry(registry_path(data)) as reg:
        sid = settled_session(Sessions(data, reg, 1 << 20), reg, data, platform="big",
                              payload=48 << 20)
    blob = digest(session_dir(data, "g", sid) / "notes" / "blob")
    part = session_archive.archive_path(archive_dir(data, cfg.retention), "g", sid)
    part = part.with_name(part.name + ".part")
    log = tmp_path / "archive.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "sessions", "archive",
                                 sid, "--config", str(config)], cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (part.exists() and part.stat().st_size > 0):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no archive being written"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)  # half an archive on disk
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not session_dir(data, "g", sid).exists()  # moved out, half archived
    with Registry(registry_path(data)) as reg:
        assert reg.session(sid) is None and len(removals.pending(reg)) == 1
    # the next start (here: the next CLI command, which recovers first) undoes it
    out = subprocess.run([sys.executable, "-m", "orchestrator", "sessions", "delete",
                          "no-such-session", "--config", str(config), "--json"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 2 and json.loads(out.stdout)["action"] == "missing"
    with Registry(registry_path(data)) as reg:
        assert removals.pending(reg) == [] and reg.session(sid) is not None
    assert digest(session_dir(data, "g", sid) / "notes" / "blob") == blob
    assert not part.exists()
