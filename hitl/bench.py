"""``galsift bench hitl``: HITL round latency on a large vector table, HNSW against an exact scan.

The table: ``--n`` (default 200,000) LVM-like vectors in the real ``embeddings`` table (with their
HNSW index), as tiles of the survey ``bench-hitl-<tag>`` under the model version
``bench-hitl-<tag>`` (``<tag>`` hashes n, seed, checkpoint and recipe). The vectors are sampled
from a Gaussian mixture fitted to the checkpoint's embeddings of real images (:func:`fit_sampler`:
PCA to :data:`PCA_DIMS` dimensions, a full-covariance mixture there, the PCA residual's own
per-dimension spread added back, L2-normalised), so the table has the clusters and the spectrum
of real embeddings rather than the near-orthogonality of random unit vectors. It is loaded with
``COPY`` (into a table without its HNSW index when the load is most of the table, the index rebuilt
from its own definition afterwards) and kept: a later run with the same tag reuses it (the vectors are cached in
``<data_dir>/cache/hitl_bench``); a run with another tag replaces it.

The sessions: each simulated scientist looks for a *concept*, the ``--concept-size`` table
vectors nearest (cosine) to a random table vector; the session starts from 3 random members and
every round's page is labelled by membership. The same sessions (same seeds, same labelling
rule) run on the HNSW engine (``galsift_hitl_hnsw``) and on :class:`hitl.engine.SearchEngine`
with ``exact=True`` (``exact_scan``: the index off, a brute-force scan of the version's rows).
A round's latency is fit + candidate retrieval + selection (:attr:`hitl.engine.Round.timings_ms`;
storing the page is not counted); each engine first runs one untimed warm-up round. The
sessions, their labels and shown tiles are deleted at the end; the table stays.

This module is imported by ``galsift --help``: heavy imports happen inside functions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from galsift.cli import CommandGroups
    from galsift.settings import Settings

#: row names of the engine on its HNSW index and of the exact reference
HNSW_NAME = "galsift_hitl_hnsw"
EXACT_NAME = "exact_scan"
#: the Must: p95 round latency of the HNSW engine, milliseconds
MUST_P95_MS = 500.0
#: bundled images whose embeddings the vectors imitate by default
DEMO_DATA = Path(__file__).resolve().parents[1] / "ingest" / "demo_tiles"
#: survey and model version prefix of the bench table
PREFIX = "bench-hitl-"
#: bump when the vector recipe changes (it keys the table and the cache)
RECIPE_VERSION = "1"
#: PCA dimensions of the mixture, mixture components at most, embeddings per component at least
PCA_DIMS = 24
COMPONENTS = 32
PER_COMPONENT = 8
#: rows per COPY batch
COPY_BATCH = 20_000
#: maintenance_work_mem while the HNSW index is rebuilt after a bulk load (the graph fits in it)
INDEX_BUILD_MEMORY = "1GB"


class BenchError(ValueError):
    """Options or data the benchmark cannot run with."""


# -- the vectors ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampler:
    """A Gaussian mixture in a PCA space of real embeddings, plus the residual spread."""

    mean: np.ndarray
    components: np.ndarray
    gmm: Any
    tail_std: np.ndarray
    info: dict[str, Any]

    def sample(self, n: int, *, seed: int) -> np.ndarray:
        """``n`` unit vectors, in random order (``float32`` (n, D))."""
        rng = np.random.default_rng([seed, 1])
        self.gmm.random_state = seed
        z, _ = self.gmm.sample(n)
        z = z[rng.permutation(n)]
        out = np.empty((n, len(self.mean)), np.float32)
        for start in range(0, n, 50_000):
            part = z[start : start + 50_000] @ self.components + self.mean
            part = part + rng.normal(0.0, 1.0, part.shape) * self.tail_std
            out[start : start + len(part)] = part / np.linalg.norm(part, axis=1, keepdims=True)
        return out


def fit_sampler(x: np.ndarray, *, seed: int) -> Sampler:
    """Fit the mixture of the module docstring to (N, D) embeddings.

    Raises
    ------
    BenchError
        If there are fewer than 16 embeddings.
    """
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    if len(x) < 16:
        raise BenchError(f"{len(x)} embedded images are too few to imitate (need >= 16)")
    x = np.asarray(x, np.float64)
    dims = min(PCA_DIMS, len(x) - 1, x.shape[1])
    pca = PCA(n_components=dims, random_state=seed).fit(x)
    z = pca.transform(x)
    k = max(1, min(COMPONENTS, len(x) // PER_COMPONENT))
    gmm = GaussianMixture(
        k, covariance_type="full", reg_covar=1e-3 * float(z.var(axis=0).mean()), random_state=seed
    ).fit(z)
    resid = x - pca.inverse_transform(z)
    info = {
        "embedded_images": len(x),
        "pca_dims": dims,
        "pca_variance": round(float(pca.explained_variance_ratio_.sum()), 4),
        "components": k,
    }
    return Sampler(pca.mean_, pca.components_, gmm, resid.std(axis=0), info)


def bench_vectors(
    n: int, *, checkpoint: Path, data: Path, seed: int, cache_dir: Path | None, progress: bool = True
) -> tuple[np.ndarray, dict[str, Any]]:
    """The benchmark's vectors and how they were made (cached by :func:`table_tag`).

    Raises
    ------
    BenchError
        If ``data`` holds no image.
    """
    from hitl.embed import embed_paths, image_files

    tag = table_tag(n=n, seed=seed, checkpoint=checkpoint, data=data)
    cached = cache_dir / "hitl_bench" / f"{tag}.npz" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        with np.load(cached, allow_pickle=False) as z:
            return z["vectors"], {**json.loads(str(z["info"])), "cached": True}
    files = image_files(data)
    if not files:
        raise BenchError(f"no JPEG/PNG/FITS image under {data}")
    t0 = time.perf_counter()
    if progress:
        print(f"embedding {len(files)} images of {data} ...", file=sys.stderr, flush=True)
    emb = embed_paths(
        files, checkpoint=checkpoint, cache_dir=cache_dir / "model_input" if cache_dir is not None else None
    )
    sampler = fit_sampler(emb, seed=seed)
    vectors = sampler.sample(n, seed=seed)
    info = {
        "description": (
            f"{n} samples of a {sampler.info['components']}-component full-covariance Gaussian mixture in "
            f"the {sampler.info['pca_dims']}-d PCA space ({sampler.info['pca_variance']:.0%} of the variance; "
            "the residual's per-dimension spread added back) of the checkpoint's embeddings of "
            f"{len(files)} images under {data}, L2-normalised"
        ),
        **sampler.info,
        "data": str(data),
        "seed": seed,
        "recipe_version": RECIPE_VERSION,
        "seconds": round(time.perf_counter() - t0, 1),
        "cached": False,
    }
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.stem}.tmp.npz")
        np.savez(tmp, vectors=vectors, info=np.asarray(json.dumps(info)))
        tmp.replace(cached)
    return vectors, info


def table_tag(*, n: int, seed: int, checkpoint: Path, data: Path) -> str:
    """Short hash naming the bench table: n, seed, checkpoint weights, data folder, recipe."""
    from encoder.checkpoint import file_sha256

    text = f"{RECIPE_VERSION}|{n}|{seed}|{file_sha256(checkpoint)}|{Path(data).resolve()}"
    return hashlib.sha256(text.encode()).hexdigest()[:10]


# -- the table ------------------------------------------------------------------------------------
def bench_tile_ids(survey: str, n: int) -> list[uuid.UUID]:
    """Tile ids of the bench table's rows (external ids ``0000000`` ...)."""
    from galsift.messages import tile_id

    return [uuid.UUID(tile_id(survey, f"{i:07d}")) for i in range(n)]


def drop_tables(engine: Engine, *, keep: str | None = None) -> None:
    """Delete every bench table (tiles, embeddings, model version) but ``keep``'s."""
    from sqlalchemy import text

    with engine.begin() as c:
        names = [
            r[0]
            for r in c.execute(
                text("SELECT name FROM model_versions WHERE name LIKE :p"), {"p": PREFIX + "%"}
            )
        ]
    for name in names:
        if name == keep:
            continue
        with engine.begin() as c:
            c.execute(text("DELETE FROM hitl_sessions WHERE model_version = :m"), {"m": name})
            c.execute(text("DELETE FROM embeddings WHERE model_version = :m"), {"m": name})
            c.execute(text("DELETE FROM tiles WHERE survey = :m"), {"m": name})
            c.execute(text("DELETE FROM surveys WHERE name = :m"), {"m": name})
            c.execute(text("DELETE FROM model_versions WHERE name = :m"), {"m": name})


def load_table(
    engine: Engine,
    vectors: np.ndarray,
    *,
    name: str,
    checkpoint: Path,
    info: dict[str, Any],
    progress: bool = True,
) -> tuple[list[uuid.UUID], dict[str, Any]]:
    """Make sure the bench table ``name`` holds exactly ``vectors``; load it with COPY if not.

    Returns
    -------
    tuple
        ``(tile ids in row order, load facts)``: ``reused`` and ``load_s``.
    """
    from sqlalchemy import text

    from db import repo
    from db.models import ModelVersionCreate
    from encoder.checkpoint import file_sha256, read_card

    n = len(vectors)
    ids = bench_tile_ids(name, n)
    have = repo.count_rows(engine, "embeddings", model_version=name)
    if have == n:
        return ids, {"reused": True, "load_s": 0.0}
    drop_tables(engine)
    t0 = time.perf_counter()
    repo.register_model_version(
        engine,
        ModelVersionCreate(
            name=name,
            variant=str(read_card(checkpoint)["variant"]),
            checkpoint_uri=checkpoint.resolve().as_uri(),
            checksum=file_sha256(checkpoint),
            card={"bench_hitl": info},
        ),
    )
    with engine.begin() as c:
        c.execute(
            text("INSERT INTO surveys (name, description) VALUES (:s, :d) ON CONFLICT DO NOTHING"),
            {"s": name, "d": "galsift bench hitl: synthetic LVM-like vectors"},
        )
    with engine.connect() as c:
        others = int(c.execute(text("SELECT count(*) FROM embeddings")).scalar_one())
        # a bulk load into an HNSW index is far slower than building the index afterwards
        # (pgvector's advice): when the load dominates the table, drop the HNSW indexes and
        # rebuild them from their own definitions once the rows are in
        hnsw = (
            [
                (str(r[0]), str(r[1]))
                for r in c.execute(
                    text(
                        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'embeddings' "
                        "AND indexdef ILIKE '%USING hnsw%'"
                    )
                )
            ]
            if n > others
            else []
        )
    if hnsw:
        with engine.begin() as c:
            for index, _ in hnsw:
                c.execute(text(f'DROP INDEX IF EXISTS "{index}"'))
    raw = engine.raw_connection()
    try:
        conn: Any = raw.driver_connection
        for start in range(0, n, COPY_BATCH):
            stop = min(n, start + COPY_BATCH)
            with conn.cursor() as cur:
                with cur.copy(
                    "COPY tiles (id, survey, external_id, bands, pixel_scale, shape, dtype, "
                    "pixels_uri, checksum, meta) FROM STDIN"
                ) as cp:
                    cp.write(
                        "".join(
                            f"{ids[i]}\t{name}\t{i:07d}\t{{g,r,z}}\t0.262\t{{3,96,96}}\tfloat32\t"
                            f"synthetic://{name}/{i:07d}\t{'0' * 64}\t{{}}\n"
                            for i in range(start, stop)
                        )
                    )
                with cur.copy(
                    "COPY embeddings (tile_id, model_version, embedding) FROM STDIN WITH (FORMAT BINARY)"
                ) as cp:
                    cp.set_types(["uuid", "text", "vector"])
                    for i in range(start, stop):
                        cp.write_row((ids[i], name, vectors[i]))
            conn.commit()
            if progress:
                print(
                    f"loaded {stop}/{n} rows ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True
                )
    finally:
        raw.close()
        if hnsw:
            t1 = time.perf_counter()
            with engine.begin() as c:
                c.execute(text(f"SET LOCAL maintenance_work_mem = '{INDEX_BUILD_MEMORY}'"))
                for _, definition in hnsw:
                    c.execute(text(definition))
            if progress:
                print(
                    f"rebuilt the HNSW index in {time.perf_counter() - t1:.0f} s", file=sys.stderr, flush=True
                )
    with engine.begin() as c:
        c.execute(text("ANALYZE tiles"))
        c.execute(text("ANALYZE embeddings"))
    return ids, {"reused": False, "load_s": round(time.perf_counter() - t0, 1)}


# -- the sessions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Concept:
    """What one simulated scientist looks for: member rows of the table, and the 3 seeds."""

    members: np.ndarray
    seeds: np.ndarray


def concepts(vectors: np.ndarray, *, sessions: int, size: int, n_seeds: int, seed: int) -> list[Concept]:
    """Per session, the ``size`` rows nearest a random row, and ``n_seeds`` random members."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for _ in range(sessions):
        anchor = int(rng.integers(len(vectors)))
        sims = vectors @ vectors[anchor]
        members = np.argpartition(-sims, size - 1)[:size]
        out.append(Concept(np.sort(members), rng.choice(members, n_seeds, replace=False)))
    return out


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile, rounded to 0.1 ms (nan for no values)."""
    return round(float(np.percentile(values, q)), 1) if values else float("nan")


def run_sessions(
    engine: Engine,
    *,
    exact: bool,
    name: str,
    ids: list[uuid.UUID],
    plan: list[Concept],
    rounds: int,
    k: int,
    run_id: str,
) -> dict[str, Any]:
    """Run the planned sessions on one engine and return its row (latencies and positives found)."""
    from hitl.engine import SearchEngine

    se = SearchEngine(engine, exact=exact)
    kind = "exact" if exact else "hnsw"
    index = {t: i for i, t in enumerate(ids)}
    parts: dict[str, list[float]] = {"fit": [], "retrieve": [], "select": []}
    total: list[float] = []
    found: list[int] = []
    candidates: list[int] = []
    for s, concept in enumerate([plan[0], *plan]):
        warmup = s == 0
        member = np.zeros(len(ids), bool)
        member[concept.members] = True
        session = se.new_session(
            owner=f"{PREFIX}{run_id}-{kind}-{s}",
            concept=f"{PREFIX}{run_id}-{kind}-{s}",
            model_version=name,
            tile_ids=[ids[i] for i in concept.seeds],
        )
        hits = 0
        for _ in range(1 if warmup else rounds):
            rnd = se.next_round(session.id, k=k)
            idx = [index[t.tile_id] for t in rnd.shown]
            se.label(session.id, [(ids[i], bool(member[i])) for i in idx], round_no=rnd.round_no)
            if warmup:
                continue
            hits += int(member[idx].sum())
            for key in parts:
                parts[key].append(rnd.timings_ms[key])
            total.append(sum(rnd.timings_ms[key] for key in parts))
            candidates.append(rnd.candidates)
        if not warmup:
            found.append(hits)
    model = EXACT_NAME if exact else HNSW_NAME
    return {
        "model": model,
        "p50_ms": percentile(total, 50),
        "p95_ms": percentile(total, 95),
        "mean_ms": round(float(np.mean(total)), 1),
        "max_ms": round(float(np.max(total)), 1),
        **{f"{key}_p50_ms": percentile(v, 50) for key, v in parts.items()},
        **{f"{key}_p95_ms": percentile(v, 95) for key, v in parts.items()},
        "rounds": len(total),
        "sessions": len(plan),
        "per_round": k,
        "candidates_mean": round(float(np.mean(candidates)), 1),
        "found_mean": round(float(np.mean(found)), 2),
        "precision_mean": round(float(np.mean(found)) / (rounds * k), 4),
    }


def forget_sessions(engine: Engine, run_id: str) -> None:
    """Delete the run's sessions (seeds and shown tiles cascade) and its labels."""
    from sqlalchemy import text

    pattern = f"{PREFIX}{run_id}-%"
    with engine.begin() as c:
        c.execute(text("DELETE FROM hitl_labels WHERE author LIKE :p"), {"p": pattern})
        c.execute(text("DELETE FROM hitl_sessions WHERE owner LIKE :p"), {"p": pattern})


def run(
    settings: Settings,
    *,
    n: int = 200_000,
    sessions: int = 8,
    rounds: int = 10,
    per_round: int = 12,
    concept_size: int | None = None,
    data: Path | None = None,
    model: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Build or reuse the table, run the sessions on both engines, return the ``--json`` document.

    Raises
    ------
    BenchError
        If the options cannot make a benchmark.
    """
    from encoder.serving import model_version_for, resolve_checkpoint
    from hitl.evaluate import database

    size = concept_size if concept_size is not None else max(24, n // 100)
    if n < 100 or min(sessions, rounds, per_round) < 1 or not 3 < size <= n // 2:
        raise BenchError("need --n >= 100, positive --sessions/--rounds/--per-round, 3 < concept size <= n/2")
    data = Path(data) if data is not None else DEMO_DATA
    checkpoint = resolve_checkpoint(None, model, settings)
    version = model_version_for(checkpoint).name
    vectors, info = bench_vectors(
        n,
        checkpoint=checkpoint,
        data=data,
        seed=seed,
        cache_dir=settings.data_dir / "cache",
        progress=progress,
    )
    name = PREFIX + table_tag(n=n, seed=seed, checkpoint=checkpoint, data=data)
    plan = concepts(vectors, sessions=sessions, size=size, n_seeds=3, seed=seed)
    run_id = uuid.uuid4().hex[:8]
    with database(settings) as engine:
        ids, load = load_table(
            engine, vectors, name=name, checkpoint=checkpoint, info=info, progress=progress
        )
        from sqlalchemy import text

        with engine.connect() as c:
            server = str(c.execute(text("SHOW server_version")).scalar_one()).split()[0]
            pgvector = c.execute(
                text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            ).scalar()
            table_rows = int(c.execute(text("SELECT count(*) FROM embeddings")).scalar_one())
        rows = []
        try:
            for exact in (False, True):
                t0 = time.perf_counter()
                rows.append(
                    run_sessions(
                        engine,
                        exact=exact,
                        name=name,
                        ids=ids,
                        plan=plan,
                        rounds=rounds,
                        k=per_round,
                        run_id=run_id,
                    )
                )
                if progress:
                    print(
                        f"{rows[-1]['model']}: {rows[-1]['rounds']} rounds in {time.perf_counter() - t0:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            forget_sessions(engine, run_id)
    for r in rows:
        r["n"] = n
    hnsw = rows[0]
    return {
        "command": "bench hitl",
        "data": str(data),
        "model_version": version,
        "table": {
            "model_version": name,
            "rows": n,
            "embeddings_table_rows": table_rows,
            "concept_size": size,
            "vectors": info,
            **load,
        },
        "database": {"server_version": server, "pgvector": pgvector},
        "protocol": {
            "sessions": sessions,
            "rounds": rounds,
            "per_round": per_round,
            "seeds": 3,
            "latency": "fit + retrieve + select of SearchEngine.next_round (Round.timings_ms); "
            "one untimed warm-up round per engine",
        },
        "must": {
            "rule": f"{HNSW_NAME} p95 <= {MUST_P95_MS:g} ms",
            "p95_ms": hnsw["p95_ms"],
            "holds": bool(hnsw["p95_ms"] <= MUST_P95_MS),
        },
        "results": rows,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """Latency per engine: p50/p95 of the round and of its parts, and positives found."""
    cols = [
        ("model", "{:<18}"),
        ("p50_ms", "{:>8.1f}"),
        ("p95_ms", "{:>8.1f}"),
        ("fit_p50_ms", "{:>10.1f}"),
        ("retrieve_p50_ms", "{:>15.1f}"),
        ("select_p50_ms", "{:>13.1f}"),
        ("rounds", "{:>6}"),
        ("candidates_mean", "{:>15.1f}"),
        ("precision_mean", "{:>14.3f}"),
    ]
    head = " ".join(f"{c:<18}" if i == 0 else f"{c:>{len(f.format(0))}}" for i, (c, f) in enumerate(cols))
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(" ".join(f.format(r[c]) for c, f in cols))
    return "\n".join(lines)


# -- the command ----------------------------------------------------------------------------------
def register(groups: CommandGroups) -> None:
    """Add ``galsift bench hitl``."""
    p = groups.bench.add_parser(
        "hitl",
        help="HITL round latency (fit + retrieval + selection) on a large vector table, HNSW vs exact",
        description="Load (or reuse) a table of LVM-like vectors in the embeddings table, run simulated "
        "HITL sessions on the HNSW engine and on an exact scan with the same seeds, and report round "
        "latency p50/p95.",
    )
    p.add_argument("--n", type=int, default=200_000, help="rows of the bench table")
    p.add_argument("--sessions", type=int, default=8, help="simulated sessions per engine")
    p.add_argument("--rounds", type=int, default=10, help="rounds per session")
    p.add_argument("--per-round", type=int, default=12, help="tiles per round")
    p.add_argument("--concept-size", type=int, default=None, help="rows of a concept (default n/100)")
    p.add_argument("--data", type=Path, default=None, help="images the vectors imitate (default demo tiles)")
    p.add_argument("--model", default=None, help="checkpoint or registered version (default: shipped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_hitl)


def _cmd_hitl(args: argparse.Namespace, settings: Settings) -> int:
    try:
        doc = run(
            settings,
            n=args.n,
            sessions=args.sessions,
            rounds=args.rounds,
            per_round=args.per_round,
            concept_size=args.concept_size,
            data=args.data,
            model=args.model,
            seed=args.seed,
            progress=not args.no_progress,
        )
    except (BenchError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t = doc["table"]
    print(f"vectors: {t['vectors']['description']}{' (cached)' if t['vectors'].get('cached') else ''}")
    print(
        f"table: {t['rows']} rows of {t['model_version']} in the embeddings table ({t['embeddings_table_rows']} "
        f"rows in all), {'reused' if t['reused'] else 'loaded in ' + str(t['load_s']) + ' s'}; "
        f"PostgreSQL {doc['database']['server_version']}, pgvector {doc['database']['pgvector']}"
    )
    p = doc["protocol"]
    print(
        f"{p['sessions']} sessions x {p['rounds']} rounds of {p['per_round']} per engine, 3 seeds from a "
        f"concept of {t['concept_size']} nearest neighbours of a random row; latency = fit + retrieve + select"
    )
    print(format_table(doc["results"]))
    must = doc["must"]
    print(f"Must ({must['rule']}): {must['p95_ms']} ms, {'HOLDS' if must['holds'] else 'FAILS'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0
