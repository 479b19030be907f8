"""Many updates at once, within Telegram's send limits.

* :class:`PerChatOrder` lets PTB handle updates concurrently (a burst in one group must not
  hold up everybody else), while the updates of one chat are handled in the order they came:
  a reply, a reaction or a button press after a request never overtakes it.
* :class:`StatusCoalescer` keeps the status replies of one chat within Telegram's pace
  (about one message a second in a chat, 20 a minute in a group): the first status in a quiet
  chat goes at once; statuses that arrive while the chat's pace forbids another message are
  gathered and posted as one message when it allows. A lone status still becomes its job's
  progress message; a gathered one lists its requests and is nobody's progress message (each
  result arrives as its own message).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from telegram import Update
from telegram.ext import BaseUpdateProcessor

from core.outbound import MessageKind, OutboundMessage

__all__ = ["GROUP_STATUS_INTERVAL_SECONDS", "PRIVATE_STATUS_INTERVAL_SECONDS", "PerChatOrder",
           "StatusCoalescer"]

log = logging.getLogger(__name__)

#: Updates handled at once by one bot process (each holds a thread only while core works).
MAX_CONCURRENT_UPDATES = 256
#: Telegram: about one message per second in a chat, 20 per minute in a group.
PRIVATE_STATUS_INTERVAL_SECONDS = 1.0
GROUP_STATUS_INTERVAL_SECONDS = 3.0
#: Requests named in a gathered status (the rest are counted).
LISTED_MAX = 10


class PerChatOrder(BaseUpdateProcessor):
    """Concurrent across chats, in order within a chat."""

    def __init__(self, max_concurrent_updates: int = MAX_CONCURRENT_UPDATES) -> None:
        super().__init__(max_concurrent_updates)
        self._chats: dict[int, tuple[asyncio.Lock, int]] = {}  # chat -> (lock, users)

    async def do_process_update(self, update: object, coroutine: Awaitable[Any]) -> None:
        chat = update.effective_chat if isinstance(update, Update) else None
        if chat is None:
            await coroutine
            return
        lock, users = self._chats.get(chat.id, (asyncio.Lock(), 0))
        self._chats[chat.id] = (lock, users + 1)
        try:
            async with lock:
                await coroutine
        finally:
            lock, users = self._chats[chat.id]
            if users <= 1:
                del self._chats[chat.id]
            else:
                self._chats[chat.id] = (lock, users - 1)

    async def initialize(self) -> None:
        """Nothing to set up."""

    async def shutdown(self) -> None:
        """Nothing to tear down."""


#: Posts one status reply in a chat (replying to ``reply_to`` when given); True when posted.
Post = Callable[[OutboundMessage, "int | None"], Awaitable[bool]]


@dataclass(slots=True)
class _Chat:
    last_sent: float = float("-inf")
    pending: list[tuple[OutboundMessage, int | None, Post]] = field(default_factory=list)
    flush: asyncio.Task[None] | None = None


class StatusCoalescer:
    """Paces and gathers the status replies of each chat (see the module docstring)."""

    def __init__(self) -> None:
        self._chats: dict[tuple[int, int | None], _Chat] = {}  # (chat, topic)
        #: Gathered status messages posted (each stood for several requests).
        self.gathered = 0

    async def submit(self, chat_id: tuple[int, int | None], group: bool, status: OutboundMessage,
                     reply_to: int | None, post: Post) -> None:
        loop = asyncio.get_running_loop()
        chat = self._chats.setdefault(chat_id, _Chat())
        interval = GROUP_STATUS_INTERVAL_SECONDS if group else PRIVATE_STATUS_INTERVAL_SECONDS
        wait = chat.last_sent + interval - loop.time()
        if not chat.pending and wait <= 0:
            chat.last_sent = loop.time()
            await post(status, reply_to)
            return
        chat.pending.append((status, reply_to, post))
        if chat.flush is None:
            chat.flush = asyncio.create_task(self._flush_after(chat_id, max(0.0, wait)))

    async def _flush_after(self, chat_id: tuple[int, int | None], delay: float) -> None:
        await asyncio.sleep(delay)
        chat = self._chats[chat_id]
        pending, chat.pending, chat.flush = chat.pending, [], None
        chat.last_sent = asyncio.get_running_loop().time()
        try:
            if len(pending) == 1:
                status, reply_to, post = pending[0]
                await post(status, reply_to)
                return
            self.gathered += 1
            await pending[-1][2](_gathered(pending), None)
        except Exception:  # a status is a courtesy: the jobs go on and post their results
            log.exception("status for %d requests in chat %s not sent", len(pending), chat_id)

    async def aclose(self) -> None:
        """Post what is still gathered (the bot is stopping)."""
        for chat_id, chat in list(self._chats.items()):
            if chat.flush is not None:
                chat.flush.cancel()
                chat.flush = None
                if chat.pending:
                    await self._flush_after(chat_id, 0)


def _gathered(pending: list[tuple[OutboundMessage, int | None, Post]]) -> OutboundMessage:
    """One status for many requests: what each asked for, and its job."""
    lines = [f"• {status.text}" for status, _, _ in pending[:LISTED_MAX]]
    if len(pending) > LISTED_MAX:
        lines.append(f"… and {len(pending) - LISTED_MAX} more.")
    text = (f"Busy moment: {len(pending)} requests are queued. Each result comes as its own "
            "message.\n" + "\n".join(lines))
    return OutboundMessage(MessageKind.STATUS, text)
