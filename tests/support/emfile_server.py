"""``python -m tests.support.emfile_server SECONDS``: the API's listening socket
(``server.bind``) served by asyncio with a protocol that holds every connection, under
an open-file limit 10 above what is open: the accept errors of an exhausted process.
Prints the port, then after SECONDS how many connections it holds; logs to stderr."""

from __future__ import annotations

import asyncio
import os
import resource
import sys

from orchestrator.api.auth import Listen
from orchestrator.api.connections import Tally, quiet_loop
from orchestrator.api.server import bind


async def main(seconds: float) -> None:
    sock = bind(Listen(host="127.0.0.1", port=0))
    sock.tally = Tally()
    held: list[asyncio.BaseTransport] = []

    class Hold(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            held.append(transport)

    loop = asyncio.get_running_loop()
    with quiet_loop(sock):
        server = await loop.create_server(Hold, sock=sock, backlog=1024)
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 10, hard))
        print(sock.getsockname()[1], flush=True)
        await asyncio.sleep(seconds)
        print("held", len(held), flush=True)
        server.close()
    sock.tally.end()


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1])))
