# kombu's virtual base classes are mostly unannotated; calling into them is expected here.
# mypy: disallow-untyped-calls=False
"""MuseSpark's embedded broker: a kombu virtual transport on the standard-library ``sqlite3``.

URL: ``musespark-sqlite:////absolute/path/broker.db`` (scheme :data:`SCHEME`; the URL's path is
the file's path, so ``musespark-sqlite:///abs/path/b.db`` names the same absolute file; parent
folders are created). Call :func:`register` before Celery or kombu resolves such a URL; importing
this module calls it once.

Why this exists
===============
In embedded mode MuseSpark runs Celery workers as separate processes with no broker server, and a
queued job must never be lost or corrupted. The two server-less transports that ship with
Celery/kombu do not give that:

* ``filesystem://`` renames and reads message files with no atomicity between writer and reader;
  a consumer can read a half-written file and the worker crashes on the decode error.
* ``sqla+sqlite://`` (kombu's SQLAlchemy transport): kombu releases before 5.7 swallowed
  ``OperationalError`` ("database is locked") in ``_put`` with a rollback, so a publish under
  contention reported success for a message that was never stored (5.7.0, installed here,
  re-raises; its queue-row creation still swallows it); its ``_get`` marks a row
  ``visible = False`` for ever, with no visibility timeout, so a worker killed with SIGKILL
  between receiving and acknowledging loses the message; and acknowledged rows are never
  deleted.

Guarantees
==========
* **Durable publish.** ``_put`` is one ``BEGIN IMMEDIATE`` ... ``COMMIT`` transaction. Every error
  (including "database is locked" after ``busy_timeout``) propagates to the publisher, so a
  publish that returns normally means the row is committed. ``sqlite3.OperationalError`` is a
  kombu *connection error*, so ``Producer.publish(retry=True)`` / Celery's publish retry policy
  retries it before raising.
* **Crash safety.** WAL journal with ``synchronous=FULL`` by default: a committed message
  survives a crash of any process and also an OS crash or power cut. (``NORMAL`` is accepted as
  an option: with WAL it still survives any *process* crash, but the last commits before an OS
  crash may be rolled back.)
* **At-least-once delivery with leases.** ``_get`` claims the first visible row of the queue in
  one ``BEGIN IMMEDIATE`` transaction: ``visible_at = now + visibility_timeout`` and
  ``deliveries += 1``. The row id and that delivery count (the *claim*) travel in the message's
  ``delivery_info`` (``sqlite_row_id``, ``sqlite_claim``). ``basic_ack`` and
  ``basic_reject(requeue=False)`` DELETE the row; ``basic_reject(requeue=True)`` and the restore of
  unacked messages when a channel closes UPDATE it visible again (never a re-INSERT, so never a
  duplicate row). A consumer that dies without acking (SIGKILL, OOM, power) leaves the row claimed;
  it becomes visible again ``visibility_timeout`` seconds after the claim (or after its last
  renewal) and is delivered to another consumer with ``redelivered`` set.
* **Lease renewal.** A live consumer renews the claims of the messages it holds unacked every
  ``visibility_timeout / 4`` seconds from its polling loop (Celery's prefork main process polls
  all the time, also while a child runs a task, and while it holds ETA/countdown tasks). So a
  task that runs longer than ``visibility_timeout`` is *not* redelivered while its worker is
  alive; ``visibility_timeout`` bounds how long a *dead* consumer's messages stay hidden.
  (Not with ``--pool solo``/``threads`` tasks that block the polling thread: there the timeout
  must exceed the longest task, as with Redis.)
  Stale claims cannot interfere: restore and renewal only touch a row whose ``deliveries`` still
  equals the claim; an ack from a consumer whose claim expired still deletes the row (the work
  was done). ``AUTOINCREMENT`` keeps row ids from ever being reused, so a late ack can never
  delete a different, newer message.
* **Processes and threads.** One ``sqlite3`` connection per channel, guarded by a re-entrant
  lock (Celery's prefork pool acks from its result-handler thread while the main thread polls).
  Writers wait for each other through SQLite's ``busy_timeout`` (default 30 s); polling an empty
  queue is a plain read that takes no write lock. After ``fork()`` a child never touches the
  connection it inherited (it opens its own when it needs one, and it never restores or renews
  claims made by its parent).
* **Order.** Higher ``priority`` first (0..9, as in AMQP; note the Redis transport treats 0 as the
  highest), then first-published first; a requeued message keeps its place at the head.

Limits
======
* **No fanout exchanges.** Broadcast needs per-consumer queues with expiry that a server would
  clean up; this transport does not emulate them. Publishing to a fanout exchange raises
  ``NotImplementedError`` (it does not silently drop). Consequences for Celery: remote control
  (``celery inspect``/``control``, ``revoke`` broadcast, pidbox), mingle and gossip are
  unavailable. The worker must run with ``worker_enable_remote_control=False`` and
  ``--without-mingle --without-gossip --without-heartbeat`` (Celery also skips the control,
  mingle and gossip bootsteps on its own for this transport, because ``fanout`` is not in
  ``Transport.implements.exchange_type`` and its ``driver_type`` is ``'sqlite'``); set
  ``worker_send_task_events=False`` and ``task_send_sent_event=False``: events go to the
  ``celeryev`` topic exchange, whose consumers (monitors) bind auto-delete queues, which are
  not shared between processes (see Routing), so events would go nowhere; with no task events
  and ``--without-gossip --without-heartbeat`` the worker does not open its event connection.
* **Routing.** Bindings of durable, non-auto-delete queues to direct and topic exchanges are
  stored in the file (table ``bindings``), so any connection routes by them, also one that
  never declared the queue and one that kombu re-created while retrying a publish (kombu's
  other virtual transports, apart from Redis, keep bindings in one connection's memory and
  silently drop such messages). Bindings of auto-delete or exclusive queues stay in the
  declaring connection. A message that matches no binding at all is dropped, as AMQP does
  without ``mandatory``; the default exchange ``''`` routes by queue name, and Celery publishes
  its tasks that way.
* Not supported: message TTL/expiration, queue expiry/``x-max-length``, ``basic_ack(multiple=
  True)`` (acks just that tag), ``auto_delete`` queues (they stay until deleted), a limit on
  redeliveries of a message that kills every consumer (handle poison jobs in the app).
* Delivery tags are ``"<row id>.<claim>"`` strings, new for every delivery.
* ``basic_get``/``drain_events`` are polled (``polling_interval``, default 0.1 s), so delivery
  latency to an idle consumer is about half an interval on average and at most one. One SQLite
  file serialises all writes (put, claim, ack: three commits per message, each an fsync under
  ``FULL``); ``bench/broker_throughput.py`` measured ~4,000 publishes/s and ~2,500 consume+ack/s
  for one producer/consumer on the development VM, where fsync is cheap; on a disk with slow
  fsync expect far less (roughly 1 / (3 x fsync time) messages/s).
* Timestamps are wall-clock (``time.time()``) shared by all processes on the machine; a clock
  step changes when expired claims reappear. The file must be on a local filesystem (WAL needs
  shared memory; NFS is not supported); opening fails if WAL cannot be enabled.
* A purge (``queue_purge``) removes only ready messages; messages claimed and not yet acked stay
  (as in AMQP). ``queue_delete`` removes the queue's rows, claimed or not.

Transport options (``broker_transport_options`` in Celery)
===========================================================
``visibility_timeout`` (s, default 3600), ``polling_interval`` (s, default 0.1),
``busy_timeout`` (s, default 30), ``sqlite_synchronous`` (``"FULL"`` default, ``"EXTRA"`` or
``"NORMAL"``), plus kombu's virtual ``body_encoding`` and ``deadletter_queue``.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import weakref
from pathlib import Path
from queue import Empty
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.transport.virtual.exchange import FanoutExchange
from kombu.utils.json import dumps, loads

__all__ = [
    "SCHEME",
    "SCHEMA_VERSION",
    "Channel",
    "Transport",
    "path_from_url",
    "register",
    "url_for",
]

log = logging.getLogger(__name__)

#: URL scheme this transport is registered under (``core.settings.EMBEDDED_BROKER_SCHEME``).
SCHEME = "musespark-sqlite"
#: ``PRAGMA user_version`` of the file layout this module writes.
SCHEMA_VERSION = 1

#: Keys this transport adds to a delivered message's ``delivery_info``.
ROW_ID_KEY = "sqlite_row_id"
CLAIM_KEY = "sqlite_claim"

DEFAULT_VISIBILITY_TIMEOUT = 3600.0
DEFAULT_POLLING_INTERVAL = 0.1
DEFAULT_BUSY_TIMEOUT = 30.0
DEFAULT_SYNCHRONOUS = "FULL"
_SYNCHRONOUS_MODES = ("NORMAL", "FULL", "EXTRA")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    queue       TEXT    NOT NULL,
    payload     TEXT    NOT NULL,
    priority    INTEGER NOT NULL DEFAULT 0,
    visible_at  REAL    NOT NULL,
    deliveries  INTEGER NOT NULL DEFAULT 0,
    created_at  REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_queue
    ON messages (queue, priority DESC, id, visible_at);
CREATE TABLE IF NOT EXISTS queues (
    name        TEXT PRIMARY KEY,
    created_at  REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bindings (
    exchange       TEXT NOT NULL,
    exchange_type  TEXT NOT NULL,
    routing_key    TEXT NOT NULL,
    pattern        TEXT NOT NULL,
    queue          TEXT NOT NULL,
    PRIMARY KEY (exchange, routing_key, queue)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS bindings_by_queue ON bindings (queue);
"""

_FIRST_VISIBLE = (
    "SELECT id, payload, deliveries FROM messages "
    "WHERE queue = ? AND visible_at <= ? ORDER BY priority DESC, id LIMIT 1"
)


def path_from_url(url: str) -> Path:
    """The database file a ``musespark-sqlite://`` URL names (always absolute)."""
    parts = urlsplit(url)
    if parts.scheme != SCHEME:
        raise ValueError(f"not a {SCHEME}:// URL: {url!r}")
    if parts.netloc not in ("", "localhost"):
        raise ValueError(
            f"{SCHEME} URL must name an absolute path, e.g. {SCHEME}:////var/lib/broker.db "
            f"(got host {parts.netloc!r} in {url!r})"
        )
    raw = unquote(parts.path)
    if not raw.strip("/"):
        raise ValueError(f"{SCHEME} URL has no file path: {url!r}")
    return Path("/" + raw.lstrip("/"))


def url_for(path: str | os.PathLike[str]) -> str:
    """The broker URL for database file ``path`` (made absolute)."""
    return f"{SCHEME}:///{Path(path).expanduser().absolute()}"


# --------------------------------------------------------------------------------------------
# One SQLite connection, fork-aware
# --------------------------------------------------------------------------------------------

#: Connections inherited across fork(). A child must neither use nor close them (closing could
#: checkpoint or unlink the parent's WAL), so they are kept referenced here and never touched.
_INHERITED: list[sqlite3.Connection] = []
_LIVE_DBS: weakref.WeakSet[_Database] = weakref.WeakSet()


class _Database:
    """A lazily opened ``sqlite3`` connection with its lock; reopened in a forked child."""

    def __init__(self, path: Path, busy_timeout: float, synchronous: str) -> None:
        self.path = path
        self.busy_timeout = float(busy_timeout)
        self.synchronous = synchronous
        self.lock = threading.RLock()
        self.pid = os.getpid()
        self._conn: sqlite3.Connection | None = None
        _LIVE_DBS.add(self)

    def _forget_inherited(self) -> None:
        # Runs in a fresh child (single thread): leak, do not close, what the parent opened.
        if self._conn is not None:
            _INHERITED.append(self._conn)
            self._conn = None
        self.lock = threading.RLock()
        self.pid = os.getpid()

    @property
    def conn(self) -> sqlite3.Connection:
        """The connection; call with :attr:`lock` held."""
        if self.pid != os.getpid():  # forked without the at-fork hook (should not happen)
            self._forget_inherited()
        if self._conn is None:
            self._conn = self._open()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            str(self.path),
            timeout=self.busy_timeout,
            isolation_level=None,  # autocommit; every write transaction is explicit
            check_same_thread=False,  # guarded by self.lock
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(
                    f"cannot enable WAL journal on {self.path} (got {mode!r}); "
                    "the broker file must be on a local filesystem"
                )
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            # After a burst, shrink the WAL back to this size at the next checkpoint.
            conn.execute("PRAGMA journal_size_limit = 67108864")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"{self.path} has broker schema {version}, newer than {SCHEMA_VERSION}"
                )
            if version < SCHEMA_VERSION:
                with _transaction(conn):
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        with self.lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                if self.pid == os.getpid():
                    conn.close()
                else:
                    _INHERITED.append(conn)


def _after_fork_in_child() -> None:
    for db in list(_LIVE_DBS):
        db._forget_inherited()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; ``ROLLBACK`` and re-raise on any error."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
                return
            except BaseException:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:  # the original error matters more; nothing was committed
                pass


# --------------------------------------------------------------------------------------------
# Channel and transport
# --------------------------------------------------------------------------------------------


class _RefusingFanoutExchange(FanoutExchange):
    """Fanout is not supported: refuse to publish rather than drop the message silently."""

    def deliver(self, message: Any, exchange: str, routing_key: str, **kwargs: Any) -> None:
        raise NotImplementedError(
            f"{SCHEME} does not support fanout exchanges (broadcast, Celery remote control); "
            f"the message for exchange {exchange!r} was NOT delivered"
        )


class Channel(virtual.Channel):
    """A virtual channel storing messages in one SQLite table."""

    exchange_types = {**virtual.Channel.exchange_types, "fanout": _RefusingFanoutExchange}
    supports_fanout = False

    visibility_timeout = DEFAULT_VISIBILITY_TIMEOUT
    busy_timeout = DEFAULT_BUSY_TIMEOUT
    sqlite_synchronous = DEFAULT_SYNCHRONOUS

    from_transport_options = virtual.Channel.from_transport_options + (  # type: ignore[assignment]
        "visibility_timeout",
        "busy_timeout",
        "sqlite_synchronous",
    )

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self.visibility_timeout = float(self.visibility_timeout)
        if self.visibility_timeout <= 0:
            raise ValueError("visibility_timeout must be > 0")
        synchronous = str(self.sqlite_synchronous).upper()
        if synchronous not in _SYNCHRONOUS_MODES:
            raise ValueError(f"sqlite_synchronous must be one of {_SYNCHRONOUS_MODES}")
        self._noack_queues: set[str] = set()
        self._transient_queues: set[str] = set()
        self._last_renewal = time.monotonic()
        self._owner_pid = os.getpid()  # claims made by this channel belong to this process
        self._db = _Database(
            path_from_url(connection.client.hostname), self.busy_timeout, synchronous
        )
        with self._db.lock:  # open now, so a bad path fails at connect time
            self._db.conn  # noqa: B018

    # -- storage primitives -----------------------------------------------------------------

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        """Store ``message``; returns only once it is committed, raises otherwise."""
        payload = dumps(message)
        priority = self._get_message_priority(message)
        now = time.time()
        with self._db.lock:
            with _transaction(self._db.conn) as conn:
                conn.execute(
                    "INSERT OR IGNORE INTO queues (name, created_at) VALUES (?, ?)", (queue, now)
                )
                conn.execute(
                    "INSERT INTO messages (queue, payload, priority, visible_at, deliveries,"
                    " created_at) VALUES (?, ?, ?, ?, 0, ?)",
                    (queue, payload, priority, now, now),
                )

    def _claim(self, queue: str, no_ack: bool) -> dict[str, Any]:
        """Claim (or, for ``no_ack``, take) the first visible message of ``queue``."""
        with self._db.lock:
            conn = self._db.conn
            # Cheap read without the write lock: the common case of an empty queue.
            if conn.execute(
                "SELECT 1 FROM messages WHERE queue = ? AND visible_at <= ? LIMIT 1",
                (queue, time.time()),
            ).fetchone() is None:
                raise Empty()
            with _transaction(conn):
                now = time.time()
                row = conn.execute(_FIRST_VISIBLE, (queue, now)).fetchone()
                if row is not None:
                    row_id, payload, deliveries = row
                    if no_ack:
                        conn.execute("DELETE FROM messages WHERE id = ?", (row_id,))
                    else:
                        conn.execute(
                            "UPDATE messages SET visible_at = ?, deliveries = deliveries + 1 "
                            "WHERE id = ?",
                            (now + self.visibility_timeout, row_id),
                        )
        if row is None:
            raise Empty()
        claim = deliveries + 1
        message = loads(payload)
        props = message.setdefault("properties", {})
        # A delivery tag per delivery, so a redelivery never collides with an older one.
        props["delivery_tag"] = f"{row_id}.{claim}"
        info = props.setdefault("delivery_info", {})
        info[ROW_ID_KEY] = row_id
        info[CLAIM_KEY] = claim
        info["redelivered"] = claim > 1
        message["redelivered"] = claim > 1
        return cast(dict[str, Any], message)

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        return self._claim(queue, queue in self._noack_queues)

    def _delete_row(self, row_id: int) -> None:
        with self._db.lock:
            with _transaction(self._db.conn) as conn:
                conn.execute("DELETE FROM messages WHERE id = ?", (row_id,))

    def _release_row(self, row_id: int, claim: int) -> None:
        """Make a claimed row visible now, unless someone else has claimed it since."""
        with self._db.lock:
            with _transaction(self._db.conn) as conn:
                conn.execute(
                    "UPDATE messages SET visible_at = ? WHERE id = ? AND deliveries = ?",
                    (time.time(), row_id, claim),
                )

    @staticmethod
    def _row_of(message: Any) -> tuple[int, int] | None:
        info = getattr(message, "delivery_info", None) or {}
        if ROW_ID_KEY in info and CLAIM_KEY in info:
            return int(info[ROW_ID_KEY]), int(info[CLAIM_KEY])
        return None

    def _held_by_this_process(self) -> bool:
        return self._owner_pid == os.getpid()

    # -- leases ----------------------------------------------------------------------------

    def _maybe_renew(self) -> None:
        """Push back the expiry of every claim this channel holds unacked (a live lease)."""
        if self._qos is None or not self._held_by_this_process():
            return
        now = time.monotonic()
        if now - self._last_renewal < self.visibility_timeout / 4:
            return
        qos = self._qos
        dirty = set(qos._dirty)
        rows = []
        for tag, message in list(qos._delivered.items()):
            if tag in dirty:
                continue
            row = self._row_of(message)
            if row is not None:
                rows.append(row)
        if rows:
            until = time.time() + self.visibility_timeout
            try:
                with self._db.lock:
                    with _transaction(self._db.conn) as conn:
                        conn.executemany(
                            "UPDATE messages SET visible_at = ? WHERE id = ? AND deliveries = ?",
                            [(until, row_id, claim) for row_id, claim in rows],
                        )
            except sqlite3.OperationalError as exc:
                # Not fatal (a quarter of the lease has passed, three remain): try again at the
                # next poll rather than tear the consumer down and hand its messages back.
                log.warning("could not renew %d claim(s), retrying: %s", len(rows), exc)
                return
        self._last_renewal = now

    def drain_events(self, timeout: float | None = None, callback: Any = None) -> Any:
        self._maybe_renew()
        return super().drain_events(timeout=timeout, callback=callback)

    # -- AMQP-ish API ----------------------------------------------------------------------

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._noack_queues.add(queue)
        else:
            self._noack_queues.discard(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_cancel(self, consumer_tag: str) -> Any:
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        if queue is not None and queue not in self._active_queues:
            self._noack_queues.discard(queue)
        return result

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        self._maybe_renew()
        try:
            raw = self._claim(queue, no_ack)
        except Empty:
            return None
        message = self.Message(raw, channel=self)
        if not no_ack:
            self.qos.append(message, message.delivery_tag)
        return message

    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        """Delete the acknowledged message's row."""
        try:
            message = self.qos.get(delivery_tag)
        except KeyError:
            message = None
        row = self._row_of(message)
        try:
            if row is not None:
                self._delete_row(row[0])
        finally:
            # Released even if the DELETE failed: the claim then expires and the message is
            # redelivered (at least once), instead of holding a prefetch slot for ever.
            super().basic_ack(delivery_tag)

    def basic_reject(self, delivery_tag: str, requeue: bool = False) -> None:
        """``requeue``: make the same row visible again at once; otherwise delete it."""
        try:
            message = self.qos.get(delivery_tag)
        except KeyError:
            message = None
        row = self._row_of(message)
        if row is None:  # unknown tag or foreign message: kombu's default handling
            super().basic_reject(delivery_tag, requeue=requeue)
            return
        try:
            if requeue:
                self._release_row(*row)
            else:
                self._delete_row(row[0])
        finally:
            # Stop tracking it either way; if the statement failed, the claim simply expires.
            super().basic_reject(delivery_tag, requeue=False)

    def _restore(self, message: Any) -> None:
        """Give an unacked message back: UPDATE its row visible; never insert a copy."""
        row = self._row_of(message)
        if row is None:  # not read from this store (should not happen): publish it again
            super()._restore(message)
            return
        if not self._held_by_this_process():
            # A forked child closing an inherited channel: the claim is the parent's.
            return None
        try:
            self._release_row(*row)
        except sqlite3.Error as exc:
            # Nothing is lost: the row is still stored and its claim expires by itself.
            log.warning(
                "could not give back message row %s now (%s); it is redelivered when its "
                "claim expires, within visibility_timeout=%ss", row[0], exc,
                self.visibility_timeout,
            )
        return None

    def _restore_at_beginning(self, message: Any) -> None:
        # Rows keep their id, so a released row is already at the head of its queue.
        return self._restore(message)

    def _size(self, queue: str) -> int:
        """Messages ready for delivery (claimed, unacked ones are not counted)."""
        with self._db.lock:
            (count,) = self._db.conn.execute(
                "SELECT COUNT(*) FROM messages WHERE queue = ? AND visible_at <= ?",
                (queue, time.time()),
            ).fetchone()
        return int(count)

    def _purge(self, queue: str) -> int:
        """Delete the ready messages of ``queue``; returns how many."""
        with self._db.lock:
            with _transaction(self._db.conn) as conn:
                cursor = conn.execute(
                    "DELETE FROM messages WHERE queue = ? AND visible_at <= ?",
                    (queue, time.time()),
                )
                return int(cursor.rowcount)

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        with self._db.lock:
            row = self._db.conn.execute(
                "SELECT 1 FROM queues WHERE name = ? "
                "UNION ALL SELECT 1 FROM messages WHERE queue = ? LIMIT 1",
                (queue, queue),
            ).fetchone()
        return row is not None

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        """Delete the queue, all its messages (claimed or not) and its stored bindings."""
        with self._db.lock:
            with _transaction(self._db.conn) as conn:
                conn.execute("DELETE FROM messages WHERE queue = ?", (queue,))
                conn.execute("DELETE FROM queues WHERE name = ?", (queue,))
                conn.execute("DELETE FROM bindings WHERE queue = ?", (queue,))

    # -- shared routing table ----------------------------------------------------------------
    #
    # kombu's virtual transports keep exchanges and bindings in the memory of one Connection, so
    # a publisher that has not declared the queue itself -- or one that reconnected while
    # retrying a publish (kombu's ensure() builds a fresh Transport) -- routes a message for a
    # named exchange nowhere and drops it without an error. Bindings of durable, non-auto-delete
    # queues are therefore also kept in the file (as the Redis transport keeps them in Redis)
    # and every lookup sees them. Bindings of auto-delete/exclusive queues stay process-local,
    # so a dead process's transient queues do not keep collecting messages.

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        if kwargs.get("auto_delete") or kwargs.get("exclusive"):
            self._transient_queues.add(queue)
        else:
            self._transient_queues.discard(queue)
        with self._db.lock:
            with _transaction(self._db.conn) as conn:
                conn.execute(
                    "INSERT OR IGNORE INTO queues (name, created_at) VALUES (?, ?)",
                    (queue, time.time()),
                )

    def queue_bind(
        self,
        queue: str,
        exchange: str | None = None,
        routing_key: str = "",
        arguments: Any = None,
        **kwargs: Any,
    ) -> None:
        exchange = exchange or "amq.direct"
        super().queue_bind(queue, exchange, routing_key, arguments, **kwargs)
        kind = self.typeof(exchange)
        if queue in self._transient_queues or kind.type not in ("direct", "topic"):
            return
        _, pattern, _ = kind.prepare_bind(queue, exchange, routing_key, arguments)
        with self._db.lock:
            with _transaction(self._db.conn) as conn:
                conn.execute(
                    "INSERT OR REPLACE INTO bindings (exchange, exchange_type, routing_key,"
                    " pattern, queue) VALUES (?, ?, ?, ?, ?)",
                    (exchange, kind.type, routing_key or "", pattern or "", queue),
                )

    def queue_unbind(
        self,
        queue: str,
        exchange: str | None = None,
        routing_key: str = "",
        arguments: Any = None,
        **kwargs: Any,
    ) -> None:
        super().queue_unbind(queue, exchange, routing_key, arguments, **kwargs)
        with self._db.lock:
            with _transaction(self._db.conn) as conn:
                conn.execute(
                    "DELETE FROM bindings WHERE exchange = ? AND routing_key = ? AND queue = ?",
                    (exchange or "amq.direct", routing_key or "", queue),
                )

    def _shared_bindings(self, exchange: str) -> list[tuple[str, str, str, str]]:
        with self._db.lock:
            return self._db.conn.execute(
                "SELECT exchange_type, routing_key, pattern, queue FROM bindings "
                "WHERE exchange = ?",
                (exchange,),
            ).fetchall()

    def get_table(self, exchange: str) -> list[tuple[str, str | None, str]]:
        """This connection's bindings of ``exchange`` plus those stored in the file."""
        try:
            table = list(super().get_table(exchange))
        except KeyError:
            table = []
        seen = {(rkey, queue) for rkey, _, queue in table}
        for _, rkey, pattern, queue in self._shared_bindings(exchange):
            if (rkey, queue) not in seen:
                table.append((rkey, pattern or None, queue))
        return table

    def typeof(self, exchange: str, default: str = "direct") -> Any:
        if exchange in self.state.exchanges or not exchange:
            return super().typeof(exchange, default)
        shared = self._shared_bindings(exchange)
        return self.exchange_types[shared[0][0] if shared else default]

    def exchange_delete(
        self, exchange: str, if_unused: bool = False, nowait: bool = False
    ) -> None:
        for _, _, queue in self.get_table(exchange):
            self.queue_delete(queue, if_unused=True, if_empty=True)
        self.state.exchanges.pop(exchange, None)
        with self._db.lock:
            with _transaction(self._db.conn) as conn:
                conn.execute("DELETE FROM bindings WHERE exchange = ?", (exchange,))

    def queue_delete(
        self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any
    ) -> None:
        """Delete the queue, its messages (claimed or not) and its bindings."""
        # The virtual base only deletes through this connection's bindings; the queue is shared.
        if if_empty and self._size(queue):
            return
        self._delete(queue)
        self.state.queue_bindings_delete(queue)
        for meta in self.state.exchanges.values():  # the base class leaves these behind
            table = meta.get("table")
            if table:
                table[:] = [binding for binding in table if binding[2] != queue]
        self._transient_queues.discard(queue)

    def close(self) -> None:
        try:
            super().close()  # restores unacked messages through _restore
        finally:
            self._db.close()


class Transport(virtual.Transport):
    """kombu transport for ``musespark-sqlite:////path/broker.db``."""

    Channel = Channel

    can_parse_url = True  # kombu hands us the whole URL as ``hostname``
    default_port = 0  # type: ignore[assignment]  # kombu types it None
    driver_type = "sqlite"
    driver_name = "sqlite3"
    polling_interval = DEFAULT_POLLING_INTERVAL

    # "database is locked" past busy_timeout, I/O errors: retried (with a reconnect) by kombu's
    # ensure() -- Producer.publish(retry=True), Celery's publish retry policy -- and by the
    # worker's reconnect loop, and re-raised when they give up. Declaring the recoverable sets
    # matters: without them kombu gives up after the first reconnect.
    # kombu annotates these as one-element tuples; they are tuples of any length.
    connection_errors = virtual.Transport.connection_errors + (  # type: ignore[assignment]
        sqlite3.OperationalError,)
    channel_errors = virtual.Transport.channel_errors + (  # type: ignore[assignment]
        sqlite3.DatabaseError,)
    recoverable_connection_errors = (ConnectionError, sqlite3.OperationalError)
    recoverable_channel_errors = ()

    def driver_version(self) -> str:
        return sqlite3.sqlite_version


def register() -> None:
    """Register :data:`SCHEME` in ``kombu.transport.TRANSPORT_ALIASES`` (idempotent)."""
    TRANSPORT_ALIASES[SCHEME] = f"{__name__}:Transport"


register()
