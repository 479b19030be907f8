"""The README's two commands are the ones that work: CI runs the second one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return [line.strip() for line in text.splitlines() if line.startswith("    python3.11 -m venv")]


def test_the_readme_opens_with_exactly_two_commands() -> None:
    commands = _readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith("musespark run")
    assert commands[1].endswith("python -m pytest")


def test_ci_runs_the_readmes_test_command_verbatim() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    match = re.search(r"^TEST_COMMAND='(.*)'$", ci, re.M)
    assert match is not None
    assert match.group(1) == _readme_commands()[1]
