"""Posting results into chats. One deliverer per platform, chosen by the job's target.

Two kinds:

* transactional (the local platform): posting is a database write, done in the same
  transaction that marks the job delivered, so it happens exactly once.
* remote (Telegram, Discord over httpx): each outbox message is posted part by part (one
  platform message each: a split text, a photo then the rest of its caption, an album's
  pictures), and each part is recorded as soon as it is posted (``on_part``); a resumed job
  passes the parts already recorded (``skip_parts``) and only the rest are posted. ``send``
  raises :class:`~core.errors.DeliveryError` with ``retry_after`` (the job waits and resumes)
  or ``final`` (the job fails, no more sends). What can still post twice is one part: one
  posted by the platform whose worker died before recording it (Discord channel messages carry
  a nonce that closes even that window for a few minutes; see the README).
"""

from __future__ import annotations

from collections.abc import Callable, Set as AbstractSet
from typing import Protocol, runtime_checkable

from sqlalchemy.orm import Session

from core.errors import ConfigurationError
from core.outbound import DeliveryTarget, OutboundMessage
from core.settings import Settings
from workers.delivery.local import LocalDeliverer

__all__ = ["LocalDeliverer", "PartCallback", "RemoteDeliverer", "TransactionalDeliverer",
           "get_deliverer"]


@runtime_checkable
class TransactionalDeliverer(Protocol):
    def deliver(self, session: Session, target: DeliveryTarget,
                messages: list[OutboundMessage]) -> list[str]:
        """Write ``messages`` within ``session``; returns the platform message ids."""
        ...


#: Called with ``(part, message_id)`` right after a part of a message was posted.
PartCallback = Callable[[int, str], None]


@runtime_checkable
class RemoteDeliverer(Protocol):
    def send(self, target: DeliveryTarget, message: OutboundMessage, *,
             skip_parts: AbstractSet[int] = frozenset(),
             on_part: PartCallback | None = None,
             key: str | None = None, resumed: bool = False) -> list[str]:
        """Post one message, maybe as several platform messages (its parts, numbered from 0
        in posting order, the same way on every call for the same message and target).

        Parts in ``skip_parts`` were posted before and are not posted again (a part that is one
        of several messages made by one call, as an album, is skipped with its first); each
        part posted now is reported to ``on_part`` before the next is sent. ``key`` names the
        message for the platform's idempotency keys where it has them (the runner passes
        ``job_id:outbox position``). ``resumed``: a later attempt of the job, whose earlier one
        may have posted a part it did not record (a platform that can look for it does).
        Returns the ids of the parts posted by this call.
        """
        ...


def _telegram(settings: Settings) -> RemoteDeliverer:
    from workers.delivery.telegram import TelegramDeliverer

    return TelegramDeliverer(settings)


def _discord(settings: Settings) -> RemoteDeliverer:
    from workers.delivery.discord import DiscordDeliverer

    return DiscordDeliverer(settings)


#: Platform name -> factory (platform modules load only when a job needs them).
#: A remote deliverer may also offer ``progress(target, text)`` to edit the job's status message.
DELIVERERS: dict[str, Callable[[Settings], TransactionalDeliverer | RemoteDeliverer]] = {
    "local": LocalDeliverer,
    "telegram": _telegram,
    "discord": _discord,
}


_made: dict[str, tuple[Settings, TransactionalDeliverer | RemoteDeliverer]] = {}


def get_deliverer(platform: str, settings: Settings) -> TransactionalDeliverer | RemoteDeliverer:
    """The process's deliverer for ``platform``, made once per settings object.

    Remote deliverers hold HTTP connection pools; one per process keeps them reused (and
    closed once) instead of opening a client for every progress edit, result and failure.
    """
    made = _made.get(platform)
    if made is not None and made[0] is settings:
        return made[1]
    factory = DELIVERERS.get(platform)
    if factory is None:
        raise ConfigurationError(f"no deliverer for platform {platform!r}")
    deliverer = factory(settings)
    _made[platform] = (settings, deliverer)
    return deliverer
