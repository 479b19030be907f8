"""Group commit: requests handled at the same time share one transaction and one commit.

A bot under a burst hands core many requests at once (the adapters run ``handle`` in threads).
Each request's database work is small (a job row, a request-log row, a few cached reads), so
its cost is mostly the round trips of opening and committing its own transaction, and the
threads contending for the connection pool. Here the first request to arrive leads: it runs its
own work and that of every request waiting behind it, in its thread, in one transaction, and
commits once. Requests arriving meanwhile wait for the next group, which one of them leads.
A request that finds nobody leading leads a group of one at once: a quiet bot waits for nothing.

Each member brings up to three steps:

* ``check()``: reads only, and may raise a :class:`~core.errors.UserInputError` (a quota, a
  refusal). Such an error is that member's answer; the group goes on.
* ``write(checked)``: the member's writes. Any exception here rolls the whole group back, and
  then every member of it runs alone, in its own thread and transaction, exactly as without
  grouping (so the member whose write fails gets its own error, and nobody else's). In a
  group of several, the jobs the writes make go in one multi-row INSERT, before anything
  reads them or at the commit (:meth:`~core.store.Store.transaction`'s ``defer_jobs``); a
  job that existed already (a replayed event) fails the group in the same way.
* ``then(written)``, optional: what follows the commit (publishing the jobs). The leader runs
  the group's, one after another, inside the members' ``batch`` (the publisher's: one Redis
  pipeline for the group's jobs), while the next group starts: eight threads publishing at
  once each spent about twice the CPU per job that one thread does, contending for kombu's
  connection and producer pools. What it raises is its own member's error. If the batch
  fails as it ends, each ``then`` runs again alone, so it must be safe to repeat.

``bench/latency.py`` reports how many requests shared each commit in its concurrent burst.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from core.errors import UserInputError

if TYPE_CHECKING:
    from core.store._store import Store

log = logging.getLogger(__name__)

C = TypeVar("C")
W = TypeVar("W")
R = TypeVar("R")


#: What the ``then`` steps of a group may run inside, entered once for all the members that
#: name the same one (the publisher's :meth:`~core.queue.CeleryPublisher.batch`).
Batch = Callable[[], AbstractContextManager[Any]]


def _same(written: Any) -> Any:
    return written


class _Member(Generic[C, W, R]):
    __slots__ = ("check", "write", "then", "batch", "turn", "lead", "alone", "written",
                 "result", "failure")

    def __init__(self, check: Callable[[], C], write: Callable[[C], W],
                 then: Callable[[W], R], batch: Batch | None) -> None:
        self.check, self.write, self.then, self.batch = check, write, then, batch
        self.turn = threading.Event()  # set when done, or when this member is to lead
        self.lead = False
        self.alone = False  # the group failed: run on your own
        self.written: W | None = None
        self.result: R | None = None
        self.failure: BaseException | None = None  # raised to this member's caller

    def finish(self) -> None:
        """``then``, after the commit; what it raises is this member's to raise."""
        try:
            self.result = self.then(self.written)  # type: ignore[arg-type]
        except Exception as exc:
            self.failure = exc


class GroupCommit:
    """Runs concurrent ``check``/``write``/``then`` steps in shared transactions (see the
    module)."""

    #: The most requests one transaction takes: a bigger group holds its first members longer.
    MAX_GROUP = 64

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._waiting: list[_Member[Any, Any, Any]] = []
        self._leading = False
        #: Groups committed and the requests in them, for tests and the ingest benchmark.
        self.groups = 0
        self.members = 0

    @property
    def leading(self) -> bool:
        """Whether a group is being run now."""
        return self._leading

    @property
    def waiting(self) -> int:
        """Requests waiting for the next group."""
        return len(self._waiting)

    def run(self, check: Callable[[], C], write: Callable[[C], W],
            then: Callable[[W], R] = _same, batch: Batch | None = None) -> R:
        member: _Member[C, W, R] = _Member(check, write, then, batch)
        with self._lock:
            self._waiting.append(member)
            if not self._leading:
                self._leading = member.lead = True
        if not member.lead:
            member.turn.wait()
        if member.lead:
            self._lead(member)
        if member.alone:
            with self._store.transaction():
                written = write(check())
            return then(written)
        if member.failure is not None:
            raise member.failure
        return member.result  # type: ignore[return-value]

    def _lead(self, me: _Member[Any, Any, Any]) -> None:
        with self._lock:
            group = self._waiting[:self.MAX_GROUP]
            del self._waiting[:self.MAX_GROUP]
        committed = False
        try:
            committed = self._commit(group)
        finally:
            with self._lock:  # the next group may start while this one's ``then`` steps run
                if self._waiting:
                    successor = self._waiting[0]
                    successor.lead = True
                    successor.turn.set()
                else:
                    self._leading = False
            try:
                if committed:
                    self._finish([m for m in group if m.failure is None])
            finally:
                for member in group:
                    if member is not me:
                        member.turn.set()

    @staticmethod
    def _finish(done: list[_Member[Any, Any, Any]]) -> None:
        """The ``then`` steps, in order; those that name the same batch inside one entry.

        A batch that fails as it ends (its messages were not all sent) is as if it had not
        been: each of its members' ``then`` steps runs again, on its own. ``then`` steps that
        use a batch are therefore safe to repeat (publishing a job twice is harmless).
        """
        for batch, group in itertools.groupby(done, key=lambda m: m.batch):
            members = list(group)
            try:
                with ExitStack() as inside:
                    if batch is not None:
                        try:
                            inside.enter_context(batch())
                        except Exception as exc:  # then each step goes on its own
                            log.warning("a batch for %d requests failed to open: %s",
                                        len(members), exc)
                    for member in members:
                        member.finish()
            except Exception as exc:
                log.warning("a batch for %d requests failed (%s: %s); each goes again alone",
                            len(members), type(exc).__name__, exc)
                for member in members:
                    member.failure = None
                    member.finish()

    def _commit(self, group: list[_Member[Any, Any, Any]]) -> bool:
        """Run the group's checks and writes in one transaction; whether it committed."""
        try:
            # Several requests' jobs go in one INSERT, before anything reads them (a job that
            # existed already, a replayed event, fails the group: then each runs alone).
            with self._store.transaction(defer_jobs=len(group) > 1):
                for member in group:
                    try:
                        checked = member.check()
                    except UserInputError as exc:
                        member.failure = exc
                        continue
                    member.written = member.write(checked)
        except BaseException as exc:  # a write failed: nobody's work was committed
            if len(group) == 1 or not isinstance(exc, Exception):
                group[0].failure = exc  # a request alone fails as it would ungrouped
                for member in group[1:]:
                    member.alone = True
                return False
            log.info("a group of %d requests failed (%s: %s); each runs alone", len(group),
                     type(exc).__name__, exc)
            for member in group:
                member.alone = True
                member.written = member.failure = None
            return False
        self.groups += 1
        self.members += len(group)
        return True
