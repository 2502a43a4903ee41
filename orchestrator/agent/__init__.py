"""Reference agent speaking the session-folder contract (docs/contract.md).

Stdlib-only, because it runs in a container that has nothing but python3:
``python -m orchestrator.agent --workspace /workspace``. Modules:

- ``sessionlib``: the agent half of the contract as a library (wait for work, claim,
  reply with files, heartbeat, ack, recover); other agents can use it too
- ``inotify``: waking on the host's inbound.db commits (ctypes), polling where missing
- ``beat``: the heartbeat touch (os only), done first thing by ``__main__``
- ``decide``: pure decisions (due rows, next due time, next odd seq, content in and out)
- ``files``:  copying attachments into ``outbox/<out_id>/`` without following symlinks
- ``agent``:  the CLI and the echo, on top of ``sessionlib``
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run the agent (imported lazily so ``import orchestrator.agent`` stays cheap)."""
    from orchestrator.agent.agent import main as _main

    return _main(argv)


__all__ = ["main"]
