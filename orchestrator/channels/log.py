"""The ``log`` channel: replies go to the orchestrator's log. For trying things out."""

from __future__ import annotations

from loguru import logger

from orchestrator.channels.base import ChannelBase, Failure, Reply


class LogChannel(ChannelBase):
    name = "log"

    def already_delivered(self, message_id: str) -> bool:
        return False  # a log line cannot be looked up again: at-least-once in a crash window

    async def deliver(self, reply: Reply) -> str | None:
        text = reply.content.get("text") if isinstance(reply.content, dict) else reply.content
        logger.info("reply {} [{}/{}] {!r} files={}", reply.message_id, reply.agent_group,
                    reply.session_id, text, list(reply.files))
        return None

    async def report_failure(self, failure: Failure) -> None:
        logger.warning("failed {} {} [{}/{}] to {}/{}: {}", failure.kind, failure.id,
                       failure.agent_group, failure.session_id, failure.channel_type,
                       failure.platform_id, failure.reason)

    def close(self) -> None:
        pass
