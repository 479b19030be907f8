"""Simulated people with hidden tastes teach the bot: does it learn, and how fast?

Everything but generation is real: the orchestrator, the store (SQLite), the learner, feedback
weights, caps and profiles. Simulated people live in communities; each has a hidden favourite
style, aspect and guidance (each follows their community's norm with probability 0.75). Every
round each person asks for a picture and gets the bot's takes (``MUSESPARK_IMAGE_TAKES``, in
different styles). They like each take with the probability their taste gives, misjudge 10% of
the time (noise), and make one reaction: 👍 on the take they like best of those they like, or
👎 on one take when they like none. One troll per community 💩-reacts to other people's
results. A round is an hour of simulated time (the per-actor hourly cap is in force).

Three bots see the same people with the same number of takes: the adaptive bot, the same bot
with learning off, and an oracle that knows each hidden taste. Acceptance is the probability
that the person likes the best take they got (the one they keep), averaged over people. The
whole run is done twice, side by side: with one take per request and with the default takes.
Then newcomers join: their first five requests are measured with their community's taste to
start from and without (a community with no history).

    .venv/bin/python bench/simulated_users.py --rounds 30 --repeats 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core import taste  # noqa: E402
from core.orchestrator import Orchestrator  # noqa: E402
from core.queue import RecordingPublisher  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.store import Store, utcnow  # noqa: E402
from tests._sim import SimChat  # noqa: E402

STYLES = sorted(taste.CATALOGUE["image"]["style"])
ASPECTS = sorted(taste.CATALOGUE["image"]["aspect"])
GUIDANCES = sorted(taste.CATALOGUE["image"]["guidance"])
#: How much each matching dimension adds to the chance of a 👍 (sums to 0.95 with the floor).
FLOOR, STYLE_GAIN, ASPECT_GAIN, GUIDANCE_GAIN = 0.05, 0.6, 0.15, 0.15
NOISE = 0.1
SHARE_COMMUNITY_TASTE = 0.75
TARGET_SHARE_OF_ORACLE = 0.8
ROLLING_WINDOW = 5


@dataclass(frozen=True)
class Person:
    name: str
    community: str
    style: str
    aspect: str
    guidance: str

    def likes(self, choice: dict[str, str]) -> float:
        return (FLOOR + STYLE_GAIN * (choice["style"] == self.style)
                + ASPECT_GAIN * (choice["aspect"] == self.aspect)
                + GUIDANCE_GAIN * (choice["guidance"] == self.guidance))

    @property
    def oracle(self) -> float:
        return self.likes({"style": self.style, "aspect": self.aspect, "guidance": self.guidance})


def make_people(rng: random.Random, communities: int, per_community: int) -> list[Person]:
    people = []
    for c in range(communities):
        norms = (rng.choice(STYLES), rng.choice(ASPECTS), rng.choice(GUIDANCES))
        for p in range(per_community):
            # Each of a person's preferences follows the community's norm, or is their own.
            style, aspect, guidance = (
                norm if rng.random() < SHARE_COMMUNITY_TASTE else rng.choice(values)
                for norm, values in zip(norms, (STYLES, ASPECTS, GUIDANCES), strict=True))
            people.append(Person(f"c{c}p{p}", f"c{c}", style, aspect, guidance))
    return people


def make_bot(folder: Path, *, learning: bool, seed: int, takes: int) -> Orchestrator:
    store = Store(f"sqlite:///{folder / 'bench.db'}")
    store.upgrade()
    # Simulated people ask far more often than the operator's default quotas allow.
    settings = Settings(_env_file=None, data_dir=folder, learning=learning,  # type: ignore[call-arg]
                        image_takes=takes, quota_person_hourly=0, quota_person_daily=0,
                        quota_community_hourly=0)
    return Orchestrator(store, RecordingPublisher(), settings, rng=random.Random(seed))


def run_bot(bot: Orchestrator, people: list[Person], rounds: int, rng: random.Random,
            trolls: bool) -> dict[str, list[float]]:
    """Returns, per person, the expected acceptance of each of their requests in order."""
    chats = {c: SimChat(bot, chat_id=c) for c in {p.community for p in people}}
    start = utcnow()
    history: dict[str, list[float]] = {p.name: [] for p in people}
    recent: dict[str, list[str]] = {c: [] for c in chats}
    for r in range(rounds):
        at = start + timedelta(hours=r)
        for person in people:
            chat = chats[person.community]
            takes = []
            for job_id, message in chat.ask_takes(person.name, "/imagine a lighthouse at dusk",
                                                  at=at):
                job = bot.store.get_job(job_id)
                assert job is not None
                p_like = person.likes(job.params["taste"]["choice"])
                liked = (rng.random() < p_like) != (rng.random() < NOISE)
                takes.append((p_like, liked, message))
            history[person.name].append(max(p for p, _, _ in takes))
            kept = [t for t in takes if t[1]]
            if kept:
                message = max(kept, key=lambda t: t[0])[2]
                chat.react(person.name, message, "👍", at=at)
            else:
                message = rng.choice(takes)[2]
                chat.react(person.name, message, "👎", at=at)
            recent[person.community].append(message)
        if trolls:
            for community, chat in chats.items():
                for message in recent[community][-8:]:
                    chat.react(f"{community}-troll", message, "💩", at=at)
        recent = {c: [] for c in chats}
    return history


def reactions_to_target(series: list[float], oracle: float) -> int | None:
    for n in range(ROLLING_WINDOW, len(series) + 1):
        if statistics.fmean(series[n - ROLLING_WINDOW:n]) >= TARGET_SHARE_OF_ORACLE * oracle:
            return n
    return None


def run_once(seed: int, rounds: int, communities: int, per_community: int, takes: int,
             tmp: Path) -> dict[str, Any]:
    people = make_people(random.Random(seed), communities, per_community)
    folders = {name: tmp / f"{name}-{seed}-{takes}" for name in ("adaptive", "off", "alone")}
    for folder in folders.values():
        folder.mkdir()
    adaptive = make_bot(folders["adaptive"], learning=True, seed=seed, takes=takes)
    learning_off = make_bot(folders["off"], learning=False, seed=seed, takes=takes)
    series = {
        "adaptive": run_bot(adaptive, people, rounds, random.Random(seed + 1), True),
        "off": run_bot(learning_off, people, rounds, random.Random(seed + 1), True),
    }
    # Newcomers: one per community joins the adaptive bot's communities; the same people also
    # join empty communities of a fresh bot. Five requests each.
    newcomers = [Person(f"{p.community}-new", p.community, p.style, p.aspect, p.guidance)
                 for p in people[::per_community]]
    with_community = run_bot(adaptive, newcomers, 5, random.Random(seed + 2), False)
    alone = run_bot(make_bot(folders["alone"], learning=True, seed=seed, takes=takes),
                    [Person(p.name, p.community + "-empty", p.style, p.aspect, p.guidance)
                     for p in newcomers], 5, random.Random(seed + 2), False)
    tail = max(1, rounds // 3)
    reach = [reactions_to_target(series["adaptive"][p.name], p.oracle) for p in people]
    return {
        "oracle": statistics.fmean(p.oracle for p in people),
        "rounds": [(statistics.fmean(h[r] for h in series["adaptive"].values()),
                    statistics.fmean(h[r] for h in series["off"].values())) for r in range(rounds)],
        "at20": statistics.fmean(statistics.fmean(h[15:20]) for h in series["adaptive"].values()),
        "tail": statistics.fmean(x for h in series["adaptive"].values() for x in h[-tail:]),
        "off": statistics.fmean(x for h in series["off"].values() for x in h),
        "reach": reach,
        "newcomer": (statistics.fmean(x for h in with_community.values() for x in h),
                     statistics.fmean(x for h in alone.values() for x in h)),
    }


def report(runs: list[dict[str, Any]], takes: int, args: argparse.Namespace) -> dict[str, float]:
    oracle = statistics.fmean(r["oracle"] for r in runs)
    n_people = args.communities * args.people
    print(f"\n== {takes} take{'s' if takes > 1 else ''} per request: {args.repeats} x {n_people} "
          f"people in {args.communities} communities, {args.rounds} rounds (one reaction per "
          f"person per round), noise {NOISE:.0%}, one troll per community; oracle acceptance "
          f"{oracle:.3f}")
    if args.verbose:
        print(f"{'round':>5} {'adaptive':>9} {'learn off':>9} {'oracle':>7} {'adaptive/oracle':>16}")
        for r in range(args.rounds):
            adapt = statistics.fmean(run["rounds"][r][0] for run in runs)
            off = statistics.fmean(run["rounds"][r][1] for run in runs)
            print(f"{r + 1:>5} {adapt:>9.3f} {off:>9.3f} {oracle:>7.3f} {adapt / oracle:>16.2f}")
    at20 = statistics.fmean(r["at20"] for r in runs)
    tail = statistics.fmean(r["tail"] for r in runs)
    off = statistics.fmean(r["off"] for r in runs)
    reached = [n for r in runs for n in r["reach"] if n is not None]
    within = sum(n <= 20 for n in reached)
    print(f"reactions 16-20: adaptive {at20:.3f} = {at20 / oracle:.0%} of oracle "
          f"(target >= {TARGET_SHARE_OF_ORACLE:.0%})")
    print(f"last {max(1, args.rounds // 3)} rounds: adaptive {tail:.3f} = {tail / oracle:.0%} of "
          f"oracle, {tail / off:.2f}x learning off ({off:.3f}; target >= 2x)")
    print(f"reactions until a person's rolling {ROLLING_WINDOW}-request acceptance reaches "
          f"{TARGET_SHARE_OF_ORACLE:.0%} of their oracle: median "
          f"{statistics.median(reached) if reached else 'never'}; within 20 for "
          f"{within}/{n_people * args.repeats} people")
    with_c = statistics.fmean(r["newcomer"][0] for r in runs)
    alone = statistics.fmean(r["newcomer"][1] for r in runs)
    print(f"newcomers' first 5 requests: {with_c:.3f} with their community's taste, "
          f"{alone:.3f} without ({with_c / alone:.2f}x)")
    return {"at20": at20 / oracle, "vs_off": tail / off}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--communities", type=int, default=3)
    parser.add_argument("--people", type=int, default=6, help="per community")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="independent populations")
    parser.add_argument("--takes", type=int, nargs="+",
                        default=sorted({1, Settings(_env_file=None).image_takes}),  # type: ignore[call-arg]
                        help="takes per request to compare (default: 1 and the default setting)")
    parser.add_argument("--verbose", action="store_true", help="print every round")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for takes in args.takes:
            runs = [run_once(args.seed + 100 * i, args.rounds, args.communities, args.people,
                             takes, Path(tmp)) for i in range(args.repeats)]
            results[takes] = report(runs, takes, args)
    if len(results) > 1:
        print("\nside by side (same people, same seeds):")
        for takes, r in results.items():
            print(f"  {takes} take{'s' if takes > 1 else ' '}: {r['at20']:.0%} of oracle at reactions "
                  f"16-20, {r['vs_off']:.2f}x learning off")


if __name__ == "__main__":
    main()
