"""The web pages: a Starlette app around the same orchestrator and store as the chat adapters.

* ``/`` the **playground**: the local chat in a browser. Each tab opened at ``/`` is a new
  person of the machine's local community, the terminal chat's, kept in the tab's address
  (``?as=``) and listed in the browser's signed session cookie (a person no cookie lists
  cannot be spoken for); what they type goes through
  :class:`bots.console.ConsoleChat`, exactly as in the terminal (commands, free text,
  ``/react``, ``/press``, ``/reply``), and results arrive by server-sent events
  (:mod:`bots.web._live`). Open only while the server is bound to a loopback address.
* ``/c/ID/gallery``, ``/c/ID/piece/JOB``, ``/c/ID/dashboard``: one community's results, taste
  and queue. The local community is open with the playground; any other needs a grant from a
  ``/web`` sign-in link (core/web_access.py), kept in the signed session cookie. A community
  the viewer holds no grant for answers 404, as one that does not exist.

No generation logic here: requests, reactions, presses and settings become core events handed
to ``Orchestrator.handle``; everything shown is read from the store (core/gallery.py).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import pass_context
from markupsafe import Markup
from PIL import Image
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from bots.console import ConsoleChat
from bots.runtime import BotRuntime
from bots.web._live import LiveHub
from bots.web._plots import line_plot, series_for
from core import actions, gallery, taste
from core.events import Actor, Channel, ChannelKind, CommandInvoked
from core.store import Artifact, Job, LocalMessage
from core.web_access import Grant, SignInError, redeem_signin, web_secret

__all__ = ["PLAYGROUND_COMMUNITY", "create_app"]

HERE = Path(__file__).resolve().parent
#: The terminal chat's community (bots/console): the playground's tabs join it.
PLAYGROUND_COMMUNITY = "local"
PLATFORM = "local"
SESSION_COOKIE = "musespark_session"
SESSION_MAX_AGE_SECONDS = 7 * 24 * 3600
#: Playground people one browser keeps (each tab opened at / is a new one).
PEOPLE_PER_BROWSER = 20
#: Messages of the chat a page shows when it opens (older ones stay in the store).
HISTORY_MESSAGES = 60
REACTIONS = ("👍", "❤️", "🔥", "👎")
THUMB_SIDE_PX = 256
THUMBS_FOLDER = "thumbs"
#: Artifacts never change (a new result is a new file), so browsers may keep them for a year;
#: ``private``: they are only for signed-in viewers, never for a shared cache.
IMMUTABLE = "private, max-age=31536000, immutable"
PER_PAGE = 24
DIMENSIONS = {"image": ("style", "guidance", "aspect", "steps", "variation"),
              "text": ("tone", "form", "length")}
DRIVERS_SHOWN = 12


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who looks at a community, and what they may do there."""

    user_id: int
    community_id: int
    admin: bool
    #: The loopback playground's person (their chat is ``chat``).
    chat: ConsoleChat | None = None


class WebApp:
    """The routes, bound to one runtime."""

    def __init__(self, runtime: BotRuntime, *, playground: bool) -> None:
        self.runtime = runtime
        self.store = runtime.store
        self.orchestrator = runtime.orchestrator
        self.settings = runtime.settings
        self.playground = playground
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.globals.update(label=actions.label, reactions=REACTIONS,
                                          wp=_with_person)
        self.hub = LiveHub(self.store, self._render_new, self._render_progress)
        self._local_community: int | None = None

    # -- who is looking ---------------------------------------------------------------------------

    @property
    def local_community(self) -> int:
        if self._local_community is None:
            self._local_community = self.store.ensure_community(
                PLATFORM, Channel(PLAYGROUND_COMMUNITY, ChannelKind.GROUP,
                                  guild_id=PLAYGROUND_COMMUNITY))
        return self._local_community

    @staticmethod
    def _people(request: Request) -> list[str]:
        people = request.session.get("people")
        return [p for p in people if isinstance(p, str)] if isinstance(people, list) else []

    def _new_person(self, request: Request) -> str:
        sid = secrets.token_hex(8)
        request.session["people"] = [*self._people(request), sid][-PEOPLE_PER_BROWSER:]
        return sid

    def _person(self, request: Request, form: FormData | None = None) -> str | None:
        """The playground person this tab speaks as (``as``), if this browser made them."""
        sid = _field(form, "as") if form is not None else request.query_params.get("as", "")
        return sid if sid in self._people(request) else None

    def _chat_of(self, sid: str) -> ConsoleChat:
        actor = Actor(f"web-{sid}", f"Guest {sid[:4]}", is_admin=True)
        return ConsoleChat(self.orchestrator, self.store, chat_id=f"web-{sid}", user=actor,
                           community=PLAYGROUND_COMMUNITY)

    def _playground_chat(self, request: Request, form: FormData | None = None) -> ConsoleChat:
        if not self.playground:
            raise HTTPException(404, "The playground is open only on a loopback address.")
        sid = self._person(request, form)
        if sid is None:
            raise HTTPException(404, "Open the playground again: this tab's person is unknown "
                                     "to this browser.")
        return self._chat_of(sid)

    def _viewer(self, request: Request, community_id: int,
                form: FormData | None = None) -> Viewer:
        if self.playground and community_id == self.local_community:
            people = self._people(request)
            sid = self._person(request, form) or (people[-1] if people
                                                  else self._new_person(request))
            chat = self._chat_of(sid)
            user = self.store.ensure_user(PLATFORM, chat.user)
            return Viewer(user, community_id, True, chat)
        grants = request.session.get("grants") or {}
        found = grants.get(str(community_id)) if isinstance(grants, dict) else None
        if found:
            grant = Grant.from_dict(found)
            return Viewer(grant.user_id, grant.community_id, grant.admin)
        raise HTTPException(404, "Nothing here, or you are not signed in to this community: "
                                 "send /web in its chat for a sign-in link.")

    def _check_access(self, request: Request, community_id: int) -> None:
        """404 unless this browser may see ``community_id`` (the open local one, or granted)."""
        if self.playground and community_id == self.local_community:
            return
        grants = request.session.get("grants") or {}
        if not (isinstance(grants, dict) and grants.get(str(community_id))):
            raise HTTPException(404, "Nothing here, or you are not signed in to this "
                                     "community: send /web in its chat for a sign-in link.")

    def _base(self, request: Request, page: str, community_id: int | None,
              viewer: Viewer | None = None) -> dict[str, Any]:
        who = viewer.chat.user.display_name if viewer and viewer.chat else (
            self._name(viewer.user_id) if viewer else "")
        sid = viewer.chat.chat_id.removeprefix("web-") if viewer and viewer.chat else None
        return {"request": request, "page": page, "community_id": community_id,
                "playground": self.playground, "who": who, "sid": sid}

    def _name(self, user_id: int) -> str:
        from core.store import User

        with self.store.session() as s:
            user = s.get(User, user_id)
            return (user.display_name or f"person {user_id}") if user else ""

    # -- the playground ---------------------------------------------------------------------------

    async def playground_page(self, request: Request) -> Response:
        if not self.playground:
            return self.templates.TemplateResponse(request, "notice.html", {
                **self._base(request, "home", None), "heading": "MuseSpark",
                "text": "Send /web in your Discord or Telegram chat for a private link to your "
                        "community's gallery and dashboard.", "error": False})
        sid = self._person(request)
        if sid is None:  # a new tab: a new person, whose address the tab keeps
            return RedirectResponse(f"/?as={self._new_person(request)}", status_code=303)
        chat = self._chat_of(sid)
        rows = await asyncio.to_thread(self._history, chat.chat_id)
        context = await asyncio.to_thread(self._message_context, chat.chat_id, rows)
        return self.templates.TemplateResponse(request, "playground.html", {
            **self._base(request, "playground", self.local_community),
            "messages": rows, "last_id": rows[-1].id if rows else self._last_id(),
            "who": chat.user.display_name, "sid": sid, **context})

    def _history(self, chat_id: str) -> list[LocalMessage]:
        rows = list(self.store.local_messages_after(chat_id, 0))
        return rows[-HISTORY_MESSAGES:]

    def _last_id(self) -> int:
        from sqlalchemy import func, select

        with self.store.session() as s:
            return int(s.scalar(select(func.max(LocalMessage.id))) or 0)

    def _message_context(self, chat_id: str, rows: Sequence[LocalMessage]) -> dict[str, Any]:
        """What messages need besides their rows: alt texts (the prompts) and progress lines."""
        job_ids = {r.job_id for r in rows if r.job_id}
        alts: dict[str, str] = {}
        if job_ids:
            with self.store.session() as s:
                for job in s.query(Job).filter(Job.id.in_(job_ids)).all():
                    alts[job.id] = _alt(job)
        shown: dict[str, str] = {}
        for row in rows:
            if row.kind == "status" and row.job_id:
                now = gallery.progress(self.store, row.job_id)
                if now is not None:
                    shown[row.job_id] = now.describe(_kind_of(self.store, row.job_id))
        return {"alts": alts, "progress": shown, "me": chat_id,
                "sid": chat_id.removeprefix("web-")}

    def _render_new(self, chat_id: str, rows: Sequence[LocalMessage]) -> str:
        context = self._message_context(chat_id, rows)
        template = self.templates.get_template("_message.html")
        return "".join(template.render(m=row, **context) for row in rows)

    @staticmethod
    def _render_progress(job_id: str, text: str) -> str:
        return str(Markup('<span id="state-{}" hx-swap-oob="true">{}</span>').format(
            job_id, text))

    async def events(self, request: Request) -> Response:
        chat = self._playground_chat(request)
        last = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
        after = int(last) if last.isdigit() else 0
        watch = await asyncio.to_thread(self._open_requests, chat.chat_id)
        return StreamingResponse(self.hub.stream(chat.chat_id, after, watch),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})

    def _open_requests(self, chat_id: str) -> dict[str, str]:
        """Progress lines a reopened page shows that may still change."""
        rows = self._history(chat_id)
        out = {}
        for row in rows:
            if row.kind == "status" and row.job_id:
                now = gallery.progress(self.store, row.job_id)
                if now is not None and now.state not in ("delivered", "failed"):
                    out[row.job_id] = ""
        return out

    async def say(self, request: Request) -> Response:
        form = await request.form()
        chat = self._playground_chat(request, form)
        text = _field(form, "text").strip()
        if not text:
            return Response("Type something first.", status_code=422)
        await asyncio.to_thread(chat.say, text)
        return Response(status_code=204)

    async def react(self, request: Request) -> Response:
        form = await request.form()
        chat = self._playground_chat(request, form)
        number, emoji = _field(form, "message"), _field(form, "emoji")
        if not number.isdigit() or not emoji:
            return Response("A reaction needs a message number and an emoji.", status_code=422)
        await asyncio.to_thread(chat.react, int(number), emoji,
                                remove=_field(form, "remove") == "1")
        return Response(status_code=204)

    async def press(self, request: Request) -> Response:
        form = await request.form()
        chat = self._playground_chat(request, form)
        number, action = _field(form, "message"), _field(form, "action")
        if not number.isdigit() or not actions.is_action(action):
            return Response("A button press needs a message number and a known button.",
                            status_code=422)
        await asyncio.to_thread(chat.say, f"/press {number} {action}")
        return Response(status_code=204)

    async def chat_image(self, request: Request) -> Response:
        chat = self._playground_chat(request)
        number = int(request.path_params["message"])
        index = int(request.path_params["index"])
        row = await asyncio.to_thread(self.store.local_message, number)
        images = list((row.attachments or {}).get("images", ())) if row else []
        if row is None or row.chat_id != chat.chat_id or not 0 <= index < len(images):
            raise HTTPException(404, "No such picture in your chat.")
        path = Path(images[index])
        if not path.is_file():
            raise HTTPException(404, "That picture is gone (erased or moved).")
        return FileResponse(path, headers={"Cache-Control": IMMUTABLE})

    # -- the gallery ------------------------------------------------------------------------------

    async def gallery_page(self, request: Request) -> Response:
        community_id = int(request.path_params["community"])
        viewer = self._viewer(request, community_id)
        q = request.query_params
        person = int(q["person"]) if q.get("person", "").isdigit() else None
        style = q.get("style") or None
        kind = q.get("kind") if q.get("kind") in gallery.GALLERY_KINDS else None
        liked = q.get("liked") == "1"
        page = int(q["page"]) if q.get("page", "").isdigit() else 1

        def read() -> dict[str, Any]:
            pieces, more = gallery.gallery(self.store, community_id, person=person,
                                           style=style, kind=kind, liked=liked, page=page,
                                           per_page=PER_PAGE)
            return {"pieces": pieces, "more": more,
                    "people": gallery.community_people(self.store, community_id),
                    "styles": gallery.community_styles(self.store, community_id)}

        data = await asyncio.to_thread(read)
        filters = {"person": person, "style": style or "", "kind": kind or "", "liked": liked}
        return self.templates.TemplateResponse(request, "gallery.html", {
            **self._base(request, "gallery", community_id, viewer), **data,
            "filters": filters, "kinds": list(gallery.GALLERY_KINDS), "page_number": page,
            "query": _query({**filters, "as": viewer.chat.chat_id.removeprefix("web-")
                             if viewer.chat else None})})

    async def piece_page(self, request: Request) -> Response:
        community_id = int(request.path_params["community"])
        viewer = self._viewer(request, community_id)
        found = await asyncio.to_thread(gallery.piece, self.store, request.path_params["job"])
        if found is None or found[0].root.community_id != community_id:
            raise HTTPException(404, "No such result in this community.")
        shown, job = found
        return self.templates.TemplateResponse(request, "piece.html", {
            **self._base(request, "gallery", community_id, viewer), "piece": shown,
            "focus": job.id, "recipes": {a.id: _recipe_rows(a, p.job) for p in shown.parts
                                         for a in p.pictures}})

    async def artifact(self, request: Request) -> Response:
        artifact, path = await asyncio.to_thread(self._artifact_for, request)
        size = "thumb" if request.url.path.endswith("/thumb") else "full"
        if size == "thumb":
            path = await asyncio.to_thread(self._thumbnail, artifact, path)
        etag = f'"{artifact.content_hash[:32]}-{size}"'
        headers = {"Cache-Control": IMMUTABLE, "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return FileResponse(path, headers=headers, stat_result=os.stat(path))

    def _artifact_for(self, request: Request) -> tuple[Artifact, Path]:
        with self.store.session() as s:
            artifact = s.get(Artifact, int(request.path_params["artifact"]))
            job = s.get(Job, artifact.job_id) if artifact is not None else None
        if artifact is None or job is None or job.community_id is None \
                or artifact.kind != "image" or not artifact.path:
            raise HTTPException(404, "No such picture.")
        self._check_access(request, job.community_id)
        path = Path(artifact.path)
        if not path.is_file():
            raise HTTPException(404, "That picture is gone (erased or moved).")
        return artifact, path

    def _thumbnail(self, artifact: Artifact, source: Path) -> Path:
        """The artifact's thumbnail, made once (named by content hash) and kept."""
        folder = self.settings.resolved_data_dir / THUMBS_FOLDER
        target = folder / f"{artifact.content_hash}-{THUMB_SIDE_PX}.webp"
        if target.is_file():
            return target
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{target.name}.{uuid.uuid4().hex}"
        with Image.open(source) as image:
            image.thumbnail((THUMB_SIDE_PX, THUMB_SIDE_PX))
            image.save(partial, "WEBP", quality=85)
        os.replace(partial, target)  # atomic: a concurrent request sees it whole or not at all
        return target

    # -- the dashboard ----------------------------------------------------------------------------

    async def dashboard_page(self, request: Request, notice: str = "",
                             notice_error: bool = False,
                             form: FormData | None = None) -> Response:
        community_id = int(request.path_params["community"])
        viewer = self._viewer(request, community_id, form)
        data = await asyncio.to_thread(self._dashboard, viewer)
        return self.templates.TemplateResponse(request, "dashboard.html", {
            **self._base(request, "dashboard", community_id, viewer), **data,
            "admin": viewer.admin, "notice": notice, "notice_error": notice_error})

    def _dashboard(self, viewer: Viewer) -> dict[str, Any]:
        service = self.orchestrator.taste
        person = service.person_of(viewer.user_id)
        plots: dict[str, list[tuple[str, Markup]]] = {"community": [], "person": []}
        drivers: dict[str, list[dict[str, Any]]] = {"community": [], "person": []}
        for subject, subject_id in (("community", viewer.community_id), ("person", person)):
            for kind in ("image", "text"):
                timeline = service.timeline(subject, subject_id, kind)
                if not timeline and kind == "text":
                    continue
                snapshots = [stats for _, _, stats in timeline]
                for dim in DIMENSIONS[kind]:
                    lines = series_for(kind, dim, snapshots)
                    if not lines and dim not in ("style", "tone"):
                        continue
                    title = f"{'Pictures' if kind == 'image' else 'Texts'}: {dim}"
                    plots[subject].append((title, Markup(line_plot(
                        title, lines, plot_id=f"plot-{subject}-{kind}-{dim}"))))
                for row, job, _ in timeline[-DRIVERS_SHOWN:]:
                    drivers[subject].append({
                        "at": row.created_at, "what": row.value, "how": row.kind,
                        "weight": row.weight, "prompt": job.prompt, "job": job.id,
                        "style": (job.params.get("taste") or {}).get("choice", {}).get("style")
                        or (job.params.get("taste") or {}).get("choice", {}).get("tone", "")})
            drivers[subject].sort(key=lambda d: d["at"], reverse=True)
        found = gallery.community(self.store, viewer.community_id)
        overrides = dict(((found.settings if found else None) or {}).get("emoji") or {})
        meanings = [(e, taste.emoji_meaning(e, overrides)) for e in
                    dict.fromkeys([*taste.DEFAULT_EMOJI_MEANINGS, *overrides])]
        return {"plots": plots, "drivers": drivers,
                "queue": gallery.queue_now(self.store, datetime.now(UTC)),
                "meanings": meanings, "opted_out": service.opted_out(viewer.user_id)}

    async def settings_post(self, request: Request) -> Response:
        """Admins' community settings and the viewer's own: the chat's /settings command,
        through the same core call (so the same rules and answers)."""
        community_id = int(request.path_params["community"])
        form = await request.form()
        viewer = self._viewer(request, community_id, form)
        if _field(form, "emoji"):
            words = f"emoji {_field(form, 'emoji').strip()} {_field(form, 'meaning')}"
        else:
            words = _field(form, "command").strip().removeprefix("/settings").strip()
        replies = await asyncio.to_thread(self._settings_command, viewer, words)
        text = " ".join(r.text for r in replies) or "Nothing changed."
        error = any(r.kind.value == "error" for r in replies)
        return await self.dashboard_page(request, notice=text, notice_error=error, form=form)

    def _settings_command(self, viewer: Viewer, words: str) -> list[Any]:
        from core.store import Community, User

        with self.store.session() as s:
            user = s.get(User, viewer.user_id)
            community = s.get(Community, viewer.community_id)
        if user is None or community is None:
            raise HTTPException(404, "That community is gone.")
        actor = Actor(user.platform_user_id, user.display_name, is_admin=viewer.admin)
        place = community.platform_community_id
        channel = (Channel(place, ChannelKind.GUILD_CHANNEL, guild_id=place)
                   if community.platform == "discord" else
                   Channel(f"web-{place}", ChannelKind.GROUP, guild_id=place)
                   if community.platform == PLATFORM else Channel(place, ChannelKind.GROUP))
        event = CommandInvoked(platform=community.platform, event_id=f"web:{uuid.uuid4().hex}",
                               actor=actor, channel=channel, name="settings",
                               args={"prompt": words})
        return self.orchestrator.handle(event)

    # -- signing in -------------------------------------------------------------------------------

    async def signin(self, request: Request) -> Response:
        community_id = int(request.path_params["community"])
        try:
            grant = await asyncio.to_thread(redeem_signin, self.store, self.settings,
                                            community_id, request.path_params["token"])
        except SignInError as exc:
            return self.templates.TemplateResponse(request, "notice.html", {
                **self._base(request, "signin", None), "heading": "Sign-in refused",
                "text": exc.user_message, "error": True}, status_code=403)
        grants = dict(request.session.get("grants") or {})
        grants[str(grant.community_id)] = grant.to_dict()
        request.session["grants"] = grants
        return RedirectResponse(f"/c/{grant.community_id}/gallery", status_code=303)

    async def not_found(self, request: Request, exc: Exception) -> Response:
        detail = exc.detail if isinstance(exc, HTTPException) else "Not found."
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        return self.templates.TemplateResponse(request, "notice.html", {
            **self._base(request, "error", None), "heading": "Not here",
            "text": detail, "error": True}, status_code=status)


@pass_context
def _with_person(context: Any, path: str) -> str:
    """``path`` for the playground person the page is for (``?as=``), so links keep them."""
    sid = context.get("sid")
    if not sid:
        return path
    base, hash_mark, fragment = path.partition("#")
    joiner = "&" if "?" in base else "?"
    return f"{base}{joiner}as={sid}{hash_mark}{fragment}"


def _field(form: FormData, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def _query(filters: dict[str, Any]) -> str:
    from urllib.parse import urlencode

    return urlencode({k: ("1" if v is True else v) for k, v in filters.items()
                      if v not in (None, "", False)})


def _alt(job: Job) -> str:
    """A picture's alt text: what was asked for, and in which style."""
    style = ((job.params.get("taste") or {}).get("choice") or {}).get("style")
    return f"{job.prompt} ({style})" if style else job.prompt


def _kind_of(store: Any, job_id: str) -> str:
    job = store.get_job(job_id)
    return str(job.kind) if job is not None else "image"


def _recipe_rows(artifact: Artifact, job: Job) -> list[tuple[str, str]]:
    """The recipe and provenance fields a picture page lists."""
    recipe = dict(artifact.recipe or {})
    rows = [("job", job.id), ("prompt", job.prompt), ("prompt the model saw", job.expanded_prompt),
            ("seed", str(recipe.get("seed", job.seed))), ("model", str(recipe.get("model") or job.model)),
            ("made", job.finished_at.isoformat(timespec="seconds") if job.finished_at else ""),
            ("sha256", artifact.content_hash)]
    for key in sorted(recipe):
        if key not in ("seed", "model", "prompt", "job_id", "expanded_prompt"):
            rows.append((key, _short(recipe[key])))
    return rows


def _short(value: Any, limit: int = 300) -> str:
    import json

    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False,
                                                           sort_keys=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def create_app(runtime: BotRuntime, *, playground: bool = True,
               allowed_hosts: Sequence[str] | None = None) -> Starlette:
    """The ASGI app. ``playground``: serve the open local playground (loopback only)."""
    web = WebApp(runtime, playground=playground)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        web.hub.start()
        try:
            yield
        finally:
            await web.hub.close()

    # Behind an HTTPS address the session cookie (a sign-in) never travels in clear.
    secure = runtime.settings.resolved_web_url.startswith("https://")
    middleware = [Middleware(SessionMiddleware, secret_key=web_secret(runtime.settings),
                             session_cookie=SESSION_COOKIE, max_age=SESSION_MAX_AGE_SECONDS,
                             same_site="lax", https_only=secure)]
    if allowed_hosts:
        # A page on another site that resolves its own name to 127.0.0.1 (DNS rebinding)
        # must not reach the open playground.
        middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)))
    routes = [
        Route("/", web.playground_page),
        Route("/events", web.events),
        Route("/say", web.say, methods=["POST"]),
        Route("/react", web.react, methods=["POST"]),
        Route("/press", web.press, methods=["POST"]),
        Route("/chat/image/{message:int}/{index:int}", web.chat_image),
        Route("/c/{community:int}/gallery", web.gallery_page),
        Route("/c/{community:int}/piece/{job}", web.piece_page),
        Route("/c/{community:int}/dashboard", web.dashboard_page),
        Route("/c/{community:int}/settings", web.settings_post, methods=["POST"]),
        Route("/c/{community:int}/signin/{token}", web.signin),
        Route("/a/{artifact:int}", web.artifact),
        Route("/a/{artifact:int}/thumb", web.artifact),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: web.not_found})
    app.state.web = web
    return app
