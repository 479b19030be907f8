"""Event -> task-start latency and ingest rate: MuseSpark's core against raw Celery.

For each backend (embedded SQLite transport + SQLite store; Redis + PostgreSQL) it starts one
real worker process, then, on the same broker and queue in the same run:

* latency: alternately sends one raw ``send_task`` and one chat event through the orchestrator
  (parse, user/community rows, job row, publish, published mark, queue position), waits for the
  task body to start, and records the gap. p50 and p99 over ``--events`` of each.
* ingest: sends ``--burst`` of each back to back and reports events accepted per second.

    .venv/bin/python bench/latency.py --events 200 --burst 300
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

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


def run_backend(name: str, env: dict[str, str], events: int, burst: int, tmp: Path) -> dict:
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
        for path, send in (("raw", send_raw), ("core", send_core)):
            began = time.perf_counter()
            tokens = [send() for _ in range(burst)]
            ingest[path] = burst / (time.perf_counter() - began)
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
    return {"latency": latency, "ingest": ingest, "drained": drained}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200, help="latency samples per path")
    parser.add_argument("--burst", type=int, default=300, help="events per path for ingest")
    parser.add_argument("--backends", default="embedded,distributed")
    args = parser.parse_args()
    saved = dict(os.environ)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for name in args.backends.split(","):
            os.environ.clear()
            os.environ.update({k: v for k, v in saved.items() if not k.startswith("MUSESPARK_")})
            env = {"MUSESPARK_DATA_DIR": str(tmp / name)}
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
                rows.append((name, run_backend(name, env, args.events, args.burst, tmp)))
            finally:
                for step in cleanup:
                    step()
    print(f"\nevent -> task-start latency ({args.events} each, alternating) and ingest "
          f"({args.burst} back to back)")
    print(f"{'backend':<12}{'path':<6}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'ingest/s':>10}"
          f"{'drained/s':>11}")
    for name, result in rows:
        for path in ("raw", "core"):
            values = [v * 1000 for v in result["latency"][path]]
            print(f"{name:<12}{path:<6}{statistics.median(values):>9.2f}"
                  f"{percentile(values, 0.99):>9.2f}{statistics.fmean(values):>9.2f}"
                  f"{result['ingest'][path]:>10.0f}{result['drained'][path]:>11.0f}")
        lat = result["latency"]
        p50 = statistics.median(lat["core"]) / statistics.median(lat["raw"])
        p99 = percentile(lat["core"], 0.99) / percentile(lat["raw"], 0.99)
        ingest = result["ingest"]["core"] / result["ingest"]["raw"]
        print(f"{name:<12}ratio core/raw: p50 {p50:.2f}x, p99 {p99:.2f}x, ingest {ingest:.2f}x "
              f"(target latency <= 1.5x)")


if __name__ == "__main__":
    main()
