"""The database layer against the real embedded PostgreSQL with pgvector."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from sqlalchemy import Engine, text

from db import repo
from db.models import EmbeddingCreate, ModelVersionCreate, TileCreate
from galsift.messages import tile_id
from galsift.stage import Counters, Rejection

pytestmark = pytest.mark.integration


def _tile(survey: str, ext: str, ra: float = 10.0) -> TileCreate:
    return TileCreate(
        id=uuid.UUID(tile_id(survey, ext)),
        survey=survey,
        external_id=ext,
        ra=ra,
        dec=-1.0,
        healpix=1,
        bands=["g", "r", "z"],
        pixel_scale=0.262,
        shape=[3, 8, 8],
        dtype="float32",
        pixels_uri=f"file:///objects/{ext}.npy",
        checksum="0" * 64,
        meta={"src": "test"},
    )


def test_tile_upsert_is_idempotent_and_refreshes(engine: Engine) -> None:
    survey = f"dbtest-{uuid.uuid4().hex[:6]}"
    tiles = [_tile(survey, f"obj{i}") for i in range(5)]
    assert repo.upsert_tiles(engine, tiles) == 5
    repo.upsert_tiles(engine, tiles)  # a replay
    moved = _tile(survey, "obj0", ra=11.5)
    repo.upsert_tiles(engine, [moved])
    assert repo.count_rows(engine, "tiles", survey=survey) == 5
    (row,) = repo.tiles_by_id(engine, [moved.id])
    assert row.ra == pytest.approx(11.5)
    assert row.bands == ["g", "r", "z"] and row.shape == [3, 8, 8]


def test_tile_copy_writes_every_column_of_the_table_but_its_arrival_time() -> None:
    from db.models import Tile

    table = Tile.__table__  # type: ignore[attr-defined]
    assert set(repo._TILE_COLUMNS) == {c.name for c in table.columns} - {"ingested_at"}
    assert len(repo._TILE_TYPES) == len(repo._TILE_COLUMNS)


def test_tile_upsert_keeps_meta_ingested_at_and_nulls(engine: Engine) -> None:
    survey = f"dbtest-{uuid.uuid4().hex[:6]}"
    bare = _tile(survey, "bare").model_copy(update={"ra": None, "dec": None, "healpix": None, "meta": {}})
    rich = _tile(survey, "rich").model_copy(update={"meta": {"fits_header": {"EXPTIME": 90.0}, "n": [1, 2]}})
    repo.upsert_tiles(engine, [bare, rich])
    with engine.connect() as c:
        first = dict(
            c.execute(text("SELECT id, ingested_at FROM tiles WHERE survey = :s"), {"s": survey}).all()
        )
    repo.upsert_tiles(engine, [rich.model_copy(update={"checksum": "1" * 64})])
    by_id = {t.id: t for t in repo.tiles_by_id(engine, [bare.id, rich.id])}
    assert by_id[bare.id].ra is None and by_id[bare.id].healpix is None and by_id[bare.id].meta == {}
    assert by_id[rich.id].meta == {"fits_header": {"EXPTIME": 90.0}, "n": [1, 2]}
    assert by_id[rich.id].checksum == "1" * 64
    # a refreshed tile keeps the time it first arrived (the watcher and the SQL views key on it)
    with engine.connect() as c:
        again = dict(
            c.execute(text("SELECT id, ingested_at FROM tiles WHERE survey = :s"), {"s": survey}).all()
        )
    assert again == first


def test_tile_upsert_raises_sqlalchemys_operational_error_from_inside_its_copy(engine: Engine) -> None:
    """An error of the COPY itself is an OperationalError, which the stages ride out.

    The COPY runs on the raw psycopg cursor, whose errors SQLAlchemy does not wrap; a statement
    timeout set just before it cancels it (the connection lives on, so the rollback succeeds and
    cannot wrap it either).
    """
    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError

    def tight_timeout(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        if statement.startswith("CREATE TEMP TABLE"):
            cursor.execute("SET LOCAL statement_timeout = 1")

    survey = f"dbtest-{uuid.uuid4().hex[:6]}"
    event.listen(engine, "after_cursor_execute", tight_timeout)
    try:
        with pytest.raises(OperationalError, match="statement timeout"):
            repo.upsert_tiles(engine, [_tile(survey, f"t{i}") for i in range(20_000)])
    finally:
        event.remove(engine, "after_cursor_execute", tight_timeout)
    assert repo.count_rows(engine, "tiles", survey=survey) == 0


def test_embeddings_keyed_by_tile_and_version_and_searchable(engine: Engine) -> None:
    survey = f"dbtest-{uuid.uuid4().hex[:6]}"
    tiles = [_tile(survey, f"e{i}") for i in range(20)]
    repo.upsert_tiles(engine, tiles)
    name = f"test-{uuid.uuid4().hex[:8]}"
    repo.register_model_version(
        engine,
        ModelVersionCreate(name=name, variant="lvm_tiny", checkpoint_uri="file:///c", checksum="a" * 64),
    )
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(20, 256)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    rows = [
        EmbeddingCreate(tile_id=t.id, model_version=name, embedding=v.tolist())
        for t, v in zip(tiles, vecs, strict=True)
    ]
    repo.upsert_embeddings(engine, rows)
    repo.upsert_embeddings(engine, rows[:7])  # a replayed batch
    assert repo.count_rows(engine, "embeddings", model_version=name) == 20
    query = vecs[3] + 0.01 * rng.normal(size=256).astype(np.float32)
    with engine.connect() as conn:
        conn.execute(text("SET LOCAL enable_seqscan = off"))  # make the planner use the HNSW index
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                text(
                    "EXPLAIN SELECT tile_id FROM embeddings ORDER BY embedding <=> CAST(:q AS vector) LIMIT 3"
                ),
                {"q": str(query.tolist())},
            )
        )
        nearest = conn.execute(
            text(
                "SELECT tile_id FROM embeddings WHERE model_version = :v ORDER BY embedding <=> CAST(:q AS vector) LIMIT 1"
            ),
            {"v": name, "q": str(query.tolist())},
        ).scalar_one()
    assert "ix_embeddings_hnsw" in plan
    assert nearest == tiles[3].id


def test_model_versions_are_immutable(engine: Engine) -> None:
    name = f"test-{uuid.uuid4().hex[:8]}"
    mv = ModelVersionCreate(name=name, variant="lvm_tiny", checkpoint_uri="file:///c", checksum="b" * 64)
    first = repo.register_model_version(engine, mv)
    again = repo.register_model_version(engine, mv)
    assert first.created_at == again.created_at
    with pytest.raises(ValueError, match="immutable"):
        repo.register_model_version(engine, mv.model_copy(update={"checksum": "c" * 64}))


def test_errors_recorded_once_per_position_and_stats_upserted(engine: Engine) -> None:
    stage = f"test-{uuid.uuid4().hex[:6]}"
    # what a stage hands its recorder: plain rows from its own Rejection and Counters
    recorder = repo.DbRecorder(engine)
    rej = [Rejection(stage, "schema", "bad bytes", "tiles.raw", 0, i, None, b"\x00\x01") for i in range(3)]
    recorder.record_errors([r.as_row() for r in rej])
    recorder.record_errors([r.as_row() for r in rej])
    assert repo.count_rows(engine, "ingest_errors", stage=stage) == 3
    recorder.record_stats(Counters(consumed=5, accepted=4, rejected=1).as_row(stage=stage, worker="w1"))
    recorder.record_stats(Counters(consumed=9, accepted=7, rejected=2).as_row(stage=stage, worker="w1"))
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT consumed, accepted, rejected FROM stage_stats WHERE stage = :s"), {"s": stage}
        ).one()
    assert tuple(row) == (9, 7, 2)
    overview = repo.service_overview(engine)
    (mine,) = [w for w in overview["workers"] if w["stage"] == stage]
    assert (mine["worker"], mine["consumed"], mine["stale"]) == ("w1", 9, False)
    assert overview["rejections"][(stage, "schema")] == 3
    assert overview["counts"]["ingest_errors"] >= 3


def test_count_rows_refuses_unknown_tables(engine: Engine) -> None:
    with pytest.raises(ValueError):
        repo.count_rows(engine, "pg_authid")
