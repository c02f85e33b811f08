"""``galsift bench ingest``: ingest throughput and latency against baselines measured in the same run.

Four measurements on the same tiles, on the running stack (``galsift stack up``):

``upsert_batched``
    ``db.repo.upsert_tiles`` with ``batch_size`` rows per statement (what the stage does).
``upsert_row_by_row``
    the same rows, one statement and transaction per row (the baseline the batching beats).
``publish``
    :class:`~ingest.publish.TilePublisher` sending the tiles to the raw topic (read from disk
    beforehand, so this is encoding and producing).
``kafka_raw_consume``
    the ceiling: kafka-python fetching the same messages in the stage's batches with the
    stage's client settings and committing, without decoding or producing anything.
``ingest_stage``
    the full :class:`~ingest.service.IngestStage` batch: consume, decode, validate, object
    store, HEALPix, multi-row upsert, publish accepted, commit.

Latencies are per call (one statement, or one consumed batch); ``per_s`` is tiles per second.
With ``repeat`` > 1 the three stream measurements run that many times, one after another on fresh
topics and surveys, and each row reports the median run (``per_s_runs`` keeps every run's rate):
on two shared cores one run moves by ±30%. Everything runs on throw-away topics (``bench.<run>.*``) and surveys (``bench_<run>_*``), removed
afterwards unless ``keep`` is set.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine

from db.repo import delete_stage_stats, delete_surveys
from galsift.kafka import ensure_topics, kafka_admin, make_consumer
from galsift.settings import Settings, Topics
from ingest.publish import TilePublisher
from ingest.readers import SurveyTile, iter_sources

log = logging.getLogger(__name__)


def load_bench_tiles(data: Path, *, n: int) -> list[SurveyTile]:
    """``n`` tiles from ``data``, cycling through its files with ``~<k>`` id suffixes if needed.

    Raises
    ------
    ValueError
        If ``data`` holds no readable tile.
    """
    folders = (
        [data]
        if (data / "labels.csv").exists() or not data.is_dir()
        else [p for p in sorted(data.iterdir()) if p.is_dir()] or [data]
    )
    base = [s.read() for s in iter_sources(folders, limit=n)]
    if not base:
        raise ValueError(f"no tiles under {data}")
    tiles: list[SurveyTile] = []
    for k in range(n):
        t = base[k % len(base)]
        suffix = f"~{k // len(base)}" if k >= len(base) else ""
        tiles.append(replace(t, external_id=t.external_id + suffix))
    return tiles


def _with_survey(tiles: Sequence[SurveyTile], survey: str) -> list[SurveyTile]:
    return [replace(t, survey=survey, external_id=f"{t.survey}/{t.external_id}") for t in tiles]


def _row(
    model: str, latencies_s: Sequence[float], *, n: int, mb: float | None = None, **extra: Any
) -> dict[str, Any]:
    ms = np.asarray(latencies_s) * 1000.0
    total = float(np.sum(latencies_s))
    if mb is not None and total > 0:
        extra["mb_per_s"] = round(mb / total, 1)
    return {
        "model": model,
        "n": n,
        # a consumer batch can come back short of batch_size: report what the calls really held
        "rows_per_call": round(n / len(latencies_s), 1),
        "calls": len(latencies_s),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "per_s": round(n / total, 2) if total > 0 else None,
        **extra,
    }


def bench_upserts(
    engine: Engine, tiles: Sequence[SurveyTile], *, run: str, batch_size: int
) -> list[dict[str, Any]]:
    """Time batched vs one-row-per-round-trip tile upserts (database only)."""
    from db.models import TileCreate
    from db.repo import upsert_tiles

    def rows(survey: str) -> list[TileCreate]:
        out = []
        for t in _with_survey(tiles, survey):
            out.append(
                TileCreate(
                    id=uuid.UUID(t.tile_id),
                    survey=t.survey,
                    external_id=t.external_id,
                    ra=t.ra,
                    dec=t.dec,
                    healpix=None,
                    bands=list(t.bands),
                    pixel_scale=t.pixel_scale,
                    shape=list(t.pixels.shape),
                    dtype=str(t.pixels.dtype),
                    pixels_uri=f"bench://{t.tile_id}.npy",
                    checksum="0" * 64,
                    meta=dict(t.meta),
                )
            )
        return out

    results = []
    batched = rows(f"bench_{run}_batched")
    lat = []
    for i in range(0, len(batched), batch_size):
        t0 = time.perf_counter()
        upsert_tiles(engine, batched[i : i + batch_size])
        lat.append(time.perf_counter() - t0)
    results.append(_row("upsert_batched", lat, n=len(batched)))
    single = rows(f"bench_{run}_rowwise")
    lat = []
    for r in single:
        t0 = time.perf_counter()
        upsert_tiles(engine, [r])
        lat.append(time.perf_counter() - t0)
    results.append(_row("upsert_row_by_row", lat, n=len(single)))
    return results


def _drain(step: Callable[[], int], n: int, *, timeout_s: float) -> list[float]:
    """Call ``step`` (one batch) until ``n`` records were handled; per-batch seconds."""
    lat: list[float] = []
    done = 0
    deadline = time.monotonic() + timeout_s
    while done < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {done} of {n} records consumed in {timeout_s:.0f} s")
        t0 = time.perf_counter()
        got = step()
        if got:
            lat.append(time.perf_counter() - t0)
            done += got
    return lat


def _join(consumer: Any) -> None:
    """Join the group and rewind, so group set-up time is not billed to the first batch."""
    deadline = time.monotonic() + 60
    while not consumer.assignment():
        if time.monotonic() > deadline:
            raise TimeoutError("consumer got no partitions within 60 s")
        consumer.poll(timeout_ms=200, max_records=1)
    consumer.seek_to_beginning()


def bench_stream(
    settings: Settings,
    engine: Engine,
    tiles: Sequence[SurveyTile],
    *,
    run: str,
    label: str = "",
    timeout_s: float = 600,
) -> list[dict[str, Any]]:
    """Time publishing, the raw consume rate (the ceiling) and the full ingest stage on the same messages."""
    from ingest.service import IngestStage

    n = len(tiles)
    stage_tiles = _with_survey(tiles, f"bench_{run}_stage{label}")
    mb = 0.0
    with TilePublisher(settings) as pub:
        t0 = time.perf_counter()
        for t in stage_tiles:
            mb += pub.send(t)[0] / 1e6
        pub.flush()
        publish_s = time.perf_counter() - t0
    results = [
        {
            "model": "publish",
            "n": n,
            "rows_per_call": 1,
            "calls": n,
            "p50_ms": None,
            "p95_ms": None,
            "per_s": round(n / publish_s, 2),
            "mb_per_s": round(mb / publish_s, 1),
        }
    ]

    # the ceiling: kafka-python fetching the same messages, with no decoding and no producing
    consumer = make_consumer(settings, settings.topics.raw, group_id=f"bench-{run}-raw{label}")
    try:
        _join(consumer)

        def raw_consume() -> int:
            polled = consumer.poll(timeout_ms=settings.batch_timeout_ms, max_records=settings.batch_size)
            n_records = sum(len(batch) for batch in polled.values())
            if n_records:
                consumer.commit()
            return n_records

        lat = _drain(raw_consume, n, timeout_s=timeout_s)
    finally:
        consumer.close(autocommit=False)
    results.append(_row("kafka_raw_consume", lat, n=n, mb=mb))

    stage = IngestStage(settings, engine, group_id=f"bench-{run}-stage{label}")
    try:
        _join(stage.consumer())
        lat = _drain(stage.step, n, timeout_s=timeout_s)
    finally:
        stage.close()
        # the bench worker is not a service: keep it off the operators' stage_stats
        delete_stage_stats(engine, stage=stage.name, worker=stage.worker_id)
    results.append(_row("ingest_stage", lat, n=n, mb=mb))
    return results


def _median_runs(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per model, the run with the median rate, with every run's rate beside it.

    Every run lists the same models in the same order.
    """
    rows = []
    for same_model in zip(*runs, strict=True):
        ranked = sorted(same_model, key=lambda row: row["per_s"] or 0.0)
        rows.append({**ranked[(len(ranked) - 1) // 2], "per_s_runs": [row["per_s"] for row in same_model]})
    return rows


def bench_ingest(
    settings: Settings,
    *,
    data: Path,
    n: int = 256,
    repeat: int = 1,
    keep: bool = False,
    timeout_s: float = 600,
) -> dict[str, Any]:
    """Run every ingest benchmark and return the ``--json`` document (DESIGN.md contract).

    Parameters
    ----------
    settings
        Settings of a running stack.
    data
        A dataset folder (or a folder of them, like ``ingest/demo_tiles``) to take tiles from.
    n
        Tiles per measurement.
    repeat
        Runs of the stream measurements; rows report the median run.
    keep
        Keep the bench topics, rows and stored pixels (for inspection).
    timeout_s
        Longest a stream measurement may take.
    """
    from db.engine import get_engine

    run = uuid.uuid4().hex[:8]
    tiles = load_bench_tiles(data, n=n)
    prefixes = [f"bench.{run}.{r}" for r in range(repeat)]
    engine = get_engine(settings)
    results: list[dict[str, Any]] = []
    try:
        results += bench_upserts(engine, tiles, run=run, batch_size=settings.batch_size)
        runs = []
        for r, prefix in enumerate(prefixes):
            topics = Topics(
                raw=f"{prefix}.raw",
                accepted=f"{prefix}.accepted",
                dead=f"{prefix}.dead",
                embedded=settings.topics.embedded,
                alerts=settings.topics.alerts,
            )
            bench_settings = settings.model_copy(update={"topics": topics})
            ensure_topics(bench_settings)
            runs.append(
                bench_stream(bench_settings, engine, tiles, run=run, label=str(r), timeout_s=timeout_s)
            )
        results += _median_runs(runs)
    finally:
        if not keep:
            _clean(settings, engine, run)
            with kafka_admin(settings) as admin:
                admin.delete_topics([f"{p}.{t}" for p in prefixes for t in ("raw", "accepted", "dead")])
        engine.dispose()
    return {"command": "bench ingest", "data": str(data), "model_version": None, "results": results}


def _clean(settings: Settings, engine: Engine, run: str) -> None:
    from galsift.objectstore import ObjectStore

    delete_surveys(engine, prefix=f"bench_{run}_")
    store = ObjectStore(settings.pixel_store_url)
    for path in store.fs.glob(f"{store.root}/tiles/bench_{run}_stage*"):
        store.fs.rm(path, recursive=True)


def format_table(doc: dict[str, Any]) -> str:
    """The results as a fixed-width table."""
    head = f"{'model':<20} {'n':>6} {'rows/call':>9} {'p50 ms':>9} {'p95 ms':>9} {'tiles/s':>9} {'MB/s':>7}"
    lines = [head, "-" * len(head)]

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)

    for r in doc["results"]:
        runs = r.get("per_s_runs")
        lines.append(
            f"{r['model']:<20} {r['n']:>6} {r['rows_per_call']:>9} {fmt(r['p50_ms']):>9} "
            f"{fmt(r['p95_ms']):>9} {fmt(r['per_s']):>9} {fmt(r.get('mb_per_s')):>7}"
            + (f"  runs: {', '.join(fmt(float(x)) for x in runs)}" if runs and len(runs) > 1 else "")
        )
    return "\n".join(lines)
