"""The orchestrator: from an event to persisted jobs, feedback rows and immediate replies.

Adapters call :meth:`Orchestrator.handle` with a core event (in a thread: it does blocking
database and broker I/O) and send back the replies it returns. Results do not come back here:
the worker that runs a job delivers it straight into the chat.
"""

from __future__ import annotations

import logging
import re
import secrets
from typing import Any

from core.errors import QueueUnavailableError, UserInputError
from core.events import (
    ComponentActivated,
    Event,
    MessageReceived,
    CommandInvoked,
    ReactionChanged,
    ReactionsCleared,
)
from core.intents import Intent, IntentKind, help_text, parse_command, parse_text
from core.outbound import DeliveryTarget, MessageKind, OutboundMessage
from core.queue import JobPublisher
from core.settings import Settings
from core.store import Job, Store

__all__ = ["Orchestrator"]

log = logging.getLogger(__name__)

SEED_BITS = 32
VARIATION_SEED_STEP = 7919
#: Button actions under results: again with a new seed, more like this, thumbs, delete
#: (requester only). ``varyN`` (N = 1..9) is variation N of a result.
BUTTON_ACTIONS = frozenset({"reroll", "more", "up", "down", "delete"})
_VARIATION = re.compile(r"vary[1-9]")


def _info(text: str, **kw: Any) -> OutboundMessage:
    return OutboundMessage(MessageKind.INFO, text, **kw)


def _error(text: str, **kw: Any) -> OutboundMessage:
    return OutboundMessage(MessageKind.ERROR, text, **kw)


class Orchestrator:
    """Turns events into work. Stateless apart from its store and publisher."""

    def __init__(self, store: Store, publisher: JobPublisher, settings: Settings) -> None:
        self.store = store
        self.publisher = publisher
        self.settings = settings

    def handle(self, event: Event) -> list[OutboundMessage]:
        """Handle one event; returns the replies to post now (possibly none).

        A ``UserInputError`` becomes a plain-words reply; nothing a person types raises.
        """
        if event.actor.is_bot:
            return []
        try:
            match event:
                case MessageReceived():
                    intent = parse_text(event.text, max_prompt_chars=self.settings.max_prompt_chars)
                    return self._run_intent(event, intent, reply_to=event.message_id)
                case CommandInvoked():
                    intent = parse_command(event.name, dict(event.args),
                                           max_prompt_chars=self.settings.max_prompt_chars)
                    return self._run_intent(event, intent, reply_to=event.message_id)
                case ReactionChanged():
                    return self._reaction(event)
                case ReactionsCleared():
                    return self._reactions_cleared(event)
                case ComponentActivated():
                    return self._button(event)
        except UserInputError as exc:
            return [_error(exc.user_message, reply_to=getattr(event, "message_id", None))]
        return []

    # -- requests -----------------------------------------------------------------------------

    def _run_intent(self, event: Event, intent: Intent, *, reply_to: str | None,
                    parent: Job | None = None) -> list[OutboundMessage]:
        if intent.kind is IntentKind.HELP:
            return [_info(help_text(), reply_to=reply_to)]
        if intent.kind is IntentKind.PROFILE:
            return [_info("I have not learned your taste yet: react to my results with 👍 or 👎 "
                          "and I will.", reply_to=reply_to)]
        return self._submit(event, intent, reply_to=reply_to, parent=parent)

    def _submit(self, event: Event, intent: Intent, *, reply_to: str | None,
                parent: Job | None = None, key_suffix: str = "") -> list[OutboundMessage]:
        user_id = self.store.ensure_user(event.platform, event.actor)
        community_id = self.store.ensure_community(event.platform, event.channel)
        kind = "image" if intent.kind is IntentKind.IMAGINE else "text"
        seed = intent.options.get("seed", secrets.randbits(SEED_BITS))
        params: dict[str, Any]
        if kind == "image":
            params = {"count": intent.options.get("count", 1),
                      "steps": self.settings.image_steps, "size": self.settings.image_size}
        else:
            params = {"max_new_tokens": self.settings.text_max_new_tokens}
        target = DeliveryTarget(
            platform=event.platform, chat_id=event.channel.chat_id,
            thread_id=event.channel.thread_id, reply_to=reply_to,
            interaction_token=getattr(event, "interaction_token", None))
        job, created = self.store.create_job(
            idempotency_key=f"{event.platform}:{event.event_id}{key_suffix}",
            kind=kind, intent=intent.kind.value, user_id=user_id, community_id=community_id,
            parent_job_id=parent.id if parent else None, prompt=intent.prompt,
            expanded_prompt=intent.prompt, params=params, seed=seed, platform=event.platform,
            delivery=target.to_dict())
        if not created:
            log.info("duplicate event %s for job %s ignored", event.event_id, job.id)
            return []
        what = "Drawing" if kind == "image" else "Writing"
        try:
            self.publisher.publish(job.id, kind, params)
        except QueueUnavailableError as exc:
            return [OutboundMessage(MessageKind.STATUS, f"{exc.user_message} (job {job.id})",
                                    job_id=job.id, reply_to=reply_to)]
        self.store.mark_published(job.id)
        ahead = self.store.queue_position(job)
        queue_note = f", {ahead} ahead of you" if ahead else ""
        return [OutboundMessage(MessageKind.STATUS,
                                f"{what}: “{_shorten(intent.prompt)}” (job {job.id}{queue_note})",
                                job_id=job.id, reply_to=reply_to)]

    # -- feedback -----------------------------------------------------------------------------

    def _reaction(self, event: ReactionChanged) -> list[OutboundMessage]:
        delivered = self.store.find_delivered(event.platform, event.channel.chat_id,
                                              event.message_id)
        if delivered is None:
            return [_error("I only learn from reactions on results I made; that message isn't "
                           "one of mine.", ephemeral=True)]
        user_id = None if event.anonymous else self.store.ensure_user(event.platform, event.actor)
        recorded = 0
        for emoji, delta in [(e, 1) for e in sorted(event.added)] + [
                (e, -1) for e in sorted(event.removed)]:
            recorded += self.store.record_feedback(
                event_key=f"{event.platform}:{event.event_id}:{emoji}:{delta}",
                job_id=delivered.job_id, user_id=user_id, platform=event.platform,
                chat_id=event.channel.chat_id, message_id=event.message_id, kind="reaction",
                value=emoji, delta=delta)
        log.info("reaction on job %s: %d feedback events", delivered.job_id, recorded)
        return []

    def _reactions_cleared(self, event: ReactionsCleared) -> list[OutboundMessage]:
        delivered = self.store.find_delivered(event.platform, event.channel.chat_id,
                                              event.message_id)
        if delivered is None:
            return []
        self.store.record_feedback(
            event_key=f"{event.platform}:{event.event_id}:cleared", job_id=delivered.job_id,
            user_id=None, platform=event.platform, chat_id=event.channel.chat_id,
            message_id=event.message_id, kind="reaction", value=event.emoji or "*", delta=0)
        return []

    def _button(self, event: ComponentActivated) -> list[OutboundMessage]:
        """Buttons under results. ``custom_id`` is ``action:job_id`` (see :data:`BUTTON_ACTIONS`)."""
        action, _, job_id = event.custom_id.partition(":")
        job = self.store.get_job(job_id) if job_id else None
        if job is None:
            return [_error("That button belongs to a result I no longer know.", ephemeral=True)]
        if action not in BUTTON_ACTIONS and not _VARIATION.fullmatch(action):
            return [_error(f"I don't know the button '{action}'.", ephemeral=True)]
        user_id = self.store.ensure_user(event.platform, event.actor)
        if action == "delete":
            if user_id != job.user_id:
                return [_error("Only the person who asked for this can delete it.",
                               ephemeral=True)]
            return [_info("Deleted.", ephemeral=True, delete_message_id=event.message_id)]
        self.store.record_feedback(
            event_key=f"{event.platform}:{event.event_id}:button", job_id=job.id,
            user_id=user_id, platform=event.platform, chat_id=event.channel.chat_id,
            message_id=event.message_id, kind="button", value=action,
            delta=-1 if action == "down" else 1)
        if action in ("up", "down"):
            return [_info("Thanks, noted." if action == "up" else "Noted; I'll steer away from "
                          "this.", ephemeral=True)]
        kind = IntentKind.IMAGINE if job.kind == "image" else IntentKind.WRITE
        options: dict[str, Any] = {"count": job.params.get("count", 1)} if job.kind == "image" else {}
        if _VARIATION.fullmatch(action):
            # A variation keeps the prompt and moves the seed by a fixed, reproducible step.
            options["seed"] = (job.seed + int(action[4:]) * VARIATION_SEED_STEP) % 2**SEED_BITS
            options["count"] = 1
        return self._submit(event, Intent(kind, job.prompt, options), reply_to=event.message_id,
                            parent=job, key_suffix=f":{action}")


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
