"""The slash commands: typed options, choices and autocomplete, all handed to core as args.

Discord limits: a command name is 1-32 lowercase characters, a description at most 100, at most
25 choices or autocomplete suggestions per option. Core validates every value again
(``core.intents.parse_command``), so a stale command definition cannot smuggle bad input in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

from core.intents import ASPECTS, COMMANDS, IMAGE_COUNT_MAX, SEED_MAX, IntentKind

if TYPE_CHECKING:
    from bots.discord._client import MuseSparkDiscord

__all__ = ["STYLE_SUGGESTIONS", "WRITE_MODES", "command_names", "register_commands"]

DESCRIPTION_MAX_CHARS = 100
AUTOCOMPLETE_MAX = 25
STYLE_SUGGESTIONS = ("photo", "illustration", "watercolor", "oil painting", "pencil sketch",
                     "anime", "pixel art", "3d render", "comic", "cinematic", "minimalist")
WRITE_MODES = ("poem", "haiku", "story", "limerick", "brainstorm", "slogan", "dialogue")


def command_names() -> list[str]:
    """One slash command per intent core offers (aliases such as /draw are text-only)."""
    seen: set[IntentKind] = set()
    names = []
    for name, (kind, _) in COMMANDS.items():
        if kind not in seen:
            seen.add(kind)
            names.append(name)
    return names


async def _style_autocomplete(interaction: discord.Interaction[Any],
                              current: str) -> list[app_commands.Choice[str]]:
    typed = current.strip().lower()
    matches = [s for s in STYLE_SUGGESTIONS if typed in s] or ([typed] if typed else [])
    return [app_commands.Choice(name=s, value=s) for s in matches[:AUTOCOMPLETE_MAX]]


def register_commands(tree: app_commands.CommandTree[Any], client: MuseSparkDiscord) -> None:
    """Add MuseSpark's commands to ``tree`` (global; ``musespark discord sync`` publishes them)."""

    @app_commands.command(name="imagine", description="Draw a picture from your words")
    @app_commands.describe(
        prompt="What to draw, e.g. a lighthouse at dusk",
        style="A look: watercolor, photo, pixel art… (suggestions as you type)",
        count=f"How many pictures (1-{IMAGE_COUNT_MAX})",
        aspect="The picture's shape",
        seed="A number that makes the same prompt draw the same picture again")
    @app_commands.choices(aspect=[app_commands.Choice(name=a, value=a) for a in ASPECTS])
    @app_commands.autocomplete(style=_style_autocomplete)
    async def imagine(interaction: discord.Interaction[Any], prompt: str,
                      style: str | None = None,
                      count: app_commands.Range[int, 1, IMAGE_COUNT_MAX] | None = None,
                      aspect: app_commands.Choice[str] | None = None,
                      seed: app_commands.Range[int, 0, SEED_MAX] | None = None) -> None:
        await client.run_command(interaction, "imagine", {
            "prompt": prompt, "style": style, "count": count,
            "aspect": aspect.value if aspect else None, "seed": seed})

    @app_commands.command(name="write", description="Write text with you: a poem, a story…")
    @app_commands.describe(prompt="What to write, e.g. a haiku about rain",
                           mode="The kind of text")
    @app_commands.choices(mode=[app_commands.Choice(name=m, value=m) for m in WRITE_MODES])
    async def write(interaction: discord.Interaction[Any], prompt: str,
                    mode: app_commands.Choice[str] | None = None) -> None:
        await client.run_command(interaction, "write",
                                 {"prompt": prompt, "mode": mode.value if mode else None})

    tree.add_command(imagine)
    tree.add_command(write)
    for name in command_names():
        if name in ("imagine", "write"):
            continue
        tree.add_command(_simple_command(name, client))


def _simple_command(name: str, client: MuseSparkDiscord) -> app_commands.Command[Any, Any, None]:
    """``/help`` and ``/profile`` take nothing; other intents core adds (``/settings``,
    ``/forget``, ...) take their instruction as one optional ``text`` option."""
    kind, line = COMMANDS[name]
    description = line[:DESCRIPTION_MAX_CHARS] or name
    if kind in (IntentKind.HELP, IntentKind.PROFILE):
        async def bare(interaction: discord.Interaction[Any]) -> None:
            await client.run_command(interaction, name, {})
        return app_commands.Command(name=name, description=description, callback=bare)

    @app_commands.describe(text=line[:DESCRIPTION_MAX_CHARS] or "what to do")
    async def with_text(interaction: discord.Interaction[Any], text: str | None = None) -> None:
        await client.run_command(interaction, name, {"prompt": text})
    return app_commands.Command(name=name, description=description, callback=with_text)
