"""Celery tasks. Each takes only a job id; the job itself lives in the store."""

from __future__ import annotations

import logging
from collections.abc import Callable
import os
import time
from datetime import UTC, datetime

from core.queue import TASK_FOR_KIND
from core.settings import Settings, get_settings
from core.store import Job, JobState, Store, utcnow
from workers.celery_app import app
from workers.batching import run_image_task
from workers.runner import execute_job, last_failure_cause

__all__ = ["run_image_job", "run_text_job"]

log = logging.getLogger(__name__)

_process_state: dict[str, object] = {}

#: The model label of a job that has not named its model yet (nothing generated so far).
DEFAULT_MODEL_LABELS = {"text": "SmolLM2-135M-Instruct", "image": "tiny-demo"}


def _resources() -> tuple[Store, Settings]:
    """One store per worker process, made after the fork (connections must not be shared)."""
    if _process_state.get("pid") != os.getpid():
        settings = get_settings()
        _process_state.update(pid=os.getpid(), settings=settings,
                              store=Store(settings.resolved_database_url))
    return _process_state["store"], _process_state["settings"]  # type: ignore[return-value]


def _aware(moment: datetime) -> datetime:
    """SQLite gives stored UTC times back without their zone."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _model_label(job: Job, settings: Settings) -> str:
    configured = settings.text_model if job.kind == "text" else settings.image_model
    return job.model or configured or DEFAULT_MODEL_LABELS.get(job.kind, job.kind)


def _observed(job_id: str, run: Callable[..., str] = execute_job) -> str:
    """Run the job and record its metrics (see ``core.metrics``): the time it waited since it
    was (re)published, the time it ran, and what became of it."""
    from core import metrics

    store, settings = _resources()
    before = store.get_job(job_id)
    started = time.monotonic()
    if before is not None and before.state == JobState.QUEUED:
        since = max(_aware(before.published_at or before.created_at), _aware(before.created_at))
        metrics.JOB_QUEUE_WAIT.labels(before.kind, _model_label(before, settings)).observe(
            max(0.0, (utcnow() - since).total_seconds()))
    outcome = run(job_id, store=store, settings=settings)
    if outcome in ("skipped", "lost") or before is None:
        return outcome
    after = store.get_job(job_id) or before
    metrics.JOB_RUN.labels(after.kind, _model_label(after, settings)).observe(
        time.monotonic() - started)
    if outcome == "delivered":
        metrics.RESULTS.labels(after.platform, "delivered", "").inc()
    elif outcome == "failed":
        metrics.RESULTS.labels(after.platform, "failed", last_failure_cause()).inc()
    return outcome


@app.task(name=TASK_FOR_KIND["text"])
def run_text_job(job_id: str) -> str:
    return _observed(job_id)


@app.task(name=TASK_FOR_KIND["image"])
def run_image_job(job_id: str) -> str:
    """A picture job, rendered together with compatible queued ones (workers/batching.py)."""
    return _observed(job_id, run_image_task)
