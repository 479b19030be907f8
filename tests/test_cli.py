"""The ``musespark`` command as a new user runs it: real processes, the embedded default."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bots.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent


def _every_command(parser: argparse.ArgumentParser,
                   prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The command itself and every subcommand, nested ones too, as argument tuples."""
    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _every_command(sub, (*prefix, name))
    return found


COMMANDS = _every_command(build_parser())


def _env(tmp_path: Path, model_cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSESPARK_")}
    env.update(MUSESPARK_DATA_DIR=str(tmp_path / "data"),
               MUSESPARK_MODEL_CACHE_DIR=str(model_cache),
               MUSESPARK_TEXT_MAX_NEW_TOKENS="24", **extra)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _musespark(*args: str, env: dict[str, str], cwd: Path, input: str | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bots.cli", *args], env=env, cwd=cwd,
                          input=input, capture_output=True, text=True, timeout=timeout)


def test_the_walk_finds_nested_and_delegated_commands() -> None:
    assert {("doctor", "discord"), ("doctor", "telegram"), ("discord", "sync"),
            ("db", "upgrade"), ("feedback", "export"), ("run",)} <= set(COMMANDS)


@pytest.mark.parametrize("args", COMMANDS, ids=lambda args: " ".join(args) or "musespark")
def test_every_command_has_help(args: tuple[str, ...], tmp_path: Path, model_cache: Path) -> None:
    """`musespark ... --help` prints that command's usage and exits 0 (issue 10: the delegated
    doctor and sync commands said "unrecognized arguments")."""
    result = _musespark(*args, "--help", env=_env(tmp_path, model_cache), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {' '.join(('musespark', *args))} "), result.stdout


def test_delegated_commands_get_their_arguments_and_others_refuse_unknown_ones(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["doctor", "telegram", "--no-such-flag"])
    assert exit_info.value.code == 2
    assert "musespark doctor telegram: error: unrecognized arguments: --no-such-flag" in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit) as exit_info:
        main(["db", "upgrade", "--no-such-flag"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_db_upgrade_creates_the_schema(tmp_path: Path, model_cache: Path) -> None:
    env = _env(tmp_path, model_cache)
    for _ in range(2):
        result = _musespark("db", "upgrade", env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "up to date" in result.stdout
    assert (tmp_path / "data" / "musespark.db").exists()


def test_models_tiny_builds_a_loadable_pipeline_folder(tmp_path: Path, model_cache: Path) -> None:
    target = tmp_path / "tiny"
    result = _musespark("models", "tiny", str(target), env=_env(tmp_path, model_cache),
                        cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (target / "model_index.json").exists()
    assert (target / "musespark-demo.json").exists()


def test_run_answers_write_and_imagine_through_its_own_worker(tmp_path: Path,
                                                              model_cache: Path) -> None:
    """README command 1, driven with JSON lines: no server, no token, a worker process."""
    lines = [{"text": "/write a haiku about rain"}, {"text": "/imagine a lighthouse at dusk"},
             {"text": "/nope"}, "not json"]
    stdin = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    result = _musespark("run", "--jsonl", env=_env(tmp_path, model_cache), cwd=tmp_path,
                        input=stdin + "\n", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    out = [json.loads(line) for line in result.stdout.splitlines()]
    results = [m for m in out if m["kind"] == "result"]
    assert len(results) == 3, out  # the text, and the picture in two takes
    text_result = next(m for m in results if not m["images"])
    assert "SmolLM2-135M-Instruct" in text_result["text"]
    takes = sorted((m for m in results if m["images"]), key=lambda m: m["text"])
    assert [m["text"][:12] for m in takes] == ["Take 1 of 2 ", "Take 2 of 2 "], takes
    assert takes[0]["text"].split(" · ")[1] != takes[1]["text"].split(" · ")[1], "same style"
    for image_result in takes:
        assert all(Path(p).is_file() and p.endswith(".png") for p in image_result["images"])
        assert str(tmp_path / "data" / "artifacts") in image_result["images"][0]
    errors = [m["text"] for m in out if m["kind"] == "error"]
    assert any("/nope" in e for e in errors) and any("Bad input line" in e for e in errors)
    log = (tmp_path / "data" / "logs" / "worker-1.log").read_text()
    assert "ready." in log, "the results did not come through a Celery worker"
    assert "Warm shutdown" in log or "worker: Warm shutdown" in log or "shutdown" in log.lower()
