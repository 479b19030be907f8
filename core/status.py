"""A snapshot of the fleet for operators: ``musespark status`` and the bot's job gauges.

Everything comes from the store and the broker, so it works from any machine that has the
settings, whether or not a bot runs there. Workers are seen two ways: the jobs they hold
(``jobs.worker`` with a fresh heartbeat) and, where the broker carries Celery's remote control
(Redis, RabbitMQ), the workers that answer a ping, idle ones included.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from core.settings import Settings
from core.store import Job, JobState, Store, as_utc, utcnow

__all__ = ["FleetStatus", "WorkerSeen", "fleet_status", "jobs_by_state", "oldest_waiting"]

log = logging.getLogger(__name__)

#: The window of "jobs by state" and "failures by reason".
RECENT_WINDOW = timedelta(hours=1)
#: How long workers get to answer a ping.
PING_TIMEOUT_SECONDS = 1.0
#: A failure reason is grouped by its first words (the rest names a job or an exception).
REASON_CHARS = 60


@dataclass(slots=True)
class WorkerSeen:
    name: str
    #: Jobs it runs now (id, kind, intent, seconds since start).
    running: list[dict[str, Any]] = field(default_factory=list)
    #: Whether it answered Celery's remote control (None: the broker has none; then only the
    #: workers holding a job are seen, by the name the runner records: host:pid).
    answered: bool | None = None


@dataclass(slots=True)
class FleetStatus:
    broker: str
    queue_depths: dict[str, int] | None
    queue_error: str | None
    workers: list[WorkerSeen]
    jobs_by_state: dict[str, int]
    oldest_waiting: dict[str, Any] | None
    failures_by_reason: dict[str, int]
    taken_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def jobs_by_state(store: Store, since: datetime) -> dict[str, int]:
    """Jobs created or changed since ``since``, by state."""
    with store.session() as s:
        rows = s.execute(select(Job.state, func.count()).where(Job.updated_at >= since)
                         .group_by(Job.state)).all()
    counts = {state.value: 0 for state in JobState}
    counts.update({str(state): int(n) for state, n in rows})
    return counts


def oldest_waiting(store: Store, now: datetime | None = None) -> dict[str, Any] | None:
    """The queued job that has waited longest (a deferred one counts from its due time)."""
    now = now or utcnow()
    with store.session() as s:
        job = s.scalars(select(Job).where(
            Job.state == JobState.QUEUED,
            Job.not_before.is_(None) | (Job.not_before <= now))
            .order_by(func.coalesce(Job.not_before, Job.created_at)).limit(1)).first()
    if job is None:
        return None
    since = as_utc(job.not_before or job.created_at)
    return {"job_id": job.id, "kind": job.kind, "intent": job.intent, "platform": job.platform,
            "waiting_seconds": round(max(0.0, (now - since).total_seconds()), 1),
            "attempts": job.attempts}


def _failures(store: Store, since: datetime) -> dict[str, int]:
    with store.session() as s:
        reasons = s.scalars(select(Job.failure_reason).where(
            Job.state == JobState.FAILED, Job.updated_at >= since)).all()
    grouped: dict[str, int] = {}
    for reason in reasons:
        key = (reason or "(no reason)").split("\n", 1)[0][:REASON_CHARS]
        grouped[key] = grouped.get(key, 0) + 1
    return dict(sorted(grouped.items(), key=lambda kv: -kv[1]))


def _running(store: Store, settings: Settings, now: datetime) -> dict[str, list[dict[str, Any]]]:
    fresh = now - timedelta(seconds=settings.job_stale_after_seconds)
    with store.session() as s:
        jobs = s.scalars(select(Job).where(Job.state == JobState.RUNNING,
                                           Job.heartbeat_at >= fresh)).all()
    by_worker: dict[str, list[dict[str, Any]]] = {}
    for job in jobs:
        started = as_utc(job.started_at or job.created_at)
        by_worker.setdefault(job.worker or "?", []).append({
            "job_id": job.id, "kind": job.kind, "intent": job.intent,
            "seconds": round((now - started).total_seconds(), 1)})
    return by_worker


def _inspect(settings: Settings) -> dict[str, list[str]] | None:
    """Worker node name -> ids of the jobs it runs now, from Celery's remote control (the
    workers that answer, idle ones included); None where the broker cannot ask."""
    if settings.embedded_broker:
        return None
    from core.queue import make_celery

    app = make_celery(settings, name="musespark-status")
    try:
        inspect = app.control.inspect(timeout=PING_TIMEOUT_SECONDS)
        active = inspect.active() or {}
    except Exception as exc:
        log.warning("could not ask the workers: %s", exc)
        return None
    finally:
        app.close()
    return {node: [str(task["args"][0]) for task in tasks if task.get("args")]
            for node, tasks in sorted(active.items())}


def fleet_status(store: Store, settings: Settings, *, ask_workers: bool = True) -> FleetStatus:
    from core.metrics import broker_kind, queue_depths

    now = utcnow()
    depths: dict[str, int] | None
    error = None
    try:
        depths = queue_depths(settings)
    except Exception as exc:
        depths, error = None, f"{type(exc).__name__}: {exc}"
    running = _running(store, settings, now)
    nodes = _inspect(settings) if ask_workers else None
    workers = []
    if nodes is None:  # no remote control: the workers seen are those holding a job
        workers = [WorkerSeen(name, jobs) for name, jobs in sorted(running.items())]
    else:
        by_id = {job["job_id"]: job for jobs in running.values() for job in jobs}
        for node, job_ids in nodes.items():
            workers.append(WorkerSeen(node, [by_id.get(j, {"job_id": j}) for j in job_ids],
                                      answered=True))
    since = now - RECENT_WINDOW
    return FleetStatus(broker=broker_kind(settings), queue_depths=depths, queue_error=error,
                       workers=workers, jobs_by_state=jobs_by_state(store, since),
                       oldest_waiting=oldest_waiting(store, now),
                       failures_by_reason=_failures(store, since), taken_at=now.isoformat())
