"""Publishing jobs to Celery, and the Celery configuration shared by publisher and workers.

Only the job id travels in a task; everything else is read from the store by the worker. Core
publishes by task *name* (``send_task``) so it never imports ``workers``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Protocol

from celery import Celery
from kombu.entity import Queue
from kombu.utils.uuid import uuid

from core.errors import QueueUnavailableError
from core.settings import Settings

__all__ = [
    "BrokerProbe",
    "CeleryPublisher",
    "JobPublisher",
    "QUEUE_FOR_KIND",
    "RecordingPublisher",
    "TASK_FOR_KIND",
    "celery_config",
    "job_time_limits",
    "make_celery",
    "publishing_batch",
]

log = logging.getLogger(__name__)

QUEUE_FOR_KIND = {"text": "gpu.text", "image": "gpu.image"}
TASK_FOR_KIND = {"text": "musespark.run_text_job", "image": "musespark.run_image_job"}

#: Seconds a job may always take, before its size is counted (model load, first conversion).
BASE_TIME_LIMIT_SECONDS = 180.0
#: A pessimistic CPU rate, so that a slow machine is not cut off mid-answer.
SLOWEST_TOKENS_PER_SECOND = 4.0
SLOWEST_SECONDS_PER_IMAGE_STEP = 6.0
SOFT_LIMIT_MARGIN_SECONDS = 15.0


def job_time_limits(kind: str, params: dict[str, Any], *,
                    image_batch: int = 1) -> tuple[float, float]:
    """``(soft, hard)`` time limits in seconds from the job's size.

    A picture task may render up to ``image_batch`` compatible jobs in one call
    (``MUSESPARK_IMAGE_BATCH_MAX``, workers/batching.py), so its budget covers that many.
    """
    if kind == "text":
        budget = params.get("max_new_tokens", 160) / SLOWEST_TOKENS_PER_SECOND
    else:
        steps = params.get("steps") or 30
        budget = (params.get("count", 1) * steps * SLOWEST_SECONDS_PER_IMAGE_STEP
                  * max(1, image_batch))
    hard = BASE_TIME_LIMIT_SECONDS + budget
    return hard - SOFT_LIMIT_MARGIN_SECONDS, hard


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings every MuseSpark process uses (see PLATFORM-NOTES.md, Celery)."""
    broker_url = settings.resolved_broker_url
    transport_options: dict[str, Any] = {}
    config: dict[str, Any] = {
        "broker_url": broker_url,
        "task_ignore_result": True,
        "result_backend": None,
        # A job is acknowledged only when it finished; a worker that dies gives it back.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_queues": [Queue(name) for name in QUEUE_FOR_KIND.values()],  # type: ignore[no-untyped-call]
        "task_routes": {TASK_FOR_KIND[k]: {"queue": q} for k, q in QUEUE_FOR_KIND.items()},
        "task_default_queue": QUEUE_FOR_KIND["text"],
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 3.0,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
    }
    if not settings.embedded_broker:
        # Workers send task events, so Flower (``celery -A workers.celery_app flower``) sees
        # every task from received to finished. The bot sends no "task-sent" event: it would
        # be a second broker publish per job on the request path (the queue-depth metrics
        # and ``musespark status`` show what waits). The embedded transport has no fanout
        # exchange for events at all.
        config["worker_send_task_events"] = True
    if settings.embedded_broker:
        from core import _sqlite_broker

        _sqlite_broker.register()
        # The embedded transport has no fanout exchange: no remote control, mingle or gossip.
        config["worker_enable_remote_control"] = False
        transport_options["polling_interval"] = 0.05
        # Live workers renew their claims, so this only bounds how long a dead worker's
        # message stays hidden (the redriver usually re-sends the job well before).
        transport_options["visibility_timeout"] = 300
    elif broker_url.startswith(("redis://", "rediss://")):
        # Longer than any job may run (hard time limit), so a live job is not redelivered.
        transport_options["visibility_timeout"] = 3600
        if settings.broker_key_prefix:
            transport_options["global_keyprefix"] = settings.broker_key_prefix
    config["broker_transport_options"] = transport_options
    return config


def make_celery(settings: Settings, name: str = "musespark") -> Celery:
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


class JobPublisher(Protocol):
    def publish(self, job_id: str, kind: str, params: dict[str, Any], *,
                countdown: float | None = None) -> None: ...


def publishing_batch(publisher: JobPublisher) -> AbstractContextManager[None]:
    """What ``publisher`` offers to send many jobs at once (:meth:`CeleryPublisher.batch`);
    nothing special for a publisher without it."""
    batch = getattr(publisher, "batch", None)
    return batch() if batch is not None else nullcontext()


#: How long publishing keeps trying before the job is left for the redriver.
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2,
                        "interval_max": 0.3}
#: Broker commands a publish batch buffers before sending them early: more than a group
#: commit makes (64 requests of up to 4 takes), so a group's jobs go in one round trip.
BATCH_MAX_COMMANDS = 1024


class CeleryPublisher:
    """Sends ``run_*_job(job_id)`` tasks; raises :class:`QueueUnavailableError` if it can't."""

    def __init__(self, settings: Settings) -> None:
        self.app = make_celery(settings, name="musespark-publisher")
        self.image_batch = settings.image_batch_max
        #: Times a publish succeeded after one failed: the broker came back from an outage
        #: (the redriver's sign of a possible loss where the broker cannot tell who it is).
        self.recoveries = 0
        self._failing = False
        self._held = threading.local()  # this thread's producer inside :meth:`batch`

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Publishes inside (on this thread) go out together: on one producer and its broker
        connection, as kombu's publish batch (``Producer.batch``). On Redis that is one
        pipeline, sent when the block ends: one round trip for a group commit's jobs, and no
        Redis client made per message. A transport without batches (the embedded one) sends
        each at once, on the held producer.

        Raises:
            QueueUnavailableError: at the end, if the batch could not be sent. Which of its
                messages arrived is then unknown; publishing them again is harmless (a
                worker's claim is fenced, so a job runs once), and is what the caller does.
        """
        if getattr(self._held, "producer", None) is not None:
            yield
            return
        sent = False
        try:
            with ExitStack() as held:
                try:
                    producer = held.enter_context(self.app.producer_or_acquire())
                    held.enter_context(producer.batch(max_size=BATCH_MAX_COMMANDS))
                    self._held.producer, self._held.declared = producer, set()
                except Exception as exc:  # kombu raises several connection error types
                    log.info("no producer for a batch (%s: %s): jobs are sent one by one",
                             type(exc).__name__, exc)
                try:
                    yield
                finally:
                    batched, self._held.producer = self._held.producer, None
                sent = True  # the body is done: what the exit raises is the batch's own
        except Exception as exc:
            if not sent:
                raise
            self._failing = True
            log.warning("a batch of jobs could not be published: %s: %s",
                        type(exc).__name__, exc)
            raise QueueUnavailableError(f"broker unreachable: {exc}") from exc
        if batched is not None:
            self._published()

    def publish(self, job_id: str, kind: str, params: dict[str, Any], *,
                countdown: float | None = None) -> None:
        """Send the job's task; inside :meth:`batch`, with the batch.

        The message is Celery's (task protocol 2, made by ``app.amqp.create_task_message``)
        and goes out through ``app.amqp.send_task_message``, the two steps ``send_task`` is
        made of, without the rest of ``send_task``'s per-call work (routing its options, a
        result object, an argument repr): under a burst that was a third of a publish's CPU.
        Inside a batch, each queue is declared once (kombu's ``maybe_declare`` copies the queue
        for each message it checks), and a message is not wrapped for retries: it is only
        buffered until the batch ends.
        """
        soft, hard = job_time_limits(kind, params, image_batch=self.image_batch)
        producer = getattr(self._held, "producer", None)
        name, queue = TASK_FOR_KIND[kind], QUEUE_FOR_KIND[kind]
        try:
            amqp = self.app.amqp
            task_id = uuid()
            parent = self.app.current_worker_task  # a job a worker's task publishes: lineage
            message = amqp.create_task_message(
                task_id, name, [job_id], {}, countdown, time_limit=hard, soft_time_limit=soft,
                root_id=parent and (parent.request.root_id or parent.request.id),
                parent_id=parent and parent.request.id, argsrepr=f"[{job_id!r}]",
                kwargsrepr="{}", create_sent_event=False)
            if producer is None:
                with self.app.producer_or_acquire() as acquired:
                    amqp.send_task_message(acquired, name, message, queue=queue, retry=True,
                                           retry_policy=PUBLISH_RETRY_POLICY)
            else:
                # Buffered, not sent: nothing to retry until the batch ends (and if that
                # fails, each job is published again alone, with retries).
                declared: set[str] = self._held.declared
                amqp.send_task_message(producer, name, message, queue=queue, retry=False,
                                       declare=[] if queue in declared else None)
                declared.add(queue)
        except Exception as exc:  # kombu raises several connection error types per transport
            self._failing = True
            log.warning("could not publish job %s: %s: %s", job_id, type(exc).__name__, exc)
            raise QueueUnavailableError(f"broker unreachable: {exc}") from exc
        if producer is None:  # a batch has been sent only when it ends
            self._published()

    def _published(self) -> None:
        """A publish reached the broker: after a failure, that is a recovery."""
        if self._failing:
            self._failing = False
            self.recoveries += 1

    def close(self) -> None:
        self.app.close()


#: How long the broker probe waits for the broker, in seconds (it runs in the redriver's thread).
PROBE_TIMEOUT_SECONDS = 1.0
#: The embedded broker's identity while its file does not exist (nothing is held).
BROKER_FILE_MISSING = "file:missing"


class BrokerProbe:
    """Who the broker is now, so the redriver notices a restart that lost queued messages.

    :meth:`identity` changes when the broker was restarted or replaced:

    * Redis: the server's ``run_id`` (``INFO server``), new at every start of the server. A
      Redis without persistence comes back empty, so what it held is gone.
    * The embedded SQLite transport: the broker file's device and inode (a file deleted or
      replaced lost its messages; :data:`BROKER_FILE_MISSING` while there is none).
    * Other brokers (RabbitMQ): None, they have no such id; an outage shows as failed publishes
      (:attr:`CeleryPublisher.recoveries`). RabbitMQ's durable queues keep Celery's persistent
      messages over a restart anyway.

    Raises :class:`QueueUnavailableError` when the broker cannot be reached. Waits at most
    about :data:`PROBE_TIMEOUT_SECONDS` (twice, when a pooled connection died with its server).
    """

    def __init__(self, settings: Settings) -> None:
        self.url = settings.resolved_broker_url
        self._file: Path | None = None
        self._redis: Any = None
        if settings.embedded_broker:
            from core import _sqlite_broker

            self._file = _sqlite_broker.path_from_url(self.url)
        elif self.url.startswith(("redis://", "rediss://")):
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            # One retry: the first command after a server restart fails on the dead pooled
            # connection and the retry reconnects, so a restart reads as a new run_id.
            self._redis = redis.Redis.from_url(
                self.url, socket_connect_timeout=PROBE_TIMEOUT_SECONDS,
                socket_timeout=PROBE_TIMEOUT_SECONDS, retry=Retry(NoBackoff(), 1))
            # kombu's keys for messages taken and not yet acknowledged (its Redis transport).
            prefix = settings.broker_key_prefix or ""
            self._unacked, self._unacked_index = f"{prefix}unacked", f"{prefix}unacked_index"

    def identity(self) -> str | None:
        if self._file is not None:
            try:
                found = os.stat(self._file)
            except FileNotFoundError:
                return BROKER_FILE_MISSING
            except OSError as exc:
                raise QueueUnavailableError(f"broker file {self._file}: {exc}") from exc
            return f"file:{found.st_dev}:{found.st_ino}"
        if self._redis is not None:
            import redis

            try:
                info = self._redis.info("server")
            except redis.ResponseError as exc:  # INFO disabled (some hosted Redis): no identity
                log.warning("the broker does not answer INFO (%s); a restart that loses "
                            "messages is noticed only through failed publishes", exc)
                self._redis.close()
                self._redis = None
                return None
            except (redis.RedisError, OSError) as exc:
                raise QueueUnavailableError(f"broker unreachable: {exc}") from exc
            return f"redis:{info['run_id']}"
        return None

    # -- messages a dead consumer took ------------------------------------------------------

    def stranded(self, older_than: float, limit: int = 100) -> list[tuple[str, str, float]]:
        """Messages a consumer took from a MuseSpark queue at least ``older_than`` seconds ago
        and neither acknowledged nor gave back: ``(delivery tag, job id, when it was taken as a
        Unix time)``, oldest first.

        On Redis such a message is hidden in kombu's ``unacked`` hash until the visibility
        timeout (an hour) ends; the caller decides from the job's state whether its consumer
        died before starting it (see ``core/redrive.py``). Other brokers: none (RabbitMQ gives
        a dead consumer's messages back at once; the embedded transport after five minutes).
        """
        if self._redis is None:
            return []
        import redis

        try:
            taken = self._redis.zrangebyscore(self._unacked_index, "-inf",
                                              time.time() - older_than, start=0, num=limit,
                                              withscores=True)
            held = self._redis.hmget(self._unacked, [tag for tag, _ in taken]) if taken else []
        except (redis.RedisError, OSError) as exc:
            raise QueueUnavailableError(f"broker unreachable: {exc}") from exc
        found = []
        for (tag, at), raw in zip(taken, held):
            job_id = _job_id_in(raw)
            if job_id is not None:
                found.append((tag.decode() if isinstance(tag, bytes) else str(tag), job_id,
                              float(at)))
        return found

    def forget(self, tag: str) -> None:
        """Drop a stranded message (its job was sent again): no one acknowledges it now, and
        the broker would bring it back after its visibility timeout only to be skipped."""
        if self._redis is None:
            return
        import redis

        try:
            self._redis.pipeline().zrem(self._unacked_index, tag).hdel(self._unacked, tag) \
                .execute()
        except (redis.RedisError, OSError) as exc:
            raise QueueUnavailableError(f"broker unreachable: {exc}") from exc

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()


def _job_id_in(raw: bytes | None) -> str | None:
    """The job id a kombu ``unacked`` entry (``[payload, exchange, routing key]``) carries,
    for MuseSpark's tasks only (Celery protocol 2: ``[args, kwargs, embed]``)."""
    if not raw:
        return None
    try:
        payload = json.loads(raw)[0]
        if payload.get("headers", {}).get("task") not in TASK_FOR_KIND.values():
            return None
        body = payload["body"]
        if payload.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]) if args else None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


class RecordingPublisher:
    """A publisher that records what it would send (simulations and unit tests of the core).

    Like httpx's ``MockTransport``: the real orchestrator and store run; only the broker is
    replaced. Set ``fail`` to simulate an unreachable broker.
    """

    def __init__(self) -> None:
        self.published: list[tuple[str, str, float | None]] = []
        self.fail = False

    def publish(self, job_id: str, kind: str, params: dict[str, Any], *,
                countdown: float | None = None) -> None:
        if self.fail:
            raise QueueUnavailableError("recording publisher told to fail")
        self.published.append((job_id, kind, countdown))
