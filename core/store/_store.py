"""The job store: every state MuseSpark keeps, behind one small class on SQLAlchemy 2.

Works on SQLite (the embedded default; WAL mode so the bot and worker processes can share it)
and PostgreSQL. State transitions are single guarded ``UPDATE`` statements, so two workers can
never both own a job, and a worker that lost its job (it was re-driven after it went silent)
cannot deliver it a second time: delivery is fenced on ``attempts``.
"""

from __future__ import annotations

import copy
import hashlib
import secrets
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from time import monotonic
from typing import Any, TypeVar, cast

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    CursorResult,
    Engine,
    Result,
    Table,
    create_engine,
    delete,
    event,
    func,
    inspect as sa_inspect,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, configure_mappers, sessionmaker

from core.events import Actor, Channel
from core.params import versioned
from core.store._group import Batch, GroupCommit
from core.store.models import (
    Artifact,
    Community,
    DeliveredMessage,
    FeedbackEvent,
    Job,
    JobState,
    LocalMessage,
    HandledEvent,
    Profile,
    RateLimit,
    RequestLog,
    User,
)

__all__ = ["Claim", "JobExisted", "Store", "content_hash", "rows_changed", "utcnow"]

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
#: The job param that records that its person was told the request is delayed.
DELAY_NOTICE_PARAM = "delay_notice"
SQLITE_BUSY_TIMEOUT_MS = 30_000

C = TypeVar("C")
W = TypeVar("W")
R = TypeVar("R")


def rows_changed(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE touched (DML results are cursor results)."""
    return int(cast(CursorResult[Any], result).rowcount)


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """A stored time with its zone: SQLite gives stored UTC times back without it."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def new_job_id() -> str:
    return secrets.token_hex(6)


@dataclass(frozen=True, slots=True)
class Claim:
    """A worker's hold on a job. ``attempt`` is the fencing token for delivery."""

    job_id: str
    attempt: int
    exhausted: bool


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    # Deleted rows are overwritten, not left in free pages: /forget must not leave a copy in
    # the database file.
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()


#: ``Session.info`` key: the rows a :meth:`Store.transaction` read, held for its duration.
_HOLD_LOADED = "musespark.hold_loaded"


#: ``Session.info`` key: request-log rows to insert together before the transaction commits.
_PENDING_REQUEST_LOG = "musespark.pending_request_log"
#: ``Session.info`` key: job rows a group commit inserts together (idempotency key -> row),
#: before the next statement that could read them, or before it commits.
_PENDING_JOBS = "musespark.pending_jobs"
#: ``Session.info`` key: the cached tables (see :meth:`Store.person_facts`) a session wrote.
_WROTE_CACHED = "musespark.wrote_cached"
#: The tables whose rows the request path reads through a short-lived cache.
_CACHED_TABLES = {User: "users", Profile: "profiles", Community: "communities"}
#: Of those, the ones cached by their own row id: a new row cannot be in the cache, so making
#: one (a raid of newcomers) leaves every cached entry valid.
_CACHED_BY_ROW_ID = (User, Community)


def _hold_loaded(session: Session, instance: object) -> None:
    held = session.info.get(_HOLD_LOADED)
    if held is not None:
        held.append(instance)


class JobExisted(Exception):
    """A job made in a group commit's shared insert existed already (a replayed event). The
    group is rolled back and each request runs alone, where a duplicate is answered as one."""


class Store:
    """Opens the database at ``url``; call :meth:`upgrade` once to create or migrate the schema."""

    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        self.engine: Engine = create_engine(url, **kwargs)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        event.listen(self._sessions, "loaded_as_persistent", _hold_loaded)
        # Rows that are only ever created, cached so a busy chat costs no lookups per message.
        self._user_ids: dict[tuple[str, str, str], int] = {}
        self._community_ids: dict[tuple[str, str], int] = {}
        self._ambient = threading.local()  # the transaction of :meth:`transaction`, per thread
        # Queue positions (see :meth:`queue_position`): per job kind, jobs this process made,
        # the recent ones' ordinals, and the last count: (monotonic time, that job's ordinal,
        # jobs ahead of it).
        self._queue_lock = threading.Lock()
        self._made: dict[str, int] = {}
        self._ordinals: dict[str, int] = {}
        self._counted: dict[str, tuple[float, int, int]] = {}
        self._job_insert: Any = None  # built once (see :meth:`_insert_job`)
        configure_mappers()  # before :meth:`_built` makes a job without the ORM's constructor
        # Built once each (see :meth:`_insert_rows`).
        self._unnest_inserts: dict[tuple[str, tuple[str, ...]], tuple[str, list[Any]]] = {}
        self._many_inserts: dict[str, Any] = {}
        self._community_settings: dict[int, tuple[float, int, dict[str, Any]]] = {}
        self.group_commit = GroupCommit(self)
        # Short-lived read caches of the request path (see :meth:`person_facts`): per table,
        # a generation that every write to it in this process moves on, and the entries.
        self._generation = {"users": 0, "profiles": 0, "communities": 0}
        self._people: dict[int, tuple[float, int, tuple[int, bool]]] = {}
        self._profiles: dict[tuple[str, str, int],
                             tuple[float, int, tuple[dict[str, Any], int]]] = {}
        event.listen(self._sessions, "after_flush", self._wrote_after_flush)
        event.listen(self._sessions, "do_orm_execute", self._wrote_by_statement)
        event.listen(self._sessions, "after_commit", self._wrote_after_commit)
        event.listen(self._sessions, "before_commit", self._insert_request_log)
        # Job rows a group commit made wait until a statement might read them (see
        # :meth:`create_job`), at the latest until the commit.
        event.listen(self._sessions, "do_orm_execute", self._insert_pending_jobs)
        event.listen(self._sessions, "before_flush", self._insert_pending_jobs)
        event.listen(self._sessions, "before_commit", self._insert_pending_jobs)

    def dispose(self) -> None:
        self.engine.dispose()

    # -- short-lived read caches of the request path ------------------------------------------

    #: How long a person's facts, taste profiles and community settings read for a request
    #: serve the next ones. A change made in this process is seen at once; one made by another
    #: process (a reaction handled by the other platform's bot), within this time.
    READ_CACHE_SECONDS = 2.0

    def _fresh(self, entry: tuple[float, int, Any], generation: int, now: float) -> bool:
        """Whether a cache entry ``(read at, generation, value)`` may still be used."""
        return entry[1] == generation and now - entry[0] < self.READ_CACHE_SECONDS

    def _moved(self, tables: set[str]) -> None:
        for table in tables:
            self._generation[table] += 1

    def _wrote_after_flush(self, session: Session, _context: Any) -> None:
        new = (row for row in session.new if not isinstance(row, _CACHED_BY_ROW_ID))
        tables = {name for row in (*new, *session.dirty, *session.deleted)
                  for model, name in _CACHED_TABLES.items() if isinstance(row, model)}
        if tables:
            session.info.setdefault(_WROTE_CACHED, set()).update(tables)
            self._moved(tables)

    def _wrote_by_statement(self, state: Any) -> None:
        if not (state.is_update or state.is_delete or state.is_insert):
            return
        tables = {name for model, name in _CACHED_TABLES.items()
                  if any(m.class_ is model for m in state.all_mappers)
                  and not (state.is_insert and issubclass(model, _CACHED_BY_ROW_ID))}
        if tables:
            state.session.info.setdefault(_WROTE_CACHED, set()).update(tables)
            self._moved(tables)

    def _wrote_after_commit(self, session: Session) -> None:
        # Again at commit: a reader in another thread may have cached the old row between
        # this session's flush and its commit.
        self._moved(session.info.pop(_WROTE_CACHED, set()))

    def person_facts(self, user_id: int) -> tuple[int, bool]:
        """``(person, opted out of learning)`` of a user: the person behind its linked
        identities (/link) and whether they opted out. Cached for :attr:`READ_CACHE_SECONDS`."""
        generation, now = self._generation["users"], monotonic()
        cached = self._people.get(user_id)
        if cached is not None and self._fresh(cached, generation, now):
            return cached[2]
        with self.session() as s:
            user = s.get(User, user_id)
            facts = (user.person, bool(user.learning_opt_out)) if user is not None else (
                user_id, False)
        if len(self._people) > self.READ_CACHE_ENTRIES:
            self._people.clear()
        self._people[user_id] = (now, generation, facts)
        return facts

    #: Entries either cache holds before it starts afresh (a bound on memory, not a policy).
    READ_CACHE_ENTRIES = 50_000

    def profiles(self, kind: str, subjects: Sequence[tuple[str, int]],
                 ) -> dict[tuple[str, int], tuple[dict[str, Any], int]]:
        """The taste profiles ``(stats, version)`` of ``subjects`` (``("person", id)``,
        ``("community", id)``) for ``kind``; missing ones are not in the answer. Cached for
        :attr:`READ_CACHE_SECONDS`; the stats are the cache's own: do not change them."""
        generation, now = self._generation["profiles"], monotonic()
        found: dict[tuple[str, int], tuple[dict[str, Any], int]] = {}
        missing: list[tuple[str, int]] = []
        for subject in subjects:
            cached = self._profiles.get((kind, *subject))
            if cached is not None and self._fresh(cached, generation, now):
                if cached[2][1]:  # version 0: none yet
                    found[subject] = cached[2]
            else:
                missing.append(subject)
        if missing:
            with self.session() as s:
                read = {(p.subject, p.subject_id): (p.stats or {}, p.version) for p in s.scalars(
                    select(Profile).where(Profile.kind == kind, or_(*(
                        (Profile.subject == subject) & (Profile.subject_id == subject_id)
                        for subject, subject_id in missing))))}
            if len(self._profiles) > self.READ_CACHE_ENTRIES:
                self._profiles.clear()
            for subject in missing:
                value = read.get(subject, ({}, 0))
                self._profiles[(kind, *subject)] = (now, generation, value)
                if subject in read:
                    found[subject] = value
        return found

    # -- the request log ------------------------------------------------------------------------

    def log_request(self, person_id: int, user_id: int, community_id: int | None) -> None:
        """Count a request for the quotas. Inside :meth:`transaction` the rows wait and go in
        one statement before it commits (or before the log is counted: :meth:`request_log`)."""
        row = {"person_id": person_id, "user_id": user_id, "community_id": community_id,
               "created_at": utcnow()}
        with self.session() as s:
            s.info.setdefault(_PENDING_REQUEST_LOG, []).append(row)

    def _insert_request_log(self, session: Session) -> None:
        rows = session.info.pop(_PENDING_REQUEST_LOG, None)
        if rows:
            self._insert_rows(session, cast(Table, RequestLog.__table__), rows)

    @contextmanager
    def request_log(self) -> Iterator[Session]:
        """A session to count the request log in, with this transaction's rows in it."""
        with self.session() as s:
            self._insert_request_log(s)
            yield s

    def forget_cached_ids(self) -> None:
        """Drop the cached user and community ids (after rows were deleted: /forget)."""
        self._user_ids.clear()
        self._community_ids.clear()

    def compact(self) -> None:
        """After erasing: on SQLite, fold the write-ahead log (which keeps old page images)
        back into the database file (whose freed pages ``secure_delete`` zeroed). PostgreSQL
        reclaims deleted rows with (auto)vacuum."""
        if self.engine.dialect.name != "sqlite":
            return
        with self.engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- schema -------------------------------------------------------------------------------

    def alembic_config(self) -> Config:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        return cfg

    def upgrade(self) -> None:
        """Create or migrate the schema to the newest revision (idempotent).

        On SQLite, foreign keys are off while migrating: Alembic's batch mode rebuilds a table
        (copy, drop, rename), and dropping the old ``jobs`` or ``users`` table with foreign keys
        on would cascade-delete every row that points at it (delivered messages, artifacts...).
        The pragma only takes effect outside a transaction, hence before ``begin``.
        """
        sqlite = self.engine.dialect.name == "sqlite"
        with self.engine.connect() as connection:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
                connection.commit()
            try:
                with connection.begin():
                    cfg = self.alembic_config()
                    cfg.attributes["connection"] = connection
                    command.upgrade(cfg, "head")
            finally:
                if sqlite:
                    connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                    connection.commit()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error; inside
        :meth:`transaction` (on the same thread), that transaction's session."""
        ambient: Session | None = getattr(self._ambient, "session", None)
        if ambient is not None:
            yield ambient
            return
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def transaction(self, *, defer_jobs: bool = False) -> Iterator[None]:
        """Every store call inside (on this thread) runs in one transaction, committed at the
        end: a request's reads and writes cost one commit, not one each.

        ``defer_jobs`` (a group commit of several requests): the jobs :meth:`create_job` makes
        are inserted together, in one statement, just before the next statement that could
        read them, or before the commit. A job that existed already (a replayed event) raises
        :class:`JobExisted` there, and the group runs each request alone.
        """
        if getattr(self._ambient, "session", None) is not None:
            yield
            return
        with self._sessions() as session, session.begin():
            # The rows read stay in the session until the end: SQLAlchemy's identity map holds
            # them weakly, so each store call would read a request's user row again.
            session.info[_HOLD_LOADED] = []
            if defer_jobs:  # inserted by a listener as the session commits, at the latest
                session.info[_PENDING_JOBS] = {}
            self._ambient.session = session
            try:
                yield
            finally:
                self._ambient.session = None
                session.info.pop(_HOLD_LOADED, None)

    def grouped(self, check: Callable[[], C], write: Callable[[C], W],
                then: Callable[[W], R], *, batch: Batch | None = None) -> R:
        """``then(write(check()))``, ``check`` and ``write`` in a transaction shared with the
        requests being handled at the same time in this process, committed once for all
        (group commit: see core/store/_group.py for what each step may do). Inside
        :meth:`transaction` it simply runs there. ``batch``: what the leader runs its group's
        ``then`` steps inside (the publisher's batch)."""
        if getattr(self._ambient, "session", None) is not None:
            return then(write(check()))
        return self.group_commit.run(check, write, then, batch)

    def _dialect(self) -> Any:
        """This database's SQLAlchemy dialect module, for its ``insert ... on conflict``."""
        from sqlalchemy.dialects import postgresql, sqlite

        return postgresql if self.engine.dialect.name == "postgresql" else sqlite

    # -- people and places ---------------------------------------------------------------------

    def ensure_user(self, platform: str, actor: Actor) -> int:
        key = (platform, actor.id, actor.display_name)
        if key not in self._user_ids:
            self._user_ids[key] = self._ensure_user(platform, actor)
        return self._user_ids[key]

    def _ensure_user(self, platform: str, actor: Actor) -> int:
        """The user's id; an existing row takes the actor's current display name."""
        table = cast(Table, User.__table__)
        return self._upsert_id(
            table, ["platform", "platform_user_id"],
            {"platform": platform, "platform_user_id": actor.id,
             "display_name": actor.display_name or "", "learning_opt_out": False,
             "credit_opt_in": False, "created_at": utcnow()},
            lambda excluded: {"display_name": func.coalesce(
                func.nullif(excluded.display_name, ""), table.c.display_name)})

    def ensure_community(self, platform: str, channel: Channel) -> int:
        cache_key = (platform, channel.community_id)
        if cache_key not in self._community_ids:
            self._community_ids[cache_key] = self._ensure_community(platform, channel)
        return self._community_ids[cache_key]

    def _ensure_community(self, platform: str, channel: Channel) -> int:
        """The community's id, made if new."""
        return self._upsert_id(
            cast(Table, Community.__table__), ["platform", "platform_community_id"],
            {"platform": platform, "platform_community_id": channel.community_id,
             "settings": {}, "created_at": utcnow()},
            lambda excluded: {"platform": excluded.platform})  # unchanged: for RETURNING

    def _upsert_id(self, table: Table, keys: list[str], row: dict[str, Any],
                   update: Callable[[Any], dict[str, Any]]) -> int:
        """The id of ``table``'s row with ``row``'s ``keys``: one ``INSERT … ON CONFLICT DO
        UPDATE SET update(excluded) … RETURNING id`` that makes it, or finds it (a newcomer
        costs one statement, not a look-up and then an insert in two transactions)."""
        insert_ = self._dialect().insert(table)
        statement = insert_.on_conflict_do_update(
            index_elements=keys, set_=update(insert_.excluded)).returning(table.c.id)
        with self.session() as s:
            return int(s.connection().execute(statement, row).scalar_one())

    def community_settings(self, community_id: int, *, recent: bool = False) -> dict[str, Any]:
        """A community's settings (safety, blocked words, quotas, emoji meanings).

        ``recent``: a copy read within :attr:`READ_CACHE_SECONDS` will do (the request path of
        a busy chat). A change made in this process (:meth:`change_settings`) is seen at once;
        one made by another process, within that time.
        """
        generation, now = self._generation["communities"], monotonic()
        if recent:
            cached = self._community_settings.get(community_id)
            if cached is not None and self._fresh(cached, generation, now):
                return copy.deepcopy(cached[2])  # the caller's own: the lists in it too
        with self.session() as s:
            community = s.get(Community, community_id)
            values = dict(community.settings or {}) if community is not None else {}
        self._community_settings[community_id] = (now, generation, values)
        return copy.deepcopy(values)

    def change_settings(self, community_id: int,
                        change: Callable[[dict[str, Any]], None]) -> bool:
        """Change a community's settings in place (row locked); False when it is gone."""
        with self.session() as s:
            community = s.get(Community, community_id, with_for_update=True)
            if community is None:
                return False
            values = dict(community.settings or {})
            change(values)
            community.settings = values
            return True

    def set_credit(self, user_ids: Sequence[int], credit: bool) -> None:
        """Name (or stop naming) these identities as creator in their pictures' manifests."""
        with self.session() as s:
            for user in s.scalars(select(User).where(User.id.in_(list(user_ids)))).all():
                user.credit_opt_in = credit

    def credit_name(self, user_id: int) -> str | None:
        """The name to credit in a picture's manifest: only for a person who opted in."""
        with self.session() as s:
            user = s.get(User, user_id)
            if user is None or not user.credit_opt_in:
                return None
            return user.display_name or f"{user.platform} user {user.platform_user_id}"

    # -- jobs ---------------------------------------------------------------------------------

    def create_job(self, *, idempotency_key: str, published: bool = False,
                   **fields: Any) -> tuple[Job, bool]:
        """Persist a new queued job, or return the one already made for ``idempotency_key``.

        ``published``: mark it published in the same statement (the caller publishes right
        after the commit, and clears the mark with :meth:`unmark_published` if that fails; a
        process that dies in between leaves the job to the redriver's start-up sweep).
        One ``INSERT … ON CONFLICT DO NOTHING``, so it also works inside :meth:`transaction`.

        Returns:
            ``(job, created)``; ``created`` is False for a duplicate event.
        """
        now = utcnow()
        row = dict(id=new_job_id(), idempotency_key=idempotency_key, state=JobState.QUEUED,
                   attempts=0, created_at=now, updated_at=now,
                   published_at=now if published else None, **fields)
        row.setdefault("held", False)
        with self.session() as s:
            pending: dict[str, dict[str, Any]] | None = s.info.get(_PENDING_JOBS)
            if pending is not None:  # a group commit's: inserted with the group's other jobs
                earlier = pending.get(idempotency_key)
                if earlier is not None:  # the same event twice in one group
                    return self._built(earlier), False
                pending[idempotency_key] = row
                return self._made_job(row), True
            # One Core statement, built once: the row goes as parameters (building an INSERT
            # with ``values()`` per request, or the ORM's bulk insert, cost more than running it).
            if s.connection().execute(self._insert_job(), row).first() is not None:
                return self._made_job(row), True
            return s.scalars(select(Job).where(Job.idempotency_key == idempotency_key)).one(), False

    #: Makes bare Job instances (``Mapper.class_manager``), as the ORM does for a row it loads.
    _JOBS = sa_inspect(Job).class_manager

    @classmethod
    def _built(cls, row: dict[str, Any]) -> Job:
        """The (transient) job of an inserted ``row``: its values set as the ORM sets a loaded
        row's, without the constructor's per-attribute events (20 times the CPU, and a job
        is made for every request)."""
        job: Job = cls._JOBS.new_instance()
        job.__dict__.update(row, params=versioned(row["params"]))
        return job

    def _made_job(self, row: dict[str, Any]) -> Job:
        job = self._built(row)
        if not job.held:
            self._note_made(job)
        return job

    def _insert_pending_jobs(self, state: Any, *_: Any) -> None:
        """Insert a group commit's waiting job rows in one statement (a listener: ``state`` is
        the session, or the ORM statement about to run in it). Raises :class:`JobExisted`
        when one of them existed already."""
        session: Session = getattr(state, "session", state)
        pending: dict[str, dict[str, Any]] | None = session.info.get(_PENDING_JOBS)
        if not pending:
            return
        rows = list(pending.values())
        pending.clear()
        made = self._insert_rows(session, cast(Table, Job.__table__), rows,
                                 skip_conflicts_on="idempotency_key")
        if len(made) < len(rows):
            raise JobExisted(f"{len(rows) - len(made)} of {len(rows)} jobs existed already")

    def _insert_rows(self, session: Session, table: Table, rows: list[dict[str, Any]], *,
                     skip_conflicts_on: str | None = None) -> list[Any]:
        """Insert ``rows`` into ``table`` in one statement; the ids of the rows made (a row whose
        ``skip_conflicts_on`` value exists already is skipped).

        On PostgreSQL the statement is ``INSERT … SELECT * FROM unnest(…)``: one array per
        column, so its text is the same for any number of rows. psycopg converts a statement's
        placeholders once per distinct text, and caches (and, once used often, prepares) only
        short ones: a multi-row VALUES list, whose text grows with the rows, was converted
        afresh for every group, which cost more CPU than anything else in the insert.
        Elsewhere (SQLite): SQLAlchemy's multi-row INSERT (its "insert many values").
        """
        connection = session.connection()
        by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in rows:  # callers may name different columns: a statement for each set
            by_columns.setdefault(tuple(row), []).append(row)
        made: list[Any] = []
        for names, same in by_columns.items():
            if self.engine.dialect.name != "postgresql":
                made += connection.execute(self._many_insert(table, skip_conflicts_on),
                                           same).all()
                continue
            sql, processors = self._unnest_insert(table, names, skip_conflicts_on)
            values = {name: [row[name] for row in same] if process is None
                      else [process(row[name]) for row in same]
                      for name, process in zip(names, processors)}
            made += connection.exec_driver_sql(sql, values).all()
        return made

    def _many_insert(self, table: Table, skip_conflicts_on: str | None) -> Any:
        """SQLAlchemy's INSERT for ``table``, built once; given many rows that name the same
        columns, with its RETURNING, SQLAlchemy sends them as one statement."""
        statement = self._many_inserts.get(table.name)
        if statement is None:
            built = self._dialect().insert(table)
            if skip_conflicts_on is not None:
                built = built.on_conflict_do_nothing(index_elements=[skip_conflicts_on])
            statement = self._many_inserts[table.name] = built.returning(table.c.id)
        return statement

    def _unnest_insert(self, table: Table, names: tuple[str, ...], skip_conflicts_on: str | None
                       ) -> tuple[str, list[Any]]:
        """PostgreSQL's ``INSERT INTO table (names) SELECT * FROM unnest(%(name)b::type[], …)``
        and each column's bind processor (SQLAlchemy's, e.g. JSON), built once."""
        built = self._unnest_inserts.get((table.name, names))
        if built is None:
            dialect = self.engine.dialect
            columns = [table.columns[name] for name in names]
            # Binary parameters (``%(name)b``): psycopg sends text arrays in text format with
            # each element escaped by a regular expression, three times the CPU.
            arrays = ", ".join(f"%({name})b::{column.type.compile(dialect=dialect)}[]"
                               for name, column in zip(names, columns))
            conflict = (f" ON CONFLICT ({skip_conflicts_on}) DO NOTHING"
                        if skip_conflicts_on is not None else "")
            built = (f"INSERT INTO {table.name} ({', '.join(names)}) SELECT * FROM "
                     f"unnest({arrays}){conflict} RETURNING id",
                     [column.type.dialect_impl(dialect).bind_processor(dialect)
                      for column in columns])
            self._unnest_inserts[(table.name, names)] = built
        return built

    def _insert_job(self) -> Any:
        """``INSERT INTO jobs … ON CONFLICT (idempotency_key) DO NOTHING RETURNING id``."""
        if self._job_insert is None:
            table = Job.__table__
            self._job_insert = (self._dialect().insert(table)
                                .on_conflict_do_nothing(index_elements=["idempotency_key"])
                                .returning(table.c.id))
        return self._job_insert

    def get_job(self, job_id: str) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)

    def update_delivery(self, job_id: str, **fields: Any) -> None:
        """Add facts to a job's delivery target (e.g. the id of its progress message)."""
        with self.session() as s:
            job = s.get(Job, job_id, with_for_update=True)
            if job is not None:
                job.delivery = {**job.delivery, **fields}

    def mark_published(self, job_id: str) -> None:
        with self.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(published_at=utcnow()))

    def requeue_orphan(self, job_id: str, attempt: int) -> bool:
        """A running job whose worker died (stale heartbeat) was published again: it is
        ``queued`` now, waiting for a worker, so it is not re-sent again every
        ``stale_after`` while it waits in a long queue. The crash still counts (the attempt
        is kept); a worker that claimed it meanwhile is left alone."""
        with self.session() as s:
            result = s.execute(update(Job).where(
                Job.id == job_id, Job.state == JobState.RUNNING, Job.attempts == attempt)
                .values(state=JobState.QUEUED, worker=None, published_at=utcnow(),
                        updated_at=utcnow()))
            return rows_changed(result) == 1

    def unmark_published(self, job_ids: Collection[str]) -> None:
        """Publishing ``job_ids`` failed after :meth:`create_job` marked them: the redriver
        sends them as soon as the broker is back."""
        with self.session() as s:
            s.execute(update(Job).where(Job.id.in_(list(job_ids)), Job.state == JobState.QUEUED)
                      .values(published_at=None))

    def claim(self, job_id: str, *, worker: str, stale_after: float, max_attempts: int) -> Claim | None:
        """Take a job for ``worker``, or return None when someone alive holds it or it is done.

        A job is claimable while queued, or while running with a heartbeat older than
        ``stale_after`` seconds (its worker died). Each claim counts an attempt; past
        ``max_attempts`` the claim comes back ``exhausted`` and the caller must fail the job:
        a task that kills its worker every time (out of memory) must not requeue forever.
        """
        now = utcnow()
        stale = now - timedelta(seconds=stale_after)
        with self.session() as s:
            result = s.execute(
                update(Job)
                .where(Job.id == job_id)
                .where(
                    ((Job.state == JobState.QUEUED)
                     & (Job.not_before.is_(None) | (Job.not_before <= now)))
                    | ((Job.state == JobState.RUNNING) & (Job.heartbeat_at < stale))
                )
                .values(state=JobState.RUNNING, attempts=Job.attempts + 1, worker=worker,
                        started_at=now, heartbeat_at=now, updated_at=now)
                .returning(Job.attempts)
            )
            attempt = result.scalar()
        if attempt is None:
            return None
        return Claim(job_id, attempt, exhausted=attempt > max_attempts)

    def save_outcome(self, claim: Claim, *, model: str, outbox: list[dict[str, Any]] | None,
                     artifacts: Sequence[Artifact], params: dict[str, Any] | None = None,
                     expanded_prompt: str | None = None) -> bool:
        """Keep a generated result (artifacts and the messages to post) under a current claim.

        ``params`` are merged into the job's (what generation decided: a story's plan, a
        brainstorm's ideas); ``outbox`` None keeps a step's output without posting anything yet
        (a story's plan, whose post waits for its pictures).
        """
        with self.session() as s:
            job = s.get(Job, claim.job_id, with_for_update=True)
            if (job is None or job.state != JobState.RUNNING
                    or job.attempts != claim.attempt):
                return False
            job.model, job.outbox, job.updated_at = model, outbox, utcnow()
            if params:
                job.params = {**job.params, **params}
            if expanded_prompt is not None:
                job.expanded_prompt = expanded_prompt
            s.add_all(artifacts)
            return True

    def wake(self, job_id: str) -> Job | None:
        """Make a job that waits (deferred, ``not_before`` in the future) claimable now.

        Returns the job when it was waiting, else None (running, done, or not deferred).
        """
        with self.session() as s:
            result = s.execute(update(Job).where(
                Job.id == job_id, Job.state == JobState.QUEUED, Job.not_before.is_not(None))
                .values(not_before=None, updated_at=utcnow()))
            if not rows_changed(result):
                return None
            return s.get(Job, job_id)

    def unfinished_with_key_prefix(self, key: str) -> Sequence[Job]:
        """The job with ``key`` and the jobs derived from it (``key:...``) not yet final."""
        escaped = key.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        with self.session() as s:
            return s.scalars(select(Job).where(
                (Job.idempotency_key == key)
                | Job.idempotency_key.like(escaped + ":%", escape="\\"),
                Job.state.in_([JobState.QUEUED, JobState.RUNNING]))).all()

    def job_by_key(self, idempotency_key: str) -> Job | None:
        with self.session() as s:
            return s.scalar(select(Job).where(Job.idempotency_key == idempotency_key))

    def children(self, parent_id: str, intent: str) -> Sequence[Job]:
        """A job's child jobs of one intent (a story's scenes), oldest first."""
        with self.session() as s:
            return s.scalars(select(Job).where(Job.parent_job_id == parent_id,
                                               Job.intent == intent)
                             .order_by(Job.created_at, Job.id)).all()

    def artifacts(self, job_id: str, kind: str | None = None) -> Sequence[Artifact]:
        with self.session() as s:
            query = select(Artifact).where(Artifact.job_id == job_id)
            if kind is not None:
                query = query.where(Artifact.kind == kind)
            return s.scalars(query.order_by(Artifact.position, Artifact.id)).all()

    def add_input(self, job_id: str, path: str, data: bytes) -> None:
        """Keep an uploaded picture as the job's input artifact (``/forget uploads`` erases it)."""
        with self.session() as s:
            s.add(Artifact(job_id=job_id, kind="input", position=0, path=path,
                           content_hash=content_hash(data), recipe={"upload": True},
                           created_at=utcnow()))

    def forget_uploads(self, user_ids: Sequence[int]) -> int:
        """Erase the pictures these users uploaded: files and input artifacts. Returns how many."""
        with self.session() as s:
            rows = s.scalars(select(Artifact).join(Job, Job.id == Artifact.job_id).where(
                Artifact.kind == "input", Job.user_id.in_(list(user_ids)))).all()
            paths = {row.path for row in rows if row.path}
            for row in rows:
                s.delete(row)
        for path in paths:
            Path(path).unlink(missing_ok=True)
        return len(paths)

    def result_of_message(self, platform: str, chat_id: str,
                          message_id: str) -> tuple[Job, int] | None:
        """The result a platform message shows, and which of its pictures.

        A composed post (a story) delivers other jobs' results under its own job: the outbox
        entry at the message's position names the job whose result it is. Pictures sent as
        several messages at one position (a Telegram album) count from 0 in message order.
        """
        with self.session() as s:
            found = s.scalar(select(DeliveredMessage).where(
                DeliveredMessage.platform == platform, DeliveredMessage.chat_id == chat_id,
                DeliveredMessage.message_id == message_id))
            if found is None:
                return None
            job = s.get(Job, found.job_id)
            if job is None:
                return None
            entry = (job.outbox or [])[found.position:found.position + 1]
            shown_job = entry[0].get("job_id") if entry else None
            if shown_job and shown_job != job.id:
                job = s.get(Job, shown_job) or job
            siblings = s.scalars(select(DeliveredMessage.id).where(
                DeliveredMessage.job_id == found.job_id,
                DeliveredMessage.position == found.position)
                .order_by(DeliveredMessage.part, DeliveredMessage.id)).all()
            return job, max(0, list(siblings).index(found.id))

    def defer(self, claim: Claim, seconds: float) -> datetime | None:
        """Put a claimed job back in the queue, not to run for ``seconds`` (a rate limit).

        The attempt is given back: waiting is not a crash. Returns the due time, or None when
        the claim is no longer current.
        """
        due = utcnow() + timedelta(seconds=seconds)
        with self.session() as s:
            result = s.execute(
                update(Job)
                .where(Job.id == claim.job_id, Job.state == JobState.RUNNING,
                       Job.attempts == claim.attempt)
                .values(state=JobState.QUEUED, not_before=due, published_at=due,
                        attempts=Job.attempts - 1, worker=None, updated_at=utcnow()))
            return due if rows_changed(result) else None

    def delivered_message_ids(self, job_id: str, position: int) -> list[str]:
        """The platform messages posted for one outbox position (all parts), in order."""
        with self.session() as s:
            return list(s.scalars(select(DeliveredMessage.message_id).where(
                DeliveredMessage.job_id == job_id, DeliveredMessage.position == position)
                .order_by(DeliveredMessage.part, DeliveredMessage.id)).all())

    def delivered_positions(self, job_id: str) -> set[int]:
        """Positions of a job's outbox of which at least one part was posted."""
        with self.session() as s:
            return set(s.scalars(select(DeliveredMessage.position)
                                 .where(DeliveredMessage.job_id == job_id)).all())

    def delivered_parts(self, job_id: str) -> dict[int, set[int]]:
        """Outbox position -> the parts of it already posted (and recorded)."""
        parts: dict[int, set[int]] = {}
        with self.session() as s:
            for position, part in s.execute(
                    select(DeliveredMessage.position, DeliveredMessage.part)
                    .where(DeliveredMessage.job_id == job_id)):
                parts.setdefault(position, set()).add(part)
        return parts

    def record_delivered(self, job_id: str, platform: str, chat_id: str, position: int,
                         message_ids: Sequence[str], *, part: int = 0) -> None:
        """Record platform messages posted for outbox ``position``: ``message_ids`` are its
        parts ``part``, ``part + 1``, ... (one small transaction; a part already recorded, by
        this worker or by one that raced it, is kept as it is)."""
        rows = [(part + n, m) for n, m in enumerate(message_ids)]
        if not rows:
            return
        try:
            with self.session() as s:
                known = set(s.scalars(select(DeliveredMessage.part).where(
                    DeliveredMessage.job_id == job_id, DeliveredMessage.position == position,
                    DeliveredMessage.part.in_([n for n, _ in rows]))).all())
                s.add_all(DeliveredMessage(job_id=job_id, platform=platform, chat_id=chat_id,
                                           message_id=m, position=position, part=n,
                                           created_at=utcnow())
                          for n, m in rows if n not in known)
        except IntegrityError:
            pass  # another worker recorded the same part in between: the row is there

    def heartbeat(self, claim: Claim) -> bool:
        """Prove the claim's worker is alive; False when the job was taken over or finished."""
        with self.session() as s:
            result = s.execute(
                update(Job)
                .where(Job.id == claim.job_id, Job.state == JobState.RUNNING,
                       Job.attempts == claim.attempt)
                .values(heartbeat_at=utcnow())
            )
            return bool(rows_changed(result))

    @contextmanager
    def finishing(self, claim: Claim, state: JobState, *, reason: str | None = None,
                  model: str | None = None) -> Iterator[Session | None]:
        """Move a claimed job to a final ``state`` and yield the session to record results in.

        Yields None (and writes nothing) when the claim is no longer current: the job was
        re-driven to another worker or already finished. Whatever the caller adds to the
        session commits together with the state change, so a result is recorded exactly once.
        """
        now = utcnow()
        with self.session() as s:
            values: dict[str, Any] = {"state": state, "finished_at": now, "updated_at": now,
                                      "failure_reason": reason}
            if model is not None:
                values["model"] = model
            result = s.execute(
                update(Job)
                .where(Job.id == claim.job_id, Job.state == JobState.RUNNING,
                       Job.attempts == claim.attempt)
                .values(**values)
            )
            yield s if rows_changed(result) else None


    def jobs_to_redrive(self, *, stale_after: float, republish_after: float,
                        lost_before: datetime | None = None, limit: int = 100) -> Sequence[Job]:
        """Jobs that need (re)publishing: never published, lost in the queue, or orphaned.

        ``lost_before``: the broker lost what it held at that moment (it restarted empty), so
        every queued job published before it is sent again.
        """
        now = utcnow()
        stale = now - timedelta(seconds=stale_after)
        old_publish = now - timedelta(seconds=republish_after)
        if lost_before is not None:
            old_publish = max(old_publish, lost_before)
        with self.session() as s:
            return s.scalars(
                select(Job)
                .where(
                    ((Job.state == JobState.QUEUED) & Job.held.is_(False)
                     & (Job.published_at.is_(None) | (Job.published_at < old_publish)))
                    # A deferred job whose due time passed long ago lost its countdown
                    # message (the worker holding it died): send it again.
                    | ((Job.state == JobState.QUEUED) & Job.not_before.is_not(None)
                       & (Job.published_at < stale))
                    | ((Job.state == JobState.RUNNING) & (Job.heartbeat_at < stale)
                       & (Job.published_at.is_(None) | (Job.published_at < stale)))
                )
                .order_by(Job.created_at)
                .limit(limit)
            ).all()

    def jobs_waiting_unstarted(self, *, older_than: float, platforms: Collection[str],
                               limit: int = 100) -> Sequence[Job]:
        """Queued jobs on ``platforms`` made over ``older_than`` seconds ago, never started, and
        whose person was not told of the delay yet (see :meth:`note_delay`), oldest first."""
        made_before = utcnow() - timedelta(seconds=older_than)
        with self.session() as s:
            return s.scalars(
                select(Job)
                .where(Job.state == JobState.QUEUED, Job.started_at.is_(None),
                       Job.created_at < made_before, Job.platform.in_(list(platforms)),
                       # A story's pictures are waited for by the story, which the person
                       # hears about; one note per picture would be noise.
                       Job.intent != "scene",
                       Job.params[DELAY_NOTICE_PARAM].as_string().is_(None))
                .order_by(Job.created_at)
                .limit(limit)
            ).all()

    def note_delay(self, job_id: str, notice: dict[str, Any]) -> Job | None:
        """Record in a queued, never started job that its delay was noticed (once per job).

        Stores ``notice`` as ``params["delay_notice"]``. Returns the job when this call recorded
        it; None when it was recorded before (by this or another bot process) or the job has
        started meanwhile. No worker writes a job's params before it claims it, and every claim
        sets ``started_at``, so the guarded update cannot overwrite a worker's params.
        """
        with self.session() as s:
            job = s.get(Job, job_id)
            if (job is None or job.state != JobState.QUEUED or job.started_at is not None
                    or DELAY_NOTICE_PARAM in job.params):
                return None
            params = {**job.params, DELAY_NOTICE_PARAM: notice}
            result = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.QUEUED, Job.started_at.is_(None),
                       Job.params[DELAY_NOTICE_PARAM].as_string().is_(None))
                .values(params=params))
            if not rows_changed(result):
                return None
        job.params = params
        return job

    #: How many recently made jobs' ordinals are kept (a job asks for its position at once).
    RECENT_ORDINALS = 1024

    def _note_made(self, job: Job) -> None:
        """Number ``job`` among the jobs of its kind that this process made."""
        with self._queue_lock:
            self._made[job.kind] = self._ordinals[job.id] = self._made.get(job.kind, 0) + 1
            if len(self._ordinals) > self.RECENT_ORDINALS:
                del self._ordinals[next(iter(self._ordinals))]

    #: How long one count of the queue serves the queue positions of the jobs made after it.
    QUEUE_COUNT_FRESH_SECONDS = 1.0

    def queue_position(self, job: Job) -> int:
        """How many jobs of the same kind were queued before this one and wait still (jobs
        held back for fair share are not in the queue).

        Counted in the database at most once per :attr:`QUEUE_COUNT_FRESH_SECONDS` and kind:
        within that time a job just made here (:meth:`create_job`) is told the last count plus
        the jobs this process made since, so a burst of requests costs one count, not one each.
        Such a figure may be a second old (jobs finished or made elsewhere meanwhile); a quiet
        chat's request is always counted exactly.
        """
        now = monotonic()
        with self._queue_lock:
            ordinal = self._ordinals.get(job.id)
            counted = self._counted.get(job.kind)
        if (ordinal is not None and counted is not None and ordinal > counted[1]
                and now - counted[0] < self.QUEUE_COUNT_FRESH_SECONDS):
            return counted[2] + ordinal - counted[1]
        with self.session() as s:
            ahead = int(s.scalar(
                select(func.count()).select_from(Job).where(
                    Job.state.in_([JobState.QUEUED, JobState.RUNNING]), Job.kind == job.kind,
                    Job.held.is_(False), Job.created_at < job.created_at)) or 0)
        if ordinal is not None:
            with self._queue_lock:
                self._counted[job.kind] = (now, ordinal, ahead)
        return ahead

    # -- fair share ---------------------------------------------------------------------------

    def in_flight(self, requester: int, kind: str, *, excluding: str | None = None) -> int:
        """A person's jobs of one kind in the queue or running (not held back): one query on
        ``ix_jobs_requester_state``."""
        with self.session() as s:
            query = select(func.count()).select_from(Job).where(
                Job.requester == requester, Job.kind == kind,
                Job.state.in_([JobState.QUEUED, JobState.RUNNING]), Job.held.is_(False))
            if excluding is not None:
                query = query.where(Job.id != excluding)
            return int(s.scalar(query) or 0)

    def release_next(self, requester: int, kind: str, cap: int) -> Job | None:
        """The person's oldest held job of ``kind``, released (to be published now), when they
        have fewer than ``cap`` jobs of that kind in flight; else None."""
        if self.in_flight(requester, kind) >= cap:
            return None
        with self.session() as s:
            job = s.scalar(select(Job).where(
                Job.requester == requester, Job.kind == kind, Job.held.is_(True),
                Job.state == JobState.QUEUED).order_by(Job.created_at, Job.id).limit(1))
            if job is None:
                return None
            released = s.execute(update(Job).where(Job.id == job.id, Job.held.is_(True))
                                 .values(held=False, published_at=None, updated_at=utcnow()))
            if not rows_changed(released):
                return None
            job.held = False
            return job

    def held_requesters(self) -> list[tuple[int, str]]:
        """(person, kind) pairs that have jobs held back."""
        with self.session() as s:
            return [(int(r), str(k)) for r, k in s.execute(
                select(Job.requester, Job.kind).where(
                    Job.held.is_(True), Job.state == JobState.QUEUED,
                    Job.requester.is_not(None)).distinct()) if r is not None]

    # -- events answered at once ---------------------------------------------------------------

    #: How long a handled event is remembered: platforms replay within minutes (a resumed
    #: Discord gateway) or at most a day (Telegram keeps unconfirmed updates for 24 hours).
    HANDLED_EVENT_MEMORY = timedelta(days=2)

    def first_handling(self, platform: str, event_id: str) -> bool:
        """Records that ``event_id`` is being answered; False when it was already (a replay).
        One insert that does nothing on a conflict, on SQLite and PostgreSQL. Only a digest
        of the id is kept: a Telegram private chat's ids are the person's own."""
        dialect = self._dialect()
        now = utcnow()
        statement = (dialect.insert(HandledEvent)
                     .values(platform=platform, created_at=now,
                             event_id=hashlib.sha256(event_id.encode()).hexdigest())
                     .on_conflict_do_nothing(index_elements=[HandledEvent.platform,
                                                             HandledEvent.event_id])
                     .returning(HandledEvent.created_at))
        with self.session() as s:
            first = s.execute(statement).first() is not None
            # Older ones go now (an indexed range; these commands are rare next to requests).
            s.execute(delete(HandledEvent).where(
                HandledEvent.created_at < now - self.HANDLED_EVENT_MEMORY))
        return first

    # -- rate limits --------------------------------------------------------------------------

    def hold_chat(self, platform: str, chat_id: str, until: datetime) -> None:
        """Nobody is to call ``chat_id`` on ``platform`` before ``until`` (a flood wait); a
        later deadline already recorded is kept. One upsert, on SQLite and PostgreSQL."""
        dialect = self._dialect()
        statement = dialect.insert(RateLimit).values(platform=platform, chat_id=str(chat_id),
                                             until=until.astimezone(UTC))
        statement = statement.on_conflict_do_update(
            index_elements=[RateLimit.platform, RateLimit.chat_id],
            set_={"until": statement.excluded.until},
            where=RateLimit.until < statement.excluded.until)
        with self.session() as s:
            s.execute(statement)

    def chat_free_at(self, platform: str, chat_id: str) -> datetime | None:
        """When ``chat_id`` may be called again, or None when it is not held now."""
        with self.session() as s:
            until = s.scalar(select(RateLimit.until).where(
                RateLimit.platform == platform, RateLimit.chat_id == str(chat_id)))
        if until is None:
            return None
        if until.tzinfo is None:  # SQLite keeps no offset; every time stored is UTC
            until = until.replace(tzinfo=UTC)
        return until if until > utcnow() else None

    # -- delivered messages and feedback ------------------------------------------------------

    def find_delivered(self, platform: str, chat_id: str, message_id: str) -> DeliveredMessage | None:
        with self.session() as s:
            return s.scalar(select(DeliveredMessage).where(
                DeliveredMessage.platform == platform, DeliveredMessage.chat_id == chat_id,
                DeliveredMessage.message_id == message_id))

    def anonymous_total(self, platform: str, message_id: str, emoji: str) -> int:
        """The anonymous count of ``emoji`` on a message as far as the log knows."""
        with self.session() as s:
            return int(s.scalar(select(func.coalesce(func.sum(FeedbackEvent.delta), 0)).where(
                FeedbackEvent.platform == platform, FeedbackEvent.message_id == message_id,
                FeedbackEvent.value == emoji, FeedbackEvent.user_id.is_(None),
                FeedbackEvent.kind == "reaction")) or 0)

    def live_reactions(self, platform: str, message_id: str,
                       emoji: str | None = None) -> list[tuple[int, str]]:
        """(user, emoji) pairs whose reactions on a message still stand (added, not removed)."""
        with self.session() as s:
            query = (select(FeedbackEvent.user_id, FeedbackEvent.value)
                     .where(FeedbackEvent.platform == platform,
                            FeedbackEvent.message_id == message_id,
                            FeedbackEvent.kind == "reaction",
                            FeedbackEvent.user_id.is_not(None))
                     .group_by(FeedbackEvent.user_id, FeedbackEvent.value)
                     .having(func.sum(FeedbackEvent.delta) > 0))
            if emoji is not None:
                query = query.where(FeedbackEvent.value == emoji)
            return [(int(u), str(v)) for u, v in s.execute(query).all() if u is not None]

    def feedback_for_job(self, job_id: str) -> Sequence[FeedbackEvent]:
        with self.session() as s:
            return s.scalars(select(FeedbackEvent).where(FeedbackEvent.job_id == job_id)
                             .order_by(FeedbackEvent.id)).all()

    # -- the local platform -------------------------------------------------------------------

    def add_local_message(self, session: Session | None = None, **fields: Any) -> int:
        if session is None:
            with self.session() as s:
                return self.add_local_message(s, **fields)
        message = LocalMessage(created_at=utcnow(), **fields)
        session.add(message)
        session.flush()
        return message.id

    def local_messages_after(self, chat_id: str, after_id: int) -> Sequence[LocalMessage]:
        with self.session() as s:
            return s.scalars(select(LocalMessage).where(
                LocalMessage.chat_id == chat_id, LocalMessage.id > after_id)
                .order_by(LocalMessage.id)).all()

    def remove_local_message(self, message_id: int) -> bool:
        """Take a message out of the local chat (🗑️, a report). The row stays, emptied: its
        number must not go to the next message (SQLite reuses a deleted last row id)."""
        with self.session() as s:
            return bool(rows_changed(s.execute(
                update(LocalMessage).where(LocalMessage.id == message_id)
                .values(kind="removed", text="(removed)", job_id=None, attachments={}))))

    def show_local_progress(self, chat_id: str, reply_to: int, text: str) -> bool:
        """Put ``text`` (a job's progress: a reply as it streams in) on the bot's status
        message that answered message ``reply_to``, as its ``attachments["progress"]``; the
        status text itself stays. False when there is no such message (yet)."""
        with self.session() as s:
            row = s.scalar(select(LocalMessage).where(
                LocalMessage.chat_id == chat_id, LocalMessage.reply_to == reply_to,
                LocalMessage.author == "bot", LocalMessage.kind == "status")
                .order_by(LocalMessage.id).limit(1))
            if row is None:
                return False
            row.attachments = {**row.attachments, "progress": text}
            return True

    def local_progress(self, job_ids: Collection[str]) -> dict[str, str]:
        """The progress a worker showed (:meth:`show_local_progress`) on each job's status
        message, for those that have some."""
        if not job_ids:
            return {}
        with self.session() as s:
            rows = s.scalars(select(LocalMessage).where(
                LocalMessage.job_id.in_(list(job_ids)), LocalMessage.author == "bot",
                LocalMessage.kind == "status")).all()
        return {str(r.job_id): str(r.attachments["progress"]) for r in rows
                if r.attachments.get("progress")}

    def local_messages_by_id(self, message_ids: Collection[int]) -> Sequence[LocalMessage]:
        with self.session() as s:
            return s.scalars(select(LocalMessage).where(
                LocalMessage.id.in_(list(message_ids)))).all()

    def local_message(self, message_id: int) -> LocalMessage | None:
        with self.session() as s:
            return s.get(LocalMessage, message_id)


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
