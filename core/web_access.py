"""Sign-in links for the web pages: signed, expiring, one-time, bound to a person and a community.

``/web`` in a chat answers the asker privately with such a link (:func:`mint_signin`); the web
server redeems it once (:func:`redeem_signin`) and keeps the :class:`Grant` in a signed session
cookie. The signature (itsdangerous, with a timestamp) makes the link unforgeable and expiring;
the nonce row in ``web_sign_ins`` makes it work once. Admin rights are the platform's, as the
adapter saw them on the ``/web`` command's actor (Discord: Manage Server; Telegram: chat admin).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy import update

from core.errors import UserInputError
from core.settings import Settings
from core.store import Store, WebSignIn, rows_changed, utcnow

__all__ = ["Grant", "SignInError", "mint_signin", "redeem_signin", "web_secret"]

SIGNIN_SALT = "musespark.web.sign-in"
SECRET_FILE = "web-secret"
NONCE_BYTES = 18


class SignInError(UserInputError):
    """A sign-in link that cannot be used: its ``user_message`` says why and what to do."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What a redeemed link lets its holder see: one community, as one person."""

    user_id: int
    community_id: int
    admin: bool

    def to_dict(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "community_id": self.community_id, "admin": self.admin}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Grant:
        return cls(int(data["user_id"]), int(data["community_id"]), bool(data["admin"]))


def web_secret(settings: Settings) -> str:
    """``MUSESPARK_WEB_SECRET``, else a random one kept in the data dir (mode 0600), so that the
    bot process that mints links and a separate ``musespark web`` on the same data dir agree."""
    if settings.web_secret is not None:
        return settings.web_secret.get_secret_value()
    path: Path = settings.resolved_data_dir / SECRET_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_text().strip()
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def _serializer(settings: Settings) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(web_secret(settings), salt=SIGNIN_SALT)


def mint_signin(store: Store, settings: Settings, *, user_id: int, community_id: int,
                admin: bool) -> str:
    """A new one-time sign-in URL for ``user_id`` into ``community_id``."""
    nonce = secrets.token_urlsafe(NONCE_BYTES)
    with store.session() as s:
        s.add(WebSignIn(nonce=nonce, user_id=user_id, community_id=community_id, admin=admin,
                        created_at=utcnow(), used_at=None))
    token = _serializer(settings).dumps({"n": nonce, "c": community_id})
    return f"{settings.resolved_web_url}/c/{community_id}/signin/{token}"


def redeem_signin(store: Store, settings: Settings, community_id: int, token: str) -> Grant:
    """Use a sign-in link once. Raises :class:`SignInError` (expired, forged, used, or made
    for another community); a link shown at the wrong community is not used up."""
    again = "Send /web in your chat for a new link."
    try:
        data = _serializer(settings).loads(token, max_age=round(settings.web_signin_ttl_seconds))
    except SignatureExpired:
        raise SignInError(f"This sign-in link has expired. {again}") from None
    except BadSignature:
        raise SignInError(f"This sign-in link is not valid. {again}") from None
    if not isinstance(data, dict) or data.get("c") != community_id:
        raise SignInError("This sign-in link is for another community; it opens only the "
                          "community where you sent /web.")
    with store.session() as s:
        used = rows_changed(s.execute(
            update(WebSignIn).where(WebSignIn.nonce == str(data.get("n")),
                                    WebSignIn.used_at.is_(None))
            .values(used_at=utcnow())))
        row = s.get(WebSignIn, str(data.get("n"))) if used else None
        if row is None:
            raise SignInError(f"This sign-in link was already used. {again}")
        return Grant(row.user_id, row.community_id, row.admin)
