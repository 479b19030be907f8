"""The embedded SQLite broker transport (core/_sqlite_broker.py), with real processes.

Run: ``cd /work/main && PYTHONPATH=/work/main .venv/bin/python -m pytest tests/test_sqlite_broker.py -q``
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import kombu
import pytest
from kombu import Exchange, Queue

from core import _sqlite_broker as broker

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def rows(db: Path, where: str = "1", params: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return conn.execute(
            f"SELECT id, queue, visible_at, deliveries FROM messages WHERE {where} ORDER BY id",
            params,
        ).fetchall()
    finally:
        conn.close()


def child_env(*extra_paths: Path, **env: str) -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in extra_paths), str(REPO)])
    out["PYTHONUNBUFFERED"] = "1"
    out.update(env)
    return out


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    what = what() if callable(what) else what
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "dir" / "broker.db"


def conn_for(db: Path, **options) -> kombu.Connection:
    return kombu.Connection(broker.url_for(db), transport_options=options)


# --------------------------------------------------------------------------------------------
# URL, registration, schema
# --------------------------------------------------------------------------------------------


def test_register_and_url_forms(tmp_path: Path) -> None:
    from kombu.transport import TRANSPORT_ALIASES, resolve_transport

    from core.settings import EMBEDDED_BROKER_SCHEME

    assert broker.SCHEME == EMBEDDED_BROKER_SCHEME
    broker.register()
    broker.register()  # idempotent
    assert TRANSPORT_ALIASES[broker.SCHEME] == "core._sqlite_broker:Transport"
    assert resolve_transport(broker.SCHEME) is broker.Transport

    assert broker.path_from_url("musespark-sqlite:////abs/dir/b.db") == Path("/abs/dir/b.db")
    assert broker.path_from_url("musespark-sqlite:///abs/dir/b.db") == Path("/abs/dir/b.db")
    assert broker.path_from_url(broker.url_for(tmp_path / "x.db")) == tmp_path / "x.db"
    for bad in ("musespark-sqlite://host/b.db", "musespark-sqlite:///", "redis://h/0"):
        with pytest.raises(ValueError):
            broker.path_from_url(bad)

    db = tmp_path / "a" / "b" / "broker.db"
    with kombu.Connection(f"musespark-sqlite:///{db}") as conn:
        conn.connect()
        assert conn.transport.driver_type == "sqlite"
        assert conn.transport.polling_interval == 0.1
    assert db.exists()  # parent folders created
    c = sqlite3.connect(db)
    try:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert c.execute("PRAGMA user_version").fetchone()[0] == broker.SCHEMA_VERSION
    finally:
        c.close()


def test_transport_options_are_honoured(db: Path) -> None:
    with conn_for(db, polling_interval=0.02, visibility_timeout=7, busy_timeout=2,
                  sqlite_synchronous="normal") as conn:
        chan = conn.default_channel
        assert conn.transport.polling_interval == 0.02
        assert chan.visibility_timeout == 7.0
        assert chan._db.busy_timeout == 2.0
        assert chan._db.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert chan._db.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 2000
    with conn_for(db) as conn:
        chan = conn.default_channel
        assert chan.visibility_timeout == 3600.0
        assert chan._db.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert chan._db.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30000
    with pytest.raises(ValueError):
        conn_for(db, sqlite_synchronous="OFF").default_channel  # noqa: B018


# --------------------------------------------------------------------------------------------
# kombu-level semantics
# --------------------------------------------------------------------------------------------


def test_fifo_ack_deletes_and_reject_requeues_same_row(db: Path) -> None:
    n = 40
    with conn_for(db) as conn:
        q = conn.SimpleQueue("jobs")
        for i in range(n):
            q.put({"i": i})
        assert q.qsize() == n
        assert len(rows(db)) == n

        # reject(requeue=True): the same row comes back first, flagged redelivered; no copy.
        first = q.get(timeout=2)
        assert first.payload == {"i": 0}
        row_id = first.delivery_info[broker.ROW_ID_KEY]
        assert first.delivery_info["redelivered"] is False
        assert q.qsize() == n - 1  # claimed rows are not "ready"
        first.reject(requeue=True)
        assert len(rows(db)) == n
        again = q.get(timeout=2)
        assert again.payload == {"i": 0}
        assert again.delivery_info[broker.ROW_ID_KEY] == row_id
        assert again.delivery_info["redelivered"] is True
        assert again.delivery_tag != first.delivery_tag
        assert rows(db, "id = ?", (row_id,))[0][3] == 2  # deliveries
        again.ack()
        assert rows(db, "id = ?", (row_id,)) == []

        # reject(requeue=False) deletes.
        dropped = q.get(timeout=2)
        assert dropped.payload == {"i": 1}
        dropped.reject(requeue=False)
        assert len(rows(db)) == n - 2

        got = []
        for _ in range(n - 2):
            m = q.get(timeout=2)
            got.append(m.payload["i"])
            m.ack()
        assert got == list(range(2, n))
        with pytest.raises(q.Empty):
            q.get(timeout=0.3)
        q.close()
    assert rows(db) == []


def test_size_purge_delete_has_queue(db: Path) -> None:
    with conn_for(db) as conn:
        q = conn.SimpleQueue("work")
        chan = q.channel
        assert chan._has_queue("work")
        assert not chan._has_queue("never-declared")
        for i in range(5):
            q.put(i)
        other = conn.SimpleQueue("other")
        other.put("x")
        held = q.get(timeout=2)  # claimed, unacked
        assert q.qsize() == 4
        assert q.clear() == 4  # purge removes ready messages only
        assert q.qsize() == 0
        assert [r[1] for r in rows(db)] == ["work", "other"]  # the claimed row stays
        held.ack()
        assert [r[1] for r in rows(db)] == ["other"]

        q.put("y")
        chan.queue_delete("work")
        assert not chan._has_queue("work")
        assert [r[1] for r in rows(db)] == ["other"]
        assert other.qsize() == 1
        # a queue with messages but no declaration still "exists"
        c = sqlite3.connect(db)
        c.execute("DELETE FROM queues")
        c.commit()
        c.close()
        assert chan._has_queue("other")


def test_priority_then_fifo(db: Path) -> None:
    with conn_for(db) as conn:
        producer = conn.Producer()
        queue = Queue("prio", Exchange("prio"), "prio")
        for i, pri in enumerate([0, 5, 0, 9, 5]):
            producer.publish({"i": i}, exchange=queue.exchange, routing_key="prio",
                             declare=[queue], priority=pri)
        q = conn.SimpleQueue(queue)
        order = []
        for _ in range(5):
            m = q.get(timeout=2)
            order.append(m.payload["i"])
            m.ack()
        assert order == [3, 1, 4, 0, 2]


def test_closing_a_channel_restores_unacked_at_once(db: Path) -> None:
    with conn_for(db) as c1, conn_for(db) as c2:
        q1 = c1.SimpleQueue("jobs")
        q1.put("a")
        m = q1.get(timeout=2)
        q2 = c2.SimpleQueue("jobs")
        with pytest.raises(q2.Empty):
            q2.get(timeout=0.3)  # hidden for the full visibility_timeout (3600 s)
        c1.release()  # closes the channel: the unacked message is given back now
        m2 = q2.get(timeout=2)
        assert m2.payload == "a"
        assert m2.delivery_info[broker.ROW_ID_KEY] == m.delivery_info[broker.ROW_ID_KEY]
        assert len(rows(db)) == 1
        m2.ack()
    assert rows(db) == []


def test_no_ack_consumer_takes_the_row(db: Path) -> None:
    with conn_for(db) as conn:
        q = conn.SimpleQueue("noack", no_ack=True)
        q.put("a")
        q.put("b")
        assert q.get(timeout=2).payload == "a"
        assert len(rows(db)) == 1
        assert q.get_nowait().payload == "b"  # basic_get(no_ack=True)
        assert rows(db) == []


def test_live_consumer_renews_its_claim(db: Path) -> None:
    """A message held unacked by a consumer that keeps polling is not redelivered after vt."""
    vt = 1.2  # renewed every vt/4; generous so that a loaded 2-core machine does not flake
    with conn_for(db, visibility_timeout=vt) as holder, conn_for(db, visibility_timeout=vt) as other:
        holder.SimpleQueue("lease").put("long job")
        held = []
        consumer = holder.Consumer(Queue("lease", Exchange("lease"), "lease"),
                                   callbacks=[lambda body, msg: held.append(msg)])
        consumer.consume()
        wait_for(lambda: _drain(holder) or held, 3, "the holder to get the message")
        (row,) = rows(db)
        first_expiry = row[2]
        oq = other.SimpleQueue("lease")
        end = time.monotonic() + 2.5 * vt
        while time.monotonic() < end:
            _drain(holder)
            with pytest.raises(oq.Empty):
                oq.get_nowait()
        assert time.time() > first_expiry  # we did wait past the original claim's expiry
        (row,) = rows(db)
        assert row[2] > first_expiry and row[3] == 1  # renewed, never delivered again
        held[0].ack()
        assert rows(db) == []


def _drain(conn: kombu.Connection) -> None:
    try:
        conn.drain_events(timeout=0.05)
    except socket.timeout:
        pass


def test_publish_error_propagates_and_retry_recovers(db: Path) -> None:
    with conn_for(db, busy_timeout=0.2) as conn:
        q = conn.SimpleQueue("jobs")  # declares, opens the file
        assert sqlite3.OperationalError in conn.connection_errors
        locker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        locker.execute("BEGIN IMMEDIATE")  # hold the write lock
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                q.producer.publish("lost?", routing_key="jobs", exchange="jobs", retry=False)
        finally:
            locker.execute("ROLLBACK")
        assert rows(db) == []  # nothing stored, and the publisher was told so

        # With kombu's retry (as Celery publishes), a lock released mid-way is survived; the
        # retry reconnects (a fresh kombu Transport) and still routes by the stored binding.
        locker.execute("BEGIN IMMEDIATE")
        releaser = threading.Timer(0.5, lambda: locker.execute("ROLLBACK"))
        releaser.start()
        try:
            producer = conn.Producer()
            producer.publish("kept", routing_key="jobs", exchange="jobs", retry=True,
                             retry_policy={"max_retries": 20, "interval_start": 0.1,
                                           "interval_step": 0.1, "interval_max": 0.2})
        finally:
            releaser.join()
            locker.close()
        assert len(rows(db)) == 1
    with conn_for(db) as other:  # (the retry closed the old connection's channels)
        assert other.SimpleQueue("jobs").get(timeout=2).payload == "kept"


def test_bindings_are_shared_between_connections(db: Path) -> None:
    direct = Queue("d1", Exchange("ex.direct", type="direct"), "rk")
    topic = Queue("t1", Exchange("ex.topic", type="topic"), "jobs.#")
    transient = Queue("tmp1", Exchange("ex.direct", type="direct"), "rk", auto_delete=True)
    with conn_for(db) as consumer_side:
        for queue in (direct, topic, transient):
            queue(consumer_side.default_channel).declare()
    with conn_for(db) as publisher:  # has declared nothing
        producer = publisher.Producer()
        producer.publish("to-direct", exchange="ex.direct", routing_key="rk")
        producer.publish("to-topic", exchange="ex.topic", routing_key="jobs.image.big")
        producer.publish("nowhere", exchange="ex.topic", routing_key="other")
    assert sorted(r[1] for r in rows(db)) == ["d1", "t1"]  # not the auto-delete queue
    with conn_for(db) as conn:
        assert conn.SimpleQueue(direct).get(timeout=2).payload == "to-direct"
        assert conn.SimpleQueue(topic).get(timeout=2).payload == "to-topic"
        conn.default_channel.queue_delete("d1")
        conn.Producer().publish("after-delete", exchange="ex.direct", routing_key="rk")
    assert [r[1] for r in rows(db)] == ["t1"]  # the stored binding went with the queue


def test_fanout_is_refused_not_dropped(db: Path) -> None:
    with conn_for(db) as conn:
        assert not conn.transport.implements.exchange_type & {"fanout"}
        ex = Exchange("bcast", type="fanout")
        queue = Queue("bq", ex)
        with pytest.raises(NotImplementedError, match="fanout"):
            conn.Producer().publish("hello", exchange=ex, declare=[queue])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_neither_reuses_nor_restores_the_parents_claims(db: Path) -> None:
    import multiprocessing

    with conn_for(db) as conn:
        q = conn.SimpleQueue("jobs")
        q.put("held by parent")
        held = q.get(timeout=2)

        def child() -> None:
            # Publishes through the inherited kombu objects (a fresh sqlite3 connection is
            # opened), then closes them: that must not give back the parent's claim.
            q.put("from child")
            conn.release()

        proc = multiprocessing.get_context("fork").Process(target=child)
        proc.start()
        proc.join(30)
        assert proc.exitcode == 0
        assert len(rows(db)) == 2  # the child's publish landed
        (ready,) = rows(db, "visible_at <= ?", (time.time(),))
        assert ready[0] != held.delivery_info[broker.ROW_ID_KEY]  # the parent's claim held
        held.ack()  # the parent's own connection still works after the fork
        from_child = q.get(timeout=2)
        assert from_child.payload == "from child"
        from_child.ack()
    assert rows(db) == []


# --------------------------------------------------------------------------------------------
# processes: crash, concurrency
# --------------------------------------------------------------------------------------------

CRASHER = """
import json, os, signal, sys, time
import kombu
import core._sqlite_broker as broker
url = sys.argv[1]
with kombu.Connection(url, transport_options={"visibility_timeout": float(sys.argv[2])}) as c:
    q = c.SimpleQueue("jobs")
    q.put({"job": 3})  # committed, then the publisher dies: it must survive
    m = q.get(timeout=5)
    print(json.dumps({"payload": m.payload, "row": m.delivery_info[broker.ROW_ID_KEY]}),
          flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkilled_consumer_message_comes_back_after_visibility_timeout(
    db: Path, tmp_path: Path
) -> None:
    vt = 2.0
    script = tmp_path / "crasher.py"
    script.write_text(CRASHER)
    with conn_for(db, visibility_timeout=vt) as conn:
        q = conn.SimpleQueue("jobs")
        q.put({"job": 1})
        q.put({"job": 2})
        proc = subprocess.run(
            [sys.executable, str(script), broker.url_for(db), str(vt)],
            env=child_env(), capture_output=True, text=True, timeout=30,
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        claimed = json.loads(proc.stdout)
        assert claimed["payload"] == {"job": 1}
        (row,) = rows(db, "id = ?", (claimed["row"],))
        visible_at, deliveries = row[2], row[3]
        assert deliveries == 1  # claimed by the dead process

        # Meanwhile the other messages are delivered (including the one the crasher published
        # just before dying); the crashed one only once its claim has expired.
        m2 = q.get(timeout=2)
        assert m2.payload == {"job": 2}
        m2.ack()
        m3 = q.get(timeout=2)
        assert m3.payload == {"job": 3}
        m3.ack()
        m1 = q.get(timeout=vt + 5)
        assert time.time() >= visible_at
        assert m1.payload == {"job": 1}
        assert m1.delivery_info[broker.ROW_ID_KEY] == claimed["row"]
        assert m1.delivery_info["redelivered"] is True
        assert len(rows(db)) == 1  # the same row, no duplicate
        m1.ack()
    assert rows(db) == []


PUBLISHER = """
import sys
import kombu
import core._sqlite_broker  # registers the scheme
url, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with kombu.Connection(url) as c:
    q = c.SimpleQueue("work")
    for i in range(n):
        q.put({"id": f"{who}-{i}"})  # no retry: any error fails this process
"""

CONSUMER = """
import json, os, queue, socket, sys, threading, time
import kombu
import core._sqlite_broker
url, out, done_flag, mode = sys.argv[1:5]
received, acked = [], []
with kombu.Connection(url) as c:
    handoff = queue.Queue()

    def acker():
        while True:
            m = handoff.get()
            if m is None:
                return
            m.ack()
            acked.append(m.payload["id"])

    thread = threading.Thread(target=acker)
    thread.start()

    def on_message(body, message):
        received.append(body["id"])
        time.sleep(0.002)  # some work, so that a backlog builds and both consumers share it
        if mode == "thread":
            handoff.put(message)  # acked from another thread, as Celery's prefork pool does
        else:
            message.ack()
            acked.append(body["id"])

    q = kombu.Queue("work", kombu.Exchange("work"), "work")
    with c.Consumer(q, callbacks=[on_message], prefetch_count=8):
        open(out + ".ready", "w").close()
        idle_since = time.monotonic()
        while True:
            try:
                c.drain_events(timeout=0.2)
                idle_since = time.monotonic()
            except socket.timeout:
                if os.path.exists(done_flag) and time.monotonic() - idle_since > 1.0:
                    break
    handoff.put(None)
    thread.join()
with open(out, "w") as f:
    json.dump({"received": received, "acked": acked}, f)
"""


def test_many_publishers_and_consumers_lose_nothing(db: Path, tmp_path: Path) -> None:
    publishers, per_publisher = 4, 300
    (tmp_path / "pub.py").write_text(PUBLISHER)
    (tmp_path / "con.py").write_text(CONSUMER)
    done = tmp_path / "done.flag"
    url = broker.url_for(db)
    with conn_for(db) as conn:  # create the file and queue up front
        conn.SimpleQueue("work").close()
    env = child_env()
    consumers = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "con.py"), url, str(tmp_path / f"c{i}.json"),
             str(done), mode],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i, mode in enumerate(["inline", "thread"])
    ]
    # Both consumers poll before anything is published, so both take part.
    wait_for(lambda: all((tmp_path / f"c{i}.json.ready").exists() for i in range(2)), 30,
             "both consumers to start")
    pubs = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "pub.py"), url, f"p{i}", str(per_publisher)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(publishers)
    ]
    try:
        for p in pubs:
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 0, out
        done.touch()
        for c in consumers:
            out, _ = c.communicate(timeout=60)
            assert c.returncode == 0, out
    finally:
        for p in pubs + consumers:
            if p.poll() is None:
                p.kill()
                p.wait()

    expected = {f"p{i}-{j}" for i in range(publishers) for j in range(per_publisher)}
    received, acked, shares = [], [], []
    for i in range(2):
        data = json.loads((tmp_path / f"c{i}.json").read_text())
        received += data["received"]
        acked += data["acked"]
        shares.append(len(data["acked"]))
    assert all(shares), f"a consumer got nothing, no contention was exercised: {shares}"
    assert set(received) == expected  # none lost
    assert len(acked) == len(expected) and set(acked) == expected  # each acked exactly once
    assert len(received) == len(expected)  # and (no crash here) delivered exactly once
    assert rows(db) == []  # acks deleted every row


# --------------------------------------------------------------------------------------------
# a real Celery worker
# --------------------------------------------------------------------------------------------

CELERY_APP = """
import json, os, time
from pathlib import Path

import core._sqlite_broker
core._sqlite_broker.register()

from celery import Celery

OUT = Path(os.environ["T_OUT"])
app = Celery("tapp", broker=os.environ["T_BROKER"])
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_enable_remote_control=False,
    worker_send_task_events=False,
    task_send_sent_event=False,
    task_ignore_result=True,
    task_default_queue="jobs",
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": float(os.environ["T_VT"]),
                              "polling_interval": 0.05},
)


@app.task(name="tapp.write", bind=True)
def write(self, key):
    (OUT / f"{key}.done").write_text(json.dumps({"pid": os.getpid()}))


@app.task(name="tapp.slow", bind=True)
def slow(self, key, first_sleep, later_sleep):
    start = OUT / f"{key}.start"
    attempts = len(start.read_text().splitlines()) if start.exists() else 0
    redelivered = bool(self.request.delivery_info.get("redelivered"))
    with open(start, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "redelivered": redelivered,
                            "t": time.time()}) + "\\n")
    time.sleep(first_sleep if attempts == 0 else later_sleep)
    (OUT / f"{key}.done").write_text(json.dumps({"pid": os.getpid()}))
"""


def start_worker(tmp_path: Path, name: str, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tapp", "worker", "--pool", "prefork", "-c", "1",
         "--without-mingle", "--without-gossip", "--without-heartbeat", "-Q", "jobs",
         "-n", f"{name}@%h", "-l", "info"],
        env=env, cwd=tmp_path, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    return proc, log


def test_celery_prefork_worker_runs_tasks_and_survives_sigkill(db: Path, tmp_path: Path) -> None:
    from celery import Celery

    vt = 2.0  # renewed every vt/4; generous so that a loaded 2-core machine does not flake
    out = tmp_path / "out"
    out.mkdir()
    appdir = tmp_path / "app"
    appdir.mkdir()
    (appdir / "tapp.py").write_text(CELERY_APP)
    url = broker.url_for(db)
    env = child_env(appdir, T_OUT=str(out), T_BROKER=url, T_VT=str(vt))

    publisher = Celery("pub", broker=url, set_as_current=False)
    publisher.conf.update(task_default_queue="jobs", broker_connection_retry_on_startup=True)

    def log_of(path: Path) -> str:
        return path.read_text() if path.exists() else ""

    worker_a, log_a = start_worker(tmp_path, "a", env)
    worker_b = log_b = None
    try:
        # 1. Tasks published through the transport run in the worker's pool process.
        for k in range(3):
            publisher.send_task("tapp.write", args=[f"w{k}"], queue="jobs")
        wait_for(lambda: all((out / f"w{k}.done").exists() for k in range(3)), 30,
                 lambda: "three tasks to run in worker a\n" + log_of(log_a))
        pids = {json.loads((out / f"w{k}.done").read_text())["pid"] for k in range(3)}
        assert worker_a.pid not in pids  # ran in a prefork child, not eagerly

        # 2. SIGKILL the whole worker in the middle of an acks_late task.
        publisher.send_task("tapp.slow", args=["s", 60, 2 * vt], queue="jobs")
        wait_for(lambda: (out / "s.start").exists(), 15, "the slow task to start")
        child = json.loads((out / "s.start").read_text().splitlines()[0])["pid"]
        os.kill(worker_a.pid, signal.SIGKILL)  # main first, so it cannot requeue on worker-lost
        os.kill(child, signal.SIGKILL)
        worker_a.wait(timeout=10)
        (row,) = rows(db, "queue = 'jobs'")
        assert row[3] == 1 and row[2] > time.time() - 1  # still claimed by the dead worker

        # 3. Another worker gets it once the claim expires, and keeps it while it runs (2*vt).
        worker_b, log_b = start_worker(tmp_path, "b", env)
        wait_for(lambda: len(log_of(out / "s.start").splitlines()) == 2, 30,
                 lambda: "the slow task to be redelivered\n" + log_of(log_b))
        second = json.loads((out / "s.start").read_text().splitlines()[1])
        assert second["redelivered"] is True
        assert second["t"] >= row[2]  # not before the dead worker's claim expired
        while not (out / "s.done").exists():
            current = rows(db, "queue = 'jobs'")
            if (out / "s.done").exists():
                break
            assert len(current) == 1 and current[0][3] == 2, current  # never delivered again
            assert current[0][2] > time.time(), "live worker's claim was not renewed"
            assert worker_b.poll() is None, log_of(log_b)
            time.sleep(0.1)

        publisher.send_task("tapp.write", args=["after"], queue="jobs")
        wait_for(lambda: (out / "after.done").exists(), 20, "a task after recovery")

        # 4. SIGTERM to the main pid: warm shutdown, clean exit, nothing left behind.
        worker_b.send_signal(signal.SIGTERM)
        assert worker_b.wait(timeout=30) == 0, log_of(log_b)
        assert rows(db) == [], "acked task rows must be deleted"
        text = log_of(log_a) + log_of(log_b)
        assert "musespark-sqlite" in text  # the banner shows our transport was used
        assert "Traceback" not in text and "UNABLE TO RESTORE" not in text, text
    finally:
        publisher.close()
        for proc in (worker_a, worker_b):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
