"""Replays are harmless and seen: a crash between write and commit, duplicates inside one batch,
and a Kafka broker killed and restarted under running services.

Each test observes the replay itself (a second stage consuming the same offsets, write retries,
dead letters), so removing the protection it names makes it fail rather than pass quietly: with
the upsert turned into a plain INSERT the replayed batch hits the unique key and its tiles end in
``tiles.dead``; without the in-batch de-duplication the multi-row upsert touches a row twice and
the batch needs write retries.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from ingest_support import count_tiles, isolated_settings, read_topic, tile_rows, wait_for
from sqlalchemy import Engine, text

from db.repo import count_rows
from galsift.settings import Settings
from ingest.publish import TilePublisher, publish_paths
from ingest.readers import iter_sources
from ingest.service import IngestStage

pytestmark = pytest.mark.integration


class CrashBeforeCommit(IngestStage):
    """An ingest stage whose process 'dies' after its first durable batch, before committing."""

    def run_once(self) -> int:
        consumer = self.consumer()
        real_commit = consumer.commit

        def crash(*args: Any, **kwargs: Any) -> None:
            raise KeyboardInterrupt("simulated crash between write and commit")

        consumer.commit = crash  # type: ignore[method-assign]
        try:
            return super().run_once()
        finally:
            consumer.commit = real_commit  # type: ignore[method-assign]


def _drain(stage: IngestStage, n: int, *, timeout_s: float = 120.0) -> int:
    """Run batches until ``n`` records were consumed; returns how many were."""
    done = 0
    deadline = time.monotonic() + timeout_s
    while done < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"consumed {done} of {n}")
        done += stage.run_once()
    return done


def _errors(engine: Engine, settings: Settings) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM ingest_errors WHERE topic = :t"), {"t": settings.topics.raw}
            ).scalar_one()
        )


def test_a_batch_replayed_after_a_crash_before_commit_changes_nothing(
    stack_settings: Settings, engine: Engine, repo_data: Path
) -> None:
    settings = isolated_settings(stack_settings, "replay", batch_size=500)
    survey = f"replay_{uuid.uuid4().hex[:6]}"
    published = publish_paths(
        settings, [repo_data / "cfhtls_lens_candidates"], survey=survey, limit=30
    ).published
    assert published == 30
    group = f"ingest-replay-{uuid.uuid4().hex[:6]}"

    crashing = CrashBeforeCommit(settings, engine, group_id=group)
    with pytest.raises(KeyboardInterrupt):
        _drain(crashing, published)
    crashing.close()
    stored_before = {r["id"]: r["checksum"] for r in tile_rows(engine, [survey])}
    assert len(stored_before) > 0, "the crashed batch wrote nothing: no replay to test"

    # a new member of the same group gets the uncommitted batch again
    stage = IngestStage(settings, engine, group_id=group)
    try:
        replayed = _drain(stage, published)
    finally:
        stage.close()
    assert replayed == published  # every record came back, the written ones included
    assert stage.counters.write_retries == 0
    assert stage.counters.rejected == 0
    assert _errors(engine, settings) == 0
    assert read_topic(settings, settings.topics.dead) == []
    assert count_tiles(engine, [survey]) == (published, published)
    after = {r["id"]: r["checksum"] for r in tile_rows(engine, [survey])}
    assert {k: after[k] for k in stored_before} == stored_before  # same rows, same pixels


def test_duplicates_inside_one_batch_are_written_once_last_copy_wins(
    stack_settings: Settings, engine: Engine, repo_data: Path
) -> None:
    settings = isolated_settings(stack_settings, "dupes", batch_size=500)
    survey = f"dupes_{uuid.uuid4().hex[:6]}"
    tiles = [s.read() for s in iter_sources([repo_data / "gz_decals_examples"], survey=survey, limit=5)]
    again = replace(tiles[0], meta={**tiles[0].meta, "republished": "yes"})
    with TilePublisher(settings) as pub:
        for tile in [*tiles, again]:
            pub.send(tile)
    stage = IngestStage(settings, engine, group_id=f"ingest-dupes-{uuid.uuid4().hex[:6]}")
    try:
        assert _drain(stage, 6) == 6
    finally:
        stage.close()
    # both copies share a key, so a partition, so one fetch and one batch (batch_size 500)
    assert stage.counters.write_retries == 0
    assert read_topic(settings, settings.topics.dead) == []
    assert count_tiles(engine, [survey]) == (5, 5)
    rows = {r["external_id"]: r for r in tile_rows(engine, [survey])}
    assert rows[tiles[0].external_id]["meta"].get("republished") == "yes"


def _service(argv: list[str], settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    from deploy.cli import service_command, service_env

    with log.open("ab") as out:
        return subprocess.Popen(
            service_command(argv),
            env=service_env(settings),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _embedded(engine: Engine, survey: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(DISTINCT e.tile_id) FROM embeddings e JOIN tiles t ON t.id = e.tile_id "
                    "WHERE t.survey = :s"
                ),
                {"s": survey},
            ).scalar_one()
        )


def test_services_ride_out_a_killed_and_restarted_broker(
    stack_settings: Settings, engine: Engine, repo_data: Path, tmp_path: Path
) -> None:
    from deploy import stack

    # small batches: the stream is many batches long, so the kill lands inside it
    settings = isolated_settings(stack_settings, "broker", batch_size=4)
    survey = f"broker_{uuid.uuid4().hex[:6]}"
    first = publish_paths(settings, [repo_data / "cfhtls_lens_candidates"], survey=survey, limit=40).published
    logs = {name: tmp_path / f"{name}.log" for name in ("ingest", "encode")}
    procs = {name: _service([name], settings, log) for name, log in logs.items()}

    def tail() -> str:
        return "\n".join(f"--- {n}\n{p.read_text()[-3000:]}" for n, p in logs.items())

    try:
        wait_for(
            lambda: count_tiles(engine, [survey])[0] > 0 or any(p.poll() is not None for p in procs.values()),
            timeout_s=120,
            what="the first tiles stored",
        )
        status = stack.kafka_status(stack_settings)
        assert status.pid is not None
        os.kill(status.pid, signal.SIGKILL)
        rows_at_kill = count_tiles(engine, [survey])[0]
        assert rows_at_kill < first, "the kill did not land mid-stream"
        # the outage of the reported incident: longer than the 10 s group session, so the
        # brokers' group coordinator forgets both members and their next commits are refused
        time.sleep(15)
        stack.kafka_up(stack_settings)
        second = publish_paths(
            settings, [repo_data / "gz_decals_examples"], survey=survey, limit=20
        ).published
        total = first + second
        wait_for(
            lambda: _embedded(engine, survey) == total or any(p.poll() is not None for p in procs.values()),
            timeout_s=300,
            interval_s=1.0,
            what="every tile stored and embedded after the broker restart",
        )
        for name, proc in procs.items():
            assert proc.poll() is None, f"{name} died:\n{tail()}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {name: proc.wait(timeout=120) for name, proc in procs.items()}
    assert codes == {"ingest": 0, "encode": 0}, tail()
    assert count_tiles(engine, [survey]) == (total, total)
    assert _embedded(engine, survey) == total
    assert _errors(engine, settings) == 0
    assert count_rows(engine, "ingest_errors", topic=settings.topics.accepted) == 0
    assert read_topic(settings, settings.topics.dead) == []
