"""Read models for looking back: a community's results as pieces, a request's progress, the
queue now. Pure reads of the store; the web pages (bots/web) render them.

A **piece** is one request and everything that grew from it, shown together: its takes (sibling
jobs whose idempotency keys add ``:takeN``), a story's scene pictures, refinements, variations,
rerolls and brainstorm picks (jobs whose ``parent_job_id`` leads back to it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, or_, select
from sqlalchemy.orm import aliased

from core.store import Artifact, Community, FeedbackEvent, Job, JobState, LocalMessage, Store, User

__all__ = [
    "GALLERY_KINDS",
    "Piece",
    "Progress",
    "QueueNow",
    "Shown",
    "community",
    "community_people",
    "community_styles",
    "gallery",
    "local_messages_since",
    "piece",
    "progress",
    "queue_now",
]

#: The gallery's kind filter: name -> (job kind, intents) of a piece's first job.
GALLERY_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "picture": ("image", ("imagine", "remix", "refine")),
    "text": ("text", ("write", "refine")),
    "story": ("text", ("story",)),
    "ideas": ("text", ("brainstorm",)),
}
#: Generations of follow-ups (a refinement of a refinement ...) a piece gathers.
PIECE_DEPTH_MAX = 12
TAKE_SUFFIX = ":take"


@dataclass(frozen=True, slots=True)
class Shown:
    """One job of a piece, with what it made and how people took it."""

    job: Job
    artifacts: tuple[Artifact, ...]
    #: Emoji (or button) -> net count of standing reactions.
    reactions: dict[str, int]
    #: Signed sum of the weights its feedback applied (> 0: liked on balance).
    score: float

    @property
    def style(self) -> str:
        choice = ((self.job.params.get("taste") or self.job.params.get("picture_taste") or {})
                  .get("choice") or {})
        return str(choice.get("style") or choice.get("tone") or "")

    @property
    def text(self) -> str:
        return "\n\n".join(a.text for a in self.artifacts if a.kind == "text" and a.text)

    @property
    def pictures(self) -> tuple[Artifact, ...]:
        return tuple(a for a in self.artifacts if a.kind == "image")


@dataclass(frozen=True, slots=True)
class Piece:
    """A request and what grew from it, oldest first (``parts[0]`` is the request itself)."""

    parts: tuple[Shown, ...]
    person: str

    @property
    def root(self) -> Job:
        return self.parts[0].job

    @property
    def reactions(self) -> dict[str, int]:
        total: dict[str, int] = defaultdict(int)
        for part in self.parts:
            for emoji, count in part.reactions.items():
                total[emoji] += count
        return {e: c for e, c in total.items() if c > 0}

    @property
    def liked(self) -> bool:
        return sum(p.score for p in self.parts) > 0


def _style_of(job: Any) -> ColumnElement[Any]:
    return func.coalesce(job.params["taste"]["choice"]["style"].as_string(),
                         job.params["picture_taste"]["choice"]["style"].as_string())


def _roots(community_id: int) -> ColumnElement[bool]:
    return and_(Job.community_id == community_id, Job.parent_job_id.is_(None),
                Job.intent != "understand", Job.state == JobState.DELIVERED,
                ~Job.idempotency_key.like(f"%{TAKE_SUFFIX}_"))


def gallery(store: Store, community_id: int, *, person: int | None = None,
            style: str | None = None, kind: str | None = None, liked: bool = False,
            page: int = 1, per_page: int = 24) -> tuple[list[Piece], bool]:
    """One page of a community's pieces, newest first, and whether another page follows.

    Filters: ``person`` (a requester's user id), ``style`` (any of the piece's first takes),
    ``kind`` (a :data:`GALLERY_KINDS` name), ``liked`` (the piece's feedback weighs positive).
    """
    take = aliased(Job)
    query = select(Job).where(_roots(community_id))
    if person is not None:
        query = query.where(Job.user_id == person)
    if kind in GALLERY_KINDS:
        job_kind, intents = GALLERY_KINDS[kind]
        query = query.where(Job.kind == job_kind, Job.intent.in_(intents))
    if style:
        # The requests (first takes' keys) any of whose takes has the style: one scan.
        key = take.idempotency_key
        first_key = case((key.like(f"%{TAKE_SUFFIX}_"), func.substr(key, 1, func.length(key)
                                                                  - len(TAKE_SUFFIX) - 1)),
                         else_=key)
        query = query.where(Job.idempotency_key.in_(select(first_key).where(
            take.community_id == community_id, _style_of(take) == style)))
    if liked:
        member = aliased(Job)
        weight = (select(func.coalesce(func.sum(FeedbackEvent.weight), 0.0))
                  .join(member, member.id == FeedbackEvent.job_id)
                  .where(or_(member.id == Job.id, member.parent_job_id == Job.id,
                             member.idempotency_key.like(Job.idempotency_key
                                                         + f"{TAKE_SUFFIX}%")))
                  .scalar_subquery())
        query = query.where(weight > 0)
    page = max(1, page)
    with store.session() as s:
        roots = list(s.scalars(query.order_by(Job.created_at.desc(), Job.id.desc())
                               .limit(per_page + 1).offset((page - 1) * per_page)).all())
    more = len(roots) > per_page
    return _assemble(store, roots[:per_page]), more


def piece(store: Store, job_id: str) -> tuple[Piece, Job] | None:
    """The piece job ``job_id`` belongs to, and that job."""
    with store.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            return None
        root = job
        for _ in range(PIECE_DEPTH_MAX):
            if root.parent_job_id is None:
                break
            parent = s.get(Job, root.parent_job_id)
            if parent is None:
                break
            root = parent
        if TAKE_SUFFIX in root.idempotency_key:
            base, _, number = root.idempotency_key.rpartition(TAKE_SUFFIX)
            first = s.scalar(select(Job).where(Job.idempotency_key == base)) if (
                number.isdigit()) else None
            root = first or root
    pieces = _assemble(store, [root])
    return (pieces[0], job) if pieces else None


def _assemble(store: Store, roots: Sequence[Job]) -> list[Piece]:
    """Gather each root's takes and descendants, their artifacts and feedback: six queries."""
    if not roots:
        return []
    with store.session() as s:
        members: dict[str, list[Job]] = {r.id: [r] for r in roots}
        owner: dict[str, str] = {r.id: r.id for r in roots}
        takes = s.scalars(select(Job).where(or_(*(
            Job.idempotency_key.startswith(r.idempotency_key + TAKE_SUFFIX, autoescape=True)
            for r in roots)))).all()
        by_key = {r.idempotency_key: r.id for r in roots}
        for t in takes:
            root_id = by_key.get(t.idempotency_key.rpartition(TAKE_SUFFIX)[0])
            if root_id is not None and t.parent_job_id is None:
                members[root_id].append(t)
                owner[t.id] = root_id
        frontier = list(owner)
        for _ in range(PIECE_DEPTH_MAX):
            if not frontier:
                break
            children = s.scalars(select(Job).where(Job.parent_job_id.in_(frontier),
                                                   Job.intent != "understand")).all()
            frontier = []
            for child in children:
                if child.id not in owner and child.parent_job_id in owner:
                    owner[child.id] = owner[child.parent_job_id]
                    members[owner[child.id]].append(child)
                    frontier.append(child.id)
        ids = list(owner)
        artifacts: dict[str, list[Artifact]] = defaultdict(list)
        for a in s.scalars(select(Artifact).where(Artifact.job_id.in_(ids))
                           .order_by(Artifact.job_id, Artifact.position, Artifact.id)).all():
            if a.kind not in ("image", "text"):
                continue  # an uploaded source picture ("input") is the person's, not a result
            artifacts[a.job_id].append(a)
        reactions: dict[str, dict[str, int]] = defaultdict(dict)
        scores: dict[str, float] = defaultdict(float)
        for job_id, value, delta, weight in s.execute(
                select(FeedbackEvent.job_id, FeedbackEvent.value, func.sum(FeedbackEvent.delta),
                       func.sum(FeedbackEvent.weight))
                .where(FeedbackEvent.job_id.in_(ids), FeedbackEvent.user_id.is_not(None))
                .group_by(FeedbackEvent.job_id, FeedbackEvent.value)).all():
            reactions[job_id][value] = int(delta or 0)
            scores[job_id] += float(weight or 0.0)
        names = {uid: name for uid, name in s.execute(select(User.id, User.display_name).where(
            User.id.in_({r.user_id for r in roots}))).all()}
    out = []
    for root in roots:
        jobs = sorted(members[root.id], key=lambda j: (j.created_at, j.id))
        jobs.remove(root)
        parts = tuple(Shown(j, tuple(artifacts[j.id]), reactions[j.id], scores[j.id])
                      for j in [root, *jobs] if j.intent != "understand")
        out.append(Piece(parts, names.get(root.user_id) or f"person {root.user_id}"))
    return out


def community_people(store: Store, community_id: int) -> list[tuple[int, str]]:
    """``(user id, name)`` of everyone who asked for something in the community."""
    with store.session() as s:
        rows = s.execute(select(User.id, User.display_name).where(User.id.in_(
            select(Job.user_id).where(Job.community_id == community_id).distinct()))
            .order_by(User.display_name, User.id)).all()
    return [(uid, name or f"person {uid}") for uid, name in rows]


def community_styles(store: Store, community_id: int) -> list[str]:
    """Styles the community's results were made in."""
    with store.session() as s:
        found = s.scalars(select(_style_of(Job)).where(Job.community_id == community_id)
                          .distinct()).all()
    return sorted(str(f) for f in found if f)


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a request stands: its jobs (takes, a story's pictures) and how far they got."""

    state: str  # "queued" | "running" | "delivered" | "failed"
    ahead: int
    done: int
    total: int

    def describe(self, kind: str) -> str:
        if self.state == "queued":
            return f"queued, {self.ahead} ahead of you" if self.ahead else "queued, next up"
        if self.state == "running":
            verb = "drawing…" if kind == "image" else "writing…"
            return f"{verb} ({self.done} of {self.total} done)" if self.total > 1 else verb
        if self.state == "failed":
            return "failed"
        return "done"


def progress(store: Store, job_id: str) -> Progress | None:
    """The progress of the request whose first job is ``job_id`` (with its derived jobs)."""
    with store.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            return None
        jobs = [job, *s.scalars(select(Job).where(Job.idempotency_key.startswith(
            job.idempotency_key + ":", autoescape=True))).all()]
        ahead = 0
        if job.state == JobState.QUEUED:
            ahead = int(s.scalar(select(func.count()).select_from(Job).where(
                Job.state.in_([JobState.QUEUED, JobState.RUNNING]), Job.kind == job.kind,
                Job.created_at < job.created_at)) or 0)
    jobs = [j for j in jobs if j.intent != "understand"] or jobs
    states = [j.state for j in jobs]
    done = sum(1 for st in states if st == JobState.DELIVERED)
    if any(st == JobState.RUNNING for st in states) or (0 < done < len(states)):
        state = "running"
    elif all(st == JobState.QUEUED for st in states):
        state = "queued"
    elif all(st in (JobState.FAILED, JobState.CANCELLED) for st in states):
        state = "failed"
    elif done == len(states):
        state = "delivered"
    else:
        state = "running"
    return Progress(state, ahead, done, len(states))


@dataclass(frozen=True, slots=True)
class QueueNow:
    """The queue right now: jobs waiting and running per kind, and the busy workers."""

    waiting: dict[str, int]
    running: dict[str, int]
    #: ``(worker, job kind, seconds since its last heartbeat)`` of each job running now.
    workers: list[tuple[str, str, float]] = field(default_factory=list)


def queue_now(store: Store, now: datetime) -> QueueNow:
    with store.session() as s:
        counts = s.execute(select(Job.state, Job.kind, func.count()).where(
            Job.state.in_([JobState.QUEUED, JobState.RUNNING])).group_by(Job.state, Job.kind)
            ).all()
        busy = s.execute(select(Job.worker, Job.kind, Job.heartbeat_at).where(
            Job.state == JobState.RUNNING).order_by(Job.worker)).all()
    waiting = {k: int(n) for st, k, n in counts if st == JobState.QUEUED}
    running = {k: int(n) for st, k, n in counts if st == JobState.RUNNING}
    workers = []
    for worker, kind, beat in busy:
        age = (now - (beat if beat.tzinfo else beat.replace(tzinfo=now.tzinfo))
               ).total_seconds() if beat else float("nan")
        workers.append((worker or "?", kind, age))
    return QueueNow(waiting, running, workers)


def local_messages_since(store: Store, chat_ids: Sequence[str],
                         after_id: int) -> Sequence[LocalMessage]:
    """New messages of several local chats at once (the web's live updates: one query for
    every open tab)."""
    if not chat_ids:
        return []
    with store.session() as s:
        return s.scalars(select(LocalMessage).where(LocalMessage.chat_id.in_(chat_ids),
                                                    LocalMessage.id > after_id)
                         .order_by(LocalMessage.id)).all()


def community(store: Store, community_id: int) -> Community | None:
    with store.session() as s:
        return s.get(Community, community_id)
