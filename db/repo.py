"""Idempotent writes and small reads used by the services.

Every write is one multi-row ``INSERT ... ON CONFLICT`` per batch (tiles: a binary ``COPY`` into
a staging table, then one ``INSERT ... SELECT ... ON CONFLICT``), keyed so that
replaying a batch after a crash changes nothing: tiles by (survey, external_id), embeddings by
(tile, model version), errors by their Kafka position, counters by (stage, worker).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import Engine, func, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select

from db.models import (
    Embedding,
    EmbeddingCreate,
    IngestError,
    IngestErrorCreate,
    ModelVersion,
    ModelVersionCreate,
    ModelVersionPublic,
    StageStats,
    StageStatsCreate,
    Survey,
    Tile,
    TileCreate,
    TilePublic,
)

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
        "alert_deliveries",
        "label_sets",
        "ingest_errors",
        "stage_stats",
    }
)


def upsert_tiles(engine: Engine, tiles: Sequence[TileCreate]) -> int:
    """Insert or refresh tiles (and their surveys) in one transaction; returns rows written.

    A tile published twice keeps its id and ``ingested_at``; pixel URI, checksum and metadata
    take the newest values. ``tiles`` must not name one (survey, external_id) twice.

    The rows travel by binary ``COPY`` into a session-local staging table and are upserted from
    there in one statement: psycopg formats the rows in C, where a multi-row ``INSERT`` spent
    ~0.2 ms of Python per row in SQLAlchemy's bind processing (README, ingest benchmark).

    Raises
    ------
    sqlalchemy.exc.OperationalError
        When the database is unreachable or the statement was cancelled (also inside the
        ``COPY``, whose psycopg errors SQLAlchemy does not wrap).
    """
    if not tiles:
        return 0
    surveys = sorted({t.survey for t in tiles})
    with engine.begin() as conn:
        conn.execute(
            insert(Survey).values([{"name": s, "description": ""} for s in surveys]).on_conflict_do_nothing()
        )
        conn.exec_driver_sql(_TILE_STAGING)
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            with cursor.copy(_TILE_COPY) as copy:
                copy.set_types(_TILE_TYPES)
                for t in tiles:
                    copy.write_row(
                        (
                            t.id,
                            t.survey,
                            t.external_id,
                            t.ra,
                            t.dec,
                            t.healpix,
                            t.bands,
                            t.pixel_scale,
                            t.shape,
                            t.dtype,
                            t.pixels_uri,
                            t.checksum,
                            t.obs_time,
                            Jsonb(t.meta),
                        )
                    )
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            # the raw cursor's errors are not wrapped by SQLAlchemy: say "database away" the same way
            raise OperationalError(_TILE_COPY, None, exc) from exc
        finally:
            cursor.close()
        conn.exec_driver_sql(_TILE_FROM_STAGING)
    return len(tiles)


#: the COPY columns of a tile row (``ingested_at`` takes its default on insert)
_TILE_COLUMNS = (
    "id",
    "survey",
    "external_id",
    "ra",
    "dec",
    "healpix",
    "bands",
    "pixel_scale",
    "shape",
    "dtype",
    "pixels_uri",
    "checksum",
    "obs_time",
    "meta",
)
_TILE_TYPES = (
    "uuid",
    "varchar",
    "varchar",
    "float8",
    "float8",
    "int8",
    "varchar[]",
    "float8",
    "int4[]",
    "varchar",
    "varchar",
    "varchar",
    "timestamptz",
    "jsonb",
)
# emptied at every commit, so a pooled connection never carries rows into its next batch
_TILE_STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS tiles_staging (LIKE tiles INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
_TILE_COPY = f"COPY tiles_staging ({', '.join(_TILE_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
_KEEP_ON_CONFLICT = {"id", "survey", "external_id"}
_TILE_FROM_STAGING = (
    f"INSERT INTO tiles ({', '.join(_TILE_COLUMNS)}) "
    f"SELECT {', '.join(_TILE_COLUMNS)} FROM tiles_staging "
    "ON CONFLICT ON CONSTRAINT uq_tiles_survey_external_id DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _TILE_COLUMNS if c not in _KEEP_ON_CONFLICT)
)


def record_errors(engine: Engine, errors: Sequence[IngestErrorCreate]) -> None:
    """Store rejected inputs with their raw bytes; a replayed rejection is stored once."""
    if not errors:
        return
    rows = [e.model_dump() for e in errors]
    stmt = insert(IngestError).values(rows).on_conflict_do_nothing(constraint="uq_ingest_errors_position")
    with engine.begin() as conn:
        conn.execute(stmt)


def upsert_stage_stats(engine: Engine, stats: StageStatsCreate) -> None:
    """Record a worker's running counters (one row per stage and worker)."""
    row = stats.model_dump()
    stmt = insert(StageStats).values(row)
    stmt = stmt.on_conflict_do_update(
        constraint="pk_stage_stats", set_={k: stmt.excluded[k] for k in row if k not in ("stage", "worker")}
    )
    with engine.begin() as conn:
        conn.execute(stmt)


class DbRecorder:
    """Records a stage's rejections and counters in ``ingest_errors`` and ``stage_stats``.

    The stage hands plain rows (it knows no table); they are validated into the create models.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def record_errors(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Store rejections; a replayed one is stored once."""
        record_errors(self.engine, [IngestErrorCreate.model_validate(r) for r in rows])

    def record_stats(self, row: Mapping[str, Any]) -> None:
        """Upsert one worker's counters."""
        upsert_stage_stats(self.engine, StageStatsCreate.model_validate(row))


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


def count_missing_embeddings(engine: Engine, version: str) -> int:
    """Tiles that have no embedding by model ``version`` yet."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM tiles t WHERE NOT EXISTS (SELECT 1 FROM embeddings e "
                    "WHERE e.tile_id = t.id AND e.model_version = :v)"
                ),
                {"v": version},
            ).scalar_one()
        )


def iter_missing_embeddings(
    engine: Engine, version: str, *, chunk: int
) -> Iterator[list[tuple[str, str, str, list[str]]]]:
    """Chunks of (tile id, pixels URI, checksum, bands) of tiles without an embedding by ``version``.

    Re-querying after each chunk (keyset pagination on the id) makes a backfill restartable at any
    point: whatever was written is skipped next time.
    """
    sql = text(
        "SELECT t.id::text, t.pixels_uri, t.checksum, t.bands FROM tiles t WHERE NOT EXISTS "
        "(SELECT 1 FROM embeddings e WHERE e.tile_id = t.id AND e.model_version = :v) "
        "AND t.id::text > :after ORDER BY t.id::text LIMIT :n"
    )
    after = ""
    while True:
        with engine.connect() as conn:
            rows = [
                (str(r[0]), str(r[1]), str(r[2]), [str(b) for b in r[3]])
                for r in conn.execute(sql, {"v": version, "after": after, "n": chunk})
            ]
        if not rows:
            return
        yield rows
        after = rows[-1][0]


def delete_stage_stats(engine: Engine, *, stage: str, worker: str) -> None:
    """Forget one worker's counters (a benchmark's worker is not a service)."""
    with engine.begin() as conn:
        conn.execute(
            text("DELETE FROM stage_stats WHERE stage = :s AND worker = :w"), {"s": stage, "w": worker}
        )


def delete_surveys(engine: Engine, *, prefix: str) -> None:
    """Delete the surveys whose name starts with ``prefix`` and their tiles (benchmark clean-up)."""
    pattern = prefix.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%") + "%"
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM tiles WHERE survey LIKE :p"), {"p": pattern})
        conn.execute(text("DELETE FROM surveys WHERE name LIKE :p"), {"p": pattern})


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
            for t in ("tiles", "embeddings", "detections", "alerts", "model_versions", "ingest_errors")
        }
        rejections = {
            (r[0], r[1]): int(r[2])
            for r in conn.execute(
                text("SELECT stage, reason, count(*) FROM ingest_errors GROUP BY stage, reason ORDER BY 1, 2")
            )
        }
    return {"workers": workers, "counts": counts, "rejections": rejections}
