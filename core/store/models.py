"""SQLAlchemy 2 table models. The schema itself is owned by the Alembic migrations next door.

Times are stored as timezone-aware UTC. Job ids are short random strings (12 hex characters) so
they fit in button payloads (``action:job-id`` stays far below Telegram's 64 bytes).
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.params import ParamsJSON

__all__ = [
    "Artifact",
    "AuditEvent",
    "Base",
    "Community",
    "Confirmation",
    "DeliveredMessage",
    "FeedbackEvent",
    "HandledEvent",
    "Job",
    "JobState",
    "LinkCode",
    "LocalMessage",
    "Profile",
    "RateLimit",
    "RequestLog",
    "User",
    "WebSignIn",
]


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (JobState.DELIVERED, JobState.FAILED, JobState.CANCELLED)


class User(Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("platform", "platform_user_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    platform: Mapped[str] = mapped_column(String(32))
    platform_user_id: Mapped[str] = mapped_column(String(64))
    display_name: Mapped[str] = mapped_column(String(200), default="")
    learning_opt_out: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Named as the creator in their pictures' C2PA manifests (``/settings credit on``).
    credit_opt_in: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The person behind this identity: identities linked with /link share it. None: own id.
    person_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    created_at: Mapped[datetime]

    @property
    def person(self) -> int:
        return self.person_id or self.id


class Community(Base):
    __tablename__ = "communities"
    __table_args__ = (UniqueConstraint("platform", "platform_community_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    platform: Mapped[str] = mapped_column(String(32))
    platform_community_id: Mapped[str] = mapped_column(String(64))
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime]


class Job(Base):
    """One request to generate something, and its whole life: ``queued -> running -> final``."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_created", "state", "created_at"),
                      Index("ix_jobs_requester_state", "requester", "kind", "state"))

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # "text" | "image"
    intent: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    community_id: Mapped[int | None] = mapped_column(
        ForeignKey("communities.id", ondelete="SET NULL"), nullable=True
    )
    parent_job_id: Mapped[str | None] = mapped_column(String(16), nullable=True)
    prompt: Mapped[str] = mapped_column(Text)
    expanded_prompt: Mapped[str] = mapped_column(Text)
    # Typed, versioned and checked on every write: core/params.py.
    params: Mapped[dict[str, Any]] = mapped_column(ParamsJSON, default=dict)
    seed: Mapped[int] = mapped_column(BigInteger)
    model: Mapped[str | None] = mapped_column(String(300), nullable=True)
    platform: Mapped[str] = mapped_column(String(32))
    delivery: Mapped[dict[str, Any]] = mapped_column(default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    failure_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: The finished result's messages, kept until every one of them is posted, so a delivery
    #: interrupted by a rate limit resumes without generating again.
    outbox: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    #: Not to be run before this time (a platform asked us to wait: HTTP 429 retry_after).
    not_before: Mapped[datetime | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime]
    published_at: Mapped[datetime | None] = mapped_column(nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    updated_at: Mapped[datetime]
    #: The person who asked (``users.person``), for fair share: their jobs beyond the in-flight
    #: cap wait ``held`` (queued, not published) until one of theirs finishes.
    requester: Mapped[int | None] = mapped_column(Integer, nullable=True)
    held: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "image" | "text"
    position: Mapped[int] = mapped_column(Integer, default=0)
    path: Mapped[str | None] = mapped_column(Text, nullable=True)
    text: Mapped[str | None] = mapped_column(Text, nullable=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    recipe: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime]


class DeliveredMessage(Base):
    """A platform message the bot created for a job: how reactions find their way back.

    ``(job_id, position, part)`` names one platform message: ``position`` is the outbox entry,
    ``part`` the platform message within it (a split text, a photo then the rest of its caption,
    an album's pictures), counted from 0 in posting order. Each part is recorded as soon as it
    is posted, so an interrupted delivery resumes at the first part not recorded.
    """

    __tablename__ = "delivered_messages"
    __table_args__ = (UniqueConstraint("platform", "chat_id", "message_id"),
                      UniqueConstraint("job_id", "position", "part",
                                       name="uq_delivered_messages_job_position_part"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    platform: Mapped[str] = mapped_column(String(32))
    chat_id: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[str] = mapped_column(String(64))
    position: Mapped[int] = mapped_column(Integer, default=0)
    part: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime]


class FeedbackEvent(Base):
    """Append-only log of reactions and button presses on results."""

    __tablename__ = "feedback_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_key: Mapped[str] = mapped_column(String(300), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=True, index=True
    )
    platform: Mapped[str] = mapped_column(String(32))
    chat_id: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # "reaction" | "button"
    value: Mapped[str] = mapped_column(String(100))  # the emoji or the button action
    delta: Mapped[int] = mapped_column(Integer)  # +1 added, -1 removed
    #: The signed weight this event applied to profiles (derived; rebuilt from the log).
    weight: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime]


class Profile(Base):
    """Learned taste of a person or a community for one job kind. Derived from feedback."""

    __tablename__ = "profiles"
    __table_args__ = (UniqueConstraint("subject", "subject_id", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subject: Mapped[str] = mapped_column(String(16))  # "person" | "community"
    subject_id: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # "image" | "text"
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)
    version: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime]


class LinkCode(Base):
    """A one-time code that links two identities of one person (/link)."""

    __tablename__ = "link_codes"

    code: Mapped[str] = mapped_column(String(16), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    created_at: Mapped[datetime]


class LocalMessage(Base):
    """Messages of the local (console) platform. Its ``id`` is the number people react to."""

    __tablename__ = "local_messages"
    __table_args__ = (Index("ix_local_messages_chat_id", "chat_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    chat_id: Mapped[str] = mapped_column(String(64))
    author: Mapped[str] = mapped_column(String(64))  # "bot" or the person's id
    job_id: Mapped[str | None] = mapped_column(String(16), nullable=True)
    kind: Mapped[str] = mapped_column(String(16))  # result | status | error | info | user
    text: Mapped[str] = mapped_column(Text, default="")
    attachments: Mapped[dict[str, Any]] = mapped_column(default=dict)
    reply_to: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime]


class RateLimit(Base):
    """A chat a platform asked to leave alone until ``until`` (a Telegram 429's flood wait);
    shared by the bot and every worker, so that none of them calls the chat before then."""

    __tablename__ = "rate_limits"

    platform: Mapped[str] = mapped_column(String(32), primary_key=True)
    chat_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    until: Mapped[datetime]


class HandledEvent(Base):
    """A platform event answered at once, without a job (``/help``, ``/settings``,
    ``/mydata``...): a replay of it (a resumed gateway, a getUpdates answer lost on the way) is
    answered no second time. Requests that make a job are kept once by its idempotency key.
    ``event_id`` is a digest of the platform's id, which may hold a person's own id."""

    __tablename__ = "handled_events"
    __table_args__ = (Index("ix_handled_events_created", "created_at"),)

    platform: Mapped[str] = mapped_column(String(32), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    created_at: Mapped[datetime]


class AuditEvent(Base):
    """What admins may read with ``/settings audit``: policy changes, reports, blocked
    prompts and pictures. Rows of a person who sends ``/forget everything`` go with them."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_community_created", "community_id", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    community_id: Mapped[int | None] = mapped_column(
        ForeignKey("communities.id", ondelete="CASCADE"), nullable=True)
    actor_user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=True)
    #: Whose content the event is about (the requester of a reported or blocked result).
    subject_user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(16), nullable=True)
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime]


class RequestLog(Base):
    """One row per accepted request (not per job): what quotas count, one indexed query."""

    __tablename__ = "request_log"
    __table_args__ = (Index("ix_request_log_person_created", "person_id", "created_at"),
                      Index("ix_request_log_community_created", "community_id", "created_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    person_id: Mapped[int] = mapped_column(Integer)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    community_id: Mapped[int | None] = mapped_column(
        ForeignKey("communities.id", ondelete="CASCADE"), nullable=True)
    created_at: Mapped[datetime]


class Confirmation(Base):
    """A one-time code a person repeats to confirm something drastic (``/forget everything``)."""

    __tablename__ = "confirmations"

    code: Mapped[str] = mapped_column(String(16), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime]


class WebSignIn(Base):
    """A /web sign-in link's one-time nonce: who and which community it lets in, and whether
    it was used. The link itself is signed and expires (core/web_access.py); this row makes it
    work once."""

    __tablename__ = "web_sign_ins"

    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    community_id: Mapped[int] = mapped_column(ForeignKey("communities.id", ondelete="CASCADE"))
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime]
    used_at: Mapped[datetime | None] = mapped_column(nullable=True)
