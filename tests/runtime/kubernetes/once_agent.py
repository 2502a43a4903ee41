"""A hostile agent for the Kubernetes retry tests: it answers like the reference agent
(``echo: <text>``), except that the first message whose text contains

- ``hog`` is claimed and then memory is allocated until the kernel kills the agent
  (``OOMKilled`` under a small memory limit);
- ``hang`` is claimed and then the agent goes silent (no heartbeat, no reply), so the
  host finds the claim stuck and kills it.

A marker file in the workspace makes it answer normally from its next start on, so
each retried message is answered exactly once. Run inside the agent image from a group
folder (stdlib + the image's sessionlib):

    python3 /workspace/agent/once_agent.py --workspace /workspace
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from orchestrator.agent.sessionlib import SessionFolder


def hog() -> None:
    held = []
    while True:
        held.append(bytearray(16 << 20))  # bytearray zero-fills: the pages are touched


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", required=True)
    args = ap.parse_args()
    with SessionFolder(args.workspace) as session:
        while True:
            for msg in session.wait_for_work(timeout=0.2):
                session.claim(msg)  # and no heartbeat after it before the test words
                text = str(msg.body().get("text", ""))
                for word in ("hog", "hang"):
                    marker = os.path.join(args.workspace, f".{word}-once")
                    if word in text and not os.path.exists(marker):
                        with open(marker, "w") as fh:
                            fh.write("done once\n")
                        if word == "hog":
                            hog()
                        while True:
                            time.sleep(3600)
                session.heartbeat()
                session.reply(msg, f"echo: {text}")
            session.heartbeat()


if __name__ == "__main__":
    sys.exit(main())
