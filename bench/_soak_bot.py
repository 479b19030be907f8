"""The soak benchmark's bot process (started by bench/soak.py; its memory is what is measured).

Telegram: python-telegram-bot long-polls the fake Bot API, exactly as ``musespark bot`` does.
Discord: discord.py's client on the fake REST API. The fake has no gateway, so the gateway's
INTERACTION_CREATE payloads come in as JSON lines on stdin and go into discord.py's own gateway
parser (as in tests/test_discord_adapter.py). The bot prints ``ready`` once both serve; end of
input or SIGTERM stops it (adapters first, then the handlers still running finish).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bots.discord import create_client  # noqa: E402
from bots.runtime import BotRuntime  # noqa: E402
from bots.telegram import running  # noqa: E402
from core.settings import get_settings  # noqa: E402

POLL_TIMEOUT_SECONDS = 1.0


async def serve(runtime: BotRuntime) -> None:
    token = runtime.settings.discord_token
    assert token is not None, "MUSESPARK_DISCORD_TOKEN is not set"
    client = create_client(runtime)
    await client.login(token.get_secret_value())
    try:
        async with running(runtime, poll_timeout_seconds=POLL_TIMEOUT_SECONDS):
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader()
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
            print("ready", flush=True)
            while line := await reader.readline():
                client._connection.parse_interaction_create(json.loads(line))
    finally:
        await client.close()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with BotRuntime(get_settings()) as runtime:
        try:
            asyncio.run(serve(runtime))
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
