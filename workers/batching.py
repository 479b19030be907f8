"""Micro-batching of picture jobs: one pipeline call for several compatible requests.

A GPU that renders one few-step picture at a time waits on Python and the queue most of the
time. When a worker takes a picture job, it also takes up to ``MUSESPARK_IMAGE_BATCH_MAX - 1``
more picture jobs that are queued already or arrive within ``MUSESPARK_IMAGE_BATCH_WAIT_MS``,
and renders those that ask for the same model, size, steps and guidance in one call, each
picture from its own seeded generator (so it is the picture its seed gives alone:
:meth:`~workers.pipelines.image_diffusion.DiffusionGenerator.generate_many`).

How the extra messages are taken, and why they stay safe (late acks):

* The worker's Celery consumer keeps ``prefetch 1`` and ``acks_late``; it delivers the first
  job as usual. The task then reads more messages from the ``gpu.image`` queue itself, with
  kombu's ``basic_get(no_ack=False)`` on its own connection (the broker's own mechanism: Redis
  keeps them in its ``unacked`` hash, the embedded SQLite transport claims their rows with a
  lease). They are acknowledged only after their job is finished (delivered, failed, or found
  not to be ours). Each job pulled to join the batch is claimed at once, with a heartbeat
  until the batch renders: a worker killed mid-batch acknowledges none of the messages (the
  broker gives them back only after its ``visibility_timeout``, an hour on Redis), but its
  jobs are ``running`` with a stale heartbeat, so the bot's redriver re-publishes them within
  ``MUSESPARK_JOB_STALE_AFTER_SECONDS``. A job pulled to run alone after the batch is claimed
  when it starts (a crash while it waited is none of its attempts); should the worker die
  first, the redriver finds its message stranded in the broker and re-sends the job. The
  store's claims, fenced on the attempt number, make sure that each job is posted once however
  many messages name it.
* Why not celery-batches: its ``Batches`` task acknowledges late messages after the batch
  returns (``flush`` -> ``on_return``), but it buffers in the consumer, so it needs a prefetch
  window of at least the batch size for the whole worker: every worker would then hold (and
  hide from idle workers) that many text jobs too, and a batch's time limit is one task's.
* The batch runs under the first job's time limit (one task; picture tasks are published with
  a budget for ``MUSESPARK_IMAGE_BATCH_MAX`` pictures' worth), so a job joins only while the
  batch's estimated time (1.5 times what the model's measured cost per picture and step predicts:
  :meth:`~workers.pipelines.image_diffusion.DiffusionGenerator.predict_seconds`) still fits.
* A message that does not join (image to image, another size, a countdown not due, no time
  left) is handled so that nothing is reordered or starved: one that is due and fits the time
  runs on its own right after the batch; otherwise it is given back at once. Pulling stops at
  the first such message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from core.queue import (
    BASE_TIME_LIMIT_SECONDS,
    QUEUE_FOR_KIND,
    SLOWEST_SECONDS_PER_IMAGE_STEP,
    SLOWEST_TOKENS_PER_SECOND,
    SOFT_LIMIT_MARGIN_SECONDS,
    TASK_FOR_KIND,
    job_time_limits,
)
from core.settings import Settings
from core.store import Claim, Job, Store
from workers import shutdown
from workers.observe import job_done, job_taken
from workers.runner import (
    PictureAsk,
    _hand_back,
    _release_next,
    _Heartbeat,
    _image_generator,
    announce,
    claim_job,
    execute_job,
    finish_generated,
    generation_failed,
    TEXT_REPETITION_PENALTY,
    TEXT_TEMPERATURE,
    picture_ask,
    picture_outcome,
    run_claimed,
    text_generator,
    text_outcome,
    text_request,
)

__all__ = ["batchable", "run_image_batch", "run_image_task", "run_text_batch", "run_text_task",
           "text_batchable"]

log = logging.getLogger(__name__)

#: How often an empty queue is polled again while the batch window is open.
PULL_POLL_SECONDS = 0.005

_process: dict[str, Any] = {}


def batchable(job: Job) -> bool:
    """Whether ``job`` is a plain text-to-image render that may share a pipeline call.

    A job whose worker died under it before runs alone from then on (:func:`_crashed`).
    """
    params = job.params
    return (job.kind == "image" and job.outbox is None and job.intent not in NOT_RENDERED
            and not (params.get("refine") or params.get("remix") or params.get("vary_from")))


def _crashed(job: Job, claim: Claim | None = None) -> bool:
    """Whether a worker died under ``job`` before (an attempt used up: read from ``claim``
    once it is claimed, which counts one more). Such a job runs alone from then on: were it
    what kills workers (out of memory), it must not take a batch down with it, and were it
    not, another job's crash must not use up its attempts again and again."""
    return (claim.attempt > 1) if claim is not None else job.attempts > 0


#: Jobs on the picture queue that are not one text-to-image render: a story (its scenes are
#: jobs of their own), a /verify check, and the text model's readings.
NOT_RENDERED = frozenset({"story", "verify", "understand", "brainstorm"})


@dataclass(slots=True)
class _Pulled:
    job_id: str
    message: Any
    #: "batch": renders with the first job (claimed when pulled); "alone": runs by itself
    #: after the batch (claimed when it starts); "duplicate": another message for a job
    #: already in the batch.
    role: str
    #: A batch member is claimed the moment it is pulled, and its heartbeat runs until the
    #: batch renders: a worker killed in between leaves it ``running`` with a stale heartbeat,
    #: which the redriver re-sends within ``MUSESPARK_JOB_STALE_AFTER_SECONDS``. A job pulled
    #: to run alone is not claimed until its turn; a pulled message whose worker died before
    #: claiming it is found stranded by the redriver (a pulled message itself stays hidden in
    #: the broker until its visibility timeout, an hour on Redis).
    claim: Claim | None = None
    beat: _Heartbeat | None = None
    #: The job as it was in the queue, and when it was taken (for its metrics).
    job: Job | None = None
    taken_at: float = 0.0

    def stop_beating(self) -> None:
        if self.beat is not None:
            self.beat.__exit__(None, None, None)
            self.beat = None


def _claimed(job: Job, message: Any, role: str, store: Store,
             settings: Settings) -> _Pulled | None:
    """The pulled message's job claimed for this worker, its heartbeat started; None (the
    message acknowledged) when the job is not ours to run (done, or held by a live worker)."""
    claim = claim_job(store, job.id, settings)
    if claim is None:
        message.ack()
        return None
    job_taken(job, settings)
    beat = _Heartbeat(store, claim, settings.job_heartbeat_seconds).__enter__()
    return _Pulled(job.id, message, role, claim, beat, job, time.monotonic())


def _queue(kind: str = "image") -> Any:
    """This process's own consumer channel on ``kind``'s queue (made after the fork)."""
    if _process.get("pid") != os.getpid():
        _process.clear()
        _process["pid"] = os.getpid()
    if kind not in _process:
        from kombu.entity import Queue

        from workers.celery_app import app

        connection = _process.get("connection") or app.connection_for_read()
        queue = Queue(QUEUE_FOR_KIND[kind])  # type: ignore[no-untyped-call]
        _process["connection"] = connection
        _process[kind] = queue.bind(connection.default_channel)  # type: ignore[no-untyped-call]
    return _process[kind]


#: A batch is estimated at this many times the slowest rate the model has shown.
BATCH_TIME_SAFETY = 1.5


def _estimate(generator: Any, asks: list[PictureAsk]) -> float:
    """Seconds a batch of ``asks`` may take: the model's measured cost of a call (or, before
    its warm-up, the pessimistic rate the time limits assume), with a safety factor."""
    pictures, steps = sum(ask.count for ask in asks), asks[0].steps
    predicted = generator.predict_seconds(pictures, steps, asks[0].width, asks[0].height)
    if predicted is None:
        predicted = SLOWEST_SECONDS_PER_IMAGE_STEP * steps * pictures
    return float(BATCH_TIME_SAFETY * predicted)


def _pull(first: Job, first_ask: PictureAsk, generator: Any, store: Store, settings: Settings,
          started: float) -> list[_Pulled]:
    """Take up to ``image_batch_max - 1`` more picture messages (see the module docstring).

    A job joins only while the batch's estimated time fits the first job's time limit (the
    task's), less what has passed since the task started.
    """
    queue = _queue("image")
    key = first_ask.batch_key(generator.model_name)
    allowed = job_time_limits(first.kind, first.params,
                              image_batch=settings.image_batch_max)[0] - SOFT_LIMIT_MARGIN_SECONDS
    asks = [first_ask]
    deadline = time.monotonic() + settings.image_batch_wait_ms / 1000
    pulled: list[_Pulled] = []
    while len(asks) < settings.image_batch_max and not shutdown.stopping():
        message = queue.get(no_ack=False, accept={"json"})
        if message is None:
            if time.monotonic() >= deadline:
                break
            time.sleep(PULL_POLL_SECONDS)
            continue
        job = _job_of(message, store)
        if job is None:
            message.ack()  # nothing to run (another task, or a job erased with /forget)
            continue
        if job is not _NOT_DUE and job.id in {first.id, *(p.job_id for p in pulled)}:
            # A second message for a job this batch holds (a re-drive): acknowledged with it.
            pulled.append(_Pulled(job.id, message, "duplicate"))
            continue
        ask = picture_ask(job, settings, generator) if (
            job is not _NOT_DUE and batchable(job) and not _crashed(job)) else None
        if ask is not None and ask.batch_key(generator.model_name) == key:
            elapsed = time.monotonic() - started
            estimate = _estimate(generator, [*asks, ask])
            if estimate + elapsed <= allowed:
                if (taken := _claimed(job, message, "batch", store, settings)) is not None:
                    asks.append(ask)
                    pulled.append(taken)
                continue
            log.info("job %s does not join the batch: it would take about %.0f s, and %.0f s "
                     "of the time limit are left", job.id, estimate, allowed - elapsed)
        elif job is not _NOT_DUE and (
                _estimate(generator, asks) + time.monotonic() - started
                + job_time_limits(job.kind, job.params)[1] - BASE_TIME_LIMIT_SECONDS
                <= allowed):
            pulled.append(_next_alone(job, message))
            break
        message.reject(requeue=True)
        break
    return pulled


def _next_alone(job: Job, message: Any) -> _Pulled:
    """A pulled job that runs next, in its place, on its own (a redriven message would go to
    the back of the queue). It is claimed when its turn comes, not now: were the worker killed
    while it waits, none of its attempts is used up by a crash it took no part in, and the
    redriver re-sends its stranded message (core/redrive.py)."""
    return _Pulled(job.id, message, "alone", job=job, taken_at=time.monotonic())


def _run_alone(item: _Pulled, store: Store, settings: Settings) -> str:
    """Claim and run a job pulled to run after the batch (see :func:`_next_alone`)."""
    claim = claim_job(store, item.job_id, settings)
    if claim is None:
        return "skipped"
    job_taken(item.job, settings)
    item.taken_at = time.monotonic()
    return run_claimed(store, claim, settings)


_NOT_DUE: Any = object()


def _job_of(message: Any, store: Store, kind: str = "image") -> Job | None:
    """The job a pulled message runs; ``_NOT_DUE`` for a countdown message not due yet."""
    headers = message.headers or {}
    if headers.get("task") != TASK_FOR_KIND[kind]:
        log.warning("unexpected message %r on the %s queue; dropping it",
                    headers.get("task"), kind)
        return None
    eta = headers.get("eta")
    if eta:
        from datetime import datetime, timezone

        due = datetime.fromisoformat(eta)
        if due.tzinfo is None:
            due = due.replace(tzinfo=timezone.utc)
        if due > datetime.now(timezone.utc):
            return _NOT_DUE  # type: ignore[no-any-return]
    args = message.decode()[0]
    job = store.get_job(str(args[0]))
    if job is None:
        log.info("pulled job %s no longer exists; dropping its message", args[0])
    return job


def run_image_task(job_id: str, *, store: Store, settings: Settings) -> str:
    """What a picture task runs: its job, plus compatible queued jobs in one pipeline call."""
    started = time.monotonic()
    job = store.get_job(job_id)
    if settings.image_batch_max <= 1 or job is None or not batchable(job) or _crashed(job):
        return execute_job(job_id, store=store, settings=settings)
    try:
        generator = _image_generator(settings)
        if generator.predict_seconds(1, 1) is None:
            generator.warm_up()  # measures the cost that sizes batches (see _estimate)
            log.info("%s warmed up: a picture costs %.3f s plus %.4f s per step",
                     generator.model_name, generator.seconds_per_picture,
                     generator.seconds_per_picture_step)
    except Exception:  # the job itself reports a model that does not load
        return execute_job(job_id, store=store, settings=settings)
    ask = picture_ask(job, settings, generator)
    if ask.batch_key(generator.model_name) is None:
        return execute_job(job_id, store=store, settings=settings)
    # The first job is claimed before any other is pulled (so it also starts first).
    first = claim_job(store, job_id, settings)
    if first is None:
        return "skipped"
    if first.exhausted:
        return run_claimed(store, first, settings)
    try:
        pulled = _pull(job, ask, generator, store, settings, started)
    except Exception:  # a broker blip: the job itself still runs
        log.exception("could not read more picture jobs; rendering job %s alone", job_id)
        pulled = []
    if pulled:
        log.info("job %s: took %d more picture message(s) from the queue (%d job(s) to render "
                 "with it)", job_id, len(pulled), sum(p.role == "batch" for p in pulled))
    def render(batch: list[_Pulled]) -> dict[str, str]:
        return run_image_batch([job_id, *(p.job_id for p in batch)], store=store,
                               settings=settings,
                               claims={job_id: first,
                                       **{p.job_id: p.claim for p in batch if p.claim}})

    return _run_pulled(job_id, pulled, render, store, settings)


def _run_pulled(job_id: str, pulled: list[_Pulled],
                together: Callable[[list[_Pulled]], dict[str, str]], store: Store,
                settings: Settings) -> str:
    """Run the first job with the ``batch`` jobs pulled for it (``together``), then those
    pulled to run alone after it; acknowledge each message once its job is finished (give it
    back otherwise), and record each pulled job's metrics and fair-share release."""
    finished: set[str] = set()
    outcomes: dict[str, str] = {}
    try:
        batch = [p for p in pulled if p.role == "batch"]
        for item in batch:
            item.stop_beating()  # the batch keeps the heartbeats of its members
        outcomes = together(batch)
        for alone in (p for p in pulled if p.role == "alone"):
            # A stopping worker starts nothing more: its message goes back (below).
            outcomes[alone.job_id] = ("returned" if shutdown.stopping()
                                      else _run_alone(alone, store, settings))
        finished.update(j for j, outcome in outcomes.items() if outcome != "returned")
        finished.update(p.job_id for p in pulled if p.role == "duplicate"
                        and p.job_id in finished)
        for item in pulled:  # the first job's metrics are its task's (workers/tasks.py)
            if item.role != "duplicate" and item.job_id in outcomes:
                job_done(store, settings, item.job, outcomes[item.job_id],
                         time.monotonic() - item.taken_at)
        if settings.fair_share_inflight:  # a job done makes room for its person's next one
            for done_id, outcome in outcomes.items():
                if outcome in ("delivered", "failed"):
                    _release_next(store, done_id, settings)
    finally:
        for item in pulled:
            item.stop_beating()
            # Acknowledged once its job is finished; otherwise (an error escaped, or the worker
            # is stopping) given back.
            with contextlib.suppress(Exception):
                if item.job_id in finished:
                    item.message.ack()
                else:
                    item.message.reject(requeue=True)
    return outcomes.get(job_id, "skipped")


def _return_unstarted(store: Store, claim: Claim) -> str:
    """The worker began to stop before this pulled job started: un-claim it (its attempt back,
    queued again); its message goes back to the queue for another worker."""
    log.info("stopping: job %s goes back to the queue unstarted", claim.job_id)
    store.defer(claim, 0)
    return "returned"


def _members(job_ids: list[str], claims: dict[str, Claim], joins: Callable[[Job], bool],
             store: Store, settings: Settings) -> tuple[list[tuple[Claim, Job]], dict[str, str]]:
    """The claimed jobs of a batch that share its call, and what became of the others.

    Each job is claimed unless ``claims`` holds its claim. Jobs that are not ours (done, held
    by a live worker) are skipped; those that exhausted their attempts, crashed a worker
    before, or do not ``join`` (e.g. only their kept outbox to post) go their usual way now.
    Should the worker begin to stop, every job but the first goes back to the queue unstarted
    (a stopping worker takes no new job).
    """
    outcomes: dict[str, str] = {}
    members: list[tuple[Claim, Job]] = []
    for index, job_id in enumerate(job_ids):
        if index and shutdown.stopping():
            given = claims.get(job_id)
            outcomes[job_id] = "returned"
            if given is not None:
                _return_unstarted(store, given)
            continue
        claim = claims.get(job_id) or claim_job(store, job_id, settings)
        if claim is None:
            outcomes[job_id] = "skipped"
            continue
        job = store.get_job(job_id)
        if job is None or claim.exhausted or not joins(job) or _crashed(job, claim):
            outcomes[job_id] = run_claimed(store, claim, settings)
            continue
        members.append((claim, job))
    return members, outcomes


def run_image_batch(job_ids: list[str], *, store: Store, settings: Settings,
                    claims: dict[str, Claim] | None = None) -> dict[str, str]:
    """Claim (unless ``claims`` holds the claim already), render in one pipeline call, save and
    deliver these picture jobs.

    Jobs that are not ours (done, held by a live worker), that exhausted their attempts or only
    need their kept outbox posted go their usual way. Should the worker begin to stop before
    the batch renders, every job but the first goes back to the queue unstarted (a stopping
    worker takes no new job). Returns what happened to each job.
    """
    members, outcomes = _members(job_ids, claims or {}, batchable, store, settings)
    if not members:
        return outcomes
    started = time.monotonic()
    generator = _image_generator(settings)
    asks: list[PictureAsk] = []
    for claim, job in members:
        announce(job, claim, settings)
        asks.append(picture_ask(job, settings, generator))
    with contextlib.ExitStack() as stack:
        beats = {job.id: stack.enter_context(_Heartbeat(store, claim,
                                                         settings.job_heartbeat_seconds))
                 for claim, job in members}
        first = asks[0]
        try:
            with shutdown.interruptible():
                results = generator.generate_many(
                    [(ask.expanded, ask.count, ask.seed) for ask in asks], steps=first.steps,
                    guidance=first.guidance, width=first.width, height=first.height)
        except shutdown.HandBack:  # the worker is stopping: every job of the batch goes back
            for claim, job in members:
                outcomes[job.id] = _hand_back(store, claim, job, settings)
            return outcomes
        except Exception as exc:
            if len(members) == 1 or isinstance(exc, SoftTimeLimitExceeded):
                results = [exc] * len(members)
            else:  # one bad request must not fail the others: each renders alone
                log.warning("batch of %d pictures failed (%s: %s); rendering each alone",
                            len(members), type(exc).__name__, exc)
                results = [_alone(generator, ask) for ask in asks]
        if len(members) > 1:
            log.info("rendered %d jobs (%d pictures) in one call in %.2f s", len(members),
                     sum(a.count for a in asks), time.monotonic() - started)
        done: list[tuple[Claim, Job, Any]] = []
        for (claim, job), ask, result in zip(members, asks, results):
            if isinstance(result, Exception):
                beats[job.id].__exit__(None, None, None)
                outcomes[job.id] = generation_failed(store, claim, job, result, settings,
                                                     started)
                continue
            try:
                done.append((claim, job, picture_outcome(job, ask, result, settings, store)))
            except Exception as exc:
                beats[job.id].__exit__(None, None, None)
                outcomes[job.id] = generation_failed(store, claim, job, exc, settings, started)
        # Still under the heartbeats: the last job's claim must not go stale while the
        # others are being posted.
        for claim, job, outcome in done:
            beats[job.id].__exit__(None, None, None)  # delivery keeps its own heartbeat
            outcomes[job.id] = finish_generated(store, claim, job, outcome, settings, started)
    return outcomes


def _alone(generator: Any, ask: PictureAsk) -> Any:
    try:
        return generator.generate(ask.expanded, n=ask.count, seed=ask.seed, steps=ask.steps,
                                  guidance=ask.guidance, width=ask.width, height=ask.height)
    except Exception as exc:
        return exc


# -- text -------------------------------------------------------------------------------------
#
# The same scheme for the local text model: the first text job's task takes up to
# ``MUSESPARK_TEXT_BATCH_MAX - 1`` more plain replies that are queued or arrive within
# ``MUSESPARK_TEXT_BATCH_WAIT_MS`` and writes them in one left-padded ``generate`` call (the
# model steps once for all of them). A model behind ``MUSESPARK_TEXT_API_URL`` batches on its
# own server (continuous batching), so jobs for it are not batched here. One seed drives a
# batch (the first job's): a reply written in a batch is recorded with the jobs it was
# written with, and is not the one its own seed gives alone.


def text_batchable(job: Job, settings: Settings) -> bool:
    """Whether ``job`` is a plain reply of the local text model that may share a call."""
    return (job.kind == "text" and job.outbox is None and job.intent not in NOT_RENDERED
            and not settings.text_api_url)


def run_text_task(job_id: str, *, store: Store, settings: Settings) -> str:
    """What a text task runs: its job, plus plain replies queued with it in one call."""
    started = time.monotonic()
    job = store.get_job(job_id)
    if (settings.text_batch_max <= 1 or job is None or not text_batchable(job, settings)
            or _crashed(job)):
        return execute_job(job_id, store=store, settings=settings)
    first = claim_job(store, job_id, settings)
    if first is None:
        return "skipped"
    if first.exhausted:
        return run_claimed(store, first, settings)
    try:
        pulled = _pull_text(job, store, settings, started)
    except Exception:  # a broker blip: the job itself still runs
        log.exception("could not read more text jobs; writing job %s alone", job_id)
        pulled = []
    if pulled:
        log.info("job %s: took %d more text message(s) from the queue (%d job(s) to write "
                 "with it)", job_id, len(pulled), sum(p.role == "batch" for p in pulled))

    def write(batch: list[_Pulled]) -> dict[str, str]:
        return run_text_batch([job_id, *(p.job_id for p in batch)], store=store,
                              settings=settings,
                              claims={job_id: first,
                                      **{p.job_id: p.claim for p in batch if p.claim}})

    return _run_pulled(job_id, pulled, write, store, settings)


def _text_seconds(budgets: list[int]) -> float:
    """Seconds a batch writing replies of these budgets may take, at the pessimistic rate the
    time limits assume (a batch steps once per token for all its replies)."""
    return max(budgets) / SLOWEST_TOKENS_PER_SECOND


def _pull_text(first: Job, store: Store, settings: Settings, started: float) -> list[_Pulled]:
    """Take up to ``text_batch_max - 1`` more text messages (see :func:`_pull`): plain replies
    join while the batch still fits the first job's time limit; another job that is due and
    fits runs on its own right after the batch; anything else goes back, and pulling stops."""
    queue = _queue("text")
    allowed = job_time_limits(first.kind, first.params)[0] - SOFT_LIMIT_MARGIN_SECONDS
    budgets = [int(first.params["max_new_tokens"])]
    deadline = time.monotonic() + settings.text_batch_wait_ms / 1000
    pulled: list[_Pulled] = []
    while len(budgets) < settings.text_batch_max and not shutdown.stopping():
        message = queue.get(no_ack=False, accept={"json"})
        if message is None:
            if time.monotonic() >= deadline:
                break
            time.sleep(PULL_POLL_SECONDS)
            continue
        job = _job_of(message, store, "text")
        if job is None:
            message.ack()
            continue
        if job is not _NOT_DUE and job.id in {first.id, *(p.job_id for p in pulled)}:
            pulled.append(_Pulled(job.id, message, "duplicate"))
            continue
        elapsed = time.monotonic() - started
        if job is not _NOT_DUE and text_batchable(job, settings) and not _crashed(job) and (
                _text_seconds([*budgets, int(job.params["max_new_tokens"])]) + elapsed
                <= allowed):
            if (taken := _claimed(job, message, "batch", store, settings)) is not None:
                budgets.append(int(job.params["max_new_tokens"]))
                pulled.append(taken)
            continue
        if job is not _NOT_DUE and (_text_seconds(budgets) + elapsed
                                    + job_time_limits(job.kind, job.params)[1]
                                    - BASE_TIME_LIMIT_SECONDS <= allowed):
            pulled.append(_next_alone(job, message))
            break
        message.reject(requeue=True)
        break
    return pulled


def run_text_batch(job_ids: list[str], *, store: Store, settings: Settings,
                   claims: dict[str, Claim] | None = None) -> dict[str, str]:
    """Claim (unless ``claims`` holds the claim), write in one call, keep and deliver these
    text jobs; as :func:`run_image_batch` for everything that is not a plain reply."""
    members, outcomes = _members(job_ids, claims or {},
                                 lambda job: text_batchable(job, settings), store, settings)
    if len(members) == 1:  # nothing to share the call with: the job's own seed, as ever
        outcomes[members[0][1].id] = run_claimed(store, members[0][0], settings)
        return outcomes
    if not members:
        return outcomes
    started = time.monotonic()
    for claim, job in members:
        announce(job, claim, settings)
    requests = [text_request(store, job) for _, job in members]
    ids = [job.id for _, job in members]
    with contextlib.ExitStack() as stack:
        beats = {job.id: stack.enter_context(_Heartbeat(store, claim,
                                                         settings.job_heartbeat_seconds))
                 for claim, job in members}
        try:
            generator = text_generator(settings)
            with shutdown.interruptible():
                results: list[Any] = generator.generate_batch(
                    [chat for chat, _ in requests],
                    max_new_tokens=[int(job.params["max_new_tokens"]) for _, job in members],
                    seed=members[0][1].seed, temperature=TEXT_TEMPERATURE,
                    repetition_penalty=TEXT_REPETITION_PENALTY)
        except shutdown.HandBack:
            for claim, job in members:
                outcomes[job.id] = _hand_back(store, claim, job, settings)
            return outcomes
        except Exception as exc:
            log.warning("batch of %d replies failed (%s: %s); writing each alone",
                        len(members), type(exc).__name__, exc)
            results = [None] * len(members)
        log.info("wrote %d text jobs in one call in %.2f s", len(members),
                 time.monotonic() - started)
        for (claim, job), (chat, thread), result in zip(members, requests, results):
            try:
                if result is None or not result.text:  # failed, or stopped at once: alone
                    result = text_generator(settings).generate(
                        chat, max_new_tokens=int(job.params["max_new_tokens"]), seed=job.seed,
                        temperature=TEXT_TEMPERATURE,
                        repetition_penalty=TEXT_REPETITION_PENALTY)
                    outcome = text_outcome(job, result, thread)
                else:
                    outcome = text_outcome(job, result, thread, batch=ids)
            except Exception as exc:
                beats[job.id].__exit__(None, None, None)
                outcomes[job.id] = generation_failed(store, claim, job, exc, settings, started)
                continue
            beats[job.id].__exit__(None, None, None)  # delivery keeps its own heartbeat
            outcomes[job.id] = finish_generated(store, claim, job, outcome, settings, started)
    return outcomes
