"""``galsift labels import|list``: catalogue labels into the ``labels`` table (:mod:`ingest.labels`).

Heavy modules (the database layer, Kafka) are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from galsift.cli import CommandGroups
    from galsift.settings import Settings


def register(groups: CommandGroups) -> None:
    """Add ``galsift labels import`` and ``galsift labels list`` to the command line."""
    parser = groups.top.add_parser("labels", help="catalogue labels in the database (import, list)")
    sub = parser.add_subparsers(dest="labels_command", required=True, metavar="ACTION")
    p = sub.add_parser(
        "import",
        help="load a labels.csv column into the labels table (publishing missing tiles first)",
        description="Load one column of a labels.csv folder into the labels table for the tiles it "
        "names. Tiles not stored yet are published to the raw topic and waited for (a running "
        "`galsift ingest` stores them). Re-importing changes nothing. Text columns become class "
        "indices (the class list is kept in label_sets), vote fractions need --threshold, empty "
        "cells are skipped. Exit status 0: every labelled row has its label; 1: some tiles were "
        "not stored (listed); 2: unusable folder, column or rule.",
    )
    p.add_argument("folder", type=Path, metavar="DIR", help="dataset folder with labels.csv")
    p.add_argument("--label-set", required=True, metavar="NAME", help="label set name, e.g. gz_decals_ring")
    p.add_argument("--column", required=True, metavar="COL", help="the labels.csv column to import")
    p.add_argument(
        "--threshold", type=float, default=None, metavar="T", help="binarise a numeric column: >= T -> 1"
    )
    p.add_argument("--invert", action="store_true", help="with --threshold: < T -> 1 (for 'no' fractions)")
    p.add_argument(
        "--classes",
        default=None,
        metavar="A,B,...",
        help="class order of a text column on first import (default: sorted); later imports append",
    )
    p.add_argument("--author", default=None, help="labels.author (default: catalogue:<label-set>)")
    p.add_argument("--survey", default=None, help="survey name of the tiles (default: the folder's name)")
    p.add_argument(
        "--no-publish", action="store_true", help="label only tiles already stored; publish nothing"
    )
    p.add_argument(
        "--wait",
        type=float,
        default=None,
        metavar="S",
        help="seconds to wait for ingest to store published tiles (default: 300)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_import)

    p = sub.add_parser("list", help="label sets with their kind, classes and counts per value")
    p.set_defaults(func=_list)


def _import(args: argparse.Namespace, settings: Settings) -> int:
    from kafka.errors import KafkaError

    from db.engine import get_engine
    from ingest.labels import DEFAULT_WAIT_S, LabelImportError, LabelRule, format_report, import_labels

    classes = None
    if args.classes is not None:
        classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    rule = LabelRule(column=args.column, threshold=args.threshold, invert=args.invert, classes=classes)
    engine = get_engine(settings)
    try:
        report = import_labels(
            settings,
            engine,
            args.folder,
            label_set=args.label_set,
            rule=rule,
            author=args.author,
            survey=args.survey,
            publish=not args.no_publish,
            wait_s=DEFAULT_WAIT_S if args.wait is None else args.wait,
            progress=not args.no_progress,
        )
    except LabelImportError as exc:
        print(f"galsift labels import: {exc}", file=sys.stderr)
        return 2
    except KafkaError as exc:
        print(
            f"galsift labels import: cannot publish the missing tiles to {settings.bootstrap_servers}: {exc!r} "
            "(is Kafka up? --no-publish labels only the tiles already stored)",
            file=sys.stderr,
        )
        return 2
    finally:
        engine.dispose()
    print(format_report(report))
    return 0 if report.complete else 1


def _list(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy import text

    from db.engine import get_engine

    engine = get_engine(settings)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT l.label_set, coalesce(s.kind, 'binary'), coalesce(s.classes, '{}'), l.value, "
                    "count(*) FROM labels l LEFT JOIN label_sets s ON s.name = l.label_set "
                    "GROUP BY 1, 2, 3, 4 ORDER BY 1, 4"
                )
            ).all()
    finally:
        engine.dispose()
    if not rows:
        print("no labels")
        return 0
    print(f"{'label set':<32} {'kind':<8} {'value':<24} {'rows':>7}")
    for name, kind, classes, value, n in rows:
        shown = (
            f"{value} ({classes[value]})" if kind == "classes" and 0 <= value < len(classes) else str(value)
        )
        print(f"{name:<32} {kind:<8} {shown:<24} {n:>7}")
    return 0
