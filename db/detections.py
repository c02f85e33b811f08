"""Reads and writes of the detector service: tiles to score, and idempotent detection upserts."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Engine, text
from sqlalchemy.dialects.postgresql import insert

from db.models import Detection, DetectionCreate


@dataclass(frozen=True)
class TileToScore:
    """What the detectors need of one embedded tile."""

    tile_id: str
    survey: str
    external_id: str
    ra: float | None
    dec: float | None
    bands: list[str]
    #: pixel type: ``uint8`` for colour composites, a float type for flux
    dtype: str
    pixels_uri: str
    checksum: str
    encoder_version: str
    embedding: np.ndarray


def tiles_to_score(engine: Engine, keys: Sequence[tuple[str, str]]) -> list[TileToScore]:
    """Tiles and their embeddings for ``(tile id, encoder model version)`` pairs, in no order.

    Pairs without a row (a tile deleted since, an unknown version) are left out.
    """
    if not keys:
        return []
    sql = text(
        "SELECT t.id::text, t.survey, t.external_id, t.ra, t.dec, t.bands, t.dtype, t.pixels_uri, "
        "t.checksum, e.model_version, e.embedding FROM tiles t JOIN embeddings e ON e.tile_id = t.id "
        "JOIN unnest(CAST(:ids AS uuid[]), CAST(:versions AS text[])) AS k(tile_id, version) "
        "ON k.tile_id = e.tile_id AND k.version = e.model_version"
    )
    params = {"ids": [k[0] for k in keys], "versions": [k[1] for k in keys]}
    with engine.connect() as conn:
        return [
            TileToScore(
                tile_id=str(r[0]),
                survey=str(r[1]),
                external_id=str(r[2]),
                ra=r[3],
                dec=r[4],
                bands=[str(b) for b in r[5]],
                dtype=str(r[6]),
                pixels_uri=str(r[7]),
                checksum=str(r[8]),
                encoder_version=str(r[9]),
                embedding=_array(r[10]),
            )
            for r in conn.execute(sql, params)
        ]


def _array(value: object) -> np.ndarray:
    """A vector column as float32: numpy from pgvector's psycopg loader, or its ``Vector`` type."""
    to_numpy = getattr(value, "to_numpy", None)
    return np.asarray(to_numpy() if to_numpy is not None else value, dtype=np.float32)


def upsert_detections(engine: Engine, rows: Sequence[DetectionCreate]) -> int:
    """Write scores keyed by (tile, model version, detector, label); a replay rewrites the same values."""
    if not rows:
        return 0
    values = [r.model_dump() for r in rows]
    for v in values:
        v["tile_id"] = uuid.UUID(str(v["tile_id"]))
    stmt = insert(Detection)
    stmt = stmt.on_conflict_do_update(
        constraint="pk_detections",
        set_={"score": stmt.excluded.score, "extra": stmt.excluded.extra},
    )
    with engine.begin() as conn:
        conn.execute(stmt, values)
    return len(values)


def detections_of(engine: Engine, tile_id: str) -> list[DetectionCreate]:
    """Every stored score of one tile."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT tile_id, model_version, detector, label, score, extra FROM detections "
                "WHERE tile_id = :t ORDER BY detector, label"
            ),
            {"t": tile_id},
        ).mappings()
        return [DetectionCreate.model_validate(dict(r)) for r in rows]
