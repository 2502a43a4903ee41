"""A test agent for the console's browser tests (stdlib + ``sessionlib`` only).

Through ``orchestrator.agent.sessionlib`` it answers like the reference agent
(``echo: <text>``, the attachments sent back as files), and on purpose as a hostile
agent would:

- ``hostile``: a reply whose text is markup (``<img src=x onerror=…>``, ``<script>``)
  with a file named ``"><svg onload=…>``: every payload sets ``window.__pwned``, the
  sentinel the XSS test checks stays untouched;
- ``ask``: a question card whose title, question and options are markup;
- ``fail``: the message is acked ``failed`` (a failed message for the session view);
- ``badreply``: a reply whose ``outbox/<id>`` is a symlink: the host gives up on it
  for good (a failed reply, for the retry action);
- ``slow``: works for 60 s with a heartbeat (an agent to stop from the page).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from orchestrator.agent.decide import new_out_id  # noqa: E402 - after the path
from orchestrator.agent.sessionlib import SessionFolder  # noqa: E402

PWN = "window.__pwned=1"
HOSTILE_TEXT = (f'<img src=x onerror="{PWN}"> <script>{PWN}</script> '
                f'<b onmouseover="{PWN}">bold?</b>')
HOSTILE_FILE = f'"><svg onload="{PWN}">'
HOSTILE_LOG = f"log: {HOSTILE_TEXT} \x1b[31mred\x1b[0m"  # markup and a terminal escape
CARD = {"type": "ask_question", "questionId": "q-markup-1",
        "title": f'<img src=x onerror="{PWN}">Pick',
        "question": f"<script>{PWN}</script>yes or no?",
        "options": [f'<b onclick="{PWN}">yes</b>', {"label": f"<i>no</i><script>{PWN}</script>",
                                                     "value": "no"}]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workspace", required=True)
    args = parser.parse_args(argv)
    with SessionFolder(args.workspace, poll_interval=0.05) as session:
        while True:
            for msg in session.wait_for_work(timeout=1.0):
                session.claim(msg)
                try:
                    body = msg.body()
                except ValueError:
                    session.ack(msg, "failed")
                    continue
                text = str(body.get("text", ""))
                if text == "hostile":
                    print(HOSTILE_LOG, file=sys.stderr, flush=True)  # its log, too
                    session.reply(msg, HOSTILE_TEXT, files={HOSTILE_FILE: b"<svg/>"})
                elif text == "ask":
                    session.reply(msg, CARD)
                elif text == "badreply":
                    out_id = new_out_id()
                    os.symlink("/", session.outbox_dir(out_id))
                    session.reply(msg, {"text": "broken", "files": ["x"]}, out_id=out_id)
                elif text == "fail":
                    session.ack(msg, "failed")
                elif text == "slow":
                    for _ in range(600):
                        session.heartbeat()
                        time.sleep(0.1)
                    session.reply(msg, "slow done")
                else:
                    session.reply(msg, f"echo: {text}")


if __name__ == "__main__":
    raise SystemExit(main())
