"""The detectors' subcommands: ``galsift detect`` here, each topic's in a ``cli_<topic>`` module.

Heavy imports (torch, torchvision, astropy) happen inside the command handlers, so building the
parser stays fast.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from galsift.settings import Settings

if TYPE_CHECKING:
    from galsift.cli import CommandGroups

#: modules under detectors/ whose ``register(groups)`` adds commands
TOPICS = (
    "detectors.cli_morphology",
    "detectors.cli_lens",
    "detectors.cli_alerts",
    "detectors.retrain",
    "detectors.filters",
)


def register(groups: CommandGroups) -> None:
    """Add ``galsift detect`` and each topic's commands to the ``galsift`` command line."""
    p = groups.top.add_parser(
        "detect",
        help="run the detector service (tiles.embedded -> morphology + lens finder -> alerts.lens)",
        description="A consumer-group member on tiles.embedded: runs the morphology heads on the "
        "embeddings and the Mask R-CNN lens finder on the stored pixels, upserts detections keyed by "
        "(tile, model version, detector, label), creates alerts for lens scores >= "
        "GALSIFT_ALERT_THRESHOLD (cross-matched against known lenses, webhook deliveries queued in "
        "the outbox), publishes them on alerts.lens, then commits.",
    )
    p.add_argument("--group", help="consumer group (default: detector)")
    p.add_argument("--lens-checkpoint", type=Path, help="lens finder checkpoint (default: the shipped one)")
    p.add_argument(
        "--morphology",
        type=Path,
        help="morphology heads artifact (default: the promoted, else the shipped one)",
    )
    p.add_argument("--max-batches", type=int, help="stop after N batches")
    p.add_argument("--idle-exit", type=float, metavar="S", help="stop after S seconds without input")
    p.set_defaults(func=_detect)
    for name in TOPICS:
        importlib.import_module(name).register(groups)


def _detect(args: argparse.Namespace, settings: Settings) -> int:
    from detectors.service import run

    return run(
        settings,
        group=args.group,
        max_batches=args.max_batches,
        idle_exit_s=args.idle_exit,
        lens_checkpoint=args.lens_checkpoint,
        morphology_path=args.morphology,
    )
