"""Delivery channels: where replies and failure records go (``Channel``, in base.py).

The concrete channels (jsonl, log, webhook) are picked from ``[delivery] channel`` by
the composition root (``orchestrator.cli.compose.make_channel``); the engine knows only
the protocol.
"""

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

__all__ = ["Channel", "ChannelBase", "DeliveryError", "Failure", "InFlight",
           "PermanentDeliveryError", "Reply", "StorageFull"]
