"""``galsift bench dashboard``: server time to render each page on a table of N tiles.

One run, on the configured PostgreSQL (and Kafka, for the lag table):

1. N synthetic tiles are loaded under the survey :data:`SURVEY` with one model version's
   embeddings (clustered unit vectors, so neighbours mean something), a lens score and three
   morphology probabilities each, alerts for the highest lens scores, a few dead letters, and a
   HITL session of two labelled rounds for the user :data:`USER`. Their pixels are 48 small
   synthetic flux cutouts in the object store, shared round-robin (what is timed is the page, not
   the pixel store). Rows go in with ``COPY``; the HNSW index is maintained as in production.
2. Each page's script is run with Streamlit's ``AppTest`` (the server side of a page view: every
   query, cutout and element, no browser): ``cold`` after clearing every cache and the
   warm-up that ``galsift dashboard`` does before it accepts sessions (a new server process;
   the warm-up itself is the ``server_start`` row), then ``warm`` runs with the caches as a user's reruns find them; the Search page is
   also timed with a new query tile each run (``new_query``: neighbours and thumbnails not cached).
3. The rows are deleted again unless ``--keep`` (a kept load is reused by the next run).

The baseline in the same run is ``count_tiles``: one ``SELECT count(*) FROM tiles``, the full
scan a page must not do per rerun.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, text

from galsift.settings import Settings

log = logging.getLogger(__name__)

#: the bench's survey and model version (the rows it loads and deletes)
SURVEY = "benchdash"
VERSION = "benchdash-lvm"
USER = "bench"
#: clusters of the synthetic embeddings
CLUSTERS = 24
PIXEL_VARIANTS = 48
APP = Path(__file__).resolve().parent / "app.py"
PAGES = ("search", "hitl", "alerts", "sql", "operations")


def main(settings: Settings, *, tiles: int, repeats: int, keep: bool, json_path: Path | None) -> int:
    """Load (or reuse), time every page, print a table; returns an exit status."""
    from db.engine import get_engine

    engine = get_engine(settings)
    try:
        t0 = time.perf_counter()
        loaded = count_loaded(engine)
        if loaded != tiles:
            if loaded:
                unload(engine)
            load(engine, settings, n=tiles)
        load_s = time.perf_counter() - t0
        print(f"{tiles:,} tiles ready in {load_s:.1f} s ({'reused' if loaded == tiles else 'loaded'})")
        rows = time_pages(engine, settings, repeats=repeats)
        rows.append(_baseline(engine))
    finally:
        if not keep:
            unload(engine)
        engine.dispose()
    print(format_table(rows, tiles=tiles))
    if json_path is not None:
        doc = {
            "command": "bench dashboard",
            "data": f"synthetic:{tiles}",
            "model_version": VERSION,
            "results": rows,
        }
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(doc, indent=1, default=str))
    worst = max(r["p95_ms"] for r in rows if r["model"] != "count_tiles")
    return 0 if worst < 2000 else 1


# -- data -----------------------------------------------------------------------------------------
def count_loaded(engine: Engine) -> int:
    """Tiles of the bench survey already in the database."""
    with engine.connect() as c:
        return int(
            c.execute(text("SELECT count(*) FROM tiles WHERE survey = :s"), {"s": SURVEY}).scalar_one()
        )


def _pixels(rng: np.random.Generator, i: int) -> np.ndarray:
    """A 3x64x64 g,r,z flux cutout: a galaxy (Sersic-like), every third one with a blue arc."""
    size = 64
    y, x = np.mgrid[:size, :size] - size / 2 + 0.5
    q, theta = rng.uniform(0.5, 1.0), rng.uniform(0, np.pi)
    xr = x * np.cos(theta) + y * np.sin(theta)
    yr = (-x * np.sin(theta) + y * np.cos(theta)) / q
    r = np.hypot(xr, yr)
    galaxy = np.exp(-((r / rng.uniform(2.5, 6.0)) ** 0.7))
    colour = np.array([0.5, 1.0, 1.6])[:, None, None]  # g, r, z: a red elliptical
    flux = 2.0 * galaxy[None] * colour
    if i % 3 == 0:
        ring = np.exp(-0.5 * ((np.hypot(x, y) - rng.uniform(9, 14)) / 1.2) ** 2)
        arc = ring * (np.cos(np.arctan2(y, x) - rng.uniform(0, 2 * np.pi)) > 0.2)
        flux += 0.6 * arc[None] * np.array([1.2, 0.8, 0.5])[:, None, None]
    flux += rng.normal(0, 0.01, flux.shape)
    return flux.astype(np.float32)


def load(engine: Engine, settings: Settings, *, n: int) -> None:
    """Load ``n`` synthetic tiles with embeddings, detections, alerts, dead letters and a HITL session."""
    import astropy.units as u
    from astropy_healpix import HEALPix
    from psycopg.types.json import Jsonb

    from db import repo
    from db.models import ModelVersionCreate
    from galsift import messages, objectstore
    from galsift.constants import EMBEDDING_DIM, HEALPIX_ORDER

    rng = np.random.default_rng(20240510)
    store_url = settings.pixel_store_url.rstrip("/")
    pixel_refs = []
    for i in range(PIXEL_VARIANTS):
        blob, checksum = objectstore.encode_array(_pixels(rng, i))
        uri = f"{store_url}/{SURVEY}/variant_{i}.npy"
        import fsspec

        with fsspec.open(uri, "wb", auto_mkdir=True) as fh:
            fh.write(blob)
        pixel_refs.append((uri, checksum))
    with engine.begin() as c:
        c.execute(
            text(
                "INSERT INTO surveys (name, description) VALUES (:s, 'bench dashboard') ON CONFLICT DO NOTHING"
            ),
            {"s": SURVEY},
        )
    repo.register_model_version(
        engine,
        ModelVersionCreate(
            name=VERSION, variant="lvm_tiny", checkpoint_uri="file:///bench", checksum="0" * 64
        ),
    )
    ra = rng.uniform(140.0, 160.0, n)
    dec = rng.uniform(-5.0, 15.0, n)
    hp = HEALPix(nside=2**HEALPIX_ORDER, order="nested", frame="icrs")
    healpix = hp.lonlat_to_healpix(ra * u.deg, dec * u.deg)
    ids = [uuid.UUID(messages.tile_id(SURVEY, f"b{i}")) for i in range(n)]
    centres = rng.normal(size=(CLUSTERS, EMBEDDING_DIM))
    cluster = rng.integers(0, CLUSTERS, n)
    lens = np.clip(rng.beta(0.6, 6.0, n) + (cluster == 0) * 0.5, 0, 1)
    morph = rng.dirichlet((1.0, 1.0, 1.0), n)
    raw = engine.raw_connection()
    try:
        pg: Any = raw.driver_connection
        with pg.cursor() as cur:
            started = time.perf_counter()
            with cur.copy(
                "COPY tiles (id, survey, external_id, ra, dec, healpix, bands, pixel_scale, shape, dtype, "
                "pixels_uri, checksum, meta) FROM STDIN"
            ) as cp:
                for i in range(n):
                    uri, checksum = pixel_refs[i % PIXEL_VARIANTS]
                    cp.write_row(
                        (
                            ids[i],
                            SURVEY,
                            f"b{i}",
                            float(ra[i]),
                            float(dec[i]),
                            int(healpix[i]),
                            ["g", "r", "z"],
                            0.262,
                            [3, 64, 64],
                            "float32",
                            uri,
                            checksum,
                            Jsonb({}),
                        )
                    )
            log.info("tiles copied in %.1f s", time.perf_counter() - started)
            started = time.perf_counter()
            with cur.copy(
                "COPY embeddings (tile_id, model_version, embedding) FROM STDIN WITH (FORMAT BINARY)"
            ) as cp:
                cp.set_types(["uuid", "text", "vector"])
                for lo in range(0, n, 10_000):
                    hi = min(n, lo + 10_000)
                    vec = centres[cluster[lo:hi]] + 1.5 * rng.normal(size=(hi - lo, EMBEDDING_DIM))
                    vec = (vec / np.linalg.norm(vec, axis=1, keepdims=True)).astype(np.float32)
                    for j in range(hi - lo):
                        cp.write_row((ids[lo + j], VERSION, vec[j]))
            log.info("embeddings copied (HNSW maintained) in %.1f s", time.perf_counter() - started)
            started = time.perf_counter()
            with cur.copy(
                "COPY detections (tile_id, model_version, detector, label, score, extra) FROM STDIN"
            ) as cp:
                for i in range(n):
                    cp.write_row((ids[i], VERSION, "lens_finder", "lens", float(lens[i]), Jsonb({})))
                    for k, label in enumerate(("elliptical", "ring", "spiral")):
                        cp.write_row((ids[i], VERSION, "morphology", label, float(morph[i, k]), Jsonb({})))
            log.info("detections copied in %.1f s", time.perf_counter() - started)
            top = np.argsort(-lens)[:2000]
            with cur.copy("COPY alerts (tile_id, model_version, kind, score, crossmatch) FROM STDIN") as cp:
                for rank, i in enumerate(top):
                    known = rank % 7 == 0
                    xm = {"known": known, "catalog": "bench", "radius_arcsec": 5.0, "searched": True}
                    if known:
                        xm["match"] = {"name": f"BENCH J{i}", "separation_arcsec": 0.4}
                    cp.write_row((ids[i], VERSION, "lens", float(lens[i]), Jsonb(xm)))
            with cur.copy(
                'COPY ingest_errors (stage, reason, detail, topic, partition, "offset", payload) FROM STDIN'
            ) as cp:
                for i in range(50):
                    reason = ("bad_schema", "non_finite", "unknown_bands")[i % 3]
                    cp.write_row(("ingest", reason, f"{SURVEY} synthetic", "tiles.raw", 0, i, b"{}"))
        pg.commit()
        with pg.cursor() as cur:
            pg.autocommit = True
            for table in ("tiles", "embeddings", "detections", "alerts"):
                cur.execute(f"ANALYZE {table}")
    finally:
        raw.close()
    _hitl_session(engine, ids, cluster)


def _hitl_session(engine: Engine, ids: list[uuid.UUID], cluster: np.ndarray) -> None:
    """A session of two labelled rounds for :data:`USER` (good = the lens-rich cluster 0)."""
    from hitl.engine import SearchEngine

    hitl = SearchEngine(engine)
    seeds = [ids[i] for i in np.flatnonzero(cluster == 0)[:3]]
    session = hitl.new_session(
        owner=USER, concept="lens", model_version=VERSION, tile_ids=seeds, name="bench"
    )
    good_of = {t: bool(c == 0) for t, c in zip(ids, cluster, strict=True)}
    for _ in range(2):
        rnd = hitl.next_round(session.id, k=12)
        hitl.label(session.id, [(s.tile_id, good_of[s.tile_id]) for s in rnd.shown])
    hitl.next_round(session.id, k=12)


def unload(engine: Engine) -> None:
    """Delete everything the bench loaded (tiles cascade to embeddings, detections, alerts, labels)."""
    with engine.begin() as c:
        c.execute(text("DELETE FROM hitl_sessions WHERE owner = :u"), {"u": USER})
        c.execute(text("DELETE FROM hitl_labels WHERE author = :u"), {"u": USER})
        c.execute(text("DELETE FROM ingest_errors WHERE detail = :d"), {"d": f"{SURVEY} synthetic"})
        c.execute(text("DELETE FROM tiles WHERE survey = :s"), {"s": SURVEY})
        c.execute(text("DELETE FROM promotions WHERE model_version = :v"), {"v": VERSION})
        c.execute(text("DELETE FROM embeddings WHERE model_version = :v"), {"v": VERSION})
        c.execute(text("DELETE FROM detections WHERE model_version = :v"), {"v": VERSION})
        c.execute(text("DELETE FROM alerts WHERE model_version = :v"), {"v": VERSION})
        c.execute(text("DELETE FROM model_versions WHERE name = :v"), {"v": VERSION})
        c.execute(text("DELETE FROM surveys WHERE name = :s"), {"s": SURVEY})


# -- timing -----------------------------------------------------------------------------------------
def _apptest(page: str, session_id: int | None, tile: str | None) -> Any:
    from streamlit.testing.v1 import AppTest

    from dashboard.auth import USER_KEY

    at = AppTest.from_file(str(APP), default_timeout=120)
    at.session_state[USER_KEY] = USER
    if session_id is not None:
        at.session_state["hitl_session_id"] = session_id
    if page == "search" and tile is not None:
        at.session_state["search_start"] = "Tile id"
        at.session_state["search_tile"] = tile
    if page == "sql":
        at.session_state["sql_query"] = (
            "SELECT survey, external_id, ra, dec, lens_score FROM galsift_api.tile_scores LIMIT 200"
        )
    at.switch_page(f"views/{page}.py")
    return at


def _run(at: Any) -> float:
    start = time.perf_counter()
    at.run()
    elapsed = time.perf_counter() - start
    if at.exception:
        raise RuntimeError(f"page raised: {at.exception[0].value}")
    return elapsed


def time_pages(engine: Engine, settings: Settings, *, repeats: int) -> list[dict[str, Any]]:
    """Cold and warm server render times of every page (milliseconds)."""
    import streamlit as st

    # the app reads its settings as `galsift dashboard` does (environment, .env): the same as ours
    with engine.connect() as c:
        sid = c.execute(
            text("SELECT id FROM hitl_sessions WHERE owner = :u ORDER BY id DESC LIMIT 1"), {"u": USER}
        ).scalar()
        sample = [
            str(r[0])
            for r in c.execute(
                text("SELECT external_id FROM tiles TABLESAMPLE SYSTEM (1) WHERE survey = :s LIMIT :n"),
                {"s": SURVEY, "n": repeats + 1},
            )
        ]
    from dashboard import data

    rows: list[dict[str, Any]] = []
    for page in PAGES:
        tile = f"{SURVEY}:{sample[0]}" if sample else None
        st.cache_data.clear()
        st.cache_resource.clear()
        # what `galsift dashboard` does before it accepts sessions (timed apart: no user waits)
        start = time.perf_counter()
        data.warm_up()
        rows.append(_row(page, "server_start", [time.perf_counter() - start]))
        at = _apptest(page, sid, tile)
        cold = _run(at)
        warm = [_run(at) for _ in range(repeats)]
        rows.append(_row(page, "cold", [cold]))
        rows.append(_row(page, "warm", warm))
        if page == "search" and len(sample) > 1:
            fresh = []
            for ext in sample[1:]:
                at.session_state["search_tile"] = f"{SURVEY}:{ext}"
                fresh.append(_run(at))
            rows.append(_row(page, "new_query", fresh))
    return rows


def _row(page: str, cache: str, seconds: list[float]) -> dict[str, Any]:
    ms = sorted(1e3 * s for s in seconds)
    return {
        "model": f"page:{page}",
        "filter": cache,
        "repeats": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p95_ms": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 1),
    }


def _baseline(engine: Engine) -> dict[str, Any]:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        with engine.connect() as c:
            c.execute(text("SELECT count(*) FROM tiles")).scalar_one()
        times.append(time.perf_counter() - start)
    row = _row("", "", times)
    row["model"] = "count_tiles"
    row["filter"] = "baseline"
    return row


def format_table(rows: list[dict[str, Any]], *, tiles: int) -> str:
    """The results as a text table."""
    lines = [
        f"dashboard pages on {tiles:,} tiles (server time, AppTest)",
        f"{'page':22} {'cache':12} {'n':>3} {'p50 ms':>9} {'p95 ms':>9}",
    ]
    for r in rows:
        lines.append(
            f"{r['model']:22} {r['filter']:12} {r['repeats']:>3} {r['p50_ms']:>9.1f} {r['p95_ms']:>9.1f}"
        )
    return "\n".join(lines)
