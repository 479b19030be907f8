"""Delivery to Telegram over the Bot API with httpx (workers never import python-telegram-bot).

Requests go to ``{MUSESPARK_TELEGRAM_API_URL}/bot{token}/{method}``, so a self-hosted Bot API
server, or a local fake in tests, works like the real one.

Telegram's limits, and what this module does about them (never fail on them):

* a message holds at most 4096 characters: longer text is split at paragraph, line or word
  boundaries into several messages;
* a caption holds at most 1024 characters: the photo gets the first part, the rest follows as
  messages;
* a photo upload is at most 10 MB, its width + height at most 10000 pixels: bigger pictures are
  shrunk and re-encoded as JPEG;
* a media group holds 2 to 10 items and cannot carry buttons: more pictures go in several
  groups, and the buttons follow in a short message;
* ``callback_data`` is at most 64 bytes: buttons carry ``action:job_id`` only;
* about one message a second per chat and 20 a minute per group: sends to one chat are paced
  within a worker process; a 429 answer's ``parameters.retry_after`` becomes
  ``DeliveryError(retry_after=...)`` so the job waits without blocking other chats. The
  deadline is also recorded in the store (``Store.hold_chat``), which the bot and every worker
  share: until it passes no call goes to that chat (a send raises ``DeliveryError`` with the
  time left, a progress edit is skipped).

Each part (one Telegram message; an album's pictures together, as one call makes them) is
reported to the runner as soon as Telegram accepted it, so a deferred or re-driven job never
re-sends what was recorded. Telegram has no idempotency key: a worker dying inside the one
call that posts a part, after Telegram accepted it, posts that part again on the next attempt.

Lengths are counted in UTF-16 code units, as Telegram counts them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from core import limits
from core.errors import DeliveryError
from core.limits import TELEGRAM
from core.metrics import rate_limited
from core.outbound import DeliveryTarget, MessageKind, OutboundMessage
from core.settings import Settings
from core.store import Store, utcnow
from workers.delivery._shared import shared_store

__all__ = [
    "CAPTION_MAX_CHARS",
    "MESSAGE_MAX_CHARS",
    "PHOTO_MAX_BYTES",
    "TelegramDeliverer",
    "split_text",
]

log = logging.getLogger(__name__)
# httpx logs every request URL at INFO, and the URL carries the bot token.
logging.getLogger("httpx").setLevel(logging.WARNING)

MESSAGE_MAX_CHARS = TELEGRAM.message_chars
CAPTION_MAX_CHARS = TELEGRAM.caption_chars or 0
CALLBACK_DATA_MAX_BYTES = 64
PHOTO_MAX_BYTES = TELEGRAM.upload_bytes
PHOTO_MAX_SIDES_SUM_PIXELS = TELEGRAM.photo_sides_sum or 0
MEDIA_GROUP_MAX_ITEMS = 10
REQUEST_TIMEOUT_SECONDS = 60.0
#: Pause between two sends to one private chat, and to one group (20 a minute).
PRIVATE_CHAT_INTERVAL_SECONDS = 1.0
GROUP_CHAT_INTERVAL_SECONDS = 3.0
#: How long a job waits after a network error or a 5xx before trying again.
TRANSIENT_RETRY_SECONDS = 5.0
BUTTONS_PER_ROW = 3
PROGRESS_DONE_TEXT = "✅ Done."
PROGRESS_FAILED_TEXT = "❌ That didn't work; see below."

#: The platform name flood waits are recorded under in the store (``rate_limits``).
FLOOD_WAIT_PLATFORM = "telegram"
#: How many finished progress messages a process remembers (each is edited to "Done" once).
FINISHED_PROGRESS_KEPT = 4096

_last_send_at: dict[str, float] = {}
_pacing_lock = threading.Lock()
#: One HTTP client (connection pool) per API URL and transport, for the process's life.
_clients: dict[tuple[str, httpx.BaseTransport | None], httpx.Client] = {}
_clients_lock = threading.Lock()
_finished_progress: OrderedDict[tuple[str, str, str], None] = OrderedDict()


def split_text(text: str, limit: int = MESSAGE_MAX_CHARS) -> list[str]:
    """``text`` in pieces of at most ``limit`` UTF-16 code units (:func:`core.limits.split_text`)."""
    return limits.split_text(text, limit, TELEGRAM.units)


def _keyboard(message: OutboundMessage) -> dict[str, Any] | None:
    """Inline keyboard for the buttons core put on a message (core/actions.py decides which).

    Rows of three; the 👍/👎 pair gets its own last row: groups where the bot is not an admin
    send it no reactions, so these buttons are how people rate there. Telegram's own payload
    shape (``inline_keyboard``) lives here, not in core.
    """
    rating = [b for b in message.buttons if b.action in ("up", "down")]
    others = [b for b in message.buttons if b.action not in ("up", "down")]
    rows: list[list[dict[str, str]]] = []
    for group in (others, rating):
        row: list[dict[str, str]] = []
        for button in group:
            data = button.custom_id
            if len(data.encode()) > CALLBACK_DATA_MAX_BYTES:
                log.warning("button %r dropped: callback_data over 64 bytes", data)
                continue
            row.append({"text": button.label, "callback_data": data})
            if len(row) == BUTTONS_PER_ROW:
                rows.append(row)
                row = []
        if row:
            rows.append(row)
    return {"inline_keyboard": rows} if rows else None


@dataclass(frozen=True, slots=True)
class _Photo:
    name: str
    data: bytes
    mime: str


def _photo(path: str) -> _Photo:
    """The picture at ``path`` as Telegram takes it: under 10 MB and 10000 px (w + h)."""
    name, data = limits.shrink_image(Path(path).read_bytes(), Path(path).name,
                                     max_bytes=PHOTO_MAX_BYTES,
                                     max_sides_sum=PHOTO_MAX_SIDES_SUM_PIXELS)
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
            ".webp": "image/webp"}.get(Path(name).suffix.lower(), "application/octet-stream")
    return _Photo(name, data, mime)


@dataclass(slots=True)
class _Parts:
    """Which part of a message comes next; the parts posted before are skipped."""

    skip: AbstractSet[int]
    on_part: Callable[[int, str], None] | None
    next: int = 0
    ids: list[str] = field(default_factory=list)

    @property
    def started(self) -> bool:
        """Some part of the message is out (now or on an earlier attempt)."""
        return self.next > 0

    def due(self, count: int = 1) -> bool:
        """Whether the call posting the next ``count`` parts is to be made; a call whose first
        part was posted before is passed over (one call posts all of its parts or none)."""
        if self.next in self.skip:
            self.next += count
            return False
        return True

    def posted(self, message_ids: list[str]) -> None:
        for message_id in message_ids:
            self.ids.append(message_id)
            if self.on_part is not None:
                self.on_part(self.next, message_id)
            self.next += 1


def _pace(chat_id: str) -> None:
    """Keep to about one message a second per chat (one per 3 s in groups) in this process."""
    interval = GROUP_CHAT_INTERVAL_SECONDS if chat_id.startswith("-") else (
        PRIVATE_CHAT_INTERVAL_SECONDS)
    with _pacing_lock:
        now = time.monotonic()
        due = _last_send_at.get(chat_id, 0.0) + interval
        _last_send_at[chat_id] = max(now, due)
    if due > now:
        time.sleep(due - now)


class TelegramDeliverer:
    """Posts outbound messages to a Telegram chat; see the module docstring for the limits.

    Args:
        settings: reads ``telegram_token`` and ``telegram_api_url``, and the database URL
            for the shared flood waits when no ``store`` is given.
        transport: an httpx transport to use instead of the network (tests).
        store: where chats' flood-wait deadlines are shared with the bot and other workers.
    """

    def __init__(self, settings: Settings, *, transport: httpx.BaseTransport | None = None,
                 store: Store | None = None) -> None:
        token = settings.telegram_token.get_secret_value() if settings.telegram_token else ""
        self._token = token
        self._base = f"{settings.telegram_api_url.rstrip('/')}/bot{token}"
        self._transport = transport
        self._settings = settings
        self.store = store

    # -- flood waits shared through the store ---------------------------------------------------

    def _flood_store(self) -> Store | None:
        return self.store if self.store is not None else shared_store(self._settings)

    def held_for(self, chat_id: str) -> float:
        """Seconds left of a flood wait on ``chat_id`` (0: free). Best effort: a store that
        cannot answer holds nothing."""
        try:
            store = self._flood_store()
            until = store.chat_free_at(FLOOD_WAIT_PLATFORM, chat_id) if store else None
        except Exception as exc:
            log.info("flood wait of chat %s not read: %s", chat_id, exc)
            return 0.0
        return max(0.0, (until - utcnow()).total_seconds()) if until else 0.0

    def _hold(self, chat_id: str, seconds: float) -> None:
        try:
            store = self._flood_store()
            if store is not None:
                store.hold_chat(FLOOD_WAIT_PLATFORM, chat_id,
                                utcnow() + timedelta(seconds=seconds))
        except Exception as exc:
            log.warning("flood wait of chat %s not recorded: %s", chat_id, exc)

    # -- the Bot API ----------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        return text.replace(self._token, "<token>") if self._token else text

    def _call(self, client: httpx.Client, method: str, params: dict[str, Any],
              files: dict[str, tuple[str, bytes, str]] | None = None) -> Any:
        """One Bot API call. Returns ``result``; raises DeliveryError as the module says."""
        if not self._token:
            raise DeliveryError("MUSESPARK_TELEGRAM_TOKEN is not set on this worker", final=True)
        chat_id = str(params["chat_id"]) if params.get("chat_id") is not None else None
        if chat_id is not None:
            left = self.held_for(chat_id)
            if left > 0:
                raise DeliveryError(f"Telegram {method}: chat {chat_id} is in a flood wait "
                                    f"for {left:.1f} s more", retry_after=left)
        try:
            if files:
                form = {k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                        for k, v in params.items() if v is not None}
                response = client.post(f"{self._base}/{method}", data=form, files=files)
            else:
                response = client.post(f"{self._base}/{method}",
                                       json={k: v for k, v in params.items() if v is not None})
        except httpx.HTTPError as exc:
            raise DeliveryError(f"Telegram {method}: {self._redact(str(exc)) or type(exc).__name__}",
                                retry_after=TRANSIENT_RETRY_SECONDS) from None
        try:
            body = response.json()
        except ValueError:
            body = {"ok": False, "description": response.text[:200]}
        if response.status_code == 200 and body.get("ok"):
            return body.get("result")
        code = int(body.get("error_code") or response.status_code)
        description = self._redact(str(body.get("description") or f"HTTP {code}"))
        parameters = body.get("parameters") or {}
        if code == 429:
            retry_after = float(parameters.get("retry_after") or TRANSIENT_RETRY_SECONDS)
            rate_limited("telegram", retry_after)
            if chat_id is not None:
                self._hold(chat_id, retry_after)
            raise DeliveryError(f"Telegram {method}: {description}", retry_after=retry_after)
        if code >= 500:
            raise DeliveryError(f"Telegram {method}: {description}",
                                retry_after=TRANSIENT_RETRY_SECONDS)
        if parameters.get("migrate_to_chat_id"):
            description += (f" (the group is now the supergroup "
                            f"{parameters['migrate_to_chat_id']})")
        # 400 (chat not found, message too long), 401 (token), 403 (blocked), 404: no retry helps.
        raise DeliveryError(f"Telegram {method}: {description}", final=True)

    def _call_part(self, client: httpx.Client, method: str, params: dict[str, Any],
                   files: dict[str, tuple[str, bytes, str]] | None, *, started: bool) -> Any:
        """A call that posts one part of a message. Once part of a message is posted, a 429 up
        to ``MUSESPARK_TELEGRAM_INLINE_RETRY_MAX_SECONDS`` is waited out in place (the rest of
        the message follows without a trip through the queue); a longer one defers the job,
        which resumes at the first part not posted."""
        try:
            return self._call(client, method, params, files)
        except DeliveryError as exc:
            wait = exc.retry_after
            if (not started or exc.final or wait is None
                    or wait > self._settings.telegram_inline_retry_max_seconds):
                raise
            log.info("Telegram %s: waiting %.1f s in place to finish a message", method, wait)
            time.sleep(wait)
            return self._call(client, method, params, files)

    @contextmanager
    def _client(self) -> Iterator[httpx.Client]:
        """The process's client for this API (kept open: its connections are reused)."""
        key = (self._settings.telegram_api_url, self._transport)
        with _clients_lock:
            client = _clients.get(key)
            if client is None:
                client = _clients[key] = httpx.Client(
                    timeout=REQUEST_TIMEOUT_SECONDS, transport=self._transport,
                    headers={"User-Agent": "MuseSpark-worker"})
        yield client

    # -- RemoteDeliverer -----------------------------------------------------------------------

    def send(self, target: DeliveryTarget, message: OutboundMessage, *,
             skip_parts: AbstractSet[int] = frozenset(),
             on_part: Callable[[int, str], None] | None = None,
             key: str | None = None, resumed: bool = False) -> list[str]:
        """Post ``message`` (maybe as several Telegram messages, its parts); returns the ids of
        the messages this call posted.

        Parts in ``skip_parts`` were posted before and are left out; each part posted is
        reported to ``on_part(part, message_id)`` before the next is sent. ``key`` and
        ``resumed`` are unused: Telegram has no idempotency key and no way to read a chat's
        history back (so a part a crashed attempt posted unrecorded is posted again).
        """
        chat_id = target.chat_id
        common: dict[str, Any] = {"chat_id": chat_id}
        if target.thread_id:
            common["message_thread_id"] = int(target.thread_id)
        reply_to = message.reply_to or target.reply_to
        if reply_to and str(reply_to).isdigit():
            common["reply_parameters"] = {"message_id": int(reply_to),
                                          "allow_sending_without_reply": True}
        keyboard = _keyboard(message)
        parts = _Parts(skip_parts, on_part)
        with self._client() as client:
            texts = split_text(message.text) if message.text.strip() else []
            if message.images:
                caption, texts = self._caption(message.text)
                self._send_pictures(client, common, message.images, caption,
                                    None if texts else keyboard, parts)
                if keyboard and not texts and len(message.images) > 1:
                    texts = ["👆 Reroll, vary or rate these:"]
            for number, text in enumerate(texts):
                last = number == len(texts) - 1
                if parts.due():
                    _pace(chat_id)
                    sent = self._call_part(client, "sendMessage", {
                        **common, "text": text, "reply_markup": keyboard if last else None},
                        None, started=parts.started)
                    parts.posted([str(sent["message_id"])])
                common.pop("reply_parameters", None)  # only the first part answers the request
            self._finish_progress(client, target, message)
        return parts.ids

    def progress(self, target: DeliveryTarget, text: str) -> None:
        """Edit the job's progress message (the adapter's "queued" reply) to ``text``."""
        message_id = target.extra.get("progress_message_id")
        if not message_id or self.held_for(target.chat_id) > 0:  # cosmetic: skipped in a wait
            return
        with self._client() as client:
            self._edit(client, target.chat_id, str(message_id), text)

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _caption(text: str) -> tuple[str, list[str]]:
        """The photo's caption (at most 1024) and the messages that carry the rest."""
        text = text.strip()
        if limits.measure(text, TELEGRAM.units) <= CAPTION_MAX_CHARS:
            return text, []
        caption = split_text(text, CAPTION_MAX_CHARS)[0]
        return caption, split_text(text[len(caption):]) if text[len(caption):].strip() else []

    def _send_pictures(self, client: httpx.Client, common: dict[str, Any],
                       images: tuple[str, ...], caption: str,
                       keyboard: dict[str, Any] | None, parts: _Parts) -> None:
        """Post the pictures (photo, or media groups of up to 10), one part per picture."""
        for start in range(0, len(images), MEDIA_GROUP_MAX_ITEMS):
            paths = images[start:start + MEDIA_GROUP_MAX_ITEMS]
            if not parts.due(len(paths)):
                common.pop("reply_parameters", None)
                continue
            chunk = [_photo(path) for path in paths]
            chunk_caption = caption if start == 0 else None
            _pace(common["chat_id"])
            if len(chunk) == 1:
                sent = self._call_part(client, "sendPhoto", {
                    **common, "caption": chunk_caption, "reply_markup": keyboard,
                }, {"photo": (chunk[0].name, chunk[0].data, chunk[0].mime)},
                    started=parts.started)
                parts.posted([str(sent["message_id"])])
            else:
                media = [{"type": "photo", "media": f"attach://photo{n}",
                          **({"caption": chunk_caption} if n == 0 and chunk_caption else {})}
                         for n in range(len(chunk))]
                files = {f"photo{n}": (p.name, p.data, p.mime) for n, p in enumerate(chunk)}
                sent = self._call_part(client, "sendMediaGroup", {**common, "media": media},
                                       files, started=parts.started)
                parts.posted([str(m["message_id"]) for m in sent])
            common.pop("reply_parameters", None)

    def _edit(self, client: httpx.Client, chat_id: str, message_id: str, text: str) -> None:
        try:
            self._call(client, "editMessageText", {
                "chat_id": chat_id, "message_id": int(message_id),
                "text": split_text(text)[0]})
        except DeliveryError as exc:
            if "not modified" not in str(exc):
                raise

    def _finish_progress(self, client: httpx.Client, target: DeliveryTarget,
                         message: OutboundMessage) -> None:
        """Best effort: the progress message says the job is over once its result is out.

        Edited once per text (not once per message of a result of several): this process
        remembers the progress messages it finished."""
        message_id = target.extra.get("progress_message_id")
        if not message_id or message.kind not in (MessageKind.RESULT, MessageKind.ERROR):
            return
        text = PROGRESS_DONE_TEXT if message.kind is MessageKind.RESULT else PROGRESS_FAILED_TEXT
        key = (target.chat_id, str(message_id), text)
        with _pacing_lock:
            if key in _finished_progress:
                return
        try:
            self._edit(client, target.chat_id, str(message_id), text)
        except DeliveryError as exc:
            log.info("progress message %s not edited: %s", message_id, exc)
            return
        with _pacing_lock:
            _finished_progress[key] = None
            while len(_finished_progress) > FINISHED_PROGRESS_KEPT:
                _finished_progress.popitem(last=False)
