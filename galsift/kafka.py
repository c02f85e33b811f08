"""Kafka clients configured once for every galsift process: producer, consumer, admin, topics.

The client settings here are what make kafka-python run at wire speed with 0.2–0.8 MB tile
messages (see the README's ingest benchmark):

- the C ``crc32c`` package: without it kafka-python checksums every record batch in pure Python
  (about 130 ms per MB), which bounds a consumer at a few dozen tiles per second.
  :func:`check_accelerations` logs a clear warning when it is missing;
- fetches sized for tile messages (``max_partition_fetch_bytes`` 4 MiB): measured on the demo
  tiles, the raw consume rate is ~1.5-2x higher at 4 MiB per partition than at 1 MiB (a few
  tiles per round trip) or at 8-16 MiB (kafka-python's receive path slows down on very large
  responses); a message larger than the limit is still fetched whole;
- producer batches that hold many tiles (``batch_size``) with idempotence on, so up to five
  requests can be in flight per connection without reordering or duplicates.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

from kafka import KafkaConsumer, KafkaProducer

from galsift.settings import Settings

if TYPE_CHECKING:
    from kafka.admin import KafkaAdminClient

log = logging.getLogger(__name__)

#: largest message the local broker accepts and the clients send or fetch
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: producer batch per partition: many tiles per produce request
PRODUCER_BATCH_BYTES = 4 * 1024 * 1024
#: bytes a fetch may return per partition (see above), and in all
FETCH_PARTITION_BYTES = 4 * 1024 * 1024
FETCH_MAX_BYTES = 64 * 1024 * 1024


def check_accelerations() -> list[str]:
    """Warn about C accelerations kafka-python would silently fall back from.

    Returns
    -------
    list of str
        The warnings logged (empty when everything is in place).
    """
    from kafka.record import util

    warnings = []
    # kafka-python picks the C ``crc32c`` package at import time when it is installed
    if util.crc32c_c is None:
        warnings.append(
            "kafka-python computes record-batch CRC-32C in pure Python (~1000x slower): "
            "install the 'crc32c' package (a galsift dependency) into this environment"
        )
    for text in warnings:
        log.warning(text)
    return warnings


def producer_config(settings: Settings) -> dict[str, Any]:
    """The configuration of every galsift producer (see :func:`make_producer`)."""
    return {
        "bootstrap_servers": settings.bootstrap_servers,
        "acks": "all",
        "enable_idempotence": True,
        "max_in_flight_requests_per_connection": 5,
        "linger_ms": 5,
        "batch_size": PRODUCER_BATCH_BYTES,
        "max_request_size": MAX_MESSAGE_BYTES,
        "compression_type": None if settings.kafka_compression == "none" else settings.kafka_compression,
        # a broker restart is ridden out by retrying for up to two minutes, not turned into an
        # error at once (retries are unbounded by default; the delivery timeout bounds them)
        "delivery_timeout_ms": 120_000,
    }


def make_producer(settings: Settings, **overrides: Any) -> KafkaProducer:
    """An idempotent, fully acknowledged producer for outputs and dead letters.

    Idempotence keeps the order and drops broker-side duplicates of retried batches even with
    several requests in flight, so throughput does not have to be bought with ordering.
    """
    return KafkaProducer(**{**producer_config(settings), **overrides})


def consumer_config(settings: Settings, *, group_id: str) -> dict[str, Any]:
    """The configuration of every galsift consumer-group member (see :func:`make_consumer`)."""
    return {
        "bootstrap_servers": settings.bootstrap_servers,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_poll_records": settings.batch_size,
        "max_partition_fetch_bytes": FETCH_PARTITION_BYTES,
        "fetch_max_bytes": FETCH_MAX_BYTES,
        # a batch on a slow CPU encoder can take minutes: stay in the group meanwhile
        "max_poll_interval_ms": 600_000,
        # but notice a crashed member within seconds, so its partitions move on quickly
        "session_timeout_ms": 10_000,
        "heartbeat_interval_ms": 3_000,
    }


def make_consumer(settings: Settings, topic: str, *, group_id: str, **overrides: Any) -> KafkaConsumer:
    """A consumer-group member with manual commits and fetches sized for tile messages."""
    consumer = KafkaConsumer(topic, **{**consumer_config(settings, group_id=group_id), **overrides})
    # load the topic's partitions before the first poll joins the group: kafka-python 3.0 can
    # join with metadata that lacks the topic, and the group leader then assigns nothing and
    # does not rejoin until the next metadata refresh (5 minutes). Seen as "No partition
    # metadata for topic" and a consumer with no partitions for minutes.
    consumer.partitions_for_topic(topic)
    return consumer


@contextmanager
def kafka_admin(settings: Settings, *, timeout_s: float = 10.0) -> Iterator[KafkaAdminClient]:
    """A Kafka admin client on ``settings.kafka_bootstrap``, closed on exit.

    Raises
    ------
    kafka.errors.KafkaError
        If no broker answers within ``timeout_s``.
    """
    from kafka.admin import KafkaAdminClient

    ms = int(timeout_s * 1000)
    admin = KafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers,
        client_id="galsift-admin",
        bootstrap_timeout_ms=ms,
        request_timeout_ms=max(ms, 5000),
    )
    try:
        yield admin
    finally:
        admin.close()


def ensure_topics(settings: Settings, *, timeout_s: float = 30.0, extra: tuple[str, ...] = ()) -> list[str]:
    """Create every topic of ``settings.topics`` (and ``extra``) that is missing.

    Idempotent. A topic with fewer partitions than ``kafka_partitions`` is grown (consumer
    groups scale up to the partition count); one with more is left as it is, since Kafka cannot
    shrink topics. Waits until every partition has a leader, so producers can start at once.

    Returns
    -------
    list of str
        The topics that were created.
    """
    from kafka.errors import TopicAlreadyExistsError

    wanted = list(dict.fromkeys([*settings.topics.model_dump().values(), *extra]))
    n = settings.kafka_partitions
    with kafka_admin(settings, timeout_s=timeout_s) as admin:
        existing = set(admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        if missing:
            # replication factor -1: the cluster's default (1 locally, 3 in production)
            spec: dict[str, dict[str, Any]] = {
                t: {"num_partitions": n, "replication_factor": -1} for t in missing
            }
            # another process may create them between list and create: fine
            with suppress(TopicAlreadyExistsError):
                admin.create_topics(spec, timeout_ms=int(timeout_s * 1000))
            log.info("created topics %s with %d partitions", ", ".join(missing), n)
        present = [t for t in wanted if t in existing]
        counts = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(present)}
        grow = {t: n for t, count in counts.items() if count < n}
        if grow:
            admin.create_partitions(grow, timeout_ms=int(timeout_s * 1000))
            log.info("grew topics %s to %d partitions", ", ".join(grow), n)
        for t, count in counts.items():
            if count > n:
                log.warning("topic %s has %d partitions, more than kafka_partitions=%d", t, count, n)
        admin.wait_for_topics(wanted, timeout_ms=int(timeout_s * 1000))
    return missing


def topic_partitions(settings: Settings) -> dict[str, int]:
    """Partition count of each existing topic of ``settings.topics``."""
    wanted = list(dict.fromkeys(settings.topics.model_dump().values()))
    with kafka_admin(settings) as admin:
        existing = set(admin.list_topics())
        present = [t for t in wanted if t in existing]
        return {t["name"]: len(t["partitions"]) for t in admin.describe_topics(present)}
