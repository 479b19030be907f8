"""Telegram updates (as python-telegram-bot objects) to core events: pure functions, no I/O.

Idempotency keys (``event_id``), stable when Telegram or a webhook retry delivers the same
update again, and unique even after ``update_id`` starts again at random (it does after a week
without updates):

* a message: ``chat_id:message_id`` (one message, however often its update arrives);
* a button press: the callback query's id (unique per press);
* a reaction change: ``update_id:chat_id:message_id``;
* an anonymous reaction count: ``update_id:chat_id:message_id``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from telegram import (
    Chat,
    Message,
    MessageEntity,
    MessageReactionCountUpdated,
    MessageReactionUpdated,
    ReactionType,
    ReactionTypeCustomEmoji,
    ReactionTypeEmoji,
    Update,
    User,
)

from core.events import (
    Actor,
    Channel,
    ChannelKind,
    ComponentActivated,
    MessageReceived,
    ReactionChanged,
)

__all__ = [
    "PLATFORM",
    "REMIX_CAPTION",
    "VERIFY_CAPTION",
    "Upload",
    "addressed_text",
    "button_event",
    "channel_of",
    "message_event",
    "reaction_count_event",
    "reaction_event",
    "reaction_key",
    "remix_upload",
]

PLATFORM = "telegram"
#: Stands in for the actor of anonymous reaction counts (Telegram does not say who).
ANONYMOUS = Actor("anonymous", "anonymous")
#: The caption of a picture sent to remix: ``/remix ...`` or ``/remix@somebot ...``.
REMIX_CAPTION = re.compile(r"^\s*/remix(?:@(?P<bot>[A-Za-z0-9_]+))?(?:\s|$)", re.IGNORECASE)
#: The caption of a picture sent to be checked: ``/verify`` or ``/verify@somebot``.
VERIFY_CAPTION = re.compile(r"^\s*/verify(?:@(?P<bot>[A-Za-z0-9_]+))?(?:\s|$)", re.IGNORECASE)
#: Document types that are surely not pictures are refused without downloading; these two say
#: nothing either way, so the bytes decide (core/uploads.py).
_UNTYPED = frozenset({"", "application/octet-stream"})


def _actor(user: User) -> Actor:
    return Actor(str(user.id), user.full_name or user.username or str(user.id), user.is_bot)


def channel_of(chat: Chat, message: Message | None = None) -> Channel:
    """Where it happened; forum topics become the thread (results go back into the topic)."""
    kind = ChannelKind.DIRECT if chat.type == Chat.PRIVATE else ChannelKind.GROUP
    thread_id = None
    if message is not None and message.is_topic_message and message.message_thread_id:
        thread_id = str(message.message_thread_id)
    return Channel(str(chat.id), kind, thread_id=thread_id)


def reaction_key(reaction: ReactionType) -> str:
    """The emoji itself; ``custom:<id>`` for custom emoji; ``paid`` for paid (star) reactions."""
    if isinstance(reaction, ReactionTypeEmoji):
        return reaction.emoji
    if isinstance(reaction, ReactionTypeCustomEmoji):
        return f"custom:{reaction.custom_emoji_id}"
    return str(reaction.type)


def addressed_text(message: Message, bot_id: int, bot_username: str) -> str | None:
    """The text of a group message meant for the bot, without the @mention; else None.

    In groups the bot answers only messages that mention it (``@name`` or a text mention of
    its user) or reply to one of its own messages. With privacy mode on (the BotFather default)
    Telegram sends it nothing else anyway, apart from commands.
    """
    text = message.text or message.caption or ""
    entities = message.parse_entities() if message.text else message.parse_caption_entities()
    mentioned = False
    for entity, value in sorted(entities.items(), key=lambda item: -item[0].offset):
        is_us = (entity.type == MessageEntity.MENTION
                 and value.lstrip("@").lower() == bot_username.lower()) or (
            entity.type == MessageEntity.TEXT_MENTION and entity.user is not None
            and entity.user.id == bot_id)
        if is_us:
            mentioned = True
            # Offsets count UTF-16 code units; the mention itself is plain ASCII.
            encoded = text.encode("utf-16-le")
            text = (encoded[:entity.offset * 2] + encoded[(entity.offset + entity.length) * 2:]
                    ).decode("utf-16-le")
    replied = message.reply_to_message
    replies_to_us = replied is not None and replied.from_user is not None and (
        replied.from_user.id == bot_id)
    if mentioned or replies_to_us:
        return " ".join(text.split())
    return None


def message_event(update: Update, text: str, *,
                  attachments: tuple[str, ...] = ()) -> MessageReceived:
    """A message (free text or a text command) for core; ``reply_to`` links the thread.

    ``attachments``: paths of pictures the adapter fetched and kept (a ``/remix`` photo)."""
    message = update.effective_message
    assert message is not None and message.from_user is not None
    replied = message.reply_to_message
    return MessageReceived(
        platform=PLATFORM, event_id=f"{message.chat.id}:{message.message_id}",
        actor=_actor(message.from_user), channel=channel_of(message.chat, message), text=text,
        message_id=str(message.message_id),
        reply_to=str(replied.message_id) if replied is not None else None,
        attachments=attachments, occurred_at=message.date, raw=update.to_dict())


def button_event(update: Update) -> ComponentActivated | None:
    """A press on an inline keyboard button under a message the bot can still see."""
    query = update.callback_query
    if query is None or not query.data or not isinstance(query.message, Message):
        return None  # inline-mode buttons, or a message too old to be accessible
    message = query.message
    return ComponentActivated(
        platform=PLATFORM, event_id=f"cb:{query.id}", actor=_actor(query.from_user),
        channel=channel_of(message.chat, message), custom_id=query.data,
        message_id=str(message.message_id), raw=update.to_dict())


def reaction_event(update: Update) -> ReactionChanged | None:
    """``message_reaction``: one person's (or an anonymous admin's) old/new set difference."""
    changed: MessageReactionUpdated | None = update.message_reaction
    if changed is None:
        return None
    old = {reaction_key(r) for r in changed.old_reaction}
    new = {reaction_key(r) for r in changed.new_reaction}
    if changed.user is not None:
        actor = _actor(changed.user)
    elif changed.actor_chat is not None:  # an anonymous admin reacts as the chat itself
        actor = Actor(f"chat:{changed.actor_chat.id}", changed.actor_chat.title or "")
    else:
        return None
    return ReactionChanged(
        platform=PLATFORM,
        event_id=f"{update.update_id}:{changed.chat.id}:{changed.message_id}",
        actor=actor, channel=channel_of(changed.chat), message_id=str(changed.message_id),
        added=frozenset(new - old), removed=frozenset(old - new),
        occurred_at=changed.date, raw=update.to_dict())


def reaction_count_event(update: Update) -> ReactionChanged | None:
    """``message_reaction_count``: new anonymous totals per emoji (the community's signal)."""
    counted: MessageReactionCountUpdated | None = update.message_reaction_count
    if counted is None:
        return None
    counts = {reaction_key(c.type): c.total_count for c in counted.reactions}
    return ReactionChanged(
        platform=PLATFORM,
        event_id=f"{update.update_id}:{counted.chat.id}:{counted.message_id}",
        actor=ANONYMOUS, channel=channel_of(counted.chat), message_id=str(counted.message_id),
        anonymous=True, counts=counts, occurred_at=counted.date, raw=update.to_dict())


@dataclass(frozen=True, slots=True)
class Upload:
    """A file in a message to fetch with getFile: its id, its size if Telegram said, a name."""

    file_id: str
    file_size: int | None
    name: str


_HOW = {"remix": "Send a photo (or a PNG, JPEG or WebP file) with the caption /remix and what "
                 "to make of it, for example /remix as a watercolor.",
        "verify": "Send a picture (a photo, or better the original file) with the caption "
                  "/verify, or reply /verify to a picture."}


def remix_upload(message: Message, verb: str = "remix") -> Upload | str:
    """The picture sent with a ``/remix`` (or ``/verify``) caption, or in a message replied to
    with ``/verify``; or why there is none (words for the person).

    A photo comes in several sizes: the largest is taken. A document is taken when its type is
    an image, or untyped (the bytes are checked after download); any other type, or another
    kind of media (video, voice...), is not a picture.
    """
    if message.photo:
        largest = max(message.photo, key=lambda p: (p.width * p.height, p.file_size or 0))
        return Upload(largest.file_id, largest.file_size, "your photo")
    how = _HOW[verb]
    document = message.document
    if document is not None and message.animation is None:
        mime = (document.mime_type or "").lower()
        name = document.file_name or "your file"
        if mime.startswith("image/") or mime in _UNTYPED:
            return Upload(document.file_id, document.file_size, name)
        return f"“{name}” is not a picture ({mime}), so I can't {verb} it. {how}"
    return f"I can only {verb} pictures. {how}"
