"""What the bot asks Discord for: gateway intents, channel permissions, the invite URL.

Facts (Discord API v10):

* Reactions need the GUILD_MESSAGE_REACTIONS (1<<10) and DIRECT_MESSAGE_REACTIONS (1<<13)
  intents; GUILDS (1<<0) keeps channels and threads known. None is privileged.
* MESSAGE_CONTENT (1<<15) is privileged: it must be switched on in the Developer Portal (and
  approved by Discord once the bot is in 100+ servers), or the gateway closes with 4014. Slash
  commands and buttons do not need it; only the optional mention mode does (it also needs
  GUILD_MESSAGES (1<<9) and DIRECT_MESSAGES (1<<12) to receive the messages at all).
* The application flags GATEWAY_MESSAGE_CONTENT (1<<18) or GATEWAY_MESSAGE_CONTENT_LIMITED
  (1<<19) say whether that intent is enabled for the application.
"""

from __future__ import annotations

from urllib.parse import urlencode

import discord

__all__ = [
    "APP_FLAG_MESSAGE_CONTENT",
    "APP_FLAG_MESSAGE_CONTENT_LIMITED",
    "INVITE_SCOPES",
    "REQUIRED_PERMISSIONS",
    "build_intents",
    "invite_url",
    "permission_names",
]

APP_FLAG_MESSAGE_CONTENT = 1 << 18
APP_FLAG_MESSAGE_CONTENT_LIMITED = 1 << 19
INVITE_SCOPES = ("bot", "applications.commands")

#: Exactly what the bot uses in a channel: see it, post results (also in threads, when the
#: interaction token has expired), upload images, add reactions people can click, read the
#: history to reply to and react on its own results, and let people use its slash commands.
REQUIRED_PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    attach_files=True,
    add_reactions=True,
    read_message_history=True,
    use_application_commands=True,
)


def build_intents(mention_mode: bool = False) -> discord.Intents:
    """The fewest intents that work: guilds and reactions; message content only on request."""
    intents = discord.Intents.none()
    intents.guilds = True
    intents.guild_reactions = True
    intents.dm_reactions = True
    if mention_mode:
        intents.guild_messages = True
        intents.dm_messages = True
        intents.message_content = True
    return intents


def permission_names(permissions: discord.Permissions) -> list[str]:
    """``["Send Messages", ...]`` for the permissions set in ``permissions``."""
    return [name.replace("_", " ").title() for name, value in permissions if value]


def invite_url(application_id: int | str,
               permissions: discord.Permissions = REQUIRED_PERMISSIONS) -> str:
    query = urlencode({"client_id": str(application_id), "scope": " ".join(INVITE_SCOPES),
                       "permissions": str(permissions.value)})
    return f"https://discord.com/oauth2/authorize?{query}"
