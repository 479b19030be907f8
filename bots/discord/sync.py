"""``musespark discord sync``: publish the slash commands to Discord.

Global commands (the default, for release) reach every server the bot is in; Discord may take
a while to show changes everywhere. Guild commands (``--guild ID``, for development) show at
once in that one server. Syncing replaces the whole set in its scope, so run it again after
an upgrade that adds commands. Commands are rate-limited to 200 creations a day per scope.
"""

from __future__ import annotations

import argparse
import asyncio

import discord

from bots.discord import use_api_url
from bots.discord._client import MuseSparkDiscord
from core.settings import Settings, get_settings

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="musespark discord sync",
        description="Register MuseSpark's slash commands with Discord: globally (release), or "
        "in one server with --guild (development: changes show at once).")
    parser.add_argument("--guild", type=int, action="append", default=[], metavar="ID",
                        help="sync to this server only (repeatable)")
    parser.add_argument("--clear", action="store_true",
                        help="remove the commands from the scope instead")
    return parser


async def _sync(settings: Settings, token: str, guilds: list[int], clear: bool) -> int:
    use_api_url(settings.discord_api_url)
    # The command tree only: syncing needs no database, queue or gateway connection.
    client = MuseSparkDiscord(None, None)  # type: ignore[arg-type]
    async with client:
        try:
            await client.login(token)
        except discord.LoginFailure:
            print("Discord refused the token (MUSESPARK_DISCORD_TOKEN). Reset it in the "
                  "Developer Portal, Bot page, and set it again.")
            return 1
        scopes: list[discord.Object | None] = [discord.Object(g) for g in guilds] or [None]
        for scope in scopes:
            if clear:
                client.tree.clear_commands(guild=scope)
            elif scope is not None:
                client.tree.copy_global_to(guild=scope)
            try:
                synced = await client.tree.sync(guild=scope)
            except discord.HTTPException as exc:
                where = f"server {scope.id}" if scope else "globally"
                print(f"Could not sync {where}: {exc}. Is the bot in that server, invited "
                      "with the applications.commands scope?")
                return 1
            where = f"in server {scope.id}" if scope else "globally"
            names = ", ".join(f"/{c.name}" for c in synced) or "none"
            print(f"Synced {len(synced)} command(s) {where}: {names}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = get_settings()
    if settings.discord_token is None:
        print("MUSESPARK_DISCORD_TOKEN is not set: copy the token from the Developer Portal "
              "(your application, Bot page) into it.")
        return 2
    return asyncio.run(_sync(settings, settings.discord_token.get_secret_value(), args.guild,
                             args.clear))
