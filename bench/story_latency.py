"""Request to complete story: how long a 4-scene ``/story`` takes on the embedded default.

Runs, side by side in one process, the same story request (same prompt and seed) through the
real path: the local chat's orchestrator, the embedded SQLite broker and store, and real
``python -m workers`` processes:

* ``1 worker``: the scenes' pictures render one after another;
* ``2 workers``: two worker processes take the scene jobs from the queue in parallel.

For each it reports the wall time from the request to the delivered story, and the share
spent inside the models (the text model writing the plan, and each picture's pipeline call,
both recorded by the worker), the rest being queueing, polling and delivery.

"One batch" (all scenes in one pipeline call) is measured apart, on the picture pipeline
itself: 4 pictures in one ``generate(n=4)`` call against 4 calls of one picture, same size and
steps. The story path does not batch yet (issue "GPU throughput": micro-batching).

    .venv/bin/python bench/story_latency.py --model-cache /tmp/mscache --repeats 2

On the 2-core CPU machine the pictures come from the tiny demo pipeline (set
MUSESPARK_IMAGE_MODEL and MUSESPARK_DEVICE for a real one on a GPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPT = "a lighthouse keeper who befriends a whale"
SCENES = 4


def _env(data_dir: Path, model_cache: Path, scene_chars: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSESPARK_")}
    env.update({
        "MUSESPARK_DATA_DIR": str(data_dir), "MUSESPARK_MODEL_CACHE_DIR": str(model_cache),
        "MUSESPARK_STORY_SCENE_MAX_CHARS": str(scene_chars),
        "MUSESPARK_STORY_POLL_SECONDS": "0.5", "MUSESPARK_REDRIVE_INTERVAL_SECONDS": "0.5",
        "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
    })
    for name in ("MUSESPARK_IMAGE_MODEL", "MUSESPARK_TEXT_MODEL", "MUSESPARK_DEVICE",
                 "MUSESPARK_IMAGE_STEPS", "MUSESPARK_IMAGE_SIZE"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def _start_workers(count: int, env: dict[str, str], root: Path) -> list[subprocess.Popen[bytes]]:
    workers = []
    for n in range(count):
        log = open(root / f"worker-{n}.log", "wb")  # noqa: SIM115 (lives with the child)
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "workers", "--concurrency", "1", "--name", f"bench-{n}@%h"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root))
    deadline = time.monotonic() + 120
    for n in range(count):
        while " ready." not in (root / f"worker-{n}.log").read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {n} not ready")
            time.sleep(0.2)
    return workers


def _stop(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        worker.terminate()
    for worker in workers:
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()


def run_story(workers: int, model_cache: Path, scene_chars: int, seed: int,
              warm: bool) -> dict[str, Any]:
    """One story end to end; returns wall time and model seconds."""
    from bots.console import ConsoleChat
    from bots.runtime import BotRuntime
    from core.settings import Settings

    root = Path(tempfile.mkdtemp(prefix=f"story-{workers}w-"))
    env = _env(root / "data", model_cache, scene_chars)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        settings = Settings(_env_file=None)  # type: ignore[call-arg]
    finally:
        os.environ.clear()
        os.environ.update(saved)
    procs = _start_workers(workers, env, root)
    try:
        with BotRuntime(settings) as runtime:
            chat = ConsoleChat(runtime.orchestrator, runtime.store, chat_id="bench")
            if warm:  # load both models in every worker first: the story measures steady state
                for n in range(workers):
                    chat.say(f"/imagine warm up {n} --style anime")
                    chat.say(f"/write warm up {n}")
                while chat.pending_jobs():
                    time.sleep(0.2)
            chat.poll()
            started = time.perf_counter()
            replies = chat.say(f"/story {PROMPT} --scenes {SCENES} --seed {seed}")
            story_id = next(r.job_id for r in replies if r.job_id)
            while True:
                job = runtime.store.get_job(story_id)
                assert job is not None
                if job.state in ("delivered", "failed"):
                    break
                time.sleep(0.05)
            wall = time.perf_counter() - started
            assert job.state == "delivered", job.failure_reason
            plan = job.params["plan"]
            scene_seconds = [float(a.recipe.get("seconds") or 0)
                             for child in runtime.store.children(story_id, "scene")
                             for a in runtime.store.artifacts(child.id, "image")]
            model = float(plan.get("seconds") or 0) + sum(scene_seconds)
            return {"workers": workers, "wall": wall, "text": float(plan.get("seconds") or 0),
                    "pictures": sum(scene_seconds), "model_share": model / wall,
                    "scenes": len(scene_seconds)}
    finally:
        _stop(procs)


def batch_versus_single(model_cache: Path, repeats: int) -> tuple[float, float]:
    """Median seconds: 4 pictures in one pipeline call, and 4 calls of one picture."""
    from workers.pipelines.image_diffusion import get_image_generator

    generator = get_image_generator(os.environ.get("MUSESPARK_IMAGE_MODEL"), model_cache,
                                    os.environ.get("MUSESPARK_DEVICE", "auto"))
    generator.generate("warm up", n=1, seed=1)
    batched, single = [], []
    for repeat in range(repeats * 3):
        start = time.perf_counter()
        generator.generate(PROMPT, n=SCENES, seed=repeat)
        batched.append(time.perf_counter() - start)
        start = time.perf_counter()
        for scene in range(SCENES):
            generator.generate(PROMPT, n=1, seed=repeat + scene)
        single.append(time.perf_counter() - start)
    return statistics.median(batched), statistics.median(single)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-cache", type=Path,
                        default=Path(os.environ.get("MUSESPARK_MODEL_CACHE_DIR",
                                                    "musespark-data/models")))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scene-chars", type=int, default=120,
                        help="MUSESPARK_STORY_SCENE_MAX_CHARS for the run (default: 120)")
    args = parser.parse_args()
    results: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for repeat in range(args.repeats):
        for workers in (1, 2):  # interleaved, so drift on a shared machine hits both alike
            results[workers].append(run_story(workers, args.model_cache, args.scene_chars,
                                              seed=100 + repeat, warm=True))
    batch, single = batch_versus_single(args.model_cache, args.repeats)
    print(f"\n{SCENES}-scene story, embedded default, scene text <= {args.scene_chars} chars, "
          f"{args.repeats} run(s) each (median)")
    print(f"{'':12} {'request→story':>14} {'text model':>11} {'pictures':>9} {'in models':>10}")
    medians = {}
    for workers, runs in results.items():
        wall = statistics.median(r["wall"] for r in runs)
        medians[workers] = wall
        print(f"{workers} worker(s) {wall:>13.1f}s {statistics.median(r['text'] for r in runs):>10.1f}s "
              f"{statistics.median(r['pictures'] for r in runs):>8.1f}s "
              f"{statistics.median(r['model_share'] for r in runs):>9.0%}")
    print(f"2 workers vs 1: {medians[1] / medians[2]:.2f}x faster")
    print(f"pictures alone: {SCENES} in one pipeline call {batch:.2f}s vs {SCENES} calls "
          f"{single:.2f}s: {single / batch:.2f}x")


if __name__ == "__main__":
    main()
