"""A local fake of the Discord REST API (v10), over real HTTP on 127.0.0.1, for tests.

It answers what MuseSpark uses, with JSON shaped like Discord's (discord.py parses it): logins
(``/users/@me``, ``/oauth2/applications/@me``), interaction callbacks, follow-up webhooks and
``@original`` edits, channel messages, deletions, command sync, and the channel, guild and
member lookups of ``musespark doctor discord``. Every request is recorded in :attr:`calls`.
It also stands in for the CDN: :meth:`attachment` serves bytes at an attachment's URL.

It can be told to misbehave the way Discord does:

* :meth:`rate_limit_next`: a 429 with ``Via``, ``X-RateLimit-*`` headers and ``retry_after``;
* :meth:`expire_token`: an interaction token past its 15 minutes (401, code 50027);
* :meth:`fail_next`: any status and body, once, for a method and path pattern;
* :meth:`stall_next`: the next matching request is carried out, but its answer held back for a
  while (a test can kill the client while the request is in flight).

Channel message creates honour ``nonce`` with ``enforce_nonce`` as Discord does: a nonce seen
before answers with the message it made (no new one); one whose message was deleted, 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web

API_PREFIX = "/api/v10"
#: Where :meth:`FakeDiscord.attachment` serves uploaded files (Discord: cdn.discordapp.com).
CDN_PREFIX = "/attachments"
DISCORD_EPOCH_MS = 1420070400000
BOT_TOKEN = "fake-bot-token.MuseSpark.test"
APPLICATION_ID = "1100000000000000001"  # modern apps: the bot user has the application's id


def snowflake(counter: itertools.count[int] = itertools.count(1)) -> str:
    """A fresh, time-ordered Discord id."""
    return str(((int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22) | (next(counter) & 0x3FFFFF))


def iso_now() -> str:
    return datetime.now(UTC).isoformat()


def user_payload(user_id: str, name: str, *, bot: bool = False) -> dict[str, Any]:
    return {"id": user_id, "username": name, "discriminator": "0", "global_name": name,
            "avatar": None, "bot": bot, "public_flags": 0}


@dataclass
class Call:
    method: str
    path: str  # without the /api/v10 prefix
    query: dict[str, str]
    headers: dict[str, str]
    json: dict[str, Any] | None = None
    files: list[dict[str, Any]] = field(default_factory=list)  # name, filename, size, type, data
    status: int = 0
    at: float = field(default_factory=time.monotonic)  # when the request arrived


@dataclass
class _Failure:
    method: str
    pattern: re.Pattern[str]
    status: int
    body: Any
    headers: dict[str, str]
    times: int


class FakeDiscord:
    """Start with ``with FakeDiscord() as fake:``; ``fake.api_url`` is the REST base URL."""

    def __init__(self) -> None:
        self.bot_user = user_payload(APPLICATION_ID, "MuseSpark", bot=True)
        self.application: dict[str, Any] = {
            "id": APPLICATION_ID, "name": "MuseSpark", "icon": None, "description": "",
            "rpc_origins": [], "bot_public": True, "bot_require_code_grant": False,
            "owner": user_payload("1100000000000000099", "owner"), "team": None,
            "verify_key": "0" * 64, "flags": 0, "summary": "", "tags": [],
            "interactions_endpoint_url": None, "bot": self.bot_user,
        }
        self.calls: list[Call] = []
        self.messages: dict[str, dict[str, Any]] = {}
        #: interaction token -> id of its @original message (made by the callback)
        self.originals: dict[str, str] = {}
        #: interaction token -> channel id (from the callback's interaction)
        self.token_channels: dict[str, str] = {}
        #: interaction token -> interaction id (messages made for it carry
        #: ``interaction_metadata`` with that id, as Discord's do)
        self.token_interactions: dict[str, str] = {}
        self.expired_tokens: set[str] = set()
        self.channels: dict[str, dict[str, Any]] = {}
        self.guilds: dict[str, dict[str, Any]] = {}
        self.members: dict[tuple[str, str], dict[str, Any]] = {}
        self.commands: dict[str, list[dict[str, Any]]] = {}
        #: attachment path under /attachments/ -> bytes served there (the CDN's part)
        self.cdn: dict[str, bytes] = {}
        self._failures: list[_Failure] = []
        #: (method, path pattern, where, seconds): answers to hold back (:meth:`stall_next`)
        self._stalls: list[tuple[str, re.Pattern[str], Callable[[Call], bool], float]] = []
        #: enforced nonce -> id of the channel message it made
        self.nonces: dict[str, str] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-discord",
                                        daemon=True)
        self.port = 0

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{API_PREFIX}"

    def __enter__(self) -> FakeDiscord:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", API_PREFIX + "/{tail:.*}", self._handle)
        app.router.add_get(CDN_PREFIX + "/{tail:.*}", self._serve_attachment)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    # -- test controls ------------------------------------------------------------------------

    def fail_next(self, method: str, pattern: str, status: int, body: Any,
                  headers: dict[str, str] | None = None, times: int = 1) -> None:
        with self._lock:
            self._failures.append(_Failure(method, re.compile(pattern), status, body,
                                           headers or {}, times))

    def rate_limit_next(self, method: str, pattern: str, retry_after: float, *,
                        is_global: bool = False) -> None:
        """The next matching request gets a 429 the way Discord sends it (with ``Via``)."""
        self.fail_next(method, pattern, 429,
                       {"message": "You are being rate limited.", "retry_after": retry_after,
                        "global": is_global, "code": 0},
                       {"Via": "1.1 google", "Retry-After": str(max(1, round(retry_after))),
                        "X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "0",
                        "X-RateLimit-Reset-After": f"{retry_after:.3f}",
                        "X-RateLimit-Bucket": "fake-bucket-1",
                        "X-RateLimit-Scope": "global" if is_global else "user"})

    def expire_token(self, token: str) -> None:
        self.expired_tokens.add(token)

    def stall_next(self, method: str, pattern: str, seconds: float, *,
                   where: Callable[[Call], bool] | None = None) -> None:
        """Carry out the next matching request (``where`` narrows the match, e.g. to a
        message's content), then wait ``seconds`` before answering it."""
        with self._lock:
            self._stalls.append((method, re.compile(pattern), where or (lambda call: True),
                                 seconds))

    def attachment(self, filename: str, data: bytes, content_type: str | None = "image/png", *,
                   size: int | None = None) -> dict[str, Any]:
        """An attachment object (as in an interaction's ``resolved.attachments``) whose URL
        this fake serves. ``size`` may claim more than ``data`` holds (an oversized upload)."""
        attachment_id = snowflake()
        path = f"{attachment_id}/{filename}"
        self.cdn[path] = data
        url = f"http://127.0.0.1:{self.port}{CDN_PREFIX}/{path}"
        return {"id": attachment_id, "filename": filename,
                "size": len(data) if size is None else size, "url": url, "proxy_url": url,
                **({"content_type": content_type} if content_type else {}),
                "ephemeral": True}

    def calls_to(self, method: str, pattern: str) -> list[Call]:
        regex = re.compile(pattern)
        with self._lock:
            return [c for c in self.calls if c.method == method and regex.search(c.path)]

    def wait_for(self, method: str, pattern: str, count: int = 1,
                 timeout: float = 120) -> list[Call]:
        deadline = time.monotonic() + timeout
        while True:
            found = [c for c in self.calls_to(method, pattern) if 200 <= c.status < 300]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} x {method} {pattern} not seen; calls: "
                                   f"{[(c.method, c.path, c.status) for c in self.calls]}")
            time.sleep(0.05)

    def add_message(self, channel_id: str, author: dict[str, Any], content: str = "",
                    components: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        message = self._message(channel_id, author, {"content": content,
                                                     "components": components or []})
        return message

    # -- serving ------------------------------------------------------------------------------

    async def _serve_attachment(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["tail"]
        with self._lock:
            self.calls.append(Call("GET", CDN_PREFIX + "/" + path, dict(request.query),
                                   dict(request.headers), status=200 if path in self.cdn else 404))
        if path not in self.cdn:
            return web.Response(status=404, text="Not Found")
        return web.Response(body=self.cdn[path], content_type="application/octet-stream")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        call = Call(request.method, path, dict(request.query), dict(request.headers))
        if request.content_type == "multipart/form-data":
            reader = await request.multipart()
            async for part in reader:
                data = await part.read()  # type: ignore[union-attr]
                if part.name == "payload_json":  # type: ignore[union-attr]
                    call.json = json.loads(data)
                else:
                    call.files.append({"name": part.name, "filename": part.filename,  # type: ignore[union-attr]
                                       "size": len(data), "type": part.headers.get("Content-Type"),  # type: ignore[union-attr]
                                       "data": bytes(data)})
        elif request.can_read_body:
            raw = await request.read()
            call.json = json.loads(raw) if raw else None
        with self._lock:
            self.calls.append(call)
        status, body, headers = self._answer(call)
        call.status = status
        with self._lock:
            stall = next((st for st in self._stalls if st[0] == call.method
                          and st[1].search(call.path) and st[2](call)), None)
            if stall is not None:
                self._stalls.remove(stall)
        if stall is not None:
            await asyncio.sleep(stall[3])
        if status == 204:
            return web.Response(status=204, headers=headers)
        # discord.py parses JSON only when Content-Type is exactly application/json.
        return web.Response(status=status, body=json.dumps(body).encode(),
                            headers={"Content-Type": "application/json", **headers})

    def _answer(self, call: Call) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            for failure in self._failures:
                if failure.method == call.method and failure.pattern.search(call.path):
                    failure.times -= 1
                    if failure.times <= 0:
                        self._failures.remove(failure)
                    return failure.status, failure.body, failure.headers
        parts = call.path.strip("/").split("/")
        auth_ok = call.headers.get("Authorization") == f"Bot {BOT_TOKEN}"
        unauthorized = (401, {"message": "401: Unauthorized", "code": 0}, {})
        match parts:
            case ["interactions", interaction_id, token, "callback"]:
                return self._callback(interaction_id, token, call)
            case ["webhooks", _app, token, *rest]:
                if token in self.expired_tokens:
                    return 401, {"message": "Invalid Webhook Token", "code": 50027}, {}
                return self._webhook(token, rest, call)
            case _ if not auth_ok:
                return unauthorized
            case ["users", "@me"]:
                return 200, self.bot_user, {}
            case ["oauth2", "applications", "@me"] | ["applications", "@me"]:
                return 200, self.application, {}
            case ["channels", channel_id, "messages"] if call.method == "POST":
                body = call.json or {}
                enforced = body.get("enforce_nonce") and body.get("nonce") is not None
                nonce = str(body["nonce"]) if enforced else None
                if nonce is not None and nonce in self.nonces:
                    first = self.messages.get(self.nonces[nonce])
                    if first is None:
                        return 404, {"message": "Unknown Message", "code": 10008}, {}
                    return 200, first, {}
                message = self._message(channel_id, self.bot_user, body, call.files)
                if nonce is not None:
                    message["nonce"] = nonce
                    self.nonces[nonce] = message["id"]
                return 200, message, {}
            case ["channels", channel_id, "messages"] if call.method == "GET":
                limit = int(call.query.get("limit", 50))
                with self._lock:
                    seen = [m for m in self.messages.values() if m["channel_id"] == channel_id
                            and not m.get("flags", 0) & 64]  # ephemeral ones are not listed
                return 200, sorted(seen, key=lambda m: int(m["id"]), reverse=True)[:limit], {}
            case ["channels", channel_id, "messages", message_id] if call.method == "DELETE":
                if self.messages.pop(message_id, None) is None:
                    return 404, {"message": "Unknown Message", "code": 10008}, {}
                return 204, None, {}
            case ["channels", channel_id] if call.method == "GET":
                if channel_id not in self.channels:
                    return 404, {"message": "Unknown Channel", "code": 10003}, {}
                return 200, self.channels[channel_id], {}
            case ["guilds", guild_id, "members", user_id]:
                member = self.members.get((guild_id, user_id))
                if member is None:
                    return 404, {"message": "Unknown Member", "code": 10007}, {}
                return 200, member, {}
            case ["guilds", guild_id, "roles"]:
                return 200, self.guilds.get(guild_id, {}).get("roles", []), {}
            case ["guilds", guild_id]:
                if guild_id not in self.guilds:
                    return 404, {"message": "Unknown Guild", "code": 10004}, {}
                return 200, self.guilds[guild_id], {}
            case ["applications", app_id, "commands"] | [
                    "applications", app_id, "guilds", _, "commands"] if call.method == "PUT":
                scope = parts[3] if len(parts) == 5 else "global"
                commands = [{**c, "id": snowflake(), "application_id": app_id, "version": "1",
                             "default_member_permissions": None, "type": c.get("type", 1),
                             **({"guild_id": scope} if scope != "global" else {})}
                            for c in (call.json or [])]  # type: ignore[union-attr]
                self.commands[scope] = commands
                return 200, commands, {}
        return 404, {"message": "404: Not Found", "code": 0}, {}

    def _message(self, channel_id: str, author: dict[str, Any], body: dict[str, Any],
                 files: list[dict[str, Any]] | None = None, *,
                 interaction_token: str | None = None) -> dict[str, Any]:
        message_id = snowflake()
        attachments = [{"id": snowflake(), "filename": f["filename"], "size": f["size"],
                        "url": f"https://cdn.example/{f['filename']}",
                        "proxy_url": f"https://media.example/{f['filename']}",
                        "content_type": f["type"]} for f in (files or [])]
        message = {
            "id": message_id, "channel_id": channel_id, "author": author,
            "content": body.get("content") or "", "timestamp": iso_now(),
            "edited_timestamp": None, "tts": False, "mention_everyone": False, "mentions": [],
            "mention_roles": [], "attachments": attachments, "embeds": [], "pinned": False,
            "type": 0, "flags": body.get("flags", 0), "components": body.get("components", []),
            "webhook_id": APPLICATION_ID if interaction_token else None,
        }
        interaction_id = self.token_interactions.get(interaction_token or "")
        if interaction_id:
            message["interaction_metadata"] = {"id": interaction_id, "type": 2,
                                               "user": self.bot_user}
        if body.get("message_reference"):
            message["message_reference"] = {"channel_id": channel_id,
                                            **body["message_reference"]}
            message["type"] = 19
        with self._lock:
            self.messages[message_id] = message
        return message

    def _callback(self, interaction_id: str, token: str, call: Call) -> tuple[int, Any, dict[str, str]]:
        body = call.json or {}
        kind = body.get("type")
        data = body.get("data") or {}
        channel_id = self.token_channels.get(token, "0")
        interaction: dict[str, Any] = {"id": interaction_id, "type": 2,
                                       "response_message_loading": kind == 5,
                                       "response_message_ephemeral": bool(
                                           data.get("flags", 0) & 64)}
        resource: dict[str, Any] = {"type": kind}
        if kind in (4, 5):
            message = self._message(channel_id, self.bot_user,
                                    {"content": data.get("content", ""),
                                     "flags": data.get("flags", 0) | (128 if kind == 5 else 0),
                                     "components": data.get("components", [])},
                                    interaction_token=token)
            self.originals[token] = message["id"]
            interaction["response_message_id"] = message["id"]
            resource["message"] = message
        return 200, {"interaction": interaction, "resource": resource}, {}

    def _webhook(self, token: str, rest: list[str], call: Call) -> tuple[int, Any, dict[str, str]]:
        channel_id = self.token_channels.get(token, "0")
        if not rest and call.method == "POST":
            original = self.originals.get(token)
            body = call.json or {}
            if original and self.messages.get(original, {}).get("flags", 0) & 128:
                # The first follow-up after a "thinking" defer fills that message.
                message = self.messages[original]
                message.update(content=body.get("content", ""), flags=body.get("flags", 0),
                               components=body.get("components", []))
                return 200, message, {}
            return 200, self._message(channel_id, self.bot_user, body, call.files,
                                      interaction_token=token), {}
        if len(rest) == 2 and rest[0] == "messages":
            message_id = self.originals.get(token) if rest[1] == "@original" else rest[1]
            if message_id is None or message_id not in self.messages:
                return 404, {"message": "Unknown Message", "code": 10008}, {}
            if call.method == "DELETE":
                del self.messages[message_id]
                return 204, None, {}
            if call.method == "PATCH":
                message = self.messages[message_id]
                body = call.json or {}
                message["content"] = body.get("content", message["content"])
                message["flags"] = message.get("flags", 0) & ~128
                if "components" in body:
                    message["components"] = body["components"]
                message["edited_timestamp"] = iso_now()
                return 200, message, {}
            if call.method == "GET":
                return 200, self.messages[message_id], {}
        return 404, {"message": "404: Not Found", "code": 0}, {}


# -- gateway dispatches, shaped as Discord documents them --------------------------------------

GUILD_ID = "1200000000000000001"
CHANNEL_ID = "1300000000000000001"
ADMINISTRATOR_BITS = str(1 << 3)
EVERYDAY_BITS = str((1 << 10) | (1 << 11) | (1 << 6) | (1 << 16) | (1 << 31))
ATTACHMENT_SIZE_LIMIT = 10 * 1024 * 1024


def snowflake_at(seconds_ago: float) -> str:
    """An id whose embedded creation time lies ``seconds_ago`` in the past."""
    ms = int((time.time() - seconds_ago) * 1000) - DISCORD_EPOCH_MS
    return str((ms << 22) | 1)


def member_payload(user_id: str, name: str, permissions: str = EVERYDAY_BITS) -> dict[str, Any]:
    return {"user": user_payload(user_id, name), "roles": [], "joined_at": iso_now(),
            "flags": 0, "deaf": False, "mute": False, "nick": None, "avatar": None,
            "permissions": permissions, "pending": False}


def interaction_payload(fake: FakeDiscord, kind: int, data: dict[str, Any], *, user_id: str,
                        name: str = "someone", channel_id: str = CHANNEL_ID,
                        guild_id: str | None = GUILD_ID, message: dict[str, Any] | None = None,
                        interaction_id: str | None = None,
                        permissions: str = EVERYDAY_BITS, nsfw: bool = False) -> dict[str, Any]:
    """An INTERACTION_CREATE payload (type 2 command, 3 component, 4 autocomplete, 5 modal)."""
    token = f"itoken-{snowflake()}"
    fake.token_channels[token] = channel_id
    interaction_id = interaction_id or snowflake()
    fake.token_interactions[token] = interaction_id
    payload: dict[str, Any] = {
        "id": interaction_id, "application_id": APPLICATION_ID, "type": kind,
        "data": data, "token": token, "version": 1, "channel_id": channel_id,
        "channel": {"id": channel_id, "type": 0 if guild_id else 1, "name": "art",
                    "position": 0, "permission_overwrites": [], "nsfw": nsfw,
                    "parent_id": None, **({"guild_id": guild_id} if guild_id else {})},
        "app_permissions": EVERYDAY_BITS, "locale": "en-US", "entitlements": [],
        "attachment_size_limit": ATTACHMENT_SIZE_LIMIT,
        "authorizing_integration_owners": {"0": guild_id or "0"},
        "context": 0 if guild_id else 1,
    }
    if guild_id:
        payload["guild_id"] = guild_id
        payload["guild_locale"] = "en-US"
        payload["member"] = member_payload(user_id, name, permissions)
    else:
        payload["user"] = user_payload(user_id, name)
    if message is not None:
        payload["message"] = message
        # For a component interaction, @original is the message the component is on.
        fake.originals[token] = message["id"]
    return payload


def slash_payload(fake: FakeDiscord, command: str, options: dict[str, Any], *, user_id: str,
                  attachments: dict[str, dict[str, Any]] | None = None,
                  **kw: Any) -> dict[str, Any]:
    """A slash command; ``attachments`` maps an option name to an attachment object (from
    :meth:`FakeDiscord.attachment`): Discord sends its id as the value, the object resolved."""
    types = {str: 3, int: 4, bool: 5}
    data: dict[str, Any] = {
        "id": snowflake(), "name": command, "type": 1,
        "options": [{"name": k, "type": types[type(v)], "value": v} for k, v in options.items()]}
    if attachments:
        data["options"] += [{"name": k, "type": 11, "value": a["id"]}
                            for k, a in attachments.items()]
        data["resolved"] = {"attachments": {a["id"]: a for a in attachments.values()}}
    return interaction_payload(fake, 2, data, user_id=user_id, **kw)


def button_payload(fake: FakeDiscord, message: dict[str, Any], custom_id: str, *,
                   user_id: str, **kw: Any) -> dict[str, Any]:
    return interaction_payload(fake, 3, {"custom_id": custom_id, "component_type": 2},
                               user_id=user_id, message=message, **kw)


def modal_submit_payload(fake: FakeDiscord, modal: dict[str, Any], values: list[str], *,
                         user_id: str, message: dict[str, Any] | None = None,
                         **kw: Any) -> dict[str, Any]:
    """A MODAL_SUBMIT (type 5) for ``modal``, the ``data`` of a type 9 callback: its text
    inputs, in order, hold ``values``; ``message`` is the one whose button opened it."""
    inputs = iter(values)
    rows = [{"type": 1, "components": [{"type": 4, "custom_id": c["custom_id"],
                                        "value": next(inputs)} for c in row["components"]]}
            for row in modal["components"]]
    payload = interaction_payload(fake, 5, {"custom_id": modal["custom_id"], "components": rows},
                                  user_id=user_id, message=message, **kw)
    fake.originals.pop(payload["token"], None)  # its @original is made by its own callback
    return payload


def reaction_payload(message_id: str, user_id: str, emoji: dict[str, Any], *, add: bool = True,
                     author_id: str | None = APPLICATION_ID, channel_id: str = CHANNEL_ID,
                     guild_id: str | None = GUILD_ID) -> dict[str, Any]:
    """MESSAGE_REACTION_ADD / _REMOVE. Only the add event carries member and author."""
    payload: dict[str, Any] = {"user_id": user_id, "channel_id": channel_id,
                               "message_id": message_id, "emoji": emoji, "type": 0,
                               "burst": False}
    if guild_id:
        payload["guild_id"] = guild_id
    if add:
        payload["burst_colors"] = []
        if author_id:
            payload["message_author_id"] = author_id
        if guild_id:
            payload["member"] = member_payload(user_id, f"user{user_id[-3:]}")
    return payload


@contextlib.contextmanager
def serving() -> Iterator[FakeDiscord]:
    """A running fake that discord.py's REST client talks to; discord.py's base URL is put
    back afterwards (it is a class attribute, shared by every client in the process)."""
    import discord

    from bots.discord import use_api_url

    saved = discord.http.Route.BASE
    with FakeDiscord() as server:
        use_api_url(server.api_url)
        try:
            yield server
        finally:
            discord.http.Route.BASE = saved
