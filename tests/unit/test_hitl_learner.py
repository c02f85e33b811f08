"""The HITL learner (similarity start, pooled experts, JSON state) and the acquisition strategy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hitl.acquisition import STRATEGIES, Acquisition, select
from hitl.learner import ANCHORS, MAX_POSITIVE_QUERIES, Learner, fit, similarity_expert

DIM = 32


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _clusters(seed: int = 0, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Two well separated clusters of unit vectors: (good, bad)."""
    rng = np.random.default_rng(seed)
    a, b = np.zeros(DIM), np.zeros(DIM)
    a[0], b[1] = 1.0, 1.0
    good = _unit(a + 0.3 * rng.normal(size=(n, DIM)) / np.sqrt(DIM))
    bad = _unit(b + 0.3 * rng.normal(size=(n, DIM)) / np.sqrt(DIM))
    return good, bad


def test_similarity_only_without_negatives() -> None:
    good, bad = _clusters()
    learner = fit(good[:3], np.zeros((0, DIM), np.float32))
    assert learner.kind == "similarity" and learner.coef is None
    assert (learner.n_pos, learner.n_neg) == (3, 0)
    x = np.concatenate([good[3:10], bad[:7]])
    expected = (1 + (x @ good[:3].T).max(axis=1)) / 2
    np.testing.assert_allclose(learner.score(x), expected, rtol=1e-5)
    assert learner.score(good[3:10]).min() > learner.score(bad[:7]).max()
    # retrieval asks around the positives only
    np.testing.assert_allclose(learner.directions(), good[:3], rtol=1e-6)


def test_pooled_learner_ranks_the_good_cluster_first() -> None:
    good, bad = _clusters(1)
    learner = fit(good[:6], bad[:6])
    assert learner.kind == "logistic" and learner.coef is not None
    assert learner.sim_scale > 0, "well separated classes: the similarity expert is informative"
    s_good, s_bad = learner.score(good[6:]), learner.score(bad[6:])
    assert s_good.min() > s_bad.max()
    assert np.all((s_good >= 0) & (s_good <= 1))
    # the pool is between its two experts: with weight 1 it is the logistic regression alone
    alone = fit(good[:6], bad[:6], weight=1.0)
    z = good[6:] @ alone.coef + alone.intercept  # type: ignore[operator]
    np.testing.assert_allclose(alone.score(good[6:]), 1 / (1 + np.exp(-z)), rtol=1e-4)


def test_similarity_expert_never_counts_closeness_against_a_tile() -> None:
    rng = np.random.default_rng(2)
    pos = _unit(rng.normal(size=(4, DIM)))  # positives far from each other
    neg = _unit(pos + 0.01 * rng.normal(size=pos.shape))  # hard negatives right next to them
    assert similarity_expert(pos, neg) == (0.0, 0.0)
    good, bad = _clusters(3)
    scale, _ = similarity_expert(good[:5], bad[:5])
    assert scale > 0
    assert similarity_expert(good[:1], bad[:5]) == (0.0, 0.0)  # no other positive to compare to


def test_directions_keep_the_seeds_and_the_newest_positives() -> None:
    rng = np.random.default_rng(4)
    pos = _unit(rng.normal(size=(20, DIM)))
    learner = fit(pos, _unit(rng.normal(size=(5, DIM))))
    q = learner.directions()
    assert len(q) == MAX_POSITIVE_QUERIES
    np.testing.assert_allclose(q[:ANCHORS], pos[:ANCHORS], rtol=1e-5)
    np.testing.assert_allclose(q[ANCHORS:], pos[20 - (MAX_POSITIVE_QUERIES - ANCHORS) :], rtol=1e-5)
    assert not any(np.allclose(v, _unit(learner.coef)) for v in q)  # type: ignore[arg-type]


def test_json_round_trip_scores_the_same() -> None:
    good, bad = _clusters(5)
    for learner in (fit(good[:4], bad[:4]), fit(good[:3], np.zeros((0, DIM), np.float32))):
        state = json.loads(json.dumps(learner.to_json()))
        back = Learner.from_json(state)
        assert back.kind == learner.kind and (back.n_pos, back.n_neg) == (learner.n_pos, learner.n_neg)
        x = np.concatenate([good[10:20], bad[10:20]])
        np.testing.assert_allclose(back.score(x), learner.score(x), atol=1e-5)
        np.testing.assert_allclose(back.directions(), learner.directions(), atol=1e-5)


def test_state_stored_before_the_pool_is_the_logistic_expert_alone() -> None:
    good, bad = _clusters(6)
    learner = fit(good[:4], bad[:4], weight=1.0)
    state = learner.to_json()
    for key in ("sim_scale", "sim_offset", "weight", "anchors"):
        del state[key]
    back = Learner.from_json(state)
    np.testing.assert_allclose(back.score(good[10:]), learner.score(good[10:]), atol=1e-5)
    with pytest.raises(ValueError, match="learner"):
        Learner.from_json({"positives": []})
    with pytest.raises(ValueError, match="weight"):
        fit(good[:4], bad[:4], weight=1.5)


def test_page_mixes_strategies_and_records_them() -> None:
    rng = np.random.default_rng(7)
    x = _unit(rng.normal(size=(200, DIM)))
    scores = rng.uniform(size=200).astype(np.float32)
    policy = Acquisition(uncertain=2 / 12, diverse=2 / 12)
    picks = select(x, scores, 12, policy=policy, has_boundary=True)
    assert len(picks) == 12 and len({p.index for p in picks}) == 12
    counts = {s: sum(p.strategy == s for p in picks) for s in STRATEGIES}
    assert counts == {"exploit": 8, "uncertain": 2, "diverse": 2}
    exploit = [p.index for p in picks if p.strategy == "exploit"]
    assert sorted(exploit) == sorted(np.argsort(-scores)[:8].tolist())
    uncertain = [p.index for p in picks if p.strategy == "uncertain"]
    assert max(abs(scores[uncertain] - 0.5)) <= np.sort(abs(np.delete(scores, exploit) - 0.5))[1] + 1e-6
    # no boundary (similarity learner): nothing is picked for uncertainty
    no_boundary = select(x, scores, 12, policy=policy, has_boundary=False)
    assert {p.strategy for p in no_boundary} == {"exploit", "diverse"}


def test_no_near_duplicates_on_a_page() -> None:
    rng = np.random.default_rng(8)
    base = _unit(rng.normal(size=(10, DIM)))
    # every tile three times, nearly identical (overlapping cutouts), all with high scores
    x = _unit(np.repeat(base, 3, axis=0) + 1e-4 * rng.normal(size=(30, DIM)))
    scores = np.repeat(np.linspace(0.9, 0.99, 10), 3).astype(np.float32)
    picks = select(x, scores, 8, policy=Acquisition(), has_boundary=True)
    chosen = x[[p.index for p in picks]]
    sims = chosen @ chosen.T
    np.fill_diagonal(sims, 0)
    assert len(picks) == 8 and sims.max() < Acquisition().duplicate_cosine
    # fewer distinct tiles than the page: fewer picks, still no duplicates
    assert len(select(x, scores, 12, policy=Acquisition(), has_boundary=True)) == 10


def test_acquisition_shares_are_validated() -> None:
    with pytest.raises(ValueError):
        Acquisition(uncertain=0.7, diverse=0.5)
    assert Acquisition().counts(1, has_boundary=True) == {"exploit": 1, "uncertain": 0, "diverse": 0}


def test_page_order_follows_priority_and_uncertainty_follows_scores() -> None:
    rng = np.random.default_rng(9)
    x = _unit(rng.normal(size=(100, DIM)))
    scores = rng.uniform(size=100).astype(np.float32)
    priority = rng.uniform(size=100).astype(np.float32)
    picks = select(
        x, scores, 12, policy=Acquisition(uncertain=1 / 12, diverse=0), has_boundary=True, priority=priority
    )
    exploit = [p.index for p in picks if p.strategy == "exploit"]
    assert sorted(exploit) == sorted(np.argsort(-priority)[:11].tolist())
    (uncertain,) = [p.index for p in picks if p.strategy == "uncertain"]
    rest = np.delete(np.arange(100), exploit)
    assert uncertain == rest[np.argmin(abs(scores[rest] - 0.5))]


def test_priority_fuses_similarity_and_probability_ranks() -> None:
    good, bad = _clusters(seed=3)
    sim_only = fit(good[:3], np.zeros((0, DIM), np.float32))
    np.testing.assert_array_equal(sim_only.priority(bad[:5]), sim_only.score(bad[:5]))
    learner = fit(good[:6], bad[:6])
    rng = np.random.default_rng(4)
    cand = _unit(rng.normal(size=(50, DIM)))
    cand[0] = good[1]  # a copy of a positive: the nearest of all, whatever its probability
    pri = learner.priority(cand)
    nearest = (cand @ learner.positives.T).max(axis=1)
    prob = learner.score(cand)
    assert pri.min() >= 0 and pri.max() <= 1
    assert pri[0] >= 0.5 and pri[int(np.argmax(prob))] >= 0.5
    # the fused rank is the mean of the two ranks: the top on either count is in the top half
    assert pri[int(np.argmax(nearest))] >= 0.5
    # the fused order differs from the probability's own order (else it would change nothing)
    assert not np.array_equal(np.argsort(-pri), np.argsort(-prob))
