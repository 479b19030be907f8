"""The Discord adapter (discord.py): slash commands, result buttons and reactions.

``serve(runtime)`` runs the gateway client until cancelled; ``musespark discord sync``
(:mod:`bots.discord.sync`) publishes the slash commands; ``musespark doctor discord``
(:mod:`bots.discord.doctor`) checks the setup. Results are posted by the workers
(``workers/delivery/discord.py``), not here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bots.discord._client import MuseSparkDiscord, ResultButton
from bots.discord._convert import PLATFORM
from bots.discord._setup import REQUIRED_PERMISSIONS, build_intents, invite_url

if TYPE_CHECKING:
    from bots.runtime import BotRuntime

__all__ = [
    "PLATFORM",
    "REQUIRED_PERMISSIONS",
    "MuseSparkDiscord",
    "ResultButton",
    "build_intents",
    "create_client",
    "invite_url",
    "serve",
    "use_api_url",
]

DEFAULT_API_URL = "https://discord.com/api/v10"


def use_api_url(api_url: str) -> None:
    """Point discord.py's REST calls at ``api_url`` (a REST proxy, or a local fake in tests).

    discord.py builds every URL from the class attribute ``discord.http.Route.BASE``; the
    gateway URL is separate and fixed.
    """
    import discord.http

    discord.http.Route.BASE = api_url.rstrip("/")


def create_client(runtime: BotRuntime) -> MuseSparkDiscord:
    settings = runtime.settings
    use_api_url(settings.discord_api_url)
    return MuseSparkDiscord(runtime.orchestrator, runtime.store,
                            mention_mode=settings.discord_mention_mode,
                            max_prompt_chars=settings.max_prompt_chars,
                            redriver=runtime.redriver)


async def serve(runtime: BotRuntime) -> None:
    """Connect to the gateway and serve until cancelled (token: ``MUSESPARK_DISCORD_TOKEN``)."""
    token = runtime.settings.discord_token
    if token is None:
        raise RuntimeError("MUSESPARK_DISCORD_TOKEN is not set")
    client = create_client(runtime)
    async with client:
        await client.start(token.get_secret_value())
