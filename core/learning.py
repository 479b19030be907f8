"""The adaptive loop's I/O half: feedback rows in, weighted signals, live and rebuilt profiles.

The arithmetic lives in :mod:`core.taste`; this module decides *which* profiles a piece of
feedback moves and by how much, keeps the ``feedback_events`` log (append-only, each row with the
weight it applied) and the derived ``profiles`` table in step, and can rebuild every profile from
the log. Live updates and rebuilds share :func:`_weigh`, with the log read in insertion order,
so a rebuilt profile equals the live one (``tests/test_learning.py`` checks it).

Rules (issue "The adaptive loop"):

* a reaction's meaning comes from the community's emoji table, else the default table;
* removing a reaction applies minus what that actor's reactions of that emoji on that message
  applied so far: the signal is undone exactly;
* the requester's reaction weighs :data:`~core.taste.REQUESTER_WEIGHT`, a bystander's
  :data:`~core.taste.BYSTANDER_WEIGHT`;
* one actor moves profiles by at most :data:`~core.taste.HOURLY_CAP` per hour;
* anonymous counts (Telegram) move the community profile only;
* a person who opted out leaves no feedback rows at all.
"""

from __future__ import annotations

import functools
import secrets
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core import metrics, taste
from core.store import Community, FeedbackEvent, Job, Store, User, utcnow
from core.store import rows_changed
from core.store.models import LinkCode, Profile

__all__ = ["ProfileKey", "TasteService"]

CAP_WINDOW = timedelta(hours=1)
#: PostgreSQL advisory lock that orders feedback writes against profile rebuilds.
PROFILE_LOCK_KEY = 0x6D757365  # "muse"
LINK_CODE_TTL = timedelta(minutes=30)

ProfileKey = tuple[str, int, str]  # (subject, subject_id, kind)


@dataclass
class _History:
    """What :func:`_weigh` needs to know about earlier events (in-memory, for rebuilds)."""

    by_actor: dict[int, list[tuple[datetime, float]]] = field(default_factory=lambda: defaultdict(list))
    net: dict[tuple[int | None, str, str, str], float] = field(default_factory=lambda: defaultdict(float))

    def used(self, user_id: int, at: datetime) -> float:
        return sum(abs(w) for t, w in self.by_actor[user_id] if at - CAP_WINDOW < t <= at)

    def add(self, row: FeedbackEvent, weight: float) -> None:
        if row.user_id is not None:
            self.by_actor[row.user_id].append((_naive(row.created_at), weight))
        self.net[(row.user_id, row.platform, row.message_id, row.value)] += weight


def _naive(moment: datetime) -> datetime:
    return moment.replace(tzinfo=None)


def _meaning(row: FeedbackEvent, overrides: dict[str, int] | None) -> int:
    if row.kind == "button":
        return taste.BUTTON_MEANINGS.get(row.value, 0)
    return taste.emoji_meaning(row.value, overrides)


def _weigh(row: FeedbackEvent, job: Job, requester_person: int, actor_person: int | None,
           overrides: dict[str, int] | None, used: float, net: float) -> float:
    """The signed weight one feedback row applies, given what came before it."""
    if row.delta < 0 and row.kind == "reaction" and row.user_id is not None:
        return -net  # undo exactly what this actor's reactions of this emoji applied
    meaning = _meaning(row, overrides) * (1 if row.delta >= 0 else -1)
    if meaning == 0:
        return 0.0
    if row.user_id is None:  # anonymous count (community only, no actor to cap)
        return meaning * taste.ANONYMOUS_WEIGHT * abs(row.delta or 1)
    base = taste.signal_weight(is_requester=actor_person == requester_person,
                               button=row.value if row.kind == "button" else None)
    allowed = max(0.0, taste.HOURLY_CAP - used)
    return meaning * min(base, allowed)


def _targets(row: FeedbackEvent, job: Job, actor_person: int | None,
             kind: str) -> list[ProfileKey]:
    keys: list[ProfileKey] = []
    if row.user_id is not None and actor_person is not None:
        keys.append(("person", actor_person, kind))
    if job.community_id is not None:
        keys.append(("community", job.community_id, kind))
    return keys


def _lock_profiles(session: Session) -> None:
    """Serialise profile writers for the rest of this transaction.

    A rebuild replaces every profile from the log; a reaction recorded meanwhile would update a
    profile the rebuild then overwrites. SQLite already runs one writer at a time; PostgreSQL
    needs the advisory lock (released at commit).
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(PROFILE_LOCK_KEY)))


def _choice(job: Job) -> dict[str, str]:
    return dict((job.params.get("taste") or {}).get("choice") or {})


def _signal(row: FeedbackEvent, job: Job) -> taste.Signal | None:
    """The evidence a weighed feedback row adds to profiles (None when it adds nothing).

    A brainstorm pick (``pickN``) is picture evidence: idea N's style over the styles of the
    ideas passed over (the same contrast a take's pick carries).
    """
    if not row.weight:
        return None
    if row.kind == "button" and row.value.startswith("pick") and job.intent == "brainstorm":
        ideas = job.params.get("ideas") or []
        number = int(row.value[4:]) if row.value[4:].isdigit() else 0
        if not 1 <= number <= len(ideas):
            return None
        others = tuple(dict(i["choice"]) for n, i in enumerate(ideas, start=1) if n != number)
        return taste.Signal("image", dict(ideas[number - 1]["choice"]), row.weight,
                            retract=row.delta < 0, contrast=others)
    choice = _choice(job)
    if not choice:
        return None
    siblings = (job.params.get("takes") or {}).get("siblings") or []
    return taste.Signal(job.kind, choice, row.weight, retract=row.delta < 0,
                        contrast=tuple(dict(s) for s in siblings))


class TasteService:
    """Records feedback, keeps profiles, and chooses styles and parameters for new jobs."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- identities -----------------------------------------------------------------------------

    @staticmethod
    def _person(session: Session, user_id: int) -> int:
        user = session.get(User, user_id)
        return user.person if user is not None else user_id

    def person_of(self, user_id: int, *, recent: bool = False) -> int:
        """The person behind ``user_id``; ``recent``: a cached answer will do (the request
        path: see :meth:`Store.person_facts`)."""
        if recent:
            return self.store.person_facts(user_id)[0]
        with self.store.session() as s:
            return self._person(s, user_id)

    def identities_of(self, user_id: int) -> list[int]:
        """Every user id of the person behind ``user_id`` (linked with /link)."""
        with self.store.session() as s:
            person = self._person(s, user_id)
            return [u.id for u in s.scalars(select(User)).all() if u.person == person]

    def opted_out(self, user_id: int) -> bool:
        with self.store.session() as s:
            user = s.get(User, user_id)
            return bool(user and user.learning_opt_out)

    def set_opt_out(self, user_id: int, opted_out: bool) -> None:
        with self.store.session() as s:
            user = s.get(User, user_id)
            if user is not None:
                user.learning_opt_out = opted_out

    def new_link_code(self, user_id: int) -> str:
        code = secrets.token_hex(4)
        with self.store.session() as s:
            s.add(LinkCode(code=code, user_id=user_id, created_at=utcnow()))
        return code

    def link(self, user_id: int, code: str) -> bool:
        """Make ``user_id`` the same person as the identity that made ``code``; rebuilds."""
        with self.store.session() as s:
            found = s.get(LinkCode, code.strip().lower())
            if found is None or _naive(found.created_at) < _naive(utcnow() - LINK_CODE_TTL):
                return False
            other = s.get(User, found.user_id)
            me = s.get(User, user_id)
            if other is None or me is None:
                return False
            person = other.person
            for user in s.scalars(select(User).where(
                    (User.id == me.person) | (User.person_id == me.person))).all():
                user.person_id = person
            me.person_id = person
            s.delete(found)
        self.rebuild()
        return True

    # -- community settings ---------------------------------------------------------------------


    def set_emoji_meaning(self, community_id: int, emoji: str, meaning: int) -> None:
        """Change what an emoji means in a community; profiles are rebuilt to match."""
        def mean(settings: dict[str, Any]) -> None:
            settings["emoji"] = {**settings.get("emoji", {}), emoji: meaning}

        if self.store.change_settings(community_id, mean):
            self.rebuild()

    # -- recording ------------------------------------------------------------------------------

    def record(self, *, event_key: str, job_id: str, user_id: int | None, platform: str,
               chat_id: str, message_id: str, kind: str, value: str, delta: int,
               occurred_at: datetime | None = None, toggle: bool = False) -> float | None:
        """Append one feedback row and apply it to the profiles it moves, atomically.

        Returns the weight applied, or None when the row was a duplicate or the actor opted
        out of learning (then nothing is stored).

        ``toggle`` marks a person's reaction, which is either on or off. Discord gives reaction
        events no id, so a replay and a genuine add-again look alike and only the log's state
        tells them apart: an add while that reaction stands, or a remove while none does,
        records nothing; otherwise ``event_key`` gets the ordinal of this add (or remove), so
        add, remove, add again are three rows while two copies of one event share one key.
        """
        attempt = functools.partial(
            self._record_once, event_key=event_key, job_id=job_id, user_id=user_id,
            platform=platform, chat_id=chat_id, message_id=message_id, kind=kind, value=value,
            delta=delta, at=occurred_at or utcnow(), toggle=toggle)
        try:
            weight = attempt()
        except IntegrityError:
            # A concurrent copy of this event committed the same key first (SQLite takes no
            # advisory lock): decide again, now that its row is visible.
            weight = attempt()
        if weight is not None:
            metrics.FEEDBACK_EVENTS.labels(platform, kind).inc()
        return weight

    def _record_once(self, *, event_key: str, job_id: str, user_id: int | None, platform: str,
                     chat_id: str, message_id: str, kind: str, value: str, delta: int,
                     at: datetime, toggle: bool) -> float | None:
        with self.store.session() as s:
            _lock_profiles(s)
            if toggle and user_id is not None:
                adds, removes = s.execute(select(
                    func.count().filter(FeedbackEvent.delta > 0),
                    func.count().filter(FeedbackEvent.delta < 0)).where(
                    FeedbackEvent.user_id == user_id, FeedbackEvent.platform == platform,
                    FeedbackEvent.chat_id == chat_id, FeedbackEvent.message_id == message_id,
                    FeedbackEvent.kind == kind, FeedbackEvent.value == value)).one()
                if (adds > removes) == (delta > 0):
                    return None  # already standing (or already gone): a replay
                event_key = f"{event_key}:{(adds if delta > 0 else removes) + 1}"
            if s.scalar(select(FeedbackEvent.id).where(FeedbackEvent.event_key == event_key)):
                return None
            if user_id is not None:
                actor = s.get(User, user_id)
                if actor is not None and actor.learning_opt_out:
                    return None
            job = s.get(Job, job_id)
            if job is None:
                return None
            row = FeedbackEvent(event_key=event_key, job_id=job_id, user_id=user_id,
                                platform=platform, chat_id=chat_id, message_id=message_id,
                                kind=kind, value=value, delta=delta, weight=0.0, created_at=at)
            requester = self._person(s, job.user_id)
            actor_person = self._person(s, user_id) if user_id is not None else None
            used = net = 0.0
            if user_id is not None:
                since = at - CAP_WINDOW
                used = float(s.scalar(select(func.coalesce(func.sum(func.abs(FeedbackEvent.weight)), 0.0))
                                      .where(FeedbackEvent.user_id == user_id,
                                             FeedbackEvent.created_at > since,
                                             FeedbackEvent.created_at <= at)) or 0.0)
                net = float(s.scalar(select(func.coalesce(func.sum(FeedbackEvent.weight), 0.0))
                                     .where(FeedbackEvent.user_id == user_id,
                                            FeedbackEvent.platform == platform,
                                            FeedbackEvent.message_id == message_id,
                                            FeedbackEvent.value == value)) or 0.0)
            overrides = self._overrides(s, job.community_id)
            row.weight = _weigh(row, job, requester, actor_person, overrides, used, net)
            s.add(row)
            signal = _signal(row, job)
            if signal is not None:
                for key in _targets(row, job, actor_person, signal.kind):
                    self._apply(s, key, signal)
            return row.weight

    @staticmethod
    def _overrides(session: Session, community_id: int | None) -> dict[str, int] | None:
        if community_id is None:
            return None
        community = session.get(Community, community_id)
        return (community.settings or {}).get("emoji") if community else None

    @staticmethod
    def _apply(session: Session, key: ProfileKey, signal: taste.Signal) -> None:
        subject, subject_id, kind = key
        profile = session.scalar(select(Profile).where(
            Profile.subject == subject, Profile.subject_id == subject_id, Profile.kind == kind)
            .with_for_update())
        if profile is None:
            profile = Profile(subject=subject, subject_id=subject_id, kind=kind, stats={},
                              version=0, updated_at=utcnow())
            session.add(profile)
        profile.stats = taste.apply_signal(profile.stats or {}, signal)
        profile.version = (profile.version or 0) + 1
        profile.updated_at = utcnow()

    # -- reading --------------------------------------------------------------------------------

    def profile(self, subject: str, subject_id: int | None, kind: str) -> tuple[taste.Posterior, int]:
        if subject_id is None:
            return {}, 0
        with self.store.session() as s:
            row = s.scalar(select(Profile).where(Profile.subject == subject,
                                                 Profile.subject_id == subject_id,
                                                 Profile.kind == kind))
            return (dict(row.stats), row.version) if row else ({}, 0)

    def all_profiles(self) -> dict[ProfileKey, tuple[taste.Posterior, int]]:
        with self.store.session() as s:
            return {(p.subject, p.subject_id, p.kind): (p.stats, p.version)
                    for p in s.scalars(select(Profile)).all()}

    def timeline(self, subject: str, subject_id: int, kind: str,
                 ) -> list[tuple[FeedbackEvent, Job, taste.Posterior]]:
        """How one profile moved: after each feedback row that changed it, oldest first, the
        row, its job and the profile's stats then (the log replayed with its recorded weights,
        as :meth:`rebuild` does, so the last entry equals the live profile)."""
        with self.store.session() as s:
            persons = {u.id: u.person for u in s.scalars(select(User)).all()}
            jobs: dict[str, Job] = {}
            stats: taste.Posterior = {}
            out: list[tuple[FeedbackEvent, Job, taste.Posterior]] = []
            for row in s.scalars(select(FeedbackEvent).order_by(FeedbackEvent.id)).all():
                job = jobs.get(row.job_id) or s.get(Job, row.job_id)
                if job is None:
                    continue
                jobs[job.id] = job
                signal = _signal(row, job)
                if signal is None or signal.kind != kind:
                    continue
                actor = persons.get(row.user_id) if row.user_id is not None else None
                if (subject, subject_id, kind) in _targets(row, job, actor, signal.kind):
                    stats = taste.apply_signal(stats, signal)
                    out.append((row, job, stats))
            return out

    # -- rebuilding and forgetting --------------------------------------------------------------

    def rebuild(self) -> dict[ProfileKey, tuple[taste.Posterior, int]]:
        """Recompute every weight and profile from the feedback log, in insertion order."""
        with self.store.session() as s:
            _lock_profiles(s)
            jobs: dict[str, Job] = {}
            persons = {u.id: u.person for u in s.scalars(select(User)).all()}
            overrides = {c.id: (c.settings or {}).get("emoji")
                         for c in s.scalars(select(Community)).all()}
            history = _History()
            profiles: dict[ProfileKey, tuple[taste.Posterior, int]] = {}
            for row in s.scalars(select(FeedbackEvent).order_by(FeedbackEvent.id)).all():
                job = jobs.get(row.job_id) or s.get(Job, row.job_id)
                if job is None:
                    continue
                jobs[job.id] = job
                actor_person = persons.get(row.user_id) if row.user_id is not None else None
                used = history.used(row.user_id, _naive(row.created_at)) if row.user_id else 0.0
                net = history.net[(row.user_id, row.platform, row.message_id, row.value)]
                community_overrides = (overrides.get(job.community_id)
                                       if job.community_id is not None else None)
                row.weight = _weigh(row, job, persons.get(job.user_id, job.user_id), actor_person,
                                    community_overrides, used, net)
                history.add(row, row.weight)
                signal = _signal(row, job)
                if signal is not None:
                    for key in _targets(row, job, actor_person, signal.kind):
                        stats, version = profiles.get(key, ({}, 0))
                        profiles[key] = (taste.apply_signal(stats, signal), version + 1)
            s.execute(delete(Profile))
            now = utcnow()
            s.add_all(Profile(subject=k[0], subject_id=k[1], kind=k[2], stats=v[0], version=v[1],
                              updated_at=now) for k, v in profiles.items())
            return profiles

    def forget_feedback(self, user_id: int) -> int:
        """Erase every feedback row of the person behind ``user_id``; rebuild the profiles."""
        with self.store.session() as s:
            person = self._person(s, user_id)
            ids = [u.id for u in s.scalars(select(User)).all() if u.person == person]
            count = rows_changed(s.execute(delete(FeedbackEvent).where(FeedbackEvent.user_id.in_(ids))))
        self.rebuild()
        return int(count or 0)


    # -- choosing -------------------------------------------------------------------------------

    def prefetch(self, *, user_id: int, community_id: int | None, kind: str
                 ) -> tuple[int, bool, dict[tuple[str, int], tuple[dict[str, Any], int]]]:
        """What :meth:`choose` reads: the person behind ``user_id``, whether they opted out of
        learning, and the person's and the community's ``kind`` profiles, through the store's
        short-lived read cache. Called on its own, it fills that cache: a request does so in
        its own thread before it joins a group commit, so that the group's leader, which runs
        every member's work in turn, reads none of a burst of newcomers' rows itself."""
        person, opted_out = self.store.person_facts(user_id)
        wanted = [("person", person)] if not opted_out else []
        if community_id is not None:
            wanted.append(("community", community_id))
        return person, opted_out, self.store.profiles(kind, wanted) if wanted else {}

    def choose(self, *, user_id: int, community_id: int | None, kind: str, rng: Any,
               learning: bool = True, fixed: dict[str, str] | None = None, takes: int = 1,
               variation: bool = False, beside_fixed: bool = False,
               ) -> list[tuple[taste.Choice, dict[str, Any]]]:
        """Choose the next request's style and parameters, one per take (see
        :func:`core.taste.choose_takes`); returns each choice with the record the job keeps.

        On the request path: the person and the profiles come from the store's short-lived
        read cache (:meth:`Store.person_facts`, :meth:`Store.profiles`).
        """
        person, opted_out, found = self.prefetch(user_id=user_id, community_id=community_id,
                                                 kind=kind)
        own, own_version = found.get(("person", person), ({}, 0))
        community, community_version = found.get(("community", community_id or -1), ({}, 0))
        choices = taste.choose_takes(kind, own, community, rng=rng, takes=takes,
                                     learning=learning, fixed=fixed, variation=variation,
                                     beside_fixed=beside_fixed)
        note = ("; you opted out of learning, so only your community's taste counts"
                if opted_out and learning else "")
        versions = {"person": own_version, "community": community_version}
        return [(choice, {"choice": choice.values, "why": choice.why + note,
                          "learned": choice.learned, "profile_version": versions})
                for choice in choices]
