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

from celery.exceptions import SoftTimeLimitExceeded

from core.errors import ModelUnavailableError, MuseSparkError
from core.outbound import Button, DeliveryTarget, MessageKind, OutboundMessage
from core.settings import Settings
from core.store import Artifact, Claim, DeliveredMessage, Job, JobState, Store, content_hash, utcnow
from workers.delivery import get_deliverer

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


def _generate_text(job: Job, settings: Settings) -> _Outcome:
    from workers.pipelines.text_causal_lm import get_text_generator

    generator = get_text_generator(settings.text_model, settings.models_dir, settings.device)
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": job.expanded_prompt}]
    result = generator.generate(messages, max_new_tokens=int(job.params["max_new_tokens"]),
                                seed=job.seed)
    recipe = {"job_id": job.id, "prompt": job.prompt, "expanded_prompt": job.expanded_prompt,
              "seed": job.seed, "model": result.model_name, "params": job.params}
    artifact = Artifact(job_id=job.id, kind="text", position=0, text=result.text,
                        content_hash=content_hash(result.text.encode()), recipe=recipe,
                        created_at=utcnow())
    text = f"{result.text}\n\n— {result.model_name}"
    message = OutboundMessage(MessageKind.RESULT, text, job_id=job.id,
                              buttons=(Button("reroll", "🔁 Again", job.id),))
    return _Outcome(result.model_name, [message], [artifact])


def _generate_image(job: Job, settings: Settings) -> _Outcome:
    from workers.pipelines.image_diffusion import get_image_generator, save_png

    generator = get_image_generator(settings.image_model, settings.models_dir, settings.device)
    size = job.params.get("size")
    result = generator.generate(job.expanded_prompt, n=int(job.params.get("count", 1)),
                                seed=job.seed, steps=job.params.get("steps"),
                                width=size, height=size)
    folder = settings.artifacts_dir / job.id
    folder.mkdir(parents=True, exist_ok=True)
    artifacts, paths = [], []
    for position, image in enumerate(result.images):
        recipe: dict[str, Any] = {
            "job_id": job.id, "prompt": job.prompt, "expanded_prompt": job.expanded_prompt,
            "seed": result.seed, "position": position, "model": result.model_name,
            "demo_model": result.is_demo,
            "params": {"steps": result.steps, "guidance": result.guidance,
                       "width": result.width, "height": result.height,
                       "count": len(result.images)},
        }
        path = save_png(image, folder / f"{position + 1}.png", recipe)
        paths.append(str(path))
        artifacts.append(Artifact(job_id=job.id, kind="image", position=position, path=str(path),
                                  content_hash=content_hash(Path(path).read_bytes()),
                                  recipe=recipe, created_at=utcnow()))
    caption = f"“{job.prompt}” · seed {result.seed} · {result.model_name}"
    if result.is_demo:
        caption += f"\n{DEMO_IMAGE_NOTICE}"
    message = OutboundMessage(MessageKind.RESULT, caption, images=tuple(paths), job_id=job.id,
                              buttons=(Button("reroll", "🔁 Reroll", job.id),))
    return _Outcome(result.model_name, [message], artifacts)


GENERATORS = {"text": _generate_text, "image": _generate_image}


def _finish(store: Store, claim: Claim, job: Job, state: JobState, outcome: _Outcome | None,
            reason: str | None = None) -> bool:
    """Record the outcome and post it, atomically with the state change (local platform)."""
    target = DeliveryTarget.from_dict(job.delivery)
    if outcome is None:
        messages = [OutboundMessage(MessageKind.ERROR, reason or "That request failed.",
                                    job_id=job.id)]
    else:
        messages = outcome.messages
    with store.finishing(claim, state, reason=reason,
                         model=outcome.model if outcome else None) as session:
        if session is None:
            log.info("job %s no longer ours (attempt %d); not delivering", job.id, claim.attempt)
            return False
        if outcome is not None:
            session.add_all(outcome.artifacts)
        ids = get_deliverer(target.platform).deliver(session, target, messages)
        for position, message_id in enumerate(ids):
            session.add(DeliveredMessage(job_id=job.id, platform=target.platform,
                                         chat_id=target.chat_id, message_id=message_id,
                                         position=position, created_at=utcnow()))
    log.info("job %s %s (%d messages)", job.id, state.value, len(messages))
    return True


def execute_job(job_id: str, *, store: Store, settings: Settings) -> str:
    """Run one job if it is ours to run. Returns what happened, for logs and tests."""
    claim = store.claim(job_id, worker=worker_name(),
                        stale_after=settings.job_stale_after_seconds,
                        max_attempts=settings.job_max_attempts)
    if claim is None:
        log.info("job %s is done or held by a live worker; skipping", job_id)
        return "skipped"
    job = store.get_job(job_id)
    assert job is not None
    if claim.exhausted:
        reason = (f"This request stopped its worker {claim.attempt - 1} times (it may need more "
                  "memory than the machine has), so I gave up on it.")
        log.error("job %s exhausted %d attempts", job_id, claim.attempt - 1)
        _finish(store, claim, job, JobState.FAILED, None, reason)
        return "failed"
    started = time.monotonic()
    log.info("job %s attempt %d: %s %r", job_id, claim.attempt, job.kind, job.prompt[:60])
    try:
        with _Heartbeat(store, claim, settings.job_heartbeat_seconds):
            outcome = GENERATORS[job.kind](job, settings)
    except ModelUnavailableError as exc:
        log.error("job %s: model unavailable: %s", job_id, exc)
        _finish(store, claim, job, JobState.FAILED, None, exc.user_message)
        return "failed"
    except SoftTimeLimitExceeded:
        log.error("job %s hit its time limit after %.0f s", job_id, time.monotonic() - started)
        _finish(store, claim, job, JobState.FAILED, None,
                "That took longer than this request is allowed to take, so I stopped it. "
                "Try a shorter request or fewer images.")
        return "failed"
    except MuseSparkError as exc:
        log.exception("job %s failed", job_id)
        _finish(store, claim, job, JobState.FAILED, None, exc.user_message)
        return "failed"
    except Exception as exc:
        log.exception("job %s crashed", job_id)
        _finish(store, claim, job, JobState.FAILED, None,
                f"Something broke while making this ({type(exc).__name__}). The operator can "
                f"find job {job_id} in the worker log.")
        return "failed"
    log.info("job %s generated in %.1f s", job_id, time.monotonic() - started)
    return "delivered" if _finish(store, claim, job, JobState.DELIVERED, outcome) else "lost"

