"""The redriver: makes sure no accepted job is lost between the store and the queue.

A job is persisted before it is published, so a broker outage leaves it ``queued`` and
unpublished; a worker killed mid-job leaves it ``running`` with a stale heartbeat; a broker that
forgot its messages (Redis without persistence, restarted) leaves it published but never
started. The redriver publishes all three again. Publishing twice is harmless: workers claim
jobs with a guarded update, so only one of the copies runs.
"""

from __future__ import annotations

import logging
import threading

from core.errors import QueueUnavailableError
from core.queue import JobPublisher
from core.settings import Settings
from core.store import Store

__all__ = ["Redriver", "redrive_once"]

log = logging.getLogger(__name__)

#: A queued job that was published this long ago and has not started is published again.
REPUBLISH_QUEUED_AFTER_SECONDS = 600.0


def redrive_once(store: Store, publisher: JobPublisher, settings: Settings) -> int:
    """Publish every job that needs it; returns how many were published."""
    published = 0
    jobs = store.jobs_to_redrive(stale_after=settings.job_stale_after_seconds,
                                 republish_after=REPUBLISH_QUEUED_AFTER_SECONDS)
    for job in jobs:
        try:
            publisher.publish(job.id, job.kind, job.params)
        except QueueUnavailableError:
            log.warning("queue still unreachable; %d job(s) wait", len(jobs) - published)
            break
        store.mark_published(job.id)
        published += 1
        log.info("re-sent job %s (state %s, attempt %d)", job.id, job.state, job.attempts)
    return published


class Redriver:
    """Runs :func:`redrive_once` every ``settings.redrive_interval_seconds`` in a thread."""

    def __init__(self, store: Store, publisher: JobPublisher, settings: Settings) -> None:
        self._args = (store, publisher, settings)
        self._interval = settings.redrive_interval_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redriver", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                redrive_once(*self._args)
            except Exception:  # keep going: the next round may succeed
                log.exception("redrive round failed")

    def start(self) -> Redriver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
