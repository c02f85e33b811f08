"""The local stack (deploy/stack.py) against a real Kafka broker and a real PostgreSQL."""

from __future__ import annotations

import argparse
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, inspect, text

from deploy import stack
from galsift.settings import Settings

pytestmark = pytest.mark.integration


def _pom_kafka_version() -> str:
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", stack.KAFKA_POM.read_text())
    if match is None:
        raise AssertionError(f"no kafka.version property in {stack.KAFKA_POM}")
    return match.group(1)


def test_broker_runs_the_pinned_kafka_and_reports_running(stack_settings: Settings) -> None:
    status = stack.kafka_status(stack_settings)
    assert status.local and status.running and status.listening
    assert isinstance(status.pid, int)
    assert status.kafka_dir == stack_settings.kafka_dir
    log = status.log_file.read_text()
    assert f"Kafka version: {_pom_kafka_version()}" in log
    assert "Kafka Server started" in log
    assert str(status.pid) in status.describe()


def test_stack_up_again_is_a_fast_no_op(stack_settings: Settings) -> None:
    before = stack.kafka_status(stack_settings)
    cluster_id = (stack_settings.kafka_dir / "cluster_id").read_text()
    started = time.monotonic()
    after = stack.stack_up(stack_settings)
    elapsed = time.monotonic() - started
    # the same broker (no restart, no re-format), and no Maven or JVM start-up in the way
    assert after.kafka.pid == before.pid
    assert (stack_settings.kafka_dir / "cluster_id").read_text() == cluster_id
    assert after.postgres.running and after.postgres.embedded
    assert elapsed < 20, f"second stack_up took {elapsed:.1f} s"


def test_topics_exist_with_the_configured_partitions(stack_settings: Settings) -> None:
    expected = set(stack_settings.topics.model_dump().values())
    counts = stack.topic_partitions(stack_settings)
    assert set(counts) == expected
    assert all(n == stack_settings.kafka_partitions for n in counts.values()), counts
    # idempotent: nothing left to create
    assert stack.ensure_topics(stack_settings) == []


def test_broker_config_allows_big_tiles_and_no_implicit_topics(stack_settings: Settings) -> None:
    from kafka.admin import ConfigResource, ConfigResourceType

    with stack.kafka_admin(stack_settings) as admin:
        result = admin.describe_configs([ConfigResource(ConfigResourceType.BROKER, "1")], config_filter="all")
    (configs,) = result["broker"].values()
    value = {key: entry["value"] for key, entry in configs.items()}
    assert value["auto.create.topics.enable"] == "false"
    assert int(value["message.max.bytes"]) == stack.MAX_MESSAGE_BYTES
    assert int(value["replica.fetch.max.bytes"]) == stack.MAX_MESSAGE_BYTES
    assert Path(value["log.dirs"]).is_relative_to(stack_settings.kafka_dir)


def test_produce_consume_round_trip_of_a_large_message(stack_settings: Settings) -> None:
    from kafka import KafkaConsumer, TopicPartition

    from galsift.stage import make_producer

    topic = f"test.stack.{uuid.uuid4().hex[:8]}"
    with stack.kafka_admin(stack_settings) as admin:
        admin.create_topics({topic: {"num_partitions": 2, "replication_factor": 1}}, wait_for_metadata=True)
    # bigger than Kafka's 1 MB default limit: the 16 MiB settings must be in force
    payload = uuid.uuid4().bytes * (3 * 1024 * 1024 // 16)
    key = uuid.uuid4().hex.encode()
    producer = make_producer(stack_settings)
    try:
        meta = producer.send(topic, key=key, value=payload, partition=1).get(timeout=30)
    finally:
        producer.close()
    consumer = KafkaConsumer(
        bootstrap_servers=stack_settings.bootstrap_servers,
        enable_auto_commit=False,
        max_partition_fetch_bytes=stack.MAX_MESSAGE_BYTES,
        fetch_max_bytes=stack.MAX_MESSAGE_BYTES,
    )
    try:
        tp = TopicPartition(topic, 1)
        consumer.assign([tp])
        consumer.seek(tp, meta.offset)
        got: list[Any] = []
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            got = consumer.poll(timeout_ms=1000).get(tp, [])
    finally:
        consumer.close()
    assert got, "the produced message never came back"
    assert got[0].key == key
    assert got[0].value == payload


def test_schema_has_pgvector_and_the_hnsw_index(engine: Engine) -> None:
    from db.models import SQLModel

    with engine.connect() as conn:
        assert (
            conn.execute(text("select count(*) from pg_extension where extname = 'vector'")).scalar_one() == 1
        )
        hnsw = (
            conn.execute(
                text(
                    "select indexdef from pg_indexes where tablename = 'embeddings' "
                    "and indexdef ilike '%using hnsw%'"
                )
            )
            .scalars()
            .all()
        )
    assert len(hnsw) == 1 and "vector_cosine_ops" in hnsw[0]
    assert set(SQLModel.metadata.tables) <= set(inspect(engine).get_table_names())


def test_alembic_builds_the_whole_schema_on_an_empty_postgres(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from db import engine as db_engine
    from db.models import SQLModel

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path_factory.mktemp("fresh"),
        database_url=None,
    )
    try:
        eng = create_engine(db_engine.start_embedded(settings))
        try:
            assert inspect(eng).get_table_names() == []
            db_engine.upgrade(settings)
            tables = set(inspect(eng).get_table_names())
            with eng.connect() as conn:
                version = conn.execute(text("select version_num from alembic_version")).scalar_one()
                hnsw = conn.execute(
                    text(
                        "select count(*) from pg_indexes where tablename = 'embeddings' "
                        "and indexdef ilike '%using hnsw%'"
                    )
                ).scalar_one()
        finally:
            eng.dispose()
        cfg = db_engine.alembic_config(settings)
        assert isinstance(cfg, Config)
        head = ScriptDirectory.from_config(cfg).get_current_head()
    finally:
        db_engine.stop_embedded(settings)
    assert version == head
    assert set(SQLModel.metadata.tables) <= tables
    assert hnsw == 1
    assert not db_engine.embedded_running(settings)


def test_broker_restart_keeps_topics_and_messages(stack_settings: Settings) -> None:
    """Runs last among the Kafka tests: it stops and restarts the session's broker."""
    from kafka import KafkaConsumer, TopicPartition

    from galsift.stage import make_producer

    topic = f"test.restart.{uuid.uuid4().hex[:8]}"
    with stack.kafka_admin(stack_settings) as admin:
        admin.create_topics({topic: {"num_partitions": 1, "replication_factor": 1}}, wait_for_metadata=True)
    producer = make_producer(stack_settings)
    try:
        producer.send(topic, value=b"before restart").get(timeout=30)
    finally:
        producer.close()
    meta = (stack_settings.kafka_dir / "logs" / "meta.properties").read_text()
    old_pid = stack.kafka_status(stack_settings).pid

    started = time.monotonic()
    assert stack.kafka_down(stack_settings) is True
    stopped_in = time.monotonic() - started
    down = stack.kafka_status(stack_settings)
    assert not down.running and not down.listening and down.pid is None
    assert not (stack_settings.kafka_dir / "broker.pid").exists()
    assert stack.kafka_down(stack_settings) is False  # nothing left to stop
    # SIGTERM was enough: a controlled shutdown, not the SIGKILL fallback
    assert stopped_in < 30

    up = stack.kafka_up(stack_settings)
    assert up.running and up.pid != old_pid
    assert (stack_settings.kafka_dir / "logs" / "meta.properties").read_text() == meta
    assert stack.topic_partitions(stack_settings) == {
        t: stack_settings.kafka_partitions for t in stack_settings.topics.model_dump().values()
    }
    consumer = KafkaConsumer(bootstrap_servers=stack_settings.bootstrap_servers, enable_auto_commit=False)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        got: list[Any] = []
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            got = consumer.poll(timeout_ms=1000).get(tp, [])
    finally:
        consumer.close()
    assert [r.value for r in got] == [b"before restart"]


def test_stack_status_command_exits_zero_on_a_running_stack(
    stack_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    from deploy import cli

    assert cli._stack_status(argparse.Namespace(), stack_settings) == 0
    out = capsys.readouterr().out
    assert "kafka     running" in out and "postgres  running" in out
    # the versions an operator checks first: the broker, PostgreSQL and pgvector >= 0.8
    assert "[Kafka 4." in out and "PostgreSQL 18" in out
    assert re.search(r"pgvector 0\.(8|9)\.", out) or re.search(r"pgvector [1-9]\.", out), out
    # table sizes include the detector's outputs
    assert "detections=" in out and "alerts=" in out
