"""Every Prometheus metric MuseSpark exports, defined once, and how processes expose them.

The bot process serves its own registry (``/metrics`` on ``MUSESPARK_METRICS_PORT``) with the
queue depth read from the broker at scrape time. A worker is a Celery prefork pool: the jobs
run in child processes, so workers use prometheus-client's multiprocess mode. Its directory
(``PROMETHEUS_MULTIPROC_DIR``) must be set before ``prometheus_client`` is first imported in
the worker's main process (importing this module imports it), so ``workers/__main__.py`` sets
it first and imports this module only after.

Labels are kept bounded: ``kind`` is text or image, ``model`` the model's name, ``platform`` a
platform name, ``reason`` one of :data:`FAILURE_REASONS`. A person's id or a prompt never is a
label.

Metric names (all prefixed ``musespark_``):

* ``queue_depth{queue,broker}``: messages waiting (Redis list length, RabbitMQ message
  count, rows of the embedded SQLite transport); bot only, like ``oldest_waiting_job_seconds``
  and ``jobs{state}`` (last hour), read from the store.
* ``job_queue_wait_seconds{kind,model}``, ``job_run_seconds{kind,model}``: histograms.
* ``results_total{platform,outcome,reason}``: outcome ``delivered`` or ``failed``.
* ``rate_limited_total{platform}``, ``retry_wait_seconds{platform}``: 429s and the waits asked.
* ``redrives_total{reason}``, ``worker_deaths_total``: jobs re-sent by the redriver (reason
  ``unpublished``, ``stale``, ``lost``); a stale one is a job whose worker died.
* ``jobs_handed_back_total``: jobs a stopping worker gave back unfinished (SIGTERM).
* ``feedback_events_total{platform,kind}``: reactions and button presses recorded.
* ``model_load_seconds{family,model}``, ``models_resident{family,model}``: load time, and
  models held in memory (summed over live processes).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from core.settings import Settings
    from core.store import Store

__all__ = [
    "FAILURE_REASONS",
    "FEEDBACK_EVENTS",
    "JOBS_HANDED_BACK",
    "JOB_QUEUE_WAIT",
    "JOB_RUN",
    "JobsCollector",
    "MODELS_RESIDENT",
    "MODEL_LOAD",
    "QueueDepthCollector",
    "RATE_LIMITED",
    "REDRIVES",
    "RESULTS",
    "RETRY_WAIT",
    "WORKER_DEATHS",
    "mark_process_dead",
    "model_loaded",
    "rate_limited",
    "queue_depths",
    "serve_bot_metrics",
    "serve_worker_metrics",
]

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Why a job failed, as a label (the person-facing text is in ``jobs.failure_reason``).
FAILURE_REASONS = ("user_input", "model_unavailable", "time_limit", "error", "crash",
                   "delivery_refused", "exhausted")

#: Seconds; from a warm text job (well under a second) to a cold SDXL render on a busy queue.
JOB_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                       1800.0)
RETRY_WAIT_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
MODEL_LOAD_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0)

JOB_QUEUE_WAIT = Histogram(
    "musespark_job_queue_wait_seconds",
    "Time a job waited in the queue, from (re)publishing to a worker starting it.",
    ["kind", "model"], buckets=JOB_SECONDS_BUCKETS)
JOB_RUN = Histogram(
    "musespark_job_run_seconds",
    "Time a worker spent on a job (generating and posting).",
    ["kind", "model"], buckets=JOB_SECONDS_BUCKETS)
RESULTS = Counter(
    "musespark_results",
    "Jobs finished, by platform, outcome (delivered, failed) and failure reason.",
    ["platform", "outcome", "reason"])
RATE_LIMITED = Counter(
    "musespark_rate_limited", "Rate-limit (HTTP 429) answers from a platform.", ["platform"])
RETRY_WAIT = Histogram(
    "musespark_retry_wait_seconds", "Waits a platform asked for before a retry.",
    ["platform"], buckets=RETRY_WAIT_BUCKETS)
REDRIVES = Counter(
    "musespark_redrives",
    "Jobs the redriver published again: unpublished (broker was down), stale (worker died), "
    "lost (queued but never started), stranded (a worker died holding its message before "
    "starting it).", ["reason"])
for _reason in ("unpublished", "stale", "lost", "stranded"):
    REDRIVES.labels(_reason)  # shown as 0 before the first one, so rate() works from the start
WORKER_DEATHS = Counter(
    "musespark_worker_deaths",
    "Running jobs whose worker stopped proving it was alive (heartbeat went stale).")
JOBS_HANDED_BACK = Counter(
    "musespark_jobs_handed_back",
    "Jobs a stopping worker gave back to the queue unfinished (graceful shutdown bound).")
FEEDBACK_EVENTS = Counter(
    "musespark_feedback_events",
    "Feedback recorded (reactions, button presses), by platform and kind.",
    ["platform", "kind"])
MODEL_LOAD = Histogram(
    "musespark_model_load_seconds", "Time to load a model into a worker process.",
    ["family", "model"], buckets=MODEL_LOAD_BUCKETS)
MODELS_RESIDENT = Gauge(
    "musespark_models_resident", "Models held in memory by live worker processes.",
    ["family", "model"], multiprocess_mode="livesum")

#: Redis priority sub-queues Kombu makes for Celery's default priority steps (0 is the plain
#: list; 3, 6, 9 get the separator and the step appended).
_REDIS_PRIORITY_STEPS = (0, 3, 6, 9)
_REDIS_PRIORITY_SEPARATOR = "\x06\x16"
QUEUE_DEPTH_TIMEOUT_SECONDS = 2.0


def broker_kind(settings: Settings) -> str:
    url = settings.resolved_broker_url
    if settings.embedded_broker:
        return "embedded"
    if url.startswith(("redis://", "rediss://")):
        return "redis"
    if url.startswith(("amqp://", "amqps://", "pyamqp://")):
        return "rabbitmq"
    return url.split(":", 1)[0]


def queue_depths(settings: Settings) -> dict[str, int]:
    """Messages waiting in each job queue, asked of the broker itself.

    Redis: the lengths of the queue's lists (Kombu keeps one per priority step). RabbitMQ: the
    ``message_count`` of a passive queue declare (ready messages, not those a worker holds).
    The embedded SQLite transport: its rows for the queue, those a worker holds included.
    Raises whatever the broker client raises when it cannot be reached.
    """
    from core.queue import QUEUE_FOR_KIND

    queues = list(QUEUE_FOR_KIND.values())
    url = settings.resolved_broker_url
    kind = broker_kind(settings)
    if kind == "embedded":
        import sqlite3

        from core import _sqlite_broker

        path = _sqlite_broker.path_from_url(url)
        if not path.exists():
            return dict.fromkeys(queues, 0)
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                             timeout=QUEUE_DEPTH_TIMEOUT_SECONDS)
        try:
            return {q: int(db.execute("SELECT COUNT(*) FROM messages WHERE queue = ?",
                                      (q,)).fetchone()[0]) for q in queues}
        except sqlite3.OperationalError:  # the transport has not made its tables yet
            return dict.fromkeys(queues, 0)
        finally:
            db.close()
    if kind == "redis":
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=QUEUE_DEPTH_TIMEOUT_SECONDS,
                                      socket_timeout=QUEUE_DEPTH_TIMEOUT_SECONDS)
        try:
            prefix = settings.broker_key_prefix
            with client.pipeline(transaction=False) as pipe:
                for q in queues:
                    for step in _REDIS_PRIORITY_STEPS:
                        pipe.llen(prefix + (q if not step else
                                            f"{q}{_REDIS_PRIORITY_SEPARATOR}{step}"))
                lengths = pipe.execute()
        finally:
            client.close()
        per = len(_REDIS_PRIORITY_STEPS)
        return {q: int(sum(lengths[i * per:(i + 1) * per])) for i, q in enumerate(queues)}
    from kombu.connection import Connection

    depths: dict[str, int] = {}
    with Connection(url, connect_timeout=QUEUE_DEPTH_TIMEOUT_SECONDS) as conn:  # type: ignore[no-untyped-call]
        channel = conn.channel()
        for q in queues:
            try:
                depths[q] = int(channel.queue_declare(q, passive=True).message_count)
            except Exception:  # not declared yet: no worker ever started on it
                channel = conn.channel()
                depths[q] = 0
    return depths


class QueueDepthCollector(Collector):
    """``musespark_queue_depth`` read from the broker at each scrape (a broker that cannot be
    reached shows as ``musespark_queue_depth_up 0``, not as a failed scrape)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.broker = broker_kind(settings)

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("musespark_queue_depth", "Messages waiting in a job queue.",
                                  labels=["queue", "broker"])
        up = GaugeMetricFamily("musespark_queue_depth_up",
                               "1 when the broker answered the last queue-depth read.")
        try:
            depths = queue_depths(self.settings)
        except Exception as exc:
            log.warning("queue depth: broker unreachable: %s", exc)
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
            for queue, count in depths.items():
                depth.add_metric([queue, self.broker], count)
        yield depth
        yield up


class JobsCollector(Collector):
    """Jobs from the store at each scrape: ``musespark_oldest_waiting_job_seconds`` (the queued
    job that has waited longest; 0 when none waits) and ``musespark_jobs{state}`` (jobs created
    or changed in the last hour, by state)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        from core.status import RECENT_WINDOW, jobs_by_state, oldest_waiting
        from core.store import utcnow

        oldest = GaugeMetricFamily("musespark_oldest_waiting_job_seconds",
                                   "How long the queued job that has waited longest has waited.")
        states = GaugeMetricFamily("musespark_jobs",
                                   "Jobs created or changed in the last hour, by state.",
                                   labels=["state"])
        try:
            waiting = oldest_waiting(self.store)
            counts = jobs_by_state(self.store, utcnow() - RECENT_WINDOW)
        except Exception as exc:
            log.warning("job gauges: store unreachable: %s", exc)
            return
        oldest.add_metric([], waiting["waiting_seconds"] if waiting else 0.0)
        for state, count in counts.items():
            states.add_metric([state], count)
        yield oldest
        yield states


def serve_bot_metrics(settings: Settings, store: Store) -> Any:
    """Serve ``/metrics`` for the bot process on ``settings.metrics_port`` (None when unset):
    this process's metrics, the queue depth and the job gauges. Returns the server
    (``shutdown()`` stops it)."""
    if not settings.metrics_port:
        return None
    registry = CollectorRegistry()
    registry.register(REGISTRY)  # a registry is a collector too
    registry.register(QueueDepthCollector(settings))
    registry.register(JobsCollector(store))
    return _start(settings, registry, "metrics")


def serve_worker_metrics(settings: Settings) -> Any:
    """Serve the pool's metrics, merged from the multiprocess directory (None when unset)."""
    if not settings.metrics_port:
        return None
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return _start(settings, registry, "worker metrics")


def _start(settings: Settings, registry: CollectorRegistry, what: str) -> Any:
    """The HTTP server, or None (logged, not raised) when the port is taken: a process that
    cannot show its metrics still does its work."""
    assert settings.metrics_port is not None
    try:
        server, _thread = start_http_server(settings.metrics_port, addr=settings.metrics_addr,
                                            registry=registry)
    except OSError as exc:
        log.error("%s NOT served: cannot listen on %s:%d (%s); set MUSESPARK_METRICS_PORT to "
                  "a free port", what, settings.metrics_addr, settings.metrics_port, exc)
        return None
    log.info("%s on http://%s:%d/metrics", what, settings.metrics_addr, settings.metrics_port)
    return server


def mark_process_dead(pid: int) -> None:
    """Drop a dead pool process's live gauges (its resident models)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def model_loaded(family: str, model: str, seconds: float) -> None:
    """A worker process loaded a model (``family``: text or image) and keeps it."""
    MODEL_LOAD.labels(family, model).observe(seconds)
    MODELS_RESIDENT.labels(family, model).inc()


def rate_limited(platform: str, retry_after: float) -> None:
    """A platform answered 429 and asked to wait ``retry_after`` seconds."""
    RATE_LIMITED.labels(platform).inc()
    RETRY_WAIT.labels(platform).observe(retry_after)
