"""A job's metrics, as its worker sees them (see ``core.metrics``): how long it waited since it
was (re)published, how long it ran, and what became of it. Recorded for every job, the ones a
picture batch pulled from the queue (workers/batching.py) as well as each task's own."""

from __future__ import annotations

from core import metrics
from core.settings import Settings
from core.store import Job, JobState, Store, as_utc, utcnow
from workers.runner import last_failure_cause

__all__ = ["DEFAULT_MODEL_LABELS", "job_done", "job_taken"]

#: The model label of a job that has not named its model yet (nothing generated so far).
DEFAULT_MODEL_LABELS = {"text": "SmolLM2-135M-Instruct", "image": "tiny-demo"}


def _model_label(job: Job, settings: Settings) -> str:
    configured = settings.text_model if job.kind == "text" else settings.image_model
    return job.model or configured or DEFAULT_MODEL_LABELS.get(job.kind, job.kind)


def job_taken(before: Job | None, settings: Settings) -> None:
    """A worker takes ``before`` (the job as it was in the queue): its wait."""
    if before is not None and before.state == JobState.QUEUED:
        since = max(as_utc(before.published_at or before.created_at), as_utc(before.created_at))
        metrics.JOB_QUEUE_WAIT.labels(before.kind, _model_label(before, settings)).observe(
            max(0.0, (utcnow() - since).total_seconds()))


def job_done(store: Store, settings: Settings, before: Job | None, outcome: str,
             seconds: float) -> None:
    """The job ended its run with ``outcome`` after ``seconds``."""
    if outcome in ("skipped", "lost", "returned") or before is None:
        return
    after = store.get_job(before.id) or before
    metrics.JOB_RUN.labels(after.kind, _model_label(after, settings)).observe(seconds)
    if outcome == "delivered":
        metrics.RESULTS.labels(after.platform, "delivered", "").inc()
    elif outcome == "failed":
        metrics.RESULTS.labels(after.platform, "failed", last_failure_cause()).inc()
