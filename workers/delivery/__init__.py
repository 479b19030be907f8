"""Posting results into chats. One deliverer per platform, chosen by the job's target."""

from __future__ import annotations

from typing import Protocol

from sqlalchemy.orm import Session

from core.errors import ConfigurationError
from core.outbound import DeliveryTarget, OutboundMessage
from workers.delivery.local import LocalDeliverer

__all__ = ["Deliverer", "LocalDeliverer", "get_deliverer"]


class Deliverer(Protocol):
    def deliver(self, session: Session, target: DeliveryTarget,
                messages: list[OutboundMessage]) -> list[str]:
        """Post ``messages`` to ``target``; returns the platform ids of the messages created."""
        ...


def get_deliverer(platform: str) -> Deliverer:
    if platform == "local":
        return LocalDeliverer()
    raise ConfigurationError(f"no deliverer for platform {platform!r}")
