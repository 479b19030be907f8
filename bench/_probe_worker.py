"""Celery app for bench/latency.py: records when each task body starts, nothing else.

Both probe tasks run in the same worker, on the same queue, from the same broker, so the only
difference between the two paths is what happens before publishing.
"""

from __future__ import annotations

import os
import time

from core.queue import TASK_FOR_KIND, make_celery
from core.settings import get_settings
from core.store import JobState, Store

app = make_celery(get_settings(), name="musespark-bench")
STARTS = os.environ["BENCH_STARTS_FILE"]
_store: list[Store] = []


def _record(token: str) -> None:
    started = time.time()
    with open(STARTS, "a") as f:
        f.write(f"{token} {started:.6f}\n")


@app.task(name="bench.raw")
def raw(token: str) -> None:
    _record(token)


@app.task(name=TASK_FOR_KIND["text"])
def core_job(job_id: str) -> None:
    _record(job_id)
    # What the real task does next: claim the job and finish it, so the store stays realistic.
    if not _store:
        _store.append(Store(get_settings().resolved_database_url))
    claim = _store[0].claim(job_id, worker="bench", stale_after=60, max_attempts=3)
    if claim is not None:
        with _store[0].finishing(claim, JobState.DELIVERED):
            pass
