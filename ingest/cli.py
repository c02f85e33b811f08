"""Command-line entry points of the ingest package.

``galsift publish PATH...``    read survey files and publish them to the raw topic
``galsift ingest``             run the ingest stage (raw -> object store + tiles table -> accepted)
``galsift feed``               publish the bundled demo tiles at a steady rate
``galsift fetch RA DEC``       fetch a Legacy Surveys cutout (hips2fits) and publish it
``galsift bench ingest``       ingest throughput/latency against baselines (needs ``galsift stack up``)

Heavy modules (astropy, kafka, the database layer) are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from galsift.settings import Settings

if TYPE_CHECKING:
    from galsift.cli import CommandGroups


def register(groups: CommandGroups) -> None:
    """Add the ingest commands to the ``galsift`` command line."""
    p = groups.top.add_parser(
        "publish",
        help="publish FITS/JPEG/PNG files or dataset folders to the raw topic",
        description="Publish tiles to the raw topic. Exit status 0: all published; 1: some files "
        "could not be read (listed, the rest published); 2: a path or labels.csv is unusable.",
    )
    p.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="files, or folders (with a labels.csv, or holding FITS/images)",
    )
    p.add_argument("--survey", help="survey name for every tile (default: the folder's name)")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="publish at most N tiles")
    p.set_defaults(func=_publish)

    p = groups.top.add_parser("ingest", help="run the ingest stage: validate, store, publish accepted")
    p.add_argument("--group", metavar="G", help="Kafka consumer group (default: ingest)")
    p.add_argument("--max-batches", type=_positive_int, metavar="N", help="stop after N batches")
    p.add_argument("--idle-exit", type=float, metavar="S", help="stop after S seconds without input")
    p.set_defaults(func=_ingest)

    p = groups.top.add_parser("feed", help="publish the bundled demo tiles at a steady rate")
    p.add_argument("--rate", type=float, default=2.0, metavar="PER_S", help="tiles per second (default: 2)")
    p.add_argument("--once", action="store_true", help="one pass instead of looping until Ctrl-C")
    p.add_argument(
        "--unique",
        action="store_true",
        help="give every pass its own ids (rows grow) instead of re-publishing the same ones",
    )
    p.set_defaults(func=_feed)

    p = groups.top.add_parser(
        "fetch", help="fetch a Legacy Surveys cutout through CDS hips2fits and publish it"
    )
    p.add_argument("ra", type=float, help="ICRS right ascension, degrees")
    p.add_argument("dec", type=float, help="ICRS declination, degrees")
    p.add_argument("--size", type=int, default=256, metavar="PX", help="cutout side in pixels (default: 256)")
    p.add_argument(
        "--pixel-scale",
        type=float,
        default=0.262,
        metavar="ARCSEC",
        help="arcsec per pixel (default: 0.262, the native scale)",
    )
    p.add_argument("--bands", default="grz", help="bands, one letter each (default: grz)")
    p.add_argument("--survey", help="survey name (default: legacy_dr10_hips)")
    p.add_argument("--dry-run", action="store_true", help="print the hips2fits requests, send nothing")
    p.set_defaults(func=_fetch)

    p = groups.bench.add_parser(
        "ingest", help="ingest stage vs Kafka passthrough; batched vs per-row upserts"
    )
    p.add_argument("--data", type=Path, help="dataset folder to take tiles from (default: the bundled demo)")
    p.add_argument("-n", type=_positive_int, default=256, help="tiles per measurement (default: 256)")
    p.add_argument(
        "--repeat",
        type=_positive_int,
        default=1,
        metavar="R",
        help="stream runs; rows report the median (default: 1)",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--keep", action="store_true", help="keep bench topics, rows and pixels")
    p.set_defaults(func=_bench)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _publish(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.publish import publish_paths
    from ingest.readers import ReaderError

    try:
        report = publish_paths(settings, args.paths, survey=args.survey, limit=args.limit)
    except (ReaderError, ValueError) as exc:
        print(f"galsift publish: {exc}", file=sys.stderr)
        return 2
    print(
        f"published {report.published} tiles to {settings.topics.raw} "
        f"({report.bytes / 1e6:.1f} MB, {report.by_reference} by reference) "
        f"in {report.seconds:.1f} s ({report.per_s:.1f}/s); {report.failed} failed"
    )
    for path, reason in report.errors:
        print(f"  failed: {path}: {reason}", file=sys.stderr)
    return 1 if report.failed else 0


def _ingest(args: argparse.Namespace, settings: Settings) -> int:
    from db.engine import get_engine
    from ingest.service import IngestStage

    engine = get_engine(settings)
    try:
        stage = IngestStage(settings, engine, group_id=args.group)
        counters = stage.run(max_batches=args.max_batches, idle_exit_s=args.idle_exit)
    finally:
        engine.dispose()
    print(
        f"ingest: consumed {counters.consumed}, accepted {counters.accepted}, "
        f"rejected {counters.rejected} in {counters.batches} batches"
    )
    return 0


def _feed(args: argparse.Namespace, settings: Settings) -> int:
    import signal
    import threading

    from ingest.demo import run_feed

    if not args.rate > 0:
        print("galsift feed: --rate must be > 0", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    sent = run_feed(settings, rate=args.rate, loop=not args.once, stop=stop, unique_per_pass=args.unique)
    print(f"feed: published {sent} demo tiles to {settings.topics.raw}")
    return 0


def _fetch(args: argparse.Namespace, settings: Settings) -> int:
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    from ingest.adapters.legacysurvey import AdapterError, LegacySurveysClass
    from ingest.publish import TilePublisher

    adapter = LegacySurveysClass(survey=args.survey)
    coord = SkyCoord(args.ra * u.deg, args.dec * u.deg, frame="icrs")
    scale = args.pixel_scale * u.arcsec
    bands = tuple(args.bands)
    try:
        if args.dry_run:
            payloads = adapter.query_payloads(coord, size=args.size, pixel_scale=scale, bands=bands)
            print(json.dumps(payloads, indent=2))
            return 0
        tile = adapter.fetch_tile(coord, size=args.size, pixel_scale=scale, bands=bands)
    except (AdapterError, ValueError) as exc:
        print(f"galsift fetch: {exc}", file=sys.stderr)
        return 1
    with TilePublisher(settings) as pub:
        pub.send(tile)
    print(
        f"published {tile.survey}/{tile.external_id} ({tile.ra:.6f}, {tile.dec:+.6f}) to {settings.topics.raw}"
    )
    return 0


def _bench(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.bench import bench_ingest, format_table
    from ingest.demo import demo_dir

    data = args.data or demo_dir()
    doc = bench_ingest(settings, data=data, n=args.n, repeat=args.repeat, keep=args.keep)
    print(format_table(doc))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0
