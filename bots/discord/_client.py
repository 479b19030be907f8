"""The Discord gateway client: slash commands, result buttons, reactions, optional mentions.

Deadlines and limits this code is shaped by (Discord API v10, discord.py 2.7):

* An interaction must be answered within 3 seconds (else 404/10062 "Unknown interaction"), so
  every handler defers first and only then calls core, which does blocking I/O in a thread.
* The interaction token then serves follow-ups and edits of ``@original`` for 15 minutes; the
  worker uses it to post the result, and falls back to the bot token after that. This module
  stores the token's expiry and the application id with the job for that purpose.
* For a button press answered with a deferred *update*, ``@original`` is the message the button
  is on, which is how "delete" removes a result without any channel permission.
* Buttons survive restarts: each is a :class:`discord.ui.DynamicItem` matched on its
  ``action:job_id`` custom id; discord.py rebuilds it from the pressed message's components.
* Message content is 2000 characters at most.
* A slash command's attachment comes as a CDN URL with its size; reading it may outlast the
  3 s, so ``/remix`` refuses an oversized one at once and defers before downloading.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import discord
from discord import app_commands

from bots.discord._commands import register_commands
from bots.discord._convert import (
    PLATFORM,
    actor_of,
    channel_nsfw,
    channel_of_interaction,
    command_event,
    component_event,
    interaction_actor,
    interaction_extra,
    reaction_event,
    reactions_cleared_event,
)
from bots.discord._setup import build_intents
from bots.runtime import use_handler_threads
from core.actions import ACTION_PATTERN, QUIET_ACTIONS
from core.errors import UserInputError
from core.events import (
    Channel,
    ChannelKind,
    CommandInvoked,
    CommandSource,
    Event,
    MessageReceived,
    ReactionChanged,
)
from core.intents import Intent, parse_command
from core.limits import DISCORD, truncate
from core.orchestrator import REPORT_EMOJI, Orchestrator
from core.outbound import DeliveryTarget, MessageKind, OutboundMessage
from core.redrive import DelayNotice, DelayNotifier, Redriver
from core.store import Store
from core.uploads import UPLOAD_MAX_BYTES, keep_upload

__all__ = ["MuseSparkDiscord", "ResultButton"]

log = logging.getLogger(__name__)

MESSAGE_MAX_CHARS = DISCORD.message_chars
#: How long a delay notice may take to post (it runs in the redriver's thread).
DELAY_NOTICE_TIMEOUT_SECONDS = 30.0
#: Discord's limit on a modal text input's value.
MODAL_INPUT_MAX_CHARS = 4000


def _clip(text: str) -> str:
    return truncate(text, MESSAGE_MAX_CHARS, DISCORD.units)


def _private(reply: OutboundMessage) -> bool:
    return reply.ephemeral or reply.kind is MessageKind.ERROR


class ResultButton(discord.ui.DynamicItem[discord.ui.Button[Any]],
                   template=rf"(?P<action>{ACTION_PATTERN.pattern}):(?P<job_id>[0-9a-f]{{6,32}})"):
    """A button under a result, rebuilt from its ``action:job_id`` custom id on every press."""

    def __init__(self, action: str, job_id: str, label: str | None = None) -> None:
        super().__init__(discord.ui.Button(label=label or action, custom_id=f"{action}:{job_id}"))
        self.action, self.job_id = action, job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction[Any],
                             item: discord.ui.Item[Any], match: re.Match[str]) -> ResultButton:
        label = getattr(item, "label", None)
        return cls(match["action"], match["job_id"], label)

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        client = interaction.client
        assert isinstance(client, MuseSparkDiscord)
        if self.action == "refine":
            # A modal must be the interaction's first answer: no deferral before it.
            await interaction.response.send_modal(RefineModal(client, interaction))
            return
        await client.press(interaction, self.action, self.custom_id)


class RefineModal(discord.ui.Modal, title="Refine this result"):
    """The "✏️ Refine" button's form: what to change. Submitting it is a reply to the result."""

    instruction: discord.ui.TextInput[Any] = discord.ui.TextInput(
        label="What should change?", placeholder="make it at night / a happier ending",
        style=discord.TextStyle.paragraph, max_length=MODAL_INPUT_MAX_CHARS)

    def __init__(self, client: MuseSparkDiscord, pressed: discord.Interaction[Any]) -> None:
        super().__init__()
        self.client = client
        self.result_message_id = str(pressed.message.id) if pressed.message else None

    async def on_submit(self, interaction: discord.Interaction[Any]) -> None:
        await interaction.response.defer(thinking=True)
        event = CommandInvoked(
            platform=PLATFORM, event_id=str(interaction.id), actor=interaction_actor(interaction),
            channel=channel_of_interaction(interaction), occurred_at=interaction.created_at,
            name="refine", args={"prompt": str(self.instruction.value)},
            source=CommandSource.SLASH, reply_to=self.result_message_id,
            message_id=self.result_message_id, interaction_token=interaction.token,
            delivery_extra=interaction_extra(interaction))
        replies = await self.client.handle(event)
        await self.client._answer(interaction, replies, original_pending=True,
                                  original_private=False)


class MuseSparkDiscord(discord.Client):
    """discord.py client that turns interactions and reactions into core events."""

    def __init__(self, orchestrator: Orchestrator, store: Store, *, mention_mode: bool = False,
                 max_prompt_chars: int = 2000, redriver: Redriver | None = None,
                 **options: Any) -> None:
        # Prompts are echoed back: never let one ping @everyone or a role.
        options.setdefault("allowed_mentions", discord.AllowedMentions.none())
        super().__init__(intents=build_intents(mention_mode), **options)
        self.orchestrator, self.store = orchestrator, store
        self.mention_mode, self.max_prompt_chars = mention_mode, max_prompt_chars
        self._parent_nsfw: dict[int, bool] = {}
        self.redriver = redriver
        self.tree = app_commands.CommandTree(self)
        self.tree.on_error = self._on_command_error  # type: ignore[method-assign]
        register_commands(self.tree, self)

    async def setup_hook(self) -> None:
        use_handler_threads()
        self.add_dynamic_items(ResultButton)
        if self.redriver is not None:
            self.redriver.tell_through(PLATFORM, self._delay_notifier())

    async def close(self) -> None:
        if self.redriver is not None:
            self.redriver.tell_through(PLATFORM, None)
        await super().close()

    def _delay_notifier(self) -> DelayNotifier:
        """Tells a person, from the redriver's thread, that their request waits: a reply in
        its channel on this client's event loop (mentions off, as for every message)."""
        loop = asyncio.get_running_loop()

        def tell(notice: DelayNotice) -> None:
            target = DeliveryTarget.from_dict(notice.job.delivery)
            channel = self.get_partial_messageable(int(target.thread_id or target.chat_id))
            reference = (channel.get_partial_message(int(target.reply_to))
                         if target.reply_to and target.reply_to.isdigit() else None)
            sending = channel.send(_clip(notice.text), reference=reference,  # type: ignore[arg-type]
                                   mention_author=False)
            asyncio.run_coroutine_threadsafe(sending, loop).result(DELAY_NOTICE_TIMEOUT_SECONDS)

        return tell

    async def nsfw(self, channel: Any | None) -> bool:
        """Whether ``channel`` is age-restricted; for a thread, whether its parent channel is,
        asked of Discord (once per parent) when the parent is not in discord.py's cache."""
        if not isinstance(channel, discord.Thread) or channel.parent is not None:
            return channel_nsfw(channel)
        known = self._parent_nsfw.get(channel.parent_id)
        if known is None:
            try:
                parent = await self.fetch_channel(channel.parent_id)
            except discord.HTTPException as exc:
                log.info("parent channel %s of thread %s not fetched: %s", channel.parent_id,
                         channel.id, exc)
                return False
            known = self._parent_nsfw[channel.parent_id] = channel_nsfw(parent)
        return known

    async def _reporter(self, payload: discord.RawReactionActionEvent,
                        event: ReactionChanged) -> ReactionChanged:
        """A 🚩 counts as a report only from an admin (Manage Server) or a moderator (Manage
        Messages): the raw event's member carries no permissions, so they are asked of Discord
        (the guild with its roles, and the member)."""
        if payload.guild_id is None:
            return event
        try:
            guild = self.get_guild(payload.guild_id) or await self.fetch_guild(payload.guild_id)
            member = guild.get_member(payload.user_id) or await guild.fetch_member(
                payload.user_id)
        except discord.HTTPException as exc:
            log.info("could not check the rights of reporter %s: %s", payload.user_id, exc)
            return event
        rights = member.guild_permissions
        actor = dataclasses.replace(event.actor, is_admin=rights.manage_guild,
                                    is_moderator=rights.manage_messages)
        return dataclasses.replace(event, actor=actor)

    async def _hide(self, channel_id: int, replies: list[OutboundMessage]) -> None:
        """Delete the messages core says to delete (a reported result)."""
        channel = self.get_partial_messageable(channel_id)
        for reply in replies:
            if not reply.delete_message_id:
                continue
            try:
                await channel.get_partial_message(int(reply.delete_message_id)).delete()
            except discord.HTTPException as exc:
                log.warning("could not delete message %s: %s", reply.delete_message_id, exc)

    async def handle(self, event: Event) -> list[OutboundMessage]:
        """Core's ``handle`` in a thread (it does blocking database and broker I/O)."""
        return await asyncio.to_thread(self.orchestrator.handle, event)

    # -- slash commands -----------------------------------------------------------------------

    async def run_command(self, interaction: discord.Interaction[Any], name: str,
                          args: dict[str, Any]) -> None:
        """Defer within Discord's 3 s, hand the command to core, show its immediate answer."""
        args = {k: v for k, v in args.items() if v is not None}
        try:  # pure and instant: bad input gets its plain-words answer before any deferral
            intent: Intent = parse_command(name, args, max_prompt_chars=self.max_prompt_chars)
        except UserInputError as exc:
            await interaction.response.send_message(_clip(exc.user_message), ephemeral=True)
            return
        private = not intent.makes_job
        await interaction.response.defer(thinking=True, ephemeral=private)
        replies = await self.handle(command_event(interaction, name, args,
                                                  nsfw=await self.nsfw(interaction.channel)))
        await self._answer(interaction, replies, original_pending=True, original_private=private)

    async def run_remix(self, interaction: discord.Interaction[Any], image: discord.Attachment,
                        args: dict[str, Any], *, command: str = "remix") -> None:
        """``/remix``: check the prompt and the attachment's size at once, then defer, download
        and check the picture (core/uploads.py) before core sees it; each refusal is private.

        ``/verify`` (``command="verify"``) takes the same path; its picture is kept byte for
        byte, since re-encoding would drop the C2PA manifest it is asked about.
        """
        args = {k: v for k, v in args.items() if v is not None}
        try:
            parse_command(command, args, max_prompt_chars=self.max_prompt_chars)
        except UserInputError as exc:
            await interaction.response.send_message(_clip(exc.user_message), ephemeral=True)
            return
        if image.size > UPLOAD_MAX_BYTES:  # refused without downloading it
            await interaction.response.send_message(
                f"That file is {image.size / 1e6:.1f} MB; I take pictures up to "
                f"{UPLOAD_MAX_BYTES / 1e6:.0f} MB. Send a smaller one.", ephemeral=True)
            return
        await interaction.response.defer(thinking=True)
        try:
            data = await image.read()
            staged = await asyncio.to_thread(keep_upload, data,
                                             self.orchestrator.settings.resolved_data_dir,
                                             name=image.filename, intact=command == "verify")
        except UserInputError as exc:
            await self._answer(interaction, [OutboundMessage(MessageKind.ERROR, exc.user_message)],
                               original_pending=True, original_private=False)
            return
        except discord.HTTPException as exc:
            log.warning("could not download attachment %s: %s", image.id, exc)
            await self._answer(interaction, [OutboundMessage(
                MessageKind.ERROR, "I couldn't fetch your picture from Discord. Please attach "
                                   "it again.")], original_pending=True, original_private=False)
            return
        replies: list[OutboundMessage] = []
        try:
            replies = await self.handle(command_event(
                interaction, command, {**args, "image": str(staged)},
                nsfw=await self.nsfw(interaction.channel)))
        finally:
            await asyncio.to_thread(self._drop_staged, staged, replies)
        await self._answer(interaction, replies, original_pending=True, original_private=False)

    def _drop_staged(self, staged: Path, replies: list[OutboundMessage]) -> None:
        """Core keeps its own copy as the job's input (``/forget uploads`` erases that one);
        ours would be a copy of someone's picture that nothing can erase, so it goes."""
        inputs = {artifact.path for reply in replies if reply.job_id
                  for artifact in self.store.artifacts(reply.job_id, "input")}
        if str(staged) not in inputs:
            staged.unlink(missing_ok=True)

    async def _on_command_error(self, interaction: discord.Interaction[Any],
                                error: app_commands.AppCommandError) -> None:
        """Plain words, privately; the operator's log gets the details."""
        if isinstance(error, app_commands.TransformerError):
            text = (f"I couldn't use '{error.value}' there. Pick one of the offered values "
                    "and try again.")
        else:
            log.error("slash command failed", exc_info=error)
            text = "Something went wrong on my side. Please try again in a moment."
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException as exc:
            log.warning("could not tell the person about an error: %s", exc)

    # -- buttons ------------------------------------------------------------------------------

    async def press(self, interaction: discord.Interaction[Any], action: str,
                    custom_id: str) -> None:
        if action in QUIET_ACTIONS:
            await interaction.response.defer()  # a deferred update: @original is the result
            pending = False
        else:
            await interaction.response.defer(thinking=True)
            pending = True
        replies = await self.handle(component_event(
            interaction, custom_id, nsfw=await self.nsfw(interaction.channel)))
        await self._answer(interaction, replies, original_pending=pending,
                           original_private=False)

    # -- answering ----------------------------------------------------------------------------

    async def _answer(self, interaction: discord.Interaction[Any],
                      replies: list[OutboundMessage], *, original_pending: bool,
                      original_private: bool) -> None:
        """Show core's replies: the first fills the deferred message; private ones are ephemeral.

        A public "thinking" message cannot turn ephemeral, so a private reply to it deletes it
        and follows up ephemerally instead.
        """
        for reply in replies:
            if reply.delete_message_id:
                await self._delete_result(interaction, reply.delete_message_id)
            text = _clip(reply.text)
            if reply.files:  # for this person only (/mydata): ephemeral, then deleted here
                files = [discord.File(path) for path in reply.files]
                try:
                    if original_pending and original_private:
                        await interaction.edit_original_response(content=text,
                                                                 attachments=files)
                    else:
                        if original_pending:
                            await interaction.delete_original_response()
                        await interaction.followup.send(text, files=files, ephemeral=True)
                    original_pending = False
                finally:
                    for file in files:
                        file.close()
                    for path in reply.files:
                        Path(path).unlink(missing_ok=True)
                continue
            files = [discord.File(path) for path in reply.originals]  # kept, bytes intact
            if original_pending:
                original_pending = False
                if _private(reply) and not original_private:
                    await interaction.delete_original_response()
                    await interaction.followup.send(text, ephemeral=True)
                    continue
                if files:
                    await interaction.edit_original_response(content=text, attachments=files)
                else:
                    await interaction.edit_original_response(content=text)
                continue
            if files:
                await interaction.followup.send(text, ephemeral=_private(reply), files=files)
            else:
                await interaction.followup.send(text, ephemeral=_private(reply))
        if original_pending:  # a replayed event: core made nothing and has nothing to say
            await interaction.delete_original_response()

    async def _delete_result(self, interaction: discord.Interaction[Any], message_id: str) -> None:
        try:
            if interaction.message is not None and str(interaction.message.id) == message_id:
                await interaction.delete_original_response()
                return
            channel = interaction.channel
            if isinstance(channel, discord.abc.Messageable):
                await channel.get_partial_message(int(message_id)).delete()  # type: ignore[union-attr]
        except discord.HTTPException as exc:
            log.warning("could not delete message %s: %s", message_id, exc)

    # -- reactions ----------------------------------------------------------------------------

    def _ours_to_ignore(self, user_id: int, message_author_id: int | None) -> bool:
        me = self.user.id if self.user else None
        if user_id == me:  # Discord echoes the bot's own reactions back to it
            return True
        return message_author_id is not None and message_author_id != me

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        if self._ours_to_ignore(payload.user_id, payload.message_author_id):
            return
        # Replies dropped: reactions are silent feedback, also on messages that are not ours;
        # only a report's deletions are carried out.
        event = reaction_event(payload, channel=self.get_channel(payload.channel_id))
        if REPORT_EMOJI in event.added:
            event = await self._reporter(payload, event)
        await self._hide(payload.channel_id, await self.handle(event))

    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        if self._ours_to_ignore(payload.user_id, None):
            return
        await self.handle(reaction_event(payload, channel=self.get_channel(payload.channel_id)))

    async def on_raw_reaction_clear(self, payload: discord.RawReactionClearEvent) -> None:
        await self.handle(reactions_cleared_event(
            payload, channel=self.get_channel(payload.channel_id)))

    async def on_raw_reaction_clear_emoji(self, payload: discord.RawReactionClearEmojiEvent) -> None:
        await self.handle(reactions_cleared_event(
            payload, channel=self.get_channel(payload.channel_id)))

    # -- mention mode (needs the privileged MESSAGE_CONTENT intent) ---------------------------

    async def on_message(self, message: discord.Message) -> None:
        """Mention mode: messages that @mention the bot, and replies to its messages (a reply
        to a result refines it: "make it at night"). Discord counts a reply as a mention of
        the replied-to author unless the person switched the ping off, so both are checked."""
        if not self.mention_mode or self.user is None or message.author.bot:
            return
        reference = message.reference
        replied = reference.resolved if reference is not None else None
        replies_to_us = isinstance(replied, discord.Message) and replied.author == self.user
        if self.user not in message.mentions and not replies_to_us:
            return
        text = re.sub(rf"<@!?{self.user.id}>", "", message.content).strip()
        guild_id = str(message.guild.id) if message.guild else None
        kind = (ChannelKind.DIRECT if guild_id is None else
                ChannelKind.THREAD if isinstance(message.channel, discord.Thread)
                else ChannelKind.GUILD_CHANNEL)
        channel = Channel(chat_id=str(message.channel.id), kind=kind, guild_id=guild_id,
                          thread_id=str(message.channel.id) if kind is ChannelKind.THREAD
                          else None, nsfw=await self.nsfw(message.channel))
        staged: Path | None = None
        words = text.split()
        picture = next((a for a in message.attachments
                        if (a.content_type or "").startswith("image/")), None)
        if picture is not None and words and words[0].lower() in ("/verify", "/remix"):
            # "@MuseSpark /verify" (or /remix ...) with a picture attached: fetched and kept as
            # the slash commands' image option is (core/uploads.py); /verify's byte for byte.
            staged = await self._fetch_attached(message, picture,
                                                intact=words[0].lower() == "/verify")
            if staged is None:
                return
        event = MessageReceived(platform=PLATFORM, event_id=f"message:{message.id}",
                                actor=actor_of(message.author), channel=channel,
                                occurred_at=message.created_at, text=text,
                                message_id=str(message.id),
                                reply_to=str(reference.message_id)
                                if reference is not None and reference.message_id else None,
                                attachments=(str(staged),) if staged else ())
        replies: list[OutboundMessage] = []
        try:
            replies = await self.handle(event)
        finally:
            if staged is not None:
                await asyncio.to_thread(self._drop_staged, staged, replies)
        for reply in replies:
            await message.reply(_clip(reply.text), mention_author=False)

    async def _fetch_attached(self, message: discord.Message, picture: discord.Attachment, *,
                              intact: bool) -> Path | None:
        """The picture attached to ``message``, downloaded and kept; None (the person told
        why, in a reply) when it is too large, unreadable, or Discord would not give it."""
        if picture.size > UPLOAD_MAX_BYTES:  # refused without downloading it
            await message.reply(f"That file is {picture.size / 1e6:.1f} MB; I take pictures up "
                                f"to {UPLOAD_MAX_BYTES / 1e6:.0f} MB. Send a smaller one.",
                                mention_author=False)
            return None
        try:
            data = await picture.read()
            return await asyncio.to_thread(keep_upload, data,
                                           self.orchestrator.settings.resolved_data_dir,
                                           name=picture.filename, intact=intact)
        except UserInputError as exc:
            await message.reply(_clip(exc.user_message), mention_author=False)
        except discord.HTTPException as exc:
            log.warning("could not download attachment %s: %s", picture.id, exc)
            await message.reply("I couldn't fetch your picture from Discord. Please attach it "
                                "again.", mention_author=False)
        return None
