"""Reads and writes of human-in-the-loop search: sessions, seeds, rounds, labels, saved searches.

The engine in :mod:`hitl.engine` holds the logic; this module holds the SQL. Three rules shape it:

- labels are an append-only history (:class:`db.models.HitlLabel`): a user's effective label of a
  tile for a concept is their latest row that is not retracted, so relabelling and undo lose
  nothing and every label carries over to the user's next session of the same concept;
- candidate retrieval is one pgvector HNSW query per query vector, filtered to one model version
  and away from tiles already shown or labelled. The filter is a plain ``<> ALL(array)`` so the
  planner keeps the index scan, and the connection's ``hnsw.iterative_scan`` (see
  :data:`db.engine.HNSW_SESSION`) keeps scanning until ``k`` rows pass it;
- a round's shown tiles and the session's round counter are written in one transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, text
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import Session, select

from db.models import (
    HitlLabel,
    HitlLabelCreate,
    HitlSeed,
    HitlSession,
    HitlSessionCreate,
    HitlSessionPublic,
    HitlShown,
    SavedSearch,
    SearchNotification,
)


@dataclass(frozen=True)
class Vectors:
    """Tile ids with their embeddings (``float32`` (N, D)), in matching order."""

    tile_ids: list[uuid.UUID]
    embeddings: np.ndarray

    def __len__(self) -> int:
        return len(self.tile_ids)


@dataclass(frozen=True)
class SessionLabels:
    """A user's effective labels of one concept, joined to one model version's embeddings."""

    tile_ids: list[uuid.UUID]
    embeddings: np.ndarray
    good: np.ndarray
    #: highest ``hitl_labels.id`` among them (what a saved search's learner was fitted on)
    last_label_id: int


def _array(value: Any) -> np.ndarray:
    # pgvector's psycopg adapter returns numpy arrays, or its Vector type in newer releases
    return np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value, dtype=np.float32)


def _vectors(rows: Sequence[Any], dim: int) -> Vectors:
    ids = [r[0] for r in rows]
    emb = np.asarray([_array(r[1]) for r in rows], dtype=np.float32)
    return Vectors(ids, emb.reshape(len(ids), dim) if ids else np.zeros((0, dim), np.float32))


# -- sessions and seeds --------------------------------------------------------------------------
def create_session(engine: Engine, new: HitlSessionCreate) -> HitlSessionPublic:
    """Store a new session and return it."""
    with Session(engine) as s:
        row = HitlSession.model_validate(new)
        s.add(row)
        s.commit()
        s.refresh(row)
        return HitlSessionPublic.model_validate(row)


def get_session(engine: Engine, session_id: int) -> HitlSessionPublic | None:
    """One session, or None."""
    with Session(engine) as s:
        row = s.get(HitlSession, session_id)
        return HitlSessionPublic.model_validate(row) if row is not None else None


def list_sessions(engine: Engine, *, owner: str | None = None) -> list[HitlSessionPublic]:
    """Sessions, newest first; only ``owner``'s when given."""
    with Session(engine) as s:
        q = select(HitlSession).order_by(HitlSession.id.desc())  # type: ignore[union-attr]
        if owner is not None:
            q = q.where(HitlSession.owner == owner)
        return [HitlSessionPublic.model_validate(r) for r in s.exec(q)]


def add_seed(
    engine: Engine,
    session_id: int,
    *,
    embedding: np.ndarray,
    source: str,
    tile_id: uuid.UUID | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Add a seed: a stored tile's embedding, or an uploaded image's (``tile_id`` None)."""
    with Session(engine) as s:
        s.add(
            HitlSeed(
                session_id=session_id,
                tile_id=tile_id,
                source=source,
                embedding=np.asarray(embedding, dtype=np.float32).tolist(),
                detail=detail or {},
            )
        )
        s.commit()


def seeds(engine: Engine, session_id: int, dim: int) -> tuple[Vectors, list[dict[str, Any]]]:
    """A session's seed vectors (``tile_ids`` None for uploaded images) and each seed's source/detail."""
    with engine.connect() as c:
        rows = c.execute(
            text(
                "SELECT tile_id, embedding, source, detail FROM hitl_seeds WHERE session_id = :s ORDER BY id"
            ),
            {"s": session_id},
        ).all()
    return _vectors(rows, dim), [{"source": r[2], **r[3]} for r in rows]


# -- tiles and embeddings ------------------------------------------------------------------------
def embeddings_of(engine: Engine, tile_ids: Sequence[uuid.UUID], model_version: str, dim: int) -> Vectors:
    """The embeddings of ``tile_ids`` by ``model_version`` (tiles without one are left out)."""
    if not tile_ids:
        return Vectors([], np.zeros((0, dim), np.float32))
    with engine.connect() as c:
        rows = c.execute(
            text(
                "SELECT tile_id, embedding FROM embeddings "
                "WHERE model_version = :mv AND tile_id = ANY(:ids) ORDER BY tile_id"
            ),
            {"mv": model_version, "ids": list(tile_ids)},
        ).all()
    return _vectors(rows, dim)


def tile_by_external_id(engine: Engine, survey: str | None, external_id: str) -> uuid.UUID | None:
    """A tile id by its survey's own id (any survey when ``survey`` is None)."""
    q = "SELECT id FROM tiles WHERE external_id = :e" + (" AND survey = :s" if survey else "") + " LIMIT 1"
    with engine.connect() as c:
        return c.execute(text(q), {"e": external_id, "s": survey}).scalar()


def nearest_tile(
    engine: Engine, *, ra_deg: float, dec_deg: float, healpix: Sequence[int], model_version: str
) -> tuple[uuid.UUID, float] | None:
    """The embedded tile nearest to (ra, dec) among the given HEALPix pixels, with its separation (deg)."""
    with engine.connect() as c:
        row = c.execute(
            text(
                "SELECT t.id, degrees(acos(least(1, sin(radians(t.dec)) * sin(radians(:dec)) "
                "  + cos(radians(t.dec)) * cos(radians(:dec)) * cos(radians(t.ra - :ra))))) AS sep "
                "FROM tiles t JOIN embeddings e ON e.tile_id = t.id AND e.model_version = :mv "
                "WHERE t.healpix = ANY(:hp) AND t.ra IS NOT NULL ORDER BY sep LIMIT 1"
            ),
            {"ra": ra_deg, "dec": dec_deg, "hp": list(healpix), "mv": model_version},
        ).first()
    return (row[0], float(row[1])) if row is not None else None


def nearest_unseen(
    conn: Connection,
    query: np.ndarray,
    *,
    model_version: str,
    k: int,
    exclude: Sequence[uuid.UUID],
    dim: int,
    exact: bool = False,
) -> Vectors:
    """The ``k`` embeddings of ``model_version`` nearest (cosine) to ``query``, not in ``exclude``.

    ``exact`` turns the index off for this query (the brute-force reference of ``bench hitl``).
    """
    ef = max(40, k)
    conn.execute(text(f"SET LOCAL hnsw.ef_search = {int(ef)}"))
    conn.execute(text(f"SET LOCAL enable_indexscan = {'off' if exact else 'on'}"))
    rows = conn.execute(
        text(
            "SELECT tile_id, embedding FROM embeddings "
            "WHERE model_version = :mv AND tile_id <> ALL(:ex) "
            "ORDER BY embedding <=> :q LIMIT :k"
        ),
        {"mv": model_version, "ex": list(exclude), "q": np.asarray(query, dtype=np.float32), "k": k},
    ).all()
    return _vectors(rows, dim)


def sample_embeddings(
    engine: Engine, model_version: str, *, n: int, dim: int, exclude: Sequence[uuid.UUID] = ()
) -> Vectors:
    """Up to ``n`` embeddings of ``model_version`` drawn at random (for anomaly ranking)."""
    with engine.connect() as c:
        total = c.execute(
            text("SELECT count(*) FROM embeddings WHERE model_version = :mv"), {"mv": model_version}
        ).scalar_one()
        # a Bernoulli sample reads ~n rows' pages instead of sorting the whole table by random()
        pct = min(100.0, 100.0 * 1.2 * n / max(1, total))
        rows = c.execute(
            text(
                f"SELECT tile_id, embedding FROM embeddings TABLESAMPLE BERNOULLI ({pct:.6f}) REPEATABLE (7) "
                "WHERE model_version = :mv AND tile_id <> ALL(:ex) LIMIT :n"
            ),
            {"mv": model_version, "ex": list(exclude), "n": n},
        ).all()
    return _vectors(rows, dim)


# -- rounds --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShownRow:
    """One tile of a round as it is stored."""

    tile_id: uuid.UUID
    rank: int
    strategy: str
    score: float


def record_round(engine: Engine, session_id: int, shown: Sequence[ShownRow]) -> int:
    """Store a round's shown tiles and advance the session's round counter; returns the round number."""
    with engine.begin() as c:
        round_no = c.execute(
            text("UPDATE hitl_sessions SET rounds = rounds + 1 WHERE id = :s RETURNING rounds"),
            {"s": session_id},
        ).scalar_one()
        if shown:
            c.execute(
                insert(HitlShown).on_conflict_do_nothing(),
                [
                    {
                        "session_id": session_id,
                        "tile_id": r.tile_id,
                        "round_no": round_no,
                        "rank": r.rank,
                        "strategy": r.strategy,
                        "score": r.score,
                    }
                    for r in shown
                ],
            )
    return int(round_no)


def shown_tiles(engine: Engine, session_id: int, *, round_no: int | None = None) -> list[dict[str, Any]]:
    """Shown tiles of a session (one round's, or all), in round and rank order, with the owner's labels."""
    q = (
        "SELECT s.round_no, s.rank, s.tile_id, s.strategy, s.score, l.good, l.interest "
        "FROM hitl_shown s JOIN hitl_sessions h ON h.id = s.session_id "
        "LEFT JOIN LATERAL (SELECT good, interest FROM hitl_labels x WHERE x.tile_id = s.tile_id "
        "  AND x.author = h.owner AND x.concept = h.concept AND x.retracted_at IS NULL "
        "  ORDER BY x.id DESC LIMIT 1) l ON true "
        "WHERE s.session_id = :s" + (" AND s.round_no = :r" if round_no is not None else "") + " "
        "ORDER BY s.round_no, s.rank"
    )
    with engine.connect() as c:
        rows = c.execute(text(q), {"s": session_id, "r": round_no}).mappings().all()
    return [dict(r) for r in rows]


def excluded_tiles(engine: Engine, session_id: int, *, author: str, concept: str) -> list[uuid.UUID]:
    """Tiles a round must not show again: shown in this session, seeds, or labelled by ``author``."""
    with engine.connect() as c:
        rows = c.execute(
            text(
                "SELECT tile_id FROM hitl_shown WHERE session_id = :s "
                "UNION SELECT tile_id FROM hitl_seeds WHERE session_id = :s AND tile_id IS NOT NULL "
                "UNION SELECT tile_id FROM hitl_labels WHERE author = :a AND concept = :c AND retracted_at IS NULL"
            ),
            {"s": session_id, "a": author, "c": concept},
        ).all()
    return [r[0] for r in rows]


# -- labels --------------------------------------------------------------------------------------
def add_labels(engine: Engine, labels: Iterable[HitlLabelCreate]) -> list[int]:
    """Append labels to the history; returns their ids."""
    rows = [lab.model_dump() for lab in labels]
    if not rows:
        return []
    with engine.begin() as c:
        ids = c.execute(insert(HitlLabel).returning(text("id")), rows).scalars()
        return [int(i) for i in ids]


def retract_last(engine: Engine, session_id: int, *, author: str) -> dict[str, Any] | None:
    """Retract ``author``'s newest unretracted label in a session (undo); returns it, or None."""
    with engine.begin() as c:
        row = (
            c.execute(
                text(
                    "UPDATE hitl_labels SET retracted_at = now() WHERE id = ("
                    "  SELECT id FROM hitl_labels WHERE session_id = :s AND author = :a "
                    "  AND retracted_at IS NULL ORDER BY id DESC LIMIT 1 FOR UPDATE) "
                    "RETURNING id, tile_id, good, interest, round_no"
                ),
                {"s": session_id, "a": author},
            )
            .mappings()
            .first()
        )
    return dict(row) if row is not None else None


def effective_labels(
    engine: Engine, *, concept: str, model_version: str, dim: int, author: str | None = None
) -> SessionLabels:
    """The latest unretracted label per (author, tile) of a concept, with ``model_version`` embeddings.

    With ``author`` None every user's labels count (what the retraining jobs learn from); a tile
    two users disagree on then appears once per user.
    """
    q = (
        "SELECT DISTINCT ON (l.author, l.tile_id) l.tile_id, e.embedding, l.good, l.id "
        "FROM hitl_labels l JOIN embeddings e ON e.tile_id = l.tile_id AND e.model_version = :mv "
        "WHERE l.concept = :c AND l.retracted_at IS NULL"
        + (" AND l.author = :a" if author is not None else "")
        + " "
        "ORDER BY l.author, l.tile_id, l.id DESC"
    )
    with engine.connect() as c:
        rows = c.execute(text(q), {"c": concept, "mv": model_version, "a": author}).all()
        last = c.execute(
            text(
                "SELECT coalesce(max(id), 0) FROM hitl_labels WHERE concept = :c"
                + (" AND author = :a" if author is not None else "")
            ),
            {"c": concept, "a": author},
        ).scalar_one()
    vec = _vectors([(r[0], r[1]) for r in rows], dim)
    return SessionLabels(
        vec.tile_ids, vec.embeddings, np.asarray([bool(r[2]) for r in rows], bool), int(last)
    )


def label_history(
    engine: Engine, *, author: str | None = None, concept: str | None = None
) -> list[dict[str, Any]]:
    """Every label row (retracted ones too), oldest first, optionally of one author and concept."""
    where, params = [], {}
    if author is not None:
        where.append("author = :a")
        params["a"] = author
    if concept is not None:
        where.append("concept = :c")
        params["c"] = concept
    q = "SELECT * FROM hitl_labels" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
    with engine.connect() as c:
        return [dict(r) for r in c.execute(text(q), params).mappings()]


def labels_since(engine: Engine, last_id: int) -> dict[str, int]:
    """How many labels per concept were added after label id ``last_id``."""
    with engine.connect() as c:
        rows = c.execute(
            text("SELECT concept, count(*) FROM hitl_labels WHERE id > :i GROUP BY concept"), {"i": last_id}
        ).all()
    return {r[0]: int(r[1]) for r in rows}


# -- saved searches and their notifications ------------------------------------------------------
def save_search(engine: Engine, search: SavedSearch) -> SavedSearch:
    """Store a saved search, or replace the learner and settings of the session's existing one."""
    values = search.model_dump(exclude={"id", "created_at", "updated_at"})
    new = insert(SavedSearch).values(**values)
    stmt = new.on_conflict_do_update(
        constraint="uq_saved_searches_session",
        set_={
            **{
                k: new.excluded[k]
                for k in ("name", "threshold", "webhook_url", "learner", "last_label_id", "active")
            },
            "learner_version": SavedSearch.learner_version + 1,
            "updated_at": text("now()"),
        },
    ).returning(text("id"))
    with engine.begin() as c:
        new_id = c.execute(stmt).scalar_one()
    with Session(engine) as s:
        row = s.get(SavedSearch, new_id)
        assert row is not None
        s.expunge(row)
        return row


def update_learner(engine: Engine, search_id: int, *, learner: dict[str, Any], last_label_id: int) -> int:
    """Replace a saved search's learner (a retraining); returns its new learner version."""
    with engine.begin() as c:
        return int(
            c.execute(
                text(
                    "UPDATE saved_searches SET learner = CAST(:l AS jsonb), last_label_id = :i, "
                    "learner_version = learner_version + 1, updated_at = now() WHERE id = :s "
                    "RETURNING learner_version"
                ),
                {"l": _json(learner), "i": last_label_id, "s": search_id},
            ).scalar_one()
        )


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj)


def saved_searches(
    engine: Engine, *, owner: str | None = None, active_only: bool = False, model_version: str | None = None
) -> list[SavedSearch]:
    """Saved searches, oldest first, filtered as asked."""
    with Session(engine) as s:
        q = select(SavedSearch).order_by(SavedSearch.id)  # type: ignore[arg-type]
        if owner is not None:
            q = q.where(SavedSearch.owner == owner)
        if active_only:
            q = q.where(SavedSearch.active == True)  # noqa: E712 - SQL expression
        if model_version is not None:
            q = q.where(SavedSearch.model_version == model_version)
        rows = list(s.exec(q))
        for r in rows:
            s.expunge(r)
        return rows


def searches_changed_since(engine: Engine) -> datetime | None:
    """The newest ``updated_at`` over saved searches (a watcher reloads its learners when it moves)."""
    with engine.connect() as c:
        return c.execute(text("SELECT max(updated_at) FROM saved_searches")).scalar()


def insert_notifications(engine: Engine, rows: Sequence[dict[str, Any]]) -> int:
    """Store notifications (saved_search_id, tile_id, score, learner_version, webhook_state); replays add nothing."""
    if not rows:
        return 0
    with engine.begin() as c:
        res = c.execute(
            insert(SearchNotification)
            .on_conflict_do_nothing(constraint="uq_search_notifications")
            .returning(text("id")),
            list(rows),
        )
        return len(res.all())


def notifications(
    engine: Engine, *, owner: str | None = None, saved_search_id: int | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Newest notifications first, with the search's name and owner and the tile's identity."""
    where: list[str] = []
    params: dict[str, Any] = {"n": limit}
    if owner is not None:
        where.append("s.owner = :o")
        params["o"] = owner
    if saved_search_id is not None:
        where.append("n.saved_search_id = :i")
        params["i"] = saved_search_id
    q = (
        "SELECT n.*, s.name AS search_name, s.owner, t.survey, t.external_id, t.ra, t.dec "
        "FROM search_notifications n JOIN saved_searches s ON s.id = n.saved_search_id "
        "JOIN tiles t ON t.id = n.tile_id" + (" WHERE " + " AND ".join(where) if where else "") + " "
        "ORDER BY n.id DESC LIMIT :n"
    )
    with engine.connect() as c:
        return [dict(r) for r in c.execute(text(q), params).mappings()]


def default_model_version(engine: Engine) -> str | None:
    """The model version a new session searches by default: the promoted LVM, else the most-embedded."""
    with engine.connect() as c:
        promoted = c.execute(
            text("SELECT model_version FROM promotions WHERE role = 'lvm' ORDER BY id DESC LIMIT 1")
        ).scalar()
        if promoted is not None:
            return str(promoted)
        top = c.execute(
            text(
                "SELECT model_version FROM embeddings GROUP BY model_version ORDER BY count(*) DESC, model_version LIMIT 1"
            )
        ).scalar()
    return None if top is None else str(top)


def checkpoint_of(engine: Engine, model_version: str) -> str | None:
    """The checkpoint URI a model version was registered with, or None."""
    with engine.connect() as c:
        uri = c.execute(
            text("SELECT checkpoint_uri FROM model_versions WHERE name = :n"), {"n": model_version}
        ).scalar()
    return None if uri is None else str(uri)


def tile_names(engine: Engine, tile_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, dict[str, Any]]:
    """Survey, external id and position of tiles, by id (for listings)."""
    with engine.connect() as c:
        rows = c.execute(
            text("SELECT id, survey, external_id, ra, dec, pixels_uri FROM tiles WHERE id = ANY(:ids)"),
            {"ids": list(tile_ids)},
        ).mappings()
        return {r["id"]: dict(r) for r in rows}
