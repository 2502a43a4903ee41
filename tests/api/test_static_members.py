"""Static membership reloaded on SIGHUP (``api.peers.StaticMembers``): a real signal to
this process; an appended member is taken and announced, a list that drops or
reorders members — or a config that no longer loads — is refused and the old list
stays."""

from __future__ import annotations

import asyncio
import os
import signal

from orchestrator.api.peers import StaticMembers
from orchestrator.config.cluster import Member
from tests.support.helpers import until

A, B, C = Member("a", "http://1:1"), Member("b", "http://2:2"), Member("c", "http://3:3")


def test_sighup_reloads_appended_members_and_refuses_the_rest() -> None:
    files: list[object] = [[A, B, C], [A, C], ValueError("config.toml: bad TOML")]
    reads: list[int] = []

    def reread() -> list[Member]:
        reads.append(1)
        got = files.pop(0)
        if isinstance(got, Exception):
            raise got
        assert isinstance(got, list)
        return got

    async def main() -> None:
        members = StaticMembers([A, B], reread, "a")
        changes: list[list[str]] = []
        members.on_change(lambda: changes.append([m.id for m in members.members()]))
        await members.start()
        try:
            for n in (1, 2, 3):
                os.kill(os.getpid(), signal.SIGHUP)
                await until(lambda n=n: len(reads) == n, 5, f"reload {n}")
            assert members.members() == [A, B, C]  # the appended one kept, the rest refused
            assert changes == [["a", "b", "c"]]
        finally:
            await members.close()

    asyncio.run(main())
