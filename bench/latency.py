"""Event -> task-start latency and ingest rate: MuseSpark's core against raw Celery.

For each backend (embedded SQLite transport + SQLite store; Redis + PostgreSQL) it starts one
real worker process, then, on the same broker and queue in the same run:

* latency: alternately sends one raw ``send_task`` and one chat event through the orchestrator
  (parse, user/community rows, job row, publish, published mark, queue position), waits for the
  task body to start, and records the gap. p50 and p99 over ``--events`` of each.
* ingest: sends ``--burst`` of each back to back and reports events accepted per second; the
  core also with each of ``--threads`` senders at once (as the adapters hand it concurrent
  updates: up to ``bots.runtime.HANDLER_THREADS``), with the bot process's CPU time per event
  (its ceiling on one core, whatever else shares the machine).
* adapters (``--adapter-burst N``): N requests pushed at once through the Telegram adapter (the
  real PTB Application against tests/fake_telegram.py, one group chat and N people) and through
  the Discord client (N slash-command interactions against tests/fake_discord.py): seconds
  until every request has its job, and how many status messages the chat got.

    .venv/bin/python bench/latency.py --events 200 --burst 300 --threads 8,64 --adapter-burst 500
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.events import Actor, Channel, MessageReceived  # noqa: E402
from core.orchestrator import Orchestrator  # noqa: E402
from core.queue import CeleryPublisher, make_celery  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.store import Store  # noqa: E402
from tests._stack import (  # noqa: E402
    REDIS_URL,
    create_pg_database,
    drop_pg_database,
    drop_redis_prefix,
    postgres_reachable,
    redis_reachable,
)

START_TIMEOUT_SECONDS = 120.0


class Starts:
    """Tails the file the probe worker appends ``token start_time`` lines to."""

    def __init__(self, path: Path) -> None:
        path.touch()
        self._file = path.open()
        self._partial = ""  # a line read before its writer finished it
        self.seen: dict[str, float] = {}

    def wait(self, token: str) -> float:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while token not in self.seen:
            chunk = self._file.readline()
            if chunk:
                self._partial += chunk
                if self._partial.endswith("\n"):
                    key, started = self._partial.split()
                    self.seen[key] = float(started)
                    self._partial = ""
            elif time.monotonic() > deadline:
                raise TimeoutError(f"task {token} never started")
            else:
                time.sleep(0.0005)
        return self.seen[token]


def _broker_state(settings: Settings) -> str:
    """What is left in the broker (for diagnosing a task that never started)."""
    if settings.embedded_broker:
        import sqlite3

        from core._sqlite_broker import path_from_url

        with sqlite3.connect(path_from_url(settings.resolved_broker_url)) as db:
            return repr(db.execute("SELECT queue, visible_at > strftime('%s','now'), deliveries, "
                                   "count(*) FROM messages GROUP BY 1, 2, 3").fetchall())
    import redis

    client = redis.Redis.from_url(settings.resolved_broker_url)
    return repr({k.decode(): client.type(k).decode() for k in client.scan_iter(count=1000)})


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _concurrently(send: Any, count: int, threads: int) -> list[str]:
    """``send()`` ``count`` times from ``threads`` threads at once; the tokens it returned."""
    tokens: list[str] = []
    lock = threading.Lock()
    per_thread = [count // threads + (1 if n < count % threads else 0) for n in range(threads)]

    def run(times: int) -> None:
        mine = [send() for _ in range(times)]
        with lock:
            tokens.extend(mine)

    workers = [threading.Thread(target=run, args=(n,)) for n in per_thread]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return tokens


def run_backend(name: str, env: dict[str, str], events: int, burst: int, tmp: Path,
                threads: tuple[int, ...] = (8,)) -> dict:
    os.environ.update(env)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    store = Store(settings.resolved_database_url)
    store.upgrade()
    publisher = CeleryPublisher(settings)
    orchestrator = Orchestrator(store, publisher, settings)
    raw_app = make_celery(settings, name="bench-raw")
    starts_path = tmp / f"starts-{name}.txt"
    worker_env = dict(os.environ, BENCH_STARTS_FILE=str(starts_path),
                      PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'bench'}")
    flags = ["--without-mingle", "--without-gossip", "--without-heartbeat"] \
        if settings.embedded_broker else []
    log = (tmp / f"worker-{name}.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "_probe_worker", "worker", "-Q", "gpu.text",
         "-c", "1", "--pool", "prefork", "-l", "warning", *flags],
        env=worker_env, stdout=log, stderr=subprocess.STDOUT)
    starts = Starts(starts_path)
    actor, channel = Actor("bench-user", "Bench"), Channel("bench-chat")

    def send_raw() -> str:
        token = uuid.uuid4().hex
        raw_app.send_task("bench.raw", args=[token], queue="gpu.text")
        return token

    def send_core() -> str:
        event = MessageReceived(platform="bench", event_id=uuid.uuid4().hex, actor=actor,
                                channel=channel, text="/write a haiku about rain")
        (reply,) = orchestrator.handle(event)
        assert reply.job_id, reply.text
        return reply.job_id

    try:
        starts.wait(send_raw())  # the worker is up, connections are warm
        starts.wait(send_core())
        latency: dict[str, list[float]] = {"raw": [], "core": []}
        for _ in range(events):
            for path, send in (("raw", send_raw), ("core", send_core)):
                sent = time.time()
                token = send()
                latency[path].append(starts.wait(token) - sent)
        ingest: dict[str, float] = {}
        drained: dict[str, float] = {}
        cpu: dict[str, float] = {}  # the bot process's CPU seconds per event
        grouped: dict[str, tuple[int, int]] = {}
        paths = [("raw", send_raw, 1), ("core", send_core, 1)] + [
            (f"core*{n}", send_core, n) for n in threads]
        for path, send, senders in paths:
            began, cpu_began = time.perf_counter(), time.process_time()
            if senders > 1:
                before = (store.group_commit.groups, store.group_commit.members)
                tokens = _concurrently(send, burst, senders)
                grouped[path] = (store.group_commit.groups - before[0],
                                 store.group_commit.members - before[1])
            else:
                tokens = [send() for _ in range(burst)]
            ingest[path] = burst / (time.perf_counter() - began)
            cpu[path] = (time.process_time() - cpu_began) / burst
            for token in tokens:
                try:
                    starts.wait(token)
                except TimeoutError:
                    print(f"{name} {path}: {token} never started; {len(starts.seen)} starts seen; "
                          f"broker: {_broker_state(settings)}", file=sys.stderr)
                    raise
            drained[path] = burst / (time.perf_counter() - began)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        publisher.close()
        raw_app.close()
        store.dispose()
    return {"latency": latency, "ingest": ingest, "drained": drained, "grouped": grouped,
            "cpu": cpu}


def _wait_jobs(store: Store, prefix: str, count: int, timeout: float = 300) -> None:
    from sqlalchemy import func, select

    from core.store import Job

    deadline = time.monotonic() + timeout
    while True:
        with store.session() as s:
            made = s.scalar(select(func.count()).select_from(Job)
                            .where(Job.idempotency_key.like(prefix + "%"))) or 0
        if made >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{made} of {count} requests taken")
        time.sleep(0.05)


def telegram_burst(count: int, runtime: Any) -> tuple[float, int]:
    """``count`` requests in one group chat from ``count`` people, pushed at once."""
    from bots.telegram import running
    from tests.fake_telegram import FakeTelegram

    chat = -900_000_001
    with FakeTelegram() as fake:
        from pydantic import SecretStr

        settings = runtime.settings.model_copy(update={
            "telegram_token": SecretStr(fake.token), "telegram_api_url": fake.url})
        ready, stop = threading.Event(), threading.Event()

        def serve() -> None:
            async def main() -> None:
                async with running(runtime, settings=settings, poll_timeout_seconds=1):
                    ready.set()
                    while not stop.is_set():
                        await asyncio.sleep(0.05)
            asyncio.run(main())

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        ready.wait(60)
        began = time.perf_counter()
        for n in range(count):
            fake.push(fake.text_update(chat, f"/imagine burst {n} --count 1", user_id=7000 + n))
        _wait_jobs(runtime.store, f"telegram:{chat}:", count)
        seconds = time.perf_counter() - began
        time.sleep(4)  # let gathered statuses out
        statuses = len(fake.calls("sendMessage", chat_id=chat))
        stop.set()
        thread.join(30)
    return seconds, statuses


def discord_burst(count: int, runtime: Any) -> tuple[float, int]:
    """``count`` /imagine interactions from ``count`` people, arriving at once."""
    from bots.discord import MuseSparkDiscord
    from tests.fake_discord import BOT_TOKEN, serving, slash_payload

    with serving() as fake:
        async def main() -> float:
            client = MuseSparkDiscord(runtime.orchestrator, runtime.store)
            await client.login(BOT_TOKEN)
            try:
                payloads = [slash_payload(fake, "imagine", {"prompt": f"burst {n}", "count": 1},
                                          user_id=str(600000000000000000 + n))
                            for n in range(count)]
                began = time.perf_counter()
                for payload in payloads:
                    client._connection.parse_interaction_create(payload)
                while len(fake.calls_to("PATCH", "@original")) < count:
                    await asyncio.sleep(0.02)
                    if time.perf_counter() - began > 300:
                        raise TimeoutError("Discord burst not answered")
                return time.perf_counter() - began
            finally:
                await client.close()

        seconds = asyncio.run(main())
        return seconds, len(fake.calls_to("PATCH", "@original"))


def adapter_bursts(count: int, data_dir: Path) -> dict[str, tuple[float, int]]:
    """Each adapter's burst, on the current backend (a bot runtime of its own, no worker:
    taking a request is what is measured)."""
    from bots.runtime import BotRuntime

    os.environ["MUSESPARK_DATA_DIR"] = str(data_dir)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    with BotRuntime(settings, redrive=False) as runtime:
        return {"telegram": telegram_burst(count, runtime),
                "discord": discord_burst(count, runtime)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200, help="latency samples per path")
    parser.add_argument("--burst", type=int, default=300, help="events per path for ingest")
    parser.add_argument("--backends", default="embedded,distributed")
    parser.add_argument("--threads", default="8,64",
                        help="senders at once for each concurrent core ingest (core*N), "
                             "comma-separated")
    parser.add_argument("--adapter-burst", type=int, default=0,
                        help="requests pushed at once through each adapter's fake (0: skip)")
    args = parser.parse_args()
    threads = tuple(int(n) for n in args.threads.split(","))
    saved = dict(os.environ)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for name in args.backends.split(","):
            os.environ.clear()
            os.environ.update({k: v for k, v in saved.items() if not k.startswith("MUSESPARK_")})
            # One bench "person" sends every event: no quota, no fair-share hold (what is
            # measured is taking a request, not the policy that would refuse a flood).
            env = {"MUSESPARK_DATA_DIR": str(tmp / name), "MUSESPARK_QUOTA_PERSON_HOURLY": "0",
                   "MUSESPARK_QUOTA_PERSON_DAILY": "0", "MUSESPARK_QUOTA_COMMUNITY_HOURLY": "0",
                   "MUSESPARK_FAIR_SHARE_INFLIGHT": "0"}
            cleanup = []
            if name == "distributed":
                problems = [p for p in (redis_reachable(), postgres_reachable()) if p]
                if problems:
                    print(f"distributed: skipped ({'; '.join(problems)})")
                    continue
                db_name, env["MUSESPARK_DATABASE_URL"] = create_pg_database()
                prefix = f"musespark-bench-{uuid.uuid4().hex[:8]}:"
                env["MUSESPARK_BROKER_URL"] = REDIS_URL
                env["MUSESPARK_BROKER_KEY_PREFIX"] = prefix
                cleanup = [lambda: drop_pg_database(db_name), lambda: drop_redis_prefix(prefix)]
            try:
                result = run_backend(name, env, args.events, args.burst, tmp, threads)
                if args.adapter_burst:
                    result["adapters"] = adapter_bursts(args.adapter_burst, tmp / f"{name}-ad")
                rows.append((name, result))
            finally:
                for step in cleanup:
                    step()
    print(f"\nevent -> task-start latency ({args.events} each, alternating) and ingest "
          f"({args.burst} back to back)")
    print(f"{'backend':<12}{'path':<9}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'ingest/s':>10}"
          f"{'drained/s':>11}{'bot CPU ms/event':>18}")
    for name, result in rows:
        for path in result["ingest"]:
            values = [v * 1000 for v in result["latency"].get(path, [])]
            timing = (f"{statistics.median(values):>9.2f}{percentile(values, 0.99):>9.2f}"
                      f"{statistics.fmean(values):>9.2f}" if values else f"{'':>27}")
            print(f"{name:<12}{path:<9}{timing}"
                  f"{result['ingest'][path]:>10.0f}{result['drained'][path]:>11.0f}"
                  f"{result['cpu'][path] * 1000:>18.2f}")
        lat = result["latency"]
        p50 = statistics.median(lat["core"]) / statistics.median(lat["raw"])
        p99 = percentile(lat["core"], 0.99) / percentile(lat["raw"], 0.99)
        ingest = result["ingest"]["core"] / result["ingest"]["raw"]
        concurrent = ", ".join(
            f"with {n} senders {result['ingest'][f'core*{n}'] / result['ingest']['raw']:.2f}x"
            for n in threads)
        print(f"{name:<12}ratio core/raw: p50 {p50:.2f}x, p99 {p99:.2f}x, ingest {ingest:.2f}x, "
              f"{concurrent} (targets: latency <= 1.5x, core ingest >= 1000/s)")
        for path, (commits, requests) in result["grouped"].items():
            print(f"{name:<12}group commit, {path}: {requests} requests in {commits} "
                  f"transactions ({requests / max(1, commits):.1f} per commit)")
        for adapter, (seconds, statuses) in result.get("adapters", {}).items():
            print(f"{name:<12}{adapter} burst: {args.adapter_burst} requests all taken in "
                  f"{seconds:.1f} s ({args.adapter_burst / seconds:.0f}/s), {statuses} status "
                  f"messages in the chat")


if __name__ == "__main__":
    main()
