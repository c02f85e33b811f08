"""Pure parts of ``galsift bench search``: recall, exact top-k, filters, the mixture, the table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from db import bench
from db.bench import (
    BenchError,
    BenchTable,
    SearchBenchConfig,
    latency_stats,
    make_filters,
    must_check,
    recall_at_k,
    region_range,
    topk,
)
from encoder import bench_search, synthetic
from encoder.synthetic import SyntheticError, fit_mixture, normalise


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    return normalise(np.random.default_rng(seed).standard_normal((n, d)))


def _table(n: int = 400, d: int = 16, seed: int = 0) -> BenchTable:
    rng = np.random.default_rng(seed)
    ra, dec = synthetic.sky_positions(n, rng=rng)
    return BenchTable(
        vectors=_unit(n, d, seed),
        model_version=np.asarray(["a"] * (n // 2) + ["b"] * (n - n // 2)),
        ra=ra,
        dec=dec,
        healpix=synthetic.healpix_nested(ra, dec, order=10),
        score=synthetic.detector_scores(n, rng=rng),
        healpix_order=10,
    )


# -- exact search and recall -----------------------------------------------------------------
def test_topk_sorted_and_masked() -> None:
    sims = np.array([0.1, 0.9, 0.5, 0.7, 0.3])
    ids, dist = topk(sims, 3)
    assert ids.tolist() == [1, 3, 2]
    assert np.allclose(dist, [0.1, 0.3, 0.5])
    mask = np.array([True, False, True, False, True])
    ids, dist = topk(sims, 3, mask)
    assert ids.tolist() == [2, 4, 0]
    few, _ = topk(sims, 3, np.array([False, True, False, False, False]))
    assert few.tolist() == [1]
    none, nd = topk(sims, 3, np.zeros(5, bool))
    assert len(none) == 0 and len(nd) == 0


def test_recall_counts_true_neighbours_and_ties() -> None:
    sims = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.8])  # rows 1 and 5 tie
    _, truth = topk(sims, 2)
    assert recall_at_k([0, 1], sims, truth, 2) == 1.0
    assert recall_at_k([0, 5], sims, truth, 2) == 1.0  # the tie counts
    assert recall_at_k([0, 2], sims, truth, 2) == 0.5
    assert recall_at_k([2, 3], sims, truth, 2) == 0.0
    assert recall_at_k([], sims, truth, 2) == 0.0
    assert recall_at_k([0, 0], sims, truth, 2) == 0.5  # duplicates count once
    # within float rounding of the k-th distance still counts; clearly beyond does not
    near = sims.copy()
    near[2] = 0.8 - 1e-7
    assert recall_at_k([0, 2], near, truth, 2) == 1.0


def test_recall_under_a_filter_with_fewer_than_k_rows() -> None:
    sims = np.array([0.9, 0.8, 0.7])
    mask = np.array([False, True, False])
    _, truth = topk(sims, 10, mask)
    assert recall_at_k([1], sims, truth, 10, mask=mask) == 1.0
    assert recall_at_k([0], sims, truth, 10, mask=mask) == 0.0  # closer, but filtered out
    assert recall_at_k([], sims, topk(sims, 10, np.zeros(3, bool))[1], 10) == 1.0


def test_exact_similarities_match_brute_force() -> None:
    v, q = _unit(50, 8, 1), _unit(3, 8, 2)
    sims = bench.exact_similarities(v, q)
    assert sims.shape == (3, 50)
    assert np.allclose(sims[1], v @ q[1], atol=1e-6)
    ids, _ = topk(sims[1], 5)
    assert set(ids) == set(np.argsort(-(v @ q[1]))[:5])


def test_latency_stats() -> None:
    stats = latency_stats([0.001] * 19 + [0.011])
    assert stats["p50_ms"] == pytest.approx(1.0)
    assert 1.0 < stats["p95_ms"] <= 11.0
    assert stats["per_s"] == pytest.approx(1000 / 1.5, rel=1e-3)


# -- filters ------------------------------------------------------------------------------------
def test_region_range_is_the_nested_descendants() -> None:
    lo, hi = region_range(0b1011_0110, order=4, region_order=2)
    assert (lo, hi) == (0b1011_0000, 0b1100_0000)
    assert region_range(7, order=3, region_order=3) == (7, 8)
    with pytest.raises(BenchError):
        region_range(7, order=3, region_order=4)


def test_make_filters_masks_match_their_sql_meaning() -> None:
    table = _table()
    cfg = SearchBenchConfig(region_order=1, score_threshold=0.3, filter_version="b")
    filters = {f.name: f for f in make_filters(table, 5, cfg, rng=np.random.default_rng(0))}
    assert set(filters) == {"model_version", "sky_region", "score"}
    version = filters["model_version"]
    assert version.params[0] == {"version": "b"}
    assert np.array_equal(version.masks[0], table.model_version == "b")
    assert version.selectivity == pytest.approx(0.5)
    score = filters["score"]
    assert np.array_equal(score.masks[3], table.score >= 0.3)
    sky = filters["sky_region"]
    assert len(sky.params) == len(sky.masks) == 5
    for p, mask in zip(sky.params, sky.masks, strict=True):
        assert p["hi"] - p["lo"] == 4 ** (10 - 1)
        assert np.array_equal(mask, (table.healpix >= p["lo"]) & (table.healpix < p["hi"]))
        assert mask.sum() >= cfg.k
        # every row of the region is in the same order-1 pixel
        assert len(set((table.healpix[mask] >> 18).tolist())) == 1
    with pytest.raises(BenchError):
        make_filters(table, 1, SearchBenchConfig(filter_version="zzz"), rng=np.random.default_rng(0))


def test_config_and_table_validation() -> None:
    with pytest.raises(BenchError):
        SearchBenchConfig(types=("float16",))
    with pytest.raises(BenchError):
        SearchBenchConfig(m=(16,), ef_construction=(16,))
    with pytest.raises(BenchError):
        SearchBenchConfig(ef_search=())
    table = _table(20)
    with pytest.raises(BenchError):
        BenchTable(
            table.vectors, table.model_version[:3], table.ra, table.dec, table.healpix, table.score, 10
        )


def test_cli_choices_match_db_bench() -> None:
    assert bench_search.INDEX_TYPES == bench.INDEX_TYPES
    assert bench_search.FILTERS == bench.FILTERS
    assert bench_search.ITERATIVE_MODES == bench.ITERATIVE_MODES


def test_maintenance_work_mem_is_capped() -> None:
    assert bench.maintenance_work_mem_mb(SearchBenchConfig(maintenance_work_mem_mb=100)) == 100
    assert 64 <= bench.maintenance_work_mem_mb(SearchBenchConfig()) <= 2048


# -- reading the numbers ------------------------------------------------------------------------
def _row(**kw: object) -> dict[str, object]:
    base = {"model": "pgvector_hnsw", "type": "vector", "m": 16, "ef_construction": 64, "full_k": 1.0}
    return {**base, **kw}


def test_must_check_picks_the_fastest_row_that_meets_each_goal() -> None:
    rows = [
        _row(ef_search=40, recall_at_10=0.93, p50_ms=1.0),
        _row(ef_search=100, recall_at_10=0.97, p50_ms=2.0),
        _row(ef_search=200, recall_at_10=0.99, p50_ms=3.0),
        _row(ef_search=40, filter="sky", iterative_scan="off", recall_at_10=0.5, full_k=0.1, p50_ms=0.5),
        _row(ef_search=40, filter="sky", iterative_scan="relaxed_order", recall_at_10=0.95, p50_ms=4.0),
        {"model": "faiss_hnsw", "ef_search": 40, "recall_at_10": 1.0, "p50_ms": 0.1, "full_k": 1.0},
    ]
    check = must_check(rows)
    assert check["ok"]
    assert check["unfiltered"]["ef_search"] == 100
    assert check["filtered"]["sky"]["iterative_scan"] == "relaxed_order"
    failing = must_check([*rows[:3], rows[3]])
    assert not failing["ok"] and failing["filtered"]["sky"] is None
    assert "NOT MET" in bench.summarise(failing)
    table = bench.format_table(rows)
    assert "pgvector_hnsw" in table and "faiss_hnsw" in table and "relaxed_order" in table


# -- the mixture and the synthetic table --------------------------------------------------------
def _clustered(n: int = 400, d: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, d)) * 2
    x = centres[rng.integers(6, size=n)] + 0.3 * rng.standard_normal((n, d))
    return normalise(x)


def test_mixture_samples_unit_vectors_of_the_right_shape() -> None:
    x = _clustered()
    mix = fit_mixture(x, components=6, seed=0)
    assert mix.dim == 24
    assert mix.basis.shape[0] + mix.tail_basis.shape[0] == 24
    assert mix.info["components"] <= 6
    assert mix.info["holdout_loglik"] > mix.info["holdout_loglik_1_gaussian"]
    s = mix.sample(1000, np.random.default_rng(1), chunk=300)
    assert s.shape == (1000, 24) and s.dtype == np.float32
    assert np.allclose(np.linalg.norm(s, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(s, mix.sample(1000, np.random.default_rng(1), chunk=300))
    # the sample has the fitted data's structure, not that of uniform random unit vectors
    assert np.linalg.norm(s.mean(axis=0) - x.mean(axis=0)) < 0.1
    assert 0.5 < s.var(axis=0).sum() / x.var(axis=0).sum() < 1.5
    assert mix.sample(0, np.random.default_rng(0)).shape == (0, 24)


def test_mixture_needs_enough_embeddings() -> None:
    with pytest.raises(SyntheticError):
        fit_mixture(_unit(20, 24))


def test_second_version_is_close_but_different() -> None:
    v = _unit(500, 256)
    w = synthetic.second_version(v, rng=np.random.default_rng(7), scale=0.15)
    cos = (v * w).sum(axis=1)
    assert np.allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-5)
    assert 0.98 < np.median(cos) < 0.995


def test_sky_positions_stay_in_the_patch_and_are_uniform_on_the_sphere() -> None:
    ra, dec = synthetic.sky_positions(20000, rng=np.random.default_rng(0), dec=(-20.0, 35.0))
    assert ra.min() >= 0 and ra.max() < 360 and dec.min() >= -20 and dec.max() <= 35
    # uniform in sin(dec), not in dec
    lo, hi = np.sin(np.radians(-20)), np.sin(np.radians(35))
    assert np.mean(np.sin(np.radians(dec)) < (lo + hi) / 2) == pytest.approx(0.5, abs=0.02)


def test_bench_table_lays_out_two_versions_of_each_object() -> None:
    base = _unit(50, 256)
    table = bench_search.bench_table(base, versions=("v1", "v2"), seed=0)
    assert len(table) == 100 and table.dim == 256
    assert np.array_equal(table.vectors[:50], base)
    assert (table.model_version[:50] == "v1").all() and (table.model_version[50:] == "v2").all()
    assert np.array_equal(table.healpix[:50], table.healpix[50:])
    assert table.score.min() >= 0 and table.score.max() <= 1


def test_dataset_folders_and_cache_key(tmp_path: Path) -> None:
    demo = bench_search.DEMO_DATA
    folders = [p.name for p in synthetic.dataset_folders(demo)]
    assert {"gz_decals_examples", "cfhtls_lens_candidates", "legacy_dr9_fits"} <= set(folders)
    assert synthetic.dataset_folders(demo / "gz_decals_examples") == [demo / "gz_decals_examples"]
    with pytest.raises(SyntheticError):
        synthetic.dataset_folders(tmp_path)
    key = synthetic.cache_key(checksum="abc", data=demo, n=10, seed=0)
    assert key == synthetic.cache_key(checksum="abc", data=demo, n=10, seed=0)
    assert key != synthetic.cache_key(checksum="abc", data=demo, n=11, seed=0)
    assert key != synthetic.cache_key(checksum="abd", data=demo, n=10, seed=0)


def test_synthetic_embeddings_are_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from encoder import checkpoint

    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"weights")
    calls: list[int] = []

    def fake_sources(*args: object, **kw: object) -> tuple[np.ndarray, dict[str, int]]:
        calls.append(1)
        return _clustered(n=300, d=24), {
            "real_images": 10,
            "real_views": 30,
            "simulations": 0,
            "sim_views": 0,
        }

    monkeypatch.setattr(synthetic, "embed_sources", fake_sources)
    monkeypatch.setattr(checkpoint, "read_card", lambda path: {"version": "lvm_test"})
    kw = {"checkpoint": ckpt, "data": tmp_path, "seed": 1, "cache_dir": tmp_path / "cache", "progress": False}
    first = synthetic.synthetic_embeddings(50, **kw)  # type: ignore[arg-type]
    assert first.vectors.shape == (50, 24) and not first.info["cached"]
    assert first.info["model_version"] == "lvm_test" and "mixture" in first.info["description"]
    again = synthetic.synthetic_embeddings(50, **kw)  # type: ignore[arg-type]
    assert again.info["cached"] and np.array_equal(again.vectors, first.vectors)
    assert len(calls) == 1
    other = synthetic.synthetic_embeddings(60, **kw)  # type: ignore[arg-type]
    assert other.vectors.shape == (60, 24) and len(calls) == 2
