"""The redriver: makes sure no accepted job is lost between the store and the queue.

A job is persisted before it is published, so a broker outage leaves it ``queued`` and
unpublished; a worker killed mid-job leaves it ``running`` with a stale heartbeat; a broker that
forgot its messages (Redis without persistence, restarted) leaves it published but never
started. The redriver publishes all three again. Publishing twice is harmless: workers claim
jobs with a guarded update, so only one of the copies runs.

A broker that lost its messages is noticed at once (:class:`BrokerWatch`): a new Redis
``run_id``, a replaced embedded broker file, or, for brokers that cannot tell who they are,
publishes failing and then succeeding again. Every queued job published before that moment is
sent again in the same round, and its person is told (:class:`DelayNotice`). A request that waits
longer than ``MUSESPARK_DELAYED_NOTICE_SECONDS`` without starting is told once too. Telling is a
callback per platform (:data:`DelayNotifier`) that the bot runtime provides; core only knows
how to write the local chat's row (:func:`local_delay_notifier`).
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from core import metrics
from core.errors import QueueUnavailableError
from core.outbound import DeliveryTarget, MessageKind
from core.queue import BROKER_FILE_MISSING, BrokerProbe, JobPublisher
from core.settings import Settings
from core.store import Job, JobState, Store, as_utc, utcnow

__all__ = [
    "BrokerWatch",
    "DelayNotice",
    "DelayNotifier",
    "DelayReason",
    "Redriver",
    "local_delay_notifier",
    "redrive_once",
    "tell_the_delayed",
]

log = logging.getLogger(__name__)

#: A queued job that was published this long ago and has not started is published again
#: (the safety net for a loss nobody noticed, e.g. a Redis flushed or evicting keys).
REPUBLISH_QUEUED_AFTER_SECONDS = 600.0
#: Jobs read per query; a round reads at most this many batches (the rest waits a round).
REDRIVE_BATCH = 100
MAX_BATCHES_PER_ROUND = 20
#: Where the last broker identity seen is kept, so a bot restarted together with its broker
#: still notices that the broker came back empty.
IDENTITY_MEMO_FILE = "broker-identity.json"


class DelayReason(enum.StrEnum):
    BROKER_LOST = "broker_lost"  # the broker restarted empty; the job was sent again
    SLOW = "slow"  # queued longer than MUSESPARK_DELAYED_NOTICE_SECONDS, not started


NOTICE_TEXT = {
    DelayReason.BROKER_LOST: "⏳ The work queue restarted; your request is back in line "
                             "(job {job}).",
    DelayReason.SLOW: "⏳ Your request is taking longer than usual; it is still in line "
                      "(job {job}).",
}


@dataclass(frozen=True, slots=True)
class DelayNotice:
    """What to tell the person who asked for ``job``: ``text`` in plain words."""

    job: Job
    reason: DelayReason
    text: str


#: Tells a person of a delay, on one platform. Called at most once per job, from the redriver's
#: thread; it should be quick (a status row, one edit of the progress message) and may raise
#: (the error is logged; the notice is not sent again).
DelayNotifier = Callable[[DelayNotice], None]


def local_delay_notifier(store: Store) -> DelayNotifier:
    """The local (console) chat's notifier: a status row in ``local_messages``."""

    def tell(notice: DelayNotice) -> None:
        target = DeliveryTarget.from_dict(notice.job.delivery)
        reply_to = (int(target.reply_to) if target.reply_to and target.reply_to.isdigit()
                    else None)
        store.add_local_message(chat_id=target.chat_id, author="bot", job_id=notice.job.id,
                                kind=MessageKind.STATUS.value, text=notice.text,
                                attachments={"images": [], "buttons": []}, reply_to=reply_to)

    return tell


def _speaks_for_request(job: Job) -> bool:
    """Whether ``job`` is the one that tells its person: not a second take (the first take
    speaks for the request) and not a part of a piece (a story's picture; the piece's progress
    message shows it)."""
    takes = job.params.get("takes") or {}
    return not job.params.get("part_of") and not takes.get("index", 0)


def _tell(store: Store, notifiers: Mapping[str, DelayNotifier], job: Job,
          reason: DelayReason) -> bool:
    """Record the notice in the job, then tell its person. True when told now."""
    notifier = notifiers.get(job.platform)
    if notifier is None:
        return False  # nobody can tell this platform; record nothing that did not happen
    speaks = _speaks_for_request(job)
    noted = store.note_delay(job.id, {"reason": reason.value, "told": speaks,
                                      "at": utcnow().isoformat()})
    if noted is None or not speaks:
        return False
    try:
        notifier(DelayNotice(noted, reason, NOTICE_TEXT[reason].format(job=noted.id)))
    except Exception:  # a notice is a courtesy; the job itself goes on
        log.exception("could not tell the person of job %s about its delay", job.id)
        return False
    log.info("told the person of job %s: %s", job.id, reason.value)
    return True


def _redrive(store: Store, publisher: JobPublisher, settings: Settings, *,
             lost_before: datetime | None = None, unsure_before: datetime | None = None,
             notifiers: Mapping[str, DelayNotifier] | None = None) -> tuple[int, int, bool]:
    """Publish every job that needs it, batch by batch. Returns ``(published, lost, complete)``
    (``lost``: of those, the jobs the broker had lost); ``complete`` is False when the broker
    failed or the round's batch budget ran out.

    ``unsure_before``: queued jobs marked published before it are sent again too, quietly (a
    bot process may have died between making a job and publishing it: see
    :meth:`Store.create_job`)."""
    published = lost_jobs = 0
    if settings.fair_share_inflight:
        # Safety net for fair share: a person with room and held jobs (the worker that should
        # have released the next one died) gets it released; it is published below.
        for requester, kind in store.held_requesters():
            store.release_next(requester, kind, settings.fair_share_inflight)
    resend_before = max((t for t in (lost_before, unsure_before) if t is not None), default=None)
    for _ in range(MAX_BATCHES_PER_ROUND):
        jobs = store.jobs_to_redrive(stale_after=settings.job_stale_after_seconds,
                                     republish_after=REPUBLISH_QUEUED_AFTER_SECONDS,
                                     lost_before=resend_before, limit=REDRIVE_BATCH)
        for done, job in enumerate(jobs):
            try:
                publisher.publish(job.id, job.kind, job.params)
            except QueueUnavailableError:
                log.warning("queue still unreachable; %d job(s) wait", len(jobs) - done)
                return published, lost_jobs, False
            if job.state == JobState.RUNNING:
                store.requeue_orphan(job.id, job.attempts)
            else:
                store.mark_published(job.id)
            published += 1
            lost = (lost_before is not None and job.state == JobState.QUEUED
                    and job.published_at is not None)
            log.info("re-sent job %s (state %s, attempt %d%s)", job.id, job.state,
                     job.attempts, ", lost by the broker" if lost else "")
            reason = ("lost" if lost else "stale" if job.state == JobState.RUNNING
                      else "unpublished" if job.published_at is None else "lost")
            metrics.REDRIVES.labels(reason).inc()
            if reason == "stale":
                metrics.WORKER_DEATHS.inc()
            if lost:
                lost_jobs += 1
                if notifiers:
                    _tell(store, notifiers, job, DelayReason.BROKER_LOST)
        if len(jobs) < REDRIVE_BATCH:
            return published, lost_jobs, True
    return published, lost_jobs, False


def resend_stranded(store: Store, publisher: JobPublisher, probe: BrokerProbe, *,
                    older_than: float) -> int:
    """Send again the jobs whose message a dead worker took (:meth:`BrokerProbe.stranded`);
    returns how many.

    A message whose job was sent again after it was taken (a stale running job's redrive) is
    only dropped. A message a worker took ``older_than`` seconds ago
    (``MUSESPARK_JOB_STALE_AFTER_SECONDS``, as long as a running job's heartbeat may be silent),
    whose job is still queued and due, is stranded: the worker died between taking it and
    claiming the job (a batch pulling its members, a killed machine's prefetch). Its job is sent again now instead of after the
    broker's visibility timeout (an hour on Redis) or :data:`REPUBLISH_QUEUED_AFTER_SECONDS`.
    A worker that is only slow to reach it (a job pulled to run after a long batch) finds it
    claimed by another and skips it. A message whose job is finished is dropped; one whose job
    runs, or waits its turn (deferred, held for fair share), is left to its holder."""
    try:
        stranded = probe.stranded(older_than)
    except QueueUnavailableError as exc:
        log.info("could not look for stranded messages: %s", exc)
        return 0
    sent = 0
    due_before = utcnow() - timedelta(seconds=older_than)
    for tag, job_id, taken_at in stranded:
        job = store.get_job(job_id)
        # Sent again since the message was taken (as a stale running job: at least
        # ``older_than`` later); half of that is the clock difference between machines allowed.
        sent_since = job is not None and job.published_at is not None and (
            as_utc(job.published_at).timestamp() > taken_at + older_than / 2)
        if job is not None and job.state == JobState.QUEUED and not sent_since:
            if job.not_before is not None and as_utc(job.not_before) > due_before:
                continue  # a deferred job's countdown message, held until it is due
            if job.held:
                continue  # fair share publishes it when its turn comes
            try:
                publisher.publish(job.id, job.kind, job.params)
            except QueueUnavailableError:
                return sent
            store.mark_published(job.id)
            metrics.REDRIVES.labels("stranded").inc()
            log.info("re-sent job %s: a worker took its message and died before starting it",
                     job.id)
            sent += 1
        elif job is not None and job.state == JobState.RUNNING:
            continue
        try:
            probe.forget(tag)
        except QueueUnavailableError:
            return sent
    return sent


def redrive_once(store: Store, publisher: JobPublisher, settings: Settings, *,
                 lost_before: datetime | None = None,
                 notifiers: Mapping[str, DelayNotifier] | None = None) -> int:
    """Publish every job that needs it; returns how many were published.

    ``lost_before``: the broker lost what it held at that moment; queued jobs published before
    it are sent again now, and their people are told through ``notifiers`` (per platform).
    """
    return _redrive(store, publisher, settings, lost_before=lost_before,
                    notifiers=notifiers)[0]


def tell_the_delayed(store: Store, settings: Settings,
                     notifiers: Mapping[str, DelayNotifier]) -> int:
    """Tell the people whose request waits over ``delayed_notice_seconds``; returns how many."""
    if not notifiers or settings.delayed_notice_seconds <= 0:
        return 0
    jobs = store.jobs_waiting_unstarted(older_than=settings.delayed_notice_seconds,
                                        platforms=list(notifiers), limit=REDRIVE_BATCH)
    return sum(_tell(store, notifiers, job, DelayReason.SLOW) for job in jobs)


class BrokerWatch:
    """Notices that the broker may have lost the messages it held.

    :meth:`check` is True once per such event: the broker's identity changed (a Redis restart:
    new ``run_id``; the embedded broker file replaced or deleted), or, for a broker with no
    identity, publishing failed and then succeeded again. A broker back after an outage with
    the same identity lost nothing (the same Redis process still holds its lists). The identity
    seen is kept in ``memo`` (a file), so a bot restarted together with its broker notices too.
    """

    def __init__(self, probe: BrokerProbe, publisher: JobPublisher, memo: Path | None) -> None:
        self._probe, self._publisher, self._memo = probe, publisher, memo
        self._key = hashlib.sha256(probe.url.encode()).hexdigest()[:16]  # no password on disk
        self._identity = self._recall()
        self._down = False
        self._recoveries = self._publisher_recoveries()

    def _publisher_recoveries(self) -> int:
        return int(getattr(self._publisher, "recoveries", 0))

    def _recall(self) -> str | None:
        if self._memo is None:
            return None
        try:
            value = json.loads(self._memo.read_text()).get(self._key)
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None

    def _remember(self, identity: str) -> None:
        if self._memo is None:
            return
        try:
            try:
                known: dict[str, Any] = json.loads(self._memo.read_text())
                if not isinstance(known, dict):
                    known = {}
            except (OSError, ValueError):
                known = {}
            known[self._key] = identity
            scratch = self._memo.with_name(f".{self._memo.name}.{os.getpid()}")
            scratch.write_text(json.dumps(known))
            scratch.replace(self._memo)
        except OSError as exc:
            log.warning("could not keep the broker's identity in %s: %s", self._memo, exc)

    def check(self) -> bool:
        recoveries = self._publisher_recoveries()
        came_back, self._recoveries = recoveries != self._recoveries, recoveries
        try:
            identity = self._probe.identity()
        except QueueUnavailableError as exc:
            if not self._down:
                log.warning("broker unreachable (%s); will check what it kept when it is back",
                            exc)
            self._down = True
            return False
        was_down, self._down = self._down, False
        if identity is None:
            if was_down or came_back:
                log.warning("broker reachable again after an outage; it cannot tell whether "
                            "it kept its messages, so queued jobs are sent again")
                return True
            return False
        previous, self._identity = self._identity, identity
        if identity != previous:
            self._remember(identity)
        if previous not in (None, BROKER_FILE_MISSING) and identity != previous:
            log.warning("broker restarted or replaced (%s, was %s): the jobs queued in it are "
                        "sent again now", identity, previous)
            return True
        if was_down:
            log.info("broker reachable again, same server (%s): nothing was lost", identity)
        return False

    @property
    def probe(self) -> BrokerProbe:
        return self._probe

    @property
    def down(self) -> bool:
        """The broker could not be reached at the last :meth:`check`."""
        return self._down

    def close(self) -> None:
        self._probe.close()


class Redriver:
    """Runs a redrive round every ``settings.redrive_interval_seconds`` in its own thread.

    A round checks the broker (:class:`BrokerWatch`), re-sends what needs it (at once, for the
    jobs a lost broker held) and tells people of delays through ``notifiers``, a platform ->
    :data:`DelayNotifier` mapping; platforms without one are told nothing.
    """

    def __init__(self, store: Store, publisher: JobPublisher, settings: Settings, *,
                 probe: BrokerProbe | None = None,
                 notifiers: Mapping[str, DelayNotifier] | None = None) -> None:
        self._store, self._publisher, self._settings = store, publisher, settings
        self._notifiers = dict(notifiers or {})
        self._watch = BrokerWatch(probe or BrokerProbe(settings), publisher,
                                  settings.resolved_data_dir / IDENTITY_MEMO_FILE)
        self._lost_before: datetime | None = None
        self._lost_total = 0
        # Until the first complete round, jobs marked published before this process started
        # are sent again: the process before it may have died between marking and sending.
        self._unsure_before: datetime | None = utcnow()
        self._interval = settings.redrive_interval_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redriver", daemon=True)

    def tell_through(self, platform: str, notifier: DelayNotifier | None) -> None:
        """Tell ``platform``'s people of delays through ``notifier`` (None: stop telling them;
        an adapter registers its notifier when it connects and removes it when it stops)."""
        if notifier is None:
            self._notifiers.pop(platform, None)
        else:
            self._notifiers[platform] = notifier

    def round(self) -> int:
        """One round (what the thread does each interval); returns how many jobs were sent."""
        lost_now = self._watch.check()
        if lost_now:
            # Everything published up to now may have been in the lost broker; a job published
            # to the new one meanwhile is sent twice, which its claim makes harmless.
            self._lost_before = utcnow()
        published, lost, complete = _redrive(self._store, self._publisher, self._settings,
                                             lost_before=self._lost_before,
                                             unsure_before=self._unsure_before,
                                             notifiers=self._notifiers)
        if complete:
            self._unsure_before = None
        self._lost_total += lost
        if self._lost_before is not None and complete:
            log.warning("re-sent %d job(s) the broker lost", self._lost_total)
            self._lost_before, self._lost_total = None, 0
        if complete and not lost_now and not self._watch.down:
            # Only with the broker up and nothing lost to resend: a round during an outage
            # must not wait on the broker twice (a restart is noticed a round sooner).
            published += resend_stranded(self._store, self._publisher, self._watch.probe,
                                         older_than=self._settings.job_stale_after_seconds)
        tell_the_delayed(self._store, self._settings, self._notifiers)
        return published

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.round()
            except Exception:  # keep going: the next round may succeed
                log.exception("redrive round failed")

    def start(self) -> Redriver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._watch.close()
