"""``musespark doctor discord``: check the bot's setup and say how to fix what is wrong.

Checks, in order: the token is valid (``GET /users/@me``); the gateway intents the bot asks
for are enabled for the application (only MESSAGE_CONTENT is privileged, and only the mention
mode asks for it); interactions reach the gateway (no interactions endpoint URL is set); and,
with ``--channel ID``, which of the permissions the bot needs are missing there, computed as
Discord does: @everyone, then the member's roles, Administrator and the server owner, then the
channel's overwrites (@everyone, roles, member). Threads inherit their parent's overwrites.
Prints an invite URL with exactly the permissions needed. Exit status 0 when all is well.
"""

from __future__ import annotations

import argparse
from typing import Any

import discord
import httpx

from bots.discord._setup import (
    APP_FLAG_MESSAGE_CONTENT,
    APP_FLAG_MESSAGE_CONTENT_LIMITED,
    REQUIRED_PERMISSIONS,
    invite_url,
    permission_names,
)
from core.settings import get_settings

__all__ = ["channel_permissions", "main"]

HTTP_TIMEOUT_SECONDS = 15.0
ADMINISTRATOR = 1 << 3
ALL_PERMISSIONS = (1 << 53) - 1
THREAD_TYPES = (10, 11, 12)


def channel_permissions(*, guild: dict[str, Any], member: dict[str, Any], user_id: str,
                        overwrites: list[dict[str, Any]]) -> int:
    """The bot's permission bits in a channel (Discord's documented algorithm)."""
    if str(guild.get("owner_id")) == user_id:
        return ALL_PERMISSIONS
    roles = {str(r["id"]): int(r["permissions"]) for r in guild.get("roles", [])}
    guild_id = str(guild["id"])
    base = roles.get(guild_id, 0)
    for role_id in member.get("roles", []):
        base |= roles.get(str(role_id), 0)
    if base & ADMINISTRATOR:
        return ALL_PERMISSIONS
    by_id = {str(o["id"]): o for o in overwrites}
    if guild_id in by_id:
        base = (base & ~int(by_id[guild_id]["deny"])) | int(by_id[guild_id]["allow"])
    deny = allow = 0
    for role_id in member.get("roles", []):
        if (o := by_id.get(str(role_id))) is not None:
            deny, allow = deny | int(o["deny"]), allow | int(o["allow"])
    base = (base & ~deny) | allow
    if (o := by_id.get(user_id)) is not None:
        base = (base & ~int(o["deny"])) | int(o["allow"])
    return base


class _Report:
    def __init__(self) -> None:
        self.problems = 0

    def ok(self, text: str) -> None:
        print(f"  ok   {text}")

    def bad(self, text: str, fix: str) -> None:
        self.problems += 1
        print(f"  FIX  {text}\n       → {fix}")


def _check_channel(http: httpx.Client, report: _Report, channel_id: str, user_id: str) -> None:
    response = http.get(f"/channels/{channel_id}")
    if response.status_code in (403, 404):
        report.bad(f"channel {channel_id}: the bot cannot see it ({response.status_code})",
                   "invite the bot to that server with the URL below, and give it View Channel "
                   "there")
        return
    response.raise_for_status()
    channel = response.json()
    if channel.get("type") in THREAD_TYPES and channel.get("parent_id"):
        channel = http.get(f"/channels/{channel['parent_id']}").raise_for_status().json()
    guild_id = channel.get("guild_id")
    if guild_id is None:
        report.ok(f"channel {channel_id} is a direct message: no permissions to set")
        return
    guild = http.get(f"/guilds/{guild_id}").raise_for_status().json()
    member = http.get(f"/guilds/{guild_id}/members/{user_id}").raise_for_status().json()
    have = channel_permissions(guild=guild, member=member, user_id=user_id,
                               overwrites=channel.get("permission_overwrites", []))
    missing = discord.Permissions(REQUIRED_PERMISSIONS.value & ~have)
    if missing.value:
        report.bad(f"channel {channel_id}: missing {', '.join(permission_names(missing))}",
                   "Server Settings → Roles (the bot's role), or the channel's Permissions "
                   "tab: allow these for the bot")
    else:
        report.ok(f"channel {channel_id}: every permission the bot needs is granted")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="musespark doctor discord",
                                     description="Check the Discord bot's token, intents and "
                                     "permissions, and print its invite URL.")
    parser.add_argument("--channel", metavar="ID", help="check the bot's permissions here")
    args = parser.parse_args(argv)
    settings = get_settings()
    report = _Report()
    print("Discord:")
    if settings.discord_token is None:
        report.bad("MUSESPARK_DISCORD_TOKEN is not set",
                   "Developer Portal → your application → Bot → Reset Token; put it in the "
                   "environment")
        return 1
    headers = {"Authorization": f"Bot {settings.discord_token.get_secret_value()}",
               "User-Agent": "DiscordBot (https://github.com/musespark/musespark, 0.1)"}
    with httpx.Client(base_url=settings.discord_api_url.rstrip("/"), headers=headers,
                      timeout=HTTP_TIMEOUT_SECONDS) as http:
        try:
            me_response = http.get("/users/@me")
        except httpx.HTTPError as exc:
            report.bad(f"cannot reach {settings.discord_api_url}: {exc}",
                       "check the network, or MUSESPARK_DISCORD_API_URL")
            return 1
        if me_response.status_code == 401:
            report.bad("Discord refused the token (401)", "reset the token in the Developer "
                       "Portal (Bot page) and set MUSESPARK_DISCORD_TOKEN again")
            return 1
        me = me_response.raise_for_status().json()
        report.ok(f"token valid: bot {me['username']} ({me['id']})")
        app = http.get("/applications/@me").raise_for_status().json()
        flags = int(app.get("flags") or 0)
        report.ok("intents Guilds, Guild and DM Message Reactions: not privileged, always on")
        content_on = bool(flags & (APP_FLAG_MESSAGE_CONTENT | APP_FLAG_MESSAGE_CONTENT_LIMITED))
        if settings.discord_mention_mode and not content_on:
            report.bad("mention mode is on but the Message Content intent is off (the gateway "
                       "would close with 4014)", "Developer Portal → Bot → Privileged Gateway "
                       "Intents → Message Content Intent, or unset MUSESPARK_DISCORD_MENTION_MODE")
        elif settings.discord_mention_mode:
            report.ok("Message Content intent enabled (needed by the mention mode)")
        else:
            report.ok("Message Content intent not needed (mention mode off)")
        if app.get("interactions_endpoint_url"):
            report.bad("an Interactions Endpoint URL is set: slash commands and buttons go "
                       "there instead of to the bot", "Developer Portal → General Information "
                       "→ clear Interactions Endpoint URL")
        if args.channel:
            _check_channel(http, report, args.channel, str(me["id"]))
        print(f"\nInvite URL (exactly the permissions needed: "
              f"{', '.join(permission_names(REQUIRED_PERMISSIONS))}):\n"
              f"  {invite_url(app['id'])}")
    if report.problems:
        print(f"\n{report.problems} thing(s) to fix.")
    return 1 if report.problems else 0
