"""The orchestrator: from an event to persisted jobs, feedback rows and immediate replies.

Adapters call :meth:`Orchestrator.handle` with a core event (in a thread: it does blocking
database and broker I/O) and send back the replies it returns. Results do not come back here:
the worker that runs a job delivers it straight into the chat.
"""

from __future__ import annotations

import logging
import random
import re
import secrets
from typing import Any

from core.errors import QueueUnavailableError, UserInputError
from core.events import (
    ChannelKind,
    ComponentActivated,
    Event,
    MessageReceived,
    CommandInvoked,
    ReactionChanged,
    ReactionsCleared,
)
from core.intents import Intent, IntentKind, help_text, parse_command, parse_text
from core.learning import TasteService
from core import taste
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
BUTTON_ACTIONS = frozenset({"reroll", "more", "up", "down", "delete", "why", "upscale"})
#: "upscale" renders the same picture (prompt, seed, style) again at this many times the side.
UPSCALE_FACTOR = 2
_VARIATION = re.compile(r"vary[1-9]")


def _info(text: str, **kw: Any) -> OutboundMessage:
    return OutboundMessage(MessageKind.INFO, text, **kw)


def _error(text: str, **kw: Any) -> OutboundMessage:
    return OutboundMessage(MessageKind.ERROR, text, **kw)


class Orchestrator:
    """Turns events into work. Stateless apart from its store and publisher."""

    def __init__(self, store: Store, publisher: JobPublisher, settings: Settings, *,
                 rng: random.Random | None = None) -> None:
        self.store = store
        self.publisher = publisher
        self.settings = settings
        self.taste = TasteService(store)
        self.rng = rng or random.Random()

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
                    return self._run_intent(event, intent, reply_to=event.message_id,
                                            parent=self._thread_parent(event))
                case CommandInvoked():
                    intent = parse_command(event.name, dict(event.args),
                                           max_prompt_chars=self.settings.max_prompt_chars)
                    return self._run_intent(event, intent, reply_to=event.message_id,
                                            parent=self._thread_parent(event))
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
            return [self._profile(event, reply_to)]
        if intent.kind is IntentKind.SETTINGS:
            return [self._settings(event, intent.prompt, reply_to)]
        if intent.kind is IntentKind.FORGET:
            return [self._forget(event, intent.prompt, reply_to)]
        if intent.kind is IntentKind.LINK:
            return [self._link(event, intent.prompt, reply_to)]
        return self._submit(event, intent, reply_to=reply_to, parent=parent,
                            thread=parent is not None)

    def _thread_parent(self, event: MessageReceived | CommandInvoked) -> Job | None:
        """The job whose result ``event`` replies to: the new job continues that conversation."""
        if not event.reply_to:
            return None
        delivered = self.store.find_delivered(event.platform, event.channel.chat_id,
                                              event.reply_to)
        return self.store.get_job(delivered.job_id) if delivered is not None else None

    # -- the person's view of their taste -------------------------------------------------------

    def _profile(self, event: Event, reply_to: str | None) -> OutboundMessage:
        from core.profile_card import render_profile, summarize

        user_id = self.store.ensure_user(event.platform, event.actor)
        community_id = self.store.ensure_community(event.platform, event.channel)
        person = self.taste.person_of(user_id)
        profiles = {kind: self.taste.profile("person", person, kind)[0] for kind in ("image", "text")}
        community = {kind: self.taste.profile("community", community_id, kind)[0]
                     for kind in ("image", "text")}
        text = summarize(profiles, community, opted_out=self.taste.opted_out(user_id))
        folder = self.settings.resolved_data_dir / "profiles"
        chart = render_profile(profiles, folder / f"{event.platform}-{person}-{secrets.token_hex(3)}.png",
                               title=event.actor.display_name or "your taste")
        return _info(text, images=(str(chart),) if chart else (), reply_to=reply_to)

    def _settings(self, event: Event, text: str, reply_to: str | None) -> OutboundMessage:
        words = text.split()
        user_id = self.store.ensure_user(event.platform, event.actor)
        usage = ("Settings: /settings learning off (or on) for you; in a group, admins can set "
                 "/settings emoji 🎉 positive (or negative, neutral).")
        if len(words) == 2 and words[0] == "learning" and words[1] in ("on", "off"):
            self.taste.set_opt_out(user_id, words[1] == "off")
            if words[1] == "off":
                return _info("Done: I no longer learn from your reactions, starting now. Your "
                             "earlier feedback stays until you send /forget feedback.",
                             reply_to=reply_to)
            return _info("Done: I learn from your reactions again.", reply_to=reply_to)
        if len(words) == 3 and words[0] == "emoji":
            meanings = {"positive": 1, "negative": -1, "neutral": 0, "+": 1, "-": -1, "0": 0}
            if words[2] not in meanings:
                return _error(f"'{words[2]}' is not a meaning. {usage}", reply_to=reply_to)
            if not (event.actor.is_admin or event.channel.kind is ChannelKind.DIRECT):
                return _error("Only an admin of this group can change what emoji mean.",
                              reply_to=reply_to)
            community_id = self.store.ensure_community(event.platform, event.channel)
            self.taste.set_emoji_meaning(community_id, words[1], meanings[words[2]])
            return _info(f"Done: {words[1]} now counts as {words[2]} here.", reply_to=reply_to)
        return _info(usage, reply_to=reply_to)

    def _forget(self, event: Event, text: str, reply_to: str | None) -> OutboundMessage:
        if text.strip().lower() != "feedback":
            return _info("Send /forget feedback to erase your reactions and what I learned "
                         "from them.", reply_to=reply_to)
        user_id = self.store.ensure_user(event.platform, event.actor)
        erased = self.taste.forget_feedback(user_id)
        return _info(f"Done: erased {erased} reaction(s) and button press(es) of yours and "
                     "rebuilt every profile they had touched.", reply_to=reply_to)

    def _link(self, event: Event, code: str, reply_to: str | None) -> OutboundMessage:
        user_id = self.store.ensure_user(event.platform, event.actor)
        if not code:
            new = self.taste.new_link_code(user_id)
            return _info(f"Send /link {new} to me on your other platform within 30 minutes; "
                         "both identities will then share one taste profile.", reply_to=reply_to)
        if self.taste.link(user_id, code):
            return _info("Linked: your identities now share one taste profile.",
                         reply_to=reply_to)
        return _error("That link code is unknown or expired. Send /link to get a new one.",
                      reply_to=reply_to)

    def _submit(self, event: Event, intent: Intent, *, reply_to: str | None,
                parent: Job | None = None, key_suffix: str = "",
                keep_style: bool = False, thread: bool = False,
                extra_params: dict[str, Any] | None = None,
                variation: bool = False) -> list[OutboundMessage]:
        user_id = self.store.ensure_user(event.platform, event.actor)
        community_id = self.store.ensure_community(event.platform, event.channel)
        kind = "image" if intent.kind is IntentKind.IMAGINE else "text"
        seed = intent.options.get("seed", secrets.randbits(SEED_BITS))
        fixed = _fixed_choices(kind, intent.options)
        if keep_style and parent is not None and parent.params.get("taste"):
            # Rerolls and variations keep what the person is reacting to, but the seed.
            fixed = {**parent.params["taste"]["choice"], **fixed}
            if variation:  # how far to vary is chosen (and learned) afresh for each variation
                fixed = {d: v for d, v in fixed.items() if d not in taste.VARIATION_ONLY}
        # A fresh picture request renders takes in different styles, unless the person named a
        # style or a number of pictures; follow-ups (reroll, more, variations) render one.
        takes = (self.settings.image_takes if kind == "image" and parent is None
                 and "style" not in fixed and "count" not in intent.options else 1)
        chosen = self.taste.choose(user_id=user_id, community_id=community_id, kind=kind,
                                   rng=self.rng, learning=self.settings.learning, fixed=fixed,
                                   takes=takes, variation=variation)
        target = DeliveryTarget(
            platform=event.platform, chat_id=event.channel.chat_id,
            thread_id=event.channel.thread_id, reply_to=reply_to,
            interaction_token=getattr(event, "interaction_token", None))
        jobs: list[Job] = []
        for index, (choice, record) in enumerate(chosen):
            params: dict[str, Any] = taste.generation_params(kind, choice.values)
            if kind == "image":
                params.update(count=intent.options.get("count", 1),
                              steps=self.settings.image_steps, size=self.settings.image_size)
            else:
                params["max_new_tokens"] = max(8, round(self.settings.text_max_new_tokens
                                                        * params.pop("length_factor")))
            params["taste"] = record
            if len(chosen) > 1:
                params["takes"] = {"index": index, "of": len(chosen), "siblings": [
                    other.values for j, (other, _) in enumerate(chosen) if j != index]}
            params.update(extra_params or {})
            if thread:
                # A reply to a result: the worker gives the model the earlier turns as context.
                params["thread"] = True
            job, created = self.store.create_job(
                idempotency_key=f"{event.platform}:{event.event_id}{key_suffix}"
                                + (f":take{index + 1}" if index else ""),
                kind=kind, intent=intent.kind.value, user_id=user_id, community_id=community_id,
                parent_job_id=parent.id if parent else None, prompt=intent.prompt,
                expanded_prompt=taste.expand_prompt(kind, intent.prompt, choice.values),
                params=params, seed=seed, platform=event.platform, delivery=target.to_dict())
            if not created:
                log.info("duplicate event %s for job %s ignored", event.event_id, job.id)
                return []
            jobs.append(job)
        what = "Drawing" if kind == "image" else "Writing"
        for job in jobs:
            try:
                self.publisher.publish(job.id, kind, job.params)
            except QueueUnavailableError as exc:
                ids = ", ".join(j.id for j in jobs)
                return [OutboundMessage(MessageKind.STATUS, f"{exc.user_message} (job {ids})",
                                        job_id=jobs[0].id, reply_to=reply_to)]
            self.store.mark_published(job.id)
        ahead = self.store.queue_position(jobs[0])
        queue_note = f", {ahead} ahead of you" if ahead else ""
        if len(jobs) > 1:
            styles = " and ".join(j.params["taste"]["choice"]["style"] for j in jobs)
            text = (f"{what} {len(jobs)} takes, {styles}: “{_shorten(intent.prompt)}” "
                    f"(jobs {', '.join(j.id for j in jobs)}{queue_note}). React 👍 to the one "
                    "you like; I learn from your pick.")
        else:
            text = f"{what}: “{_shorten(intent.prompt)}” (job {jobs[0].id}{queue_note})"
        return [OutboundMessage(MessageKind.STATUS, text, job_id=jobs[0].id, reply_to=reply_to)]

    # -- feedback -----------------------------------------------------------------------------

    def _reaction(self, event: ReactionChanged) -> list[OutboundMessage]:
        delivered = self.store.find_delivered(event.platform, event.channel.chat_id,
                                              event.message_id)
        if delivered is None:
            return [_error("I only learn from reactions on results I made; that message isn't "
                           "one of mine.", ephemeral=True)]
        common: dict[str, Any] = dict(job_id=delivered.job_id, platform=event.platform,
                      chat_id=event.channel.chat_id, message_id=event.message_id,
                      kind="reaction", occurred_at=event.occurred_at)
        if event.anonymous:
            # Anonymous totals (Telegram): the change since the last count moves the community.
            for emoji, total in sorted((event.counts or {}).items()):
                change = total - self.store.anonymous_total(event.platform, event.message_id, emoji)
                if change:
                    self.taste.record(event_key=f"{event.platform}:{event.event_id}:{emoji}",
                                      user_id=None, value=emoji, delta=change, **common)
            return []
        user_id = self.store.ensure_user(event.platform, event.actor)
        for emoji, delta in [(e, 1) for e in sorted(event.added)] + [
                (e, -1) for e in sorted(event.removed)]:
            self.taste.record(event_key=f"{event.platform}:{event.event_id}:{emoji}:{delta}",
                              user_id=user_id, value=emoji, delta=delta, **common)
        return []

    def _reactions_cleared(self, event: ReactionsCleared) -> list[OutboundMessage]:
        """Remove-all / remove-emoji: every actor's matching reactions are undone."""
        delivered = self.store.find_delivered(event.platform, event.channel.chat_id,
                                              event.message_id)
        if delivered is None:
            return []
        for user_id, emoji in self.store.live_reactions(event.platform, event.message_id,
                                                        event.emoji):
            self.taste.record(event_key=f"{event.platform}:{event.event_id}:{user_id}:{emoji}",
                              job_id=delivered.job_id, user_id=user_id, platform=event.platform,
                              chat_id=event.channel.chat_id, message_id=event.message_id,
                              kind="reaction", value=emoji, delta=-1,
                              occurred_at=event.occurred_at)
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
            if self.taste.person_of(user_id) != self.taste.person_of(job.user_id):
                return [_error("Only the person who asked for this can delete it.",
                               ephemeral=True)]
            return [_info("Deleted.", ephemeral=True, delete_message_id=event.message_id)]
        if action == "why":
            why = (job.params.get("taste") or {}).get("why") or "I had no taste to go on yet."
            style = ", ".join(f"{d}: {v}" for d, v in
                              ((job.params.get("taste") or {}).get("choice") or {}).items())
            return [_info(f"Why this: {why}.\nChosen: {style}.\nPrompt I used: "
                          f"“{job.expanded_prompt}”", ephemeral=True)]
        self.taste.record(event_key=f"{event.platform}:{event.event_id}:button", job_id=job.id,
                          user_id=user_id, platform=event.platform,
                          chat_id=event.channel.chat_id, message_id=event.message_id,
                          kind="button", value=action, delta=1, occurred_at=event.occurred_at)
        if action in ("up", "down"):
            return [_info("Thanks, noted." if action == "up" else "Noted; I'll steer away from "
                          "this.", ephemeral=True)]
        kind = IntentKind.IMAGINE if job.kind == "image" else IntentKind.WRITE
        options: dict[str, Any] = {"count": job.params.get("count", 1)} if job.kind == "image" else {}
        extra: dict[str, Any] = {}
        variation = bool(_VARIATION.fullmatch(action))
        if variation:
            # Variation N redraws picture N of the result (image to image, at the strength the
            # taste chooses) with a seed moved by a fixed, reproducible step; for text it is a
            # new draw in the same style.
            options["seed"] = (job.seed + int(action[4:]) * VARIATION_SEED_STEP) % 2**SEED_BITS
            options["count"] = 1
            if job.kind == "image":
                extra["vary_from"] = {"job_id": job.id, "position": int(action[4:]) - 1}
        elif action == "upscale":
            if job.kind != "image":
                return [_error("Only pictures can be upscaled.", ephemeral=True)]
            options.update(seed=job.seed, count=1)
            extra["scale"] = UPSCALE_FACTOR * float(job.params.get("scale", 1))
        # "more like this", variations and upscales keep the style; a reroll chooses again.
        return self._submit(event, Intent(kind, job.prompt, options), reply_to=event.message_id,
                            parent=job, key_suffix=f":{action}", keep_style=action != "reroll",
                            extra_params=extra, variation=variation and job.kind == "image")


def _fixed_choices(kind: str, options: dict[str, Any]) -> dict[str, str]:
    """What the person asked for explicitly (``--style``, ``--aspect``, ``mode``) and we know."""
    fixed: dict[str, str] = {}
    dims = taste.CATALOGUE[kind]
    if kind == "image":
        style = str(options.get("style", "")).replace(" ", "-")
        if style in dims["style"]:
            fixed["style"] = style
        if options.get("aspect") in dims["aspect"]:
            fixed["aspect"] = options["aspect"]
    else:
        mode = str(options.get("mode", ""))
        for dim in ("form", "tone"):
            if mode in dims[dim]:
                fixed[dim] = mode
    return fixed


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
