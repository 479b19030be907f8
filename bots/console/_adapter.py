"""The local adapter: a chat in the terminal, and the harness every end-to-end test drives.

Every message in the local chat, the person's and the bot's, is a row in ``local_messages``;
its id is the number people react to (``/react 2 👍``). The bot's immediate replies are written
here by the adapter, results by the worker that made them, so :meth:`ConsoleChat.poll` shows
both in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.errors import UserInputError
from core.events import Actor, Channel, ChannelKind, ComponentActivated, MessageReceived, ReactionChanged
from core.orchestrator import Orchestrator
from core.outbound import MessageKind, OutboundMessage
from core.store import LocalMessage, Store

__all__ = ["ConsoleChat", "ShownMessage", "PLATFORM"]

PLATFORM = "local"
POLL_INTERVAL_SECONDS = 0.1


@dataclass(frozen=True, slots=True)
class ShownMessage:
    """A bot message as the person sees it."""

    id: int
    kind: str
    text: str
    job_id: str | None = None
    images: tuple[str, ...] = ()
    buttons: tuple[str, ...] = ()
    reply_to: int | None = None

    @classmethod
    def from_row(cls, row: LocalMessage) -> ShownMessage:
        return cls(id=row.id, kind=row.kind, text=row.text, job_id=row.job_id,
                   images=tuple(row.attachments.get("images", ())),
                   buttons=tuple(row.attachments.get("buttons", ())), reply_to=row.reply_to)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "text": self.text, "job_id": self.job_id,
                "images": list(self.images), "buttons": list(self.buttons),
                "reply_to": self.reply_to}


@dataclass
class ConsoleChat:
    """One local chat. ``user`` is who types; tests make several chats or users at will."""

    orchestrator: Orchestrator
    store: Store
    chat_id: str = "local"
    user: Actor = field(default_factory=lambda: Actor("you", "You"))
    #: The community the chat belongs to; None: the chat is its own (a direct chat). The web
    #: playground's tabs are chats of one community, so they see one gallery and one taste.
    community: str | None = None
    _seen: int = 0
    _jobs: set[str] = field(default_factory=set)
    #: Status messages of requests still running -> the progress last shown for each.
    _progress: dict[int, str] = field(default_factory=dict)

    @property
    def channel(self) -> Channel:
        if self.community is None:
            return Channel(self.chat_id, ChannelKind.DIRECT)
        return Channel(self.chat_id, ChannelKind.GROUP, guild_id=self.community)

    def _post_user(self, text: str) -> int:
        return self.store.add_local_message(chat_id=self.chat_id, author=self.user.id,
                                            kind="user", text=text, attachments={})

    def _post_replies(self, replies: list[OutboundMessage], reply_to: int) -> None:
        for reply in replies:
            if reply.delete_message_id:  # 🗑️ or a report: the result leaves the chat
                if reply.delete_message_id.isdigit():
                    self.store.remove_local_message(int(reply.delete_message_id))
                continue
            if reply.job_id:
                self._jobs.add(reply.job_id)
            self.store.add_local_message(
                chat_id=self.chat_id, author="bot", job_id=reply.job_id, kind=reply.kind.value,
                text=reply.text, attachments={"images": [*reply.images, *reply.originals],
                                              "buttons": []},
                reply_to=reply_to)

    def say(self, text: str) -> list[ShownMessage]:
        """Type a line: a command, free text, or ``/react N emoji`` / ``/unreact N emoji`` /
        ``/press N action``. Returns what the bot said at once (results come via :meth:`poll`).
        """
        number = self._post_user(text)
        words = text.split()
        if words and words[0] in ("/react", "/unreact", "/press"):
            replies = self._console_command(words, number)
        elif words and (words[0] in ("/reply", "/remix")
                        or (words[0] == "/verify" and len(words) > 1)):
            replies = self._with_reference(text, number)
        else:
            event = MessageReceived(platform=PLATFORM, event_id=f"msg:{number}", actor=self.user,
                                    channel=self.channel, text=text, message_id=str(number))
            replies = self.orchestrator.handle(event)
        self._post_replies(replies, number)
        return self.poll()

    def react(self, message: int, emoji: str, *, remove: bool = False) -> list[ShownMessage]:
        verb = "/unreact" if remove else "/react"
        return self.say(f"{verb} {message} {emoji}")

    def _console_command(self, words: list[str], number: int) -> list[OutboundMessage]:
        try:
            if len(words) != 3 or not words[1].isdigit():
                raise UserInputError(f"Use it like this: {words[0]} 2 👍 (a message number, then "
                                     "an emoji or a button name).")
            target, value = words[1], words[2]
            if words[0] == "/press":
                event: Any = ComponentActivated(
                    platform=PLATFORM, event_id=f"press:{number}", actor=self.user,
                    channel=self.channel, custom_id=f"{value}:{self._job_of(int(target))}",
                    message_id=target)
            else:
                emoji = frozenset([value])
                removing = words[0] == "/unreact"
                event = ReactionChanged(platform=PLATFORM, event_id=f"react:{number}",
                                        actor=self.user, channel=self.channel,
                                        message_id=target,
                                        added=frozenset() if removing else emoji,
                                        removed=emoji if removing else frozenset())
            return self.orchestrator.handle(event)
        except UserInputError as exc:
            return [OutboundMessage(MessageKind.ERROR, exc.user_message)]

    def _with_reference(self, text: str, number: int) -> list[OutboundMessage]:
        """``/reply N instruction`` (a reply to message N, as on Telegram), ``/remix PATH
        prompt`` (a picture from disk, as an attachment would bring it) and ``/verify N`` or
        ``/verify PATH`` (where result N, or that file, comes from)."""
        head, _, rest = text.strip().partition(" ")
        target, _, words = rest.strip().partition(" ")
        try:
            if head == "/reply":
                if not target.isdigit() or not words.strip():
                    raise UserInputError("Use it like this: /reply 5 make it at night (the "
                                         "number of one of my results, then what to change).")
                if not self._job_of(int(target)):
                    raise UserInputError(f"Message {target} isn't one of my results, so there "
                                         "is nothing to change. Pick a number shown with a "
                                         "picture or a text I made.")
                event = MessageReceived(platform=PLATFORM, event_id=f"msg:{number}",
                                        actor=self.user, channel=self.channel, text=words,
                                        message_id=str(number), reply_to=target)
            elif head == "/verify" and target.isdigit():
                event = MessageReceived(platform=PLATFORM, event_id=f"msg:{number}",
                                        actor=self.user, channel=self.channel, text="/verify",
                                        message_id=str(number), reply_to=target)
            elif head == "/verify":
                event = MessageReceived(platform=PLATFORM, event_id=f"msg:{number}",
                                        actor=self.user, channel=self.channel, text="/verify",
                                        message_id=str(number), attachments=(rest.strip(),))
            else:
                if not target:
                    raise UserInputError("Use it like this: /remix ~/pictures/cat.png as a "
                                         "watercolor (a picture file, then what to make).")
                event = MessageReceived(platform=PLATFORM, event_id=f"msg:{number}",
                                        actor=self.user, channel=self.channel,
                                        text=f"/remix {words}".strip(), message_id=str(number),
                                        attachments=(target,))
            return self.orchestrator.handle(event)
        except UserInputError as exc:
            return [OutboundMessage(MessageKind.ERROR, exc.user_message)]

    def _job_of(self, message: int) -> str:
        row = self.store.local_message(message)
        return row.job_id if row is not None and row.job_id and row.author == "bot" else ""

    def poll(self) -> list[ShownMessage]:
        """The bot's messages in this chat that were not shown yet."""
        rows = self.store.local_messages_after(self.chat_id, self._seen)
        if rows:
            self._seen = rows[-1].id
        for row in rows:
            if row.author == "bot" and row.kind == "status" and row.job_id:
                self._progress.setdefault(row.id, "")
        return [ShownMessage.from_row(r) for r in rows if r.author == "bot"]

    def poll_progress(self) -> list[ShownMessage]:
        """Progress of the requests still running, as it changed since the last call: each a
        ``progress`` message with its status message's id (a reply as it is written, "drawing
        the pictures (2 of 4)"). Call :meth:`poll` first: it finds the status messages."""
        if not self._progress:
            return []
        shown: list[ShownMessage] = []
        for row in self.store.local_messages_by_id(list(self._progress)):
            text = str(row.attachments.get("progress") or "")
            if text and text != self._progress[row.id]:
                self._progress[row.id] = text
                shown.append(ShownMessage(id=row.id, kind="progress", text=text,
                                          job_id=row.job_id, reply_to=row.reply_to))
            job = self.store.get_job(row.job_id) if row.job_id else None
            if job is None or row.kind != "status" or not self.store.unfinished_with_key_prefix(
                    job.idempotency_key):
                del self._progress[row.id]  # the request is over: nothing more will change
        return shown

    def pending_jobs(self) -> set[str]:
        """Jobs asked for in this chat that have not reached a final state.

        A request's other jobs (its second take, a story's pictures, the job a message was
        understood as) derive their idempotency keys from the first job's, so they count too.
        """
        pending: set[str] = set()
        for job_id in self._jobs:
            job = self.store.get_job(job_id)
            if job is not None:
                pending.update(j.id for j in self.store.unfinished_with_key_prefix(
                    job.idempotency_key))
        return pending

    def wait(self, until: Callable[[list[ShownMessage]], bool], *, timeout: float,
             seen: list[ShownMessage] | None = None) -> list[ShownMessage]:
        """Poll until ``until(all messages shown so far)`` is true; raises TimeoutError."""
        shown = list(seen or [])
        deadline = time.monotonic() + timeout
        while True:
            shown.extend(self.poll())
            if until(shown):
                return shown
            if time.monotonic() > deadline:
                raise TimeoutError(f"gave up after {timeout} s; saw {shown!r}")
            time.sleep(POLL_INTERVAL_SECONDS)
