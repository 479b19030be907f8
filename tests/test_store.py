"""The store's guarantees: idempotent jobs, exclusive claims, fenced delivery, redrive."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from core.events import Actor
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
