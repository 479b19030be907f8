"""The local adapter: the terminal chat, the JSON-lines driver, and the test harness."""

from bots.console._adapter import PLATFORM, ConsoleChat, ShownMessage
from bots.console._repl import render, run_interactive, run_jsonl

__all__ = ["PLATFORM", "ConsoleChat", "ShownMessage", "render", "run_interactive", "run_jsonl"]
