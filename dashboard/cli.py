"""``galsift dashboard`` (the Streamlit app) and ``galsift bench dashboard`` (page render times).

``galsift dashboard`` first does a new server's one-time work (:func:`dashboard.data.warm_up`:
the pages' imports and the database pool), then runs Streamlit's own command line in the same
process, ``streamlit run dashboard/app.py`` (headless, on ``settings.dashboard_port``), so the
server keeps what was loaded and a supervisor's SIGTERM (``galsift up``) reaches Streamlit
itself. The app reads the same settings from the environment (``GALSIFT_*``) and ``.env``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from galsift.settings import Settings

if TYPE_CHECKING:
    from galsift.cli import CommandGroups

#: the app's entry point
APP = Path(__file__).resolve().parent / "app.py"


def register(groups: CommandGroups) -> None:
    """Add ``galsift dashboard`` and ``galsift bench dashboard``."""
    from galsift.cli import positive_int

    p = groups.top.add_parser(
        "dashboard",
        help="the Streamlit dashboard: search, HITL loop, alerts, SQL, operations",
        description="Run the dashboard (headless Streamlit) on settings.dashboard_port; "
        "GALSIFT_DASHBOARD_OIDC_URL (an OpenID Connect login) or GALSIFT_DASHBOARD_PASSWORD "
        "protects every page.",
    )
    p.add_argument("--port", type=int, help="port (default: settings.dashboard_port)")
    p.add_argument("--address", default=None, help="address to bind (default: Streamlit's, all interfaces)")
    p.set_defaults(func=_dashboard)

    b = groups.bench.add_parser(
        "dashboard",
        help="server time to render each dashboard page on a table of N tiles (AppTest, cold and warm)",
        description="Load N synthetic tiles (embeddings, detections, alerts) into the configured "
        "database under a throw-away survey, time each page's script run, then delete them.",
    )
    b.add_argument("--tiles", type=positive_int, default=200_000, metavar="N", help="tiles (default: 200000)")
    b.add_argument(
        "--repeats", type=positive_int, default=5, metavar="R", help="warm runs per page (default: 5)"
    )
    b.add_argument("--keep", action="store_true", help="keep the loaded rows (reused by the next --keep run)")
    b.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    b.set_defaults(func=_bench)


def streamlit_command(
    settings: Settings, *, port: int | None = None, address: str | None = None
) -> list[str]:
    """The ``streamlit run`` command line of the dashboard."""
    argv = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.port",
        str(port or settings.dashboard_port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        # the app is a service: code changes arrive by restart, not by watching files
        "--server.fileWatcherType",
        "none",
    ]
    if address:
        argv += ["--server.address", address]
    return argv


def write_secrets(settings: Settings, *, port: int) -> Path:
    """Write Streamlit's OIDC secrets for this start to a file only this user can read.

    Returns
    -------
    Path
        ``<data_dir>/dashboard/secrets.toml``, for Streamlit's ``secrets.files`` option.
    """
    from dashboard.auth import streamlit_secrets

    folder = settings.data_dir / "dashboard"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "secrets.toml"
    # created private (not chmod-ed after the secret is in it)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(streamlit_secrets(settings, port=port))
    path.chmod(0o600)
    return path


def _dashboard(args: argparse.Namespace, settings: Settings) -> int:
    from streamlit.web import cli as streamlit_cli

    from dashboard import data

    argv = streamlit_command(settings, port=args.port, address=args.address)
    if settings.dashboard_oidc_url is not None:
        argv += ["--secrets.files", str(write_secrets(settings, port=args.port or settings.dashboard_port))]
    took = data.warm_up()
    print(
        f"galsift dashboard on port {args.port or settings.dashboard_port} "
        f"(warmed up: imports {took['imports']:.1f} s, database {took['pool']:.1f} s)",
        flush=True,
    )
    # Streamlit's own command line, in this process: the server keeps what the warm-up loaded
    sys.argv = ["streamlit", *argv[3:]]
    return int(streamlit_cli.main() or 0)  # pragma: no cover - the server runs until stopped


def _bench(args: argparse.Namespace, settings: Settings) -> int:
    from dashboard import bench

    return bench.main(settings, tiles=args.tiles, repeats=args.repeats, keep=args.keep, json_path=args.json)
