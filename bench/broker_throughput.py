"""Throughput and latency of the embedded SQLite broker next to Redis, through the same kombu API.

    cd /work/main && PYTHONPATH=/work/main .venv/bin/python bench/broker_throughput.py \
        [--n 2000] [--samples 200] [--redis redis://127.0.0.1:6379/15] [--dir /tmp/x]

Measured per transport:

* publish/s: one producer puts ``--n`` small messages (a Celery-sized JSON body) in a row;
* consume+ack/s: one consumer gets and acks them all;
* round trip: a consumer thread waits in ``drain_events`` on its own connection; the main thread
  publishes one message at a time, at a random moment 0-200 ms after the previous one arrived
  (so publishes fall at random phases of the consumer's polling cycle); latency = receive time -
  publish time. For the polling SQLite transport it is about ``polling_interval / 2`` on average
  and at most ``polling_interval`` plus the query.

SQLite runs with ``synchronous=FULL`` (the default) and ``NORMAL``, and with the default
``polling_interval`` (0.1 s) and the 0.05 s MuseSpark sets. Ratios are Redis / SQLite.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import kombu

from core import _sqlite_broker

QUEUE = "bench.broker"
BODY = {"job_id": "0" * 32, "kind": "text", "params": {"max_new_tokens": 160}}


def throughput(url: str, n: int, options: dict) -> tuple[float, float]:
    with kombu.Connection(url, transport_options=options) as conn:
        q = conn.SimpleQueue(QUEUE)
        q.clear()
        t0 = time.perf_counter()
        for i in range(n):
            q.put({**BODY, "i": i})
        t1 = time.perf_counter()
        for _ in range(n):
            q.get(timeout=10).ack()
        t2 = time.perf_counter()
        q.close()
    return n / (t1 - t0), n / (t2 - t1)


def round_trip(url: str, samples: int, options: dict) -> list[float]:
    latencies: list[float] = []
    ready = threading.Event()
    stop = threading.Event()

    def consume() -> None:
        with kombu.Connection(url, transport_options=options) as conn:

            def on_message(body, message):
                latencies.append(time.perf_counter() - body["sent"])
                message.ack()

            queue = kombu.Queue(QUEUE, kombu.Exchange(QUEUE), QUEUE)
            with conn.Consumer(queue, callbacks=[on_message]):
                ready.set()
                while not stop.is_set():
                    try:
                        conn.drain_events(timeout=0.5)
                    except socket.timeout:
                        pass

    with kombu.Connection(url, transport_options=options) as conn:
        q = conn.SimpleQueue(QUEUE)
        q.clear()
        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        ready.wait(10)
        rng = random.Random(7)
        for _ in range(samples):
            time.sleep(rng.uniform(0.0, 0.2))
            expected = len(latencies) + 1
            q.put({**BODY, "sent": time.perf_counter()})
            deadline = time.monotonic() + 5
            while len(latencies) < expected and time.monotonic() < deadline:
                time.sleep(0.0005)
        stop.set()
        thread.join(5)
        q.close()
    return latencies


def summarize(name: str, url: str, n: int, samples: int, options: dict) -> dict:
    pub, con = throughput(url, n, options)
    lat = round_trip(url, samples, options)
    lat.sort()
    row = {
        "name": name,
        "publish/s": pub,
        "consume+ack/s": con,
        "rtt mean ms": 1000 * statistics.fmean(lat),
        "rtt p50 ms": 1000 * statistics.median(lat),
        "rtt p95 ms": 1000 * lat[int(0.95 * (len(lat) - 1))],
        "rtt max ms": 1000 * lat[-1],
    }
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--dir", default=None, help="folder for the SQLite file (default: tmp)")
    args = parser.parse_args()

    folder = Path(args.dir or tempfile.mkdtemp(prefix="broker-bench-"))
    sqlite_url = _sqlite_broker.url_for(folder / "bench.db")
    runs = [
        ("sqlite FULL  poll=0.1", sqlite_url, {}),
        ("sqlite FULL  poll=0.05", sqlite_url, {"polling_interval": 0.05}),
        ("sqlite NORMAL poll=0.05", sqlite_url,
         {"polling_interval": 0.05, "sqlite_synchronous": "NORMAL"}),
    ]
    try:
        with kombu.Connection(args.redis, connect_timeout=2) as probe:
            probe.ensure_connection(max_retries=1)
        runs.insert(0, ("redis", args.redis, {}))
    except Exception as exc:  # no Redis here: report SQLite alone
        print(f"(redis at {args.redis} unavailable: {exc}; SQLite only)", file=sys.stderr)

    results = [summarize(name, url, args.n, args.samples, opts) for name, url, opts in runs]
    cols = ["publish/s", "consume+ack/s", "rtt mean ms", "rtt p50 ms", "rtt p95 ms", "rtt max ms"]
    print(f"n={args.n} messages, {args.samples} round trips; sqlite file {folder / 'bench.db'}")
    print(f"{'transport':26}" + "".join(f"{c:>15}" for c in cols))
    for r in results:
        print(f"{r['name']:26}" + "".join(f"{r[c]:15.1f}" for c in cols))
    redis = next((r for r in results if r["name"] == "redis"), None)
    if redis:
        print("\nratios redis / sqlite (throughput: how many times faster Redis is; "
              "latency: < 1 means Redis is quicker)")
        for r in results:
            if r is redis:
                continue
            print(f"{r['name']:26}"
                  f"  publish x{redis['publish/s'] / r['publish/s']:.1f}"
                  f"  consume+ack x{redis['consume+ack/s'] / r['consume+ack/s']:.1f}"
                  f"  rtt mean {redis['rtt mean ms'] / r['rtt mean ms']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
