"""``python -m workers``: start a Celery worker (what ``musespark worker`` runs).

Started by ``musespark run`` with ``--parent-pid``, the worker watches that process and shuts
down when it is gone (killed with SIGKILL, crashed), so a dead ``run`` never leaves workers
behind that keep taking jobs. A worker started by hand (no ``--parent-pid``) watches nothing.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from core.queue import QUEUE_FOR_KIND
from core.settings import get_settings

log = logging.getLogger("workers.main")

#: How often the watch thread checks that the parent still runs.
PARENT_POLL_SECONDS = 0.5
#: After the parent is gone: how long a warm shutdown may let a job that is nearly done finish
#: (its result is posted by this worker, not by the parent).
PARENT_GONE_WARM_SECONDS = 2.0
#: Then how long a cold shutdown (running jobs cancelled and handed back to the broker) may take
#: before the worker and its pool are killed. Either way a job left ``running`` is re-driven by
#: the next bot once its heartbeat is stale, and its claim fences out a late result.
PARENT_GONE_COLD_SECONDS = 5.0

_PR_SET_PDEATHSIG = 1
#: Exit status of a picture worker whose signing chain or key cannot be used.
EXIT_CANNOT_SIGN = 3
#: prometheus-client's multiprocess mode: where each process of the worker writes its samples.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def set_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent (thread) ends.

    An extra guard, not the mechanism: it only exists on Linux. Returns whether it was set.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, already dead but not reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(pid, 0) is all there is
    return state not in ("Z", "X")


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the prefork pool), from /proc; empty where there is none."""
    found: list[int] = []
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return found
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(entry.name))
    return found


def _parent_gone(parent_pid: int, direct: bool) -> bool:
    # A direct child is re-parented the moment its parent dies, before anyone reaps the parent.
    if direct and os.getppid() != parent_pid:
        return True
    return not process_alive(parent_pid)


def _stop_self() -> None:
    """Warm, then cold, then kill: bounded, so an orphaned worker always goes away."""
    me = os.getpid()
    for sig, bound in ((signal.SIGTERM, PARENT_GONE_WARM_SECONDS),
                       (signal.SIGQUIT, PARENT_GONE_COLD_SECONDS)):
        log.warning("sending %s to myself (%d)", sig.name, me)
        os.kill(me, sig)
        time.sleep(bound)  # a daemon thread: when the worker exits, this ends with it
    log.error("still running %.0f s after my parent went away; killing my pool and myself",
              PARENT_GONE_WARM_SECONDS + PARENT_GONE_COLD_SECONDS)
    for child in _children(me):
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.kill(me, signal.SIGKILL)


def watch_parent(parent_pid: int, *, poll_seconds: float = PARENT_POLL_SECONDS) -> threading.Thread:
    """Start a daemon thread that shuts this worker down once ``parent_pid`` is gone.

    Threads do not survive ``fork()``, so only the worker's main process watches; its pool
    children die with it (see :func:`_pool_child_init`).
    """
    direct = os.getppid() == parent_pid

    def run() -> None:
        while not _parent_gone(parent_pid, direct):
            time.sleep(poll_seconds)
        log.warning("parent process %d is gone; shutting down and handing back running jobs",
                    parent_pid)
        _stop_self()

    thread = threading.Thread(target=run, name="parent-watch", daemon=True)
    thread.start()
    return thread


def _pool_child_init(main_pid: int) -> Any:
    """A Celery ``worker_process_init`` receiver: a pool child dies when its main process does."""
    def init(**_: Any) -> None:
        if set_parent_death_signal(signal.SIGKILL) and os.getppid() != main_pid:
            os._exit(1)  # the main process died before the guard was set
    return init


def choose_pool(asked: str, device: str, concurrency: int) -> str:
    """The Celery pool: ``asked`` unless ``auto``; auto is prefork unless the models run on
    CUDA, where a forked child cannot use a CUDA context (solo, or threads for several)."""
    if asked != "auto":
        return asked
    cuda = device.startswith("cuda") or (device == "auto" and Path("/proc/driver/nvidia").exists())
    if not cuda:
        return "prefork"
    return "threads" if concurrency > 1 else "solo"


def warm_up(queues: list[str], settings: Any) -> None:
    """Load the models this worker's queues need and run them once (compiling them when
    ``MUSESPARK_COMPILE`` is on), so the first job does not pay for it. A model that fails to
    load is logged; its jobs then fail with a clear message."""
    from core.errors import ModelUnavailableError

    try:
        if QUEUE_FOR_KIND["image"] in queues:
            from workers.runner import _image_generator

            _image_generator(settings).warm_up()
        if QUEUE_FOR_KIND["text"] in queues and not settings.text_api_url:
            from workers.runner import text_generator

            text_generator(settings).generate([{"role": "user", "content": "Hello"}],
                                               max_new_tokens=4, seed=0)
    except ModelUnavailableError as exc:
        log.error("warm-up: %s", exc)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="musespark worker", description=(
        "Run a worker that takes jobs from the queue, runs the models and posts results. "
        "Models load once per process, on the first job that needs them."))
    parser.add_argument("--queues", default=",".join(QUEUE_FOR_KIND.values()),
                        help="comma-separated queues to take jobs from (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="processes that run jobs at once; one per GPU (default: 1)")
    parser.add_argument("--loglevel", default="info")
    parser.add_argument("--name", default=f"musespark-{os.getpid()}@{socket.gethostname()}",
                        help="worker node name")
    parser.add_argument("--pool", choices=("auto", "prefork", "solo", "threads"), default="auto",
                        help="auto: prefork on CPU; on CUDA solo (threads with --concurrency "
                        "above 1), because CUDA does not survive fork (default: %(default)s)")
    parser.add_argument("--parent-pid", type=int, default=None, metavar="PID",
                        help="shut down when this process is gone (set by `musespark run`)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.loglevel.upper(),
                        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    settings = get_settings()
    if QUEUE_FOR_KIND["image"] in args.queues.split(","):
        # Every picture is signed: a worker that could not sign must not start taking jobs.
        from workers.provenance import TrustError, check_signing

        try:
            check_signing(settings)
        except TrustError as exc:
            log.error("cannot sign pictures: %s", exc)
            print(f"musespark worker: cannot sign pictures: {exc}", file=sys.stderr, flush=True)
            sys.exit(EXIT_CANNOT_SIGN)
    own_metrics_dir = _prepare_metrics_dir() if settings.metrics_port else None
    from celery.signals import worker_process_init, worker_process_shutdown

    from workers import shutdown
    from workers.celery_app import app

    shutdown.install_main(settings.worker_stop_grace_seconds)
    worker_process_init.connect(shutdown.install_child, weak=False)
    worker_process_shutdown.connect(_forget_pool_process, weak=False)
    metrics_server = None
    if settings.metrics_port:
        from core.metrics import serve_worker_metrics

        metrics_server = serve_worker_metrics(settings)
    if args.parent_pid is not None:
        from celery.signals import worker_process_init

        worker_process_init.connect(_pool_child_init(os.getpid()), weak=False)
        watch_parent(args.parent_pid)
    pool = choose_pool(args.pool, settings.device, args.concurrency)
    if pool != "prefork":
        # No fork: the models load (and compile) here, before the worker takes a job.
        warm_up(args.queues.split(","), settings)
    worker_argv = ["worker", "--queues", args.queues, "--concurrency", str(args.concurrency),
                   "--pool", pool, "--loglevel", args.loglevel, "--hostname", args.name]
    if settings.embedded_broker:
        worker_argv += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    try:
        app.worker_main(worker_argv)
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        if own_metrics_dir is not None:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)
    sys.exit(0)


def _prepare_metrics_dir() -> Path | None:
    """Give this worker (main process and pool) a multiprocess metrics directory.

    Must run before anything imports ``prometheus_client`` (which reads the variable once, at
    import; ``core.metrics`` imports it): set in the environment, it is inherited by the pool
    processes Celery forks. An operator's own ``PROMETHEUS_MULTIPROC_DIR`` is used as it is and
    never emptied. Returns the directory made here (to remove at exit), or None.
    """
    assert "prometheus_client" not in sys.modules, "imported before its directory was set"
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        return None
    made = Path(tempfile.mkdtemp(prefix="musespark-metrics-"))
    os.environ[MULTIPROC_ENV] = str(made)
    return made


def _forget_pool_process(pid: int | None = None, **_: Any) -> None:
    """A ``worker_process_shutdown`` receiver: an ending pool process's live gauges go."""
    if os.environ.get(MULTIPROC_ENV):
        from core.metrics import mark_process_dead

        mark_process_dead(pid or os.getpid())


if __name__ == "__main__":
    main()
