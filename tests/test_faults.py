"""Faults under real traffic: workers SIGKILLed while they generate and while they post, on Redis
+ PostgreSQL, with requests coming through the Telegram bot (the real PTB Application against
tests/fake_telegram.py) and Discord (channel messages, posted by the worker to
tests/fake_discord.py with enforced nonces).

Each kill lands at a random moment of one request's life: during generation (the job is running)
or during delivery (the fake has carried out the worker's post and holds its answer back, so the
worker dies not knowing it was posted). Every request must get its result; Discord must never show
one twice (the nonce returns the first message); Telegram has no idempotency key, so a kill during
delivery can post that part twice: those are counted and reported, and may not exceed the kills
made during Telegram deliveries.

The second test restarts Redis empty (no persistence) while one request is being drawn and
others wait in it: each is answered once, within 30 s of the broker's return.

``MUSESPARK_FAULT_KILLS`` sets the number of kills (default 6 in the suite; the issue's run is
50: ``MUSESPARK_FAULT_KILLS=50 .venv/bin/python -m pytest tests/test_faults.py -s``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from core.events import Actor, Channel, ChannelKind, MessageReceived
from core.store import Job, utcnow
from tests._stack import Stack, Worker, free_port, postgres_reachable, redis_reachable
from tests.fake_discord import BOT_TOKEN, FakeDiscord
from tests.fake_telegram import FakeTelegram
from tests.test_broker_loss import (
    ALL_ANSWERED_TIMEOUT_SECONDS,
    ANSWERED_WITHIN_SECONDS,
    PrivateRedis,
    _pause,
    _utc,
)
from tests.test_telegram import BotThread, from_worker

KILLS = int(os.environ.get("MUSESPARK_FAULT_KILLS", "6"))
DRAIN_TIMEOUT_SECONDS = 300.0
STALL_SECONDS = 2.0

pytestmark = pytest.mark.distributed


@contextlib.contextmanager
def _deployment(root: Path, model_cache: Path, **env: str) -> Iterator[tuple[Stack, FakeTelegram,
                                                                              FakeDiscord]]:
    problems = [p for p in (redis_reachable(), postgres_reachable()) if p]
    if len(problems) == 2:
        pytest.skip(f"distributed mode NOT tested: {'; '.join(problems)}")
    assert not problems, problems
    with FakeTelegram() as telegram, FakeDiscord() as discord:
        stack = Stack.create(
            "distributed", root, model_cache,
            MUSESPARK_TELEGRAM_TOKEN=telegram.token, MUSESPARK_TELEGRAM_API_URL=telegram.url,
            MUSESPARK_DISCORD_TOKEN=BOT_TOKEN, MUSESPARK_DISCORD_API_URL=discord.api_url,
            MUSESPARK_IMAGE_TAKES="1", MUSESPARK_IMAGE_STEPS="12", **env)
        bot = None
        try:
            stack.start_worker()
            bot = BotThread(stack, stack.settings).start()
            yield stack, telegram, discord
        finally:
            if bot is not None:
                bot.stop()
            stack.close()


@pytest.fixture
def deployment(tmp_path: Path, model_cache: Path) -> Iterator[tuple[Stack, FakeTelegram,
                                                                      FakeDiscord]]:
    with _deployment(tmp_path, model_cache) as made:
        yield made


class Traffic:
    """Requests through Telegram (the real bot, a private chat each) and Discord (a mention in
    a guild channel each), and the results the fakes saw for each."""

    def __init__(self, stack: Stack, telegram: FakeTelegram, discord: FakeDiscord) -> None:
        self.stack, self.telegram, self.discord = stack, telegram, discord
        self.chats = itertools.count(7_000_001)
        self.requests: list[tuple[str, str]] = []  # (platform, chat)

    def ask(self, platform: str) -> str:
        chat = str(next(self.chats))
        prompt = f"/imagine a lighthouse, fault {len(self.requests)} --count 1"
        if platform == "telegram":
            self.telegram.push(self.telegram.text_update(int(chat), prompt))
        else:
            self.stack.runtime.orchestrator.handle(MessageReceived(
                platform="discord", event_id=f"message:{chat}", actor=Actor(chat, "Ada"),
                channel=Channel(chat, ChannelKind.GUILD_CHANNEL, guild_id="1"),
                message_id=chat, text=prompt))
        self.requests.append((platform, chat))
        return chat

    def job_of(self, platform: str, chat: str) -> Any:
        prefix = f"telegram:{chat}:" if platform == "telegram" else f"discord:message:{chat}"
        with self.stack.runtime.store.session() as s:
            return s.scalars(select(Job).where(Job.idempotency_key.like(prefix + "%"))).first()

    def results(self) -> dict[tuple[str, str], int]:
        counts = {}
        for platform, chat in self.requests:
            if platform == "telegram":
                counts[platform, chat] = len([c for c in self.telegram.calls(
                    "sendPhoto", chat_id=chat) if from_worker(c)])
            else:
                counts[platform, chat] = len([m for m in self.discord.messages.values()
                                              if m["channel_id"] == chat and m["attachments"]])
        return counts

    def drain(self, timeout: float = DRAIN_TIMEOUT_SECONDS) -> dict[tuple[str, str], int]:
        with contextlib.suppress(TimeoutError):  # reported by the caller with the counts
            _wait(lambda: all(self.results().values()), timeout, "results missing")
        time.sleep(STALL_SECONDS + 1)  # any second post would be made by now
        return self.results()


def _pool_child(worker: Worker, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while not (children := worker.children()):
        if time.monotonic() > deadline:
            raise TimeoutError("the worker has no pool process")
        time.sleep(0.05)
    return children[0]


def _wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)
    return value


# Each kill takes some seconds (a post held, a worker restarted), then the drain: the 50-kill
# run needs more than the suite's default limit.
@pytest.mark.timeout(max(600, int(60 + KILLS * 15 + DRAIN_TIMEOUT_SECONDS)))
def test_workers_killed_while_generating_and_posting_lose_nothing(deployment: Any) -> None:
    stack, telegram, discord = deployment
    rng = random.Random(KILLS)
    traffic = Traffic(stack, telegram, discord)
    ask, job_of = traffic.ask, traffic.job_of
    kills = {"generating": 0, "telegram delivery": 0, "discord delivery": 0, "whole worker": 0}

    for number in range(KILLS):
        platform = "telegram" if number % 2 == 0 else "discord"
        moment = rng.choice(["generating", "delivery"])
        worker = stack.workers[-1]
        if moment == "delivery":
            if platform == "telegram":
                stall = telegram.stall_next("sendPhoto", STALL_SECONDS, where=from_worker)
                chat = ask(platform)
                _wait(stall.reached.is_set, 300, "the worker's post never came")
            else:
                chat = ask(platform)
                discord.stall_next("POST", rf"/channels/{chat}/messages$", STALL_SECONDS)
                _wait(lambda: discord.calls_to("POST", rf"/channels/{chat}/messages$"), 300,
                      "the worker's post never came")
            kills[f"{platform} delivery"] += 1
        else:
            chat = ask(platform)
            _wait(lambda: (j := job_of(platform, chat)) is not None and j.state == "running",
                  300, "the job never started")
            time.sleep(rng.uniform(0, 0.3))
            kills["generating"] += 1
        if number % 5 == 4:  # now and then the whole machine goes, not just the pool process
            worker.kill_hard()
            kills["whole worker"] += 1
            stack.start_worker()
        else:
            os.kill(_pool_child(worker), signal.SIGKILL)
        ask("discord" if platform == "telegram" else "telegram")  # traffic goes on meanwhile

    counts = traffic.drain()
    requests = traffic.requests
    lost = [key for key, n in counts.items() if n == 0]
    doubled = {key: n for key, n in counts.items() if n > 1}
    why = {key: (j.state, j.attempts, j.failure_reason) if (j := job_of(*key)) else "no job"
           for key in lost}  # what became of each lost request, for whoever reads the failure
    summary = (f"{KILLS} kills {kills}; {len(requests)} requests: {len(requests) - len(lost)} "
               f"answered, {len(lost)} lost {why or ''}, duplicated: {doubled or 'none'}")
    print(summary)
    assert not lost, summary
    assert not [key for key in doubled if key[0] == "discord"], summary
    telegram_doubles = sum(n - 1 for key, n in doubled.items() if key[0] == "telegram")
    assert telegram_doubles <= kills["telegram delivery"], summary


def test_a_redis_restart_with_requests_queued_and_in_flight_answers_each_once_and_soon(
        tmp_path: Path, model_cache: Path) -> None:
    """Redis restarted empty (no persistence) while one request is being drawn and others wait
    in it: every request is answered within 30 s of the broker's return, none twice."""
    server = PrivateRedis(free_port())
    server.start()
    try:
        with _deployment(tmp_path, model_cache,
                         MUSESPARK_BROKER_URL=f"redis://127.0.0.1:{server.port}/0") as made:
            stack, telegram, discord = made
            traffic = Traffic(stack, telegram, discord)
            for platform in ("telegram", "discord"):  # warm: models loaded, clients connected
                traffic.ask(platform)
            assert all(traffic.drain().values())
            worker = stack.workers[-1]
            in_flight = traffic.ask("telegram")
            _wait(lambda: (j := traffic.job_of("telegram", in_flight)) is not None
                  and j.state == "running", 300, "the job never started")
            pids = [worker.process.pid, *worker.children()]
            _pause(pids, signal.SIGSTOP)  # mid-job; the next requests wait in Redis
            try:
                for number in range(6):
                    traffic.ask("discord" if number % 2 else "telegram")
                server.crash()
                server.start()  # same port, new run_id, empty
                back_at = utcnow()
            finally:
                _pause(pids, signal.SIGCONT)
            counts = traffic.drain(timeout=ALL_ANSWERED_TIMEOUT_SECONDS)
            jobs = [traffic.job_of(*request) for request in traffic.requests[2:]]
            summary = (f"{len(counts)} requests: {counts}; states "
                       f"{[(j.id, j.state, j.attempts) for j in jobs]}")
            assert all(n == 1 for n in counts.values()), summary
            # Within 30 s of the broker's return, not counting the time spent drawing (one
            # worker draws them one by one, and a loaded CPU makes even tiny pictures slow).
            generating = sum((_utc(j.finished_at) - _utc(j.started_at)).total_seconds()
                             for j in jobs)
            until_last = (max(_utc(j.finished_at) for j in jobs) - back_at).total_seconds()
            print(f"{summary}; answered {until_last:.1f} s after the broker came back, "
                  f"{generating:.1f} s of it drawing")
            assert until_last - generating < ANSWERED_WITHIN_SECONDS, summary
    finally:
        server.stop()
