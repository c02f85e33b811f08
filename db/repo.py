"""Idempotent writes and small reads used by the services.

Every write is one multi-row ``INSERT ... ON CONFLICT`` per batch (one round trip), keyed so that
replaying a batch after a crash changes nothing: tiles by (survey, external_id), embeddings by
(tile, model version), errors by their Kafka position, counters by (stage, worker).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import Engine, func, text
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import Session, col, select

from db.models import (
    Embedding,
    EmbeddingCreate,
    IngestError,
    ModelVersion,
    ModelVersionCreate,
    ModelVersionPublic,
    StageStats,
    Survey,
    Tile,
    TileCreate,
    TilePublic,
)

if TYPE_CHECKING:
    from galsift.stage import Counters, Rejection

#: tables whose size operators may ask for (guards the identifier in count_rows)
COUNTABLE = frozenset(
    {
        "surveys",
        "tiles",
        "embeddings",
        "model_versions",
        "detections",
        "labels",
        "alerts",
        "ingest_errors",
        "stage_stats",
    }
)


def upsert_tiles(engine: Engine, tiles: Sequence[TileCreate]) -> int:
    """Insert or refresh tiles (and their surveys) in one transaction; returns rows written.

    A tile published twice keeps its id and ``ingested_at``; pixel URI, checksum and metadata
    take the newest values.
    """
    if not tiles:
        return 0
    rows = [t.model_dump() for t in tiles]
    surveys = sorted({r["survey"] for r in rows})
    stmt = insert(Tile).values(rows)
    update_cols = [c for c in rows[0] if c not in ("id", "survey", "external_id")]
    stmt = stmt.on_conflict_do_update(
        constraint="uq_tiles_survey_external_id",
        set_={c: stmt.excluded[c] for c in update_cols},
    )
    with engine.begin() as conn:
        conn.execute(
            insert(Survey).values([{"name": s, "description": ""} for s in surveys]).on_conflict_do_nothing()
        )
        conn.execute(stmt)
    return len(rows)


def record_errors(engine: Engine, rejections: Sequence[Rejection]) -> None:
    """Store rejected inputs with their raw bytes; a replayed rejection is stored once."""
    if not rejections:
        return
    rows = [
        {
            "stage": r.stage,
            "reason": r.reason,
            "detail": r.detail,
            "topic": r.topic,
            "partition": r.partition,
            "offset": r.offset,
            "key": r.key,
            "payload": r.payload,
        }
        for r in rejections
    ]
    stmt = insert(IngestError).values(rows).on_conflict_do_nothing(constraint="uq_ingest_errors_position")
    with engine.begin() as conn:
        conn.execute(stmt)


def upsert_stage_stats(engine: Engine, *, stage: str, worker: str, counters: Counters) -> None:
    """Record a worker's running counters (one row per stage and worker)."""
    row = {
        "stage": stage,
        "worker": worker,
        "consumed": counters.consumed,
        "accepted": counters.accepted,
        "rejected": counters.rejected,
        "batches": counters.batches,
        "lag": counters.lag,
        "started_at": datetime.fromtimestamp(counters.started_at, UTC),
        "updated_at": datetime.now(UTC),
    }
    stmt = insert(StageStats).values(row)
    stmt = stmt.on_conflict_do_update(
        constraint="pk_stage_stats", set_={k: stmt.excluded[k] for k in row if k not in ("stage", "worker")}
    )
    with engine.begin() as conn:
        conn.execute(stmt)


def upsert_embeddings(engine: Engine, rows: Sequence[EmbeddingCreate]) -> int:
    """Write vectors keyed by (tile, model version); a replay overwrites with the same values."""
    if not rows:
        return 0
    values = [
        {
            "tile_id": r.tile_id,
            "model_version": r.model_version,
            "embedding": np.asarray(r.embedding, dtype=np.float32),
        }
        for r in rows
    ]
    stmt = insert(Embedding).values(values)
    stmt = stmt.on_conflict_do_update(
        constraint="pk_embeddings", set_={"embedding": stmt.excluded.embedding, "created_at": func.now()}
    )
    with engine.begin() as conn:
        conn.execute(stmt)
    return len(values)


def register_model_version(engine: Engine, mv: ModelVersionCreate) -> ModelVersionPublic:
    """Register a model version by name; registering the same name again must match its checksum.

    Raises
    ------
    ValueError
        If ``mv.name`` exists with different weights (versions are immutable).
    """
    with Session(engine) as session:
        existing = session.get(ModelVersion, mv.name)
        if existing is not None:
            if existing.checksum != mv.checksum:
                raise ValueError(
                    f"model version {mv.name!r} exists with other weights "
                    f"({existing.checksum[:12]} != {mv.checksum[:12]}); versions are immutable"
                )
            return ModelVersionPublic.model_validate(existing)
        row = ModelVersion.model_validate(mv)
        session.add(row)
        session.commit()
        session.refresh(row)
        return ModelVersionPublic.model_validate(row)


def get_model_version(engine: Engine, name: str) -> ModelVersionPublic | None:
    """A registered model version, or None."""
    with Session(engine) as session:
        row = session.get(ModelVersion, name)
        return None if row is None else ModelVersionPublic.model_validate(row)


def tiles_by_id(engine: Engine, ids: Sequence[str | uuid.UUID]) -> list[TilePublic]:
    """Tiles for the given ids, in no particular order (missing ids are left out)."""
    if not ids:
        return []
    keys = [uuid.UUID(str(i)) for i in ids]
    with Session(engine) as session:
        rows = session.exec(select(Tile).where(col(Tile.id).in_(keys))).all()
        return [TilePublic.model_validate(r) for r in rows]


def count_rows(engine: Engine, table: str, **where: Any) -> int:
    """Row count of one of galsift's tables, optionally filtered by equality on columns."""
    if table not in COUNTABLE:
        raise ValueError(f"unknown table {table!r}")
    clauses = " AND ".join(f'"{k}" = :{k}' for k in where if k.isidentifier())
    sql = f'SELECT count(*) FROM "{table}"' + (f" WHERE {clauses}" if clauses else "")
    with engine.connect() as conn:
        return int(conn.execute(text(sql), where).scalar_one())


def service_overview(engine: Engine) -> dict[str, Any]:
    """What an operator asks first: per-worker counters, table sizes, rejections by reason.

    Returns
    -------
    dict
        ``{"workers": [...], "counts": {table: n}, "rejections": {(stage, reason): n}}``; a worker
        whose row was not refreshed for a minute is marked ``stale`` (stopped or stuck).
    """
    with engine.connect() as conn:
        workers = [
            dict(r)
            for r in conn.execute(
                text(
                    "SELECT stage, worker, consumed, accepted, rejected, lag, batches, updated_at, "
                    "now() - updated_at > interval '60 seconds' AS stale "
                    "FROM stage_stats ORDER BY stage, updated_at DESC"
                )
            ).mappings()
        ]
        counts = {
            t: int(conn.execute(text(f'SELECT count(*) FROM "{t}"')).scalar_one())
            for t in ("tiles", "embeddings", "model_versions", "ingest_errors")
        }
        rejections = {
            (r[0], r[1]): int(r[2])
            for r in conn.execute(
                text("SELECT stage, reason, count(*) FROM ingest_errors GROUP BY stage, reason ORDER BY 1, 2")
            )
        }
    return {"workers": workers, "counts": counts, "rejections": rejections}
