"""From discord.py objects to core events: small functions, no I/O.

Gateway facts these depend on (discord.py 2.7):

* ``MESSAGE_REACTION_ADD`` carries ``member`` (in guilds) and ``message_author_id``; the remove
  event carries neither, so "was this message ours?" is answered by core's record of delivered
  messages, not by the event.
* Raw reaction events arrive whether or not the message is in discord.py's cache; the ``raw_``
  handlers are the only ones that see reactions on old messages after a restart.
* A custom emoji's name can change; its id cannot. Custom emoji are keyed as ``custom:<id>``.
* Every ``event_id`` is a pure function of the payload, so a replayed dispatch (resumes,
  reconnects) carries the same one: interactions use their id, messages theirs. Reaction events
  have no id and a genuine add-again has the very same payload as a replay, so their id names
  the transition (``message:user:emoji:add``) and core's feedback log tells the two apart by
  state (see ``TasteService.record``'s ``toggle``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import discord

from core.events import (
    Actor,
    Channel,
    ChannelKind,
    CommandInvoked,
    CommandSource,
    ComponentActivated,
    ReactionChanged,
    ReactionsCleared,
)

__all__ = [
    "PLATFORM",
    "UNKNOWN_ACTOR",
    "actor_of",
    "channel_nsfw",
    "channel_of_interaction",
    "command_event",
    "component_event",
    "emoji_key",
    "interaction_actor",
    "reaction_event",
    "reactions_cleared_event",
]

PLATFORM = "discord"
#: Who cleared the reactions is not in the event (a moderator, or a bot).
UNKNOWN_ACTOR = Actor(id="0", display_name="")
_THREAD_TYPES = (discord.ChannelType.public_thread, discord.ChannelType.private_thread,
                 discord.ChannelType.news_thread)


def emoji_key(emoji: discord.PartialEmoji | discord.Emoji | str) -> str:
    """Unicode emoji as themselves; custom emoji by id (``custom:<id>``), since names change."""
    if isinstance(emoji, str):
        return emoji
    if emoji.id is not None:
        return f"custom:{emoji.id}"
    return emoji.name or ""


def actor_of(user: discord.abc.User | None, user_id: int | None = None) -> Actor:
    if user is None:
        return Actor(id=str(user_id or 0))
    return Actor(id=str(user.id), display_name=user.display_name, is_bot=user.bot)


def channel_nsfw(channel: Any | None) -> bool:
    """Whether a channel is marked age-restricted; a thread is when its parent channel is
    (discord.py's ``Thread.is_nsfw`` reads the parent from the guild cache: an uncached
    parent reads as not age-restricted, see ``MuseSparkDiscord.nsfw``)."""
    check = getattr(channel, "is_nsfw", None)
    if callable(check):
        return bool(check())
    return bool(getattr(channel, "nsfw", False))


def _channel(channel_id: int | None, guild_id: int | None,
             channel: Any | None = None, nsfw: bool | None = None) -> Channel:
    chat_id = str(channel_id or 0)
    if guild_id is None:
        return Channel(chat_id=chat_id, kind=ChannelKind.DIRECT)
    flag = channel_nsfw(channel) if nsfw is None else nsfw
    if getattr(channel, "type", None) in _THREAD_TYPES:
        return Channel(chat_id=chat_id, kind=ChannelKind.THREAD, guild_id=str(guild_id),
                       thread_id=chat_id, nsfw=flag)
    return Channel(chat_id=chat_id, kind=ChannelKind.GUILD_CHANNEL, guild_id=str(guild_id),
                   nsfw=flag)


def interaction_actor(interaction: discord.Interaction[Any]) -> Actor:
    """The person behind an interaction; an admin has Manage Server (everyone, in a DM)."""
    admin = interaction.guild_id is None or interaction.permissions.manage_guild
    return Actor(id=str(interaction.user.id), display_name=interaction.user.display_name,
                 is_bot=interaction.user.bot, is_admin=admin)


def channel_of_interaction(interaction: discord.Interaction[Any],
                           nsfw: bool | None = None) -> Channel:
    return _channel(interaction.channel_id, interaction.guild_id, interaction.channel, nsfw)


#: How long an interaction token lets the bot answer (follow-ups, edits).
INTERACTION_TOKEN_LIFETIME_SECONDS = 15 * 60


def interaction_extra(interaction: discord.Interaction[Any]) -> dict[str, Any]:
    """What a worker needs to answer through ``interaction`` besides its token."""
    return {"application_id": str(interaction.application_id),
            "interaction_id": str(interaction.id),
            "interaction_expires_at":
                interaction.created_at.timestamp() + INTERACTION_TOKEN_LIFETIME_SECONDS,
            "attachment_size_limit": interaction.filesize_limit}


def command_event(interaction: discord.Interaction[Any], name: str,
                  args: dict[str, Any], *, nsfw: bool | None = None) -> CommandInvoked:
    """A slash command; ``event_id`` is the interaction id, so a replay makes no second job."""
    return CommandInvoked(
        platform=PLATFORM, event_id=str(interaction.id), actor=interaction_actor(interaction),
        channel=channel_of_interaction(interaction, nsfw), occurred_at=interaction.created_at,
        raw=interaction.data, name=name, args={k: v for k, v in args.items() if v is not None},
        source=CommandSource.SLASH, interaction_token=interaction.token,
        delivery_extra=interaction_extra(interaction))


def component_event(interaction: discord.Interaction[Any], custom_id: str, *,
                    nsfw: bool | None = None) -> ComponentActivated:
    message_id = str(interaction.message.id) if interaction.message else ""
    return ComponentActivated(
        platform=PLATFORM, event_id=str(interaction.id), actor=interaction_actor(interaction),
        channel=channel_of_interaction(interaction, nsfw), occurred_at=interaction.created_at,
        raw=interaction.data, custom_id=custom_id, message_id=message_id,
        interaction_token=interaction.token, delivery_extra=interaction_extra(interaction))


def reaction_event(payload: discord.RawReactionActionEvent, *,
                   channel: Any | None = None) -> ReactionChanged:
    """One reaction added or removed. The gateway gives no event id; this one is the payload's
    own (message, user, emoji, add or remove): core dedupes replays by the reaction's state."""
    added = payload.event_type == "REACTION_ADD"
    key = emoji_key(payload.emoji)
    user = payload.member if added else None
    return ReactionChanged(
        platform=PLATFORM,
        event_id=f"{payload.message_id}:{payload.user_id}:{key}:{'add' if added else 'remove'}",
        actor=actor_of(user, payload.user_id),
        channel=_channel(payload.channel_id, payload.guild_id, channel),
        occurred_at=datetime.now(UTC), message_id=str(payload.message_id),
        added=frozenset({key}) if added else frozenset(),
        removed=frozenset() if added else frozenset({key}))


def reactions_cleared_event(
        payload: discord.RawReactionClearEvent | discord.RawReactionClearEmojiEvent, *,
        channel: Any | None = None) -> ReactionsCleared:
    """All reactions, or one emoji's, removed by a moderator; a replay undoes nothing more,
    because core undoes only reactions still standing."""
    emoji = emoji_key(payload.emoji) if isinstance(
        payload, discord.RawReactionClearEmojiEvent) else None
    return ReactionsCleared(
        platform=PLATFORM,
        event_id=f"{payload.message_id}:clear:{emoji or '*'}",
        actor=UNKNOWN_ACTOR, channel=_channel(payload.channel_id, payload.guild_id, channel),
        message_id=str(payload.message_id), emoji=emoji)
