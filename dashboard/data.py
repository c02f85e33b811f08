"""Cached connections and queries of the dashboard.

Streamlit re-runs a page's script on every click, so everything a page reads goes through here:

- **resources** (``st.cache_resource``, one per server process): the settings, the pooled
  SQLAlchemy engine and the :class:`hitl.engine.SearchEngine`;
- **queries** (``st.cache_data`` with a TTL): each bounded by ``LIMIT`` or an index, never a full
  scan of ``tiles`` or ``embeddings`` per rerun. Table sizes come from PostgreSQL's statistics
  (``pg_stat_user_tables.n_live_tup``), not ``count(*)``, and "which model version" from the
  planner's row estimate, so a page stays fast on a table of millions of tiles.

Writes (labels, sessions, saved searches) go through the HITL engine, never through SQL written
here; the SQL console goes through :func:`db.sql.run_readonly`, always as the reader role.
"""

from __future__ import annotations

import importlib
import logging
import math
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import streamlit as st
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from galsift.settings import Settings

log = logging.getLogger(__name__)

#: the detector names the services write (detectors.service / detectors.morphology); a tile's
#: lens score is its lens head's where it has one, else its lens finder's (as in
#: galsift_api.tile_scores)
LENS_DETECTORS = ["lens_head", "lens_finder"]
MORPHOLOGY_DETECTOR = "morphology"


def _lens_score(tile: str) -> str:
    """SQL of the lens score of tile ``tile`` (an alias); binds ``:lens`` to :data:`LENS_DETECTORS`."""
    return (
        f"(SELECT d.score FROM detections d WHERE d.tile_id = {tile}.id AND d.detector = ANY(:lens) "
        f"AND d.label = 'lens' ORDER BY d.detector = '{LENS_DETECTORS[0]}' DESC, d.created_at DESC LIMIT 1)"
    )


#: how long cached query results live (seconds): lists that change rarely, and live feeds
SLOW_TTL = 60
LIVE_TTL = 5
#: most HEALPix ranges a cone filter is turned into (a coarser order is used past it)
MAX_CONE_RANGES = 256


# -- resources -------------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False)
def settings() -> Settings:
    """The process's settings (read once, from ``GALSIFT_*`` variables and ``.env``)."""
    return Settings()


# a cleared cache (a settings change, the tests) closes the pool's connections instead of
# leaving them to the garbage collector
@st.cache_resource(show_spinner=False, on_release=lambda e: e.dispose())
def engine() -> Engine:
    """The pooled engine on the galsift database (connections set up for HNSW search)."""
    from db.engine import get_engine

    return get_engine(settings())


@st.cache_resource(show_spinner=False)
def search_engine() -> Any:
    """The HITL :class:`~hitl.engine.SearchEngine` every page and user shares (it holds no state)."""
    from hitl.engine import SearchEngine

    return SearchEngine(engine())


#: what the pages import on first use; a new server imports it before it accepts sessions
WARM_MODULES = (
    "pandas",
    "PIL.Image",
    "astropy.units",
    "astropy.table",
    "astropy.io.votable",
    "astropy.visualization",
    "astropy_healpix",
    "db.hitl",
    "db.filters",
    "db.models",
    "hitl.engine",
    "hitl.anomaly",
    "dashboard.images",
    "dashboard.widgets",
)


def warm_up() -> dict[str, float]:
    """A new server process's one-time work, done before it accepts sessions.

    Imports :data:`WARM_MODULES` and opens the pooled connection and the search engine, so the
    first page a user opens costs what any later first visit costs (its queries), not the
    process's imports and connection set-up. A database that is down is logged, not raised: the
    pages report it themselves, and the server must start anyway.

    Returns
    -------
    dict
        Seconds spent on ``imports`` and on the ``pool``.
    """
    t0 = time.perf_counter()
    for name in WARM_MODULES:
        importlib.import_module(name)
    t1 = time.perf_counter()
    try:
        with engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        search_engine()
    except (SQLAlchemyError, OSError) as exc:
        log.warning("dashboard warm-up: no database connection yet (%s)", exc.__class__.__name__)
    return {"imports": t1 - t0, "pool": time.perf_counter() - t1}


def clear_caches() -> None:
    """Forget cached query results (after a write the page should see at once)."""
    st.cache_data.clear()


# -- model versions, surveys, classes --------------------------------------------------------------
@st.cache_data(ttl=SLOW_TTL, show_spinner=False)
def model_versions() -> list[dict[str, Any]]:
    """Registered model versions, newest first, with whether each has embeddings and the serving one.

    ``has_embeddings`` is an ``EXISTS`` on the model-version index; ``est_rows`` is the planner's
    estimate of its embedding rows (no count over the table).
    """
    with engine().connect() as c:
        rows = [
            dict(r)
            for r in c.execute(
                text(
                    "SELECT m.name, m.variant, m.checkpoint_uri, m.created_at, "
                    "EXISTS (SELECT 1 FROM embeddings e WHERE e.model_version = m.name) AS has_embeddings "
                    "FROM model_versions m ORDER BY m.created_at DESC, m.name"
                )
            ).mappings()
        ]
        promoted = c.execute(
            text("SELECT role, model_version, created_at FROM promotions ORDER BY id DESC LIMIT 20")
        ).all()
        for r in rows:
            r["est_rows"] = _estimate(c, r["name"]) if r["has_embeddings"] else 0
    serving: dict[str, str] = {}
    for role, mv, _ in promoted:
        serving.setdefault(role, mv)
    for r in rows:
        r["serving"] = ", ".join(role for role, mv in serving.items() if mv == r["name"])
    return rows


def _estimate(conn: Any, version: str) -> int:
    plan = conn.execute(
        text("EXPLAIN (FORMAT JSON) SELECT 1 FROM embeddings WHERE model_version = :v"), {"v": version}
    ).scalar_one()
    doc = plan[0] if isinstance(plan, list) else plan
    return int(doc["Plan"]["Plan Rows"])


def embedding_versions() -> list[str]:
    """Model versions that have embeddings, the default one first."""
    rows = model_versions()
    default = default_version()
    names = [r["name"] for r in rows if r["has_embeddings"]]
    return sorted(names, key=lambda n: (n != default,))


@st.cache_data(ttl=SLOW_TTL, show_spinner=False)
def default_version() -> str | None:
    """The version searches use by default: the promoted LVM, else the one with the most embeddings.

    Same rule as :func:`db.hitl.default_model_version`, with the planner's estimate in place of a
    ``count(*)`` grouped over the whole embeddings table.
    """
    with engine().connect() as c:
        promoted = c.execute(
            text("SELECT model_version FROM promotions WHERE role = 'lvm' ORDER BY id DESC LIMIT 1")
        ).scalar()
    if promoted is not None:
        return str(promoted)
    candidates = [r for r in model_versions() if r["has_embeddings"]]
    if not candidates:
        return None
    return str(max(candidates, key=lambda r: (r["est_rows"], r["created_at"]))["name"])


@st.cache_data(ttl=SLOW_TTL, show_spinner=False)
def surveys() -> list[str]:
    """Survey names (the small ``surveys`` table)."""
    with engine().connect() as c:
        return [str(r[0]) for r in c.execute(text("SELECT name FROM surveys ORDER BY name"))]


@st.cache_data(ttl=SLOW_TTL, show_spinner=False)
def morphology_classes() -> list[str]:
    """Class names the morphology heads score (every scored tile has them all: a few rows tell)."""
    with engine().connect() as c:
        rows = c.execute(
            text(
                "SELECT DISTINCT label FROM (SELECT label FROM detections WHERE detector = :d LIMIT 5000) s "
                "ORDER BY label"
            ),
            {"d": MORPHOLOGY_DETECTOR},
        )
        return [str(r[0]) for r in rows]


# -- tiles -----------------------------------------------------------------------------------------
TILE_COLUMNS = "t.id, t.survey, t.external_id, t.ra, t.dec, t.bands, t.pixels_uri, t.checksum"


def find_tile(ref: str) -> uuid.UUID | None:
    """A tile id from a UUID or ``[survey:]external_id`` (None if no such tile)."""
    ref = ref.strip()
    try:
        tid = uuid.UUID(ref)
    except ValueError:
        survey, _, ident = ref.rpartition(":")
        from db import hitl as store

        return store.tile_by_external_id(engine(), survey or None, ident)
    with engine().connect() as c:
        found = c.execute(text("SELECT id FROM tiles WHERE id = :i"), {"i": tid}).scalar()
    return found


@st.cache_data(ttl=SLOW_TTL, show_spinner=False, max_entries=512)
def tiles(ids: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Tile rows by id (as strings), with the newest lens score."""
    if not ids:
        return {}
    with engine().connect() as c:
        rows = c.execute(
            text(
                f"SELECT {TILE_COLUMNS}, {_lens_score('t')} AS lens_score FROM tiles t WHERE t.id = ANY(:ids)"
            ),
            {"ids": [uuid.UUID(i) for i in ids], "lens": LENS_DETECTORS},
        ).mappings()
        return {str(r["id"]): dict(r) for r in rows}


def embedding(tile_id: uuid.UUID | str, version: str) -> np.ndarray | None:
    """One tile's embedding by ``version``, or None."""
    from db import hitl as store
    from galsift.constants import EMBEDDING_DIM

    got = store.embeddings_of(engine(), [uuid.UUID(str(tile_id))], version, EMBEDDING_DIM)
    return got.embeddings[0] if len(got) else None


def random_tile(version: str) -> uuid.UUID | None:
    """A tile embedded by ``version``, drawn at random without sorting the table.

    A block sample of about a hundred rows' pages (``TABLESAMPLE SYSTEM``); on a table too small for
    that to find one, the first rows of the version's index at a random offset.
    """
    with engine().connect() as c:
        total = c.execute(
            text("SELECT n_live_tup FROM pg_stat_user_tables WHERE relname = 'embeddings'")
        ).scalar()
        pct = min(100.0, 100.0 * 100 / max(1, int(total or 1)))
        got = c.execute(
            text(
                f"SELECT tile_id FROM embeddings TABLESAMPLE SYSTEM ({pct:.6f}) "
                "WHERE model_version = :v ORDER BY random() LIMIT 1"
            ),
            {"v": version},
        ).scalar()
        if got is None:
            got = c.execute(
                text(
                    "SELECT tile_id FROM embeddings WHERE model_version = :v "
                    "OFFSET floor(random() * 200) LIMIT 1"
                ),
                {"v": version},
            ).scalar()
            if got is None:
                got = c.execute(
                    text("SELECT tile_id FROM embeddings WHERE model_version = :v LIMIT 1"), {"v": version}
                ).scalar()
    return got


@st.cache_data(ttl=600, show_spinner="ranking a sample of the table by how unusual each tile is…")
def anomalous_tiles(version: str, k: int = 24) -> list[tuple[str, float]]:
    """The ``k`` most unusual tiles of a sample of ``version`` (:func:`hitl.anomaly.rank`)."""
    from galsift.constants import EMBEDDING_DIM
    from hitl import anomaly

    return [(str(t), s) for t, s in anomaly.rank(engine(), version, k=k, dim=EMBEDDING_DIM)]


# -- nearest neighbours ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Filters:
    """What a neighbour search may be restricted to (all optional)."""

    surveys: tuple[str, ...] = ()
    #: cone: (ra, dec, radius), degrees
    cone: tuple[float, float, float] | None = None
    lens_min: float | None = None
    #: (class, minimum probability) of the morphology heads
    morphology: tuple[str, float] | None = None

    @property
    def active(self) -> bool:
        """Whether any filter is set."""
        return bool(self.surveys or self.cone or self.lens_min is not None or self.morphology)


def cone_ranges(ra: float, dec: float, radius: float) -> list[tuple[int, int]]:
    """Nested HEALPix index ranges (at ``tiles.healpix``'s order) covering a cone.

    At most :data:`MAX_CONE_RANGES` of them: the pixels of the finest order that needs no more
    than that, each widened to the range of fine pixels it contains.
    """
    import astropy.units as u
    from astropy_healpix import HEALPix

    from galsift.constants import HEALPIX_ORDER

    # start at the finest order whose pixel count the cone's area keeps under the cap: a cone
    # search of a wide cone at the finest order lists hundreds of thousands of pixels (seconds)
    cone_sr = 2 * math.pi * (1 - math.cos(math.radians(min(radius, 180.0))))
    start = HEALPIX_ORDER
    while start > 0 and cone_sr / (4 * math.pi / (12 * 4**start)) > MAX_CONE_RANGES / 2:
        start -= 1
    for order in range(start, -1, -1):
        hp = HEALPix(nside=2**order, order="nested", frame="icrs")
        pixels = hp.cone_search_lonlat(ra * u.deg, dec * u.deg, radius=radius * u.deg)
        if len(pixels) <= MAX_CONE_RANGES or order == 0:
            shift = 4 ** (HEALPIX_ORDER - order)
            ranges = sorted((int(p) * shift, (int(p) + 1) * shift) for p in pixels)
            merged: list[tuple[int, int]] = []
            for lo, hi in ranges:
                if merged and merged[-1][1] == lo:
                    merged[-1] = (merged[-1][0], hi)
                else:
                    merged.append((lo, hi))
            return merged
    return []  # pragma: no cover - order 0 always returns


def _filter_sql(f: Filters, params: dict[str, Any]) -> str:
    where = []
    if f.surveys:
        where.append("t.survey = ANY(:surveys)")
        params["surveys"] = list(f.surveys)
    if f.cone is not None:
        ra, dec, radius = f.cone
        ranges = cone_ranges(ra, dec, radius)
        params.update(c_lo=[r[0] for r in ranges], c_hi=[r[1] for r in ranges])
        params.update(c_ra=ra, c_dec=dec, c_r=radius)
        where.append(
            "EXISTS (SELECT 1 FROM unnest(CAST(:c_lo AS bigint[]), CAST(:c_hi AS bigint[])) r(lo, hi) "
            "WHERE t.healpix >= r.lo AND t.healpix < r.hi) "
            "AND degrees(acos(least(1.0, sin(radians(t.dec)) * sin(radians(:c_dec)) "
            "+ cos(radians(t.dec)) * cos(radians(:c_dec)) * cos(radians(t.ra - :c_ra))))) <= :c_r"
        )
    if f.lens_min is not None:
        where.append(f"{_lens_score('t')} >= :lens_min")
        params.update(lens=LENS_DETECTORS, lens_min=float(f.lens_min))
    if f.morphology is not None:
        where.append(
            "EXISTS (SELECT 1 FROM detections d WHERE d.tile_id = t.id AND d.detector = :morph_det "
            "AND d.label = :morph_label AND d.score >= :morph_min)"
        )
        params.update(morph_det=MORPHOLOGY_DETECTOR, morph_label=f.morphology[0], morph_min=f.morphology[1])
    return "".join(f" AND {w}" for w in where)


@st.cache_data(ttl=120, show_spinner=False, max_entries=256)
def neighbours(
    query: np.ndarray,
    version: str,
    *,
    k: int,
    offset: int = 0,
    filters: Filters = Filters(),
    exclude: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """Tiles nearest (cosine) to ``query`` among ``version``'s embeddings, one page of them.

    One pgvector HNSW query; the connection's iterative index scan keeps ``k`` rows coming under
    the filters. ``similarity`` is ``1 - cosine distance``.
    """
    params: dict[str, Any] = {
        "q": np.asarray(query, dtype=np.float32),
        "v": version,
        "k": int(k),
        "o": int(offset),
        "ex": [uuid.UUID(x) for x in exclude],
        "lens": LENS_DETECTORS,
    }
    where = _filter_sql(filters, params)
    sql = (
        "SELECT n.*, "
        f"{_lens_score('n')} AS lens_score "
        f"FROM (SELECT {TILE_COLUMNS}, 1 - (e.embedding <=> :q) AS similarity "
        "FROM embeddings e JOIN tiles t ON t.id = e.tile_id "
        f"WHERE e.model_version = :v AND e.tile_id <> ALL(:ex){where} "
        "ORDER BY e.embedding <=> :q LIMIT :k OFFSET :o) n ORDER BY n.similarity DESC"
    )
    with engine().connect() as c:
        return [dict(r) for r in c.execute(text(sql), params).mappings()]


# -- cutouts ---------------------------------------------------------------------------------------
@st.cache_data(show_spinner=False, max_entries=4096)
def cutout(uri: str, checksum: str | None, bands: tuple[str, ...] | None) -> bytes:
    """PNG bytes of a stored tile's thumbnail, stretched (see :mod:`dashboard.images`).

    Cached by URI and checksum: stored pixels never change under the same checksum. A tile whose
    pixels cannot be read (missing object, checksum mismatch) gets a placeholder, not an error.
    """
    from dashboard import images
    from galsift.objectstore import read_array

    try:
        pixels = read_array(uri, checksum=checksum)
        rgb = images.thumbnail(images.to_rgb(pixels, bands))
    except (OSError, ValueError) as exc:
        return images.png_bytes(images.placeholder(type(exc).__name__))
    return images.png_bytes(rgb)


def tile_cutout(row: dict[str, Any]) -> bytes:
    """The thumbnail of a tile row (as :func:`tiles` or :func:`neighbours` return it)."""
    bands = tuple(row["bands"]) if row.get("bands") else None
    return cutout(str(row["pixels_uri"]), row.get("checksum"), bands)


# -- HITL --------------------------------------------------------------------------------------------
def sessions(owner: str) -> list[Any]:
    """The user's HITL sessions, newest first."""
    from db import hitl as store

    return sorted(store.list_sessions(engine(), owner=owner), key=lambda s: -int(s.id))


def round_history(session_id: int) -> list[dict[str, Any]]:
    """Per round of a session: shown, labelled, good, precision of the labelled, cumulative found."""
    from db import hitl as store

    rows = store.shown_tiles(engine(), session_id)
    out: dict[int, dict[str, Any]] = {}
    for r in rows:
        o = out.setdefault(
            int(r["round_no"]), {"round": int(r["round_no"]), "shown": 0, "labelled": 0, "good": 0}
        )
        o["shown"] += 1
        if r["good"] is not None:
            o["labelled"] += 1
            o["good"] += int(bool(r["good"]))
    found = 0
    history = []
    for rnd in sorted(out):
        o = out[rnd]
        found += o["good"]
        o["precision"] = o["good"] / o["labelled"] if o["labelled"] else math.nan
        o["found"] = found
        history.append(o)
    return history


@st.cache_data(ttl=LIVE_TTL, show_spinner=False)
def notifications(owner: str, limit: int = 50) -> list[dict[str, Any]]:
    """The user's saved searches' newest notifications."""
    from db import hitl as store

    return store.notifications(engine(), owner=owner, limit=limit)


def saved_searches(owner: str) -> list[Any]:
    """The user's saved searches."""
    from db import hitl as store

    return store.saved_searches(engine(), owner=owner)


# -- alerts ------------------------------------------------------------------------------------------
@st.cache_data(ttl=LIVE_TTL, show_spinner=False)
def alerts(
    *, limit: int, offset: int = 0, known: bool | None = None, min_score: float = 0.0, user: str | None = None
) -> list[dict[str, Any]]:
    """Newest alerts first, one page, with the tile and (for ``user``) their own label of the tile.

    ``known`` True/False keeps only candidates that did / did not match a known lens. The label is
    the user's newest non-retracted HITL label of the concept ``lens``: labelling an alert from the
    feed acknowledges it.
    """
    where = ["a.score >= :s"]
    params: dict[str, Any] = {"n": limit, "o": offset, "s": min_score, "u": user or ""}
    if known is not None:
        where.append("COALESCE((a.crossmatch ->> 'known')::boolean, false) = :k")
        params["k"] = known
    sql = (
        "SELECT a.id, a.tile_id, a.model_version, a.kind, a.score, a.crossmatch, a.created_at, a.sent_at, "
        "t.survey, t.external_id, t.ra, t.dec, t.bands, t.pixels_uri, t.checksum, "
        "(SELECT h.good FROM hitl_labels h WHERE h.tile_id = a.tile_id AND h.author = :u "
        " AND h.concept = a.kind AND h.retracted_at IS NULL ORDER BY h.id DESC LIMIT 1) AS my_label "
        "FROM alerts a JOIN tiles t ON t.id = a.tile_id WHERE " + " AND ".join(where) + " "
        "ORDER BY a.created_at DESC, a.id DESC LIMIT :n OFFSET :o"
    )
    with engine().connect() as c:
        return [dict(r) for r in c.execute(text(sql), params).mappings()]


# -- operations ----------------------------------------------------------------------------------------
@st.cache_data(ttl=LIVE_TTL, show_spinner=False)
def table_sizes() -> dict[str, int]:
    """Live rows per table from PostgreSQL's statistics (no ``count(*)`` over large tables)."""
    with engine().connect() as c:
        return {
            str(r[0]): int(r[1])
            for r in c.execute(
                text(
                    "SELECT relname, n_live_tup FROM pg_stat_user_tables WHERE schemaname = 'public' ORDER BY 1"
                )
            )
        }


@st.cache_data(ttl=LIVE_TTL, show_spinner=False)
def stage_stats() -> list[dict[str, Any]]:
    """Per-worker counters of the stages, with a rate over the worker's lifetime and staleness."""
    with engine().connect() as c:
        return [
            dict(r)
            for r in c.execute(
                text(
                    "SELECT stage, worker, consumed, accepted, rejected, lag, batches, started_at, updated_at, "
                    "accepted / GREATEST(EXTRACT(EPOCH FROM updated_at - started_at), 1) AS accepted_per_s, "
                    "now() - updated_at > interval '60 seconds' AS stale "
                    "FROM stage_stats ORDER BY stage, updated_at DESC LIMIT 200"
                )
            ).mappings()
        ]


@st.cache_data(ttl=LIVE_TTL, show_spinner=False)
def ingest_per_minute(minutes: int = 60) -> list[dict[str, Any]]:
    """Tiles ingested per minute over the last ``minutes`` (an index range on ``ingested_at``)."""
    with engine().connect() as c:
        return [
            dict(r)
            for r in c.execute(
                text(
                    "SELECT date_trunc('minute', ingested_at) AS minute, count(*) AS tiles FROM tiles "
                    "WHERE ingested_at > now() - make_interval(mins => :m) GROUP BY 1 ORDER BY 1"
                ),
                {"m": minutes},
            ).mappings()
        ]


@st.cache_data(ttl=LIVE_TTL, show_spinner=False)
def dead_letters() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Dead letters by (stage, reason), and the newest 20 (without their payloads)."""
    with engine().connect() as c:
        by_reason = [
            dict(r)
            for r in c.execute(
                text(
                    "SELECT stage, reason, count(*) AS n, max(created_at) AS newest FROM ingest_errors "
                    "GROUP BY stage, reason ORDER BY n DESC"
                )
            ).mappings()
        ]
        newest = [
            dict(r)
            for r in c.execute(
                text(
                    'SELECT id, stage, reason, left(detail, 200) AS detail, topic, partition, "offset", '
                    "created_at FROM ingest_errors ORDER BY created_at DESC LIMIT 20"
                )
            ).mappings()
        ]
    return by_reason, newest


@st.cache_data(ttl=LIVE_TTL, show_spinner=False)
def job_runs(limit: int = 50) -> list[dict[str, Any]]:
    """Newest scheduled-job runs (:func:`db.jobs.recent_runs`)."""
    from db.jobs import recent_runs

    return recent_runs(engine(), limit=limit)


@st.cache_data(ttl=10, show_spinner=False)
def consumer_lag() -> list[dict[str, Any]] | str:
    """Per consumer group and topic: committed offsets, end offsets and their difference (lag).

    The same figure a stage reports of itself (end offset minus position), but from the broker's
    side, so a stage that is down still shows its backlog. When the broker does not answer within
    a few seconds, the error text is returned (and cached like a result: a broker that is away
    must not cost every rerun the wait).
    """
    try:
        return _consumer_lag()
    except Exception as exc:  # any client error means "Kafka did not answer"
        return f"{type(exc).__name__}: {exc}"


def _consumer_lag() -> list[dict[str, Any]]:
    from kafka.admin import OffsetSpec

    from galsift.kafka import kafka_admin

    cfg = settings()
    ours = set(cfg.topics.model_dump().values())
    rows: list[dict[str, Any]] = []
    with kafka_admin(cfg, timeout_s=3.0) as admin:
        groups = [g["group_id"] if isinstance(g, dict) else g[0] for g in admin.list_groups()]
        if not groups:
            return []
        committed: dict[str, dict[Any, Any]] = {}
        for g in groups:
            committed.update(admin.list_group_offsets({g: None}))
        parts = {tp for offsets in committed.values() for tp in offsets if tp.topic in ours}
        ends = admin.list_partition_offsets({tp: OffsetSpec.LATEST for tp in parts}) if parts else {}
        for g, offsets in committed.items():
            per_topic: dict[str, dict[str, int]] = {}
            for tp, om in offsets.items():
                if tp not in ends:
                    continue
                t = per_topic.setdefault(tp.topic, {"partitions": 0, "committed": 0, "end": 0})
                t["partitions"] += 1
                t["committed"] += max(0, int(om.offset))
                t["end"] += int(ends[tp].offset)
            for topic, t in per_topic.items():
                rows.append({"group": g, "topic": topic, **t, "lag": max(0, t["end"] - t["committed"])})
    return sorted(rows, key=lambda r: (r["topic"], r["group"]))


def sample_ids(values: Iterable[Any]) -> tuple[str, ...]:
    """Tile ids as a hashable tuple of strings (the cache key of :func:`tiles`)."""
    return tuple(str(v) for v in values)


# -- SQL console ---------------------------------------------------------------------------------------
class SqlRefusedError(Exception):
    """A console query the reader role refused, that timed out or failed (the message says which)."""


#: limits of a console query (the role's own limits stay the ceiling)
SQL_MAX_ROWS = 5000
SQL_TIMEOUT_S = 15.0


def run_sql(query: str) -> dict[str, Any]:
    """One console query through :func:`db.sql.run_readonly`, always as the reader role.

    Read-only and rolled back, at most :data:`SQL_MAX_ROWS` rows and :data:`SQL_TIMEOUT_S` seconds.

    Returns
    -------
    dict
        ``{"columns": [...], "rows": [dict, ...], "truncated": bool}``.

    Raises
    ------
    SqlRefusedError
        With the reader's one-line message when the query is refused, times out or fails.
    """
    from db.sql import QueryRefused, run_readonly

    try:
        result = run_readonly(settings(), query, max_rows=SQL_MAX_ROWS, timeout_s=SQL_TIMEOUT_S)
    except QueryRefused as exc:
        raise SqlRefusedError(f"refused ({exc.reason}): {exc}") from exc
    columns = list(result.columns)
    # duplicate column names (two "id"s from a join) would collapse in a dict: number them
    names = [c if columns.count(c) == 1 else f"{c}_{i}" for i, c in enumerate(columns)]
    rows = [dict(zip(names, row, strict=True)) for row in result.rows]
    return {"columns": names, "rows": rows, "truncated": bool(result.truncated)}
