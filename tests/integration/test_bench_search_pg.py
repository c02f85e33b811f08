"""``galsift bench search`` end to end on the real PostgreSQL + pgvector, at a small size."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, text

from galsift.settings import Settings

pytestmark = pytest.mark.integration

ROW_KEYS = {"model", "type", "queries", "recall_at_10", "full_k", "p50_ms", "p95_ms", "per_s"}


def _lvm_like(n: int, seed: int = 0, d: int = 256) -> np.ndarray:
    """Clustered unit vectors in a low-dimensional subspace plus a small tail, as LVM embeddings are."""
    from encoder.synthetic import normalise

    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, 12)))[0].T
    centres = rng.standard_normal((20, 12))
    coords = centres[rng.integers(20, size=n)] + 0.4 * rng.standard_normal((n, 12))
    return normalise(coords @ basis + 0.05 * rng.standard_normal((n, d)))


def _schemas(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return [
            str(r[0])
            for r in conn.execute(text("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bench_%'"))
        ]


def test_run_search_bench_small(engine: Engine) -> None:
    from db.bench import SearchBenchConfig, must_check, run_search_bench
    from encoder.bench_search import bench_table

    base = _lvm_like(1500 + 20)
    table = bench_table(base[:1500], versions=("v1", "v2"), seed=0)
    with engine.connect() as conn:
        before = conn.execute(text("SELECT count(*) FROM embeddings")).scalar_one()
    cfg = SearchBenchConfig(ef_search=(10, 200), exact_queries=10, warmup=2, progress=False)
    out = run_search_bench(engine, table, base[1500:], cfg)
    rows = out["results"]

    assert not _schemas(engine)  # the throw-away schema is gone
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM embeddings")).scalar_one() == before
    assert out["database"]["pgvector"].startswith("0.8")
    for r in rows:
        assert set(r) >= ROW_KEYS, r
        assert 0.0 <= r["recall_at_10"] <= 1.0 and r["p50_ms"] > 0

    models = {r["model"] for r in rows}
    assert models == {"exact_numpy", "exact_seqscan", "exact_btree", "pgvector_hnsw", "faiss_hnsw"}
    assert {r["filter"] for r in rows if r["model"] == "exact_btree"} == {"sky_region", "score"}
    for r in rows:
        if r["model"].startswith("exact"):
            assert r["recall_at_10"] == 1.0 and r["full_k"] == 1.0, r
        if r["model"] in ("pgvector_hnsw", "faiss_hnsw"):
            assert r["ef_search"] in (10, 200) and r["m"] == 16 and r["ef_construction"] == 64
        if r["model"] == "pgvector_hnsw":
            assert r["plan"] == "hnsw" and r["build_s"] > 0 and r["index_mb"] > 0

    def pg(**kw: Any) -> dict[str, Any]:
        found = [
            r for r in rows if r["model"] == "pgvector_hnsw" and all(r.get(k) == v for k, v in kw.items())
        ]
        assert len(found) == 1, kw
        return found[0]

    for kind in ("vector", "halfvec"):
        assert pg(type=kind, ef_search=200, filter=None)["recall_at_10"] >= 0.95
    halfvec, vector = (
        pg(type="halfvec", ef_search=200, filter=None),
        pg(type="vector", ef_search=200, filter=None),
    )
    assert halfvec["index_mb"] < vector["index_mb"]
    # filtered rows carry the filter and its selectivity; iterative scans always return k rows
    filtered = [r for r in rows if "filter" in r]
    assert {r["filter"] for r in filtered} == {"model_version", "sky_region", "score"}
    assert all(0 < r["selectivity"] < 1 for r in filtered)
    sky_off = pg(type="vector", ef_search=10, filter="sky_region", iterative_scan="off")
    assert sky_off["full_k"] < 1.0  # a 1% filter on 10 candidates leaves too few rows
    for ef in (10, 200):
        for mode in ("relaxed_order", "strict_order"):
            assert pg(type="vector", ef_search=ef, filter="sky_region", iterative_scan=mode)["full_k"] == 1.0
    assert (
        pg(type="vector", ef_search=200, filter="sky_region", iterative_scan="relaxed_order")["recall_at_10"]
        >= 0.9
    )
    assert must_check(rows)["unfiltered"] is not None


def test_bench_search_command_writes_the_json_document(
    stack_settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from encoder import bench_search, synthetic
    from galsift.cli import build_parser

    def fake(n: int, **kw: Any) -> synthetic.SyntheticVectors:
        # the embedding step is tested elsewhere and takes minutes on CPU: vectors of the right kind
        return synthetic.SyntheticVectors(
            _lvm_like(n, seed=1),
            {"description": "test vectors", "model_version": "lvm_test", "cached": False},
        )

    monkeypatch.setattr(synthetic, "synthetic_embeddings", fake)
    out = tmp_path / "search.json"
    args = build_parser().parse_args(
        [
            "bench", "search", "--n", "1000", "--queries", "10", "--ef", "40", "--types", "vector",
            "--iterative", "off,relaxed_order", "--exact-queries", "5", "--no-progress", "--json", str(out),
        ]
    )  # fmt: skip
    status = args.func(args, stack_settings)
    assert status == 0
    printed = capsys.readouterr().out
    assert "pgvector_hnsw" in printed and "faiss_hnsw" in printed and "exact_seqscan" in printed
    doc = json.loads(out.read_text())
    assert doc["command"] == "bench search"
    assert doc["model_version"] == "lvm_test"
    assert doc["data"] == str(bench_search.DEMO_DATA)
    assert doc["vectors"]["rows"] == 1000 and "description" in doc["vectors"]
    rows = doc["results"]
    assert {r["model"] for r in rows} >= {"pgvector_hnsw", "faiss_hnsw", "exact_seqscan"}
    assert all(set(r) >= ROW_KEYS for r in rows)
    assert any(r.get("filter") == "sky_region" and r.get("iterative_scan") == "relaxed_order" for r in rows)
    assert {r["ef_search"] for r in rows if r["model"] == "pgvector_hnsw"} == {40}
