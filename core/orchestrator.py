"""The orchestrator: from an event to persisted jobs, feedback rows and immediate replies.

Adapters call :meth:`Orchestrator.handle` with a core event (in a thread: it does blocking
database and broker I/O) and send back the replies it returns. Results do not come back here:
the worker that runs a job delivers it straight into the chat.
"""

from __future__ import annotations

import logging
import random
import secrets
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import actions, cocreation
from core.errors import PromptError, QueueUnavailableError, UserInputError
from core.events import (
    ChannelKind,
    ComponentActivated,
    Event,
    MessageReceived,
    CommandInvoked,
    ReactionChanged,
    ReactionsCleared,
)
from core.intents import (
    SCENES_DEFAULT,
    Intent,
    IntentKind,
    help_text,
    parse_command,
    parse_text,
)
from core.learning import TasteService
from core.policy import Policy, is_admin_here
from core.privacy import Privacy
from core.safety import DEFAULT_POLICY
from core import taste
from core.outbound import DeliveryTarget, MessageKind, OutboundMessage
from core.queue import JobPublisher, publishing_batch
from core.settings import Settings
from core.store import Job, Store
from core.understanding import ASK_CHOICES, Understanding
from core.uploads import UPLOADS_FOLDER, keep_upload

__all__ = ["Orchestrator", "Origin"]

log = logging.getLogger(__name__)

#: Intents answered at once, without a job: a replayed event of one of these is answered once
#: (the store remembers it); the others are kept once by their job's idempotency key.
ANSWERED_AT_ONCE = frozenset({IntentKind.HELP, IntentKind.PROFILE, IntentKind.SETTINGS,
                              IntentKind.FORGET, IntentKind.LINK, IntentKind.MYDATA,
                              IntentKind.WEB})

SEED_BITS = 32
VARIATION_SEED_STEP = 7919
#: A refinement redraws with a seed moved by this step from its parent's (reproducible).
REFINE_SEED_STEP = 104729
#: "upscale" renders the same picture (prompt, seed, style) again at this many times the side.
UPSCALE_FACTOR = 2
#: Chars per token for budgeting structured output. The schema bounds every string, so the
#: budget only has to cover the worst case (a token per character: "Fox-Fox-Apex" runs near
#: two characters a token on SmolLM2); the grammar ends the JSON well before it. A budget that
#: ran out first would cut the JSON off and fall back to a one-scene story.
CHARS_PER_TOKEN = 1.0
#: Tokens a structured answer needs beyond its text (keys, quotes, brackets) per item.
JSON_TOKENS_PER_ITEM = 12
#: The job kind each job-making intent runs as (refinements take their parent's kind).
_JOB_KIND = {IntentKind.IMAGINE: "image", IntentKind.REMIX: "image", IntentKind.WRITE: "text",
             IntentKind.STORY: "text", IntentKind.BRAINSTORM: "text",
             IntentKind.UNDERSTAND: "text"}
#: Text jobs that also choose a picture taste up front (see ``_piece_params``).
_PICTURE_PLANS = frozenset({IntentKind.STORY, IntentKind.BRAINSTORM})
#: The reaction by which an admin or a moderator reports (and hides) a result.
REPORT_EMOJI = "🚩"
_STATUS_VERB = {IntentKind.IMAGINE: "Drawing", IntentKind.WRITE: "Writing",
                IntentKind.REMIX: "Remixing your picture", IntentKind.REFINE: "Refining",
                IntentKind.BRAINSTORM: "Thinking up ideas for",
                IntentKind.UNDERSTAND: "Reading your message",
                IntentKind.VERIFY: "Checking where this comes from"}


@dataclass(frozen=True, slots=True)
class Origin:
    """Who asked, where the answers go, and the key the request's jobs derive theirs from.

    An event makes one (:meth:`Orchestrator.origin`); so does a job whose worker routes a
    request onwards (:meth:`Orchestrator.origin_of`, an ``understand`` job), so both paths make
    jobs the same way.
    """

    platform: str
    key: str
    user_id: int
    community_id: int | None
    target: DeliveryTarget
    #: The channel is age-restricted (see core/safety.py: where safety may be off).
    nsfw: bool = False
    #: The safety policy the request was already admitted under (quota counted, prompt
    #: checked); None: :meth:`Orchestrator.submit` admits it.
    admitted: str | None = None


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
        self.policy = Policy(store, settings)
        self.privacy = Privacy(store, settings, self.taste)
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
                    replied = self._replied_result(event)
                    intent = parse_text(event.text, max_prompt_chars=self.settings.max_prompt_chars,
                                        replying=replied is not None
                                        and replied[0].intent != "understand")
                    if intent.kind in (IntentKind.REMIX, IntentKind.VERIFY) and event.attachments:
                        intent = Intent(intent.kind, intent.prompt,
                                        {**intent.options, "image": event.attachments[0]})
                    return self._run_intent(event, intent, reply_to=event.message_id,
                                            replied=replied)
                case CommandInvoked():
                    intent = parse_command(event.name, dict(event.args),
                                           max_prompt_chars=self.settings.max_prompt_chars)
                    if intent.kind is IntentKind.VERIFY and event.args.get("image"):
                        intent = Intent(intent.kind, intent.prompt,
                                        {"image": str(event.args["image"])})
                    return self._run_intent(event, intent, reply_to=event.message_id,
                                            replied=self._replied_result(event))
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
                    replied: tuple[Job, int] | None = None) -> list[OutboundMessage]:
        if intent.kind in ANSWERED_AT_ONCE and not self.store.first_handling(event.platform,
                                                                             event.event_id):
            log.info("%s event %s was answered already (a replay): not again", event.platform,
                     event.event_id)
            return []
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
        if intent.kind is IntentKind.MYDATA:
            return [self._mydata(event, reply_to)]
        if intent.kind is IntentKind.WEB:
            return [self._web(event, reply_to)]
        origin = self.origin(event, reply_to)
        if intent.kind is IntentKind.VERIFY:
            return self._verify(event, intent, origin, replied)
        if intent.kind is IntentKind.REFINE:
            if replied is None or replied[0].intent == "understand":
                raise PromptError(
                    "That message isn't one of my results, so there is nothing to change. "
                    "Reply to a picture or a text I made (\"make it at night\"), or send a "
                    "new request.")
            return self.refine(origin, intent, *replied)
        if intent.kind is IntentKind.UNDERSTAND:
            return self.submit(origin, intent, extra_params={"understand": {
                "replying": replied is not None, "text": intent.prompt,
                "parent": [replied[0].id, replied[1]] if replied else None}})
        if intent.kind is IntentKind.REMIX:
            intent = self._kept_upload(intent, local=event.platform == "local")
        parent = replied[0] if replied else None
        thread = parent is not None and intent.kind is IntentKind.WRITE
        return self.submit(origin, intent, parent=parent if thread else None, thread=thread)

    def route(self, job: Job, understanding: Understanding) -> list[OutboundMessage]:
        """Act on what a worker understood an ``understand`` job's message to mean.

        Returns what the person is told at once: the new job's status, or help.
        """
        params = job.params.get("understand") or {}
        kind = IntentKind(understanding.intent)
        options = {"understanding": understanding.to_dict()}
        origin = self.origin_of(job, key=f"{job.idempotency_key}:as-{kind.value}")
        if kind is IntentKind.HELP:
            return [_info(help_text())]
        prompt = understanding.prompt or str(params.get("text") or job.prompt)
        intent = parse_command(kind.value, {"prompt": prompt},
                               max_prompt_chars=self.settings.max_prompt_chars)
        intent = Intent(intent.kind, intent.prompt, {**intent.options, **options})
        replied: list[Any] = list(params.get("parent") or [])
        parent = self.store.get_job(str(replied[0])) if replied else None
        if kind is IntentKind.REFINE:
            if parent is None:
                raise PromptError("That message isn't one of my results, so there is nothing "
                                  "to change; send a new request instead.")
            return self.refine(origin, intent, parent, int(replied[1]))
        thread = parent is not None and kind is IntentKind.WRITE
        return self.submit(origin, intent, parent=parent if thread else None, thread=thread)

    def _replied_result(self, event: MessageReceived | CommandInvoked) -> tuple[Job, int] | None:
        """The result ``event`` replies to (and which of its pictures), if it is one of ours."""
        if not event.reply_to:
            return None
        return self.store.result_of_message(event.platform, event.channel.chat_id,
                                            event.reply_to)

    def _kept_upload(self, intent: Intent, *, local: bool, intact: bool = False) -> Intent:
        """A remix's (or a ``/verify``'s) picture, checked and kept in the data dir (see
        core/uploads.py; ``intact`` keeps its bytes, manifest included).

        Chat adapters hand over pictures they already kept under ``uploads/``; only the local
        chat, whose person is on this machine, may name a file anywhere (and it is copied).
        """
        source = intent.options.get("image")
        what = intent.kind.value
        if not source:
            raise PromptError("Attach the picture to remix: send it with the caption /remix "
                              "and what to make of it (local chat: /remix PATH what to make).")
        path = Path(str(source)).expanduser()
        uploads = (self.settings.resolved_data_dir / UPLOADS_FOLDER).resolve()
        if path.resolve().parent == uploads and path.is_file():
            return intent  # kept and checked by the adapter; a replay makes no second copy
        if not local:
            raise PromptError(f"Attach the picture itself to {what} it.")
        try:
            data = path.read_bytes()
        except OSError:
            raise PromptError(f"I can't open the file “{path.name}”. Check the path and send "
                              "it again.") from None
        kept = keep_upload(data, self.settings.resolved_data_dir, name=path.name, intact=intact)
        named = {"name": path.name} if intact else {}
        return Intent(intent.kind, intent.prompt, {**intent.options, "image": str(kept), **named})

    def _verify(self, event: Event, intent: Intent, origin: Origin,
                replied: tuple[Job, int] | None) -> list[OutboundMessage]:
        """``/verify``: a worker reads the picture's provenance (manifest, watermark, job).

        The picture is the one attached (kept byte for byte: re-encoding would drop its
        manifest) or, for a reply without one, the result replied to, as this bot keeps it.
        """
        params: dict[str, Any]
        if intent.options.get("image"):
            intent = self._kept_upload(intent, local=event.platform == "local", intact=True)
            name = str(intent.options.get("name") or "your picture")
            params = {"verify": {"path": str(intent.options["image"]), "name": name}}
        elif replied is not None and replied[0].kind == "image" and replied[0].intent != "verify":
            job, position = replied
            name = f"the picture of job {job.id}"
            params = {"verify": {"job_id": job.id, "position": position, "name": name}}
        else:
            raise PromptError("Reply /verify to a picture, or send a picture with the caption "
                              "/verify (Discord: /verify with the image option; local chat: "
                              "/verify PATH), and I'll say where it comes from.")
        # A check makes nothing new: no quota, no fair-share hold, no safety policy.
        job, created = self.store.create_job(
            idempotency_key=origin.key, kind="image", intent=IntentKind.VERIFY.value,
            requester=self.taste.person_of(origin.user_id), held=False,
            user_id=origin.user_id, community_id=origin.community_id, parent_job_id=None,
            prompt=name, expanded_prompt=name, params=params, seed=0,
            platform=origin.platform, delivery=origin.target.to_dict(), published=True)
        if not created:
            return []
        if intent.options.get("image"):
            path = str(intent.options["image"])
            self.store.add_input(job.id, path, Path(path).read_bytes())
        return [self._publish([job], Intent(IntentKind.VERIFY, name), origin,
                              self.store.queue_position(job))]

    def origin(self, event: Event, reply_to: str | None) -> Origin:
        target = DeliveryTarget(
            platform=event.platform, chat_id=event.channel.chat_id,
            thread_id=event.channel.thread_id, reply_to=reply_to,
            interaction_token=getattr(event, "interaction_token", None),
            extra=dict(getattr(event, "delivery_extra", None) or {}))
        return Origin(event.platform, f"{event.platform}:{event.event_id}",
                      self.store.ensure_user(event.platform, event.actor),
                      self.store.ensure_community(event.platform, event.channel), target,
                      nsfw=event.channel.nsfw)

    @staticmethod
    def origin_of(job: Job, *, key: str) -> Origin:
        """Answers go where ``job``'s did (its progress message, its interaction)."""
        return Origin(job.platform, key, job.user_id, job.community_id,
                      DeliveryTarget.from_dict(job.delivery),
                      admitted=str(job.params.get("safety") or DEFAULT_POLICY))

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
        usage = ("Settings: /settings learning off (or on) for you; /settings credit on (or "
                 "off) to be named as creator in your pictures' signed provenance; in a group, "
                 "admins can set /settings emoji 🎉 positive (or negative, neutral), /settings "
                 "safety strict|standard|off, /settings blockword add|remove WORD, /settings "
                 "quota, and read /settings audit.")
        if words and words[0] in ("safety", "blockword", "quota", "audit"):
            community_id = self.store.ensure_community(event.platform, event.channel)
            return _info(self.policy.command(words, actor=event.actor, channel=event.channel,
                                             platform=event.platform, user_id=user_id,
                                             community_id=community_id), reply_to=reply_to)
        if len(words) == 2 and words[0] == "credit" and words[1] in ("on", "off"):
            self.store.set_credit(self.taste.identities_of(user_id), words[1] == "on")
            if words[1] == "on":
                return _info("Done: your next pictures name you (as "
                             f"“{event.actor.display_name or event.actor.id}”) as their creator "
                             "in their signed provenance (C2PA), and /verify shows it. Pictures "
                             "already made stay as they are.", reply_to=reply_to)
            return _info("Done: your next pictures no longer name you; their provenance says "
                         "only that MuseSpark made them.", reply_to=reply_to)
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
        what, _, code = text.strip().lower().partition(" ")
        if what == "everything":
            return self._forget_everything(event, code.strip(), reply_to)
        what = text.strip().lower()
        if what not in ("feedback", "uploads"):
            return _info("Send /forget feedback to erase your reactions and what I learned "
                         "from them, /forget uploads to erase the pictures you sent me, or "
                         "/forget everything to erase all I keep about you.",
                         reply_to=reply_to)
        user_id = self.store.ensure_user(event.platform, event.actor)
        if what == "uploads":
            erased = self.store.forget_uploads(self.taste.identities_of(user_id))
            return _info(f"Done: erased {erased} picture(s) you sent me.", reply_to=reply_to)
        erased = self.taste.forget_feedback(user_id)
        return _info(f"Done: erased {erased} reaction(s) and button press(es) of yours and "
                     "rebuilt every profile they had touched.", reply_to=reply_to)

    def _forget_everything(self, event: Event, code: str,
                           reply_to: str | None) -> OutboundMessage:
        """Two steps, so that no typo erases everything: ``/forget everything`` answers with a
        code, and ``/forget everything CODE`` (within 10 minutes) erases."""
        user_id = self.store.ensure_user(event.platform, event.actor)
        if not code:
            requests, feedback = self.privacy.what_is_kept(user_id)
            new = self.privacy.ask_to_forget(user_id)
            return _info(
                f"This erases everything I keep about you, on every platform you linked: "
                f"{requests} request(s) with their results and files, your uploads, "
                f"{feedback} reaction(s) and button press(es), your taste profile and links. "
                f"It cannot be undone. To go ahead, send /forget everything {new} within 10 "
                "minutes.", reply_to=reply_to)
        if not self.privacy.confirmed(user_id, code):
            return _error("That confirmation code is wrong or expired, so I erased nothing. "
                          "Send /forget everything for a new one.", reply_to=reply_to)
        return _info(self.privacy.forget_everything(user_id).describe(), reply_to=reply_to)

    def _mydata(self, event: Event, reply_to: str | None) -> OutboundMessage:
        user_id = self.store.ensure_user(event.platform, event.actor)
        path, requests, files = self.privacy.export(user_id)
        text = (f"Everything I keep about you: {requests} request(s) with their results, "
                f"{files} file(s), your reactions and your taste profile, in one zip "
                "(data.json and files/).")
        if event.platform == "local":
            text += f" It is at {path}"
        return _info(text, ephemeral=True, files=(str(path),), reply_to=reply_to)

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

    def _web(self, event: Event, reply_to: str | None) -> OutboundMessage:
        """A private, one-time sign-in link to this community's web pages (core/web_access)."""
        from core.web_access import mint_signin

        if event.platform == "local":
            return _info(f"The playground, gallery and dashboard are at "
                         f"{self.settings.resolved_web_url}/ (open on this machine).",
                         reply_to=reply_to)
        if not self.settings.web:
            return _error("The web pages are switched off here (MUSESPARK_WEB=false).",
                          ephemeral=True, reply_to=reply_to)
        url = mint_signin(self.store, self.settings,
                          user_id=self.store.ensure_user(event.platform, event.actor),
                          community_id=self.store.ensure_community(event.platform,
                                                                   event.channel),
                          admin=event.actor.is_admin
                          or event.channel.kind is ChannelKind.DIRECT)
        minutes = max(1, round(self.settings.web_signin_ttl_seconds / 60))
        return _info(f"Your private link to this community's gallery and dashboard (works "
                     f"once, for {minutes} minutes; don't share it): {url}", ephemeral=True,
                     reply_to=reply_to)

    def submit(self, origin: Origin, intent: Intent, *, parent: Job | None = None,
               key_suffix: str = "", keep_style: bool = False, thread: bool = False,
               extra_params: dict[str, Any] | None = None, variation: bool = False,
               fresh: bool | None = None, kind: str | None = None) -> list[OutboundMessage]:
        """Make, persist and publish the jobs for one request; returns its status reply.

        ``fresh`` requests (no parent, or a picked brainstorm idea) render takes in different
        styles; follow-ups render one. ``kind`` overrides the intent's job kind (refinements).
        """
        kind = kind or _JOB_KIND[intent.kind]
        seed = intent.options.get("seed", secrets.randbits(SEED_BITS))
        fixed = _fixed_choices(kind, intent.options, intent.prompt)
        if keep_style and parent is not None and parent.params.get("taste"):
            # Rerolls and variations keep what the person is reacting to, but the seed.
            fixed = {**parent.params["taste"]["choice"], **fixed}
            if variation:  # how far to vary is chosen (and learned) afresh for each variation
                fixed = {d: v for d, v in fixed.items() if d not in taste.VARIATION_ONLY}
        fresh = parent is None if fresh is None else fresh
        picked_style = bool(fresh and parent is not None and "style" in fixed)
        takes = (self.settings.image_takes if kind == "image" and fresh
                 and ("style" not in fixed or picked_style) and "count" not in intent.options
                 and intent.kind in (IntentKind.IMAGINE, IntentKind.REMIX) else 1)
        # One transaction for the request's reads and writes (policy, quotas, profiles, jobs,
        # queue position), shared with the requests handled at the same time (group commit);
        # the jobs are published after it commits (a worker must find them).
        cap = self.settings.fair_share_inflight

        def check() -> tuple[str, str | None]:  # reads only; a quota raises PromptError
            return (origin.admitted, None) if origin.admitted else self.policy.check(
                prompt=intent.prompt, user_id=origin.user_id, community_id=origin.community_id,
                platform=origin.platform, nsfw=origin.nsfw)

        def write(checked: tuple[str, str | None]
                  ) -> tuple[list[Job], int, tuple[str, str | None]]:
            if checked[1] is not None:  # refused: nothing is made, the refusal is audited
                self.policy.audit_refusal(checked[0], user_id=origin.user_id,
                                          community_id=origin.community_id)
                return [], 0, checked
            jobs = self._make_jobs(origin, intent, kind, checked[0], parent=parent,
                                   key_suffix=key_suffix, seed=seed, fixed=fixed, takes=takes,
                                   variation=variation, picked_style=picked_style,
                                   thread=thread, extra_params=extra_params, cap=cap)
            return jobs, self.store.queue_position(jobs[0]) if jobs else 0, checked

        def then(written: tuple[list[Job], int, tuple[str, str | None]]
                 ) -> list[OutboundMessage]:
            # Safe to repeat (the group does, if its publish batch fails): no writes here.
            jobs, ahead, (_, refusal) = written
            if refusal is not None:
                raise PromptError(refusal)
            if not jobs:
                return []
            return [self._publish(jobs, intent, origin, ahead)]

        # The rows the leader would read for this request (cached for a moment) are read here,
        # in this request's own thread, while other requests' threads do the same.
        for taste_kind in {kind, "image"} if intent.kind in _PICTURE_PLANS else {kind}:
            self.taste.prefetch(user_id=origin.user_id, community_id=origin.community_id,
                                kind=taste_kind)
        return self.store.grouped(check, write, then, batch=self._publishing)

    def _make_jobs(self, origin: Origin, intent: Intent, kind: str, safety_policy: str, *,
                   parent: Job | None, key_suffix: str, seed: int, fixed: dict[str, str],
                   takes: int,
                   variation: bool, picked_style: bool, thread: bool,
                   extra_params: dict[str, Any] | None, cap: int) -> list[Job]:
        """The request's jobs, made inside its transaction; [] for a duplicate request."""
        requester = self.taste.person_of(origin.user_id, recent=True)
        chosen = self.taste.choose(user_id=origin.user_id, community_id=origin.community_id,
                                   kind=kind, rng=self.rng, learning=self.settings.learning,
                                   fixed=fixed, takes=takes, variation=variation,
                                   beside_fixed=picked_style)
        piece = self._piece_params(origin, intent, fixed)
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
            params["safety"] = safety_policy
            if len(chosen) > 1:
                params["takes"] = {"index": index, "of": len(chosen), "siblings": [
                    other.values for j, (other, _) in enumerate(chosen) if j != index]}
            if "understanding" in intent.options:
                params["understanding"] = intent.options["understanding"]
            if intent.kind is IntentKind.REMIX:
                params["remix"] = {"path": intent.options["image"]}
            params.update(piece)
            params.update(extra_params or {})
            if thread:
                # A reply to a result: the worker gives the model the earlier turns as context.
                params["thread"] = True
            take = f":take{index + 1}" if index else ""
            # Fair share: beyond the person's jobs in flight, a job waits held back.
            held = bool(cap and self.store.in_flight(requester, kind) >= cap)
            job, created = self.store.create_job(
                requester=requester, held=held,
                idempotency_key=f"{origin.key}{key_suffix}{take}",
                kind=kind, intent=intent.kind.value, user_id=origin.user_id,
                community_id=origin.community_id, parent_job_id=parent.id if parent else None,
                prompt=intent.prompt,
                expanded_prompt=taste.expand_prompt(kind, intent.prompt, choice.values),
                params=params, seed=seed, platform=origin.platform,
                delivery=origin.target.to_dict(), published=not held)
            if not created:
                log.info("duplicate request %s for job %s ignored", origin.key, job.id)
                return []
            if intent.kind is IntentKind.REMIX:
                path = str(intent.options["image"])
                self.store.add_input(job.id, path, Path(path).read_bytes())
            jobs.append(job)
        if origin.admitted is None:
            self.policy.count_request(origin.user_id, origin.community_id)
        return jobs

    def _piece_params(self, origin: Origin, intent: Intent,
                      fixed: dict[str, str]) -> dict[str, Any]:
        """What a story or a brainstorm decides up front: its pictures' taste and its budget."""
        if intent.kind is IntentKind.STORY:
            scenes = int(intent.options.get("scenes", SCENES_DEFAULT))
            style = {"style": intent.options["style"].replace(" ", "-")} if (
                str(intent.options.get("style", "")).replace(" ", "-")
                in taste.CATALOGUE["image"]["style"]) else {}
            (_, picture_taste), = self.taste.choose(
                user_id=origin.user_id, community_id=origin.community_id, kind="image",
                rng=self.rng, learning=self.settings.learning, fixed=style)
            chars = self.settings.story_scene_max_chars
            per_scene = (chars + min(chars, cocreation.PICTURE_MAX_CHARS)) / CHARS_PER_TOKEN
            budget = (min(cocreation.TITLE_MAX_CHARS, max(20, chars)) / CHARS_PER_TOKEN
                      + scenes * (per_scene + JSON_TOKENS_PER_ITEM) + JSON_TOKENS_PER_ITEM)
            return {"story": {"scenes": scenes}, "picture_taste": picture_taste,
                    "max_new_tokens": round(budget)}
        if intent.kind is IntentKind.BRAINSTORM:
            styles = self.taste.choose(
                user_id=origin.user_id, community_id=origin.community_id, kind="image",
                rng=self.rng, learning=self.settings.learning, takes=cocreation.IDEAS_MAX)
            per_idea = (cocreation.IDEA_TITLE_MAX_CHARS + cocreation.IDEA_PROMPT_MAX_CHARS
                        ) / CHARS_PER_TOKEN + JSON_TOKENS_PER_ITEM
            return {"idea_styles": [record for _, record in styles],
                    "max_new_tokens": round(cocreation.IDEAS_MAX * per_idea
                                            + JSON_TOKENS_PER_ITEM)}
        if intent.kind is IntentKind.UNDERSTAND:
            return {"max_new_tokens": 8}
        return {}

    def _publishing(self) -> AbstractContextManager[None]:
        """Several requests' jobs go out together (a group commit's: core/store/_group.py)."""
        return publishing_batch(self.publisher)

    def _publish(self, jobs: list[Job], intent: Intent, origin: Origin,
                 ahead: int) -> OutboundMessage:
        """Publish ``jobs``, made marked published (the redriver sends what fails here) and
        say what is happening; ``ahead``: the first job's queue position."""
        reply_to = origin.target.reply_to
        held = sum(1 for job in jobs if job.held)
        for sent, job in enumerate(jobs):
            if job.held:
                # Fair share: the person's earlier jobs run first; this one is published when
                # one of them finishes (workers/runner.py, or the redriver's safety net).
                continue
            try:
                self.publisher.publish(job.id, job.kind, job.params)
            except QueueUnavailableError as exc:
                self.store.unmark_published([j.id for j in jobs[sent:] if not j.held])
                ids = ", ".join(j.id for j in jobs)
                return OutboundMessage(MessageKind.STATUS, f"{exc.user_message} (job {ids})",
                                       job_id=jobs[0].id, reply_to=reply_to)
        queue_note = f", {ahead} ahead of you" if ahead else ""
        if held:
            queue_note = ", after your earlier requests: it starts when one of them is done"
        prompt = _shorten(intent.prompt)
        if intent.kind is IntentKind.STORY:
            scenes = jobs[0].params["story"]["scenes"]
            style = jobs[0].params["picture_taste"]["choice"]["style"]
            text = (f"Writing a story in {scenes} scenes, then drawing them in {style}: "
                    f"“{prompt}” (job {jobs[0].id}{queue_note})")
        elif len(jobs) > 1:
            styles = " and ".join(j.params["taste"]["choice"]["style"] for j in jobs)
            what = _STATUS_VERB.get(intent.kind, "Drawing")
            text = (f"{what} in {len(jobs)} takes, {styles}: “{prompt}” "
                    f"(jobs {', '.join(j.id for j in jobs)}{queue_note}). React 👍 to the one "
                    "you like; I learn from your pick.")
        else:
            what = _STATUS_VERB.get(intent.kind) or (
                "Drawing" if jobs[0].kind == "image" else "Writing")
            text = f"{what}: “{prompt}” (job {jobs[0].id}{queue_note})"
        return OutboundMessage(MessageKind.STATUS, text, job_id=jobs[0].id, reply_to=reply_to)

    def refine(self, origin: Origin, intent: Intent, parent: Job,
               position: int) -> list[OutboundMessage]:
        """Change a result as ``intent.prompt`` says (a reply, a Refine press, ``/reply N``).

        Pictures are redrawn image-to-image from the replied-to picture, with a prompt the text
        model rewrites (in the worker); texts are revised with the earlier text in context.
        """
        instruction = intent.prompt
        if parent.intent == "story":
            raise PromptError("To change a story's picture, reply to that scene. For a new "
                              "story press 🔁 under its title.")
        if parent.intent == "brainstorm":
            ask = Intent(IntentKind.BRAINSTORM, f"{parent.prompt} ({instruction})", {
                k: v for k, v in intent.options.items() if k == "understanding"})
            return self.submit(origin, ask, parent=parent, fresh=False)
        refine = {"job_id": parent.id, "position": position, "instruction": instruction}
        options = {k: v for k, v in intent.options.items() if k == "understanding"}
        if parent.kind == "image":
            options.update(seed=(parent.seed + REFINE_SEED_STEP) % 2**SEED_BITS, count=1)
            base = str((parent.params.get("refine") or {}).get("prompt") or parent.prompt)
            return self.submit(origin, Intent(IntentKind.REFINE, base, options), parent=parent,
                               keep_style=True, fresh=False, kind="image",
                               extra_params={"refine": refine})
        return self.submit(origin, Intent(IntentKind.REFINE, instruction, options),
                           parent=parent, keep_style=True, fresh=False, kind="text",
                           thread=True, extra_params={"refine": refine})

    # -- feedback -----------------------------------------------------------------------------

    def _reaction(self, event: ReactionChanged) -> list[OutboundMessage]:
        shown = self.store.result_of_message(event.platform, event.channel.chat_id,
                                             event.message_id)
        if shown is None:
            return [_error("I only learn from reactions on results I made; that message isn't "
                           "one of mine.", ephemeral=True)]
        # A story's scene message teaches about that scene's picture, not the story's text.
        common: dict[str, Any] = dict(job_id=shown[0].id, platform=event.platform,
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
        if REPORT_EMOJI in event.added and (is_admin_here(event.actor, event.channel)
                                            or event.actor.is_moderator):
            return self._report(event, shown[0], user_id)
        # A person's reaction is on or off: the log's state, not the event id, makes a replay a
        # no-op (Discord's reaction events carry no id), and the key names the reaction itself.
        reaction = f"{event.platform}:{event.channel.chat_id}:{event.message_id}:{user_id}"
        for emoji, delta in [(e, 1) for e in sorted(event.added)] + [
                (e, -1) for e in sorted(event.removed)]:
            self.taste.record(event_key=f"{reaction}:{emoji}:{'add' if delta > 0 else 'remove'}",
                              user_id=user_id, value=emoji, delta=delta, toggle=True, **common)
        return []

    def _report(self, event: ReactionChanged, job: Job, user_id: int) -> list[OutboundMessage]:
        """An admin's or moderator's 🚩: the result is hidden (the bot's messages showing it are
        deleted), the report goes to the audit log, and it counts as strong negative feedback."""
        found = self.store.find_delivered(event.platform, event.channel.chat_id,
                                          event.message_id)
        shown = self.store.delivered_message_ids(found.job_id, found.position) if found else []
        recorded = self.taste.record(
            event_key=f"{event.platform}:{event.channel.chat_id}:{event.message_id}:{user_id}:"
                      "report", job_id=job.id, user_id=user_id, platform=event.platform,
            chat_id=event.channel.chat_id, message_id=event.message_id, kind="button",
            value="report", delta=1, occurred_at=event.occurred_at)
        if recorded is not None or not self.policy.reported(job.id, user_id):
            self.policy.audit(community_id=job.community_id, kind="report",
                              actor_user_id=user_id, subject_user_id=job.user_id,
                              job_id=job.id, detail={"hidden_messages": len(shown)})
        return [*(_info("", ephemeral=True, delete_message_id=message_id) for message_id in shown),
                _info("Reported: I removed that result and told this community's admins.",
                      ephemeral=True)]

    def _reactions_cleared(self, event: ReactionsCleared) -> list[OutboundMessage]:
        """Remove-all / remove-emoji: every actor's standing matching reactions are undone.

        Each undo is that person's remove (``toggle``), so a replayed clear finds nothing
        standing and changes nothing, while a clear after reactions came back counts again.
        """
        shown = self.store.result_of_message(event.platform, event.channel.chat_id,
                                             event.message_id)
        if shown is None:
            return []
        for user_id, emoji in self.store.live_reactions(event.platform, event.message_id,
                                                        event.emoji):
            self.taste.record(event_key=f"{event.platform}:{event.channel.chat_id}:"
                                        f"{event.message_id}:{user_id}:{emoji}:clear",
                              job_id=shown[0].id, user_id=user_id, platform=event.platform,
                              chat_id=event.channel.chat_id, message_id=event.message_id,
                              kind="reaction", value=emoji, delta=-1,
                              occurred_at=event.occurred_at, toggle=True)
        return []

    def _original_files(self, job: Job) -> OutboundMessage:
        """A result's pictures as files, byte for byte, signed manifest included."""
        paths = [a.path for a in self.store.artifacts(job.id, "image")
                 if a.path and Path(a.path).is_file()]
        if not paths:
            return _error("The original files of that result are gone (erased, or lost).",
                          ephemeral=True)
        return _info("The original file, byte for byte: it keeps its signed provenance (C2PA "
                     "manifest), which chat apps' photo compression drops. Anyone can check it "
                     "with /verify.", originals=tuple(paths))

    def _button(self, event: ComponentActivated) -> list[OutboundMessage]:
        """Buttons under results: ``custom_id`` is ``action:job_id`` (see core/actions.py)."""
        action, _, job_id = event.custom_id.partition(":")
        job = self.store.get_job(job_id) if job_id else None
        if job is None:
            return [_error("That button belongs to a result I no longer know.", ephemeral=True)]
        if not actions.is_action(action):
            return [_error(f"I don't know the button '{action}'.", ephemeral=True)]
        user_id = self.store.ensure_user(event.platform, event.actor)
        if action == "delete":
            if self.taste.person_of(user_id) != self.taste.person_of(job.user_id):
                return [_error("Only the person who asked for this can delete it.",
                               ephemeral=True)]
            return [_info("Deleted.", ephemeral=True, delete_message_id=event.message_id)]
        if action == "why":
            return [_info(_why(job), ephemeral=True)]
        if action == "refine":
            return [_info("Reply to this result with what to change, for example “make it at "
                          "night” or “same, as a watercolor”.", ephemeral=True)]
        if action == "original":
            return [self._original_files(job)]
        if action.startswith(actions.ASK_PREFIX):
            return self._answer_question(event, job, action[len(actions.ASK_PREFIX):])
        self.taste.record(event_key=f"{event.platform}:{event.event_id}:button", job_id=job.id,
                          user_id=user_id, platform=event.platform,
                          chat_id=event.channel.chat_id, message_id=event.message_id,
                          kind="button", value=action, delta=1, occurred_at=event.occurred_at)
        if action in ("up", "down"):
            return [_info("Thanks, noted." if action == "up" else "Noted; I'll steer away from "
                          "this.", ephemeral=True)]
        origin = self.origin(event, event.message_id)
        if action.startswith("pick"):
            return self._pick(origin, job, int(action[4:]), action)
        if action == "ideas" or (action == "reroll" and job.intent in ("story", "brainstorm")):
            # Another brainstorm (avoiding the ideas shown) or another story on the same prompt.
            again = Intent(IntentKind(job.intent), job.prompt, dict(
                {"scenes": job.params["story"]["scenes"]} if job.intent == "story" else {}))
            avoid = [i["title"] for i in job.params.get("ideas", [])]
            return self.submit(origin, again, parent=job, key_suffix=f":{action}", fresh=False,
                               extra_params={"avoid": avoid} if avoid else None)
        kind = IntentKind.IMAGINE if job.kind == "image" else IntentKind.WRITE
        options: dict[str, Any] = {"count": job.params.get("count", 1)} if job.kind == "image" else {}
        extra: dict[str, Any] = {}
        variation = action.startswith("vary")
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
        prompt = _current_prompt(job)
        # "more like this", variations and upscales keep the style; a reroll chooses again.
        return self.submit(origin, Intent(kind, prompt, options), parent=job,
                           key_suffix=f":{action}", keep_style=action != "reroll",
                           extra_params=extra, variation=variation and job.kind == "image")

    def _pick(self, origin: Origin, job: Job, number: int,
              action: str) -> list[OutboundMessage]:
        """Render brainstorm idea ``number`` (with takes); anyone may pick, for themselves."""
        ideas = job.params.get("ideas") or []
        if job.intent != "brainstorm" or not 1 <= number <= len(ideas):
            return [_error("That idea is not on the list any more; press 💡 for new ones.",
                           ephemeral=True)]
        idea = ideas[number - 1]
        options: dict[str, Any] = {"style": idea["style"]}
        intent = Intent(IntentKind.IMAGINE, idea["prompt"], options)
        return self.submit(origin, intent, parent=job, key_suffix=f":{action}", fresh=True,
                           extra_params={"picked": {"job_id": job.id, "idea": number,
                                                    "title": idea["title"]}})

    def _answer_question(self, event: ComponentActivated, job: Job,
                         wanted: str) -> list[OutboundMessage]:
        """The person told us what their message meant ("A picture / A text / A story?")."""
        if job.intent != "understand" or wanted not in {i for i, _ in ASK_CHOICES}:
            return [_error("That question is no longer open.", ephemeral=True)]
        understanding = Understanding(wanted, 1.0, "person",
                                      str((job.params.get("understand") or {}).get("text")
                                          or job.prompt))
        return self.route(job, understanding)


def _current_prompt(job: Job) -> str:
    """The prompt a follow-up starts from: a refinement's rewritten one, else the request's."""
    return str((job.params.get("refine") or {}).get("prompt") or job.prompt)


def _why(job: Job) -> str:
    """"Why this?": the routing decision, the taste's choice and the prompt the model saw."""
    record = job.params.get("taste") or {}
    lines = []
    understood = job.params.get("understanding")
    if understood:
        lines.append(Understanding(**understood).describe() + ".")
    lines.append(f"Why this: {record.get('why') or 'I had no taste to go on yet'}.")
    choice = ", ".join(f"{d}: {v}" for d, v in (record.get("choice") or {}).items())
    if choice:
        lines.append(f"Chosen: {choice}.")
    picture = (job.params.get("picture_taste") or {}).get("choice")
    if picture:
        lines.append("Pictures: " + ", ".join(f"{d}: {v}" for d, v in picture.items()) + ".")
    lines.append(f"Prompt I used: “{job.expanded_prompt}”")
    return "\n".join(lines)


def _style_named_in(prompt: str) -> str:
    """A catalogue style the prompt names ("a fox, as a watercolor"): the person chose it."""
    words = " " + " ".join(prompt.lower().replace(",", " ").split()) + " "
    for style in taste.CATALOGUE["image"]["style"]:
        if f" {style.replace('-', ' ')} " in words or f" {style} " in words:
            return style
    return ""


def _fixed_choices(kind: str, options: dict[str, Any], prompt: str = "") -> dict[str, str]:
    """What the person asked for explicitly (``--style``, ``--aspect``, ``mode``, a style the
    prompt names) and we know."""
    fixed: dict[str, str] = {}
    dims = taste.CATALOGUE[kind]
    if kind == "image":
        style = str(options.get("style", "")).replace(" ", "-") or _style_named_in(prompt)
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
