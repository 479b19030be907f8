"""Micro-batching of pictures (workers/batching.py) and model residency (workers/residency.py).

Real worker processes on both backends; the tiny demo pipeline (a real diffusers
StableDiffusionPipeline at toy size) stands in for a GPU model.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from core.events import Actor
from core.outbound import DeliveryTarget
from core.queue import CeleryPublisher
from core.store import Artifact
from tests._stack import Stack
from workers.pipelines.image_diffusion import get_image_generator, read_png_recipe

RESULT_TIMEOUT_SECONDS = 480
#: uint8 levels two renders of one seed may differ by between batch sizes (float rounding).
PIXEL_TOLERANCE = 2


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_pictures_rendered_in_one_call_equal_each_seed_rendered_alone(model_cache: Path) -> None:
    generator = get_image_generator(None, model_cache, "cpu")
    asks = [("a cat on a windowsill", 1, 11), ("a lighthouse in a storm", 2, 500),
            ("a red car in the desert", 1, 7)]
    together = generator.generate_many(asks, steps=3)
    assert [len(r.images) for r in together] == [1, 2, 1]
    assert [r.seeds for r in together] == [[11], [500, 501], [7]]
    for (prompt, n, seed), batched in zip(asks, together):
        alone = generator.generate(prompt, n=n, seed=seed, steps=3)
        for a, b in zip(batched.images, alone.images):
            assert np.abs(_pixels(a) - _pixels(b)).max() <= PIXEL_TOLERANCE
    # And the seeds matter: another seed gives another picture.
    other = generator.generate(asks[0][0], n=1, seed=12, steps=3)
    assert np.abs(_pixels(other.images[0]) - _pixels(together[0].images[0])).max() > 10


def test_bad_batch_requests_are_refused(model_cache: Path) -> None:
    generator = get_image_generator(None, model_cache, "cpu")
    with pytest.raises(ValueError, match="must not be empty"):
        generator.generate_many([])
    with pytest.raises(ValueError, match="at least 1"):
        generator.generate_many([("a cat", 0, 1)])


def _picture_jobs(stack: Stack, prompts: list[str], *, steps: int) -> list[str]:
    """Compatible picture jobs (same size, steps, guidance), made and published as the
    orchestrator does; each request's own taste would give each its own shape and steps."""
    store = stack.runtime.store
    user_id = store.ensure_user("local", Actor("4242", "Ada"))
    chat = f"chat-{uuid.uuid4().hex[:8]}"
    publisher = CeleryPublisher(stack.settings)
    made = []
    try:
        for number, prompt in enumerate(prompts):
            params = {"count": 1, "steps": steps, "size": 64, "aspect_ratio": [1, 1]}
            job, _ = store.create_job(
                idempotency_key=f"batch-test:{uuid.uuid4().hex}", kind="image",
                intent="imagine", user_id=user_id, prompt=prompt, expanded_prompt=prompt,
                params=params, seed=1000 + number, platform="local",
                delivery=DeliveryTarget(platform="local", chat_id=chat).to_dict())
            publisher.publish(job.id, "image", params)
            store.mark_published(job.id)
            made.append(job.id)
    finally:
        publisher.close()
    return made


def _until(check: Any, *, what: str, timeout: float = RESULT_TIMEOUT_SECONDS,
           poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


# Redis + PostgreSQL: pulled messages stay hidden in Redis for an hour, so the jobs must come
# back through their claims' heartbeats (the embedded transport's lease is covered by
# tests/test_sqlite_broker.py).
@pytest.mark.parametrize("make_stack", ["distributed"], indirect=True)
def test_a_worker_killed_mid_batch_loses_no_picture_and_posts_none_twice(
        make_stack: Any, model_cache: Path) -> None:
    # Many steps, so the batch is still rendering when the worker is killed.
    stack = make_stack(MUSESPARK_IMAGE_BATCH_MAX="4", MUSESPARK_IMAGE_BATCH_WAIT_MS="300")
    # Enough steps that the batch is still rendering when the worker is killed (a fraction
    # of a second on an idle machine), few enough that it fits the first job's time limit.
    jobs = _picture_jobs(stack, ["a fox in the snow", "a boat at dawn", "an owl at night"],
                         steps=16)
    # Another number of steps: pulled with the batch to run on its own right after it.
    (after,) = _picture_jobs(stack, ["a kite over the hills"], steps=8)
    first = stack.start_worker()  # the three are queued: it takes them as one batch
    pulled = "took 3 more picture message(s) from the queue (2 job(s) to render with it)"
    _until(lambda: all(stack.job(j).state == "running" for j in jobs) and pulled in first.log(),
           what="the batch's three jobs taken and the one after it pulled", poll=0.01)
    assert stack.job(after).state == "queued", "claimed only when its turn comes"
    first.kill_hard()
    second = stack.start_worker()
    # The messages the killed worker pulled stay hidden in the broker for its visibility
    # timeout (an hour on Redis): the batch's jobs come back through their stale heartbeats,
    # the one waiting its turn through its stranded message (core/redrive.py).
    for job_id in jobs:
        done = stack.wait_job(job_id, ("delivered", "failed"), timeout=RESULT_TIMEOUT_SECONDS)
        assert done.state == "delivered", done.failure_reason
        assert done.attempts == 2, "the killed batch ran again, once"
    done = stack.wait_job(after, ("delivered", "failed"), timeout=RESULT_TIMEOUT_SECONDS)
    assert done.state == "delivered", done.failure_reason
    assert done.attempts == 1, "a crash it took no part in used none of its attempts"
    # Each job the crash took down runs alone from then on (none shares a call again).
    assert "in one call" not in second.log()
    time.sleep(1.5)  # a second post would land now
    chats = {stack.job(j).delivery["chat_id"] for j in [jobs[0], after]}
    posted = [r for chat_id in chats for r in stack.runtime.store.local_messages_after(chat_id, 0)
              if r.author == "bot" and r.kind == "result"]
    assert sorted(r.job_id or "" for r in posted) == sorted([*jobs, after]), \
        "each picture posted once"
    # Each picture the batch drew is the one its seed gives alone.
    generator = get_image_generator(None, model_cache, "cpu")
    with stack.runtime.store.session() as session:
        pictures = session.query(Artifact).filter(Artifact.job_id.in_([*jobs, after]),
                                                  Artifact.kind == "image").all()
    assert len(pictures) == 4
    for picture in pictures:
        recipe = read_png_recipe(Path(picture.path or ""))
        params = recipe["params"]
        alone = generator.generate(recipe["expanded_prompt"], n=1, seed=recipe["seed"],
                                   steps=params["steps"], guidance=params["guidance"],
                                   width=params["width"], height=params["height"])
        with Image.open(picture.path or "") as drawn:
            assert np.abs(_pixels(drawn) - _pixels(alone.images[0])).max() <= PIXEL_TOLERANCE


def test_a_model_that_does_not_fit_is_refused_clearly_and_loaded_ones_are_listed(
        model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.errors import ModelUnavailableError
    from workers import residency
    from workers.pipelines.image_diffusion import load_image_generator

    load_image_generator(None, models_dir=model_cache, device="cpu")
    (row,) = [r for r in residency.resident() if r["kind"] == "image"]
    assert row["device"] == "cpu" and row["dtype"] == "float32" and row["bytes"] > 100_000
    monkeypatch.setenv("MUSESPARK_MODEL_MEMORY_GB", "0.001")
    with pytest.raises(ModelUnavailableError, match=r"needs about .* GB .* "
                       r"MUSESPARK_MODEL_MEMORY_GB=0.001") as caught:
        load_image_generator(None, models_dir=model_cache, device="cpu")
    assert "does not fit" in caught.value.user_message


def test_the_pool_is_prefork_on_cpu_and_never_forks_on_cuda() -> None:
    from workers.__main__ import choose_pool

    assert choose_pool("auto", "cpu", 1) == "prefork"
    assert choose_pool("auto", "cuda", 1) == "solo"
    assert choose_pool("auto", "cuda:1", 2) == "threads"
    assert choose_pool("prefork", "cuda", 1) == "prefork"  # asked for: the operator's call


def test_text_jobs_queued_together_are_written_in_one_call_and_each_posted_once(
        make_stack: Any) -> None:
    stack = make_stack(MUSESPARK_TEXT_BATCH_MAX="4", MUSESPARK_TEXT_BATCH_WAIT_MS="300")
    store = stack.runtime.store
    user_id = store.ensure_user("local", Actor("4343", "Bo"))
    chat = f"chat-{uuid.uuid4().hex[:8]}"
    publisher = CeleryPublisher(stack.settings)
    jobs = []
    try:  # different budgets: the batch runs to the longest, each reply stops at its own
        for number, (prompt, budget) in enumerate([("a haiku about rain", 24),
                                                   ("a limerick about a cat", 16),
                                                   ("a line about the sea", 8)]):
            params = {"max_new_tokens": budget}
            job, _ = store.create_job(
                idempotency_key=f"text-batch:{uuid.uuid4().hex}", kind="text", intent="write",
                user_id=user_id, prompt=prompt, expanded_prompt=prompt, params=params,
                seed=2000 + number, platform="local",
                delivery=DeliveryTarget(platform="local", chat_id=chat).to_dict())
            publisher.publish(job.id, "text", params)
            store.mark_published(job.id)
            jobs.append(job.id)
    finally:
        publisher.close()
    worker = stack.start_worker()
    for job_id in jobs:
        done = stack.wait_job(job_id, ("delivered", "failed"), timeout=RESULT_TIMEOUT_SECONDS)
        assert done.state == "delivered", done.failure_reason
    assert "wrote 3 text jobs in one call" in worker.log()
    time.sleep(1.0)  # a second post would land now
    posted = [r for r in store.local_messages_after(chat, 0)
              if r.author == "bot" and r.kind == "result"]
    assert sorted(r.job_id or "" for r in posted) == sorted(jobs), "each reply posted once"
    for job_id, budget in zip(jobs, (24, 16, 8)):
        (artifact,) = store.artifacts(job_id, "text")
        assert artifact.text and artifact.recipe["batch"] == jobs
        assert len(artifact.text.split()) <= budget  # a word is at least one token
