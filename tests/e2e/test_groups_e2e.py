"""Agent groups end to end on the local runtime: real agent processes, real inotify,
real SQLite. Each group's agents run with their own command and environment; a
secret from a file reaches the agent and nothing else; a changed setting reaches
the next start and never a working agent."""

from __future__ import annotations

import json
from pathlib import Path

from loguru import logger

from orchestrator.config import groups
from orchestrator.host import status
from orchestrator.runtime.local.runtime import read_pid_file
from tests.support.e2e import AGENT, Client, make_config, pairs, replies_to, run, supervised
from tests.support.helpers import query, until

SECRET = "s3cret-T0KEN-4f9a"


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        items = fh.read().decode("utf-8", "replace").split("\0")
    return dict(item.split("=", 1) for item in items if "=" in item)


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().decode().split("\0")[:-1]


def agent_pid(client: Client, row) -> int:
    found = read_pid_file(client.paths(row).pid_file)
    assert found, "no pid file"
    return found[0]


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie: an agent adopted from an earlier supervisor in
    this same test process is our unreaped child once it ends)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode("ascii", "replace")
    except OSError:
        return False
    return data[data.rfind(")") + 2:].split()[0] != "Z"


def files_containing(root: Path, needle: bytes) -> list[Path]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
            hits.append(path)
    return hits


def test_two_groups_side_by_side_with_their_own_command_env_and_secret(
        tmp_path: Path, reap_agents) -> None:
    secret_file = tmp_path / "token"
    secret_file.write_text(SECRET + "\n")
    cfg = make_config(tmp_path, lifecycle={"stop_idle_after": 60.0, "idle_after": 30.0},
                      groups={
                          "alpha": {"command": AGENT + ["--work-seconds", "0.05"],
                                    "env": {"ROLE": "alpha-bot"}},
                          "beta": {"env": {"ROLE": "beta-bot"},
                                   "env_files": {"API_TOKEN": str(secret_file)},
                                   "idle_after": 20.0}})
    logged: list[str] = []
    sink = logger.add(lambda m: logged.append(str(m)), level="TRACE", format="{message}")
    digests = {g: groups.resolve(cfg, g).digest for g in ("alpha", "beta")}
    assert digests["alpha"] != digests["beta"]

    async def body() -> None:
        client = Client(cfg)
        async with supervised(cfg) as sup:
            ra, ma = client.send("alpha", "hello alpha")
            rb, mb = client.send("beta", "hello beta")
            await until(lambda: replies_to(cfg, ma) and replies_to(cfg, mb), timeout=30,
                        message="a reply from each group")
            pa, pb = agent_pid(client, ra), agent_pid(client, rb)
            assert alive(pa) and alive(pb) and pa != pb  # side by side
            ea, eb = environ(pa), environ(pb)
            assert (ea["ROLE"], eb["ROLE"]) == ("alpha-bot", "beta-bot")
            assert eb["API_TOKEN"] == SECRET and "API_TOKEN" not in ea
            assert cmdline(pa)[-2:] == ["--workspace", str(client.paths(ra).root)]
            assert "--work-seconds" in cmdline(pa) and "--work-seconds" not in cmdline(pb)
            # per-group timings reach the lifecycle rules
            assert sup.worker.settings("beta").lifecycle.idle_after == 20.0
            assert sup.worker.settings("alpha").lifecycle.idle_after == 30.0
            rows = {r.agent_group: r for r in status.collect(cfg.data_dir, client.registry, cfg)}
            table = status.render_table(list(rows.values()))
            as_json = status.render_json(list(rows.values()))
        assert (rows["alpha"].settings, rows["beta"].settings) == (digests["alpha"],
                                                                  digests["beta"])
        assert rows["alpha"].settings_current is True and rows["alpha"].image is None
        assert digests["alpha"] in table and digests["beta"] in table
        assert json.loads(as_json)[1]["settings"] == digests["beta"]
        # the secret: in the agent's environment only — no log line, no status output,
        # no file the orchestrator wrote (registry, session DBs, channel, agent logs)
        assert logged and not [line for line in logged if SECRET in line]
        assert SECRET not in table and SECRET not in as_json
        assert files_containing(cfg.data_dir, SECRET.encode()) == []
        client.close()

    try:
        run(body())
    finally:
        logger.remove(sink)


def test_an_unreadable_secret_keeps_the_work_pending_with_one_clear_line(
        tmp_path: Path, reap_agents) -> None:
    cfg = make_config(tmp_path, groups={"beta": {"env_files": {"K": str(tmp_path / "nope")}}})
    logged: list[str] = []
    sink = logger.add(lambda m: logged.append(str(m)), level="INFO", format="{message}")

    async def body() -> None:
        client = Client(cfg)
        async with supervised(cfg):
            row, mid = client.send("beta", "hi")
            await until(lambda: [m for m in logged if "cannot start agent" in m], timeout=10,
                        message="the start failure logged")
            assert query(client.paths(row).inbound_db, "SELECT status FROM messages_in") == [
                ("pending",)]
            assert read_pid_file(client.paths(row).pid_file) is None
        (line,) = [m for m in logged if "cannot start agent" in m]
        assert f"[groups.beta] env_files K ({tmp_path / 'nope'}): cannot read" in line
        client.close()

    try:
        run(body())
    finally:
        logger.remove(sink)


async def test_a_changed_group_setting_reaches_the_next_start_and_leaves_a_working_agent_alone(
        tmp_path: Path, reap_agents) -> None:
    def config(version: str):
        return make_config(tmp_path, agent_args=["--work-seconds", "2.5"],
                           runtime={"on_shutdown": "leave"},
                           lifecycle={"idle_after": 0.5, "stop_idle_after": 0.5},
                           groups={"g": {"env": {"VERSION": version}}})

    old, new = config("1"), config("2")
    d_old, d_new = groups.resolve(old, "g").digest, groups.resolve(new, "g").digest
    assert d_old != d_new

    client = Client(old)
    async with supervised(old):
        row, first = client.send("g", "long job")
        paths = client.paths(row)
        await until(lambda: query(paths.outbound_db, "SELECT 1 FROM processing_ack WHERE"
                                  " status='processing'"), message="the agent at work")
        working = agent_pid(client, row)
        assert environ(working)["VERSION"] == "1"
    # restarted with the new setting, while the agent is still working
    async with supervised(new):
        assert alive(working) and agent_pid(client, row) == working
        assert environ(working)["VERSION"] == "1"  # untouched: not restarted, not killed
        (r,) = status.collect(new.data_dir, client.registry, new)
        assert (r.settings, r.settings_current) == (d_old, False)
        assert status.settings_cell(r) == f"{d_old}*"
        await until(lambda: replies_to(new, first), timeout=20, message="the long job done")
        await until(lambda: not alive(working), timeout=20, message="the idle stop")
        _, second = client.send("g", "after the change")
        await until(lambda: replies_to(new, second), timeout=20, message="second reply")
        fresh = agent_pid(client, row)
        assert fresh != working and environ(fresh)["VERSION"] == "2"
        (r,) = status.collect(new.data_dir, client.registry, new)
        assert (r.settings, r.settings_current) == (d_new, True)
    changes = pairs(client.registry.status_changes(row.id))
    assert not [c for c in changes if "killed" in c[1]], changes
    assert ("running", "adopted after restart") in changes
    assert query(paths.inbound_db, "SELECT id, status, tries FROM messages_in ORDER BY seq"
                 ) == [(first, "completed", 0), (second, "completed", 0)]
    client.close()


async def test_a_groups_max_agents_holds_its_sessions_back_but_not_other_groups(
        tmp_path: Path, reap_agents) -> None:
    """[groups.solo] max_agents = 1 (no global cap): its three sessions run one at a
    time, while another group's session runs beside them."""
    cfg = make_config(tmp_path, agent_args=["--work-seconds", "0.6"],
                      runtime={"max_agents": 0},
                      lifecycle={"idle_after": 0.3, "stop_idle_after": 0.0},
                      groups={"solo": {"max_agents": 1}})
    peak = {"solo": 0, "other": 0}

    client = Client(cfg)
    async with supervised(cfg) as sup:
        sent = [client.send("solo", f"job {i}", platform=f"room-{i}") for i in range(3)]
        sent.append(client.send("other", "beside", platform="room-x"))

        def all_done() -> bool:
            live = {g: 0 for g in peak}
            for h in sup.runtime.running():
                live[h.agent_group] += 1
            for g, n in live.items():
                peak[g] = max(peak[g], n)
            return all(replies_to(cfg, mid) for _, mid in sent)

        await until(all_done, timeout=60, interval=0.01, message="every reply")
    assert peak == {"solo": 1, "other": 1}, peak
    rows = {r.id for r, _ in sent[:3]}  # three sessions of one group
    assert len(rows) == 3
    client.close()
