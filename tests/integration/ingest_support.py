"""Helpers shared by the ingest integration tests (not a test module)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from sqlalchemy import Engine, text

from galsift.settings import Settings, Topics
from ingest.service import IngestStage


def isolated_settings(stack_settings: Settings, name: str, **over: Any) -> Settings:
    """Settings on the session stack with topics of their own (created here), so tests never
    see each other's messages on the shared broker."""
    from deploy.stack import ensure_topics

    uid = uuid.uuid4().hex[:8]
    prefix = f"it.{name}.{uid}"
    topics = Topics(
        raw=f"{prefix}.raw",
        accepted=f"{prefix}.accepted",
        dead=f"{prefix}.dead",
        embedded=f"{prefix}.embedded",
        alerts=f"{prefix}.alerts",
        detected=f"{prefix}.detected",
    )
    settings = stack_settings.model_copy(update={"topics": topics, **over})
    ensure_topics(settings)
    return settings


def read_topic(settings: Settings, topic: str, *, timeout_s: float = 60.0) -> list[Any]:
    """Every record currently in ``topic``, from the beginning (no consumer group)."""
    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
    )
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(partitions)
        records: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} to its end in {timeout_s} s")
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def wait_for(
    predicate: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.2, what: str = ""
) -> None:
    """Poll until ``predicate()`` holds; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def count_tiles(engine: Engine, surveys: Sequence[str]) -> tuple[int, int]:
    """(rows, distinct (survey, external_id)) for these surveys."""
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT count(*), count(DISTINCT (survey, external_id)) FROM tiles WHERE survey = ANY(:s)"),
            {"s": list(surveys)},
        ).one()
    return int(row[0]), int(row[1])


def tile_rows(engine: Engine, surveys: Sequence[str]) -> list[Any]:
    """All tile rows of these surveys, as mappings."""
    with engine.connect() as conn:
        return list(
            conn.execute(text("SELECT * FROM tiles WHERE survey = ANY(:s)"), {"s": list(surveys)}).mappings()
        )


class StageRunner:
    """Runs a stage's loop in a thread (signal handlers stay pytest's) and stops it on demand."""

    def __init__(self, stage: IngestStage, *, idle_exit_s: float | None = None) -> None:
        self.stage = stage
        self.error: BaseException | None = None
        self.counters: Any = None
        self._thread = threading.Thread(target=self._run, args=(idle_exit_s,), name="stage", daemon=True)

    def _run(self, idle_exit_s: float | None) -> None:
        try:
            self.counters = self.stage.run(idle_exit_s=idle_exit_s)
        except BaseException as exc:  # handed to the test thread by join()
            self.error = exc

    def start(self) -> StageRunner:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, *, timeout_s: float, stop: bool = False) -> Any:
        if stop:
            self.stage.stop()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"stage still running after {timeout_s} s")
        if self.error is not None:
            raise self.error
        return self.counters
