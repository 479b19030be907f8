"""The store's guarantees: idempotent jobs, exclusive claims, fenced delivery, redrive."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from core.events import Actor, Channel
from core.store import JobState, Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.upgrade()
    return store


def _job(store: Store, key: str = "k") -> str:
    user = store.ensure_user("local", Actor("alice", "Alice"))
    job, created = store.create_job(idempotency_key=key, kind="text", intent="write",
                                    user_id=user, prompt="p", expanded_prompt="p",
                                    params={"max_new_tokens": 8}, seed=1, platform="local",
                                    delivery={"platform": "local", "chat_id": "c"})
    assert created
    return job.id


def test_upgrade_twice_is_harmless(store: Store) -> None:
    store.upgrade()


def test_same_idempotency_key_returns_the_first_job(store: Store) -> None:
    job_id = _job(store)
    again, created = store.create_job(idempotency_key="k", kind="text", intent="write",
                                      user_id=1, prompt="other", expanded_prompt="other",
                                      params={}, seed=2, platform="local", delivery={})
    assert not created and again.id == job_id and again.prompt == "p"


def test_a_live_claim_is_exclusive_and_a_stale_one_is_taken_over(store: Store) -> None:
    job_id = _job(store)
    first = store.claim(job_id, worker="a", stale_after=0.5, max_attempts=3)
    assert first is not None and first.attempt == 1
    assert store.claim(job_id, worker="b", stale_after=0.5, max_attempts=3) is None
    time.sleep(0.7)
    second = store.claim(job_id, worker="b", stale_after=0.5, max_attempts=3)
    assert second is not None and second.attempt == 2
    # The first worker woke up late: its heartbeat and its delivery are refused.
    assert not store.heartbeat(first)
    with store.finishing(first, JobState.DELIVERED) as session:
        assert session is None
    with store.finishing(second, JobState.DELIVERED) as session:
        assert session is not None
    assert store.get_job(job_id).state == "delivered"  # type: ignore[union-attr]
    assert store.claim(job_id, worker="c", stale_after=0.0, max_attempts=3) is None


def test_claims_past_the_cap_come_back_exhausted(store: Store) -> None:
    job_id = _job(store)
    for attempt in (1, 2):
        claim = store.claim(job_id, worker="w", stale_after=0.0, max_attempts=2)
        assert claim is not None and not claim.exhausted and claim.attempt == attempt
        time.sleep(0.01)
    claim = store.claim(job_id, worker="w", stale_after=0.0, max_attempts=2)
    assert claim is not None and claim.exhausted


def test_redrive_finds_unpublished_and_orphaned_jobs_only(store: Store) -> None:
    unpublished = _job(store, "a")
    published = _job(store, "b")
    store.mark_published(published)
    orphan = _job(store, "c")
    store.mark_published(orphan)
    assert store.claim(orphan, worker="w", stale_after=1, max_attempts=3)
    ids = {j.id for j in store.jobs_to_redrive(stale_after=0.3, republish_after=600)}
    assert ids == {unpublished}
    time.sleep(0.5)
    ids = {j.id for j in store.jobs_to_redrive(stale_after=0.3, republish_after=600)}
    assert ids == {unpublished, orphan}


def test_an_orphan_sent_again_waits_queued_and_is_not_sent_again_each_round(
        store: Store) -> None:
    from core.queue import JobPublisher
    from core.redrive import redrive_once
    from core.settings import Settings

    class Sent(list):  # type: ignore[type-arg]
        def publish(self, job_id: str, kind: str, params: dict, *,  # type: ignore[type-arg]
                    countdown: float | None = None) -> None:
            self.append(job_id)

    orphan = _job(store)
    store.mark_published(orphan)
    first = store.claim(orphan, worker="w", stale_after=1, max_attempts=3)
    assert first is not None
    settings = Settings(_env_file=None, job_stale_after_seconds=0.2)  # type: ignore[call-arg]
    sent: JobPublisher = Sent()
    time.sleep(0.3)
    assert redrive_once(store, sent, settings) == 1
    job = store.get_job(orphan)
    assert job is not None and (job.state, job.worker, job.attempts) == ("queued", None, 1)
    time.sleep(0.3)  # a long queue: nobody took it yet, one more stale period passed
    assert redrive_once(store, sent, settings) == 0, "sent again while it waits in the queue"
    assert not store.heartbeat(first), "the dead worker's claim is over"
    second = store.claim(orphan, worker="v", stale_after=0.2, max_attempts=3)
    assert second is not None and second.attempt == 2, "the crash still counts"


def test_feedback_is_recorded_once_per_event(store: Store) -> None:
    from core.learning import TasteService

    job_id = _job(store)
    fields = dict(job_id=job_id, user_id=None, platform="local", chat_id="c", message_id="1",
                  kind="reaction", value="👍", delta=1)
    taste = TasteService(store)
    assert taste.record(event_key="e1", **fields) is not None
    assert taste.record(event_key="e1", **fields) is None
    assert len(store.feedback_for_job(job_id)) == 1


def test_a_deferred_job_waits_its_turn_and_keeps_its_attempts(store: Store) -> None:
    job_id = _job(store)
    claim = store.claim(job_id, worker="w", stale_after=30, max_attempts=1)
    assert claim is not None and claim.attempt == 1
    assert store.save_outcome(claim, model="m", outbox=[{"kind": "result", "text": "hi"}],
                              artifacts=[])
    assert store.defer(claim, 0.4) is not None
    assert store.claim(job_id, worker="w", stale_after=30, max_attempts=1) is None
    assert store.jobs_to_redrive(stale_after=30, republish_after=600) == []
    time.sleep(0.5)
    again = store.claim(job_id, worker="w", stale_after=30, max_attempts=1)
    assert again is not None and again.attempt == 1 and not again.exhausted
    assert store.get_job(job_id).outbox == [{"kind": "result", "text": "hi"}]  # type: ignore[union-attr]


def test_params_are_checked_on_every_write_and_carry_their_version(store: Store) -> None:
    """core/params.py: a wrong type fails where it is written, not in the reader."""
    from sqlalchemy import update
    from sqlalchemy.exc import StatementError

    from core.params import PARAMS_VERSION, InvalidParams, JobParams
    from core.store import Job

    job_id = _job(store)
    stored = store.get_job(job_id)
    assert stored is not None and stored.params["v"] == PARAMS_VERSION
    assert JobParams.of(stored.params).max_new_tokens == 8
    user = store.ensure_user("local", Actor("alice", "Alice"))
    with pytest.raises(StatementError, match="max_new_tokens") as refused:
        store.create_job(idempotency_key="bad", kind="text", intent="write", user_id=user,
                         prompt="p", expanded_prompt="p", params={"max_new_tokens": "many"},
                         seed=1, platform="local", delivery={})
    assert isinstance(refused.value.orig, InvalidParams)
    with pytest.raises(StatementError, match="takes"):  # an UPDATE is checked too
        with store.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(
                params={"takes": {"index": -1, "of": 2}}))
    with store.session() as s:  # a feature's own key is allowed
        s.execute(update(Job).where(Job.id == job_id).values(params={"my_feature": [1, 2]}))
    assert store.get_job(job_id).params == {"v": PARAMS_VERSION, "my_feature": [1, 2]}  # type: ignore[union-attr]


def test_queue_positions_count_once_per_burst_and_exactly_when_quiet(store: Store) -> None:
    from sqlalchemy import event

    counts: list[str] = []
    event.listen(store.engine, "before_cursor_execute",
                 lambda *a: counts.append(a[2]) if "count(" in a[2] else None)
    jobs = [_job(store, f"burst-{n}") for n in range(5)]
    positions = [store.queue_position(store.get_job(j)) for j in jobs]  # type: ignore[arg-type]
    assert positions == [0, 1, 2, 3, 4], "jobs made in a burst are each told their place"
    assert len(counts) == 1, "a burst is counted in the database once"
    first = store.claim(jobs[0], worker="w", stale_after=60, max_attempts=3)
    assert first is not None
    with store.finishing(first, JobState.DELIVERED):
        pass
    time.sleep(store.QUEUE_COUNT_FRESH_SECONDS + 0.1)  # a quiet moment: counted exactly
    later = _job(store, "later")
    assert store.queue_position(store.get_job(later)) == 4  # type: ignore[arg-type]
    assert len(counts) == 2
    # A job this process did not make (another bot process's) is always counted.
    other = store.get_job(jobs[3])
    store._ordinals.clear()
    assert store.queue_position(other) == 2  # type: ignore[arg-type]


def test_a_settings_change_is_seen_by_the_next_request_at_once(store: Store) -> None:
    from core.events import Channel, ChannelKind

    community = store.ensure_community("local", Channel("c", kind=ChannelKind.GROUP))
    assert store.community_settings(community, recent=True) == {}
    store.change_settings(community, lambda v: v.__setitem__("blocked_words", ["x"]))
    assert store.community_settings(community, recent=True) == {"blocked_words": ["x"]}
    # A copy handed out is the caller's own: changing it changes nothing kept.
    store.community_settings(community, recent=True)["blocked_words"].append("y")
    assert store.community_settings(community, recent=True) == {"blocked_words": ["x"]}
    assert store.community_settings(community) == {"blocked_words": ["x"]}


def test_a_request_transaction_reads_each_row_once(store: Store) -> None:
    from sqlalchemy import event

    from core.learning import TasteService

    user = store.ensure_user("local", Actor("alice", "Alice"))
    taste = TasteService(store)
    reads: list[str] = []
    event.listen(store.engine, "before_cursor_execute",
                 lambda *a: reads.append(a[2]) if "FROM users" in a[2] else None)
    with store.transaction():
        taste.person_of(user)
        taste.opted_out(user)
        taste.person_of(user)
    assert len(reads) == 1
    taste.person_of(user)  # outside a transaction, each call reads afresh
    assert len(reads) == 2


def _grouped_at_once(store: Store, works: list, *, first_waits: bool = True,
                     batch: object = None) -> list:
    """Run ``store.grouped(check, write, then)`` for each ``(check, write[, then])`` in a
    thread of its own,
    the first holding its group open until every other one waits for the next group; returns
    each one's result or exception."""
    import threading

    results: list = [None] * len(works)
    release = threading.Event()

    def run(n: int) -> None:
        check, write, *then = works[n]
        if n == 0 and first_waits:
            inner = check

            def check() -> object:  # the leader's group is open: the others queue up
                release.wait(10)
                return inner()
        try:
            results[n] = store.grouped(check, write, then[0] if then else lambda w: w,
                                       batch=batch)  # type: ignore[arg-type]
        except Exception as exc:
            results[n] = exc

    threads = [threading.Thread(target=run, args=(0,))]
    threads[0].start()
    while not store.group_commit.leading:
        time.sleep(0.001)
    threads += [threading.Thread(target=run, args=(n,)) for n in range(1, len(works))]
    for thread in threads[1:]:
        thread.start()
    while store.group_commit.waiting < len(works) - 1:
        time.sleep(0.001)
    release.set()
    for thread in threads:
        thread.join(10)
    return results


def _make(store: Store, key: str):
    user = store.ensure_user("local", Actor("alice", "Alice"))

    def write(_checked: object) -> str:
        job, created = store.create_job(idempotency_key=key, kind="text", intent="write",
                                        user_id=user, prompt="p", expanded_prompt="p",
                                        params={"max_new_tokens": 8}, seed=1, platform="local",
                                        delivery={"platform": "local", "chat_id": "c"})
        return job.id if created else "duplicate"
    return write


def test_requests_at_once_share_one_transaction_and_each_gets_its_own_answer(
        each_store: Store) -> None:
    store = each_store
    from sqlalchemy import event

    from core.errors import PromptError

    def refused() -> object:
        raise PromptError("over your quota")

    other = Store(store.url)  # another process: it sees only what was committed
    seen_after_commit: list[bool] = []

    def then(job_id: str) -> str:  # runs after the commit (publishing, in the orchestrator)
        seen_after_commit.append(other.get_job(job_id) is not None)
        if results_of_5 and job_id == results_of_5[0]:
            raise RuntimeError("broker down")
        return job_id

    results_of_5: list[str] = []

    def write_5(checked: object) -> str:
        results_of_5.append(_make(store, "g-5")(checked))
        return results_of_5[0]

    works = [(lambda: None, _make(store, f"g-{n}"), then) for n in range(5)]
    works.append((lambda: None, write_5, then))
    works[3] = (refused, _make(store, "g-3"))
    works[4] = (lambda: None, _make(store, "g-1"))  # a replay of request 1, in the same group
    commits: list[object] = []
    count = commits.append
    inserts: list[int] = []  # the rows in each INSERT INTO jobs

    def count_inserts(_conn: object, _cursor: object, statement: str, parameters: object,
                      _context: object, _many: bool) -> None:
        if statement.startswith("INSERT INTO jobs"):
            if isinstance(parameters, dict) and isinstance(parameters.get("id"), list):
                inserts.append(len(parameters["id"]))  # PostgreSQL: SELECT * FROM unnest(…)
            else:
                inserts.append(statement.count("), (") + 1)  # VALUES (…), (…)
    event.listen(store.engine, "commit", count)
    event.listen(store.engine, "before_cursor_execute", count_inserts)
    results = _grouped_at_once(store, works)
    event.remove(store.engine, "commit", count)
    event.remove(store.engine, "before_cursor_execute", count_inserts)
    assert isinstance(results[3], PromptError), "a refusal is its own request's answer"
    assert results[4] == "duplicate", "a replay in the same group is seen as one"
    assert isinstance(results[5], RuntimeError), "what fails after the commit is its own"
    assert seen_after_commit == [True] * 4, "each then step ran once, after the commit"
    other.dispose()
    made = [r for n, r in enumerate(results) if n not in (3, 4, 5)] + results_of_5
    assert all(store.get_job(job_id) is not None for job_id in made)
    assert store.group_commit.groups == 2 and store.group_commit.members == 6
    assert len(commits) == 2, "the leader alone, then the five that waited, in one commit"
    assert inserts == [1, 3], "the group's jobs (less the refused and the replay) in one INSERT"
    assert store.get_job(results[0]).idempotency_key == "g-0"  # type: ignore[union-attr]


def test_a_failing_write_rolls_its_group_back_and_each_request_runs_alone(
        each_store: Store) -> None:
    store = each_store
    attempts: list[int] = []

    def failing(checked: object) -> str:
        attempts.append(1)
        _make(store, "f-2")(checked)  # written, then rolled back with the group
        raise RuntimeError("disk full")

    works = [(lambda: None, _make(store, f"f-{n}")) for n in range(4)]
    works[2] = (lambda: None, failing)
    results = _grouped_at_once(store, works)
    assert isinstance(results[2], RuntimeError) and len(attempts) == 2, \
        "the failing request fails on its own, once in the group and once alone"
    for n in (0, 1, 3):
        assert isinstance(results[n], str) and results[n] != "duplicate", results[n]
        assert store.get_job(results[n]) is not None
    # What the failed group wrote is gone: request 2's job was made again alone and rolled
    # back with its own failure; the others each exist once.
    from sqlalchemy import func, select

    from core.store import Job

    with store.session() as s:
        keys = sorted(s.scalars(select(Job.idempotency_key)).all())
        assert keys == ["f-0", "f-1", "f-3"]
        assert s.scalar(select(func.count()).select_from(Job)) == 3


def test_a_replay_of_an_earlier_request_fails_the_shared_insert_and_each_runs_alone(
        each_store: Store) -> None:
    store = each_store
    (first,) = _grouped_at_once(store, [(lambda: None, _make(store, "r-1"))])
    works = [(lambda: None, _make(store, f"r-{n}")) for n in range(4)]  # r-1 again: a replay
    results = _grouped_at_once(store, works)
    assert results[1] == "duplicate", "the replay is answered as one, alone"
    assert all(isinstance(results[n], str) and store.get_job(results[n]) is not None
               for n in (0, 2, 3)), results
    from sqlalchemy import func, select

    from core.store import Job

    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 4
    assert store.get_job(first).idempotency_key == "r-1"  # type: ignore[union-attr]


def test_a_group_reads_the_jobs_it_made_before_it_commits(each_store: Store) -> None:
    """A group's job rows wait for one shared INSERT, but whatever reads jobs in the group
    sees them (fair share counts a person's jobs in flight)."""
    store = each_store
    user = store.ensure_user("local", Actor("alice", "Alice"))
    person = store.person_facts(user)[0]

    def make_then_count(n: int):
        def write(_checked: object) -> int:
            store.create_job(idempotency_key=f"c-{n}", requester=person, kind="text",
                             intent="write", user_id=user, prompt="p", expanded_prompt="p",
                             params={"max_new_tokens": 8}, seed=1, platform="local",
                             delivery={"platform": "local", "chat_id": "c"})
            return store.in_flight(person, "text")
        return write

    results = _grouped_at_once(store, [(lambda: None, make_then_count(n)) for n in range(4)])
    assert results == [1, 2, 3, 4]


def test_a_groups_rows_read_back_exactly_as_written(each_store: Store) -> None:
    """The group's one INSERT (on PostgreSQL, arrays unnested: one per column) keeps every
    value of every row: nulls, booleans, big numbers, times, JSON, text with quotes and
    braces, and rows that name different columns."""
    from datetime import UTC, datetime

    from sqlalchemy import select

    from core.store import Job
    from core.store.models import RequestLog

    store = each_store
    user = store.ensure_user("local", Actor("alice", "Alice"))
    community = store.ensure_community("local", Channel("room"))
    later = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    asked = [
        dict(kind="image", community_id=community, parent_job_id=None, held=True,
             prompt='a "quoted" {brace} , comma \\ backslash; ünïcode 🎨', seed=2**62 + 5,
             params={"count": 2, "steps": 1, "size": 64, "taste": {"choice": {"style": "ink"}}},
             delivery={"platform": "local", "chat_id": "c", "extra": {"k": [1, None, "x"]}}),
        dict(kind="text", community_id=None, parent_job_id="abc", held=False, prompt="NULL",
             seed=0, params={"max_new_tokens": 8}, delivery={"platform": "local"},
             not_before=later),  # a column the other rows do not name
        dict(kind="text", community_id=community, parent_job_id=None, held=False, prompt="",
             seed=-1, params={"max_new_tokens": 9, "thread": True}, delivery={}),
    ]

    def make(n: int):
        def write(_checked: object) -> str:
            store.log_request(person_id=n + 1, user_id=user, community_id=asked[n]["community_id"])
            job, created = store.create_job(idempotency_key=f"x-{n}", intent="write",
                                            user_id=user, expanded_prompt=f"e{n}",
                                            platform="local", published=n != 0, **asked[n])
            assert created
            returned.append({c: getattr(job, c) for c in Job.__table__.columns.keys()})
            return job.id
        return write

    returned: list[dict[str, object]] = []  # the jobs create_job gave back, as the caller saw

    # The first leads a group of its own and holds it until the three wait behind it.
    _, *ids = _grouped_at_once(store, [(lambda: None, lambda _checked: "first")]
                               + [(lambda: None, make(n)) for n in range(3)])
    assert store.group_commit.groups == 2 and store.group_commit.members == 4, \
        "the three shared one commit"
    with store.session() as s:
        for n, job_id in enumerate(ids):
            job = s.get(Job, job_id)
            assert job is not None and job.idempotency_key == f"x-{n}"
            for name, value in asked[n].items():
                got = getattr(job, name)
                if name == "params":
                    got = {k: v for k, v in got.items() if k != "v"}
                if isinstance(value, datetime):
                    got = got.replace(tzinfo=got.tzinfo or UTC)
                assert got == value, (name, got, value)
            assert (job.published_at is None) == (n == 0) and job.state == "queued"
            assert job.not_before is None or n == 1
            read = {c: getattr(job, c) for c in Job.__table__.columns.keys()}
            given = next(r for r in returned if r["id"] == job_id)
            for name, value in given.items():  # what the caller got is what was stored
                same = read[name]
                if isinstance(value, datetime) and isinstance(same, datetime):
                    value, same = (t.replace(tzinfo=t.tzinfo or UTC) for t in (value, same))
                assert same == value, (name, value, same)
        logged = sorted((r.person_id, r.user_id, r.community_id)
                        for r in s.scalars(select(RequestLog)))
        assert logged == [(1, user, community), (2, user, None), (3, user, community)]


def test_a_batch_that_fails_as_it_ends_runs_each_then_step_again_alone(store: Store) -> None:
    from contextlib import contextmanager

    inside: list[bool] = []
    calls: list[tuple[str, bool]] = []

    @contextmanager
    def failing_batch():
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()
        raise ConnectionError("the pipeline was lost")  # as the publisher's, at its end

    def then(job_id: str) -> str:
        calls.append((job_id, bool(inside)))
        return job_id

    works = [(lambda: None, _make(store, f"b-{n}"), then) for n in range(3)]
    results = _grouped_at_once(store, works, batch=failing_batch)
    assert all(isinstance(r, str) for r in results), results
    for job_id in results:
        assert [in_batch for made, in_batch in calls if made == job_id] == [True, False], \
            "once in the batch, then again on its own"


def test_cached_people_and_profiles_see_this_process_at_once_and_others_in_time(
        each_store: Store) -> None:
    store = each_store
    from sqlalchemy import update

    from core.learning import TasteService
    from core.store import User

    user = store.ensure_user("local", Actor("alice", "Alice"))
    taste = TasteService(store)
    assert store.person_facts(user) == (user, False)
    taste.set_opt_out(user, True)
    assert store.person_facts(user) == (user, True), "a change made here is seen at once"
    assert store.profiles("image", [("person", user)]) == {}
    with store.session() as s:
        TasteService._apply(s, ("person", user, "image"), _signal())
    ((stats, version),) = store.profiles("image", [("person", user)]).values()
    assert version == 1 and stats
    # Another process (another store on the same database) changes the row.
    other = Store(store.url)
    with other.session() as s:
        s.execute(update(User).where(User.id == user).values(learning_opt_out=False))
    assert store.person_facts(user) == (user, True), "within the cache time: the kept answer"
    store.READ_CACHE_SECONDS = 0.0
    assert store.person_facts(user) == (user, False), "after it: read again"
    other.dispose()


def _signal():  # type: ignore[no-untyped-def]
    from core import taste

    return taste.Signal(kind="image", choice={"style": "watercolor"}, value=1.0)


def test_a_user_or_community_is_made_once_and_keeps_its_latest_name(store: Store) -> None:
    from core.events import Channel
    from core.store import User

    first = store.ensure_user("telegram", Actor("42", "Ann"))
    assert store.ensure_user("telegram", Actor("42", "Ann B.")) == first
    assert store.ensure_user("telegram", Actor("42", "")) == first  # no name: keeps the last
    assert store.ensure_user("discord", Actor("42", "Ann")) != first  # another platform's
    with store.session() as s:
        assert s.get(User, first).display_name == "Ann B."  # type: ignore[union-attr]
    group = store.ensure_community("telegram", Channel("-7"))
    store.forget_cached_ids()
    assert store.ensure_community("telegram", Channel("-7")) == group
    assert store.community_settings(group) == {}


def test_newcomers_leave_the_cached_facts_of_others_valid(store: Store) -> None:
    """A raid of new people makes user rows by the hundred: none of them can be in the cache,
    so none of them makes the request path read everybody's facts again; a change to a row
    that is cached still does."""
    from sqlalchemy import event

    from core.learning import TasteService

    alice = store.ensure_user("local", Actor("alice", "Alice"))
    assert store.person_facts(alice) == (alice, False)
    selects: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.startswith("SELECT"):
            selects.append(statement)
    event.listen(store.engine, "before_cursor_execute", count)
    try:
        for n in range(5):
            store.ensure_user("local", Actor(f"new-{n}", f"New {n}"))
        selects.clear()
        assert store.person_facts(alice) == (alice, False)
        assert selects == [], "alice's facts were read again after newcomers joined"
        TasteService(store).set_opt_out(alice, True)
        assert store.person_facts(alice) == (alice, True), "a change to her row is seen at once"
    finally:
        event.remove(store.engine, "before_cursor_execute", count)


def test_a_person_over_quota_in_one_group_gets_exactly_their_quota(each_store: Store,
                                                                   tmp_path: Path) -> None:
    """Requests grouped into one transaction still count each other for the quotas."""
    import threading

    from core.events import Channel, MessageReceived
    from core.orchestrator import Orchestrator
    from core.queue import RecordingPublisher
    from core.settings import Settings

    settings = Settings(_env_file=None, data_dir=tmp_path / "data",  # type: ignore[call-arg]
                        quota_person_hourly=3, fair_share_inflight=0)
    publisher = RecordingPublisher()
    orchestrator = Orchestrator(each_store, publisher, settings)
    actor, channel = Actor("raider", "Raider"), Channel("busy-chat")
    answers: list = []
    lock = threading.Lock()

    def send(n: int) -> None:
        event = MessageReceived(platform="bench", event_id=f"e{n}", actor=actor,
                                channel=channel, text=f"/write a haiku number {n}")
        (reply,) = orchestrator.handle(event)
        with lock:
            answers.append(reply)

    check, first = orchestrator.policy.check, threading.Event()

    def check_when_all_wait(**kw: object) -> object:  # the first group holds until all queue up
        if not first.is_set():
            first.set()
            deadline = time.monotonic() + 10
            while each_store.group_commit.waiting < 11 and time.monotonic() < deadline:
                time.sleep(0.001)
        return check(**kw)  # type: ignore[arg-type]

    orchestrator.policy.check = check_when_all_wait  # type: ignore[method-assign]
    threads = [threading.Thread(target=send, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    made = [a for a in answers if a.job_id]
    refused = [a for a in answers if not a.job_id]
    assert len(answers) == 12 and len(made) == 3 and len(publisher.published) == 3
    assert all("limit of 3 requests per hour" in a.text for a in refused)
    assert each_store.group_commit.members == 12 and each_store.group_commit.groups == 2
