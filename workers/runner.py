"""Running one job in a worker: claim, heartbeat, generate, store artifacts, deliver.

Guarantees (see DESIGN.md, "Request flow", step 4, and README "How it holds together"):

* A redelivered task runs once: the claim is a guarded UPDATE fenced on the attempt number, and
  a job generates once (its outbox is kept). On the local platform the delivery commits in the
  same transaction as the ``delivered`` state, so it posts exactly once; remote platforms post
  part by part, each part recorded as soon as it is out, so a crash can repeat at most the one
  part in flight (and not that one on Discord channels, whose creates carry a nonce).
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

from core import actions, cocreation, taste, understanding
from core.errors import (
    ContentBlockedError,
    DeliveryError,
    ModelUnavailableError,
    MuseSparkError,
    QueueUnavailableError,
    UserInputError,
)
from core.outbound import STREAM_CURSOR, Button, DeliveryTarget, MessageKind, OutboundMessage
from core.settings import Settings
from core.store import Artifact, Claim, DeliveredMessage, Job, JobState, Store, content_hash, utcnow
from workers import provenance
from workers import shutdown
from workers.delivery import RemoteDeliverer, TransactionalDeliverer, get_deliverer

__all__ = ["PictureAsk", "claim_job", "execute_job", "last_failure_cause", "picture_ask",
           "picture_outcome", "run_claimed", "worker_name"]

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
    #: What generation decided that later steps read (merged into the job's params).
    params: dict[str, Any] = field(default_factory=dict)


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


def _result_buttons(job: Job, *, ideas: int = 0) -> tuple[Button, ...]:
    return actions.buttons_for(job.id, kind=job.kind, intent=job.intent, ideas=ideas)


#: A reply to a result continues the conversation: this many earlier request/result pairs
#: (each cut to THREAD_TURN_MAX_CHARS) go to the text model before the new request.
THREAD_TURNS_MAX = 4
THREAD_TURN_MAX_CHARS = 1500


def _thread_history(store: Store, job: Job) -> tuple[list[str], list[dict[str, str]]]:
    """The earlier turns of the conversation ``job`` continues, oldest first, and their jobs.

    Only jobs made by replying to a result (``params["thread"]``) continue one; a reroll or a
    variation has a parent too, but starts afresh.
    """
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


def text_generator(settings: Settings) -> Any:
    """The text model: an OpenAI-compatible server when ``MUSESPARK_TEXT_API_URL`` is set,
    else the local causal LM."""
    if settings.text_api_url:
        from workers.pipelines.text_openai import get_api_text_generator

        key = settings.text_api_key.get_secret_value() if settings.text_api_key else None
        return get_api_text_generator(settings.text_api_url, settings.text_api_model, key)
    from workers.pipelines.text_causal_lm import get_text_generator

    return get_text_generator(settings.text_model, settings.models_dir, settings.device)


#: A streamed reply edits the job's status message at most once per this many seconds
#: (Telegram allows about one message a second per chat; Discord rate-limits edits too).
STREAM_EDIT_SECONDS = 1.0


class _StreamEdits:
    """Turns a streaming reply into throttled edits of the job's status message."""

    def __init__(self, job: Job, settings: Settings) -> None:
        self._job, self._settings = job, settings
        self._last = 0.0
        self.edits = 0

    def __call__(self, text: str) -> None:
        now = time.monotonic()
        if now - self._last < STREAM_EDIT_SECONDS or not text.strip():
            return
        self._last = now
        self.edits += 1
        _show_progress(self._job, self._settings, text + STREAM_CURSOR)


def text_request(store: Store, job: Job) -> tuple[list[dict[str, str]], list[str]]:
    """The chat a text job sends its model (the thread's earlier turns first), and the ids of
    the thread's earlier jobs."""
    thread, history = _thread_history(store, job)
    request = job.expanded_prompt
    if job.params.get("refine"):  # a revision: the earlier text is in ``history``
        request = f"Rewrite your last text with this change: {request}"
    return ([{"role": "system", "content": SYSTEM_PROMPT}, *history,
             {"role": "user", "content": request}], thread)


def text_outcome(job: Job, result: Any, thread: list[str], *,
                 batch: list[str] | None = None) -> _Outcome:
    """A text job's result: its artifact (with the recipe) and the message to post.
    ``batch``: the jobs it was written together with (one padded batch, one seed)."""
    refine = job.params.get("refine")
    recipe = {"job_id": job.id, "prompt": job.prompt, "expanded_prompt": job.expanded_prompt,
              "seed": job.seed, "model": result.model_name, **_taste_recipe(job),
              "params": {k: v for k, v in job.params.items() if k != "taste"},
              **({"thread": thread} if thread else {}),
              **({"batch": batch} if batch else {}),
              **({"refined_from": {"job_id": refine["job_id"], "position": refine["position"]},
                  "instruction": refine["instruction"]} if refine else {})}
    artifact = Artifact(job_id=job.id, kind="text", position=0, text=result.text,
                        content_hash=content_hash(result.text.encode()), recipe=recipe,
                        created_at=utcnow())
    text = f"{result.text}\n\n— {result.model_name}"
    message = OutboundMessage(MessageKind.RESULT, text, job_id=job.id,
                              buttons=_result_buttons(job))
    return _Outcome(result.model_name, [message], [artifact])


def _generate_text(store: Store, job: Job, settings: Settings) -> _Outcome:
    generator = text_generator(settings)
    messages, thread = text_request(store, job)
    result = generator.generate(messages, max_new_tokens=int(job.params["max_new_tokens"]),
                                seed=job.seed, temperature=TEXT_TEMPERATURE,
                                repetition_penalty=TEXT_REPETITION_PENALTY,
                                on_text=_StreamEdits(job, settings))
    return text_outcome(job, result, thread)


#: How far a remix moves from the person's picture (image-to-image strength).
REMIX_STRENGTH = 0.7


def _refined_prompt(store: Store, job: Job, settings: Settings) -> tuple[str, float]:
    """A refinement's new picture prompt (the text model applies the instruction to the chain
    of earlier prompts) and the image-to-image strength its size of change calls for."""
    refine = job.params["refine"]
    instructions: list[str] = []
    current = store.get_job(refine["job_id"])
    root = job.prompt
    while current is not None and current.intent == "refine" and len(instructions) < 8:
        instructions.insert(0, str(current.params["refine"]["instruction"]))
        current = store.get_job(current.parent_job_id) if current.parent_job_id else None
    if current is not None:
        root = current.prompt
    messages = cocreation.rewrite_messages([root], instructions, refine["instruction"])
    result = text_generator(settings).generate_json(
        messages, cocreation.Rewrite.model_json_schema(),
        # One token per character at worst (see core/orchestrator.py CHARS_PER_TOKEN).
        max_new_tokens=cocreation.REWRITE_MAX_CHARS + 24, seed=job.seed,
        temperature=TEXT_TEMPERATURE)
    rewrite = cocreation.rewrite_or_fallback(result.text, job.prompt, refine["instruction"])
    return rewrite.prompt, cocreation.REFINE_STRENGTH[rewrite.change]


@dataclass(slots=True)
class PictureAsk:
    """What one image job asks the picture model for, after its params and defaults.

    Jobs whose :meth:`batch_key` is equal can share one pipeline call
    (:func:`workers.batching.run_image_batch`).
    """

    prompt: str
    expanded: str
    width: int
    height: int
    steps: int
    guidance: float
    count: int
    seed: int
    strength: float
    source: Path | None = None
    extra_recipe: dict[str, Any] = field(default_factory=dict)

    def batch_key(self, model: str) -> tuple[object, ...] | None:
        """Jobs with the same key render together; ``None``: this one renders alone
        (image to image needs its own picture)."""
        if self.source is not None:
            return None
        return (model, self.width, self.height, self.steps, self.guidance)


def picture_ask(job: Job, settings: Settings, generator: Any, *, source: Path | None = None,
                store: Store | None = None) -> PictureAsk:
    """The picture ``job`` asks for (a refinement's new prompt comes from the text model)."""
    strength = float(job.params.get("variation_strength", 0.6))
    prompt, expanded = job.prompt, job.expanded_prompt
    extra_recipe: dict[str, Any] = {}
    if job.params.get("refine") and store is not None:
        prompt, strength = _refined_prompt(store, job, settings)
        choice = (job.params.get("taste") or {}).get("choice") or {}
        expanded = taste.expand_prompt("image", prompt, choice) if choice.get("style") else prompt
        refine = job.params["refine"]
        extra_recipe = {"refined_from": {"job_id": refine["job_id"],
                                         "position": refine["position"]},
                        "instruction": refine["instruction"], "strength": strength}
    elif job.params.get("remix"):
        strength = REMIX_STRENGTH
        extra_recipe = {"remix_of": {"path": str(source), "strength": strength}}
    if job.params.get("story"):
        extra_recipe["story"] = job.params["story"]
    side = (job.params.get("size") or generator.default_size) * float(job.params.get("scale", 1))
    width, height = _dimensions(round(side), job.params.get("aspect_ratio") or (1, 1))
    # What the pipeline will really use, so equal keys mean equal calls.
    width, height = generator.round_size(width), generator.round_size(height)
    guidance = generator.default_guidance * float(job.params.get("guidance_factor", 1.0))
    steps = max(1, round((job.params.get("steps") or generator.default_steps)
                         * float(job.params.get("steps_factor", 1.0))))
    return PictureAsk(prompt=prompt, expanded=expanded, width=width, height=height, steps=steps,
                      guidance=float(guidance), count=int(job.params.get("count", 1)),
                      seed=job.seed, strength=strength, source=source, extra_recipe=extra_recipe)


def _image_generator(settings: Settings) -> Any:
    from workers.pipelines.image_diffusion import get_image_generator

    return get_image_generator(settings.image_model, settings.models_dir, settings.device)


def _generate_image(job: Job, settings: Settings, *, source: Path | None = None,
                    store: Store | None = None) -> _Outcome:
    generator = _image_generator(settings)
    ask = picture_ask(job, settings, generator, source=source, store=store)
    if ask.source is not None:
        with PIL.Image.open(ask.source) as picture:
            result = generator.vary(ask.expanded, picture, seed=job.seed, steps=ask.steps,
                                    strength=ask.strength, guidance=ask.guidance)
    else:
        result = generator.generate(ask.expanded, n=ask.count, seed=job.seed, steps=ask.steps,
                                    guidance=ask.guidance, width=ask.width, height=ask.height)
    return picture_outcome(job, ask, result, settings, store)


def picture_outcome(job: Job, ask: PictureAsk, result: Any, settings: Settings,
                    store: Store | None = None) -> _Outcome:
    """Check a job's rendered pictures, save them (with their recipes) and make its result
    message.

    The one place a picture becomes a file, whether it was drawn alone or in a batch: hooks
    that act on every saved picture belong here.

    Raises:
        ContentBlockedError: the community's safety policy refuses a picture.
    """
    from workers.pipelines.image_diffusion import save_png

    _check_pictures(job, result.images, settings, store)
    prompt, expanded, source = ask.prompt, ask.expanded, ask.source
    folder = settings.artifacts_dir / job.id
    folder.mkdir(parents=True, exist_ok=True)
    artifacts, paths = [], []
    creator = store.credit_name(job.user_id) if store is not None else None
    for position, image in enumerate(result.images):
        image, watermark_note = provenance.watermark(image, job.id)
        recipe: dict[str, Any] = {
            "job_id": job.id, "prompt": prompt, "expanded_prompt": expanded,
            "seed": result.seed, "position": position, "model": result.model_name,
            "demo_model": result.is_demo, "seconds": round(result.seconds, 3),
            **_taste_recipe(job),
            "params": {"steps": result.steps, "guidance": result.guidance,
                       "width": result.width, "height": result.height,
                       "count": len(result.images)},
        }
        if job.params.get("vary_from") and source is not None:
            recipe["variation_of"] = {**job.params["vary_from"], "path": str(source),
                                      "strength": job.params.get("variation_strength")}
        recipe.update(ask.extra_recipe)
        recipe["provenance"] = {"c2pa": "signed manifest (c2pa.created, trainedAlgorithmicMedia)",
                                "watermark": watermark_note, "credited": creator is not None}
        path = save_png(image, folder / f"{position + 1}.png", recipe)
        provenance.stamp(path, settings, job_id=job.id, model=result.model_name,
                         seed=result.seed, creator=creator, source=source)
        paths.append(str(path))
        artifacts.append(Artifact(job_id=job.id, kind="image", position=position, path=str(path),
                                  content_hash=content_hash(Path(path).read_bytes()),
                                  recipe=recipe, created_at=utcnow()))
    caption = f"“{prompt}” · seed {result.seed} · {result.model_name}"
    takes = job.params.get("takes")
    if takes:
        style = (job.params.get("taste") or {}).get("choice", {}).get("style", "")
        caption = f"Take {takes['index'] + 1} of {takes['of']} · {style} · {caption}"
    if result.is_demo:
        caption += f"\n{DEMO_IMAGE_NOTICE}"
    message = OutboundMessage(MessageKind.RESULT, caption, images=tuple(paths), job_id=job.id,
                              buttons=_result_buttons(job))
    return _Outcome(result.model_name, [message], artifacts,
                    {"refine": {**job.params["refine"], "prompt": prompt}}
                    if job.params.get("refine") else {})


def _check_pictures(job: Job, images: list[PIL.Image.Image], settings: Settings,
                    store: Store | None) -> None:
    """Refuse pictures the community's safety policy does not allow: nothing is kept or
    posted, the person is told why, and the admins' audit log records it."""
    from core.safety import DEFAULT_POLICY
    from workers.safety import blocked_class

    policy = str(job.params.get("safety") or DEFAULT_POLICY)
    blocked = blocked_class(images, policy, settings.picture_detector)
    if blocked is None:
        return
    log.warning("job %s: picture blocked by the %s safety policy (%s)", job.id, policy, blocked)
    if store is not None:
        from core.policy import Policy

        Policy(store, settings).audit(community_id=job.community_id, kind="blocked_picture",
                                      subject_user_id=job.user_id, job_id=job.id,
                                      detail={"policy": policy, "detected": blocked})
    raise ContentBlockedError(
        f"I drew this, but the picture came out in a way this community's safety setting "
        f"({policy}) doesn't allow, so I didn't post it. Try asking differently.")


def _variation_source(store: Store, job: Job) -> Path | None:
    """The picture a variation or refinement redraws (the parent's image at that position, or
    its last), or the person's upload for a remix."""
    if job.params.get("remix"):
        path = Path(job.params["remix"]["path"])
        if not path.is_file():
            raise UserInputError("The picture you sent is gone (it was erased with /forget "
                                 "uploads, or lost); send it again to remix it.")
        return path
    wanted = job.params.get("vary_from") or job.params.get("refine")
    if not wanted:
        return None
    images = [a.path for a in store.artifacts(wanted["job_id"], "image") if a.path]
    if not images:
        return None  # the parent's files are gone: a fresh draw of the same prompt and style
    path = Path(images[min(int(wanted.get("position", 0)), len(images) - 1)])
    return path if path.is_file() else None


def _show_progress(job: Job, settings: Settings, text: str) -> None:
    """Best effort: edit the job's progress message, for platforms that have one.

    The takes of one request share one progress message: the first take reports on it.
    """
    if (job.params.get("takes") or {}).get("index") or job.params.get("part_of"):
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
    _publisher(settings).publish(job.id, job.kind, job.params, countdown=countdown)


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
          tell_person: bool = True, cause: str = "error") -> str:
    """Fail the job with ``reason`` (stored, and shown to the person when we still can).

    A part of a piece (a story's picture) tells nobody: the piece's post says so in place.
    ``cause`` is the failure's metric label (one of ``core.metrics.FAILURE_REASONS``).
    """
    _process["failure_cause"] = cause
    if job.params.get("part_of"):
        with store.finishing(claim, JobState.FAILED, reason=reason) as session:
            if session is None:
                return "lost"
        _wake(store, str(job.params["part_of"]), settings)
        return "failed"
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
    with shutdown.shielded():  # a part cut off half sent could be posted twice
        return _deliver_shielded(store, claim, job, messages, settings)


def _hand_back(store: Store, claim: Claim, job: Job, settings: Settings) -> str:
    """The worker is stopping and its grace period is over: give the unfinished job back.

    Nothing was posted (posting is shielded); the outbox, if any, is kept, so the next worker
    only posts. The attempt is returned: a scale-down is not a crash.
    """
    if store.defer(claim, 0) is None:
        return "lost"
    log.warning("job %s handed back: this worker is stopping", job.id)
    from core.metrics import JOBS_HANDED_BACK

    JOBS_HANDED_BACK.inc()
    try:
        _publisher(settings).publish(job.id, job.kind, job.params)
    except QueueUnavailableError:
        log.warning("job %s waits for the redriver: the broker is unreachable", job.id)
    return "handed back"


def last_failure_cause() -> str:
    """Why the last job this process failed did so (a metric label), and forget it."""
    return str(_process.pop("failure_cause", "error"))


def _deliver_shielded(store: Store, claim: Claim, job: Job, messages: list[OutboundMessage],
                      settings: Settings) -> str:
    deliverer = get_deliverer(job.platform, settings)
    if isinstance(deliverer, TransactionalDeliverer):
        ok = _record_transactionally(store, claim, job, JobState.DELIVERED, messages, deliverer,
                                     None)
        return "delivered" if ok else "lost"
    # Read afresh: the adapter may have added the progress message's id after the claim.
    fresh = store.get_job(job.id)
    target = DeliveryTarget.from_dict((fresh or job).delivery)
    try:
        # Sending can outlast the stale-heartbeat limit (pacing, uploads, a 429 waited out in
        # place): keep the claim alive, or the redriver would hand the job to another worker.
        with _Heartbeat(store, claim, settings.job_heartbeat_seconds):
            _post_outbox(store, claim, job, target, deliverer, messages)
    except _ClaimLost:
        log.info("job %s no longer ours (attempt %d); stopped delivering", job.id, claim.attempt)
        return "lost"
    except DeliveryError as exc:
        if exc.final or exc.retry_after is None:
            log.error("job %s: delivery refused for good: %s", job.id, exc)
            return _fail(store, claim, job, f"I could not post the result: {exc}", settings,
                         tell_person=False, cause="delivery_refused")
        due = store.defer(claim, exc.retry_after)
        if due is None:
            return "lost"
        log.warning("job %s: platform asked to wait %.1f s; resuming then", job.id,
                    exc.retry_after)
        _publish_later(job, settings, exc.retry_after)
        return "deferred"
    with store.finishing(claim, JobState.DELIVERED) as session:
        return "delivered" if session is not None else "lost"


class _ClaimLost(Exception):
    """The job was taken over while this worker was posting it: stop posting."""


def _post_outbox(store: Store, claim: Claim, job: Job, target: DeliveryTarget,
                 deliverer: RemoteDeliverer, messages: list[OutboundMessage]) -> None:
    """Post the outbox part by part, recording each platform message as soon as it is out
    (one small transaction each), so an attempt cut short by a 429 or a crash resumes at the
    first part not recorded instead of posting the message again from its start.

    Messages go out in order, so every position before the last one with a recorded part is
    complete; that last one resumes after its recorded parts. What can still post twice is one
    part a worker died posting (sent, not yet recorded): see the README, "How it holds together".
    """
    sent = store.delivered_parts(job.id)
    resume_at = max(sent, default=0)
    for position, message in enumerate(messages[resume_at:], start=resume_at):
        def record(part: int, message_id: str, position: int = position) -> None:
            store.record_delivered(job.id, target.platform, target.chat_id, position,
                                   [message_id], part=part)
            if not store.heartbeat(claim):  # taken over: the new owner posts the rest
                raise _ClaimLost(job.id)

        deliverer.send(target, message, skip_parts=frozenset(sent.get(position, ())),
                       on_part=record, key=f"{job.id}:{position}", resumed=claim.attempt > 1)


def claim_job(store: Store, job_id: str, settings: Settings) -> Claim | None:
    """This worker's claim on ``job_id``, or None when it is not ours to run."""
    claim = store.claim(job_id, worker=worker_name(),
                        stale_after=settings.job_stale_after_seconds,
                        max_attempts=settings.job_max_attempts)
    if claim is None:
        log.info("job %s is done, waiting, or held by a live worker; skipping", job_id)
    return claim


def execute_job(job_id: str, *, store: Store, settings: Settings) -> str:
    """Run one job if it is ours to run. Returns what happened, for logs and tests.

    A job that is done makes room for its person's next job held back for fair share
    (``MUSESPARK_FAIR_SHARE_INFLIGHT``), which is published now.
    """
    outcome = _execute_job(job_id, store=store, settings=settings)
    if outcome in ("delivered", "failed") and settings.fair_share_inflight:
        _release_next(store, job_id, settings)
    return outcome


def _release_next(store: Store, job_id: str, settings: Settings) -> None:
    job = store.get_job(job_id)
    if job is None or job.requester is None:
        return
    released = store.release_next(job.requester, job.kind, settings.fair_share_inflight)
    if released is None:
        return
    try:
        _publisher(settings).publish(released.id, released.kind, released.params)
        store.mark_published(released.id)
    except QueueUnavailableError:
        log.info("job %s released but not published; the redriver will", released.id)


def _execute_job(job_id: str, *, store: Store, settings: Settings) -> str:
    """Run one job if it is ours to run. Returns what happened, for logs and tests.

    A job generates once: its result (artifacts and the messages to post) is kept with the job,
    so a delivery interrupted by a rate limit or a crash resumes without generating again.
    """
    claim = claim_job(store, job_id, settings)
    if claim is None:
        return "skipped"
    return run_claimed(store, claim, settings)


def run_claimed(store: Store, claim: Claim, settings: Settings) -> str:
    """Run a job this worker has claimed (see :func:`execute_job`)."""
    job_id = claim.job_id
    job = store.get_job(job_id)
    assert job is not None
    if claim.exhausted:
        log.error("job %s exhausted %d attempts", job_id, claim.attempt - 1)
        return _fail(store, claim, job, (
            f"This request stopped its worker {claim.attempt - 1} times (it may need more "
            "memory than the machine has), so I gave up on it."), settings, cause="exhausted")
    if job.outbox is not None:
        messages = [OutboundMessage.from_dict(m) for m in job.outbox]
        log.info("job %s attempt %d: resuming delivery", job_id, claim.attempt)
        return _deliver(store, claim, job, messages, settings)
    started = time.monotonic()
    announce(job, claim, settings)
    try:
        with _Heartbeat(store, claim, settings.job_heartbeat_seconds), shutdown.interruptible():
            if job.intent == "story":
                return _run_story(store, claim, job, settings)
            outcome = _generate(store, job, settings)
    except shutdown.HandBack:
        return _hand_back(store, claim, job, settings)
    except Exception as exc:
        return generation_failed(store, claim, job, exc, settings, started)
    return finish_generated(store, claim, job, outcome, settings, started)


def announce(job: Job, claim: Claim, settings: Settings) -> None:
    """Log that a job starts and show it on its progress message."""
    log.info("job %s attempt %d: %s %s %r", job.id, claim.attempt, job.kind, job.intent,
             job.prompt[:60])
    _show_progress(job, settings, _PROGRESS.get(job.intent) or (
        "🎨 Drawing…" if job.kind == "image" else "✍️ Writing…"))


def generation_failed(store: Store, claim: Claim, job: Job, exc: Exception, settings: Settings,
                      started: float) -> str:
    """Fail a job whose generation raised ``exc``, telling the person in plain words."""
    job_id = job.id
    if isinstance(exc, UserInputError):
        return _fail(store, claim, job, exc.user_message, settings, cause="user_input")
    if isinstance(exc, ModelUnavailableError):
        log.error("job %s: model unavailable: %s", job_id, exc)
        return _fail(store, claim, job, exc.user_message, settings, cause="model_unavailable")
    if isinstance(exc, SoftTimeLimitExceeded):
        log.error("job %s hit its time limit after %.0f s", job_id, time.monotonic() - started)
        return _fail(store, claim, job, (
            "That took longer than this request is allowed to take, so I stopped it. "
            "Try a shorter request or fewer images."), settings, cause="time_limit")
    if isinstance(exc, MuseSparkError):
        log.error("job %s failed", job_id, exc_info=exc)
        return _fail(store, claim, job, exc.user_message, settings)
    log.error("job %s crashed", job_id, exc_info=exc)
    return _fail(store, claim, job, (
        f"Something broke while making this ({type(exc).__name__}). The operator can "
        f"find job {job_id} in the worker log."), settings, cause="crash")


def finish_generated(store: Store, claim: Claim, job: Job, outcome: _Outcome,
                     settings: Settings, started: float) -> str:
    """Keep a generated job's outcome (its outbox) and deliver it, fenced on the claim."""
    job_id = job.id
    log.info("job %s generated in %.1f s by %s", job_id, time.monotonic() - started,
             outcome.model)
    if not store.save_outcome(claim, model=outcome.model,
                              outbox=[m.to_dict() for m in outcome.messages],
                              artifacts=outcome.artifacts, params=outcome.params):
        log.info("job %s no longer ours (attempt %d); dropping its result", job_id,
                 claim.attempt)
        if store.get_job(job_id) is None:  # its person was forgotten while it ran
            import shutil

            shutil.rmtree(settings.artifacts_dir / job_id, ignore_errors=True)
        return "lost"
    if job.params.get("part_of"):
        # A story's picture: kept, not posted; the story posts it in its place.
        with store.finishing(claim, JobState.DELIVERED) as session:
            if session is None:
                return "lost"
        _wake(store, str(job.params["part_of"]), settings)
        return "delivered"
    return _deliver(store, claim, job, outcome.messages, settings)


_PROGRESS = {"story": "✍️ Writing the story…", "brainstorm": "💡 Thinking up ideas…",
             "understand": "🤔 Reading your message…", "refine": "✏️ Refining…",
             "remix": "🎨 Remixing your picture…",
             "verify": "🔎 Checking where this picture comes from…"}


def _generate(store: Store, job: Job, settings: Settings) -> _Outcome:
    """One job's generation step, by what was asked."""
    if job.intent == "understand":
        return _understand(store, job, settings)
    if job.intent == "brainstorm":
        return _brainstorm(job, settings)
    if job.intent == "verify":
        return _verify(store, job, settings)
    if job.kind == "text":
        return _generate_text(store, job, settings)
    return _generate_image(job, settings, source=_variation_source(store, job), store=store)


# -- /verify ---------------------------------------------------------------------------------


def _verify(store: Store, job: Job, settings: Settings) -> _Outcome:
    """Say where a picture comes from: its manifest, its watermark, what the store knows."""
    asked = job.params["verify"]
    if asked.get("path"):
        path = Path(asked["path"])
    else:
        images = [a.path for a in store.artifacts(asked["job_id"], "image") if a.path]
        path = Path(images[min(int(asked.get("position", 0)), len(images) - 1)]) if images \
            else Path()
    try:
        data = path.read_bytes()
    except OSError:
        raise UserInputError("That picture is gone (erased with /forget, or lost), so there "
                             "is nothing left to check; send the picture itself with the "
                             "caption /verify.") from None
    found = provenance.verify_bytes(data, str(asked.get("name") or path.name),
                                    settings=settings, store=store)
    message = OutboundMessage(MessageKind.RESULT, found.text(), job_id=job.id)
    return _Outcome("provenance check", [message], [Artifact(
        job_id=job.id, kind="text", position=0, text=found.text(),
        content_hash=content_hash(found.text().encode()),
        recipe={"job_id": job.id, "verified": str(path.name), "found_job": found.job_id,
                "manifest": found.manifest.state or "none"}, created_at=utcnow())], {})


# -- free text the rules could not place ----------------------------------------------------


def _understand(store: Store, job: Job, settings: Settings) -> _Outcome:
    """Read a message with the text model; route it, or ask what the person meant."""
    asked = job.params.get("understand") or {}
    text, replying = str(asked.get("text") or job.prompt), bool(asked.get("replying"))
    from workers.understand import read

    generator = text_generator(settings)
    decided = read(generator, text, replying=replying)
    params = {"understanding": decided.to_dict()}
    log.info("job %s understood as %s (%.2f)", job.id, decided.intent, decided.confidence)
    if decided.confidence < understanding.ASK_BELOW:
        buttons = tuple(Button(f"{actions.ASK_PREFIX}{intent}", label, job.id)
                        for intent, label in understanding.ASK_CHOICES)
        question = OutboundMessage(
            MessageKind.INFO, f"I'm not sure what you'd like for “{_shorten(text)}”. "
            "Shall I make…", job_id=job.id, buttons=buttons)
        return _Outcome(generator.model_name, [question], [], params)
    from core.orchestrator import Orchestrator

    orchestrator = Orchestrator(store, _publisher(settings), settings)
    try:
        replies = orchestrator.route(job, decided)
    except UserInputError as exc:
        replies = [OutboundMessage(MessageKind.ERROR, exc.user_message)]
    messages = [OutboundMessage(r.kind if r.kind is not MessageKind.STATUS else MessageKind.INFO,
                                r.text, images=r.images, buttons=r.buttons, job_id=job.id)
                for r in replies]
    return _Outcome(generator.model_name, messages, [], params)


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


_process: dict[str, Any] = {}


def _publisher(settings: Settings) -> Any:
    """One Celery publisher per worker process (routed jobs, story pictures, wake-ups)."""
    from core.queue import CeleryPublisher

    if _process.get("publisher_pid") != os.getpid():
        _process.update(publisher_pid=os.getpid(), publisher=CeleryPublisher(settings))
    return _process["publisher"]


# -- brainstorms ----------------------------------------------------------------------------


def _brainstorm(job: Job, settings: Settings) -> _Outcome:
    """3-5 directions, each with a picture prompt and its own style; press a number to draw."""
    generator = text_generator(settings)
    tone = _tone_words(job)
    result = generator.generate_json(
        cocreation.brainstorm_messages(job.prompt, avoid=list(job.params.get("avoid") or []),
                                       tone=tone),
        cocreation.Brainstorm.model_json_schema(),
        max_new_tokens=int(job.params["max_new_tokens"]), seed=job.seed,
        temperature=TEXT_TEMPERATURE)
    ideas, note = cocreation.ideas_or_fallback(result.text, job.prompt)
    styles = [record["choice"] for record in job.params.get("idea_styles") or []]
    listed = []
    for number, idea in enumerate(ideas, start=1):
        choice = styles[(number - 1) % len(styles)] if styles else {"style": "photographic"}
        listed.append({"title": idea.title, "prompt": idea.prompt, "style": choice["style"],
                       "choice": choice})
    lines = [f"💡 Ideas for “{_shorten(job.prompt)}”:"]
    lines += [f"{n}. {i['title']} ({i['style']}): {i['prompt']}"
              for n, i in enumerate(listed, start=1)]
    lines.append("Press a number and I'll draw it.")
    if note:
        lines.append(note)
    lines.append(f"— {result.model_name}")
    artifact = Artifact(job_id=job.id, kind="text", position=0, text="\n".join(lines),
                        content_hash=content_hash("\n".join(lines).encode()),
                        recipe={"job_id": job.id, "prompt": job.prompt, "ideas": listed,
                                "model": result.model_name, "raw": result.text,
                                **_taste_recipe(job)}, created_at=utcnow())
    message = OutboundMessage(MessageKind.RESULT, "\n".join(lines), job_id=job.id,
                              buttons=_result_buttons(job, ideas=len(listed)))
    return _Outcome(result.model_name, [message], [artifact], {"ideas": listed})


def _tone_words(job: Job) -> str:
    choice = (job.params.get("taste") or {}).get("choice") or {}
    dims = taste.CATALOGUE["text"]
    return " ".join(dims[d][choice[d]]["prompt"] for d in ("tone", "length")
                    if choice.get(d) in dims[d]).strip()


# -- illustrated stories --------------------------------------------------------------------

#: Scene N's picture is seeded ``story seed + N * SCENE_SEED_STEP``: one schedule per story.
SCENE_SEED_STEP = 1_000_003


def _run_story(store: Store, claim: Claim, job: Job, settings: Settings) -> str:
    """A story is a plan of steps, each persisted: the text (a plan of scenes), one picture job
    per scene, and the composed post. Each run of this job does the next step that is due, so
    a worker killed anywhere loses nothing and a re-run repeats nothing: the plan is kept in
    the job, scene jobs have idempotency keys, and the post is an outbox like any other.

    Why not a Celery chord (``group(scenes) | compose``): a chord's join lives in the result
    backend (we run none; the embedded transport has none), its counter is not fenced by our
    claims, and a late-acked scene redelivered after a worker death would count twice or leave
    the chord waiting. The store already knows every scene's state, so the join is a query:
    each finished scene wakes the story (:func:`_wake`), and a deferred story also looks again
    every ``story_poll_seconds`` in case a wake-up was lost with a worker.
    """
    plan = job.params.get("plan")
    if plan is None:
        plan = _write_story(job, settings)
        if not store.save_outcome(claim, model=plan["model"], outbox=None,
                                  artifacts=[_story_artifact(job, plan)], params={"plan": plan}):
            return "lost"
        job = store.get_job(job.id) or job
    scenes = _ensure_scenes(store, job, plan, settings)
    pending = [s for s in scenes if not JobState(s.state).is_final]
    if pending:
        done = len(scenes) - len(pending)
        if _process.get(f"shown:{job.id}") != done:  # edit the status only when it moved
            _process[f"shown:{job.id}"] = done
            _show_progress(job, settings, f"🎨 Drawing the pictures ({done} of {len(scenes)} "
                                          "done)…")
        if store.defer(claim, settings.story_poll_seconds) is None:
            return "lost"
        _publish_later(job, settings, settings.story_poll_seconds)
        return "waiting"
    _process.pop(f"shown:{job.id}", None)  # the story is whole: forget its progress count
    messages = _compose_story(store, job, plan, scenes)
    if not store.save_outcome(claim, model=str(plan["model"]),
                              outbox=[m.to_dict() for m in messages], artifacts=[]):
        return "lost"
    return _deliver(store, claim, job, messages, settings)


def _write_story(job: Job, settings: Settings) -> dict[str, Any]:
    generator = text_generator(settings)
    count = int(job.params["story"]["scenes"])
    picture = (job.params.get("picture_taste") or {}).get("choice") or {}
    style_words = taste.CATALOGUE["image"]["style"].get(
        picture.get("style", ""), {}).get("prompt", "pictures")
    result = generator.generate_json(
        cocreation.story_messages(job.prompt, count, style_words=style_words,
                                  tone=_tone_words(job)),
        cocreation.story_schema(count, settings.story_scene_max_chars),
        max_new_tokens=int(job.params["max_new_tokens"]), seed=job.seed,
        temperature=TEXT_TEMPERATURE)
    story, note = cocreation.story_or_fallback(result.text, job.prompt, count)
    if note:
        log.warning("job %s: story fell back (%s); model said %r", job.id, note,
                    result.text[:300])
    return {"title": story.title, "scenes": [s.model_dump() for s in story.scenes],
            "note": note, "model": result.model_name, "raw": result.text,
            "seconds": round(result.seconds, 3)}


def _story_artifact(job: Job, plan: dict[str, Any]) -> Artifact:
    text = "\n\n".join([plan["title"], *(s["text"] for s in plan["scenes"])])
    return Artifact(job_id=job.id, kind="text", position=0, text=text,
                    content_hash=content_hash(text.encode()),
                    recipe={"job_id": job.id, "prompt": job.prompt, "model": plan["model"],
                            "story": {"id": job.id, "title": plan["title"],
                                      "scenes": plan["scenes"]}, **_taste_recipe(job)},
                    created_at=utcnow())


def _ensure_scenes(store: Store, job: Job, plan: dict[str, Any],
                   settings: Settings) -> list[Job]:
    """One picture job per scene, made once (idempotency keys) and published when new."""
    record = job.params["picture_taste"]
    choice = record["choice"]
    scenes = plan["scenes"]
    made = []
    for number, scene in enumerate(scenes, start=1):
        params: dict[str, Any] = taste.generation_params("image", choice)
        params.update(count=1, steps=settings.image_steps, size=settings.image_size,
                      taste=record, part_of=job.id, safety=job.params.get("safety"),
                      story={"id": job.id, "title": plan["title"], "scene": number,
                             "of": len(scenes), "text": scene["text"]})
        prompt = f"{scene['picture']}, from the story “{plan['title']}”"
        child, created = store.create_job(
            idempotency_key=f"{job.idempotency_key}:scene{number}", kind="image",
            intent="scene", user_id=job.user_id, community_id=job.community_id,
            parent_job_id=job.id, prompt=prompt,
            expanded_prompt=taste.expand_prompt("image", prompt, choice), params=params,
            seed=(job.seed + number * SCENE_SEED_STEP) % 2**32, platform=job.platform,
            delivery=job.delivery)
        if created or child.published_at is None:
            try:
                _publisher(settings).publish(child.id, "image", child.params)
                store.mark_published(child.id)
            except QueueUnavailableError:
                log.warning("scene %s of story %s waits for the broker", number, job.id)
        made.append(store.get_job(child.id) or child)
    return made


def _compose_story(store: Store, job: Job, plan: dict[str, Any],
                   scenes: list[Job]) -> list[OutboundMessage]:
    """The post: the title, then each scene's text with its picture (or a note why not)."""
    title = f"📖 {plan['title']}"
    if plan.get("note"):
        title += f"\n{plan['note']}"
    title += f"\n— {plan['model']}"
    messages = [OutboundMessage(MessageKind.RESULT, title, job_id=job.id,
                                buttons=_result_buttons(job))]
    for number, (scene, child) in enumerate(zip(plan["scenes"], scenes), start=1):
        text = f"{number}/{len(scenes)}. {scene['text']}"
        images = tuple(a.path for a in store.artifacts(child.id, "image") if a.path)
        if child.state != JobState.DELIVERED or not images:
            text += ("\n(I couldn't draw this scene's picture: "
                     f"{child.failure_reason or 'no picture came back'})")
        messages.append(OutboundMessage(MessageKind.RESULT, text, images=images,
                                        job_id=child.id, buttons=_result_buttons(child)))
    return messages


def _wake(store: Store, job_id: str, settings: Settings) -> None:
    """A piece's part is done: let the piece (a story waiting for pictures) look again now."""
    job = store.wake(job_id)
    if job is None:
        return
    try:
        _publisher(settings).publish(job.id, job.kind, job.params)
    except QueueUnavailableError:
        log.info("could not wake job %s now; its own timer will", job_id)
