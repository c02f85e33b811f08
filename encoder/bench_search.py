"""``galsift bench search``: pgvector HNSW vs FAISS HNSW vs exact search on LVM-like vectors.

The vectors come from :mod:`encoder.synthetic` (a Gaussian mixture fitted to the shipped model's
embeddings of augmented real images and simulations); the measurement is :mod:`db.bench`, in a
throw-away schema of the configured database. The table is laid out like the real one: every
object has an embedding by two model versions (the second a slightly perturbed copy of the
first), a sky position with its nested HEALPix index, and a detector score.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from db.bench import BenchTable, SearchBenchConfig
    from galsift.cli import CommandGroups
    from galsift.settings import Settings

log = logging.getLogger(__name__)

#: the bundled demo images (``ingest/demo_tiles``), the default source of embeddings
DEMO_DATA = Path(__file__).resolve().parents[1] / "ingest" / "demo_tiles"
#: size of the second model version's change of each vector (see :func:`encoder.synthetic.second_version`)
PERTURB = 0.15
#: spread of the second model version's scores around the first's
SCORE_JITTER = 0.02
#: choices of :mod:`db.bench` (repeated here so ``galsift --help`` does not import it; a test checks)
INDEX_TYPES = ("vector", "halfvec")
FILTERS = ("model_version", "sky_region", "score")
ITERATIVE_MODES = ("off", "relaxed_order", "strict_order")


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def register(groups: CommandGroups) -> None:
    """Add ``galsift bench search`` to the CLI."""
    p = groups.bench.add_parser(
        "search",
        help="pgvector HNSW recall@10 and latency vs FAISS HNSW and exact search, filtered too",
        description="Build pgvector HNSW indexes (vector and halfvec) over LVM-like vectors in a "
        "throw-away schema of the configured database, and measure build time, recall@10 against "
        "exact search and p50/p95 latency at several ef_search, unfiltered and with filters (one "
        "model version, a sky region, a score threshold) with and without iterative scans; FAISS "
        "HNSW on the same vectors in the same run is the reference.",
    )
    p.add_argument("--n", type=int, default=200_000, help="rows in the table (objects x 2 model versions)")
    p.add_argument("--queries", type=int, default=200, help="query vectors (held-out samples)")
    p.add_argument(
        "--ef", type=_ints, default=(10, 20, 40, 100, 200), help="hnsw.ef_search values, e.g. 40,100"
    )
    p.add_argument(
        "--m", type=_ints, default=(16,), help="HNSW m values (every m x ef-construction is built)"
    )
    p.add_argument("--ef-construction", type=_ints, default=(64,), help="HNSW ef_construction values")
    p.add_argument("--types", type=_names, default=INDEX_TYPES, help=f"index types ({','.join(INDEX_TYPES)})")
    p.add_argument(
        "--filters", type=_names, default=FILTERS, help=f"filters ({','.join(FILTERS)}; '' for none)"
    )
    p.add_argument(
        "--iterative",
        type=_names,
        default=ITERATIVE_MODES,
        help=f"hnsw.iterative_scan modes of filtered queries ({','.join(ITERATIVE_MODES)})",
    )
    p.add_argument("--max-scan-tuples", type=int, default=20000, help="hnsw.max_scan_tuples")
    p.add_argument(
        "--exact-queries",
        type=int,
        default=50,
        help="queries timed with exact search (sequential scan, numpy)",
    )
    p.add_argument("--workers", type=int, default=1, help="max_parallel_maintenance_workers for builds")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="image folders whose embeddings the vectors imitate (default: the bundled ingest/demo_tiles)",
    )
    p.add_argument(
        "--model", type=Path, default=None, help="checkpoint (default: the configured/shipped one)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-faiss", action="store_true", help="skip the FAISS reference")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    p.set_defaults(func=_cmd_search)


def bench_table(
    base: np.ndarray,
    *,
    versions: tuple[str, str],
    seed: int,
    perturb: float = PERTURB,
) -> BenchTable:
    """The benchmark table: each of ``base``'s objects embedded by two model versions.

    Rows ``0..n-1`` are ``base`` under ``versions[0]``; rows ``n..2n-1`` the same objects under
    ``versions[1]``, their vectors perturbed (:func:`encoder.synthetic.second_version`) and their
    scores jittered. Positions are uniform on the default sky patch of
    :func:`encoder.synthetic.sky_positions`, with nested HEALPix indices at
    :data:`galsift.constants.HEALPIX_ORDER`; scores are Beta(0.5, 3).
    """
    import numpy as np

    from db.bench import BenchTable
    from encoder.synthetic import detector_scores, healpix_nested, second_version, sky_positions
    from galsift.constants import HEALPIX_ORDER

    rng = np.random.default_rng([seed, 3])
    n = len(base)
    v2 = second_version(base, rng=rng, scale=perturb)
    ra, dec = sky_positions(n, rng=rng)
    hp = healpix_nested(ra, dec, order=HEALPIX_ORDER)
    s1 = detector_scores(n, rng=rng)
    s2 = np.clip(s1 + rng.normal(0.0, SCORE_JITTER, n), 0.0, 1.0).astype(np.float32)
    return BenchTable(
        vectors=np.concatenate([base, v2]),
        model_version=np.asarray([versions[0]] * n + [versions[1]] * n),
        ra=np.tile(ra, 2),
        dec=np.tile(dec, 2),
        healpix=np.tile(hp, 2),
        score=np.concatenate([s1, s2]),
        healpix_order=HEALPIX_ORDER,
    )


def run(
    settings: Settings,
    *,
    n: int,
    queries: int,
    data: Path,
    checkpoint: Path,
    config: SearchBenchConfig,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Make the vectors, run :func:`db.bench.run_search_bench`, and return the ``--json`` document."""
    import numpy as np

    from db.bench import must_check, run_search_bench
    from db.engine import get_engine
    from encoder.synthetic import synthetic_embeddings

    if n < 2 or queries < 1:
        raise ValueError("--n must be >= 2 and --queries >= 1")
    objects = n // 2
    t0 = time.perf_counter()
    made = synthetic_embeddings(
        objects + queries,
        checkpoint=checkpoint,
        data=data,
        seed=seed,
        cache_dir=settings.data_dir / "cache",
        progress=progress,
    )
    version = str(made.info.get("model_version") or checkpoint.stem)
    versions = (version, f"{version}-perturbed")
    table = bench_table(made.vectors[:objects], versions=versions, seed=seed)
    qs = made.vectors[objects:]
    cos = float(np.median((table.vectors[:objects] * table.vectors[objects:]).sum(axis=1)))
    perturbed = (
        f"the same objects' vectors perturbed: normalise(v + {PERTURB} * noise / sqrt(256)), "
        f"median cosine similarity to the first version {cos:.4f}"
    )
    vectors_info = {
        **made.info,
        "rows": len(table),
        "objects": objects,
        "queries": f"{queries} further samples of the same mixture (not in the table)",
        "model_versions": {versions[0]: f"{objects} sampled vectors", versions[1]: perturbed},
        "sky": "uniform on RA 0-360 deg, Dec -20..+35 deg; nested HEALPix order "
        f"{table.healpix_order}; the same position for both versions of an object",
        "score": f"Beta(0.5, 3); the second version's score jittered by N(0, {SCORE_JITTER})",
        "prepare_s": round(time.perf_counter() - t0, 1),
    }
    engine = get_engine(settings)
    try:
        out = run_search_bench(engine, table, qs, config)
    finally:
        engine.dispose()
    return {
        "command": "bench search",
        "data": str(data),
        "model_version": version,
        "vectors": vectors_info,
        "database": out["database"],
        "filters": out["filters"],
        "must": must_check(out["results"], k=config.k),
        "results": out["results"],
    }


def _cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    import sys

    from db.bench import BenchError, SearchBenchConfig, format_table, summarise
    from encoder.service import resolve_checkpoint

    try:
        config = SearchBenchConfig(
            ef_search=args.ef,
            m=args.m,
            ef_construction=args.ef_construction,
            types=args.types,
            filters=args.filters,
            iterative_scan=args.iterative,
            max_scan_tuples=args.max_scan_tuples,
            exact_queries=args.exact_queries,
            parallel_workers=args.workers,
            faiss=not args.no_faiss,
            seed=args.seed,
            progress=not args.no_progress,
        )
        checkpoint = resolve_checkpoint(None, str(args.model) if args.model else None, settings)
        data = args.data or DEMO_DATA
        doc = run(
            settings,
            n=args.n,
            queries=args.queries,
            data=data,
            checkpoint=checkpoint,
            config=config,
            seed=args.seed,
            progress=not args.no_progress,
        )
    except (BenchError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    vec = doc["vectors"]
    print(f"vectors: {vec['description']}{' (cached)' if vec.get('cached') else ''}")
    print(f"table: {vec['rows']} rows = {vec['objects']} objects x 2 model versions; {args.queries} queries")
    db = doc["database"]
    print(
        f"database: PostgreSQL {db['server_version']}, pgvector {db['pgvector']}, shared_buffers "
        f"{db['shared_buffers']}, maintenance_work_mem {db['maintenance_work_mem']}, "
        f"{db['max_parallel_maintenance_workers']} parallel build worker(s); loaded in {db['load_s']} s"
    )
    for name, text in doc["filters"].items():
        print(f"filter {name}: {text}")
    print(format_table(doc["results"], k=config.k))
    print(
        "pgvector_hnsw rows always scan the index (enable_seqscan = off); 'planner' is what "
        "PostgreSQL picks on its own"
    )
    print(summarise(doc["must"], k=config.k))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0
