"""A fake Telegram Bot API server on 127.0.0.1, over real HTTP, for tests.

It answers ``/bot{token}/{method}`` the way Telegram does (``{"ok": true, "result": ...}`` or
``{"ok": false, "error_code": ..., "description": ...}``), keeps chats and their messages, serves
``getUpdates`` with long polling and offsets, posts updates to a registered webhook with its
``secret_token``, records every call, and checks Telegram's limits (4096-character messages,
1024-character captions, 10 MB photos, 2-10 item media groups, 64-byte ``callback_data``) so a
client that breaks them gets the same 400 as from Telegram.

Files: photos and documents in updates built with :meth:`FakeTelegram.photo_update` and
:meth:`FakeTelegram.document_update` (and photos the bot sends) get file ids that ``getFile``
resolves to a ``file_path``, and their bytes are served at ``/file/bot{token}/{file_path}``, as
Telegram does (PTB downloads from ``base_file_url`` + ``file_path``); each download is recorded
as a call named ``downloadFile``. ``getFile`` refuses files over 20 MB, like Telegram.

Tests steer it: :meth:`FakeTelegram.fail` makes the next calls answer 429 with ``retry_after``,
403 (bot blocked) or anything else; :meth:`FakeTelegram.push` queues updates built with the
``*_update`` helpers.

    with FakeTelegram() as fake:
        fake.push(fake.text_update(42, "/imagine a fox"))
        (photo,) = fake.wait_calls("sendPhoto", chat_id=42)
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import itertools
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar
from urllib.parse import parse_qs

__all__ = ["Call", "FakeTelegram", "Rule"]

T = TypeVar("T")

MESSAGE_MAX_CHARS = 4096
CAPTION_MAX_CHARS = 1024
CALLBACK_DATA_MAX_BYTES = 64
PHOTO_MAX_BYTES = 10 * 1000 * 1000
#: getFile hands out files up to this size (bots cannot download bigger ones).
DOWNLOAD_MAX_BYTES = 20 * 1000 * 1000
#: Telegram's small preview of a photo fits in this many pixels per side.
THUMBNAIL_SIDE = 90
WAIT_TIMEOUT_SECONDS = 60.0
#: Parameters Telegram takes as JSON-serialized objects (in form or multipart bodies).
JSON_FIELDS = frozenset({"reply_markup", "reply_parameters", "media", "allowed_updates",
                         "commands", "entities", "caption_entities", "link_preview_options",
                         "scope"})


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


class ApiError(Exception):
    def __init__(self, code: int, description: str, parameters: dict[str, Any] | None = None):
        super().__init__(description)
        self.code, self.description, self.parameters = code, description, parameters


@dataclass
class Call:
    """One request the fake received, and how it answered."""

    method: str
    params: dict[str, Any]
    files: dict[str, bytes]
    at: float  # time.monotonic()
    user_agent: str
    status: int = 0
    result: Any = None

    @property
    def chat_id(self) -> str | None:
        chat = self.params.get("chat_id")
        return None if chat is None else str(chat)

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class Rule:
    """Answer matching calls with an error instead (``times`` None: for ever)."""

    method: str | None
    chat_id: str | None
    code: int
    description: str
    retry_after: int | None = None
    times: int | None = 1
    where: Callable[[Call], bool] | None = None

    def matches(self, call: Call) -> bool:
        return (self.method in (None, call.method)) and (self.chat_id in (None, call.chat_id)) and (
            self.times is None or self.times > 0) and (self.where is None or self.where(call))


@dataclass
class Stall:
    """Carry out the next matching call, then hold its answer back ``seconds`` (a client
    killed meanwhile never learns that Telegram did it). ``reached`` is set when it happens."""

    method: str
    seconds: float
    where: Callable[[Call], bool] | None = None
    reached: threading.Event = field(default_factory=threading.Event)


@dataclass
class FakeTelegram:
    """The fake server. ``url`` is what MUSESPARK_TELEGRAM_API_URL should be."""

    token: str = "123456789:AAFakeTokenForTestsOnly_abcdefghijk"
    bot_id: int = 123456789
    username: str = "muse_test_bot"
    can_read_all_group_messages: bool = False
    #: getChatMember answers: (chat_id, user_id) -> status ("administrator", "member", ...).
    members: dict[tuple[str, str], str] = field(default_factory=dict)
    #: Users who never started a private chat with the bot: it may not write to them (403).
    unstarted: set[str] = field(default_factory=set)
    webhook_last_error: str | None = None

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._calls: list[Call] = []
        self._rules: list[Rule] = []
        self._stalls: list[Stall] = []
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(random.randint(10_000, 900_000_000))
        self._message_ids: dict[str, itertools.count[int]] = {}
        self._messages: dict[tuple[str, int], dict[str, Any]] = {}
        self._callback_ids = itertools.count(1)
        self._answered: set[str] = set()
        #: file_id -> {"file_unique_id", "file_path", "file_size", "data"}
        self._files: dict[str, dict[str, Any]] = {}
        self._file_numbers = itertools.count(1)
        self.commands: list[dict[str, Any]] = []
        self.webhook: dict[str, Any] = {}
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> FakeTelegram:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                fake._serve(self)

            do_GET = do_POST  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                    super().handle_error(request, client_address)
                # else: the caller is gone (a worker killed mid-call); nothing to report

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-telegram",
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            with self._cond:
                self._cond.notify_all()
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeTelegram:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- steering ------------------------------------------------------------------------------

    def fail(self, method: str | None = None, *, chat_id: int | str | None = None,
             code: int = 429, retry_after: int | None = None, description: str | None = None,
             times: int | None = 1, where: Callable[[Call], bool] | None = None) -> Rule:
        """Answer the next ``times`` matching calls with an error (429, 403, 400...).

        ``where`` narrows the match further, e.g. to the worker's calls
        (``lambda c: c.user_agent == "MuseSpark-worker"``).
        """
        default = {429: f"Too Many Requests: retry after {retry_after}",
                   403: "Forbidden: bot was blocked by the user",
                   400: "Bad Request: chat not found"}.get(code, f"Error {code}")
        rule = Rule(method, None if chat_id is None else str(chat_id), code,
                    description or default, retry_after, times, where)
        with self._cond:
            self._rules.append(rule)
        return rule

    def stall_next(self, method: str, seconds: float, *,
                   where: Callable[[Call], bool] | None = None) -> Stall:
        """The next ``method`` call (matching ``where``) is carried out, its answer held back."""
        stall = Stall(method, seconds, where)
        with self._cond:
            self._stalls.append(stall)
        return stall

    def block_chat(self, chat_id: int | str) -> Rule:
        """Every call to this chat answers 403 "bot was blocked by the user", for ever."""
        return self.fail(None, chat_id=chat_id, code=403, times=None)

    def push(self, update: dict[str, Any]) -> dict[str, Any]:
        """Queue an update for getUpdates, or post it to the webhook when one is set."""
        if self.webhook.get("url"):
            self.post_webhook(update)
            return update
        with self._cond:
            self._updates.append(update)
            self._cond.notify_all()
        return update

    def post_webhook(self, update: dict[str, Any], *, secret: str | None | bool = True) -> int:
        """POST ``update`` to the registered webhook like Telegram; returns the HTTP status.

        ``secret=True`` sends the registered secret_token; a string sends that one instead;
        None or False sends no header.
        """
        url = self.webhook["url"]
        headers = {"Content-Type": "application/json"}
        token = self.webhook.get("secret_token") if secret is True else secret
        if token:
            headers["X-Telegram-Bot-Api-Secret-Token"] = str(token)
        request = urllib.request.Request(url, data=json.dumps(update).encode(), headers=headers,
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    # -- building updates ----------------------------------------------------------------------

    def _next_message_id(self, chat_id: str) -> int:
        with self._cond:
            counter = self._message_ids.setdefault(chat_id, itertools.count(1))
            return next(counter)

    @staticmethod
    def chat(chat_id: int | str) -> dict[str, Any]:
        chat = int(chat_id)
        if chat > 0:
            return {"id": chat, "type": "private", "first_name": "Ada"}
        return {"id": chat, "type": "supergroup", "title": f"Group {chat}"}

    @staticmethod
    def user(user_id: int, name: str = "Ada") -> dict[str, Any]:
        return {"id": user_id, "is_bot": False, "first_name": name, "language_code": "en"}

    def bot_user(self) -> dict[str, Any]:
        return {"id": self.bot_id, "is_bot": True, "first_name": "MuseSpark",
                "username": self.username}

    @staticmethod
    def entities(text: str) -> list[dict[str, Any]]:
        """The entities Telegram adds to a text or caption: a leading command, @mentions."""
        entities = []
        if text.startswith("/"):
            entities.append({"type": "bot_command", "offset": 0,
                             "length": _utf16_len(text.split()[0])})
        position = 0
        for word in text.split(" "):
            if word.startswith("@") and len(word) > 1:
                entities.append({"type": "mention", "offset": _utf16_len(text[:position]),
                                 "length": _utf16_len(word)})
            position += len(word) + 1
        return entities

    def message_update(self, chat_id: int | str, user_id: int | None = None,
                       reply_to: int | None = None, **content: Any) -> dict[str, Any]:
        """An update with a person's message in ``chat_id`` holding ``content`` (``text``,
        ``photo``, ``video``...); kept, so replies can quote it."""
        chat = str(chat_id)
        user_id = user_id if user_id is not None else (int(chat) if int(chat) > 0 else 1001)
        message: dict[str, Any] = {
            "message_id": self._next_message_id(chat), "date": int(time.time()),
            "chat": self.chat(chat), "from": self.user(user_id), **content,
        }
        if reply_to is not None:
            replied = self._messages.get((chat, reply_to))
            message["reply_to_message"] = {k: v for k, v in replied.items()
                                           if k != "reply_to_message"} if replied else {
                "message_id": reply_to, "date": int(time.time()), "chat": self.chat(chat)}
        with self._cond:
            self._messages[(chat, message["message_id"])] = message
        return {"update_id": next(self._update_ids), "message": message}

    def text_update(self, chat_id: int | str, text: str, *, user_id: int | None = None,
                    reply_to: int | None = None) -> dict[str, Any]:
        """A person's text message; commands and @mentions get their entities, as Telegram
        adds them."""
        content: dict[str, Any] = {"text": text}
        entities = self.entities(text)
        if entities:
            content["entities"] = entities
        return self.message_update(chat_id, user_id, reply_to, **content)

    def _caption(self, caption: str | None) -> dict[str, Any]:
        if not caption:
            return {}
        content: dict[str, Any] = {"caption": caption}
        entities = self.entities(caption)
        if entities:
            content["caption_entities"] = entities
        return content

    def add_file(self, data: bytes, *, folder: str = "documents", suffix: str = "",
                 file_size: int | None = None) -> dict[str, Any]:
        """Keep ``data`` for getFile and downloads; returns its file_id, file_unique_id and
        file_size (``file_size`` overrides what Telegram would report)."""
        number = next(self._file_numbers)
        unique = f"{random.getrandbits(48):012x}"
        file_id = f"BQAC-{unique}-{number}"
        entry = {"file_unique_id": f"AgAD-{unique}",
                 "file_path": f"{folder}/file_{number}{suffix}",
                 "file_size": len(data) if file_size is None else file_size, "data": data}
        with self._cond:
            self._files[file_id] = entry
        return {"file_id": file_id, "file_unique_id": entry["file_unique_id"],
                "file_size": entry["file_size"]}

    def photo_update(self, chat_id: int | str, data: bytes, *, caption: str | None = None,
                     user_id: int | None = None, reply_to: int | None = None,
                     file_size: int | None = None) -> dict[str, Any]:
        """A person's photo in the sizes Telegram sends: a small preview first (when the
        picture is larger than one), then ``data`` itself (its width and height read from it;
        1x1 when it is no picture)."""
        from PIL import Image

        sizes = []
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                preview = image.convert("RGB")
        except Exception:
            width = height = 1
        else:
            if max(width, height) > THUMBNAIL_SIDE:
                preview.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
                buffer = io.BytesIO()
                preview.save(buffer, format="JPEG")
                sizes.append({**self.add_file(buffer.getvalue(), folder="photos",
                                              suffix=".jpg"),
                              "width": preview.width, "height": preview.height})
        sizes.append({**self.add_file(data, folder="photos", suffix=".jpg",
                                      file_size=file_size), "width": width, "height": height})
        return self.message_update(chat_id, user_id, reply_to, photo=sizes,
                                    **self._caption(caption))

    def document_update(self, chat_id: int | str, data: bytes, *, caption: str | None = None,
                        mime_type: str | None = "application/octet-stream",
                        file_name: str | None = "file", user_id: int | None = None,
                        reply_to: int | None = None,
                        file_size: int | None = None) -> dict[str, Any]:
        """A person's file (a picture sent "as a file", or anything else)."""
        document: dict[str, Any] = self.add_file(data, file_size=file_size)
        if mime_type is not None:
            document["mime_type"] = mime_type
        if file_name is not None:
            document["file_name"] = file_name
        return self.message_update(chat_id, user_id, reply_to, document=document,
                                    **self._caption(caption))

    def reaction_update(self, chat_id: int | str, message_id: int, *, user_id: int,
                        old: tuple[str, ...] = (), new: tuple[str, ...] = ()) -> dict[str, Any]:
        return {"update_id": next(self._update_ids), "message_reaction": {
            "chat": self.chat(chat_id), "message_id": message_id, "user": self.user(user_id),
            "date": int(time.time()),
            "old_reaction": [{"type": "emoji", "emoji": e} for e in old],
            "new_reaction": [{"type": "emoji", "emoji": e} for e in new]}}

    def reaction_count_update(self, chat_id: int | str, message_id: int,
                              counts: dict[str, int]) -> dict[str, Any]:
        return {"update_id": next(self._update_ids), "message_reaction_count": {
            "chat": self.chat(chat_id), "message_id": message_id, "date": int(time.time()),
            "reactions": [{"type": {"type": "emoji", "emoji": e}, "total_count": n}
                          for e, n in counts.items()]}}

    def callback_update(self, chat_id: int | str, message_id: int, data: str, *,
                        user_id: int | None = None) -> dict[str, Any]:
        """A press on a button under one of the bot's messages."""
        chat = str(chat_id)
        user_id = user_id if user_id is not None else (int(chat) if int(chat) > 0 else 1001)
        message = self._messages.get((chat, message_id)) or {
            "message_id": message_id, "date": int(time.time()), "chat": self.chat(chat)}
        return {"update_id": next(self._update_ids), "callback_query": {
            "id": str(next(self._callback_ids)), "from": self.user(user_id),
            "chat_instance": f"ci{chat}", "message": message, "data": data}}

    # -- inspection ----------------------------------------------------------------------------

    def calls(self, method: str | None = None, *, chat_id: int | str | None = None,
              ok: bool | None = None) -> list[Call]:
        with self._cond:
            return [c for c in self._calls
                    if (method is None or c.method == method)
                    and (chat_id is None or c.chat_id == str(chat_id))
                    and (ok is None or c.ok == ok)]

    def wait_for(self, check: Callable[[], T], *, timeout: float = WAIT_TIMEOUT_SECONDS,
                 what: str = "condition") -> T:
        """Wait until ``check()`` is truthy (re-checked after every call); returns its value."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = check()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    methods = [(c.method, c.chat_id, c.status) for c in self._calls[-30:]]
                    raise TimeoutError(f"{what} not met after {timeout} s; last calls: {methods}")
                self._cond.wait(min(left, 0.2))

    def wait_calls(self, method: str, *, chat_id: int | str | None = None, count: int = 1,
                   ok: bool | None = True, timeout: float = WAIT_TIMEOUT_SECONDS,
                   where: Callable[[Call], bool] | None = None) -> list[Call]:
        def check() -> list[Call]:
            found = [c for c in self.calls(method, chat_id=chat_id, ok=ok)
                     if where is None or where(c)]
            return found if len(found) >= count else []
        return self.wait_for(check, timeout=timeout, what=f"{count} x {method} in {chat_id}")

    def message(self, chat_id: int | str, message_id: int) -> dict[str, Any] | None:
        with self._cond:
            return self._messages.get((str(chat_id), message_id))

    # -- the HTTP side -------------------------------------------------------------------------

    def _serve(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        path = request.path.split("?", 1)[0]
        prefix = f"/bot{self.token}/"
        if path.startswith("/file/bot"):
            self._serve_file(request, path)
            return
        if not path.startswith("/bot"):
            self._reply(request, 404, {"ok": False, "error_code": 404,
                                       "description": "Not Found"})
            return
        if not path.startswith(prefix):
            self._reply(request, 401, {"ok": False, "error_code": 401,
                                       "description": "Unauthorized"})
            return
        method = path[len(prefix):]
        params, files = self._parse(request.headers.get("Content-Type", ""), body)
        call = Call(method, params, files, time.monotonic(),
                    request.headers.get("User-Agent", ""))
        try:
            result = self._dispatch(call)
            status, payload = 200, {"ok": True, "result": result}
        except ApiError as exc:
            status = exc.code
            payload = {"ok": False, "error_code": exc.code, "description": exc.description}
            if exc.parameters:
                payload["parameters"] = exc.parameters
            result = None
        call.status, call.result = status, result
        if method != "getUpdates" or status != 200 or result:
            with self._cond:
                self._calls.append(call)
                self._cond.notify_all()
        self._reply(request, status, payload)

    def _serve_file(self, request: BaseHTTPRequestHandler, path: str) -> None:
        """A download: ``/file/bot{token}/{file_path}`` answers the bytes (GET)."""
        prefix = f"/file/bot{self.token}/"
        path = urllib.parse.unquote(path)  # clients quote the token's ":" (PTB does)
        file_path = path[len(prefix):] if path.startswith(prefix) else None
        with self._cond:
            found = next((f for f in self._files.values() if f["file_path"] == file_path), None)
        call = Call("downloadFile", {"file_path": file_path}, {}, time.monotonic(),
                    request.headers.get("User-Agent", ""))
        if found is None:
            call.status = 401 if file_path is None else 404
            description = "Unauthorized" if file_path is None else "Not Found"
            self._reply(request, call.status, {"ok": False, "error_code": call.status,
                                               "description": description})
        else:
            call.status, call.result = 200, len(found["data"])
            request.send_response(200)
            request.send_header("Content-Type", "application/octet-stream")
            request.send_header("Content-Length", str(len(found["data"])))
            request.end_headers()
            request.wfile.write(found["data"])
        with self._cond:
            self._calls.append(call)
            self._cond.notify_all()

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        try:
            request.send_response(status)
            request.send_header("Content-Type", "application/json")
            request.send_header("Content-Length", str(len(data)))
            request.end_headers()
            request.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the caller is gone (a worker killed while the fake held its answer)

    @staticmethod
    def _parse(content_type: str, body: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
        params: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        if not body:
            return params, files
        if content_type.startswith("application/json"):
            return json.loads(body), files
        raw: dict[str, str] = {}
        if content_type.startswith("multipart/form-data"):
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                f"Content-Type: {content_type}\r\n\r\n".encode() + body)
            for part in message.iter_parts():
                name = part.get_param("name", header="content-disposition")
                payload = part.get_payload(decode=True) or b""
                if part.get_filename() is not None:
                    files[str(name)] = payload
                else:
                    raw[str(name)] = payload.decode()
        else:
            raw = {k: v[-1] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
        for name, value in raw.items():
            params[name] = json.loads(value) if name in JSON_FIELDS and value else value
        return params, files

    # -- the methods ---------------------------------------------------------------------------

    def _dispatch(self, call: Call) -> Any:
        with self._cond:
            for rule in self._rules:
                if rule.matches(call):
                    if rule.times is not None:
                        rule.times -= 1
                    parameters = ({"retry_after": rule.retry_after}
                                  if rule.retry_after is not None else None)
                    raise ApiError(rule.code, rule.description, parameters)
        handler = getattr(self, f"_m_{call.method}", None)
        if handler is None:
            raise ApiError(404, "Not Found: method not found")
        result = handler(call)
        with self._cond:
            stall = next((st for st in self._stalls if st.method == call.method
                          and (st.where is None or st.where(call))), None)
            if stall is not None:
                self._stalls.remove(stall)
        if stall is not None:
            stall.reached.set()
            time.sleep(stall.seconds)
        return result

    def _m_getMe(self, call: Call) -> Any:  # noqa: N802
        return {**self.bot_user(), "can_join_groups": True,
                "can_read_all_group_messages": self.can_read_all_group_messages,
                "supports_inline_queries": False, "can_connect_to_business": False,
                "has_main_web_app": False}

    def _m_getUpdates(self, call: Call) -> Any:  # noqa: N802
        if self.webhook.get("url"):
            raise ApiError(409, "Conflict: can't use getUpdates method while webhook is active; "
                                "use deleteWebhook to delete the webhook first")
        offset = int(call.params.get("offset") or 0)
        limit = int(call.params.get("limit") or 100)
        timeout = float(call.params.get("timeout") or 0)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                # getUpdates confirms every update below the offset it is given.
                self._updates = [u for u in self._updates if u["update_id"] >= offset]
                if self._updates or time.monotonic() >= deadline or self._server is None:
                    return self._updates[:limit]
                self._cond.wait(min(0.2, max(0.0, deadline - time.monotonic())))

    def _m_setMyCommands(self, call: Call) -> Any:  # noqa: N802
        commands = call.params.get("commands") or []
        for command in commands:
            name = command["command"]
            if not (1 <= len(name) <= 32) or name != name.lower() or not name.replace(
                    "_", "").isalnum():
                raise ApiError(400, "Bad Request: BOT_COMMAND_INVALID")
        self.commands = commands
        return True

    def _m_getMyCommands(self, call: Call) -> Any:  # noqa: N802
        return self.commands

    def _m_setWebhook(self, call: Call) -> Any:  # noqa: N802
        self.webhook = {"url": call.params.get("url", ""),
                        "secret_token": call.params.get("secret_token"),
                        "allowed_updates": call.params.get("allowed_updates")}
        return True

    def _m_deleteWebhook(self, call: Call) -> Any:  # noqa: N802
        self.webhook = {}
        if str(call.params.get("drop_pending_updates")).lower() == "true":
            with self._cond:
                self._updates.clear()
        return True

    def _m_getWebhookInfo(self, call: Call) -> Any:  # noqa: N802
        info: dict[str, Any] = {"url": self.webhook.get("url", ""),
                                "has_custom_certificate": False,
                                "pending_update_count": len(self._updates)}
        if self.webhook.get("allowed_updates"):
            info["allowed_updates"] = self.webhook["allowed_updates"]
        if self.webhook_last_error:
            info["last_error_date"] = int(time.time()) - 60
            info["last_error_message"] = self.webhook_last_error
        return info

    def _m_getChat(self, call: Call) -> Any:  # noqa: N802
        return {**self.chat(call.params["chat_id"]), "accent_color_id": 0,
                "max_reaction_count": 11}

    def _m_getChatMember(self, call: Call) -> Any:  # noqa: N802
        chat, user = str(call.params["chat_id"]), str(call.params["user_id"])
        status = self.members.get((chat, user), "member")
        user_obj = self.bot_user() if user == str(self.bot_id) else self.user(int(user))
        member: dict[str, Any] = {"status": status, "user": user_obj}
        if status == "administrator":
            member.update({name: True for name in (
                "can_be_edited", "can_manage_chat", "can_delete_messages",
                "can_manage_video_chats", "can_restrict_members", "can_promote_members",
                "can_change_info", "can_invite_users", "can_post_stories", "can_edit_stories",
                "can_delete_stories")}, is_anonymous=False)
        elif status == "creator":
            member["is_anonymous"] = False
        elif status == "kicked":
            member["until_date"] = 0
        return member

    def _m_answerCallbackQuery(self, call: Call) -> Any:  # noqa: N802
        query_id = str(call.params.get("callback_query_id"))
        if query_id in self._answered:
            raise ApiError(400, "Bad Request: query is too old and response timeout expired "
                                "or query ID is invalid")
        self._answered.add(query_id)
        return True

    def _m_getFile(self, call: Call) -> Any:  # noqa: N802
        file_id = str(call.params.get("file_id") or "")
        with self._cond:
            found = self._files.get(file_id)
        if found is None:
            raise ApiError(400, "Bad Request: invalid file_id")
        if found["file_size"] > DOWNLOAD_MAX_BYTES:
            raise ApiError(400, "Bad Request: file is too big")
        return {"file_id": file_id, "file_unique_id": found["file_unique_id"],
                "file_size": found["file_size"], "file_path": found["file_path"]}

    def _m_deleteMessage(self, call: Call) -> Any:  # noqa: N802
        with self._cond:
            self._messages.pop((str(call.params["chat_id"]), int(call.params["message_id"])),
                               None)
        return True

    # Sending.

    @staticmethod
    def _check_keyboard(markup: Any) -> None:
        for row in (markup or {}).get("inline_keyboard", []):
            for button in row:
                data = button.get("callback_data")
                if data is not None and not (1 <= len(data.encode()) <= CALLBACK_DATA_MAX_BYTES):
                    raise ApiError(400, "Bad Request: BUTTON_DATA_INVALID")

    def _new_message(self, call: Call, **content: Any) -> dict[str, Any]:
        chat = str(call.params["chat_id"])
        message: dict[str, Any] = {"message_id": self._next_message_id(chat),
                                   "date": int(time.time()), "chat": self.chat(chat),
                                   "from": self.bot_user(), **content}
        reply = call.params.get("reply_parameters") or {}
        if reply.get("message_id") is not None:
            replied = self._messages.get((chat, int(reply["message_id"])))
            if replied is None and not reply.get("allow_sending_without_reply"):
                raise ApiError(400, "Bad Request: message to be replied not found")
            if replied is not None:
                message["reply_to_message"] = {k: v for k, v in replied.items()
                                               if k != "reply_to_message"}
        if call.params.get("message_thread_id"):
            message["message_thread_id"] = int(call.params["message_thread_id"])
            message["is_topic_message"] = True
        markup = call.params.get("reply_markup")
        if markup:
            self._check_keyboard(markup)
            message["reply_markup"] = markup
        with self._cond:
            self._messages[(chat, message["message_id"])] = message
        return message

    def _photo_size(self, data: bytes) -> list[dict[str, Any]]:
        from PIL import Image

        if len(data) > PHOTO_MAX_BYTES:
            raise ApiError(400, "Bad Request: file is too big")
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except Exception:
            raise ApiError(400, "Bad Request: IMAGE_PROCESS_FAILED") from None
        if width + height > 10_000:
            raise ApiError(400, "Bad Request: PHOTO_INVALID_DIMENSIONS")
        return [{**self.add_file(data, folder="photos", suffix=".jpg"), "width": width,
                 "height": height}]

    @staticmethod
    def _check_caption(caption: Any) -> None:
        if caption and _utf16_len(str(caption)) > CAPTION_MAX_CHARS:
            raise ApiError(400, "Bad Request: message caption is too long")

    def _m_sendMessage(self, call: Call) -> Any:  # noqa: N802
        text = str(call.params.get("text") or "")
        if not text.strip():
            raise ApiError(400, "Bad Request: message text is empty")
        if _utf16_len(text) > MESSAGE_MAX_CHARS:
            raise ApiError(400, "Bad Request: message is too long")
        return self._new_message(call, text=text)

    def _m_sendPhoto(self, call: Call) -> Any:  # noqa: N802
        self._check_caption(call.params.get("caption"))
        data = call.files.get("photo")
        if data is None:
            raise ApiError(400, "Bad Request: there is no photo in the request")
        content: dict[str, Any] = {"photo": self._photo_size(data)}
        if call.params.get("caption"):
            content["caption"] = call.params["caption"]
        return self._new_message(call, **content)

    def _m_sendDocument(self, call: Call) -> Any:  # noqa: N802
        """A file kept byte for byte (photos are what Telegram recompresses, not documents)."""
        self._check_caption(call.params.get("caption"))
        data = call.files.get("document")
        if data is None:
            raise ApiError(400, "Bad Request: there is no document in the request")
        if str(call.params["chat_id"]) in self.unstarted:  # a person who never pressed Start
            raise ApiError(403, "Forbidden: bot can't initiate conversation with a user")
        content: dict[str, Any] = {"document": self.add_file(data)}
        if call.params.get("caption"):
            content["caption"] = call.params["caption"]
        return self._new_message(call, **content)

    def _m_sendMediaGroup(self, call: Call) -> Any:  # noqa: N802
        media = call.params.get("media") or []
        if not 2 <= len(media) <= 10:
            raise ApiError(400, "Bad Request: wrong number of media in the album "
                                "(must be 2 to 10)")
        if call.params.get("reply_markup"):
            raise ApiError(400, "Bad Request: media groups can't have a reply markup")
        group_id = str(random.getrandbits(60))
        sizes = []
        for item in media:
            self._check_caption(item.get("caption"))
            name = str(item.get("media", "")).removeprefix("attach://")
            if name not in call.files:
                raise ApiError(400, f"Bad Request: file {name} not found in the request")
            sizes.append(self._photo_size(call.files[name]))
        messages = []
        for item, size in zip(media, sizes, strict=True):
            content: dict[str, Any] = {"photo": size, "media_group_id": group_id}
            if item.get("caption"):
                content["caption"] = item["caption"]
            messages.append(self._new_message(call, **content))
            call.params.pop("reply_parameters", None)
        return messages

    def _m_editMessageText(self, call: Call) -> Any:  # noqa: N802
        chat, message_id = str(call.params["chat_id"]), int(call.params["message_id"])
        text = str(call.params.get("text") or "")
        with self._cond:
            message = self._messages.get((chat, message_id))
            if message is None or message.get("from", {}).get("id") != self.bot_id:
                raise ApiError(400, "Bad Request: message to edit not found")
            if _utf16_len(text) > MESSAGE_MAX_CHARS:
                raise ApiError(400, "Bad Request: message is too long")
            if message.get("text") == text:
                raise ApiError(400, "Bad Request: message is not modified: specified new "
                                    "message content and reply markup are exactly the same "
                                    "as a current content and reply markup of the message")
            message["text"] = text
            message["edit_date"] = int(time.time())
            return message
