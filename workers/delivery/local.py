"""Delivery to the local (console) platform: rows in the ``local_messages`` table.

The console adapter reads that table, so a delivery is part of the same database transaction
that marks the job delivered: it happens exactly once or not at all.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from core.outbound import DeliveryTarget, OutboundMessage
from core.settings import Settings
from core.store import LocalMessage, utcnow
from workers.delivery._shared import shared_store

__all__ = ["LocalDeliverer"]


class LocalDeliverer:
    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings

    def progress(self, target: DeliveryTarget, text: str) -> None:
        """Show ``text`` (the job's progress, a reply streaming in) on the status message that
        answered the request; the console prints it as it changes (ConsoleChat.poll_progress)."""
        store = shared_store(self._settings) if self._settings is not None else None
        if store is None or not (target.reply_to or "").isdigit():
            return
        store.show_local_progress(target.chat_id, int(target.reply_to or 0), text)

    def deliver(self, session: Session, target: DeliveryTarget,
                messages: list[OutboundMessage]) -> list[str]:
        ids: list[str] = []
        reply_to = int(target.reply_to) if target.reply_to and target.reply_to.isdigit() else None
        for message in messages:
            row = LocalMessage(
                chat_id=target.chat_id, author="bot", job_id=message.job_id,
                kind=message.kind.value, text=message.text,
                attachments={"images": list(message.images),
                             "buttons": [b.custom_id for b in message.buttons]},
                reply_to=reply_to, created_at=utcnow())
            session.add(row)
            session.flush()
            ids.append(str(row.id))
        return ids
