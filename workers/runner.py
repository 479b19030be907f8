"""Running one job in a worker: claim, heartbeat, generate, store artifacts, deliver.

Guarantees (see DESIGN.md, "From intent to thread", step 4):

* A redelivered task never posts twice: the claim is a guarded UPDATE, and the delivery commits
  in the same transaction as the ``delivered`` state, fenced on the claim's attempt number.
* A worker killed mid-job (SIGKILL, out of memory) leaves a ``running`` job whose heartbeat goes
  stale; the bot's redriver publishes it again and the next worker takes it over.
* A job that has killed ``job_max_attempts`` workers is failed with a reason, not retried forever.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select

from core.errors import DeliveryError, ModelUnavailableError, MuseSparkError
from core.outbound import Button, DeliveryTarget, MessageKind, OutboundMessage
from core.settings import Settings
from core.store import Artifact, Claim, DeliveredMessage, Job, JobState, Store, content_hash, utcnow
from workers.delivery import TransactionalDeliverer, get_deliverer

__all__ = ["execute_job", "worker_name"]

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are MuseSpark, a warm and imaginative creative partner in a group chat. Write exactly "
    "what is asked, vividly and briefly. No preamble."
)
DEMO_IMAGE_NOTICE = (
    "These pictures come from an untrained demo model (random weights), so they show noise. "
    "For real pictures the operator sets MUSESPARK_IMAGE_MODEL to a diffusers model such as "
    "stabilityai/sd-turbo."
)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(slots=True)
class _Outcome:
    model: str
    messages: list[OutboundMessage]
    artifacts: list[Artifact] = field(default_factory=list)


class _Heartbeat:
    """Refreshes the job's heartbeat from a thread while the (blocking) generation runs."""

    def __init__(self, store: Store, claim: Claim, interval: float) -> None:
        self._store, self._claim, self._interval = store, claim, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                if not self._store.heartbeat(self._claim):
                    log.warning("job %s was taken over; finishing without delivering",
                                self._claim.job_id)
                    return
            except Exception:  # a database blip must not kill the job; the next beat retries
                log.exception("heartbeat for job %s failed", self._claim.job_id)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


#: Sampling for /write. Seen on SmolLM2-135M: a repetition penalty of 1.15 pushes the model
#: off topic (and into other languages) within a few lines; 1.05 keeps poems on the subject
#: while sampling still avoids the loops greedy decoding falls into.
TEXT_TEMPERATURE = 0.7
TEXT_REPETITION_PENALTY = 1.05

#: Pixel sizes are rounded to this: diffusion VAEs work in blocks of 8 pixels (latent factor).
PIXEL_MULTIPLE = 8


def _dimensions(side: int, ratio: list[int] | tuple[int, int]) -> tuple[int, int]:
    """Width and height with the same pixel count as ``side``x``side`` in ``ratio``."""
    rw, rh = ratio
    scale = (side * side / (rw * rh)) ** 0.5
    width = max(PIXEL_MULTIPLE, round(rw * scale / PIXEL_MULTIPLE) * PIXEL_MULTIPLE)
    height = max(PIXEL_MULTIPLE, round(rh * scale / PIXEL_MULTIPLE) * PIXEL_MULTIPLE)
    return width, height


def _taste_recipe(job: Job) -> dict[str, Any]:
    """What the learner chose for this job, for the artifact's recipe."""
    record = job.params.get("taste") or {}
    choice = record.get("choice") or {}
    return {"style": choice.get("style") or choice.get("tone"), "choice": choice,
            "why": record.get("why"), "profile_version": record.get("profile_version")}


def _result_buttons(job: Job) -> tuple[Button, ...]:
    buttons = [Button("reroll", "🔁 Reroll", job.id), Button("more", "✨ More like this", job.id)]
    if job.kind == "image":
        buttons += [Button("vary1", "V1", job.id), Button("vary2", "V2", job.id),
                    Button("upscale", "⬆️ Bigger", job.id)]
    return (*buttons, Button("why", "❓ Why this?", job.id))


#: A reply to a result continues the conversation: this many earlier request/result pairs
#: (each cut to THREAD_TURN_MAX_CHARS) go to the text model before the new request.
THREAD_TURNS_MAX = 4
THREAD_TURN_MAX_CHARS = 1500


def _thread_history(store: Store, job: Job) -> tuple[list[str], list[dict[str, str]]]:
    """The earlier turns of the conversation ``job`` continues, oldest first, and their jobs.

    Only jobs made by replying to a result (``params["thread"]``) continue one; a reroll or a
    variation has a parent too, but starts afresh.
    """
    from sqlalchemy import select

    ids: list[str] = []
    turns: list[dict[str, str]] = []
    current = job
    while current.params.get("thread") and current.parent_job_id and len(ids) < THREAD_TURNS_MAX:
        parent = store.get_job(current.parent_job_id)
        if parent is None:
            break
        with store.session() as s:
            texts = s.scalars(select(Artifact.text).where(
                Artifact.job_id == parent.id, Artifact.kind == "text",
            ).order_by(Artifact.position)).all()
        answer = "\n".join(t for t in texts if t)
        if not answer and parent.kind == "image":
            answer = f"(I drew a picture of: {parent.prompt})"
        if answer:
            ids.insert(0, parent.id)
            turns[:0] = [{"role": "user", "content": parent.prompt[:THREAD_TURN_MAX_CHARS]},
                         {"role": "assistant", "content": answer[:THREAD_TURN_MAX_CHARS]}]
        current = parent
    return ids, turns


def _generate_text(job: Job, settings: Settings, *, thread: list[str] | None = None,
                   history: list[dict[str, str]] | None = None) -> _Outcome:
    from workers.pipelines.text_causal_lm import get_text_generator

    generator = get_text_generator(settings.text_model, settings.models_dir, settings.device)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, *(history or []),
                {"role": "user", "content": job.expanded_prompt}]
    result = generator.generate(messages, max_new_tokens=int(job.params["max_new_tokens"]),
                                seed=job.seed, temperature=TEXT_TEMPERATURE,
                                repetition_penalty=TEXT_REPETITION_PENALTY)
    recipe = {"job_id": job.id, "prompt": job.prompt, "expanded_prompt": job.expanded_prompt,
              "seed": job.seed, "model": result.model_name, **_taste_recipe(job),
              "params": {k: v for k, v in job.params.items() if k != "taste"},
              **({"thread": thread} if thread else {})}
    artifact = Artifact(job_id=job.id, kind="text", position=0, text=result.text,
                        content_hash=content_hash(result.text.encode()), recipe=recipe,
                        created_at=utcnow())
    text = f"{result.text}\n\n— {result.model_name}"
    message = OutboundMessage(MessageKind.RESULT, text, job_id=job.id,
                              buttons=_result_buttons(job))
    return _Outcome(result.model_name, [message], [artifact])


def _generate_image(job: Job, settings: Settings, *, source: Path | None = None) -> _Outcome:
    from workers.pipelines.image_diffusion import get_image_generator, save_png

    generator = get_image_generator(settings.image_model, settings.models_dir, settings.device)
    side = (job.params.get("size") or generator.default_size) * float(job.params.get("scale", 1))
    width, height = _dimensions(round(side), job.params.get("aspect_ratio") or (1, 1))
    guidance = generator.default_guidance * float(job.params.get("guidance_factor", 1.0))
    steps = max(1, round((job.params.get("steps") or generator.default_steps)
                         * float(job.params.get("steps_factor", 1.0))))
    if source is not None:
        with PIL.Image.open(source) as picture:
            result = generator.vary(job.expanded_prompt, picture, seed=job.seed, steps=steps,
                                    strength=float(job.params.get("variation_strength", 0.6)),
                                    guidance=guidance)
    else:
        result = generator.generate(job.expanded_prompt, n=int(job.params.get("count", 1)),
                                    seed=job.seed, steps=steps,
                                    guidance=guidance, width=width, height=height)
    folder = settings.artifacts_dir / job.id
    folder.mkdir(parents=True, exist_ok=True)
    artifacts, paths = [], []
    for position, image in enumerate(result.images):
        recipe: dict[str, Any] = {
            "job_id": job.id, "prompt": job.prompt, "expanded_prompt": job.expanded_prompt,
            "seed": result.seed, "position": position, "model": result.model_name,
            "demo_model": result.is_demo, **_taste_recipe(job),
            "params": {"steps": result.steps, "guidance": result.guidance,
                       "width": result.width, "height": result.height,
                       "count": len(result.images)},
        }
        if source is not None:
            recipe["variation_of"] = {**job.params["vary_from"], "path": str(source),
                                      "strength": job.params.get("variation_strength")}
        path = save_png(image, folder / f"{position + 1}.png", recipe)
        paths.append(str(path))
        artifacts.append(Artifact(job_id=job.id, kind="image", position=position, path=str(path),
                                  content_hash=content_hash(Path(path).read_bytes()),
                                  recipe=recipe, created_at=utcnow()))
    caption = f"“{job.prompt}” · seed {result.seed} · {result.model_name}"
    takes = job.params.get("takes")
    if takes:
        style = (job.params.get("taste") or {}).get("choice", {}).get("style", "")
        caption = f"Take {takes['index'] + 1} of {takes['of']} · {style} · {caption}"
    if result.is_demo:
        caption += f"\n{DEMO_IMAGE_NOTICE}"
    message = OutboundMessage(MessageKind.RESULT, caption, images=tuple(paths), job_id=job.id,
                              buttons=_result_buttons(job))
    return _Outcome(result.model_name, [message], artifacts)


def _variation_source(store: Store, job: Job) -> Path | None:
    """The picture a variation redraws: the parent's image at that position (or its last)."""
    wanted = job.params.get("vary_from")
    if not wanted:
        return None
    with store.session() as s:
        images = [a.path for a in s.scalars(select(Artifact).where(
            Artifact.job_id == wanted["job_id"]).order_by(Artifact.position)) if a.path]
    if not images:
        return None  # the parent's files are gone: a fresh draw of the same prompt and style
    path = Path(images[min(int(wanted.get("position", 0)), len(images) - 1)])
    return path if path.is_file() else None


def _show_progress(job: Job, settings: Settings, text: str) -> None:
    """Best effort: edit the job's progress message, for platforms that have one.

    The takes of one request share one progress message: the first take reports on it.
    """
    if (job.params.get("takes") or {}).get("index"):
        return
    deliverer = get_deliverer(job.platform, settings)
    progress = getattr(deliverer, "progress", None)
    if progress is None:
        return
    try:
        progress(DeliveryTarget.from_dict(job.delivery), text)
    except Exception as exc:  # progress is cosmetic; the result must still go out
        log.info("job %s: progress update failed: %s", job.id, exc)


def _publish_later(job: Job, settings: Settings, countdown: float) -> None:
    from core.queue import CeleryPublisher

    publisher = CeleryPublisher(settings)
    try:
        publisher.publish(job.id, job.kind, job.params, countdown=countdown)
    finally:
        publisher.close()


def _record_transactionally(store: Store, claim: Claim, job: Job, state: JobState,
                            messages: list[OutboundMessage], deliverer: TransactionalDeliverer,
                            reason: str | None) -> bool:
    target = DeliveryTarget.from_dict(job.delivery)
    with store.finishing(claim, state, reason=reason) as session:
        if session is None:
            log.info("job %s no longer ours (attempt %d); not delivering", job.id, claim.attempt)
            return False
        ids = deliverer.deliver(session, target, messages)
        for position, message_id in enumerate(ids):
            session.add(DeliveredMessage(job_id=job.id, platform=target.platform,
                                         chat_id=target.chat_id, message_id=message_id,
                                         position=position, created_at=utcnow()))
    return True


def _fail(store: Store, claim: Claim, job: Job, reason: str, settings: Settings, *,
          tell_person: bool = True) -> str:
    """Fail the job with ``reason`` (stored, and shown to the person when we still can)."""
    message = OutboundMessage(MessageKind.ERROR, reason, job_id=job.id)
    deliverer = get_deliverer(job.platform, settings)
    if isinstance(deliverer, TransactionalDeliverer):
        _record_transactionally(store, claim, job, JobState.FAILED, [message], deliverer, reason)
        return "failed"
    with store.finishing(claim, JobState.FAILED, reason=reason) as session:
        if session is None:
            return "lost"
    if tell_person:
        try:
            deliverer.send(DeliveryTarget.from_dict(job.delivery), message)
        except DeliveryError as exc:
            log.warning("job %s: could not tell the person it failed: %s", job.id, exc)
    return "failed"


def _deliver(store: Store, claim: Claim, job: Job, messages: list[OutboundMessage],
             settings: Settings) -> str:
    deliverer = get_deliverer(job.platform, settings)
    if isinstance(deliverer, TransactionalDeliverer):
        ok = _record_transactionally(store, claim, job, JobState.DELIVERED, messages, deliverer,
                                     None)
        return "delivered" if ok else "lost"
    # Read afresh: the adapter may have added the progress message's id after the claim.
    fresh = store.get_job(job.id)
    target = DeliveryTarget.from_dict((fresh or job).delivery)
    done = store.delivered_positions(job.id)
    for position, message in enumerate(messages):
        if position in done:
            continue
        try:
            ids = deliverer.send(target, message)
        except DeliveryError as exc:
            if exc.final or exc.retry_after is None:
                log.error("job %s: delivery refused for good: %s", job.id, exc)
                return _fail(store, claim, job, f"I could not post the result: {exc}", settings,
                             tell_person=False)
            due = store.defer(claim, exc.retry_after)
            if due is None:
                return "lost"
            log.warning("job %s: platform asked to wait %.1f s; resuming then", job.id,
                        exc.retry_after)
            _publish_later(job, settings, exc.retry_after)
            return "deferred"
        store.record_delivered(job.id, target.platform, target.chat_id, position, ids)
    with store.finishing(claim, JobState.DELIVERED) as session:
        return "delivered" if session is not None else "lost"


def execute_job(job_id: str, *, store: Store, settings: Settings) -> str:
    """Run one job if it is ours to run. Returns what happened, for logs and tests.

    A job generates once: its result (artifacts and the messages to post) is kept with the job,
    so a delivery interrupted by a rate limit or a crash resumes without generating again.
    """
    claim = store.claim(job_id, worker=worker_name(),
                        stale_after=settings.job_stale_after_seconds,
                        max_attempts=settings.job_max_attempts)
    if claim is None:
        log.info("job %s is done, waiting, or held by a live worker; skipping", job_id)
        return "skipped"
    job = store.get_job(job_id)
    assert job is not None
    if claim.exhausted:
        log.error("job %s exhausted %d attempts", job_id, claim.attempt - 1)
        return _fail(store, claim, job, (
            f"This request stopped its worker {claim.attempt - 1} times (it may need more "
            "memory than the machine has), so I gave up on it."), settings)
    if job.outbox is not None:
        messages = [OutboundMessage.from_dict(m) for m in job.outbox]
        log.info("job %s attempt %d: resuming delivery", job_id, claim.attempt)
        return _deliver(store, claim, job, messages, settings)
    started = time.monotonic()
    log.info("job %s attempt %d: %s %r", job_id, claim.attempt, job.kind, job.prompt[:60])
    _show_progress(job, settings, "🎨 Drawing…" if job.kind == "image" else "✍️ Writing…")
    try:
        with _Heartbeat(store, claim, settings.job_heartbeat_seconds):
            if job.kind == "text":
                thread, history = _thread_history(store, job)
                outcome = _generate_text(job, settings, thread=thread, history=history)
            else:
                outcome = _generate_image(job, settings, source=_variation_source(store, job))
    except ModelUnavailableError as exc:
        log.error("job %s: model unavailable: %s", job_id, exc)
        return _fail(store, claim, job, exc.user_message, settings)
    except SoftTimeLimitExceeded:
        log.error("job %s hit its time limit after %.0f s", job_id, time.monotonic() - started)
        return _fail(store, claim, job, (
            "That took longer than this request is allowed to take, so I stopped it. "
            "Try a shorter request or fewer images."), settings)
    except MuseSparkError as exc:
        log.exception("job %s failed", job_id)
        return _fail(store, claim, job, exc.user_message, settings)
    except Exception as exc:
        log.exception("job %s crashed", job_id)
        return _fail(store, claim, job, (
            f"Something broke while making this ({type(exc).__name__}). The operator can "
            f"find job {job_id} in the worker log."), settings)
    log.info("job %s generated in %.1f s by %s", job_id, time.monotonic() - started,
             outcome.model)
    if not store.save_outcome(claim, model=outcome.model,
                              outbox=[m.to_dict() for m in outcome.messages],
                              artifacts=outcome.artifacts):
        log.info("job %s no longer ours (attempt %d); dropping its result", job_id,
                 claim.attempt)
        return "lost"
    return _deliver(store, claim, job, outcome.messages, settings)
