"""Simulated deliveries: the real core and store, with the worker's part played in-process.

Used by the learning tests and by bench/simulated_users.py. The orchestrator, store and learner
are the real ones; only generation is replaced by recording the job as delivered with one
message whose id people can react to.
"""

from __future__ import annotations

import itertools
from datetime import datetime

from core.events import Actor, Channel, ChannelKind, ComponentActivated, MessageReceived, ReactionChanged
from core.orchestrator import Orchestrator
from sqlalchemy import select

from core.store import Artifact, Job, JobState, Store, content_hash, utcnow

_message_ids = itertools.count(1)
_event_ids = itertools.count(1)


def deliver(store: Store, job_id: str, *, text: str = "a result") -> str:
    """Claim, 'generate' and deliver a job as a worker would; returns the message id."""
    claim = store.claim(job_id, worker="sim", stale_after=60, max_attempts=3)
    assert claim is not None, f"job {job_id} not claimable"
    job = store.get_job(job_id)
    assert job is not None
    artifact = Artifact(job_id=job_id, kind="text", position=0, text=text,
                        path=None if job.kind == "text" else f"/sim/{job_id}.png",
                        content_hash=content_hash(text.encode()),
                        recipe={"job_id": job_id, "prompt": job.prompt, "seed": job.seed},
                        created_at=utcnow())
    assert store.save_outcome(claim, model="sim", outbox=[], artifacts=[artifact])
    message_id = f"m{next(_message_ids)}"
    store.record_delivered(job_id, job.platform, job.delivery["chat_id"], 0, [message_id])
    with store.finishing(claim, JobState.DELIVERED) as session:
        assert session is not None
    return message_id


class SimChat:
    """A group chat on a simulated platform where people ask, get results and react."""

    def __init__(self, orchestrator: Orchestrator, chat_id: str = "g1",
                 platform: str = "sim") -> None:
        self.orchestrator, self.chat_id, self.platform = orchestrator, chat_id, platform

    @property
    def channel(self) -> Channel:
        return Channel(self.chat_id, ChannelKind.GROUP, guild_id=self.chat_id)

    def ask(self, person: str, text: str, at: datetime | None = None) -> tuple[str, str]:
        """``person`` asks; returns (job_id, message_id) of the (first take's) result."""
        return self.ask_takes(person, text, at)[0]

    def ask_takes(self, person: str, text: str,
                  at: datetime | None = None) -> list[tuple[str, str]]:
        """``person`` asks; every take of the request is delivered: [(job_id, message_id)]."""
        event = MessageReceived(platform=self.platform, event_id=f"e{next(_event_ids)}",
                                actor=Actor(person, person), channel=self.channel, text=text,
                                **({"occurred_at": at} if at else {}))
        replies = self.orchestrator.handle(event)
        assert replies and replies[0].job_id, replies
        first = self.orchestrator.store.get_job(replies[0].job_id)
        assert first is not None
        with self.orchestrator.store.session() as s:
            key = first.idempotency_key
            jobs = sorted(s.scalars(select(Job).where(
                (Job.idempotency_key == key) | Job.idempotency_key.like(f"{key}:take%"))),
                key=lambda job: (job.params.get("takes") or {}).get("index", 0))
            ids = [job.id for job in jobs]
        return [(job_id, deliver(self.orchestrator.store, job_id)) for job_id in ids]

    def react(self, person: str, message_id: str, emoji: str, *, remove: bool = False,
              at: datetime | None = None, is_bot: bool = False) -> None:
        change = {"removed" if remove else "added": frozenset([emoji])}
        self.orchestrator.handle(ReactionChanged(
            platform=self.platform, event_id=f"e{next(_event_ids)}",
            actor=Actor(person, person, is_bot=is_bot), channel=self.channel,
            message_id=message_id, **change, **({"occurred_at": at} if at else {})))

    def count(self, message_id: str, counts: dict[str, int]) -> None:
        self.orchestrator.handle(ReactionChanged(
            platform=self.platform, event_id=f"e{next(_event_ids)}", actor=Actor("anonymous"),
            channel=self.channel, message_id=message_id, anonymous=True, counts=counts))

    def press(self, person: str, message_id: str, custom_id: str) -> list:
        return self.orchestrator.handle(ComponentActivated(
            platform=self.platform, event_id=f"e{next(_event_ids)}", actor=Actor(person, person),
            channel=self.channel, custom_id=custom_id, message_id=message_id))
