"""The ``log`` channel: replies go to the orchestrator's log. For trying things out.

Every agent-controlled field (text, file names, routing, a failure's reason) goes
through ``support.printable``: one reply is one log line, whatever the agent wrote.
"""

from __future__ import annotations

from loguru import logger

from orchestrator.channels.base import ChannelBase, Failure, Reply
from orchestrator.support.printable import printable


class LogChannel(ChannelBase):
    name = "log"

    def already_delivered(self, message_id: str) -> bool:
        return False  # a log line cannot be looked up again: at-least-once in a crash window

    async def deliver(self, reply: Reply) -> str | None:
        text = reply.content.get("text") if isinstance(reply.content, dict) else reply.content
        files = ", ".join(printable(f, 300) for f in reply.files[:20])
        more = f" (+{len(reply.files) - 20} more)" if len(reply.files) > 20 else ""
        logger.info("reply {} [{}/{}] to {}/{} '{}' files=[{}]{}", printable(reply.message_id),
                    printable(reply.agent_group), printable(reply.session_id),
                    printable(reply.channel_type), printable(reply.platform_id),
                    printable(text), files, more)
        return None

    async def report_failure(self, failure: Failure) -> None:
        logger.warning("failed {} {} [{}/{}] to {}/{}: {}", printable(failure.kind),
                       printable(failure.id), printable(failure.agent_group),
                       printable(failure.session_id), printable(failure.channel_type),
                       printable(failure.platform_id), printable(failure.reason))

    def close(self) -> None:
        pass
