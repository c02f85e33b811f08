"""Publish survey tiles to ``tiles.raw``.

Every message is keyed ``survey/external_id``, so all versions of one object land on one
partition (and so in order, at one ingest worker), and carries the ``schema`` header. Tiles whose
compressed pixels would not fit a default Kafka message travel by reference: the pixels are put in
the object store under ``incoming/`` and the message carries ``pixels_uri``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaProducer

from galsift import messages
from galsift.kafka import make_producer
from galsift.objectstore import ObjectStore
from galsift.settings import Settings
from ingest.readers import ReaderError, Source, SurveyTile, iter_sources

log = logging.getLogger(__name__)

#: compressed pixel bytes above which a tile is sent by reference: Kafka brokers refuse messages
#: over ``message.max.bytes`` (1 MiB by default), and a dead letter must still fit the payload
MAX_INLINE_BYTES = 900_000


@dataclass
class PublishReport:
    """What one publish run did."""

    published: int = 0
    by_reference: int = 0
    failed: int = 0
    bytes: int = 0
    seconds: float = 0.0
    #: ``(source, reason)`` of the first failures, for the operator
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        """Published tiles per second."""
        return self.published / self.seconds if self.seconds > 0 else 0.0


class TilePublisher:
    """Sends :class:`~ingest.readers.SurveyTile` objects to the raw topic.

    Parameters
    ----------
    settings
        Process settings (bootstrap servers, topic names, object store).
    producer
        A producer to share; by default an idempotent, fully acknowledged one.
    topic
        Destination topic; ``settings.topics.raw`` by default.
    max_inline_bytes
        Larger compressed pixel payloads go to the object store and travel by URI.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        producer: KafkaProducer | None = None,
        topic: str | None = None,
        max_inline_bytes: int = MAX_INLINE_BYTES,
    ) -> None:
        self.settings = settings
        self.topic = topic or settings.topics.raw
        self.max_inline_bytes = max_inline_bytes
        self._own_producer = producer is None
        self._producer = producer or make_producer(settings)
        self._store: ObjectStore | None = None
        self._futures: list[Any] = []

    def send(self, tile: SurveyTile) -> tuple[int, bool]:
        """Queue one tile for sending; returns the message size and whether pixels went by URI."""
        value, by_reference = self.encode(tile)
        self._futures.append(
            self._producer.send(self.topic, key=tile.key, value=value, headers=messages.headers("tile"))
        )
        return len(value), by_reference

    def encode(self, tile: SurveyTile) -> tuple[bytes, bool]:
        """The message value for ``tile``, spilling large pixels to the object store.

        Returns
        -------
        tuple
            ``(value, by_reference)``.
        """
        record = tile.to_record()
        if len(record["pixels"]) <= self.max_inline_bytes:
            return messages.encode("tile", record), False
        if self._store is None:
            self._store = ObjectStore(self.settings.pixel_store_url)
        uri, _ = self._store.put_array(f"incoming/{tile.survey}/{tile.tile_id}.npy", tile.pixels)
        return tile.encode(pixels_uri=uri), True

    def flush(self, *, timeout: float = 60.0) -> int:
        """Wait until every queued message is acknowledged; returns how many were.

        Raises
        ------
        kafka.errors.KafkaError
            If the broker refused a message (nothing is silently dropped).
        """
        self._producer.flush(timeout=timeout)
        futures, self._futures = self._futures, []
        for fut in futures:
            fut.get(timeout=timeout)
        return len(futures)

    def close(self) -> None:
        """Flush, and close the producer if this publisher made it."""
        self.flush()
        if self._own_producer:
            self._producer.close()

    def __enter__(self) -> TilePublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def publish_sources(
    settings: Settings,
    sources: Iterable[Source],
    *,
    publisher: TilePublisher | None = None,
    flush_every: int = 256,
) -> PublishReport:
    """Read and publish every source; unreadable files are counted and reported, not fatal.

    Parameters
    ----------
    settings
        Process settings.
    sources
        From :func:`ingest.readers.iter_sources`.
    publisher
        A publisher to use (and leave open); by default one is made and closed here.
    flush_every
        Wait for acknowledgements after this many messages, bounding memory held in flight.
    """
    report = PublishReport()
    own = publisher is None
    pub = publisher or TilePublisher(settings)
    start = time.perf_counter()
    try:
        for source in sources:
            try:
                tile = source.read()
                size, by_reference = pub.send(tile)
            except (ReaderError, messages.MessageError) as exc:
                report.failed += 1
                if len(report.errors) < 20:
                    report.errors.append((str(source.path), str(exc)))
                log.warning("skipping %s: %s", source.path, exc)
                continue
            report.published += 1
            report.bytes += size
            report.by_reference += int(by_reference)
            if report.published % flush_every == 0:
                pub.flush()
        pub.flush()
    finally:
        if own:
            pub.close()
    report.seconds = time.perf_counter() - start
    return report


def publish_paths(
    settings: Settings,
    paths: Iterable[Path | str],
    *,
    survey: str | None = None,
    limit: int | None = None,
) -> PublishReport:
    """Publish the tiles found in files and dataset folders (see :func:`ingest.readers.iter_sources`)."""
    return publish_sources(settings, iter_sources(paths, survey=survey, limit=limit))
