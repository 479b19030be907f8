"""The slash commands: typed options and choices, all handed to core as args.

Discord limits: a command name is 1-32 lowercase characters, a description at most 100, at most
25 choices per option. Core validates every value again
(``core.intents.parse_command``), so a stale command definition cannot smuggle bad input in.

Style and mode are choices, not free text: core accepts any word, but only the taste
catalogue's values (``core.taste.CATALOGUE``) shape a result, so those are all we offer.
"""

from __future__ import annotations

from typing import Any, Protocol

import discord
from discord import app_commands

from core.intents import (
    ASPECTS,
    COMMANDS,
    IMAGE_COUNT_MAX,
    SCENES_DEFAULT,
    SCENES_MAX,
    SCENES_MIN,
    SEED_MAX,
    IntentKind,
)
from core.taste import CATALOGUE
from core.uploads import UPLOAD_MAX_BYTES



class CommandRunner(Protocol):
    """What the slash commands need of the client (``bots.discord._client.MuseSparkDiscord``);
    a protocol, so this module does not import the client that imports it."""

    async def run_command(self, interaction: discord.Interaction[Any], name: str,
                          args: dict[str, Any]) -> None: ...

    async def run_remix(self, interaction: discord.Interaction[Any], image: discord.Attachment,
                        args: dict[str, Any], *, command: str = "remix") -> None: ...


__all__ = ["IMAGE_STYLES", "WRITE_MODES", "command_names", "register_commands"]

DESCRIPTION_MAX_CHARS = 100
#: The picture styles the taste catalogue knows (``oil-painting`` ...), in its order.
IMAGE_STYLES: tuple[str, ...] = tuple(CATALOGUE["image"]["style"])
#: ``/write``'s mode: a form (prose, verse, list) or a tone (playful ...); core maps it back.
WRITE_MODES: tuple[str, ...] = (*CATALOGUE["text"]["form"], *CATALOGUE["text"]["tone"])
#: Commands with their own options below; the rest take one optional ``text``.
_OWN_OPTIONS = ("imagine", "write", "story", "brainstorm", "remix", "verify")


def _choices(values: tuple[str, ...]) -> list[app_commands.Choice[str]]:
    """Readable names ("oil painting"), catalogue values ("oil-painting")."""
    return [app_commands.Choice(name=v.replace("-", " "), value=v) for v in values]


def command_names() -> list[str]:
    """One slash command per intent core offers (aliases such as /draw are text-only)."""
    seen: set[IntentKind] = set()
    names = []
    for name, (kind, _) in COMMANDS.items():
        if kind not in seen:
            seen.add(kind)
            names.append(name)
    return names


def register_commands(tree: app_commands.CommandTree[Any], client: CommandRunner) -> None:
    """Add MuseSpark's commands to ``tree`` (global; ``musespark discord sync`` publishes them)."""

    @app_commands.command(name="imagine", description="Draw a picture from your words")
    @app_commands.describe(
        prompt="What to draw, e.g. a lighthouse at dusk",
        style="A look: watercolor, anime, pixel art… (empty: I choose by your taste)",
        count=f"How many pictures (1-{IMAGE_COUNT_MAX})",
        aspect="The picture's shape",
        seed="A number that makes the same prompt draw the same picture again")
    @app_commands.choices(aspect=[app_commands.Choice(name=a, value=a) for a in ASPECTS],
                          style=_choices(IMAGE_STYLES))
    async def imagine(interaction: discord.Interaction[Any], prompt: str,
                      style: app_commands.Choice[str] | None = None,
                      count: app_commands.Range[int, 1, IMAGE_COUNT_MAX] | None = None,
                      aspect: app_commands.Choice[str] | None = None,
                      seed: app_commands.Range[int, 0, SEED_MAX] | None = None) -> None:
        await client.run_command(interaction, "imagine", {
            "prompt": prompt, "style": style.value if style else None, "count": count,
            "aspect": aspect.value if aspect else None, "seed": seed})

    @app_commands.command(name="write", description="Write text with you: a poem, a story…")
    @app_commands.describe(prompt="What to write, e.g. a haiku about rain",
                           mode="A form (prose, verse, list) or a tone (playful, dark…)")
    @app_commands.choices(mode=_choices(WRITE_MODES))
    async def write(interaction: discord.Interaction[Any], prompt: str,
                    mode: app_commands.Choice[str] | None = None) -> None:
        await client.run_command(interaction, "write",
                                 {"prompt": prompt, "mode": mode.value if mode else None})

    @app_commands.command(name="story", description="An illustrated story: a picture per scene")
    @app_commands.describe(
        prompt="What the story is about, e.g. a fox who learns to fly",
        scenes=f"How many scenes ({SCENES_MIN}-{SCENES_MAX}, default {SCENES_DEFAULT})",
        style="The pictures' look (empty: I choose by your taste)")
    @app_commands.choices(style=_choices(IMAGE_STYLES))
    async def story(interaction: discord.Interaction[Any], prompt: str,
                    scenes: app_commands.Range[int, SCENES_MIN, SCENES_MAX] | None = None,
                    style: app_commands.Choice[str] | None = None) -> None:
        await client.run_command(interaction, "story", {
            "prompt": prompt, "scenes": scenes, "style": style.value if style else None})

    @app_commands.command(name="brainstorm", description="Ideas to pick from; I draw your pick")
    @app_commands.describe(prompt="What you need ideas for, e.g. a poster for our jazz night")
    async def brainstorm(interaction: discord.Interaction[Any], prompt: str) -> None:
        await client.run_command(interaction, "brainstorm", {"prompt": prompt})

    @app_commands.command(name="remix", description="Redraw your picture as you describe")
    @app_commands.describe(image=f"The picture to redraw (PNG, JPEG or WebP, up to "
                                 f"{UPLOAD_MAX_BYTES // 10**6} MB)",
                           prompt="What to make of it, e.g. as a watercolor at night",
                           style="A look (empty: I choose by your taste)")
    @app_commands.choices(style=_choices(IMAGE_STYLES))
    async def remix(interaction: discord.Interaction[Any], image: discord.Attachment,
                    prompt: str, style: app_commands.Choice[str] | None = None) -> None:
        await client.run_remix(interaction, image, {
            "prompt": prompt, "style": style.value if style else None})

    @app_commands.command(name="verify", description="Where a picture comes from: its signed "
                                                     "provenance, watermark and job")
    @app_commands.describe(image=f"The picture to check (the original file keeps its signed "
                                 f"manifest; up to {UPLOAD_MAX_BYTES // 10**6} MB)")
    async def verify(interaction: discord.Interaction[Any], image: discord.Attachment) -> None:
        await client.run_remix(interaction, image, {}, command="verify")

    own: tuple[app_commands.Command[Any, Any, None], ...] = (imagine, write, story, brainstorm,
                                                             remix, verify)
    for command in own:
        tree.add_command(command)
    for name in command_names():
        if name in _OWN_OPTIONS:
            continue
        tree.add_command(_simple_command(name, client))


def _simple_command(name: str, client: CommandRunner) -> app_commands.Command[Any, Any, None]:
    """``/help``, ``/profile`` and ``/web`` take nothing; other intents core adds (``/settings``,
    ``/forget``, ...) take their instruction as one optional ``text`` option."""
    kind, line = COMMANDS[name]
    description = line[:DESCRIPTION_MAX_CHARS] or name
    if kind in (IntentKind.HELP, IntentKind.PROFILE, IntentKind.MYDATA,
                IntentKind.WEB):
        async def bare(interaction: discord.Interaction[Any]) -> None:
            await client.run_command(interaction, name, {})
        return app_commands.Command(name=name, description=description, callback=bare)

    @app_commands.describe(text=line[:DESCRIPTION_MAX_CHARS] or "what to do")
    async def with_text(interaction: discord.Interaction[Any], text: str | None = None) -> None:
        await client.run_command(interaction, name, {"prompt": text})
    return app_commands.Command(name=name, description=description, callback=with_text)
