"""Labels and label sets: idempotent writes for importers, and the reads trainers join on.

A label is one integer per (tile, label set, author) in ``labels``; what the integer means is
declared once per label set in ``label_sets`` (see :class:`db.models.LabelSetBase`): ``binary``
(1/0, also what a set without a row means, e.g. a saved HITL search), ``classes`` (an index into
the set's class list, which only ever grows at the end) or ``integer`` (a catalogue's own code).

Every write is one ``INSERT ... ON CONFLICT`` keyed so that a replayed import changes nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Engine, bindparam, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY, UUID, insert
from sqlalchemy.types import LargeBinary, String
from sqlmodel import Session

from db.models import LabelCreate, LabelSet, LabelSetCreate, LabelSetPublic

#: the kinds of label set (:attr:`db.models.LabelSetBase.kind`)
KINDS = ("binary", "classes", "integer")


class LabelSetConflictError(ValueError):
    """A label set declared again with another meaning (kind, rule or class order)."""


@dataclass(frozen=True)
class UpsertCounts:
    """What one :func:`upsert_labels` call did."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0

    @property
    def total(self) -> int:
        """Rows handed in."""
        return self.inserted + self.updated + self.unchanged


@dataclass(frozen=True)
class LabelledEmbeddings:
    """Labels of one label set joined to the embeddings of one model version.

    Attributes
    ----------
    tile_ids
        Tile ids, sorted (so a seeded split is reproducible).
    embeddings
        ``float32`` (N, D) vectors of ``model_version``.
    values
        ``int64`` (N,) label values.
    authors
        Who gave each label.
    """

    tile_ids: list[str]
    embeddings: np.ndarray
    values: np.ndarray
    authors: list[str]

    def __len__(self) -> int:
        return len(self.tile_ids)


def get_label_set(engine: Engine, name: str) -> LabelSetPublic | None:
    """The declaration of label set ``name``, or None (then its values are binary)."""
    with Session(engine) as session:
        row = session.get(LabelSet, name)
        return None if row is None else LabelSetPublic.model_validate(row)


def merge_classes(existing: Sequence[str], new: Iterable[str]) -> list[str]:
    """``existing`` followed by the classes of ``new`` it lacks, in their order: old indices stay valid."""
    out = list(existing)
    for c in new:
        if c not in out:
            out.append(c)
    return out


def ensure_label_set(engine: Engine, spec: LabelSetCreate, *, ordered: bool = True) -> LabelSetPublic:
    """Declare a label set, or check it against the stored declaration and extend its classes.

    A ``classes`` set keeps its class order forever: a class the stored list lacks is appended,
    one it has keeps its index. The row is locked while it is compared and extended, so two
    importers cannot hand out one index twice.

    Parameters
    ----------
    engine
        Engine of the galsift database.
    spec
        The declaration.
    ordered
        Whether ``spec.classes`` is a stated order that must agree with the stored one (a class
        list given by the user); False: only the classes to include (e.g. sorted values found).

    Returns
    -------
    LabelSetPublic
        The stored declaration, with the merged class list.

    Raises
    ------
    LabelSetConflictError
        If the set exists with another kind or rule, or ``spec.classes`` lists known classes in
        another order than the stored one.
    ValueError
        If ``spec.kind`` is unknown.
    """
    if spec.kind not in KINDS:
        raise ValueError(f"label set kind {spec.kind!r} is not one of {KINDS}")
    table = LabelSet.__table__  # type: ignore[attr-defined]  # SQLModel sets it on table classes
    with engine.begin() as conn:
        conn.execute(insert(table).values(spec.model_dump()).on_conflict_do_nothing(index_elements=["name"]))
        row = conn.execute(select(table).where(table.c.name == spec.name).with_for_update()).mappings().one()
        stored = LabelSetPublic.model_validate(dict(row))
        if stored.kind != spec.kind or stored.rule != spec.rule:
            raise LabelSetConflictError(
                f"label set {spec.name!r} exists as {stored.kind} {stored.rule}; refusing {spec.kind} "
                f"{spec.rule} (import under another --label-set name)"
            )
        known = [c for c in spec.classes if c in stored.classes]
        if ordered and known != [c for c in stored.classes if c in spec.classes]:
            raise LabelSetConflictError(
                f"label set {spec.name!r} has classes {stored.classes}; {spec.classes} orders them differently"
            )
        merged = merge_classes(stored.classes, spec.classes)
        if merged != stored.classes:
            conn.execute(update(table).where(table.c.name == spec.name).values(classes=merged))
            stored = stored.model_copy(update={"classes": merged})
        return stored


_LABEL_UPSERT = text(
    """
    INSERT INTO labels (tile_id, label_set, value, author)
    SELECT * FROM unnest(:tile_ids, :label_sets, :vals, :authors)
    ON CONFLICT ON CONSTRAINT uq_labels_tile_set_author
    DO UPDATE SET value = excluded.value, created_at = now()
    WHERE labels.value IS DISTINCT FROM excluded.value
    RETURNING (xmax = 0) AS inserted
    """
).bindparams(
    bindparam("tile_ids", type_=ARRAY(UUID(as_uuid=True))),
    bindparam("label_sets", type_=ARRAY(String)),
    bindparam("authors", type_=ARRAY(String)),
)


def upsert_labels(engine: Engine, rows: Sequence[LabelCreate]) -> UpsertCounts:
    """Write labels keyed by (tile, label set, author) in one statement.

    A label given again with the same value is left alone (its ``created_at`` too); with another
    value it is updated, and ``created_at`` says when. Replaying an import changes nothing.

    Raises
    ------
    ValueError
        If the same (tile, label set, author) appears twice in ``rows``.
    """
    if not rows:
        return UpsertCounts()
    keys = {(r.tile_id, r.label_set, r.author) for r in rows}
    if len(keys) != len(rows):
        raise ValueError(f"{len(rows) - len(keys)} duplicate (tile, label set, author) rows in one batch")
    params = {
        "tile_ids": [r.tile_id for r in rows],
        "label_sets": [r.label_set for r in rows],
        "vals": [int(r.value) for r in rows],
        "authors": [r.author for r in rows],
    }
    with engine.begin() as conn:
        flags = [bool(f) for (f,) in conn.execute(_LABEL_UPSERT, params)]
    inserted = sum(flags)
    updated = len(flags) - inserted
    return UpsertCounts(inserted=inserted, updated=updated, unchanged=len(rows) - len(flags))


def existing_tile_ids(engine: Engine, ids: Sequence[str | uuid.UUID]) -> set[str]:
    """The ids among ``ids`` that have a row in ``tiles`` (as strings)."""
    if not ids:
        return set()
    sql = text("SELECT id::text FROM tiles WHERE id = ANY(:ids)").bindparams(
        bindparam("ids", type_=ARRAY(UUID(as_uuid=True)))
    )
    with engine.connect() as conn:
        return {str(r[0]) for r in conn.execute(sql, {"ids": [uuid.UUID(str(i)) for i in ids]})}


def rejected_keys(engine: Engine, keys: Sequence[bytes], *, stage: str = "ingest") -> set[bytes]:
    """The Kafka keys (``survey/external_id``) among ``keys`` that ``stage`` rejected at some time."""
    if not keys:
        return set()
    sql = text("SELECT DISTINCT key FROM ingest_errors WHERE stage = :stage AND key = ANY(:keys)").bindparams(
        bindparam("keys", type_=ARRAY(LargeBinary))
    )
    with engine.connect() as conn:
        return {bytes(r[0]) for r in conn.execute(sql, {"stage": stage, "keys": list(keys)})}


def label_counts(engine: Engine, label_set: str) -> dict[int, int]:
    """``{value: rows}`` of one label set, over all authors."""
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT value, count(*) FROM labels WHERE label_set = :s GROUP BY value ORDER BY value"),
            {"s": label_set},
        )
        return {int(v): int(n) for v, n in rows}


def labelled_embeddings(
    engine: Engine, *, label_set: str, model_version: str, authors: Sequence[str] | None = None
) -> LabelledEmbeddings:
    """One label set's labels joined to the embeddings of one model version.

    A tile labelled by several authors counts once, with its newest label (a scientist's
    correction made after a catalogue import wins). Tiles without an embedding by
    ``model_version`` are left out.

    Parameters
    ----------
    label_set
        The label set to read.
    model_version
        The encoder model version whose vectors are joined.
    authors
        Only labels by these authors; None: every author.
    """
    sql = (
        "SELECT DISTINCT ON (l.tile_id) l.tile_id::text, l.value, l.author, e.embedding "
        "FROM labels l JOIN embeddings e ON e.tile_id = l.tile_id AND e.model_version = :v "
        "WHERE l.label_set = :s"
    )
    params: dict[str, object] = {"v": model_version, "s": label_set}
    if authors is not None:
        sql += " AND l.author = ANY(:authors)"
        params["authors"] = list(authors)
    sql += " ORDER BY l.tile_id, l.created_at DESC, l.id DESC"
    with engine.connect() as conn:
        rows = conn.execute(text(sql), params).all()
    if not rows:
        return LabelledEmbeddings([], np.zeros((0, 0), np.float32), np.zeros(0, np.int64), [])
    return LabelledEmbeddings(
        tile_ids=[str(r[0]) for r in rows],
        embeddings=np.stack([_vector(r[3]) for r in rows]),
        values=np.asarray([int(r[1]) for r in rows], dtype=np.int64),
        authors=[str(r[2]) for r in rows],
    )


def _vector(value: object) -> np.ndarray:
    """A pgvector value as ``float32``: psycopg hands back ``pgvector.Vector`` for a text query."""
    to_numpy = getattr(value, "to_numpy", None)
    return np.asarray(to_numpy() if callable(to_numpy) else value, dtype=np.float32)


def delete_labels(engine: Engine, *, label_set: str, author: str | None = None) -> int:
    """Delete one label set's labels (of one author); returns rows deleted. The declaration stays."""
    sql = "DELETE FROM labels WHERE label_set = :s"
    params = {"s": label_set}
    if author is not None:
        sql += " AND author = :a"
        params["a"] = author
    with engine.begin() as conn:
        return int(conn.execute(text(sql), params).rowcount)
