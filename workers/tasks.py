"""Celery tasks. Each takes only a job id; the job itself lives in the store."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from core.queue import TASK_FOR_KIND
from core.settings import Settings, get_settings
from core.store import Store
from workers.celery_app import app
from workers.batching import run_image_task, run_text_task
from workers.observe import job_done, job_taken
from workers.runner import execute_job

__all__ = ["run_image_job", "run_text_job"]

log = logging.getLogger(__name__)

_process_state: dict[str, object] = {}


def _resources() -> tuple[Store, Settings]:
    """One store per worker process, made after the fork (connections must not be shared)."""
    if _process_state.get("pid") != os.getpid():
        settings = get_settings()
        _process_state.update(pid=os.getpid(), settings=settings,
                              store=Store(settings.resolved_database_url))
    return _process_state["store"], _process_state["settings"]  # type: ignore[return-value]


def _observed(job_id: str, run: Callable[..., str] = execute_job) -> str:
    """Run the job and record its metrics (workers/observe.py)."""
    store, settings = _resources()
    before = store.get_job(job_id)
    started = time.monotonic()
    job_taken(before, settings)
    outcome = run(job_id, store=store, settings=settings)
    job_done(store, settings, before, outcome, time.monotonic() - started)
    return outcome


@app.task(name=TASK_FOR_KIND["text"])
def run_text_job(job_id: str) -> str:
    """A text job, written together with plain replies queued with it (workers/batching.py)."""
    return _observed(job_id, run_text_task)


@app.task(name=TASK_FOR_KIND["image"])
def run_image_job(job_id: str) -> str:
    """A picture job, rendered together with compatible queued ones (workers/batching.py)."""
    return _observed(job_id, run_image_task)
