"""``galsift bench search``: pgvector HNSW against FAISS HNSW and exact search, on the same vectors.

One run, on the configured PostgreSQL, in a throw-away schema ``bench_<run>`` (dropped at the end;
the real ``embeddings`` table is never touched):

1. the vectors and their metadata (model version, sky position and nested HEALPix index, a
   detector score) are copied into ``bench_<run>.items``, with the same ``vector(256)`` column
   as ``embeddings``;
2. the ground truth is exact search in process (numpy, float32 dot products of unit vectors,
   i.e. cosine distance), unfiltered and under each filter;
3. for every index configuration (``m`` × ``ef_construction`` × ``vector`` or ``halfvec``) an
   HNSW index is built and timed (``halfvec``: on the expression ``embedding::halfvec(256)``,
   half the size), then queried one at a time at each ``hnsw.ef_search``, unfiltered and with
   each filter under each ``hnsw.iterative_scan`` mode (pgvector 0.8: ``off``,
   ``relaxed_order``, ``strict_order``; bounded by ``hnsw.max_scan_tuples``), then dropped;
4. FAISS ``IndexHNSWFlat`` (inner product on the same unit vectors, same ``M`` and
   ``efConstruction``) is built and queried in process at the same ``efSearch`` values, with
   the filters applied as FAISS ID selectors;
5. exact search is also timed in PostgreSQL (sequential scan, no index: ``exact_seqscan``; for
   the sky region and the score, a B-tree on the filter column and an exact sort of the rows it
   selects: ``exact_btree``) and in numpy (``exact_numpy``).

Queries go one at a time over one connection, as plain statements (planned per query, as an
application sends them), so latencies include the round trip and planning. ``pgvector_hnsw`` rows
are measured with ``enable_seqscan = off`` so that they always time the index; their ``planner``
key says what PostgreSQL would pick on its own (a sequential scan can win for selective filters).

Recall@k counts a returned row as correct when its exact distance is within :data:`TIE_EPS` of
the k-th smallest exact distance (ties and float rounding between PostgreSQL's float32 sums and
numpy's do not count as misses); under a filter the truth is the k nearest rows that pass it, and
``full_k`` is the share of queries that got ``min(k, rows passing)`` rows back.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from sqlalchemy import Engine

log = logging.getLogger(__name__)

#: distance slack of a correct neighbour (cosine distance; float32 sums differ by ~1e-6)
TIE_EPS = 1e-5
#: index types: the column itself, or its half-precision cast
INDEX_TYPES = ("vector", "halfvec")
#: pgvector 0.8 ``hnsw.iterative_scan`` modes
ITERATIVE_MODES = ("off", "relaxed_order", "strict_order")
#: filters the benchmark knows
FILTERS = ("model_version", "sky_region", "score")


class BenchError(RuntimeError):
    """The benchmark cannot run with these inputs or on this database."""


# --------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class BenchTable:
    """Rows to search: unit vectors and the metadata the filters use.

    Attributes
    ----------
    vectors
        float32 (N, D), unit L2 norm.
    model_version
        (N,) model version name of each row.
    ra, dec
        (N,) sky position in degrees.
    healpix
        (N,) int64 nested HEALPix index at ``healpix_order`` (as ``tiles.healpix``).
    score
        (N,) detector score in [0, 1].
    healpix_order
        Order of ``healpix``.
    """

    vectors: np.ndarray
    model_version: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    healpix: np.ndarray
    score: np.ndarray
    healpix_order: int

    def __post_init__(self) -> None:
        n = len(self.vectors)
        if self.vectors.ndim != 2 or n == 0:
            raise BenchError(f"vectors must be a non-empty (N, D) array, got shape {self.vectors.shape}")
        for name in ("model_version", "ra", "dec", "healpix", "score"):
            if len(getattr(self, name)) != n:
                raise BenchError(f"{name} has {len(getattr(self, name))} rows, vectors {n}")

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        """Dimension of the vectors."""
        return int(self.vectors.shape[1])


@dataclass(frozen=True)
class SearchBenchConfig:
    """What to measure.

    Attributes
    ----------
    k
        Neighbours per query (recall@k).
    ef_search
        ``hnsw.ef_search`` (and FAISS ``efSearch``) values.
    m, ef_construction
        HNSW build parameters; every combination is built.
    types
        ``vector`` and/or ``halfvec`` indexes.
    filters
        Filters of :data:`FILTERS` to run.
    iterative_scan
        ``hnsw.iterative_scan`` modes for filtered queries.
    max_scan_tuples
        ``hnsw.max_scan_tuples`` (pgvector's default is 20,000).
    filter_version
        Model version of the ``model_version`` filter (default: the first one in the table).
    region_order
        HEALPix order of the ``sky_region`` filter's region (order 2: 215 deg²).
    score_threshold
        ``score >= threshold`` for the ``score`` filter.
    exact_queries
        Queries timed with exact search (a sequential scan each in PostgreSQL, a matrix-vector
        product each in numpy); recall of every method is measured on all queries.
    warmup
        Untimed queries before each timed series.
    maintenance_work_mem_mb
        Session ``maintenance_work_mem`` for the builds; None: 2 GB, or 1/8 of RAM if smaller.
    parallel_workers
        ``max_parallel_maintenance_workers`` for the builds; FAISS builds with as many threads
        plus one (the leader), so both use the same cores.
    faiss
        Also measure FAISS HNSW.
    seed
        Seed of the filter regions.
    progress
        Show progress bars.
    """

    k: int = 10
    ef_search: tuple[int, ...] = (10, 20, 40, 100, 200)
    m: tuple[int, ...] = (16,)
    ef_construction: tuple[int, ...] = (64,)
    types: tuple[str, ...] = INDEX_TYPES
    filters: tuple[str, ...] = FILTERS
    iterative_scan: tuple[str, ...] = ITERATIVE_MODES
    max_scan_tuples: int = 20000
    filter_version: str | None = None
    region_order: int = 2
    score_threshold: float = 0.5
    exact_queries: int = 50
    warmup: int = 10
    maintenance_work_mem_mb: int | None = None
    parallel_workers: int = 1
    faiss: bool = True
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        bad = [t for t in self.types if t not in INDEX_TYPES]
        bad += [f for f in self.filters if f not in FILTERS]
        bad += [s for s in self.iterative_scan if s not in ITERATIVE_MODES]
        if bad:
            raise BenchError(f"unknown index type, filter or iterative scan mode: {bad}")
        if self.k < 1 or not self.ef_search or min(self.ef_search) < 1:
            raise BenchError("k and every ef_search must be >= 1")
        if not self.m or min(self.m) < 2 or not self.ef_construction:
            raise BenchError("m must be >= 2 and ef_construction given")
        for m in self.m:
            for efc in self.ef_construction:
                if efc < 2 * m:
                    raise BenchError(
                        f"ef_construction {efc} must be >= 2 * m ({2 * m}), as pgvector requires"
                    )


# --------------------------------------------------------------------------- pure parts
def exact_similarities(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Cosine similarities (Q, N) of unit queries to unit vectors, float32."""
    return np.asarray(queries, np.float32) @ np.asarray(vectors, np.float32).T


def topk(sims: np.ndarray, k: int, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosine distances of the ``k`` most similar rows of one query's similarities.

    Parameters
    ----------
    sims
        (N,) similarities of one query to every row.
    k
        Neighbours wanted.
    mask
        (N,) rows allowed (a filter); None: all.

    Returns
    -------
    tuple
        ``(ids, distances)`` sorted by distance, at most ``k`` (fewer if fewer rows pass).
    """
    s = np.asarray(sims, np.float64)
    ids = np.flatnonzero(mask) if mask is not None else np.arange(len(s))
    if len(ids) == 0:
        return ids, np.zeros(0)
    kk = min(k, len(ids))
    part = np.argpartition(-s[ids], kk - 1)[:kk]
    order = part[np.argsort(-s[ids][part], kind="stable")]
    return ids[order], 1.0 - s[ids][order]


def recall_at_k(
    returned: Sequence[int] | np.ndarray,
    sims: np.ndarray,
    truth_distances: np.ndarray,
    k: int,
    *,
    mask: np.ndarray | None = None,
    eps: float = TIE_EPS,
) -> float:
    """Recall@k of one query's answer.

    A returned row is correct when it passes the filter ``mask`` and its exact distance is at
    most the k-th true distance plus ``eps``; the count (capped at the number of true
    neighbours) is divided by ``min(k, len(truth_distances))`` (a filter may leave fewer than k
    rows).

    Parameters
    ----------
    returned
        Row indices the search returned (first ``k`` used; duplicates counted once).
    sims
        (N,) exact similarities of the query to every row.
    truth_distances
        Sorted exact distances of the true neighbours (from :func:`topk`).
    k
        Neighbours asked for.
    mask
        (N,) rows that pass the query's filter; None: all.
    eps
        Distance slack.
    """
    want = min(k, len(truth_distances))
    if want == 0:
        return 1.0
    got = np.unique(np.asarray(returned, dtype=np.int64)[:k])
    if mask is not None and len(got):
        got = got[np.asarray(mask, bool)[got]]
    if len(got) == 0:
        return 0.0
    d = 1.0 - np.asarray(sims, np.float64)[got]
    hits = int((d <= float(truth_distances[want - 1]) + eps).sum())
    return min(hits, want) / want


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    """``p50_ms``, ``p95_ms`` and ``per_s`` (one client, back to back) of per-query times."""
    if not seconds:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "per_s": float("nan")}
    ms = np.asarray(seconds, np.float64) * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "per_s": round(float(1e3 / ms.mean()), 1),
    }


@dataclass(frozen=True)
class QueryFilter:
    """One filter, as SQL and as row masks, with its parameters per query.

    Attributes
    ----------
    name
        One of :data:`FILTERS` (the rows' ``filter`` key).
    description
        Human-readable condition.
    where
        SQL condition with ``%(name)s`` placeholders.
    params
        One parameter dict per query.
    masks
        One (N,) bool mask per query (the same array object when the condition does not vary).
    """

    name: str
    description: str
    where: str
    params: list[dict[str, Any]]
    masks: list[np.ndarray] = field(repr=False)

    @property
    def selectivity(self) -> float:
        """Mean share of rows that pass."""
        return float(np.mean([m.mean() for m in self.masks]))


def region_range(healpix: int, *, order: int, region_order: int) -> tuple[int, int]:
    """Nested indices ``[lo, hi)`` at ``order`` of the order-``region_order`` pixel holding ``healpix``.

    In the nested scheme every pixel's descendants are one contiguous range, so a sky region is
    a ``BETWEEN`` on the indexed ``healpix`` column.
    """
    if not 0 <= region_order <= order:
        raise BenchError(f"region order {region_order} must be within [0, {order}]")
    shift = 2 * (order - region_order)
    parent = int(healpix) >> shift
    return parent << shift, (parent + 1) << shift


def make_filters(
    table: BenchTable, n_queries: int, config: SearchBenchConfig, *, rng: np.random.Generator
) -> list[QueryFilter]:
    """The filters of ``config`` for ``n_queries`` queries on ``table``.

    ``model_version``: one version of those in the table; ``sky_region``: per query, the
    HEALPix pixel of order ``region_order`` around a random row (drawn again while it holds
    fewer than k rows); ``score``: ``score >= score_threshold``.
    """
    out: list[QueryFilter] = []
    for name in config.filters:
        if name == "model_version":
            versions = sorted({str(v) for v in table.model_version})
            version = config.filter_version or versions[0]
            if version not in versions:
                raise BenchError(f"model version {version!r} is not in the table ({versions})")
            mask = np.asarray(table.model_version).astype(str) == version
            out.append(
                QueryFilter(
                    name,
                    f"model_version = '{version}' (1 of {len(versions)})",
                    "model_version = %(version)s",
                    [{"version": version}] * n_queries,
                    [mask] * n_queries,
                )
            )
        elif name == "sky_region":
            params, masks = [], []
            for _ in range(n_queries):
                for _try in range(100):
                    row = int(rng.integers(len(table)))
                    lo, hi = region_range(
                        int(table.healpix[row]), order=table.healpix_order, region_order=config.region_order
                    )
                    mask = (table.healpix >= lo) & (table.healpix < hi)
                    if mask.sum() >= config.k:
                        break
                params.append({"lo": lo, "hi": hi})
                masks.append(mask)
            area = 41252.96 / (12 * 4**config.region_order)
            out.append(
                QueryFilter(
                    name,
                    f"healpix in one order-{config.region_order} pixel ({area:.0f} deg²) per query",
                    "healpix >= %(lo)s AND healpix < %(hi)s",
                    params,
                    masks,
                )
            )
        else:
            t = float(config.score_threshold)
            mask = np.asarray(table.score) >= t
            out.append(
                QueryFilter(
                    name, f"score >= {t:g}", "score >= %(t)s", [{"t": t}] * n_queries, [mask] * n_queries
                )
            )
    return out


# --------------------------------------------------------------------------- the database side
def _conninfo(engine: Engine) -> str:
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


def _connect(engine: Engine) -> psycopg.Connection[Any]:
    """An autocommit connection that knows the pgvector types.

    Raises
    ------
    BenchError
        If the ``vector`` extension is not installed in the database (the migrations install it).
    """
    from pgvector.psycopg import register_vector

    conn = psycopg.connect(_conninfo(engine), autocommit=True)
    if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone() is None:
        conn.close()
        raise BenchError(
            "the vector extension is not installed in this database; run `galsift stack up` "
            "(or `alembic -c db/alembic.ini upgrade head`) first"
        )
    # plain (unprepared) statements: a custom plan per query, as an application gets
    conn.prepare_threshold = None
    register_vector(conn)
    return conn


def ram_bytes() -> int | None:
    """Physical memory of this machine, or None where unknown."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def maintenance_work_mem_mb(config: SearchBenchConfig) -> int:
    """``maintenance_work_mem`` for the builds: the configured value, or 2 GB capped at RAM / 8."""
    if config.maintenance_work_mem_mb is not None:
        return int(config.maintenance_work_mem_mb)
    ram = ram_bytes()
    return 2048 if ram is None else int(max(64, min(2048, ram // 8 // 2**20)))


def _load(conn: psycopg.Connection[Any], table: sql.Identifier, data: BenchTable, *, progress: bool) -> None:
    from tqdm import tqdm

    conn.execute(
        sql.SQL(
            "CREATE TABLE {} (id integer NOT NULL, model_version text NOT NULL, ra double precision, "
            "dec double precision, healpix bigint, score real, embedding vector({}) NOT NULL)"
        ).format(table, sql.Literal(data.dim))
    )
    big = data.vectors.astype(">f4")
    header = np.array([data.dim, 0], dtype=">u2").tobytes()
    copy_sql = sql.SQL(
        "COPY {} (id, model_version, ra, dec, healpix, score, embedding) FROM STDIN WITH (FORMAT BINARY)"
    ).format(table)
    with (
        conn.cursor() as cur,
        cur.copy(copy_sql) as copy,
        tqdm(total=len(data), desc="copy rows", unit="row", disable=not progress) as bar,
    ):
        copy.set_types(["int4", "text", "float8", "float8", "int8", "float4", "bytea"])
        for i in range(len(data)):
            copy.write_row(
                (
                    i,
                    str(data.model_version[i]),
                    float(data.ra[i]),
                    float(data.dec[i]),
                    int(data.healpix[i]),
                    float(data.score[i]),
                    header + big[i].tobytes(),  # pgvector's binary format: dim, unused, float32 BE
                )
            )
            if i % 10000 == 9999:
                bar.update(10000)
        bar.update(len(data) % 10000)
    conn.execute(sql.SQL("ANALYZE {}").format(table))


def _order_expr(kind: str, dim: int) -> sql.Composable:
    if kind == "halfvec":
        return sql.SQL("(embedding::halfvec({d})) <=> %(q)s::halfvec({d})").format(d=sql.Literal(dim))
    return sql.SQL("embedding <=> %(q)s")


def _search_sql(table: sql.Identifier, kind: str, dim: int, k: int, where: str | None) -> sql.Composed:
    cond = sql.SQL(" WHERE " + where) if where else sql.SQL("")
    return sql.SQL("SELECT id FROM {t}{w} ORDER BY {o} LIMIT {k}").format(
        t=table, w=cond, o=_order_expr(kind, dim), k=sql.Literal(k)
    )


def _plan(conn: psycopg.Connection[Any], query: sql.Composed, params: dict[str, Any]) -> str:
    """``hnsw`` (an HNSW index scan), ``btree`` (a B-tree index on a filter column), ``seqscan``."""
    text = "\n".join(str(r[0]) for r in conn.execute(sql.SQL("EXPLAIN ") + query, params))
    if "hnsw" in text:
        return "hnsw"
    if "Index Scan" in text:
        return "btree"
    return "seqscan" if "Seq Scan" in text else "other"


def _plans(conn: psycopg.Connection[Any], query: sql.Composed, params: dict[str, Any]) -> dict[str, str]:
    """The plan the planner picks on its own (``planner``), and the one measured (``plan``).

    Rows of ``pgvector_hnsw`` are measured with ``enable_seqscan = off`` so they always time the
    index (the bench table has no other index); ``planner`` says whether PostgreSQL would have
    chosen a sequential scan instead (small tables, selective filters, large ``ef_search``).
    """
    _set(conn, "enable_seqscan", "on")
    try:
        default = _plan(conn, query, params)
    finally:
        _set(conn, "enable_seqscan", "off")
    used = _plan(conn, query, params)
    if used != "hnsw":
        log.warning("the HNSW index was not used even with enable_seqscan = off: %s", used)
    return {"planner": default, "plan": used}


@contextmanager
def _build_progress(engine: Engine, pid: int, total: int, desc: str, enabled: bool) -> Iterator[None]:
    """A progress bar fed from ``pg_stat_progress_create_index`` by a second connection."""
    if not enabled:
        yield
        return
    from tqdm import tqdm

    stop = threading.Event()

    def poll() -> None:
        with tqdm(total=total, desc=desc, unit="row") as bar, psycopg.connect(_conninfo(engine)) as c:
            c.autocommit = True
            while not stop.wait(0.5):
                row = c.execute(
                    "SELECT tuples_done FROM pg_stat_progress_create_index WHERE pid = %s", (pid,)
                ).fetchone()
                if row and row[0]:
                    bar.n = min(total, int(row[0]))
                    bar.refresh()
            bar.n = total
            bar.refresh()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


@dataclass
class _Context:
    """What every measurement needs."""

    conn: psycopg.Connection[Any]
    schema: str
    table: sql.Identifier
    data: BenchTable
    queries: np.ndarray
    sims: np.ndarray
    truth: list[np.ndarray]
    filters: list[QueryFilter]
    filter_truth: dict[str, list[np.ndarray]]
    config: SearchBenchConfig
    notices: list[str] = field(default_factory=list)


def _time_series(
    ctx: _Context,
    run_one: Callable[[int], Sequence[int]],
    n: int,
    truth: list[np.ndarray],
    masks: list[np.ndarray] | None = None,
) -> dict[str, Any]:
    """Run queries ``0..n-1`` (after ``warmup`` untimed ones) and score them."""
    for i in range(min(ctx.config.warmup, n)):
        run_one(i)
    times, recalls, full = [], [], []
    for i in range(n):
        t0 = time.perf_counter()
        ids = run_one(i)
        times.append(time.perf_counter() - t0)
        mask = masks[i] if masks is not None else None
        recalls.append(recall_at_k(ids, ctx.sims[i], truth[i], ctx.config.k, mask=mask))
        full.append(len(ids) >= min(ctx.config.k, len(truth[i])))
    return {
        "queries": n,
        "recall_at_10" if ctx.config.k == 10 else f"recall_at_{ctx.config.k}": round(
            float(np.mean(recalls)), 4
        ),
        "full_k": round(float(np.mean(full)), 4),
        **latency_stats(times),
    }


def _pg_series(
    ctx: _Context,
    query: sql.Composed,
    n: int,
    params: Callable[[int], dict[str, Any]],
    truth: list[np.ndarray],
    masks: list[np.ndarray] | None = None,
) -> dict[str, Any]:
    def run_one(i: int) -> list[int]:
        return [int(r[0]) for r in ctx.conn.execute(query, {"q": ctx.queries[i], **params(i)})]

    return _time_series(ctx, run_one, n, truth, masks)


def _params_of(f: QueryFilter | None) -> Callable[[int], dict[str, Any]]:
    """Query ``i``'s SQL parameters of filter ``f`` (none without a filter)."""
    if f is None:
        return lambda i: {}
    return f.params.__getitem__


def _set(conn: psycopg.Connection[Any], name: str, value: object) -> None:
    conn.execute(sql.SQL("SET {} = {}").format(sql.Identifier(*name.split(".")), sql.Literal(str(value))))


def _measure_exact_pg(ctx: _Context, bar: Any) -> list[dict[str, Any]]:
    rows = []
    n = min(ctx.config.exact_queries, len(ctx.queries))
    _set(ctx.conn, "enable_indexscan", "off")
    try:
        cells: list[QueryFilter | None] = [None, *ctx.filters]
        for f in cells:
            q = _search_sql(ctx.table, "vector", ctx.data.dim, ctx.config.k, f.where if f else None)
            truth = ctx.filter_truth[f.name] if f else ctx.truth
            res = _pg_series(ctx, q, n, _params_of(f), truth, f.masks if f else None)
            row = {"model": "exact_seqscan", "type": "vector", **res}
            if f:
                row = {**row, "filter": f.name, "selectivity": round(f.selectivity, 4)}
            rows.append(row)
            bar.update(1)
    finally:
        _set(ctx.conn, "enable_indexscan", "on")
    return rows


#: filters with a B-tree alternative: the column a B-tree index would be on
BTREE_COLUMNS = {"sky_region": "healpix", "score": "score"}


def _measure_exact_btree(ctx: _Context, bar: Any) -> list[dict[str, Any]]:
    """Exact search driven by a B-tree on the filter column (``tiles.healpix`` has one).

    Measured while no HNSW index exists, so the planner's choice is between the B-tree and a
    sequential scan; each selected row's distance is computed and the top k sorted exactly.
    """
    rows = []
    n = min(ctx.config.exact_queries, len(ctx.queries))
    for f in ctx.filters:
        column = BTREE_COLUMNS.get(f.name)
        if column is None:
            continue
        index = sql.Identifier(f"btree_{column}")
        ctx.conn.execute(
            sql.SQL("CREATE INDEX {} ON {} ({})").format(index, ctx.table, sql.Identifier(column))
        )
        ctx.conn.execute(sql.SQL("ANALYZE {}").format(ctx.table))
        try:
            q = _search_sql(ctx.table, "vector", ctx.data.dim, ctx.config.k, f.where)
            plan = _plan(ctx.conn, q, {"q": ctx.queries[0], **f.params[0]})
            res = _pg_series(ctx, q, n, _params_of(f), ctx.filter_truth[f.name], f.masks)
            rows.append(
                {
                    "model": "exact_btree",
                    "type": "vector",
                    "filter": f.name,
                    "selectivity": round(f.selectivity, 4),
                    "planner": plan,
                    **res,
                }
            )
        finally:
            ctx.conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(ctx.schema, f"btree_{column}")))
        bar.update(1)
    return rows


def _measure_exact_numpy(ctx: _Context) -> list[dict[str, Any]]:
    vectors = ctx.data.vectors
    rows = []
    cells: list[QueryFilter | None] = [None, *ctx.filters]
    for f in cells:

        def run_one(i: int, f: QueryFilter | None = f) -> Sequence[int]:
            sims = vectors @ ctx.queries[i]
            return [int(j) for j in topk(sims, ctx.config.k, f.masks[i] if f else None)[0]]

        truth = ctx.filter_truth[f.name] if f else ctx.truth
        n = min(ctx.config.exact_queries, len(ctx.queries))
        res = _time_series(ctx, run_one, n, truth, f.masks if f else None)
        row = {"model": "exact_numpy", "type": "float32", **res}
        if f:
            row = {**row, "filter": f.name, "selectivity": round(f.selectivity, 4)}
        rows.append(row)
    return rows


def _index_name(kind: str, m: int, efc: int) -> str:
    return f"hnsw_{kind}_m{m}_efc{efc}"


def _build_index(
    ctx: _Context, engine: Engine, kind: str, m: int, efc: int
) -> tuple[sql.Identifier, float, float, list[str]]:
    name = _index_name(kind, m, efc)
    expr = (
        sql.SQL("((embedding::halfvec({})) halfvec_cosine_ops)").format(sql.Literal(ctx.data.dim))
        if kind == "halfvec"
        else sql.SQL("(embedding vector_cosine_ops)")
    )
    stmt = sql.SQL("CREATE INDEX {} ON {} USING hnsw {} WITH (m = {}, ef_construction = {})").format(
        sql.Identifier(name), ctx.table, expr, sql.Literal(m), sql.Literal(efc)
    )
    before = len(ctx.notices)
    pid = ctx.conn.info.backend_pid
    with _build_progress(engine, pid, len(ctx.data), f"build {name}", ctx.config.progress):
        t0 = time.perf_counter()
        ctx.conn.execute(stmt)
        seconds = time.perf_counter() - t0
    notices = ctx.notices[before:]
    for text in notices:
        log.warning("%s: %s", name, text)
    ident = sql.Identifier(ctx.schema, name)
    size = ctx.conn.execute("SELECT pg_relation_size(%s::regclass)", (ident.as_string(ctx.conn),)).fetchone()
    return ident, seconds, (float(size[0]) / 2**20 if size else float("nan")), notices


def _measure_pg_index(
    ctx: _Context, engine: Engine, kind: str, m: int, efc: int, bar: Any
) -> list[dict[str, Any]]:
    ident, build_s, size_mb, notices = _build_index(ctx, engine, kind, m, efc)
    base = {
        "model": "pgvector_hnsw",
        "type": kind,
        "m": m,
        "ef_construction": efc,
        "build_s": round(build_s, 2),
        "index_mb": round(size_mb, 1),
    }
    if notices:
        base["notice"] = "; ".join(notices)
    rows = []
    n = len(ctx.queries)
    try:
        _set(ctx.conn, "hnsw.max_scan_tuples", ctx.config.max_scan_tuples)
        for ef in ctx.config.ef_search:
            _set(ctx.conn, "hnsw.ef_search", ef)
            _set(ctx.conn, "hnsw.iterative_scan", "off")
            q = _search_sql(ctx.table, kind, ctx.data.dim, ctx.config.k, None)
            plans = _plans(ctx.conn, q, {"q": ctx.queries[0]})
            rows.append({**base, "ef_search": ef, **plans, **_pg_series(ctx, q, n, lambda i: {}, ctx.truth)})
            bar.update(1)
            for f in ctx.filters:
                q = _search_sql(ctx.table, kind, ctx.data.dim, ctx.config.k, f.where)
                for mode in ctx.config.iterative_scan:
                    _set(ctx.conn, "hnsw.iterative_scan", mode)
                    plans = _plans(ctx.conn, q, {"q": ctx.queries[0], **f.params[0]})
                    res = _pg_series(ctx, q, n, _params_of(f), ctx.filter_truth[f.name], f.masks)
                    rows.append(
                        {
                            **base,
                            "ef_search": ef,
                            "filter": f.name,
                            "selectivity": round(f.selectivity, 4),
                            "iterative_scan": mode,
                            "max_scan_tuples": ctx.config.max_scan_tuples,
                            **plans,
                            **res,
                        }
                    )
                    bar.update(1)
    finally:
        _set(ctx.conn, "hnsw.iterative_scan", "off")
        _set(ctx.conn, "enable_seqscan", "on")
        ctx.conn.execute(sql.SQL("DROP INDEX {}").format(ident))
    return rows


def _measure_faiss(ctx: _Context, m: int, efc: int, bar: Any) -> list[dict[str, Any]]:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it loaded
    import faiss as faiss_module

    faiss: Any = faiss_module  # its stubs miss the HNSW search parameters
    threads = ctx.config.parallel_workers + 1
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        index = faiss.IndexHNSWFlat(ctx.data.dim, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = efc
        t0 = time.perf_counter()
        index.add(np.ascontiguousarray(ctx.data.vectors, dtype=np.float32))
        build_s = time.perf_counter() - t0
    finally:
        faiss.omp_set_num_threads(before)
    base = {
        "model": "faiss_hnsw",
        "type": "float32",
        "m": m,
        "ef_construction": efc,
        "build_s": round(build_s, 2),
    }
    queries = np.ascontiguousarray(ctx.queries, dtype=np.float32)
    k = ctx.config.k
    # ID selectors over packed bitmaps (one per distinct mask); the bitmaps must outlive them
    bitmaps: dict[int, np.ndarray] = {}
    selectors: dict[int, Any] = {}
    for flt in ctx.filters:
        for mk in flt.masks:
            if id(mk) not in selectors:
                bitmaps[id(mk)] = np.packbits(mk, bitorder="little")
                selectors[id(mk)] = faiss.IDSelectorBitmap(
                    len(bitmaps[id(mk)]), faiss.swig_ptr(bitmaps[id(mk)])
                )
    rows = []
    for ef in ctx.config.ef_search:
        for f in [None, *ctx.filters]:
            params = [faiss.SearchParametersHNSW() for _ in range(len(queries))]
            for i, p in enumerate(params):
                p.efSearch = ef
                if f is not None:
                    p.sel = selectors[id(f.masks[i])]

            def run_one(i: int, params: list[Any] = params) -> Sequence[int]:
                _, ids = index.search(queries[i : i + 1], k, params=params[i])
                return [int(j) for j in ids[0] if j >= 0]

            truth = ctx.filter_truth[f.name] if f else ctx.truth
            res = _time_series(ctx, run_one, len(queries), truth, f.masks if f else None)
            row = {**base, "ef_search": ef, **res}
            if f:
                row = {**row, "filter": f.name, "selectivity": round(f.selectivity, 4)}
            rows.append(row)
            bar.update(1)
    del selectors, bitmaps
    return rows


def server_info(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """PostgreSQL and pgvector versions and the settings that matter for the numbers."""
    row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    info: dict[str, Any] = {
        "server_version": conn.info.parameter_status("server_version"),
        "pgvector": row[0] if row else None,
    }
    for name in (
        "shared_buffers",
        "maintenance_work_mem",
        "max_parallel_maintenance_workers",
        "max_parallel_workers_per_gather",
        "work_mem",
        "jit",
    ):
        info[name] = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0]  # type: ignore[index]
    return info


def run_search_bench(
    engine: Engine,
    data: BenchTable,
    queries: np.ndarray,
    config: SearchBenchConfig | None = None,
) -> dict[str, Any]:
    """Measure pgvector HNSW, FAISS HNSW and exact search on ``data`` with ``queries``.

    Parameters
    ----------
    engine
        Engine on the database to use (a throw-away schema is created and dropped there).
    data
        The rows.
    queries
        float32 (Q, D) unit query vectors (not rows of the table).
    config
        What to measure; defaults to :class:`SearchBenchConfig`.

    Returns
    -------
    dict
        ``{"results": rows, "database": server info, "filters": descriptions, "schema": name}``;
        one flat row per measured cell.

    Raises
    ------
    BenchError
        On inconsistent inputs, or without pgvector >= 0.8 (iterative scans).
    """
    from tqdm import tqdm

    config = config or SearchBenchConfig()
    queries = np.asarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != data.dim:
        raise BenchError(f"queries must be (Q, {data.dim}), got {queries.shape}")
    rng = np.random.default_rng(config.seed)
    filters = make_filters(data, len(queries), config, rng=rng)
    sims = exact_similarities(data.vectors, queries)
    truth = [topk(s, config.k)[1] for s in sims]
    filter_truth = {f.name: [topk(s, config.k, f.masks[i])[1] for i, s in enumerate(sims)] for f in filters}

    schema = f"bench_{secrets.token_hex(4)}"
    table = sql.Identifier(schema, "items")
    conn = _connect(engine)
    try:
        info = server_info(conn)
        if tuple(int(p) for p in str(info["pgvector"] or "0").split(".")[:2]) < (0, 8):
            raise BenchError(f"pgvector {info['pgvector']} has no iterative index scans; 0.8 or newer needed")
        mwm = maintenance_work_mem_mb(config)
        _set(conn, "maintenance_work_mem", f"{mwm}MB")
        _set(conn, "max_parallel_maintenance_workers", config.parallel_workers)
        info["maintenance_work_mem"] = f"{mwm}MB"
        info["max_parallel_maintenance_workers"] = str(config.parallel_workers)
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        t0 = time.perf_counter()
        _load(conn, table, data, progress=config.progress)
        info["load_s"] = round(time.perf_counter() - t0, 1)
        ctx = _Context(conn, schema, table, data, queries, sims, [*truth], filters, filter_truth, config)
        conn.add_notice_handler(lambda d: ctx.notices.append(str(d.message_primary)))

        combos = [(m, efc) for m in config.m for efc in config.ef_construction]
        per_index = len(config.ef_search) * (1 + len(filters) * len(config.iterative_scan))
        total = (1 + len(filters)) * (1 + len(combos) * (len(config.ef_search) if config.faiss else 0))
        total += sum(f.name in BTREE_COLUMNS for f in filters)
        total += len(combos) * len(config.types) * per_index
        rows: list[dict[str, Any]] = []
        with tqdm(total=total, desc="measure", unit="cell", disable=not config.progress) as bar:
            rows += _measure_exact_numpy(ctx)
            rows += _measure_exact_pg(ctx, bar)
            rows += _measure_exact_btree(ctx, bar)
            for m, efc in combos:
                for kind in config.types:
                    rows += _measure_pg_index(ctx, engine, kind, m, efc, bar)
                if config.faiss:
                    rows += _measure_faiss(ctx, m, efc, bar)
    finally:
        try:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        finally:
            conn.close()
    return {
        "results": rows,
        "database": info,
        "filters": {f.name: f"{f.description}; {f.selectivity:.2%} of rows" for f in filters},
        "schema": schema,
    }


# --------------------------------------------------------------------------- reading the numbers
def must_check(rows: Sequence[dict[str, Any]], *, k: int = 10, max_p50_ms: float = 10.0) -> dict[str, Any]:
    """Whether pgvector meets the search goals, from the rows of :func:`run_search_bench`.

    Unfiltered: some ``pgvector_hnsw`` row with recall@k >= 0.95 and p50 <= ``max_p50_ms``.
    Filtered: for each filter, some row with recall@k >= 0.9 and every query given k rows.

    Returns
    -------
    dict
        ``{"unfiltered": best row or None, "filtered": {filter: best row or None}, "ok": bool}``;
        "best" is the fastest (lowest p50) row that meets the goal.
    """
    key = f"recall_at_{k}"
    pg = [r for r in rows if r.get("model") == "pgvector_hnsw"]

    def fastest(cands: list[dict[str, Any]]) -> dict[str, Any] | None:
        return min(cands, key=lambda r: r["p50_ms"]) if cands else None

    unfiltered = fastest(
        [r for r in pg if "filter" not in r and r[key] >= 0.95 and r["p50_ms"] <= max_p50_ms]
    )
    filtered: dict[str, dict[str, Any] | None] = {}
    for name in sorted({r["filter"] for r in pg if "filter" in r}):
        filtered[name] = fastest(
            [r for r in pg if r.get("filter") == name and r[key] >= 0.9 and r["full_k"] >= 1.0]
        )
    ok = unfiltered is not None and all(v is not None for v in filtered.values())
    return {"unfiltered": unfiltered, "filtered": filtered, "ok": ok}


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    return format(value, spec)


def format_table(rows: Sequence[dict[str, Any]], *, k: int = 10) -> str:
    """The rows as a fixed-width table."""
    key = f"recall_at_{k}"
    head = (
        f"{'model':<14} {'type':<8} {'m':>3} {'efc':>4} {'build s':>8} {'MB':>6} {'filter':<14} "
        f"{'sel':>6} {'iterative':<13} {'ef':>4} {'planner':<7} {'recall@' + str(k):>9} {'full k':>6} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'q/s':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<14} {r.get('type', ''):<8} {_fmt(r.get('m'), '>3')} "
            f"{_fmt(r.get('ef_construction'), '>4')} {_fmt(r.get('build_s'), '>8.1f')} "
            f"{_fmt(r.get('index_mb'), '>6.0f')} {r.get('filter', '–'):<14} "
            f"{_fmt(r.get('selectivity'), '>6.1%')} {r.get('iterative_scan', '–'):<13} "
            f"{_fmt(r.get('ef_search'), '>4')} {r.get('planner', '–'):<7} {_fmt(r.get(key), '>9.3f')} "
            f"{_fmt(r.get('full_k'), '>6.0%')} {_fmt(r.get('p50_ms'), '>8.2f')} "
            f"{_fmt(r.get('p95_ms'), '>8.2f')} {_fmt(r.get('per_s'), '>8.0f')}"
        )
    return "\n".join(lines)


def summarise(check: dict[str, Any], *, k: int = 10) -> str:
    """One line per goal of :func:`must_check`."""
    key = f"recall_at_{k}"

    def describe(r: dict[str, Any] | None) -> str:
        if r is None:
            return "NOT MET"
        where = f"{r['type']} m={r['m']} ef_construction={r['ef_construction']} ef_search={r['ef_search']}"
        if "iterative_scan" in r:
            where += f" iterative_scan={r['iterative_scan']}"
        return f"met by {where}: recall@{k} {r[key]:.3f}, p50 {r['p50_ms']:.2f} ms, full k {r['full_k']:.0%}"

    lines = [f"unfiltered (recall@{k} >= 0.95 at p50 <= 10 ms): {describe(check['unfiltered'])}"]
    for name, r in check["filtered"].items():
        lines.append(f"filter {name} (recall@{k} >= 0.9, k rows always): {describe(r)}")
    return "\n".join(lines)
