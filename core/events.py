"""The event vocabulary every adapter speaks (see DESIGN.md, "Event vocabulary").

Adapters turn a platform update into one of these frozen dataclasses; the rest of MuseSpark
never sees a platform payload except through ``raw`` (kept for debugging only).

``event_id`` is the idempotency key: Telegram's ``update_id``, a Discord interaction id, or a
synthetic key such as ``message_id:user_id:emoji`` for reactions. The same event delivered twice
must carry the same ``event_id``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeAlias

__all__ = [
    "Actor",
    "Channel",
    "ChannelKind",
    "CommandInvoked",
    "CommandSource",
    "ComponentActivated",
    "Event",
    "MessageReceived",
    "ReactionChanged",
    "ReactionsCleared",
]


def _now() -> datetime:
    return datetime.now(UTC)


class ChannelKind(enum.StrEnum):
    DIRECT = "direct"
    GROUP = "group"
    GUILD_CHANNEL = "guild_channel"
    THREAD = "thread"


class CommandSource(enum.StrEnum):
    SLASH = "slash"
    TEXT = "text"


@dataclass(frozen=True, slots=True)
class Actor:
    """Who did it. ``id`` is the platform's user id as a string."""

    id: str
    display_name: str = ""
    is_bot: bool = False
    #: Admin of the community here (guild: Manage Server; group: chat administrator). Adapters
    #: that cannot tell leave it False; in direct chats everyone administers their own chat.
    is_admin: bool = False
    #: Trusted to moderate here without being an admin (Discord: Manage Messages). With
    #: ``is_admin`` it may report results (🚩), which hides them.
    is_moderator: bool = False


@dataclass(frozen=True, slots=True)
class Channel:
    """Where it happened. ``chat_id`` is the platform's chat/channel id as a string."""

    chat_id: str
    kind: ChannelKind = ChannelKind.DIRECT
    guild_id: str | None = None
    thread_id: str | None = None
    #: Marked age-restricted by the platform (Discord "NSFW" channels; a thread inherits its
    #: parent channel's flag). Only there may a Discord community switch safety ``off``.
    nsfw: bool = False

    @property
    def community_id(self) -> str:
        """The community this channel belongs to: the guild, else the chat itself."""
        return self.guild_id or self.chat_id


@dataclass(frozen=True, slots=True, kw_only=True)
class _EventBase:
    platform: str
    event_id: str
    actor: Actor
    channel: Channel
    occurred_at: datetime = field(default_factory=_now)
    raw: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageReceived(_EventBase):
    """Text (and attachments) addressed to the bot. ``reply_to`` is the message it answers."""

    text: str
    message_id: str | None = None
    reply_to: str | None = None
    attachments: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandInvoked(_EventBase):
    """``/imagine``, ``/write``, ...: ``args`` are typed options; free text goes in ``args['prompt']``."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)
    source: CommandSource = CommandSource.TEXT
    message_id: str | None = None
    reply_to: str | None = None
    interaction_token: str | None = None
    #: What the platform's deliverer needs besides the token (Discord: the application id and
    #: when the token expires), decided by the adapter when it makes the event, so a job's
    #: delivery target is complete before the job is published.
    delivery_extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class ComponentActivated(_EventBase):
    """A button press. ``custom_id`` is ``action:short-id``; the payload lives server-side."""

    custom_id: str
    message_id: str
    interaction_token: str | None = None
    delivery_extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReactionChanged(_EventBase):
    """Emoji ``added`` and ``removed`` on one message by one actor.

    On Telegram, anonymous reaction counts arrive without an actor: ``anonymous`` is then True,
    ``actor`` is a placeholder and ``counts`` maps emoji to the new totals.
    """

    message_id: str
    added: frozenset[str] = frozenset()
    removed: frozenset[str] = frozenset()
    anonymous: bool = False
    counts: dict[str, int] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ReactionsCleared(_EventBase):
    """All reactions (or all of one ``emoji``) were removed from a message (Discord)."""

    message_id: str
    emoji: str | None = None


Event: TypeAlias = (
    MessageReceived | CommandInvoked | ComponentActivated | ReactionChanged | ReactionsCleared
)
