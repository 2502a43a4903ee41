"""A hostile agent for the space tests: it answers like the reference agent, except
that a message whose text contains ``fill`` makes it claim the message, write 1 MiB
files into ``outbox/fill-<n>/`` until the disk says ENOSPC, and exit 3 (an agent
that dies of the full disk it made). Each start appends a line to ``--starts``
(outside the data dir), so a test counts its starts exactly.

    python tests/support/filler_agent.py --starts FILE --workspace DIR
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time

from orchestrator.agent.sessionlib import SessionFolder

CHUNK = b"x" * (1 << 20)


def fill(outbox: str) -> None:
    folder = os.path.join(outbox, f"fill-{os.getpid()}-{time.monotonic_ns()}")
    os.makedirs(folder, exist_ok=True)
    n = 0
    while True:
        try:
            with open(os.path.join(folder, f"{n}.bin"), "wb") as f:
                f.write(CHUNK)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return
            raise
        n += 1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--starts", required=True)
    args = ap.parse_args()
    with open(args.starts, "a") as f:
        f.write(f"{time.time()}\n")
    with SessionFolder(args.workspace) as session:
        while True:
            for msg in session.wait_for_work(timeout=1.0):
                session.claim(msg)
                session.heartbeat()
                text = str(msg.body().get("text", ""))
                if "fill" in text:
                    fill(os.path.join(args.workspace, "outbox"))
                    return 3
                session.reply(msg, f"you said {text}")
            session.heartbeat()


if __name__ == "__main__":
    sys.exit(main())
