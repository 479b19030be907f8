"""``python -m workers``: start a Celery worker (what ``musespark worker`` runs)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from core.queue import QUEUE_FOR_KIND
from core.settings import get_settings


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.loglevel.upper(),
                        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    settings = get_settings()
    from workers.celery_app import app

    worker_argv = ["worker", "--queues", args.queues, "--concurrency", str(args.concurrency),
                   "--pool", "prefork", "--loglevel", args.loglevel, "--hostname", args.name]
    if settings.embedded_broker:
        worker_argv += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    app.worker_main(worker_argv)
    sys.exit(0)


if __name__ == "__main__":
    main()
