"""Delivery channels: ``make_channel(cfg)`` picks one from ``[delivery] channel``."""

from __future__ import annotations

from orchestrator.channels.base import (
    Channel,
    ChannelBase,
    DeliveryError,
    Failure,
    InFlight,
    PermanentDeliveryError,
    Reply,
    StorageFull,
)
from orchestrator.config.model import DeliveryConfig

__all__ = ["Channel", "ChannelBase", "DeliveryError", "Failure", "InFlight", "PermanentDeliveryError", "Reply",
           "StorageFull", "make_channel"]


def make_channel(cfg: DeliveryConfig) -> Channel:
    if cfg.channel == "jsonl":
        from orchestrator.channels.jsonl import JsonlChannel

        return JsonlChannel(cfg.path)
    if cfg.channel == "webhook":
        from orchestrator.channels.webhook import WebhookChannel

        return WebhookChannel(cfg)
    from orchestrator.channels.log import LogChannel

    return LogChannel()
