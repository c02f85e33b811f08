"""A steady feed of the bundled demo tiles (``ingest/demo_tiles``) for ``galsift up --demo``.

Each folder under ``ingest/demo_tiles`` becomes survey ``demo_<folder>``, so demo data is easy to
tell apart from (and delete next to) real survey tiles. The feed interleaves the folders and
publishes at a fixed rate. When it loops, every pass re-publishes the same ids by default: ingest
upserts, so the tables do not fill with copies of the same 123 galaxies (which would crowd every
similarity search), while the stream, the stages and their lag stay visibly busy.
``unique_per_pass=True`` instead suffixes ids with ``~<pass>`` for load tests that want rows to grow.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from galsift import messages
from galsift.kafka import make_producer
from galsift.settings import Settings
from ingest.readers import SurveyTile, iter_sources

log = logging.getLogger(__name__)

#: survey-name prefix of every demo tile
DEMO_PREFIX = "demo_"


def demo_dir() -> Path:
    """The bundled demo folder (``ingest/demo_tiles``, shipped as package data of ``ingest``).

    Raises
    ------
    FileNotFoundError
        If the installation has no demo folder.
    """
    folder = Path(__file__).resolve().parent / "demo_tiles"
    if not folder.is_dir():
        raise FileNotFoundError(f"no demo_tiles/ folder beside {__file__}")
    return folder


def load_demo_tiles(folder: Path | None = None) -> list[SurveyTile]:
    """Read every demo tile once, interleaving the folders (one of each kind in turn).

    Raises
    ------
    FileNotFoundError
        If the folder holds no dataset folders.
    """
    root = folder or demo_dir()
    datasets = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not datasets:
        raise FileNotFoundError(f"no demo datasets under {root}")
    per_set = [[s.read() for s in iter_sources([d], survey=f"{DEMO_PREFIX}{d.name}")] for d in datasets]
    mixed = itertools.chain.from_iterable(itertools.zip_longest(*per_set))
    return [t for t in mixed if t is not None]


def run_feed(
    settings: Settings,
    *,
    rate: float,
    loop: bool = True,
    stop: threading.Event | None = None,
    unique_per_pass: bool = False,
    folder: Path | None = None,
) -> int:
    """Publish the demo tiles to ``settings.topics.raw`` at a steady rate.

    Parameters
    ----------
    settings
        Process settings (broker, raw topic).
    rate
        Tiles per second (> 0).
    loop
        Start over after the last tile, until ``stop`` is set; otherwise one pass.
    stop
        Set it to end the feed; the current tile is finished and everything sent is flushed.
    unique_per_pass
        Give each pass after the first its own ids (``<id>~<pass>``) instead of re-publishing.
    folder
        Demo folder to use instead of the bundled one.

    Returns
    -------
    int
        Tiles published (and acknowledged by the broker).

    Raises
    ------
    ValueError
        If ``rate`` is not positive.
    kafka.errors.KafkaError
        If the broker refuses messages.
    """
    if not rate > 0:
        raise ValueError(f"rate must be > 0 tiles/s, not {rate}")
    stop = stop or threading.Event()
    tiles = load_demo_tiles(folder)
    encoded = [(t.key, t.encode()) for t in tiles]
    producer = make_producer(settings)
    pending: list[Any] = []
    sent = 0
    interval = 1.0 / rate
    start = time.monotonic()
    log.info("demo feed: %d tiles at %.3g/s to %s (loop=%s)", len(tiles), rate, settings.topics.raw, loop)
    try:
        for key, value in _messages(tiles, encoded, loop=loop, unique_per_pass=unique_per_pass):
            # a fixed schedule, not a fixed sleep: a slow send does not lower the rate
            delay = start + sent * interval - time.monotonic()
            if delay < -1.0:  # stalled (broker away) for over a second: resume, do not burst
                start, delay = time.monotonic() - sent * interval, 0.0
            if delay > 0 and stop.wait(delay):
                break
            if stop.is_set():
                break
            pending.append(
                producer.send(settings.topics.raw, key=key, value=value, headers=messages.headers("tile"))
            )
            sent += 1
            if len(pending) >= 50:
                _settle(producer, pending)
    finally:
        try:
            _settle(producer, pending)
        finally:
            producer.close()
    log.info("demo feed: %d tiles published", sent)
    return sent


def _messages(
    tiles: list[SurveyTile], encoded: list[tuple[bytes, bytes]], *, loop: bool, unique_per_pass: bool
) -> Iterator[tuple[bytes, bytes]]:
    passes = itertools.count() if loop else range(1)
    for n in passes:
        if n == 0 or not unique_per_pass:
            yield from encoded
            continue
        for tile in tiles:
            record = tile.to_record()
            record["external_id"] = f"{tile.external_id}~{n}"
            yield f"{tile.survey}/{record['external_id']}".encode(), messages.encode("tile", record)


def _settle(producer: Any, pending: list[Any]) -> None:
    """Flush and raise if the broker refused anything."""
    producer.flush(timeout=60)
    for fut in pending:
        fut.get(timeout=60)
    pending.clear()
