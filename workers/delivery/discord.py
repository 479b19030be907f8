"""Delivery to Discord over its REST API, with httpx (workers never import discord.py).

Where a result goes:

* While the interaction token is valid (15 minutes after the slash command or button press), as
  an interaction follow-up: ``POST /webhooks/{application_id}/{token}``. Follow-ups can be
  ephemeral, need no channel permission and are exempt from the global rate limit.
* After that (or when the token is refused with 401/50027 "Invalid Webhook Token" or 404/10015
  "Unknown Webhook"), as a channel message with the bot token:
  ``POST /channels/{chat_id}/messages``, replying to the message the request came from.

Discord's limits this module works within:

* content is at most 2000 characters (400/50035 when over): longer text is split on line and
  word boundaries into several messages; the images and buttons go with the last one;
* files are uploaded as multipart with ``payload_json`` and ``files[n]`` referenced from
  ``attachments``; at most 10 MiB per file for webhooks (413/40005 when over): bigger images are
  re-encoded and shrunk first;
* at most 5 buttons per action row and 5 rows; a button's ``custom_id`` at most 100 characters
  (ours are ``action:job_id``: the payload stays server-side);
* a 429 carries ``retry_after`` (body, seconds, float), ``global``, and the headers
  ``Retry-After``, ``X-RateLimit-Reset-After``, ``X-RateLimit-Bucket``, ``X-RateLimit-Scope``.
  We never retry in a loop here: :class:`~core.errors.DeliveryError` with ``retry_after`` makes
  the runner defer the job, so a rate-limited chat waits while the worker serves others.
  10,000 invalid requests (401/403/429) in 10 minutes get the IP banned, another reason not to
  retry.

Posting twice: each part (one Discord message) is reported to the runner as soon as it is
posted, so a deferred or re-driven job never re-sends parts already recorded. What remains is
a worker dying after Discord created a message and before it was recorded:

* channel messages carry a ``nonce`` derived from (job, outbox position, part), with
  ``enforce_nonce``: Discord answers a repeated nonce from the same author, within a few
  minutes, with the message already made instead of a new one;
* interaction follow-ups (``POST /webhooks/{application_id}/{token}``, "Execute Webhook") take
  no nonce: it is not among that endpoint's documented fields and discord.py sends none there.
  So a resumed delivery (a later attempt of the job) first reads the channel's recent messages
  (``GET /channels/{id}/messages``, with the bot token) for a part it may have posted before:
  one made for the same interaction (``interaction_metadata.id``), with the same text and the
  same file names (``musespark-{job}-{n}``). Found, it is recorded instead of posted again.
  Where the bot may not read the channel's history (403) or the interaction id is unknown, a
  crash inside that one HTTP call can post that one part twice.

The adapter (``bots/discord``) stores what this module needs in the job's delivery target:
``interaction_token`` and, in ``extra``, ``application_id``, ``interaction_id`` and
``interaction_expires_at`` (epoch seconds). Missing facts are recovered: the application id from
``GET /applications/@me``, an unknown expiry by trying the token and falling back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from core import limits
from core.errors import DeliveryError
from core.limits import DISCORD
from core.metrics import rate_limited
from core.outbound import Button, DeliveryTarget, MessageKind, OutboundMessage
from core.settings import Settings

__all__ = [
    "MESSAGE_MAX_CHARS",
    "NONCE_MAX_CHARS",
    "UPLOAD_LIMIT_BYTES",
    "DiscordDeliverer",
    "message_nonce",
    "result_buttons",
    "shrink_image",
    "split_text",
]

log = logging.getLogger(__name__)

MESSAGE_MAX_CHARS = DISCORD.message_chars
UPLOAD_LIMIT_BYTES = DISCORD.upload_bytes
INTERACTION_TOKEN_LIFETIME_SECONDS = 15 * 60
#: Switch to the bot token a little before the interaction token dies, so a slow upload that
#: starts just in time is not refused halfway.
TOKEN_EXPIRY_MARGIN_SECONDS = 30.0
HTTP_TIMEOUT_SECONDS = 30.0
#: How long a job waits after a Discord outage (5xx, network error) before it is tried again.
SERVER_ERROR_RETRY_SECONDS = 15.0
#: Used when a 429 carries no usable wait (e.g. a Cloudflare ban answered in HTML).
DEFAULT_RETRY_AFTER_SECONDS = 60.0
BUTTONS_PER_ROW = 5
ROWS_MAX = 5
EPHEMERAL_FLAG = 1 << 6
BUTTON_STYLE_SECONDARY = 2
BUTTON_STYLE_DANGER = 4
COMPONENT_ACTION_ROW = 1
COMPONENT_BUTTON = 2
#: JSON error codes that mean "this interaction token can no longer be used".
INVALID_WEBHOOK_TOKEN = 50027
UNKNOWN_WEBHOOK = 10015
USER_AGENT = "DiscordBot (https://github.com/musespark/musespark, 0.1)"
#: Discord takes a message ``nonce`` of at most 25 characters (or an integer).
NONCE_MAX_CHARS = 25
NONCE_PREFIX = "ms"

#: One connection pool per REST base URL and process (a Celery child serves many jobs).
_clients: dict[str, httpx.Client] = {}
_application_ids: dict[str, str] = {}
_lock = threading.Lock()


def split_text(text: str, limit: int = MESSAGE_MAX_CHARS) -> list[str]:
    """``text`` in pieces of at most ``limit`` characters (:func:`core.limits.split_text`)."""
    return limits.split_text(text, limit, DISCORD.units)


def shrink_image(data: bytes, filename: str, limit: int = UPLOAD_LIMIT_BYTES) -> tuple[str, bytes]:
    """Return ``(filename, data)`` under ``limit`` bytes (Discord refuses bigger uploads); see
    :func:`core.limits.shrink_image`."""
    try:
        return limits.shrink_image(data, filename, max_bytes=limit)
    except limits.ImageTooBig as exc:
        raise DeliveryError(str(exc), final=True) from exc


def message_nonce(key: str, part: int) -> str:
    """The nonce of part ``part`` of the message named ``key`` (``job_id:outbox position``).

    The same on every attempt, different for every part and message: 23 hex digits of a
    SHA-256 (92 bits) after ``ms``, 25 characters in all.
    """
    digest = hashlib.sha256(f"{key}#{part}".encode()).hexdigest()
    return NONCE_PREFIX + digest[: NONCE_MAX_CHARS - len(NONCE_PREFIX)]


def _message_key(message: OutboundMessage) -> str:
    """A stable name for a message sent without one (a failure notice): its job and text."""
    return f"{message.job_id or '-'}:{hashlib.sha256(message.text.encode()).hexdigest()[:16]}"


def result_buttons(message: OutboundMessage) -> list[Button]:
    """The buttons under a message, as core chose them (core/actions.py), within Discord's
    5 rows of 5."""
    return list(message.buttons)[: BUTTONS_PER_ROW * ROWS_MAX]


def _components(buttons: list[Button]) -> list[dict[str, Any]]:
    rows = []
    for start in range(0, len(buttons), BUTTONS_PER_ROW):
        rows.append({"type": COMPONENT_ACTION_ROW, "components": [
            {"type": COMPONENT_BUTTON, "custom_id": b.custom_id, "label": b.label,
             "style": BUTTON_STYLE_DANGER if b.action == "delete" else BUTTON_STYLE_SECONDARY}
            for b in buttons[start:start + BUTTONS_PER_ROW]]})
    return rows


@dataclass(frozen=True, slots=True)
class _Upload:
    filename: str
    data: bytes

    @property
    def content_type(self) -> str:
        return "image/jpeg" if self.filename.endswith(".jpg") else "image/png"


class _Refused(DeliveryError):
    """Discord answered 4xx (not 429): final, with the status and JSON error code."""

    def __init__(self, message: str, *, status: int, code: int | None) -> None:
        super().__init__(message, final=True)
        self.status, self.code = status, code

    @property
    def token_dead(self) -> bool:
        return (self.status == 401 and self.code == INVALID_WEBHOOK_TOKEN) or (
            self.status == 404 and self.code == UNKNOWN_WEBHOOK)


def _retry_after(response: httpx.Response) -> float:
    """Seconds to wait after a 429, from the body and the rate-limit headers (largest wins)."""
    waits: list[float] = []
    try:
        body = response.json()
    except ValueError:
        body = {}
    if isinstance(body, dict) and body.get("retry_after") is not None:
        waits.append(float(body["retry_after"]))
    for header in ("X-RateLimit-Reset-After", "Retry-After"):
        value = response.headers.get(header)
        if value:
            try:
                waits.append(float(value))
            except ValueError:
                pass
    scope = response.headers.get("X-RateLimit-Scope") or (
        "global" if isinstance(body, dict) and body.get("global") else "bucket")
    wait = max(waits) if waits else DEFAULT_RETRY_AFTER_SECONDS
    log.warning("Discord rate limit (%s, bucket %s, via %s): waiting %.2f s", scope,
                response.headers.get("X-RateLimit-Bucket", "?"),
                "discord" if "Via" in response.headers else "cloudflare?", wait)
    return wait


#: Messages read back to find a follow-up an earlier attempt posted (Discord's maximum).
RECENT_MESSAGES_READ = 100


class _Earlier:
    """The follow-ups an earlier attempt may have posted for an interaction: its messages in
    the channel, read once when first needed."""

    def __init__(self, deliverer: DiscordDeliverer, target: DeliveryTarget) -> None:
        self._deliverer, self._target = deliverer, target
        self._interaction = str(target.extra.get("interaction_id") or "")
        self._messages: list[dict[str, Any]] | None = None

    def find(self, content: str, filenames: list[str]) -> str | None:
        """The id of this interaction's message with this text and these files, if any."""
        if not self._interaction:
            return None
        if self._messages is None:
            try:
                self._messages = [
                    m for m in self._deliverer.recent_messages(self._target.chat_id)
                    if str((m.get("interaction_metadata") or {}).get("id")) == self._interaction]
            except DeliveryError as exc:  # no history permission, gone, rate limited
                log.info("could not read channel %s to look for an earlier post (%s); "
                         "posting", self._target.chat_id, exc)
                self._messages = []
        wanted = sorted(filenames)
        for found in self._messages:
            names = sorted(str(a.get("filename")) for a in found.get("attachments") or [])
            if found.get("content") == content and names == wanted:
                self._messages.remove(found)  # one earlier post answers one part
                return str(found["id"])
        return None


class DiscordDeliverer:
    """Posts outbox messages to Discord. ``send`` returns the ids of the messages it created."""

    def __init__(self, settings: Settings) -> None:
        self.base_url = settings.discord_api_url.rstrip("/")
        token = settings.discord_token
        self._bot_token = token.get_secret_value() if token is not None else None
        with _lock:
            client = _clients.get(self.base_url)
            if client is None:
                client = _clients[self.base_url] = httpx.Client(
                    timeout=HTTP_TIMEOUT_SECONDS, headers={"User-Agent": USER_AGENT})
        self._client = client

    # -- public -------------------------------------------------------------------------------

    def send(self, target: DeliveryTarget, message: OutboundMessage, *,
             skip_parts: AbstractSet[int] = frozenset(),
             on_part: Callable[[int, str], None] | None = None,
             key: str | None = None, resumed: bool = False) -> list[str]:
        """Post ``message``; several Discord messages (parts) when its text is over 2000
        characters, the pictures and buttons with the last.

        Parts in ``skip_parts`` were posted before and are left out; each part posted is
        reported to ``on_part(part, message_id)`` before the next is sent. ``key`` names the
        message (``job_id:outbox position``) for the channel messages' nonces. ``resumed``: an
        earlier attempt may have posted a follow-up it did not record; one found in the
        channel is reported instead of posted again. Returns the ids of the messages this call
        posted (or found).

        Raises:
            DeliveryError: ``retry_after`` on 429 and outages; ``final`` on 400/401/403/404.
        """
        chunks = split_text(message.text)
        last_part = len(chunks) - 1
        # Read (and shrink) the pictures before posting anything: one that cannot be sent
        # fails the message before its first part, not after.
        uploads = ([self._upload(path, n, message.job_id) for n, path in enumerate(message.images)]
                   if last_part not in skip_parts else [])
        components = _components(result_buttons(message))
        name = key or _message_key(message)
        ids: list[str] = []
        use_webhook = self._interaction_usable(target)
        earlier = _Earlier(self, target) if resumed and use_webhook else None
        for part, chunk in enumerate(chunks):
            if part in skip_parts:
                continue
            last = part == last_part
            payload: dict[str, Any] = {"content": chunk, "allowed_mentions": {"parse": []}}
            if last and components:
                payload["components"] = components
            files = uploads if last else []
            message_id: str | None = None
            if earlier is not None and not (message.ephemeral
                                            or message.kind is MessageKind.ERROR):
                message_id = earlier.find(chunk, [f.filename for f in files])
                if message_id is not None:
                    log.info("part %d of %s was posted by an earlier attempt (message %s): "
                             "recorded, not posted again", part, name, message_id)
            if use_webhook and message_id is None:
                try:
                    message_id = self._followup(target, payload, files, message)
                except _Refused as exc:
                    if not exc.token_dead:
                        raise
                    log.info("interaction token of chat %s is dead (%s); posting to the channel",
                             target.chat_id, exc)
                    use_webhook = False
            if message_id is None:
                message_id = self._channel_message(target, payload, files, reply=part == 0,
                                                   nonce=message_nonce(name, part))
            ids.append(message_id)
            if on_part is not None:
                on_part(part, message_id)
        return ids

    def recent_messages(self, channel_id: str) -> list[dict[str, Any]]:
        """The channel's latest messages, newest first (``GET /channels/{id}/messages``)."""
        found: Any = self._request("GET", f"{self.base_url}/channels/{channel_id}/messages"
                                   f"?limit={RECENT_MESSAGES_READ}", bot=True)
        return found if isinstance(found, list) else []

    def progress(self, target: DeliveryTarget, text: str) -> None:
        """Edit the deferred response (``@original``) with the job's status; best effort."""
        if not self._interaction_usable(target):
            return
        url = f"{self._webhook_url(target)}/messages/@original"
        self._request("PATCH", url, json_body={"content": text[:MESSAGE_MAX_CHARS],
                                                "allowed_mentions": {"parse": []}})

    # -- routes -------------------------------------------------------------------------------

    def _interaction_usable(self, target: DeliveryTarget) -> bool:
        if not target.interaction_token:
            return False
        expires_at = target.extra.get("interaction_expires_at")
        return expires_at is None or time.time() < float(expires_at) - TOKEN_EXPIRY_MARGIN_SECONDS

    def _webhook_url(self, target: DeliveryTarget) -> str:
        return f"{self.base_url}/webhooks/{self._application_id(target)}/{target.interaction_token}"

    def _application_id(self, target: DeliveryTarget) -> str:
        known = target.extra.get("application_id")
        if known:
            return str(known)
        with _lock:
            cached = _application_ids.get(self.base_url)
        if cached:
            return cached
        app = self._request("GET", f"{self.base_url}/applications/@me", bot=True)
        with _lock:
            _application_ids[self.base_url] = str(app["id"])
        return str(app["id"])

    def _followup(self, target: DeliveryTarget, payload: dict[str, Any], files: list[_Upload],
                  message: OutboundMessage) -> str:
        if message.ephemeral or message.kind is MessageKind.ERROR:
            payload = {**payload, "flags": EPHEMERAL_FLAG}
        data = self._request("POST", f"{self._webhook_url(target)}?wait=true",
                             json_body=payload, files=files)
        return str(data["id"])

    def _channel_message(self, target: DeliveryTarget, payload: dict[str, Any],
                         files: list[_Upload], *, reply: bool, nonce: str) -> str:
        # A repeated nonce (a re-driven job re-sending a part it could not record) gets the
        # message made the first time, within Discord's nonce window (a few minutes).
        payload = {**payload, "nonce": nonce, "enforce_nonce": True}
        if reply and target.reply_to and target.reply_to.isdigit():
            payload = {**payload, "message_reference": {"message_id": target.reply_to,
                                                        "fail_if_not_exists": False}}
        data = self._request("POST", f"{self.base_url}/channels/{target.chat_id}/messages",
                             json_body=payload, files=files, bot=True)
        return str(data["id"])

    # -- HTTP ---------------------------------------------------------------------------------

    def _upload(self, path: str, index: int, job_id: str | None) -> _Upload:
        source = Path(path)
        name = f"musespark-{job_id or 'image'}-{index + 1}{source.suffix or '.png'}"
        filename, data = shrink_image(source.read_bytes(), name)
        return _Upload(filename, data)

    def _request(self, method: str, url: str, *, json_body: dict[str, Any] | None = None,
                 files: list[_Upload] | None = None, bot: bool = False) -> dict[str, Any]:
        headers: dict[str, str] = {}
        if bot:
            if not self._bot_token:
                raise DeliveryError("MUSESPARK_DISCORD_TOKEN is not set in the worker, so it "
                                    "cannot post to a Discord channel", final=True)
            headers["Authorization"] = f"Bot {self._bot_token}"
        kwargs: dict[str, Any] = {"headers": headers}
        if files:
            body = dict(json_body or {})
            body["attachments"] = [{"id": n, "filename": f.filename} for n, f in enumerate(files)]
            kwargs["data"] = {"payload_json": json.dumps(body)}
            kwargs["files"] = [(f"files[{n}]", (f.filename, f.data, f.content_type))
                               for n, f in enumerate(files)]
        elif json_body is not None:
            kwargs["json"] = json_body
        try:
            response = self._client.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise DeliveryError(f"Discord unreachable: {type(exc).__name__}: {exc}",
                                retry_after=SERVER_ERROR_RETRY_SECONDS) from exc
        if response.status_code == 429:
            wait = _retry_after(response)
            rate_limited("discord", wait)
            raise DeliveryError("Discord rate limit", retry_after=wait)
        if response.status_code >= 500:
            raise DeliveryError(f"Discord answered {response.status_code}",
                                retry_after=SERVER_ERROR_RETRY_SECONDS)
        if response.status_code >= 400:
            code, reason = None, response.text[:300]
            try:
                body = response.json()
                code, reason = body.get("code"), body.get("message", reason)
            except ValueError:
                pass
            raise _Refused(f"Discord refused {method} ({response.status_code}, code {code}): "
                           f"{reason}", status=response.status_code, code=code)
        if response.status_code == 204 or not response.content:
            return {}
        result: dict[str, Any] = response.json()
        return result
