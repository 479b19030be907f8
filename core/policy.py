"""Community policy: safety settings, blocked words, quotas and the audit log admins read.

:class:`Policy` is the I/O half (store reads and writes); the rules are pure functions in
:mod:`core.safety` and below (:func:`quota_refusal`). The orchestrator asks it before it makes a
job (:meth:`Policy.admit`) and hands ``/settings safety|blockword|quota|audit`` to
:meth:`Policy.command`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from sqlalchemy import func, or_, select

from core import safety
from core.errors import PromptError
from core.events import Actor, Channel, ChannelKind
from core.settings import Settings
from core.store import Community, Store, User, as_utc, utcnow
from core.store.models import AuditEvent, RequestLog

__all__ = ["AUDIT_SHOWN", "Policy", "Quotas", "Usage", "quota_refusal"]

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
#: Entries ``/settings audit`` shows, newest first.
AUDIT_SHOWN = 20
_QUOTA_NAMES = {("person", "hourly"): "person_hourly", ("person", "daily"): "person_daily",
                ("community", "hourly"): "community_hourly",
                ("community", "daily"): "community_daily"}


@dataclass(frozen=True, slots=True)
class Quotas:
    """Requests allowed per window (0: no limit)."""

    person_hourly: int
    person_daily: int
    community_hourly: int
    community_daily: int

    @property
    def unlimited(self) -> bool:
        return not (self.person_hourly or self.person_daily or self.community_hourly
                    or self.community_daily)

    @classmethod
    def of(cls, settings: Settings, overrides: dict[str, Any] | None = None) -> Quotas:
        values = {name: int(getattr(settings, f"quota_{name}")) for name in _QUOTA_NAMES.values()}
        for name, value in (overrides or {}).items():
            if name in values and isinstance(value, int) and value > 0:
                values[name] = value
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Usage:
    """Requests counted in each window, as of ``now``."""

    person_hour: int
    person_day: int
    community_hour: int
    community_day: int


def quota_refusal(quotas: Quotas, usage: Usage) -> tuple[str, str, int] | None:
    """The first limit ``usage`` has reached: ``(who, window, limit)``, or None."""
    for who, window, used in (("person", "hourly", usage.person_hour),
                              ("person", "daily", usage.person_day),
                              ("community", "hourly", usage.community_hour),
                              ("community", "daily", usage.community_day)):
        limit = getattr(quotas, _QUOTA_NAMES[(who, window)])
        if limit and used >= limit:
            return who, window, limit
    return None


def is_admin_here(actor: Actor, channel: Channel) -> bool:
    """Admins of the community; in a direct chat everyone administers their own chat."""
    return actor.is_admin or channel.kind is ChannelKind.DIRECT


class Policy:
    """Reads and changes a community's policy; counts requests; keeps the audit log."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store, self.settings = store, settings

    # -- community settings ---------------------------------------------------------------------

    def community_settings(self, community_id: int | None, *,
                           recent: bool = False) -> dict[str, Any]:
        """``recent``: for a request, a copy read a moment ago will do (Store.community_settings)."""
        if community_id is None:
            return {}
        return self.store.community_settings(community_id, recent=recent)

    def _change(self, community_id: int, change: Callable[[dict[str, Any]], None]) -> None:
        self.store.change_settings(community_id, change)

    def audit(self, *, community_id: int | None, kind: str, actor_user_id: int | None = None,
              subject_user_id: int | None = None, job_id: str | None = None,
              detail: dict[str, Any] | None = None) -> None:
        with self.store.session() as s:
            s.add(AuditEvent(community_id=community_id, actor_user_id=actor_user_id,
                             subject_user_id=subject_user_id, job_id=job_id, kind=kind,
                             detail=detail or {}, created_at=utcnow()))

    def reported(self, job_id: str, user_id: int) -> bool:
        """Whether ``user_id`` reported ``job_id`` before (a replayed 🚩 is logged once)."""
        with self.store.session() as s:
            return s.scalar(select(AuditEvent.id).where(
                AuditEvent.kind == "report", AuditEvent.job_id == job_id,
                AuditEvent.actor_user_id == user_id).limit(1)) is not None

    # -- before a job is made -------------------------------------------------------------------

    def admit(self, *, prompt: str, user_id: int, community_id: int | None, platform: str,
              nsfw: bool) -> str:
        """Check a request against quotas and the safety policy; returns the policy its jobs
        run under. Raises :class:`PromptError` (with when to try again, or why not) instead."""
        policy, refusal = self.check(prompt=prompt, user_id=user_id, community_id=community_id,
                                     platform=platform, nsfw=nsfw)
        if refusal is not None:
            self.refuse(refusal, policy, user_id=user_id, community_id=community_id)
        return policy

    def check(self, *, prompt: str, user_id: int, community_id: int | None, platform: str,
              nsfw: bool) -> tuple[str, str | None]:
        """:meth:`admit` without writing anything: ``(policy, refusal)``, the refusal being
        why the prompt is blocked (None: it may go). Raises PromptError over a quota."""
        values = self.community_settings(community_id, recent=True)
        self._check_quota(user_id, community_id, Quotas.of(self.settings, values.get("quota")))
        policy = safety.effective_policy(values, platform=platform, nsfw=nsfw)
        return policy, safety.prompt_verdict(prompt, policy, values.get("blocked_words") or [])

    def refuse(self, refusal: str, policy: str, *, user_id: int,
               community_id: int | None) -> NoReturn:
        """Log a prompt :meth:`check` blocked in the audit, and refuse it."""
        self.audit_refusal(policy, user_id=user_id, community_id=community_id)
        raise PromptError(refusal)

    def audit_refusal(self, policy: str, *, user_id: int, community_id: int | None) -> None:
        """The audit's record of a prompt :meth:`check` blocked under ``policy``."""
        self.audit(community_id=community_id, kind="blocked_prompt", actor_user_id=user_id,
                   subject_user_id=user_id, detail={"policy": policy})

    def usage(self, person: int, community_id: int | None, now: datetime) -> Usage:
        """Requests in the last hour and day, for the person and the community: one query on
        ``request_log``'s two (who, created_at) indexes."""
        hour, day = now - HOUR, now - DAY
        mine = RequestLog.person_id == person
        ours = RequestLog.community_id == community_id
        with self.store.request_log() as s:
            row = s.execute(select(
                func.count().filter(mine & (RequestLog.created_at > hour)),
                func.count().filter(mine),
                func.count().filter(ours & (RequestLog.created_at > hour)),
                func.count().filter(ours),
            ).where(or_(mine, ours), RequestLog.created_at > day)).one()
        return Usage(*(int(n or 0) for n in row))

    def _person(self, user_id: int) -> int:
        return self.store.person_facts(user_id)[0]

    def _check_quota(self, user_id: int, community_id: int | None, quotas: Quotas) -> None:
        if quotas.unlimited:
            return  # no limits here: nothing to count
        now = utcnow()
        person = self._person(user_id)
        over = quota_refusal(quotas, self.usage(person, community_id, now))
        if over is None:
            return
        who, window, limit = over
        span = HOUR if window == "hourly" else DAY
        column = RequestLog.person_id == person if who == "person" else (
            RequestLog.community_id == community_id)
        with self.store.request_log() as s:
            # The request that must age out of the window before one more fits.
            oldest = s.scalar(select(RequestLog.created_at).where(
                column, RequestLog.created_at > now - span)
                .order_by(RequestLog.created_at.desc()).offset(limit - 1).limit(1))
        free_at = (as_utc(oldest) + span) if oldest is not None else now + span
        minutes = max(1, round((free_at - now).total_seconds() / 60))
        whose = "You have" if who == "person" else "This community has"
        per = "hour" if window == "hourly" else "day"
        raise PromptError(
            f"{whose} reached the limit of {limit} requests per {per}. Your next request is "
            f"possible at {free_at:%H:%M} UTC (in about {minutes} minute"
            f"{'s' if minutes != 1 else ''}).")

    def count_request(self, user_id: int, community_id: int | None) -> None:
        self.store.log_request(self._person(user_id), user_id, community_id)

    # -- /settings safety | blockword | quota | audit -------------------------------------------

    def command(self, words: list[str], *, actor: Actor, channel: Channel, platform: str,
                user_id: int, community_id: int) -> str:
        """Answer an admin's ``/settings`` subcommand; raises PromptError for bad input."""
        topic = words[0]
        if not is_admin_here(actor, channel):
            raise PromptError(f"Only an admin of this group can see or change /settings {topic}.")
        if topic == "safety":
            return self._safety(words[1:], platform=platform, channel=channel,
                                user_id=user_id, community_id=community_id)
        if topic == "blockword":
            return self._blockword(words[1:], user_id=user_id, community_id=community_id)
        if topic == "quota":
            return self._quota(words[1:], user_id=user_id, community_id=community_id)
        return self._audit_text(community_id)

    def _safety(self, args: list[str], *, platform: str, channel: Channel, user_id: int,
                community_id: int) -> str:
        values = self.community_settings(community_id)
        current = str(values.get("safety") or safety.DEFAULT_POLICY)
        if not args:
            return (f"Safety here: {current}. Admins: /settings safety strict|standard|off. "
                    f"Blocked words: {len(values.get('blocked_words') or [])}.")
        wanted = args[0].lower()
        if len(args) != 1 or wanted not in safety.POLICIES:
            raise PromptError("Use /settings safety strict, /settings safety standard or "
                              "/settings safety off.")
        if wanted == "off" and platform == "discord" and not channel.nsfw:
            raise PromptError("Safety can only be switched off in a channel marked "
                              "age-restricted (NSFW) in Discord's channel settings.")
        self._change(community_id, lambda v: v.__setitem__("safety", wanted))
        self.audit(community_id=community_id, kind="policy", actor_user_id=user_id,
                   detail={"setting": "safety", "from": current, "to": wanted})
        notes = {"strict": "prompts are checked and pictures are refused for nudity, also "
                           "partly covered",
                 "standard": "prompts are checked and pictures showing nudity are not posted",
                 "off": "only this community's blocked words are refused; pictures are not "
                        "checked"}
        return f"Done: safety is now {wanted} here: {notes[wanted]}."

    def _blockword(self, args: list[str], *, user_id: int, community_id: int) -> str:
        values = self.community_settings(community_id)
        words = list(values.get("blocked_words") or [])
        if not args or args[0] not in ("add", "remove", "list"):
            raise PromptError("Use /settings blockword add WORD, /settings blockword remove "
                              "WORD or /settings blockword list.")
        if args[0] == "list":
            return ("Blocked words here: " + ", ".join(words)) if words else (
                "No blocked words here yet.")
        word = safety.normalize_blocked_word(" ".join(args[1:]))
        if not word:
            raise PromptError(f"Name the word: /settings blockword {args[0]} WORD.")
        if len(word) > safety.BLOCKED_WORD_MAX_CHARS:
            raise PromptError(f"A blocked word or phrase may be at most "
                              f"{safety.BLOCKED_WORD_MAX_CHARS} characters long.")
        if args[0] == "add":
            if word in words:
                return f"“{word}” was already blocked here."
            if len(words) >= safety.BLOCKED_WORDS_MAX:
                raise PromptError(f"This community already blocks {safety.BLOCKED_WORDS_MAX} "
                                  "words; remove some first.")
            words.append(word)
        else:
            if word not in words:
                raise PromptError(f"“{word}” is not on this community's blocked list.")
            words.remove(word)
        self._change(community_id, lambda v: v.__setitem__("blocked_words", words))
        self.audit(community_id=community_id, kind="policy", actor_user_id=user_id,
                   detail={"setting": "blockword", args[0]: word})
        verb = "blocked" if args[0] == "add" else "no longer blocked"
        return f"Done: “{word}” is {verb} here ({len(words)} blocked word(s))."

    def _quota(self, args: list[str], *, user_id: int, community_id: int) -> str:
        values = self.community_settings(community_id)
        overrides: dict[str, int] = dict(values.get("quota") or {})
        usage = ("Use /settings quota to see the limits, /settings quota person|community "
                 "hourly|daily N to change one, /settings quota reset to go back to the "
                 "operator's.")
        if args == ["reset"]:
            self._change(community_id, lambda v: v.pop("quota", None))
            self.audit(community_id=community_id, kind="policy", actor_user_id=user_id,
                       detail={"setting": "quota", "reset": True})
            overrides = {}
        elif args:
            if len(args) != 3 or (args[0], args[1]) not in _QUOTA_NAMES:
                raise PromptError(usage)
            name = _QUOTA_NAMES[(args[0], args[1])]
            try:
                value = int(args[2])
            except ValueError:
                raise PromptError(f"The limit must be a whole number, not '{args[2]}'.") from None
            ceiling = int(getattr(self.settings, f"quota_{name}"))
            if value < 1 or (ceiling and value > ceiling):
                top = f"the operator's limit, {ceiling}" if ceiling else "as many as you like"
                raise PromptError(f"The {args[0]} {args[1]} limit must be between 1 and {top}.")
            overrides[name] = value
            self._change(community_id, lambda v: v.__setitem__("quota", dict(overrides)))
            self.audit(community_id=community_id, kind="policy", actor_user_id=user_id,
                       detail={"setting": "quota", name: value})
        quotas = Quotas.of(self.settings, overrides)

        def shown(n: int) -> str:
            return str(n) if n else "no limit"
        text = (f"Request limits here: each person {shown(quotas.person_hourly)} per hour and "
                f"{shown(quotas.person_daily)} per day; the whole community "
                f"{shown(quotas.community_hourly)} per hour and "
                f"{shown(quotas.community_daily)} per day.")
        return ("Done. " + text) if args else f"{text} {usage}"

    def _audit_text(self, community_id: int) -> str:
        with self.store.session() as s:
            rows = s.execute(
                select(AuditEvent, User.display_name, User.platform_user_id)
                .outerjoin(User, User.id == AuditEvent.actor_user_id)
                .where(AuditEvent.community_id == community_id)
                .order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc())
                .limit(AUDIT_SHOWN)).all()
        if not rows:
            return "The audit log of this community is empty."
        lines = [f"Audit log (newest first, at most {AUDIT_SHOWN}):"]
        for event, name, platform_id in rows:
            who = name or platform_id or ("someone" if event.actor_user_id else "MuseSpark")
            detail = ", ".join(f"{k}: {v}" for k, v in event.detail.items())
            job = f" job {event.job_id}" if event.job_id else ""
            lines.append(f"{as_utc(event.created_at):%Y-%m-%d %H:%M} UTC {event.kind}{job} by "
                         f"{who}" + (f" ({detail})" if detail else ""))
        return "\n".join(lines)
