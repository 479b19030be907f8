"""A broker that loses what it held (Redis restarted without persistence) delays nobody for long.

The redriver notices the loss (a new Redis ``run_id``, a replaced broker file, or an outage on a
broker that cannot tell) and sends every queued job again at once; the people whose request it
held are told once. A request that waits too long without starting is told once too.

The first tests drive :class:`~core.redrive.Redriver` rounds by hand against a real store (SQLite
and PostgreSQL) with a recording publisher and a scripted probe; the last ones run the whole
thing: a private ``redis-server`` killed and restarted empty under real worker processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from core import redrive
from core.errors import QueueUnavailableError
from core.events import Actor
from core.queue import BROKER_FILE_MISSING, BrokerProbe, CeleryPublisher, RecordingPublisher
from core.redrive import DelayNotice, Redriver, local_delay_notifier
from core.settings import Settings
from core.store import LocalMessage, Store, utcnow
from tests._stack import (
    REDIS_URL,
    REPO,
    Stack,
    drop_redis_prefix,
    free_port,
    redis_reachable,
)

BACK_IN_LINE = "back in line"
TAKING_LONGER = "taking longer than usual"
#: Every request is answered this soon after the broker is back (the issue: about 600 s),
#: not counting the time the worker spent generating (one worker answers them one by one, and a
#: loaded CPU makes even 8 tokens take seconds).
ANSWERED_WITHIN_SECONDS = 30.0
#: A generous bound on the whole wait, generation included.
ALL_ANSWERED_TIMEOUT_SECONDS = 240.0
#: ... and sent again, its person told, this soon (a few redrive rounds of 0.5 s).
RESENT_WITHIN_SECONDS = 5.0


# -- the redriver's rounds, by hand ---------------------------------------------------------------


class ScriptedProbe:
    """A broker probe whose answers the test sets: an identity, None, or an outage (it stands
    in for :class:`core.queue.BrokerProbe`; the tests below also run the real one)."""

    url = "redis://scripted"

    def __init__(self, identity: str | None = "run-1") -> None:
        self.answer: str | None | Exception = identity

    def identity(self) -> str | None:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def stranded(self, older_than: float, limit: int = 100) -> list[tuple[str, str, float]]:
        return []  # a message held by a dead worker: tested with the real probe below

    def forget(self, tag: str) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def store(each_store: Store) -> Store:
    return each_store


def _settings(tmp_path: Path, **values: Any) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path / "data", **values)  # type: ignore[call-arg]


def _queued(store: Store, key: str, *, platform: str = "local", published: bool = True,
            **params: Any) -> str:
    user = store.ensure_user(platform, Actor("alice", "Alice"))
    job, created = store.create_job(
        idempotency_key=key, kind="text", intent="write", user_id=user, prompt="p",
        expanded_prompt="p", params={"max_new_tokens": 8, **params}, seed=1, platform=platform,
        delivery={"platform": platform, "chat_id": "c", "reply_to": "7"})
    assert created
    if published:
        store.mark_published(job.id)
    return job.id


def _params(store: Store, job_id: str) -> dict[str, Any]:
    job = store.get_job(job_id)
    assert job is not None
    return job.params


def _notices(store: Store, job_id: str) -> list[LocalMessage]:
    return [m for m in store.local_messages_after("c", 0)
            if m.job_id == job_id and m.kind == "status"]


class Told:
    """A notifier that records what it was asked to tell (another platform's stand-in)."""

    def __init__(self) -> None:
        self.notices: list[DelayNotice] = []

    def __call__(self, notice: DelayNotice) -> None:
        self.notices.append(notice)


def test_a_new_run_id_resends_the_queued_jobs_at_once_and_tells_each_person_once(
        store: Store, tmp_path: Path) -> None:
    publisher, probe = RecordingPublisher(), ScriptedProbe("run-1")
    redriver = Redriver(store, publisher, _settings(tmp_path), probe=probe,
                        notifiers={"local": local_delay_notifier(store)})
    assert redriver.round() == 0, "the first identity seen is where it starts"
    waiting = [_queued(store, f"k{n}") for n in range(3)]
    second_take = _queued(store, "k0:take2", takes={"index": 1, "of": 2, "siblings": []})
    running = _queued(store, "running")
    assert store.claim(running, worker="w", stale_after=30, max_attempts=3) is not None
    never_published = _queued(store, "unpublished", published=False)
    assert {j for j, _, _ in publisher.published} == set()
    publisher.published.clear()

    probe.answer = "run-2"  # Redis restarted empty
    redriver.round()
    sent = [j for j, _, _ in publisher.published]
    assert sorted(sent) == sorted([*waiting, second_take, never_published])
    for job_id in waiting:
        (notice,) = _notices(store, job_id)
        assert BACK_IN_LINE in notice.text and job_id in notice.text and notice.reply_to == 7
        assert _params(store, job_id)["delay_notice"]["reason"] == "broker_lost"
    assert _notices(store, second_take) == [], "the first take speaks for the request"
    assert _params(store, second_take)["delay_notice"]["told"] is False
    assert _notices(store, never_published) == [] and _notices(store, running) == []

    publisher.published.clear()
    for _ in range(3):
        redriver.round()
    assert publisher.published == [], "what was sent again is not sent a third time"
    assert all(len(_notices(store, j)) == 1 for j in waiting)

    probe.answer = "run-3"  # another restart: sent again, but each person is told only once
    redriver.round()
    assert sorted(j for j, _, _ in publisher.published) == sorted(
        [*waiting, second_take, never_published])
    assert all(len(_notices(store, j)) == 1 for j in waiting)


def test_the_same_server_back_after_an_outage_lost_nothing(store: Store, tmp_path: Path) -> None:
    publisher, probe = RecordingPublisher(), ScriptedProbe("run-1")
    redriver = Redriver(store, publisher, _settings(tmp_path), probe=probe,
                        notifiers={"local": local_delay_notifier(store)})
    job_id = _queued(store, "k")
    redriver.round()
    probe.answer = QueueUnavailableError("connection refused")
    redriver.round()
    probe.answer = "run-1"
    redriver.round()
    assert publisher.published == [] and _notices(store, job_id) == []


def test_a_broker_that_cannot_tell_who_it_is_counts_an_outage_as_a_loss(
        store: Store, tmp_path: Path) -> None:
    publisher, probe = RecordingPublisher(), ScriptedProbe(None)
    publisher.recoveries = 0  # type: ignore[attr-defined]
    redriver = Redriver(store, publisher, _settings(tmp_path), probe=probe,
                        notifiers={"local": local_delay_notifier(store)})
    job_id = _queued(store, "k")
    redriver.round()
    assert publisher.published == []
    publisher.recoveries = 1  # type: ignore[attr-defined]  # a publish failed, then one passed
    redriver.round()
    assert [j for j, _, _ in publisher.published] == [job_id]
    assert len(_notices(store, job_id)) == 1


def test_a_bot_restarted_with_its_broker_still_notices(store: Store, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    Redriver(store, RecordingPublisher(), settings,
             probe=ScriptedProbe("run-1")).round()
    job_id = _queued(store, "k")
    # Both stop; Redis comes back empty with a new run id; the bot starts again.
    publisher = RecordingPublisher()
    Redriver(store, publisher, settings, probe=ScriptedProbe("run-2"),
             notifiers={"local": local_delay_notifier(store)}).round()
    assert [j for j, _, _ in publisher.published] == [job_id]
    assert len(_notices(store, job_id)) == 1


def test_a_large_backlog_is_resent_in_batches_within_one_round(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redrive, "REDRIVE_BATCH", 2)
    publisher, probe = RecordingPublisher(), ScriptedProbe("run-1")
    redriver = Redriver(store, publisher, _settings(tmp_path), probe=probe)
    redriver.round()
    jobs = [_queued(store, f"k{n}") for n in range(7)]
    probe.answer = "run-2"
    redriver.round()
    assert sorted(j for j, _, _ in publisher.published) == sorted(jobs)


def test_a_failed_resend_is_tried_again_next_round(store: Store, tmp_path: Path) -> None:
    publisher, probe = RecordingPublisher(), ScriptedProbe("run-1")
    redriver = Redriver(store, publisher, _settings(tmp_path), probe=probe)
    redriver.round()
    job_id = _queued(store, "k")
    probe.answer, publisher.fail = "run-2", True
    redriver.round()
    publisher.fail = False
    redriver.round()
    assert [j for j, _, _ in publisher.published] == [job_id]


NOTICE_AFTER_SECONDS = 1.0


def test_a_request_that_waits_too_long_is_told_once(store: Store, tmp_path: Path) -> None:
    told_elsewhere = Told()
    redriver = Redriver(store, RecordingPublisher(),
                        _settings(tmp_path, delayed_notice_seconds=NOTICE_AFTER_SECONDS),
                        probe=ScriptedProbe("run-1"),
                        notifiers={"local": local_delay_notifier(store), "discord": told_elsewhere})
    made = time.monotonic()
    local = _queued(store, "local")
    remote = _queued(store, "remote", platform="discord")
    no_notifier = _queued(store, "tg", platform="telegram")
    started = _queued(store, "started")
    assert store.claim(started, worker="w", stale_after=30, max_attempts=3) is not None
    redriver.round()
    if time.monotonic() - made < NOTICE_AFTER_SECONDS:  # (a loaded machine can take longer)
        assert _notices(store, local) == [] and told_elsewhere.notices == [], "not yet"
    time.sleep(max(0.0, made + NOTICE_AFTER_SECONDS + 0.1 - time.monotonic()))
    for _ in range(3):
        redriver.round()
    (notice,) = _notices(store, local)
    assert TAKING_LONGER in notice.text and local in notice.text
    assert [(n.job.id, n.reason) for n in told_elsewhere.notices] == [(remote, "slow")]
    assert "delay_notice" not in _params(store, no_notifier)
    assert _notices(store, started) == []


def test_no_note_is_recorded_for_a_job_that_started(store: Store) -> None:
    job_id = _queued(store, "k")
    assert store.note_delay(job_id, {"reason": "slow"}) is not None
    assert store.note_delay(job_id, {"reason": "slow"}) is None, "once"
    other = _queued(store, "other")
    assert store.claim(other, worker="w", stale_after=30, max_attempts=3) is not None
    assert store.note_delay(other, {"reason": "slow"}) is None


# -- the whole thing: Redis restarted empty under real workers ------------------------------------


class PrivateRedis:
    """A redis-server on ``port`` without persistence: a restart comes back empty."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import redis

        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            finally:
                client.close()

    def crash(self) -> None:
        assert self.process is not None
        self.process.kill()  # SIGKILL: no chance to save anything
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


needs_redis_server = pytest.mark.skipif(shutil.which("redis-server") is None,
                                        reason="needs the redis-server binary")


@needs_redis_server
def test_the_probe_sees_a_new_run_id_after_a_restart(tmp_path: Path) -> None:
    server = PrivateRedis(free_port())
    url = f"redis://127.0.0.1:{server.port}/0"
    settings = _settings(tmp_path, broker_url=url)
    probe, publisher = BrokerProbe(settings), CeleryPublisher(settings)
    try:
        with pytest.raises(QueueUnavailableError):
            probe.identity()
        with pytest.raises(QueueUnavailableError):
            publisher.publish("job", "text", {})
        server.start()
        first = probe.identity()
        assert first is not None and first.startswith("redis:") and probe.identity() == first
        publisher.publish("job", "text", {})
        assert publisher.recoveries == 1, "a publish passed after one failed"
        server.crash()
        server.start()
        second = probe.identity()
        assert second is not None and second != first
    finally:
        probe.close()
        publisher.close()
        server.stop()


@needs_redis_server
def test_a_publish_batch_that_cannot_be_sent_says_so_and_the_next_one_is_sent_whole(
        tmp_path: Path) -> None:
    """Inside a batch, publishes wait in one Redis pipeline; a broker lost before the batch
    ends makes its end raise (the caller publishes those jobs again), and a batch after the
    broker's return sends all of its jobs and counts as a recovery."""
    import redis

    server = PrivateRedis(free_port())
    url = f"redis://127.0.0.1:{server.port}/0"
    publisher = CeleryPublisher(_settings(tmp_path, broker_url=url))
    server.start()
    try:
        client = redis.Redis(port=server.port)
        with publisher.batch():
            publisher.publish("first", "text", {})
        assert client.llen("gpu.text") == 1
        with pytest.raises(QueueUnavailableError):
            with publisher.batch():
                publisher.publish("a", "text", {})
                assert client.llen("gpu.text") == 1, "nothing is sent before the batch ends"
                server.crash()
                publisher.publish("b", "text", {})
        server.start()
        client = redis.Redis(port=server.port)
        with publisher.batch():
            for job in ("c", "d", "e"):
                publisher.publish(job, "text", {})
        assert client.llen("gpu.text") == 3
        assert publisher.recoveries == 1
    finally:
        publisher.close()
        server.stop()


#: A worker that takes one message from the text queue, says so, and waits to be killed.
_TAKER = """
import sys, time
from kombu.entity import Queue
from core.queue import QUEUE_FOR_KIND, make_celery
from core.settings import Settings
app = make_celery(Settings(_env_file=None))
queue = Queue(QUEUE_FOR_KIND["text"]).bind(app.connection_for_read().default_channel)
while (message := queue.get(no_ack=False, accept={"json"})) is None:
    time.sleep(0.05)
print(message.decode()[0][0], flush=True)
time.sleep(600)
"""


def _killed_holding_one(settings: Settings) -> str:
    """A worker process takes one message and is SIGKILLed before it acknowledges it (as a
    batch pulling its members can be); returns the job id it held."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSESPARK_")}
    env.update(MUSESPARK_BROKER_URL=settings.resolved_broker_url,
               MUSESPARK_BROKER_KEY_PREFIX=settings.broker_key_prefix or "",
               MUSESPARK_DATA_DIR=str(settings.data_dir), PYTHONPATH=str(REPO))
    taker = subprocess.Popen([sys.executable, "-c", _TAKER], env=env, stdout=subprocess.PIPE)
    try:
        assert taker.stdout is not None
        held = taker.stdout.readline().decode().strip()
    finally:
        taker.send_signal(signal.SIGKILL)
        taker.wait(timeout=30)
    assert held, "the taker got no message"
    return held


def test_a_message_a_dead_worker_took_is_sent_again_long_before_its_visibility_timeout(
        store: Store, tmp_path: Path) -> None:
    problem = redis_reachable()
    if problem:
        pytest.skip(problem)
    prefix = f"musespark-stranded-{os.getpid()}-{time.monotonic_ns()}:"
    settings = _settings(tmp_path, broker_url=REDIS_URL, broker_key_prefix=prefix)
    probe, publisher = BrokerProbe(settings), CeleryPublisher(settings)
    try:
        queued, running = _queued(store, "stranded-1"), _queued(store, "stranded-2")
        for job_id in (queued, running):
            publisher.publish(job_id, "text", {"max_new_tokens": 8})
        assert {_killed_holding_one(settings), _killed_holding_one(settings)} == {queued,
                                                                                  running}
        store.claim(running, worker="alive", stale_after=60, max_attempts=3)
        assert redrive.resend_stranded(store, publisher, probe, older_than=30) == 0, \
            "too young to be lost"
        time.sleep(0.6)
        assert redrive.resend_stranded(store, publisher, probe, older_than=0.5) == 1
        assert _killed_holding_one(settings) == queued, "its job is in the queue again"
        left = [job for _, job, _ in probe.stranded(0)]
        assert running in left, "a running job's message is its worker's"
        assert left.count(queued) == 1, "the dead worker's copy is gone; the taker's is new"
        # A job sent again since its message was taken (as a stale running job is) is not
        # sent once more: its stranded message is only dropped.
        store.claim(queued, worker="alive", stale_after=60, max_attempts=3)  # done with it
        resent = _queued(store, "stranded-3")
        publisher.publish(resent, "text", {"max_new_tokens": 8})
        assert _killed_holding_one(settings) == resent
        time.sleep(0.6)
        store.mark_published(resent)
        assert redrive.resend_stranded(store, publisher, probe, older_than=0.5) == 0
        assert resent not in [job for _, job, _ in probe.stranded(0)]
    finally:
        probe.close()
        publisher.close()
        drop_redis_prefix(prefix)


def test_the_embedded_probe_tells_a_replaced_broker_file(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    probe = BrokerProbe(settings)
    assert probe.identity() == BROKER_FILE_MISSING
    path = settings.resolved_data_dir / "broker.db"
    path.write_bytes(b"first")
    first = probe.identity()
    kept = tmp_path / "kept"  # holds on to the old inode, so the new file cannot reuse it
    path.rename(kept)
    path.write_bytes(b"second")
    assert first is not None and first.startswith("file:") and probe.identity() != first


def _rows(stack: Stack, chat_id: str, job_id: str, kind: str) -> list[LocalMessage]:
    return [m for m in stack.runtime.store.local_messages_after(chat_id, 0)
            if m.job_id == job_id and m.kind == kind]


def _utc(moment: datetime | None) -> datetime:
    assert moment is not None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)  # SQLite keeps no zone


def _resent_and_told(stack: Stack, chat_id: str, job_id: str, since: datetime) -> bool:
    published = stack.job(job_id).published_at
    return (published is not None and _utc(published) >= since
            and any(BACK_IN_LINE in m.text for m in _rows(stack, chat_id, job_id, "status")))


def _pause(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@needs_redis_server
def test_requests_queued_in_a_redis_that_restarts_empty_are_answered_soon_and_once(
        make_stack) -> None:
    server = PrivateRedis(free_port())
    server.start()
    # The shortest answers: the clock measures the redriver, not the CPU's speed.
    stack = make_stack(MUSESPARK_BROKER_URL=f"redis://127.0.0.1:{server.port}/0",
                       MUSESPARK_TEXT_MAX_NEW_TOKENS="8")
    try:
        worker = stack.start_worker()
        chat = stack.chat()
        # One request first, so the worker has its model loaded: the clock below measures the
        # redriver, not a cold start.
        (warm,) = chat.say("/write one word about rain")
        assert warm.job_id
        stack.wait_job(warm.job_id, ("delivered",), timeout=240)

        pids = [worker.process.pid, *worker.children()]
        _pause(pids, signal.SIGSTOP)  # the worker is stopped: requests wait in Redis
        try:
            jobs = []
            for n in range(3):
                replies = chat.say(f"/write a line about boat number {n}")
                (status,) = [m for m in replies if m.kind == "status" and m.job_id]
                jobs.append(status.job_id)
            assert all(stack.job(j).published_at is not None for j in jobs)
            server.crash()
            server.start()  # same port, new run_id, empty
            back, back_at = time.monotonic(), utcnow()
            # Sent again at once (published after the broker's return), each person told.
            while not all(_resent_and_told(stack, chat.chat_id, j, back_at) for j in jobs):
                assert time.monotonic() - back < RESENT_WITHIN_SECONDS, [
                    (stack.job(j).published_at, _rows(stack, chat.chat_id, j, "status"))
                    for j in jobs]
                time.sleep(0.1)
        finally:
            _pause(pids, signal.SIGCONT)

        while True:
            answered = [j for j in jobs if _rows(stack, chat.chat_id, j, "result")]
            if len(answered) == len(jobs):
                break
            waited = time.monotonic() - back
            assert waited < ALL_ANSWERED_TIMEOUT_SECONDS, (
                f"{len(jobs) - len(answered)} of {len(jobs)} requests unanswered {waited:.0f} s "
                f"after the broker came back; states "
                f"{[stack.job(j).state for j in jobs]}\n{worker.log()[-3000:]}")
            time.sleep(0.2)
        done = [stack.job(j) for j in jobs]
        generating = sum((_utc(j.finished_at) - _utc(j.started_at)).total_seconds() for j in done)
        until_last = (max(_utc(j.finished_at) for j in done) - back_at).total_seconds()
        print(f"answered {until_last:.1f} s after the broker came back, "
              f"{generating:.1f} s of it generating")
        assert until_last - generating < ANSWERED_WITHIN_SECONDS, (
            f"answered {until_last:.1f} s after the broker came back, of which only "
            f"{generating:.1f} s generating\n{worker.log()[-3000:]}")

        time.sleep(2)  # a duplicate message, if any, would be answered by now
        for job_id in jobs:
            assert stack.job(job_id).state == "delivered"
            assert len(_rows(stack, chat.chat_id, job_id, "result")) == 1, "answered twice"
            notices = [m.text for m in _rows(stack, chat.chat_id, job_id, "status")
                       if BACK_IN_LINE in m.text]
            assert len(notices) == 1, notices
        assert not [m for m in _rows(stack, chat.chat_id, warm.job_id, "status")
                    if BACK_IN_LINE in m.text], "a request answered before the crash is not told"
    finally:
        for started in stack.workers:
            started.stop()
        server.stop()


# The notice does not depend on the broker: the embedded deployment is enough.
@pytest.mark.parametrize("make_stack", ["embedded"], indirect=True)
def test_a_request_that_waits_without_a_worker_is_told_once(make_stack) -> None:
    stack = make_stack(MUSESPARK_DELAYED_NOTICE_SECONDS="1")
    chat = stack.chat()
    replies = chat.say("/write a line about waiting")
    (status,) = [m for m in replies if m.kind == "status" and m.job_id]
    chat.wait(lambda ms: any(TAKING_LONGER in m.text for m in ms), timeout=30)
    time.sleep(1.5)  # three more redrive rounds: no second notice
    notices = [m for m in _rows(stack, chat.chat_id, status.job_id, "status")
               if TAKING_LONGER in m.text]
    assert len(notices) == 1 and status.job_id in notices[0].text
    assert stack.job(status.job_id).params["delay_notice"]["reason"] == "slow"
