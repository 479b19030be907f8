"""Served pictures per second with and without micro-batching, and text tokens per second.

In one run, on the embedded backend with one real worker process each:

* pictures: ``--requesters`` closed-loop requesters (1, 4 and 16 by default), each asking for
  one picture and waiting for it to be delivered before asking again, against a worker that
  batches (``MUSESPARK_IMAGE_BATCH_MAX=--batch``) and one that renders one job at a time
  (``MUSESPARK_IMAGE_BATCH_MAX=1``); and the bare pipeline called in a loop in this process at
  batch sizes 1, 4 and 16 (its best is the ceiling). All requests are compatible (same size,
  steps, guidance), as a story's scenes or a converged community's requests are.
* text: the local model writing ``--chats`` replies one after another versus in one padded
  batch (``CausalLMGenerator.generate_batch``), new tokens per second; and served: ``--chats``
  people sending /write at once (``--text-rounds`` times) to a worker that batches text
  (``MUSESPARK_TEXT_BATCH_MAX=--chats``) and to one that writes one reply at a time, replies
  per second from request to delivery.

It prints absolute figures and the ratios the issue asks for. On a CPU with the tiny demo
model only the ratios mean anything; on a GPU pass a real model:

    .venv/bin/python bench/gpu_throughput.py                       # CPU, tiny models
    .venv/bin/python bench/gpu_throughput.py --device cuda \\
        --image-model stabilityai/sd-turbo --text-model HuggingFaceTB/SmolLM2-1.7B-Instruct
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.events import Actor  # noqa: E402
from core.outbound import DeliveryTarget  # noqa: E402
from core.queue import CeleryPublisher  # noqa: E402
from tests._stack import Stack  # noqa: E402

JOB_TIMEOUT_SECONDS = 600.0


def _served(root: Path, cache: Path, args: argparse.Namespace, batch: int,
            levels: list[int]) -> dict[int, float]:
    """Pictures per second one worker delivers to N closed-loop requesters, for each N."""
    env = {"MUSESPARK_IMAGE_BATCH_MAX": str(batch), "MUSESPARK_IMAGE_BATCH_WAIT_MS": "20",
           "MUSESPARK_DEVICE": args.device}
    if args.image_model:
        env["MUSESPARK_IMAGE_MODEL"] = args.image_model
    stack = Stack.create("embedded", root / f"batch-{batch}", cache, **env)
    try:
        stack.start_worker()
        store = stack.runtime.store
        user_id = store.ensure_user("local", Actor("bench", "Bench"))
        publisher = CeleryPublisher(stack.settings)
        params = {"count": 1, "steps": args.steps, "size": args.size, "aspect_ratio": [1, 1]}

        def one(number: int) -> None:
            job, _ = store.create_job(
                idempotency_key=f"bench:{uuid.uuid4().hex}", kind="image", intent="imagine",
                user_id=user_id, prompt=f"picture {number}", expanded_prompt=f"picture {number}",
                params=params, seed=number, platform="local",
                delivery=DeliveryTarget(platform="local", chat_id="bench").to_dict())
            publisher.publish(job.id, "image", params)
            store.mark_published(job.id)
            done = stack.wait_job(job.id, ("delivered", "failed"), timeout=JOB_TIMEOUT_SECONDS)
            assert done.state == "delivered", done.failure_reason

        one(-1)  # model load and warm-up, not timed
        rates = {}
        for requesters in levels:
            counter = iter(range(args.pictures))
            lock = threading.Lock()

            def requester() -> None:
                while True:
                    with lock:
                        number = next(counter, None)
                    if number is None:
                        return
                    one(number)

            threads = [threading.Thread(target=requester) for _ in range(requesters)]
            start = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            rates[requesters] = args.pictures / (time.perf_counter() - start)
        publisher.close()
        return rates
    finally:
        stack.close()


def _bare(cache: Path, args: argparse.Namespace, sizes: list[int]) -> dict[int, float]:
    """Pictures per second of the pipeline called in a loop at each batch size."""
    from workers.pipelines.image_diffusion import get_image_generator

    generator = get_image_generator(args.image_model, cache, args.device)
    generator.warm_up()
    rates = {}
    for size in sizes:
        calls = max(1, args.pictures // size)
        start = time.perf_counter()
        for call in range(calls):
            generator.generate_many([(f"picture {call}-{i}", 1, i) for i in range(size)],
                                    steps=args.steps, width=args.size, height=args.size)
        rates[size] = calls * size / (time.perf_counter() - start)
    return rates


def _text(cache: Path, args: argparse.Namespace) -> tuple[float, float]:
    """New tokens per second: ``--chats`` replies one after another, then in one batch."""
    from workers.pipelines.text_causal_lm import get_text_generator

    generator = get_text_generator(args.text_model, cache, args.device)
    chats = [[{"role": "user", "content": f"Write a short poem about the number {i}."}]
             for i in range(args.chats)]
    generator.generate(chats[0], max_new_tokens=8, seed=0)  # warm-up
    start, tokens = time.perf_counter(), 0
    for i, chat in enumerate(chats):
        tokens += generator.generate(chat, max_new_tokens=args.tokens, seed=i).new_tokens
    single = tokens / (time.perf_counter() - start)
    start = time.perf_counter()
    results = generator.generate_batch(chats, max_new_tokens=args.tokens, seed=0)
    batched = sum(r.new_tokens for r in results) / (time.perf_counter() - start)
    return single, batched


def _served_text(root: Path, cache: Path, args: argparse.Namespace, batch: int) -> float:
    """Replies per second one worker delivers to ``--chats`` people asking at once (/write
    through the orchestrator, as from a chat), ``--text-rounds`` times over."""
    env = {"MUSESPARK_TEXT_BATCH_MAX": str(batch), "MUSESPARK_TEXT_BATCH_WAIT_MS": "30",
           "MUSESPARK_DEVICE": args.device, "MUSESPARK_TEXT_MAX_NEW_TOKENS": str(args.tokens)}
    if args.text_model:
        env["MUSESPARK_TEXT_MODEL"] = args.text_model
    stack = Stack.create("embedded", root / f"text-batch-{batch}", cache, **env)
    try:
        stack.start_worker()

        def write(chat: Any, number: int) -> None:
            (status,) = [m for m in chat.say(f"/write a short poem about the number {number}")
                         if m.kind == "status" and m.job_id]  # (not the last round's result)
            done = stack.wait_job(str(status.job_id), ("delivered", "failed"),
                                  timeout=JOB_TIMEOUT_SECONDS)
            assert done.state == "delivered", done.failure_reason

        write(stack.chat(), -1)  # model load, not timed
        chats = [stack.chat() for _ in range(args.chats)]
        start = time.perf_counter()
        for round_ in range(args.text_rounds):
            threads = [threading.Thread(target=write, args=(chat, round_ * 100 + n))
                       for n, chat in enumerate(chats)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        return args.chats * args.text_rounds / (time.perf_counter() - start)
    finally:
        stack.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requesters", default="1,4,16")
    parser.add_argument("--pictures", type=int, default=16, help="timed pictures per run")
    parser.add_argument("--batch", type=int, default=16, help="MUSESPARK_IMAGE_BATCH_MAX")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--chats", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--text-rounds", type=int, default=3,
                        help="rounds of --chats people writing at once (served text)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-model", default=None)
    parser.add_argument("--text-model", default=None)
    parser.add_argument("--model-cache", type=Path,
                        default=Path(os.environ.get("MUSESPARK_TEST_MODEL_CACHE",
                                                    tempfile.gettempdir() + "/musespark-bench")))
    args = parser.parse_args()
    levels = [int(n) for n in args.requesters.split(",")]
    root = Path(tempfile.mkdtemp(prefix="gpu-throughput-"))
    print(f"device {args.device}; image model {args.image_model or 'tiny demo'}, "
          f"{args.size}px, {args.steps} steps; text model {args.text_model or 'SmolLM2-135M'}")

    bare = _bare(args.model_cache, args, sorted({1, 4, args.batch}))
    best = max(bare.values())
    print("bare pipeline, pictures/s by batch size: "
          + ", ".join(f"{size}: {rate:.2f}" for size, rate in bare.items()))
    batched_rates = _served(root, args.model_cache, args, args.batch, levels)
    alone_rates = _served(root, args.model_cache, args, 1, levels)
    rows = [(n, batched_rates[n], alone_rates[n]) for n in levels]
    print(f"{'requesters':>10} {'batched/s':>10} {'alone/s':>8} {'batched/alone':>14} "
          f"{'batched/bare best':>18}")
    for requesters, batched, alone in rows:
        print(f"{requesters:>10} {batched:>10.2f} {alone:>8.2f} {batched / alone:>14.2f} "
              f"{batched / best:>18.2f}")

    single, batched_text = _text(args.model_cache, args)
    print(f"text tokens/s: single stream {single:.1f}, batched x{args.chats} {batched_text:.1f}, "
          f"ratio {batched_text / single:.2f}")
    served_batched = _served_text(root, args.model_cache, args, args.chats)
    served_alone = _served_text(root, args.model_cache, args, 1)
    print(f"served text, {args.chats} people writing at once: replies/s batched "
          f"{served_batched:.2f}, one at a time {served_alone:.2f}, ratio "
          f"{served_batched / served_alone:.2f}")


if __name__ == "__main__":
    main()
