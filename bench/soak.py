"""Soak: one bot and two workers on Redis + PostgreSQL, many people on Telegram and Discord, a
worker killed every so often. Is every request answered once, how fast, and does the bot grow?

* The bot is one process (bench/_soak_bot.py): Telegram through python-telegram-bot polling the
  fake Bot API (tests/fake_telegram.py), Discord through discord.py on the fake REST API
  (tests/fake_discord.py), its interactions fed into discord.py's gateway parser.
* Two real worker processes (``python -m workers``) with a fast stand-in model: the tiny demo
  picture pipeline at one denoising step, one take per request. Every ``--kill-every`` seconds
  one of them is SIGKILLed with its pool (as a lost machine would be) and a new one started.
* ``--people`` simulated people, half on each platform, send ``--requests`` picture requests at
  ``--rate`` per second (open loop: a person may have several waiting).

Figures: delivered (requests with a result), lost (no result and a job that will not post one:
failed or missing), late (still queued or running when ``--drain-timeout`` after the last
request ran out; kills stop when the last request is sent), duplicated (more than one result
for one request), p50/p99 from request to result (as the fakes saw them),
kills, and the bot's resident memory at start, after warm-up and at the end against a stated
bound (``--rss-bound-mib`` above the warm-up figure).

    .venv/bin/python bench/soak.py                                   # 5,000 requests, 200 people
    .venv/bin/python bench/soak.py --requests 300 --people 40 --kill-every 20   # a short run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests._stack import REPO as STACK_REPO  # noqa: E402
from tests._stack import Stack, postgres_reachable, redis_reachable  # noqa: E402
from tests.fake_discord import (  # noqa: E402
    APPLICATION_ID,
    BOT_TOKEN,
    FakeDiscord,
    slash_payload,
)
from tests.fake_telegram import FakeTelegram  # noqa: E402

WORKER_AGENT = "MuseSpark-worker"
READY_TIMEOUT_SECONDS = 300.0
#: Request numbers of the warm-up requests (not counted).
WARM_UP_BASE = 10_000_000
WARM_UP_SHARE = 0.1
PROMPT = re.compile(r"soak-(\d+)\b")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Results:
    """Reads what the workers posted to the two fakes: request number -> times of its results."""

    def __init__(self, telegram: FakeTelegram, discord: FakeDiscord,
                 discord_tokens: dict[str, int]) -> None:
        self.telegram, self.discord, self.tokens = telegram, discord, discord_tokens

    def collect(self) -> dict[int, list[float]]:
        found: dict[int, list[float]] = {}
        for call in self.telegram.calls("sendPhoto", ok=True):
            match = PROMPT.search(str(call.params.get("caption", "")))
            if match and call.user_agent == WORKER_AGENT:
                found.setdefault(int(match.group(1)), []).append(call.at)
        prefix = f"/webhooks/{APPLICATION_ID}/"
        for call in list(self.discord.calls):
            if call.method == "POST" and call.path.startswith(prefix) and call.files \
                    and 200 <= call.status < 300:
                number = self.tokens.get(call.path[len(prefix):].split("/")[0])
                if number is not None:
                    found.setdefault(number, []).append(call.at)
        return found


def _why(stack: Stack, numbers: list[int]) -> dict[str, object]:
    """What became of the jobs of requests that got no result (for the report)."""
    from sqlalchemy import select

    from core.store import Job, Store

    if not numbers:
        return {}
    states: dict[str, list[str]] = {}
    store = Store(stack.settings.resolved_database_url)
    with store.session() as s:
        for number in numbers:
            job = s.scalars(select(Job).where(Job.prompt.like(f"soak-{number} %"))).first()
            key = "no job" if job is None else (
                f"{job.state} (attempts {job.attempts}, {job.platform}"
                f"{', ' + (job.failure_reason or '')[:60] if job.failure_reason else ''})")
            states.setdefault(key, []).append(f"{number}:{job.id if job else '-'}")
    store.dispose()
    return dict(states)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--people", type=int, default=200)
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second")
    parser.add_argument("--kill-every", type=float, default=60.0, metavar="SECONDS",
                        help="SIGKILL a worker this often (0: never)")
    parser.add_argument("--drain-timeout", type=float, default=600.0, metavar="SECONDS",
                        help="after the last request, how long to wait for results")
    parser.add_argument("--rss-bound-mib", type=float, default=64.0,
                        help="allowed bot memory growth from warm-up to the end")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="run in DIR and keep the bot's and workers' logs there")
    args = parser.parse_args()
    for problem in (redis_reachable(), postgres_reachable()):
        if problem:
            print(f"needs Redis and PostgreSQL: {problem}", file=sys.stderr)
            return 2
    rng = random.Random(args.seed)
    people = [("telegram" if n % 2 == 0 else "discord", 5000 + n) for n in range(args.people)]
    model_cache = Path(os.environ.get("MUSESPARK_TEST_MODEL_CACHE")
                       or tempfile.mkdtemp(prefix="soak-models-"))
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(str(args.keep)) if args.keep
          else tempfile.TemporaryDirectory(prefix="soak-")) as tmp, \
            FakeTelegram() as telegram, FakeDiscord() as discord:
        stack = Stack.create(
            "distributed", Path(tmp) / "stack", model_cache,
            MUSESPARK_TELEGRAM_TOKEN=telegram.token, MUSESPARK_TELEGRAM_API_URL=telegram.url,
            MUSESPARK_DISCORD_TOKEN=BOT_TOKEN, MUSESPARK_DISCORD_API_URL=discord.api_url,
            MUSESPARK_IMAGE_TAKES="1", MUSESPARK_IMAGE_STEPS="1")
        bot = None
        try:
            workers = [stack.start_worker(wait=False) for _ in range(2)]
            for worker in workers:
                worker.wait_ready()
            env = {k: v for k, v in os.environ.items() if not k.startswith("MUSESPARK_")}
            env.update(stack.env, PYTHONPATH=str(STACK_REPO), PYTHONUNBUFFERED="1")
            bot_log = (Path(tmp) / "bot.log").open("wb")
            bot = subprocess.Popen([sys.executable, str(REPO / "bench" / "_soak_bot.py")],
                                   env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=bot_log, cwd=tmp)
            assert bot.stdout is not None and bot.stdin is not None
            line = bot.stdout.readline()
            if line.strip() != b"ready":
                raise RuntimeError(f"the bot did not start: {line!r}; see its log")
            rss = {"start": rss_mib(bot.pid)}
            tokens: dict[str, int] = {}
            sent: dict[int, float] = {}
            results = Results(telegram, discord, tokens)

            def send(number: int, platform: str, person: int) -> None:
                assert bot is not None and bot.stdin is not None
                prompt = f"soak-{number} a lighthouse at dusk"
                if platform == "telegram":
                    telegram.push(telegram.text_update(person, f"/imagine {prompt}",
                                                       user_id=person))
                else:
                    payload = slash_payload(discord, "imagine", {"prompt": prompt},
                                            user_id=str(900000000000000000 + person))
                    tokens[payload["token"]] = number
                    bot.stdin.write(json.dumps(payload).encode() + b"\n")
                    bot.stdin.flush()

            # Warm-up, not counted: both workers load the model and both platforms answer.
            warm_ups = [WARM_UP_BASE + n for n in range(2 * len(workers))]
            for n, number in enumerate(warm_ups):
                send(number, people[n % 2][0], people[n % 2][1])
            deadline = time.monotonic() + READY_TIMEOUT_SECONDS
            while not set(warm_ups) <= set(results.collect()):
                if time.monotonic() > deadline:
                    raise RuntimeError("the warm-up requests got no result; see the logs")
                time.sleep(0.5)
            kills = 0
            stop_killing = threading.Event()

            def killer() -> None:
                nonlocal kills
                while not stop_killing.wait(args.kill_every):
                    victim = workers[kills % len(workers)]
                    victim.kill_hard()
                    kills += 1
                    workers[workers.index(victim)] = stack.start_worker(wait=False)

            killing = threading.Thread(target=killer, daemon=True)
            if args.kill_every > 0:
                killing.start()
            began = time.monotonic()
            warm_at = max(1, int(args.requests * WARM_UP_SHARE))
            for number in range(args.requests):
                due = began + number / args.rate
                time.sleep(max(0.0, due - time.monotonic()))
                platform, person = rng.choice(people)
                send(number, platform, person)
                sent[number] = time.monotonic()
                if number == warm_at:
                    rss["warm"] = rss_mib(bot.pid)
            sending_took = time.monotonic() - began
            stop_killing.set()  # the drain measures recovery, not more kills
            deadline = time.monotonic() + args.drain_timeout
            while time.monotonic() < deadline:
                if len(set(results.collect()) & set(sent)) >= args.requests:
                    break
                time.sleep(1.0)
            time.sleep(3.0)  # a duplicate post would land now
            rss["end"] = rss_mib(bot.pid)
            found = results.collect()
            found = {n: times for n, times in found.items() if n in sent}
            missing = sorted(set(sent) - set(found))
            why_lost = _why(stack, missing)
            twice = sorted(n for n, times in found.items() if len(times) > 1)
            latency = [min(found[n]) - sent[n] for n in found]
            delivered = len(found)
            duplicated = sum(1 for times in found.values() if len(times) > 1)
            figures = {
                "requests": args.requests, "people": args.people, "rate": args.rate,
                "kill_every": args.kill_every, "kills": kills,
                "sending_seconds": round(sending_took, 1),
                "total_seconds": round(time.monotonic() - began, 1),
                "delivered": delivered,
                # Still queued or running when the drain ended: late, not lost.
                "late": sum(len(v) for k, v in why_lost.items()
                            if k.startswith(("queued", "running"))),
                "lost": sum(len(v) for k, v in why_lost.items()
                            if not k.startswith(("queued", "running"))),
                "duplicated": duplicated,
                "p50_seconds": round(percentile(latency, 0.5), 2) if latency else None,
                "p99_seconds": round(percentile(latency, 0.99), 2) if latency else None,
                "bot_rss_mib": {k: round(v, 1) for k, v in rss.items()},
                "rss_bound_mib": args.rss_bound_mib,
                "rss_within_bound": rss["end"] - rss.get("warm", rss["start"])
                <= args.rss_bound_mib,
                "lost_jobs": why_lost,
                "duplicated_requests": twice,
            }
        finally:
            if bot is not None:
                if bot.stdin is not None:
                    bot.stdin.close()
                try:
                    bot.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    bot.kill()
            stack.close()
    print(f"soak: {args.requests} requests from {args.people} people (Telegram and Discord "
          f"fakes) at {args.rate}/s, one bot + two workers on Redis + PostgreSQL, a worker "
          f"SIGKILLed every {args.kill_every:g} s ({kills} kills)")
    print(f"  delivered {figures['delivered']}, lost {figures['lost']}, duplicated "
          f"{figures['duplicated']}, still queued or running after the drain "
          f"{figures['late']}")
    print(f"  request to result: p50 {figures['p50_seconds']} s, p99 {figures['p99_seconds']} s"
          f" (sending took {figures['sending_seconds']} s, all done in "
          f"{figures['total_seconds']} s)")
    if figures["lost_jobs"]:
        print(f"  lost, by the state of their job: {figures['lost_jobs']}")
    if figures["duplicated_requests"]:
        print(f"  posted twice: requests {figures['duplicated_requests']}")
    memory = figures["bot_rss_mib"]
    print(f"  bot RSS: start {memory['start']} MiB, after warm-up {memory.get('warm')} MiB, "
          f"end {memory['end']} MiB (bound: end <= warm-up + {args.rss_bound_mib:g} MiB: "
          f"{'kept' if figures['rss_within_bound'] else 'EXCEEDED'})")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    ok = (figures["lost"] == 0 and figures["late"] == 0 and figures["duplicated"] == 0
          and figures["rss_within_bound"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
