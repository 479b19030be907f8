"""``musespark status``: the fleet on one screen (rich), or as JSON for scripts."""

from __future__ import annotations

import argparse
import json
import sys

from core.settings import get_settings
from core.status import FleetStatus, fleet_status

__all__ = ["main", "render"]


def render(status: FleetStatus) -> None:
    from rich.console import Console, Group
    from rich.panel import Panel
    from rich.table import Table

    queues = Table(title=f"Queues ({status.broker})", expand=True)
    queues.add_column("queue")
    queues.add_column("waiting", justify="right")
    if status.queue_depths is None:
        queues.add_row("[red]broker unreachable[/red]", status.queue_error or "")
    else:
        for name, depth in status.queue_depths.items():
            queues.add_row(name, str(depth))
    oldest = status.oldest_waiting
    queues.caption = (f"oldest waiting: job {oldest['job_id']} ({oldest['kind']} "
                      f"{oldest['intent']}, {oldest['platform']}) for "
                      f"{oldest['waiting_seconds']:.0f} s" if oldest else "nothing waiting")

    workers = Table(title="Workers", expand=True)
    workers.add_column("worker")
    workers.add_column("running")
    for worker in status.workers:
        running = ", ".join(
            f"{job['job_id']} {job.get('kind', '?')} {job.get('intent', '')} "
            f"{job['seconds']:.0f} s" if "seconds" in job else job["job_id"]
            for job in worker.running) or "idle"
        workers.add_row(worker.name, running)
    if not status.workers:
        workers.add_row("[yellow]none seen[/yellow]", "")
    if status.workers and status.workers[0].answered is None:
        workers.caption = "embedded broker: only workers running a job are seen"

    states = Table(title="Jobs in the last hour", expand=True)
    states.add_column("state")
    states.add_column("jobs", justify="right")
    for state, count in status.jobs_by_state.items():
        states.add_row(state, str(count))

    failures = Table(title="Failures in the last hour, by reason", expand=True)
    failures.add_column("reason")
    failures.add_column("jobs", justify="right")
    for reason, count in status.failures_by_reason.items():
        failures.add_row(reason, str(count))
    if not status.failures_by_reason:
        failures.add_row("none", "0")

    grid = Table.grid(expand=True)
    grid.add_column()
    grid.add_column()
    grid.add_row(queues, states)
    grid.add_row(workers, failures)
    Console().print(Panel(Group(grid), title=f"MuseSpark · {status.taken_at[:19]} UTC"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="musespark status",
        description="Queue depths, workers and what each runs, jobs by state in the last "
        "hour, the oldest waiting job and failures by reason, from the store and the broker "
        "the settings name.")
    parser.add_argument("--json", action="store_true", help="print JSON instead (for scripts)")
    args = parser.parse_args(argv)
    from core.store import Store

    from sqlalchemy.exc import SQLAlchemyError

    settings = get_settings()
    store = Store(settings.resolved_database_url)
    try:
        status = fleet_status(store, settings)
    except SQLAlchemyError as exc:
        print(f"musespark status: cannot read the jobs at "
              f"{store.engine.url.render_as_string(hide_password=True)}: "
              f"{type(exc).__name__}: {str(exc).splitlines()[0]}\n"
              "Check MUSESPARK_DATABASE_URL, and run `musespark db upgrade` once.",
              file=sys.stderr)
        return 2
    finally:
        store.dispose()
    if args.json:
        json.dump(status.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render(status)
    return 0 if status.queue_depths is not None else 1
