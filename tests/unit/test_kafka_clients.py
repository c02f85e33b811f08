"""Kafka client settings that keep kafka-python at wire speed, and the warning when they cannot."""

from __future__ import annotations

import pytest

from galsift.kafka import FETCH_PARTITION_BYTES, check_accelerations, consumer_config, producer_config
from galsift.settings import Settings


def test_the_c_crc32c_is_installed_and_used() -> None:
    from kafka.record import util

    assert util.crc32c_c is not None
    assert check_accelerations() == []


def test_a_pure_python_crc_is_reported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from kafka.record import util

    monkeypatch.setattr(util, "crc32c_c", None)
    with caplog.at_level("WARNING"):
        warnings = check_accelerations()
    assert len(warnings) == 1 and "crc32c" in warnings[0]
    assert any("pure Python" in r.getMessage() for r in caplog.records)


def test_clients_are_sized_for_tile_messages() -> None:
    settings = Settings(_env_file=None, kafka_bootstrap="localhost:1")  # type: ignore[call-arg]
    producer = producer_config(settings)
    assert producer["enable_idempotence"] is True and producer["acks"] == "all"
    # many 0.2-0.8 MB tiles per produce request, not one
    assert producer["batch_size"] >= 1024 * 1024
    consumer = consumer_config(settings, group_id="g")
    assert consumer["enable_auto_commit"] is False
    # the 1 MiB default returns a few tiles per partition and round trip
    assert consumer["max_partition_fetch_bytes"] == FETCH_PARTITION_BYTES >= 4 * 1024 * 1024
    assert consumer["max_poll_records"] == settings.batch_size
