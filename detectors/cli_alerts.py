"""Command-line entry points of the alerts.

``galsift notify``         run the notifier: deliver alerts from the outbox to the webhooks
``galsift alerts list``    the newest alerts with their cross-match and delivery states

The database layer is imported inside the handlers, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from galsift.settings import Settings

if TYPE_CHECKING:
    from galsift.cli import CommandGroups


def register(groups: CommandGroups) -> None:
    """Add the alert commands to the ``galsift`` command line."""
    p = groups.top.add_parser(
        "notify",
        help="deliver lens alerts from the outbox to the configured webhooks (a service)",
        description="Post pending alerts to GALSIFT_ALERT_WEBHOOKS with retries, back-off and the hourly "
        "rate limit, recording each delivery's state. Runs until SIGTERM/Ctrl-C.",
    )
    p.add_argument("--poll", type=_positive_float, default=2.0, metavar="S", help="seconds between rounds")
    p.add_argument("--timeout", type=_positive_float, default=10.0, metavar="S", help="per-call timeout")
    p.add_argument(
        "--batch",
        type=_positive_int,
        default=20,
        metavar="N",
        help="deliveries claimed per round (default: 20); a claim is leased for N x (timeout + 1) + 30 s",
    )
    p.add_argument("--once", action="store_true", help="one round, then exit")
    p.add_argument(
        "--idle-exit", type=_positive_float, metavar="S", help="stop after S seconds with nothing due"
    )
    p.set_defaults(func=_notify)

    p = groups.top.add_parser("alerts", help="lens-candidate alerts: list them and their deliveries")
    sub = p.add_subparsers(dest="alerts_command", required=True, metavar="ACTION")
    p = sub.add_parser("list", help="the newest alerts with cross-match and delivery states")
    p.add_argument("--limit", type=_positive_int, default=20, metavar="N", help="most alerts (default: 20)")
    p.add_argument("--kind", help="only alerts of this kind (e.g. lens)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the rows as JSON")
    p.set_defaults(func=_list)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _notify(args: argparse.Namespace, settings: Settings) -> int:
    from db.engine import get_engine
    from detectors.notify import Notifier

    if not settings.alert_webhooks:
        # keep running: `galsift up` starts the notifier whatever the configuration, and pending
        # deliveries for targets configured later are kept, never failed
        print(
            "galsift notify: no webhooks configured (GALSIFT_ALERT_WEBHOOKS); deliveries stay pending",
            file=sys.stderr,
        )
    engine = get_engine(settings)
    try:
        notifier = Notifier(engine, settings, timeout_s=args.timeout, batch=args.batch)
        if args.once:
            report = notifier.deliver_due()
        else:
            report = notifier.run(poll_s=args.poll, idle_exit_s=args.idle_exit)
    finally:
        engine.dispose()
    print(f"notify: {report.sent} sent, {report.retried} to retry, {report.failed} failed")
    return 0


def _list(args: argparse.Namespace, settings: Settings) -> int:
    from db.alerts import delivery_counts, recent_alerts
    from db.engine import get_engine

    engine = get_engine(settings)
    try:
        rows = recent_alerts(engine, limit=args.limit, kind=args.kind)
        counts = delivery_counts(engine)
    finally:
        engine.dispose()
    table = [_row(r.model_dump()) for r in rows]
    print(_format(table))
    for target, states in counts.items():
        print(f"deliveries to {target}: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())))
    if args.json:
        doc = {"command": "alerts list", "results": table, "deliveries": counts}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return 0


def _row(alert: dict[str, Any]) -> dict[str, Any]:
    """One flat row per alert, for the table and --json."""
    match = alert["crossmatch"].get("match") or {}
    return {
        "id": alert["id"],
        "created_at": alert["created_at"].isoformat(timespec="seconds"),
        "kind": alert["kind"],
        "tile": f"{alert['survey']}/{alert['external_id']}",
        "ra": alert["ra"],
        "dec": alert["dec"],
        "score": round(float(alert["score"]), 4),
        "model_version": alert["model_version"],
        "known": match.get("name") or ("no" if alert["crossmatch"].get("searched") else "not searched"),
        "separation_arcsec": match.get("separation_arcsec"),
        "deliveries": ", ".join(f"{n} {s}" for s, n in sorted(alert["deliveries"].items())) or "none",
        "pixels_uri": alert["pixels_uri"],
    }


def _format(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no alerts"
    cols = ["id", "created_at", "tile", "ra", "dec", "score", "known", "model_version", "deliveries"]

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.5f}" if isinstance(value, float) else str(value)

    cells = [[cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(lines)
