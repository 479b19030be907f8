"""Queue fairness: how long a newcomer's single request waits behind a busy person's 50.

One worker process, the embedded stack (SQLite store and broker, the tiny picture pipeline, the
NudeNet check), run twice side by side in one process:

* ``first come, first served`` (``MUSESPARK_FAIR_SHARE_INFLIGHT=0``): every job is published
  at once, so the broker's queue holds the busy person's 50 before the newcomers';
* ``fair share`` (``MUSESPARK_FAIR_SHARE_INFLIGHT=1``, the default): a person has one job of a
  kind in flight; their further jobs are held in the store and published one by one as theirs
  finish, so a newcomer's job enters the queue behind at most one job per active person.

One heavy requester sends ``--heavy`` picture requests, then ``--light`` people send one each.
For each light request it reports the wait (request to delivered), that wait divided by the
same request's time on an empty queue (measured first, median of three), and how many jobs the
worker started before it.

    .venv/bin/python bench/fairness.py --model-cache /tmp/mscache
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bots.console import ConsoleChat  # noqa: E402
from core.events import Actor  # noqa: E402
from core.store import Job  # noqa: E402
from tests._stack import Stack  # noqa: E402

RESULT_TIMEOUT_SECONDS = 1800.0


def _chat(stack: Stack, name: str) -> ConsoleChat:
    chat = ConsoleChat(stack.runtime.orchestrator, stack.runtime.store, chat_id=f"room-{name}",
                       user=Actor(name, name))
    chat.poll()
    return chat


def _ask(chat: ConsoleChat, prompt: str) -> str:
    status = chat.say(f"/imagine {prompt} --count 1")[-1]
    assert status.job_id, status
    return status.job_id


def _seconds(job: Job) -> float:
    assert job.finished_at is not None
    return (job.finished_at - job.created_at).total_seconds()


def run(mode: str, inflight: int, root: Path, model_cache: Path, heavy: int,
        light: int) -> tuple[float, list[tuple[float, int]]]:
    stack = Stack.create("embedded", root, model_cache,
                         MUSESPARK_FAIR_SHARE_INFLIGHT=str(inflight),
                         MUSESPARK_IMAGE_TAKES="1", MUSESPARK_PICTURE_DETECTOR="nudenet")
    try:
        stack.start_worker()
        warm = _chat(stack, "warmup")
        stack.wait_job(_ask(warm, "a warm-up lamp"), ("delivered",), RESULT_TIMEOUT_SECONDS)
        empty = statistics.median(
            _seconds(stack.wait_job(_ask(_chat(stack, f"alone{n}"), "a paper boat"),
                                    ("delivered",), RESULT_TIMEOUT_SECONDS))
            for n in range(3))
        busy = _chat(stack, "heavy")
        heavy_jobs = [_ask(busy, f"a lantern number {n}") for n in range(heavy)]
        light_jobs = [_ask(_chat(stack, f"light{n}"), "a paper boat") for n in range(light)]
        done = {j: stack.wait_job(j, ("delivered",), RESULT_TIMEOUT_SECONDS)
                for j in [*heavy_jobs, *light_jobs]}
        order = sorted(done.values(), key=lambda j: j.started_at or j.created_at)
        results = []
        for job_id in light_jobs:
            job = done[job_id]
            before = sum(1 for j in order if j.started_at and job.started_at
                         and j.started_at < job.started_at)
            results.append((_seconds(job), before))
        print(f"{mode}: done", file=sys.stderr)
        return empty, results
    finally:
        stack.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-cache", type=Path, required=True)
    parser.add_argument("--heavy", type=int, default=50)
    parser.add_argument("--light", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="musespark-fairness-") as folder:
        runs = {mode: run(mode, inflight, Path(folder) / str(inflight), args.model_cache,
                          args.heavy, args.light)
                for mode, inflight in (("first come, first served", 0), ("fair share", 1))}
    print(f"one worker; 1 heavy requester x {args.heavy} pictures, then {args.light} light "
          "requesters x 1 picture each")
    for mode, (empty, results) in runs.items():
        print(f"\n{mode}: a light request on an empty queue takes {empty:.2f} s")
        print("  light  wait s  x empty  jobs started before it")
        for n, (wait, before) in enumerate(results, start=1):
            print(f"  {n:>5}  {wait:6.2f}  {wait / empty:7.1f}  {before:>5}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
