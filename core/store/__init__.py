"""Persistence: SQLAlchemy models, Alembic migrations and the :class:`Store` facade."""

from core.store._store import Claim, Store, content_hash, as_utc, rows_changed, utcnow
from core.store.models import (
    Artifact,
    Community,
    DeliveredMessage,
    FeedbackEvent,
    Job,
    JobState,
    LocalMessage,
    User,
    WebSignIn,
)

__all__ = [
    "Artifact",
    "Claim",
    "Community",
    "DeliveredMessage",
    "FeedbackEvent",
    "Job",
    "JobState",
    "LocalMessage",
    "Store",
    "User",
    "content_hash",
    "rows_changed",
    "as_utc",
    "utcnow",
    "WebSignIn",
]
