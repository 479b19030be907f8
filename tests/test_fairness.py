"""Fair share: a person's further jobs wait, held back in the store, while one of theirs is in
flight; a newcomer's request goes straight to the queue and is served next. Real workers, on
the embedded and distributed stacks (bench/fairness.py measures the waits)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from bots.console import ConsoleChat
from core.events import Actor
from tests._stack import Stack

RESULT_SECONDS = 120


def test_a_newcomer_is_served_before_a_busy_persons_backlog(
        make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(MUSESPARK_FAIR_SHARE_INFLIGHT="1")
    runtime = stack.runtime  # requests first, the worker after: nothing finishes meanwhile

    def person(name: str) -> ConsoleChat:
        chat = ConsoleChat(runtime.orchestrator, runtime.store,
                           chat_id=f"room-{uuid.uuid4().hex[:6]}", user=Actor(name, name))
        chat.poll()
        return chat

    busy, newcomer = person("busy"), person("newcomer")
    backlog = []
    for n in range(4):
        status = busy.say(f"/imagine a lantern number {n} --count 1")[-1]
        assert status.job_id
        assert ("after your earlier requests" in status.text) == (n > 0), status.text
        backlog.append(status.job_id)
    held = [stack.job(j) for j in backlog[1:]]
    assert all(j.held and j.published_at is None for j in held), held
    mine = newcomer.say("/imagine a single kite --count 1")[-1]
    assert mine.job_id and "after your earlier" not in mine.text
    assert not stack.job(mine.job_id).held
    stack.start_worker()

    done = {j: stack.wait_job(j, ("delivered",), timeout=RESULT_SECONDS)
            for j in [*backlog, mine.job_id]}
    first, second = sorted(done.values(), key=lambda j: j.started_at)[:2]
    assert first.id == backlog[0] and second.id == mine.job_id, [
        (j.id, j.started_at) for j in done.values()]
    assert not any(stack.job(j).held for j in backlog)
