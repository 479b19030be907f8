"""Operating a fleet: metrics scraped from a running bot and worker, and a worker stopped with
SIGTERM mid-job (Redis + PostgreSQL) whose job is delivered exactly once.

The bot is a real ``musespark bot`` process serving Telegram against the fake Bot API
(tests/fake_telegram.py); the workers are real ``python -m workers`` processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update
from prometheus_client.parser import text_string_to_metric_families

from bots.runtime import BotRuntime
from core.queue import QUEUE_FOR_KIND
from core.store import Job, JobState
from tests._stack import REPO, Stack, free_port, postgres_reachable, redis_reachable
from tests.fake_telegram import FakeTelegram

RESULT_TIMEOUT_SECONDS = 300
WORKER_AGENT = "MuseSpark-worker"


def _distributed_or_skip() -> None:
    redis_problem, pg_problem = redis_reachable(), postgres_reachable()
    if redis_problem and pg_problem:
        pytest.skip(f"distributed mode NOT tested: {redis_problem}; {pg_problem}")
    if redis_problem or pg_problem:
        pytest.fail(f"distributed mode needs both servers: {redis_problem or pg_problem}")


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """``/metrics`` as sample name -> [(labels, value)]."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str,
          **labels: str) -> float:
    return sum(value for found, value in samples.get(name, [])
               if all(found.get(k) == v for k, v in labels.items()))


def wait_for(check, timeout: float = RESULT_TIMEOUT_SECONDS, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def redis_lengths(stack: Stack) -> dict[str, int]:
    import redis

    client = redis.Redis.from_url(stack.env["MUSESPARK_BROKER_URL"])
    try:
        return {q: int(client.llen(f"{stack.redis_prefix}{q}")) for q in QUEUE_FOR_KIND.values()}
    finally:
        client.close()


@pytest.fixture
def fake() -> Iterator[FakeTelegram]:
    with FakeTelegram() as server:
        yield server


@pytest.fixture
def distributed(tmp_path: Path, model_cache: Path) -> Iterator[list[Stack]]:
    _distributed_or_skip()
    made: list[Stack] = []
    yield made
    for stack in made:
        stack.close()


def test_metrics_from_a_running_bot_and_worker(distributed: list[Stack], fake: FakeTelegram,
                                               tmp_path: Path, model_cache: Path) -> None:
    bot_port, worker_port = free_port(), free_port()
    stack = Stack.create("distributed", tmp_path / "stack", model_cache,
                         MUSESPARK_TELEGRAM_TOKEN=fake.token, MUSESPARK_TELEGRAM_API_URL=fake.url,
                         MUSESPARK_IMAGE_TAKES="1", MUSESPARK_IMAGE_STEPS="2")
    distributed.append(stack)
    stack.env["MUSESPARK_METRICS_PORT"] = str(worker_port)  # the worker's alone
    worker = stack.start_worker()
    del stack.env["MUSESPARK_METRICS_PORT"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSESPARK_")}
    env.update(stack.env, MUSESPARK_METRICS_PORT=str(bot_port), PYTHONPATH=str(REPO),
               PYTHONUNBUFFERED="1")
    bot_log = tmp_path / "bot.log"
    bot = subprocess.Popen([sys.executable, "-m", "bots.cli", "bot"], env=env, cwd=tmp_path,
                           stdout=bot_log.open("wb"), stderr=subprocess.STDOUT)
    try:
        chat, blocked = 7301, 7302
        fake.fail("sendPhoto", chat_id=chat, code=429, retry_after=1,
                  where=lambda c: c.user_agent == WORKER_AGENT)
        for n in range(2):
            fake.push(fake.text_update(chat, f"/imagine a lighthouse {n}", user_id=11))
        fake.block_chat(blocked)
        fake.push(fake.text_update(blocked, "/imagine a fox in the snow", user_id=12))

        def results() -> list:  # type: ignore[type-arg]
            return fake.calls("sendPhoto", chat_id=chat, ok=True)
        wait_for(lambda: len(results()) == 2, what="two results")
        result = results()[0].result
        fake.push(fake.reaction_update(chat, result["message_id"], user_id=11, new=["👍"]))
        wait_for(lambda: total(scrape(worker_port), "musespark_results_total",
                               outcome="failed") >= 1, what="the blocked chat's failure")
        wait_for(lambda: total(scrape(bot_port), "musespark_feedback_events_total") >= 1,
                 30, "the reaction to be counted")

        # Bot: the queue depth of each queue the code declares, from Redis itself.
        before = redis_lengths(stack)
        bot_metrics, worker_metrics = scrape(bot_port), scrape(worker_port)
        after = redis_lengths(stack)
        depths = {labels["queue"]: value for labels, value in
                  bot_metrics["musespark_queue_depth"]}
        assert set(depths) == set(QUEUE_FOR_KIND.values())
        assert all(labels["broker"] == "redis" for labels, _ in
                   bot_metrics["musespark_queue_depth"])
        for queue, depth in depths.items():  # what Redis says, read around the scrape
            assert min(before[queue], after[queue]) <= depth <= max(before[queue], after[queue])
        assert total(bot_metrics, "musespark_queue_depth_up") == 1
        assert total(bot_metrics, "musespark_feedback_events_total", platform="telegram",
                     kind="reaction") == 1
        assert total(bot_metrics, "musespark_worker_deaths_total") == 0
        assert {labels["reason"] for labels, _ in bot_metrics["musespark_redrives_total"]} == {
            "unpublished", "stale", "lost", "stranded"}
        # Worker (merged from its pool processes).
        runs = total(worker_metrics, "musespark_job_run_seconds_count", kind="image")
        assert runs >= 4, runs  # two results, the failed one and the 429's second go
        waited = total(worker_metrics, "musespark_job_queue_wait_seconds_count", kind="image")
        assert waited >= 4
        assert 0 < total(worker_metrics, "musespark_job_run_seconds_sum") < 600
        assert total(worker_metrics, "musespark_results_total", platform="telegram",
                     outcome="delivered") == 2
        assert total(worker_metrics, "musespark_results_total", platform="telegram",
                     outcome="failed", reason="delivery_refused") == 1
        assert total(worker_metrics, "musespark_rate_limited_total", platform="telegram") == 1
        assert total(worker_metrics, "musespark_retry_wait_seconds_sum", platform="telegram") == 1
        loads = [(labels, value) for labels, value in
                 worker_metrics["musespark_model_load_seconds_count"] if value]
        assert [labels["family"] for labels, _ in loads] == ["image"], loads
        assert 0 < total(worker_metrics, "musespark_model_load_seconds_sum") < 300
        assert total(worker_metrics, "musespark_models_resident", family="image") == 1
        assert total(bot_metrics, "musespark_oldest_waiting_job_seconds") >= 0
        assert total(bot_metrics, "musespark_jobs", state="delivered") == 2
        assert total(bot_metrics, "musespark_jobs", state="failed") == 1
    finally:
        bot.send_signal(signal.SIGTERM)
        try:
            bot.wait(timeout=60)
        except subprocess.TimeoutExpired:
            bot.kill()
            bot.wait()
        worker.stop()
    assert bot.returncode == 0, bot_log.read_text()[-3000:]


def _results(stack: Stack, chat_id: str, job_id: str) -> list[str]:
    return [r.job_id for r in stack.runtime.store.local_messages_after(chat_id, 0)
            if r.author == "bot" and r.kind in ("result", "error") and r.job_id == job_id]


def _status_job(replies: list) -> str:  # type: ignore[type-arg]
    return next(r.job_id for r in replies if r.job_id)


def _running(stack: Stack, job_id: str) -> Job:
    deadline = time.monotonic() + RESULT_TIMEOUT_SECONDS
    while (job := stack.job(job_id)).state != "running":
        assert job.state == "queued", job.state
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)
    return job


def test_sigterm_past_the_grace_hands_the_job_back_and_it_is_posted_once(
        distributed: list[Stack], tmp_path: Path, model_cache: Path) -> None:
    # A slow picture (many steps) and a grace much shorter than it: the job is handed back.
    stack = Stack.create("distributed", tmp_path / "stack", model_cache,
                         MUSESPARK_IMAGE_STEPS="400", MUSESPARK_IMAGE_TAKES="1",
                         MUSESPARK_WORKER_STOP_GRACE_SECONDS="0.5")
    distributed.append(stack)
    first = stack.start_worker()
    chat = stack.chat()
    job_id = _status_job(chat.say("/imagine a lighthouse at dusk"))
    _running(stack, job_id)
    time.sleep(0.3)  # inside the render
    stopped_at = time.monotonic()
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(timeout=60) == 0, first.log()[-3000:]
    assert time.monotonic() - stopped_at < 30
    job = stack.job(job_id)
    assert job.state == "queued", (job.state, first.log()[-2000:])
    assert job.attempts == 0, "a scale-down is not counted as a crash"
    assert "handed back" in first.log()
    assert _results(stack, chat.chat_id, job_id) == [], "nothing was posted by the stopped one"
    # The next worker need not draw 400 steps to show who posts it (a loaded test machine).
    with stack.runtime.store.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(
            params={**job.params, "steps": 2}))
    stack.start_worker()
    done = stack.wait_job(job_id, ("delivered", "failed"), timeout=RESULT_TIMEOUT_SECONDS)
    assert done.state == "delivered", done.failure_reason
    assert done.attempts == 1
    time.sleep(1.5)  # a second post would land now
    assert _results(stack, chat.chat_id, job_id) == [job_id]


def test_sigterm_while_a_job_runs_finishes_it_and_takes_no_new_one(
        distributed: list[Stack], tmp_path: Path, model_cache: Path) -> None:
    stack = Stack.create("distributed", tmp_path / "stack", model_cache,
                         MUSESPARK_IMAGE_STEPS="2", MUSESPARK_IMAGE_TAKES="1")
    distributed.append(stack)
    first = stack.start_worker()
    chat = stack.chat()
    # The test holds the first job's row, so the worker that took it is stuck in its claim
    # for as long as the test likes: the stop signal surely comes while the job is taken.
    import psycopg

    lock = psycopg.connect(stack.env["MUSESPARK_DATABASE_URL"].replace("+psycopg", ""))
    try:
        running_id = _status_job(chat.say("/imagine a fox in the snow"))
        lock.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (running_id,))
        waiting_id = _status_job(chat.say("/imagine an owl at night"))
        wait_for(lambda: "received" in first.log(), what="the worker to take the job")
        first.process.send_signal(signal.SIGTERM)
        wait_for(lambda: "taking no new job" in first.log(), 30, "the stop to begin")
        time.sleep(1.0)
        assert first.process.poll() is None, "the worker left its job"
    finally:
        lock.rollback()
        lock.close()
    assert first.process.wait(timeout=RESULT_TIMEOUT_SECONDS) == 0, first.log()[-3000:]
    assert stack.job(running_id).state == "delivered", first.log()[-2000:]
    waiting = stack.job(waiting_id)
    assert (waiting.state, waiting.attempts) == ("queued", 0), "a stopping worker took a new job"
    assert "handed back" not in first.log()
    stack.start_worker()
    stack.wait_job(waiting_id, ("delivered",), timeout=RESULT_TIMEOUT_SECONDS)
    time.sleep(1.5)
    assert _results(stack, chat.chat_id, running_id) == [running_id]
    assert _results(stack, chat.chat_id, waiting_id) == [waiting_id]


def test_status_shows_queues_workers_jobs_and_failures(tmp_path: Path,
                                                       model_cache: Path) -> None:
    # The embedded deployment with no worker: the jobs' states are set the way workers set
    # them (a claim with its heartbeat, a failure), so the screen has something in each part.
    stack = Stack.create("embedded", tmp_path / "stack", model_cache, MUSESPARK_IMAGE_TAKES="1",
                         MUSESPARK_JOB_STALE_AFTER_SECONDS="600")
    stack._runtime = BotRuntime(stack.settings, redrive=False)  # nothing is re-sent meanwhile
    try:
        chat = stack.chat()
        first, second, third = (_status_job(chat.say(f"/imagine a lighthouse {n}"))
                                for n in range(3))
        store = stack.runtime.store
        claim = store.claim(first, worker="gpu-7:4242", stale_after=30, max_attempts=3)
        assert claim is not None
        failed = store.claim(third, worker="gpu-7:4242", stale_after=30, max_attempts=3)
        assert failed is not None
        with store.finishing(failed, JobState.FAILED, reason="The model ran out of memory."):
            pass
        env = {k: v for k, v in os.environ.items() if not k.startswith("MUSESPARK_")}
        env.update(stack.env, PYTHONPATH=str(REPO))
        shown = subprocess.run([sys.executable, "-m", "bots.cli", "status", "--json"],
                               env=env, capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0, shown.stderr
        status = json.loads(shown.stdout)
        assert status["broker"] == "embedded"
        assert status["queue_depths"] == {"gpu.text": 0, "gpu.image": 3}  # nobody consumed
        assert [(w["name"], [j["job_id"] for j in w["running"]]) for w in status["workers"]] == [
            ("gpu-7:4242", [first])]
        assert status["jobs_by_state"] == {"queued": 1, "running": 1, "delivered": 0,
                                               "failed": 1, "cancelled": 0}
        assert status["oldest_waiting"]["job_id"] == second
        assert status["failures_by_reason"] == {"The model ran out of memory.": 1}
        screen = subprocess.run([sys.executable, "-m", "bots.cli", "status"],
                                env={**env, "COLUMNS": "200"},
                                capture_output=True, text=True, timeout=120)
        assert screen.returncode == 0, screen.stderr
        for text in ("gpu.image", "gpu-7:4242", first, second, "ran out of memory"):
            assert text in screen.stdout, text
    finally:
        stack.close()


def test_status_says_what_is_wrong_with_a_database_it_cannot_read(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSESPARK_")}
    env.update(MUSESPARK_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(REPO))
    shown = subprocess.run([sys.executable, "-m", "bots.cli", "status"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 2
    assert "run `musespark db upgrade`" in shown.stderr and "Traceback" not in shown.stderr


def test_a_metrics_port_in_use_is_reported_and_the_process_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import socket

    from core.metrics import serve_bot_metrics
    from core.settings import Settings
    from core.store import Store

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(_env_file=None, data_dir=tmp_path,  # type: ignore[call-arg]
                            metrics_port=port, metrics_addr="127.0.0.1")
        store = Store(settings.resolved_database_url)
        assert serve_bot_metrics(settings, store) is None
    assert f"cannot listen on 127.0.0.1:{port}" in caplog.text
    assert "MUSESPARK_METRICS_PORT" in caplog.text
