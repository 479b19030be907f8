"""The Telegram adapter: python-telegram-bot handlers around the orchestrator.

Handlers do the I/O; :mod:`bots.telegram._payloads` turns updates into core events. The
orchestrator does blocking database and broker work, so it runs in a thread
(``asyncio.to_thread``). Results never pass through here: the worker that made a job posts it
to Telegram itself (``workers/delivery/telegram.py``).

What the bot answers:

* private chats: every command and every text (free text goes through core's intent parsing);
* groups: commands (``/cmd`` or ``/cmd@thisbot``; ``/cmd@otherbot`` is left alone), messages
  that mention the bot, and replies to its own messages. A reply to a result continues that
  conversation: core looks up the replied-to message and makes the new job its child.
* a picture (a photo, or an image sent as a file) whose caption is ``/remix ...``, in private
  chats and groups alike: it is fetched (getFile, then the file URL), checked and kept by
  :func:`core.uploads.keep_upload`, and handed to core as the message's attachment.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import re
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from telegram import BotCommand, Message, ReplyParameters, Update
from telegram.constants import ChatMemberStatus, ChatType
from telegram.error import RetryAfter, TelegramError
from telegram.ext import (
    Application,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    MessageReactionHandler,
    filters,
)

from bots.runtime import BotRuntime
from bots.telegram._concurrency import StatusCoalescer
from bots.telegram._payloads import (
    REMIX_CAPTION,
    VERIFY_CAPTION,
    addressed_text,
    button_event,
    message_event,
    reaction_count_event,
    reaction_event,
    remix_upload,
)
from core.events import Event, ReactionChanged
from core.errors import UserInputError
from core.intents import COMMANDS, parse_text
from core.limits import TELEGRAM, split_text
from core.orchestrator import REPORT_EMOJI
from core.outbound import DeliveryTarget, MessageKind, OutboundMessage
from core.redrive import DelayNotice, DelayNotifier
from core.store import Artifact
from core.uploads import UPLOAD_MAX_BYTES, keep_upload

__all__ = ["TelegramAdapter", "bot_commands"]

log = logging.getLogger(__name__)

MESSAGE_MAX_CHARS = TELEGRAM.message_chars
CAPTION_MAX_CHARS = TELEGRAM.caption_chars or 0
CALLBACK_ANSWER_MAX_CHARS = 200
COMMAND_DESCRIPTION_MAX_CHARS = 256
#: A callback query is answered at once; core gets this long to supply the toast's text
#: ("Thanks, noted.") before the answer goes out without it.
CALLBACK_TOAST_WAIT_SECONDS = 1.5
#: A chat in a flood wait (a 429 seen here or by a worker, shared through the store) gets no
#: reply until it ends; a wait this short is waited out (asyncio.sleep), a longer one drops the
#: replies (status messages are cosmetic; results come from the workers once the wait is over).
FLOOD_WAIT_WAIT_OUT_SECONDS = 3.0
FLOOD_WAIT_PLATFORM = PLATFORM = "telegram"
#: How long a delay notice may take to post (it runs in the redriver's thread).
DELAY_NOTICE_TIMEOUT_SECONDS = 30.0


def bot_commands() -> list[BotCommand]:
    """Every command core offers, for setMyCommands (names 1-32 of a-z 0-9 _)."""
    return [BotCommand(name, line[:COMMAND_DESCRIPTION_MAX_CHARS])
            for name, (_, line) in COMMANDS.items()]


def _strip_bot_name(text: str, bot_username: str) -> str:
    """``/imagine@thisbot a fox`` -> ``/imagine a fox`` (core parses the rest)."""
    head, sep, rest = text.partition(" ")
    name, _, addressee = head.partition("@")
    if addressee and addressee.lower() == bot_username.lower():
        return name + sep + rest
    return text


class TelegramAdapter:
    """Installs the handlers on a PTB :class:`~telegram.ext.Application`."""

    def __init__(self, runtime: BotRuntime) -> None:
        self.orchestrator = runtime.orchestrator
        self.store = runtime.store
        self.redriver = runtime.redriver
        self._statuses = StatusCoalescer()

    def install(self, app: Application) -> None:  # type: ignore[type-arg]
        message_only = filters.UpdateType.MESSAGE
        app.add_handler(CommandHandler(list(COMMANDS), self.on_command, filters=message_only))
        app.add_handler(MessageHandler(filters.COMMAND & message_only, self.on_other_command))
        # Before on_text, which would take the caption for free text.
        app.add_handler(MessageHandler(filters.CaptionRegex(REMIX_CAPTION) & message_only,
                                       self.on_remix))
        app.add_handler(MessageHandler(filters.CaptionRegex(VERIFY_CAPTION) & message_only,
                                       self.on_verify))
        app.add_handler(MessageHandler((filters.TEXT | filters.CAPTION) & ~filters.COMMAND
                                       & message_only, self.on_text))
        app.add_handler(CallbackQueryHandler(self.on_button))
        app.add_handler(MessageReactionHandler(
            self.on_reaction, message_reaction_types=MessageReactionHandler.MESSAGE_REACTION))
        app.add_error_handler(self.on_error)

    async def post_init(self, app: Application) -> None:  # type: ignore[type-arg]
        await app.bot.set_my_commands(bot_commands())
        if self.redriver is not None:
            self.redriver.tell_through(PLATFORM, self._delay_notifier(app.bot))
        log.info("Telegram bot @%s ready; %d commands registered", app.bot.username,
                 len(COMMANDS))

    async def post_stop(self, app: Application) -> None:  # type: ignore[type-arg]
        await self._statuses.aclose()
        if self.redriver is not None:
            self.redriver.tell_through(PLATFORM, None)

    def _delay_notifier(self, bot: Any) -> DelayNotifier:
        """Tells a person, from the redriver's thread, that their request waits: a reply to
        their message on this bot's event loop (skipped while the chat is in a flood wait)."""
        loop = asyncio.get_running_loop()

        def tell(notice: DelayNotice) -> None:
            target = DeliveryTarget.from_dict(notice.job.delivery)
            if self._flood_wait_left(target.chat_id) > 0:
                log.info("delay notice for job %s not sent: chat %s in a flood wait",
                         notice.job.id, target.chat_id)
                return
            reply = int(target.reply_to) if target.reply_to and target.reply_to.isdigit() else None
            sending = bot.send_message(
                int(target.chat_id), notice.text,
                message_thread_id=int(target.thread_id) if target.thread_id else None,
                reply_parameters=ReplyParameters(reply, allow_sending_without_reply=True)
                if reply else None)
            asyncio.run_coroutine_threadsafe(sending, loop).result(DELAY_NOTICE_TIMEOUT_SECONDS)

        return tell

    # -- handlers ------------------------------------------------------------------------------

    async def on_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if message is None or message.from_user is None or not message.text:
            return
        text = _strip_bot_name(message.text, context.bot.username)
        event: Event = message_event(update, text)
        command = message.text.split()[0].split("@")[0]
        replied = message.reply_to_message
        if command.lower() == "/verify" and replied is not None and (
                replied.photo or replied.document):
            # /verify as a reply to a picture: the picture as people see it in this chat.
            kept = await self._fetch_picture(context, replied, message, "verify")
            if kept is None:
                return
            try:
                await self._handle_message(message_event(update, text,
                                                         attachments=(str(kept),)),
                                           message, context)
            finally:
                await asyncio.to_thread(self._drop_unless_kept, kept)
            return
        if message.chat.type != ChatType.PRIVATE and command in ("/settings", "/web"):
            event = await self._with_admin_flag(event, context)
        if message.chat.type != ChatType.PRIVATE and command == "/web":
            await self._answer_privately(event, message, context)
            return
        await self._handle_message(event, message, context)

    async def _answer_privately(self, event: Event, message: Message,
                                context: ContextTypes.DEFAULT_TYPE) -> None:
        """``/web`` in a group: the sign-in link goes to the asker's private chat with the bot,
        never to the group. Telegram lets a bot write to a person only after they started a
        chat with it; until then the group is told how, without the link."""
        assert message.from_user is not None
        replies = await asyncio.to_thread(self.orchestrator.handle, event)
        try:
            for reply in replies:
                await context.bot.send_message(message.from_user.id, reply.text)
        except TelegramError as exc:
            log.info("no private chat with %s: %s", message.from_user.id, exc)
            note = (f"I can't write to you privately yet: open a chat with me "
                    f"(@{context.bot.username}), press Start, then send /web here again.")
        else:
            note = "I sent you a private message with your link."
        await self._send(context, message, [OutboundMessage(MessageKind.INFO, note)],
                         reply_to_message_id=message.message_id)

    async def on_other_command(self, update: Update,
                               context: ContextTypes.DEFAULT_TYPE) -> None:
        """A ``/command`` core does not know, or ``/cmd@otherbot``: in groups it may belong to
        another bot, so it is left alone unless addressed to this bot by name; a private chat
        is ours alone and every message there gets an answer, even "that was for @otherbot"."""
        message = update.effective_message
        if message is None or message.from_user is None or not message.text:
            return
        head = message.text.split()[0]
        _, _, addressee = head.partition("@")
        private = message.chat.type == ChatType.PRIVATE
        if addressee and addressee.lower() != context.bot.username.lower():
            if not private:
                return
            try:  # core's parser answers it, naming the bot the command was for
                parse_text(message.text, bot_username=context.bot.username,
                           max_prompt_chars=self.orchestrator.settings.max_prompt_chars)
            except UserInputError as exc:
                await self._send(context, message, [OutboundMessage(
                    MessageKind.ERROR, exc.user_message)], reply_to_message_id=message.message_id)
                return
        elif not private and not addressee:
            return
        await self._handle_message(
            message_event(update, _strip_bot_name(message.text, context.bot.username)),
            message, context)

    async def on_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if message is None or message.from_user is None:
            return
        if message.chat.type == ChatType.PRIVATE:
            text = message.text or message.caption or ""
        else:
            addressed = addressed_text(message, context.bot.id, context.bot.username)
            if addressed is None:
                return
            text = addressed
        await self._handle_message(message_event(update, text), message, context)

    async def on_remix(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A picture (photo or image file) captioned ``/remix ...``: fetched, checked, kept,
        then handed to core with the caption as text and the kept picture as attachment.

        Whatever stops it (a caption core refuses, not a picture, over 10 MB, a file Telegram
        will not hand over, a damaged picture) is answered in words, as a reply, and makes no
        job. Size and type are checked before downloading. In groups a ``/remix`` caption is
        addressed to the bot, unless it names another bot (then it is left alone).
        """
        await self._captioned_picture(update, context, REMIX_CAPTION, "remix")

    async def on_verify(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A picture captioned ``/verify``: as :meth:`on_remix`, but kept byte for byte (a
        document keeps its C2PA manifest; a photo was recompressed by Telegram and has only the
        watermark left)."""
        await self._captioned_picture(update, context, VERIFY_CAPTION, "verify")

    async def _captioned_picture(self, update: Update, context: ContextTypes.DEFAULT_TYPE,
                                 caption_pattern: re.Pattern[str], verb: str) -> None:
        message = update.effective_message
        if message is None or message.from_user is None or not message.caption:
            return
        caption = message.caption.strip()
        match = caption_pattern.match(caption)
        addressee = match["bot"] if match else None
        if addressee and addressee.lower() != context.bot.username.lower() and (
                message.chat.type != ChatType.PRIVATE):
            return
        text = _strip_bot_name(caption, context.bot.username)
        settings = self.orchestrator.settings
        try:  # a caption core would refuse is answered before anything is downloaded
            parse_text(caption, bot_username=context.bot.username,
                       max_prompt_chars=settings.max_prompt_chars)
        except UserInputError as exc:
            await self._refuse(context, message, exc.user_message)
            return
        kept = await self._fetch_picture(context, message, message, verb)
        if kept is None:
            return
        try:
            await self._handle_message(message_event(update, text, attachments=(str(kept),)),
                                       message, context)
        finally:
            await asyncio.to_thread(self._drop_unless_kept, kept)

    async def _fetch_picture(self, context: ContextTypes.DEFAULT_TYPE, holder: Message,
                             answer_to: Message, verb: str) -> Path | None:
        """The picture in ``holder``, downloaded and kept (``/verify``: byte for byte); None
        when there is none or it cannot be had, after telling the person why."""
        upload = remix_upload(holder, verb)
        if isinstance(upload, str):
            await self._refuse(context, answer_to, upload)
            return None
        if upload.file_size is not None and upload.file_size > UPLOAD_MAX_BYTES:
            await self._refuse(context, answer_to, (
                f"That picture is {upload.file_size / 1e6:.1f} MB; I take pictures up to "
                f"{UPLOAD_MAX_BYTES / 1e6:.0f} MB. Send a smaller one (a photo rather than a "
                "file: Telegram makes photos smaller)."))
            return None
        try:
            file = await context.bot.get_file(upload.file_id)
            data = bytes(await file.download_as_bytearray())
        except TelegramError as exc:
            log.info("%s picture %s not fetched: %s", verb, upload.file_id, exc)
            await self._refuse(context, answer_to, "I couldn't fetch your picture from "
                                                   "Telegram; please send it again.")
            return None
        try:
            return await asyncio.to_thread(keep_upload, data,
                                           self.orchestrator.settings.resolved_data_dir,
                                           name=upload.name, intact=verb == "verify")
        except UserInputError as exc:
            await self._refuse(context, answer_to, exc.user_message)
            return None

    async def on_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        if query is None:
            return
        event = button_event(update)
        if event is None:
            await query.answer("That message is too old for its buttons; ask me again.")
            return
        work = asyncio.ensure_future(asyncio.to_thread(self.orchestrator.handle, event))
        # Answer at once (Telegram shows a spinner until then); wait briefly for a toast text.
        done, _ = await asyncio.wait({work}, timeout=CALLBACK_TOAST_WAIT_SECONDS)
        toast = ""
        if done and work.exception() is None:
            toast = " ".join(r.text for r in work.result() if r.ephemeral)
        try:
            await query.answer(toast[:CALLBACK_ANSWER_MAX_CHARS] or None)
        except TelegramError as exc:
            log.info("callback query %s not answered: %s", query.id, exc)
        replies = await work
        assert isinstance(query.message, Message)
        # A deletion (🗑️) is an act, not words: done whether or not its toast went out.
        deletions = [r for r in replies if r.delete_message_id]
        replies = [r for r in replies if not r.delete_message_id]
        if not done:
            await self._send(context, query.message, [r for r in replies if r.ephemeral])
        await self._send(context, query.message, deletions)
        await self._send(context, query.message, [r for r in replies if not r.ephemeral],
                         reply_to_message_id=query.message.message_id)

    async def on_reaction(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Reactions arrive only when ``message_reaction``/``message_reaction_count`` are in
        ``allowed_updates`` and, in groups, only when the bot is an admin there. Replies are
        dropped: people react to all sorts of messages, and core's "not one of mine" would be
        noise."""
        event = reaction_event(update) or reaction_count_event(update)
        if event is None:
            return
        if event.counts is not None:
            event = await asyncio.to_thread(self._with_vanished_counts, event)
        if REPORT_EMOJI in event.added:  # a report counts only from the chat's admins
            if event.actor.id.startswith("chat:"):  # an anonymous admin, reacting as the chat
                event = dataclasses.replace(event, actor=dataclasses.replace(
                    event.actor, is_admin=True))
            else:
                flagged = await self._with_admin_flag(event, context)
                event = flagged if isinstance(flagged, ReactionChanged) else event
        replies = await asyncio.to_thread(self.orchestrator.handle, event)
        for reply in replies:  # only a report's deletions are carried out
            if reply.delete_message_id:
                try:
                    await context.bot.delete_message(int(event.channel.chat_id),
                                                     int(reply.delete_message_id))
                except TelegramError as exc:
                    log.warning("could not delete message %s: %s", reply.delete_message_id,
                                exc)

    async def on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        log.error("Telegram update failed: %s", context.error, exc_info=context.error)

    # -- helpers -------------------------------------------------------------------------------

    def _with_vanished_counts(self, event: ReactionChanged) -> ReactionChanged:
        """Telegram lists only emoji still present; an emoji that went to 0 must count as 0."""
        delivered = self.store.find_delivered(event.platform, event.channel.chat_id,
                                              event.message_id)
        if delivered is None:
            return event
        seen = {f.value for f in self.store.feedback_for_job(delivered.job_id)
                if f.user_id is None and f.message_id == event.message_id
                and f.kind == "reaction"}
        return dataclasses.replace(event, counts={**dict.fromkeys(seen, 0),
                                                  **(event.counts or {})})

    async def _with_admin_flag(self, event: Event,
                               context: ContextTypes.DEFAULT_TYPE) -> Event:
        """Group settings are for admins: ask Telegram whether the sender is one."""
        if not hasattr(event.actor, "is_admin"):
            return event
        try:
            member = await context.bot.get_chat_member(int(event.channel.chat_id),
                                                       int(event.actor.id))
        except TelegramError as exc:
            log.info("could not check admin rights: %s", exc)
            return event
        is_admin = member.status in (ChatMemberStatus.ADMINISTRATOR, ChatMemberStatus.OWNER)
        return dataclasses.replace(event, actor=dataclasses.replace(event.actor,
                                                                    is_admin=is_admin))

    async def _handle_message(self, event: Event, message: Message,
                              context: ContextTypes.DEFAULT_TYPE) -> None:
        replies = await asyncio.to_thread(self.orchestrator.handle, event)
        private = [r for r in replies if r.files]
        for reply in private:
            await self._send_privately(context, message, reply)
        await self._send(context, message, [r for r in replies if not r.files],
                         reply_to_message_id=message.message_id)

    async def _send_privately(self, context: ContextTypes.DEFAULT_TYPE, message: Message,
                              reply: OutboundMessage) -> None:
        """Files meant for one person (``/mydata``) go to their private chat with the bot, never
        to a group; Telegram lets a bot write there only after the person started it. The
        files are deleted once sent (or refused): the person has them now."""
        assert message.from_user is not None
        in_group = message.chat.type != ChatType.PRIVATE
        try:
            for path in reply.files:
                with open(path, "rb") as document:
                    await context.bot.send_document(message.from_user.id, document,
                                                    caption=reply.text[:CAPTION_MAX_CHARS],
                                                    filename=Path(path).name)
            note = "I sent it to you in our private chat." if in_group else None
        except TelegramError as exc:
            log.info("private file to %s not sent: %s", message.from_user.id, exc)
            note = (f"I can't write to you privately yet: open a chat with @"
                    f"{context.bot.username}, press Start, then send /mydata there.")
        finally:
            for path in reply.files:
                Path(path).unlink(missing_ok=True)
        if note:
            await self._send(context, message, [OutboundMessage(MessageKind.INFO, note)],
                             reply_to_message_id=message.message_id)

    async def _send(self, context: ContextTypes.DEFAULT_TYPE, where: Message,
                    replies: Sequence[OutboundMessage], *,
                    reply_to_message_id: int | None = None) -> None:
        """Post core's immediate replies; a status reply becomes the job's progress message."""
        if not replies:
            return
        left = await asyncio.to_thread(self._flood_wait_left, str(where.chat.id))
        if 0 < left <= FLOOD_WAIT_WAIT_OUT_SECONDS:
            await asyncio.sleep(left)
        elif left > 0:
            log.info("chat %s is in a flood wait for %.1f s more: %d replies not sent",
                     where.chat.id, left, len(replies))
            return
        group = where.chat.type != ChatType.PRIVATE
        thread = where.message_thread_id if where.is_topic_message else None
        for reply in replies:
            if reply.kind is MessageKind.STATUS and reply.job_id and not reply.images:
                await self._statuses.submit((where.chat.id, thread), group, reply,
                                            reply_to_message_id,
                                            functools.partial(self._post, context, where))
                continue
            if not await self._post(context, where, reply, reply_to_message_id):
                return  # the chat's flood wait began: the rest of the replies are not sent

    async def _post(self, context: ContextTypes.DEFAULT_TYPE, where: Message,
                    reply: OutboundMessage, reply_to_message_id: int | None) -> bool:
        """Post one reply; a status reply becomes its job's progress message. False when the
        chat's flood wait began (nobody calls the chat until it ends)."""
        try:
            if reply.delete_message_id:
                await context.bot.delete_message(where.chat.id, int(reply.delete_message_id))
                return True
            sent = None
            text = reply.text
            thread = where.message_thread_id if where.is_topic_message else None
            for number, path in enumerate(reply.images):  # e.g. the /profile chart
                caption = (split_text(text, CAPTION_MAX_CHARS, TELEGRAM.units)[0] or None
                           if number == 0 else None)
                with open(path, "rb") as picture:
                    sent = await context.bot.send_photo(
                        where.chat.id, picture, caption=caption, message_thread_id=thread,
                        reply_parameters=ReplyParameters(reply_to_message_id,
                                                         allow_sending_without_reply=True)
                        if reply_to_message_id and number == 0 else None)
                if caption:
                    text, reply_to_message_id = text.strip()[len(caption):], None
            for number, path in enumerate(reply.originals):  # documents keep their bytes
                caption = (split_text(text, CAPTION_MAX_CHARS, TELEGRAM.units)[0] or None
                           if number == 0 and text.strip() else None)
                with open(path, "rb") as original:
                    sent = await context.bot.send_document(
                        where.chat.id, original, filename=Path(path).name, caption=caption,
                        message_thread_id=thread, disable_content_type_detection=True,
                        reply_parameters=ReplyParameters(reply_to_message_id,
                                                         allow_sending_without_reply=True)
                        if reply_to_message_id and number == 0 else None)
                if caption:
                    text, reply_to_message_id = text.strip()[len(caption):], None
            pieces = split_text(text, MESSAGE_MAX_CHARS, TELEGRAM.units) if text.strip() else []
            for number, piece in enumerate(pieces):
                sent = await context.bot.send_message(
                    where.chat.id, piece,
                    message_thread_id=thread,
                    reply_parameters=ReplyParameters(reply_to_message_id,
                                                     allow_sending_without_reply=True)
                    if reply_to_message_id and number == 0 else None)
        except RetryAfter as exc:  # the chat's flood wait: nobody calls it until it ends
            with warnings.catch_warnings():  # PTB 22.2+: int now, timedelta later
                warnings.simplefilter("ignore", DeprecationWarning)
                wait = exc.retry_after
            seconds = wait.total_seconds() if isinstance(wait, timedelta) else float(wait)
            await asyncio.to_thread(self._hold_chat, str(where.chat.id), seconds)
            log.warning("chat %s in a flood wait for %.0f s: the rest of the replies not "
                        "sent", where.chat.id, seconds)
            return False
        except (TelegramError, OSError) as exc:  # blocked: the job still runs
            log.warning("reply in chat %s not sent: %s", where.chat.id, exc)
            return True
        if reply.kind is MessageKind.STATUS and reply.job_id and sent is not None:
            await asyncio.to_thread(self._remember_progress, reply.job_id, sent.message_id)
        return True

    async def _refuse(self, context: ContextTypes.DEFAULT_TYPE, message: Message,
                      text: str) -> None:
        await self._send(context, message, [OutboundMessage(MessageKind.ERROR, text)],
                         reply_to_message_id=message.message_id)

    def _drop_unless_kept(self, path: Path) -> None:
        """The picture kept for a remix becomes its jobs' input (``/forget uploads`` erases
        it); when no job took it (a replayed update, a refusal), it goes now."""
        with self.store.session() as s:
            used = s.scalar(select(Artifact.id).where(Artifact.kind == "input",
                                                      Artifact.path == str(path)).limit(1))
        if used is None:
            path.unlink(missing_ok=True)

    def _flood_wait_left(self, chat_id: str) -> float:
        """Seconds left of the chat's flood wait (0: free); a store that cannot say holds
        nothing."""
        try:
            until = self.store.chat_free_at(FLOOD_WAIT_PLATFORM, chat_id)
        except Exception as exc:
            log.info("flood wait of chat %s not read: %s", chat_id, exc)
            return 0.0
        return max(0.0, (until - datetime.now(UTC)).total_seconds()) if until else 0.0

    def _hold_chat(self, chat_id: str, seconds: float) -> None:
        try:
            self.store.hold_chat(FLOOD_WAIT_PLATFORM, chat_id,
                                 datetime.now(UTC) + timedelta(seconds=seconds))
        except Exception as exc:
            log.warning("flood wait of chat %s not recorded: %s", chat_id, exc)

    def _remember_progress(self, job_id: str, message_id: int) -> None:
        """The worker edits this message as the job moves ("Drawing…", "Done")."""
        job = self.store.get_job(job_id)
        if job is None:
            return
        extra = {**(job.delivery.get("extra") or {}), "progress_message_id": str(message_id)}
        self.store.update_delivery(job_id, extra=extra)
