"""The light learner fitted in every HITL round, and its serialisable state.

While a session has no negative labels the learner is similarity-only: a tile scores by its
cosine similarity to the nearest positive, mapped to [0, 1]. Once there are negatives it is a
**pool of two experts** in log-odds (a logarithmic opinion pool, equal weights
:data:`LOGISTIC_WEIGHT`):

- a class-balanced logistic regression on the (L2-normalised) embeddings, the global
  learner: a handful of positives among many negatives still pull its boundary;
- the similarity expert: the cosine similarity to the nearest positive, turned into log-odds by a
  one-feature logistic fit (Platt scaling) on the labelled tiles, each positive's similarity
  measured to the *other* positives (leave-one-out). Its slope is kept >= 0: being closer to a
  good tile is never evidence against a tile (with hard negatives next to the seeds an
  unconstrained fit can flip the sign); a slope of 0 leaves the logistic expert alone.

Why both: a linear model fitted on a dozen labels extrapolates, and its highest scores lie far
from every labelled tile. On the ring pool (``galsift eval hitl``, README) the logistic learner
alone dropped to a precision of 0.08 in round 2, while similarity to the seeds kept 0.6; on the
lens pool the logistic learner beat similarity by 10%. The pool keeps the local evidence of the
similarity expert and the learned direction of the logistic one.

**The page's order** (:meth:`Learner.priority`) fuses two ranks among the round's candidates: the
similarity to the nearest positive and the pooled probability. The labelled tiles are a biased
sample (every page was chosen near the positives), so the Platt fit of the similarity expert
sees little contrast and gives it too little weight in the pool; the rank of the raw similarity
keeps it from being outvoted. With the near-duplicate bound of :mod:`hitl.acquisition` at 0.9999,
the fused order found more rings than the pooled order with the bound at 0.985 in every round
from round 3 on, in the ring pool and both of its halves (replay of the engine's rounds on the
pools' embeddings, 20 seed draws), and about as many lenses (0.5-1 fewer in
rounds 3-5, 1.5 more by round 10). The probability stays the pooled one: it is what saved
searches threshold and what the uncertainty pick reads.

Retrieval (:meth:`Learner.directions`) asks the HNSW index around the positives (the first
:data:`ANCHORS` positives, the seeds the engine puts first, always, then the newest others): the
learner ranks the neighbourhood of what the scientist marked good, where it has evidence, rather
than searching along its weight vector, whose nearest tiles are exactly its extrapolated top scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

#: inverse regularisation of the logistic learner. Unit-norm 256-d features have components of
#: ~0.06, so sklearn's default C=1 shrinks every weight to near zero; 10 lets a dozen labels speak.
DEFAULT_C = 10.0
#: most positives used as retrieval queries per round (the anchors, then the newest ones)
MAX_POSITIVE_QUERIES = 8
#: leading positives that always query (the engine passes the session's seeds first)
ANCHORS = 3
#: weight of the logistic expert's log-odds in the pool (the similarity expert has the rest)
LOGISTIC_WEIGHT = 0.5


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks of ``v`` scaled to [0, 1] (ties share their mean rank)."""
    from scipy.stats import rankdata

    return (rankdata(v) - 1.0) / max(1, len(v) - 1)


@dataclass(frozen=True)
class Learner:
    """A fitted learner: ``similarity`` (positives only) or ``logistic`` (the pool of two experts).

    Attributes
    ----------
    kind
        ``similarity`` or ``logistic``.
    positives
        Unit (P, D) positive embeddings (the retrieval queries; the similarity scorer's anchors).
    coef, intercept
        The logistic model (``coef`` is None for a similarity learner).
    sim_scale, sim_offset
        The similarity expert's log-odds, ``sim_scale * cos + sim_offset`` (``sim_scale`` >= 0).
    weight
        Weight of the logistic expert in the pool.
    n_pos, n_neg
        Labels it was fitted on.
    anchors
        Leading positives that are always retrieval queries.
    """

    kind: Literal["similarity", "logistic"]
    positives: np.ndarray
    coef: np.ndarray | None = None
    intercept: float = 0.0
    sim_scale: float = 0.0
    sim_offset: float = 0.0
    weight: float = LOGISTIC_WEIGHT
    n_pos: int = 0
    n_neg: int = 0
    anchors: int = ANCHORS

    def score(self, x: np.ndarray) -> np.ndarray:
        """Scores in [0, 1] of (N, D) embeddings.

        ``logistic``: the pooled probability of "good", ``sigmoid(w * z_logistic + (1 - w) *
        z_similarity)``; ``similarity``: ``(1 + cos) / 2`` to the nearest positive.
        """
        x = np.asarray(x, dtype=np.float32)
        if len(x) == 0:
            return np.zeros(0, np.float32)
        if len(self.positives) == 0:
            return np.full(len(x), 0.5, np.float32)
        nearest = (_unit(x) @ self.positives.T).max(axis=1)
        if self.kind == "logistic":
            assert self.coef is not None
            z_log = _unit(x) @ self.coef + self.intercept
            z_sim = self.sim_scale * nearest + self.sim_offset
            z = self.weight * z_log + (1.0 - self.weight) * z_sim
            return (1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))).astype(np.float32)
        return ((1.0 + nearest) / 2.0).astype(np.float32)

    def priority(self, x: np.ndarray) -> np.ndarray:
        """The order in which a round ranks (N, D) candidates: higher first, values in [0, 1].

        A similarity learner ranks by its score. A pooled learner ranks by the mean of two
        ranks among the candidates (rank fusion): the similarity to the nearest positive, and the
        pooled probability of :meth:`score`. See the module docstring for why.
        """
        s = self.score(x)
        if self.kind != "logistic" or len(s) < 2:
            return s
        nearest = (_unit(np.asarray(x, np.float32)) @ self.positives.T).max(axis=1)
        return ((_ranks(nearest) + _ranks(s)) / 2.0).astype(np.float32)

    def directions(self) -> np.ndarray:
        """Unit query vectors for candidate retrieval: the anchors (seeds), then the newest positives.

        At most :data:`MAX_POSITIVE_QUERIES`; see the module docstring for why the weight vector
        is not one of them.
        """
        anchors = self.positives[: min(self.anchors, MAX_POSITIVE_QUERIES)]
        rest = self.positives[len(anchors) :]
        room = MAX_POSITIVE_QUERIES - len(anchors)
        queries = np.concatenate([anchors, rest[len(rest) - room :] if room > 0 else rest[:0]])
        return np.asarray(queries, dtype=np.float32).reshape(len(queries), self.positives.shape[1])

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe state (stored in ``saved_searches.learner``)."""
        return {
            "kind": self.kind,
            "positives": np.round(self.positives, 6).tolist(),
            "coef": None if self.coef is None else np.round(self.coef, 8).tolist(),
            "intercept": float(self.intercept),
            "sim_scale": float(self.sim_scale),
            "sim_offset": float(self.sim_offset),
            "weight": float(self.weight),
            "n_pos": self.n_pos,
            "n_neg": self.n_neg,
            "anchors": self.anchors,
        }

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> Learner:
        """The learner :meth:`to_json` stored.

        Raises
        ------
        ValueError
            If the state is not a learner's.
        """
        try:
            kind = state["kind"]
            if kind not in ("similarity", "logistic"):
                raise ValueError(f"unknown learner kind {kind!r}")
            coef = None if state.get("coef") is None else np.asarray(state["coef"], np.float32)
            return cls(
                kind=kind,
                positives=np.asarray(state["positives"], np.float32),
                coef=coef,
                intercept=float(state.get("intercept", 0.0)),
                # states stored before the pool were the logistic expert alone
                sim_scale=float(state.get("sim_scale", 0.0)),
                sim_offset=float(state.get("sim_offset", 0.0)),
                weight=float(state.get("weight", 1.0)),
                n_pos=int(state.get("n_pos", 0)),
                n_neg=int(state.get("n_neg", 0)),
                anchors=int(state.get("anchors", ANCHORS)),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a learner state: {exc}") from exc


def similarity_expert(
    positives: np.ndarray, negatives: np.ndarray, *, c: float = DEFAULT_C
) -> tuple[float, float]:
    """Platt scaling of the similarity to the nearest positive: ``(scale, offset)`` of its log-odds.

    Each positive's similarity is to the nearest *other* positive (leave-one-out), each negative's
    to the nearest positive; a class-balanced one-feature logistic regression maps it to log-odds.
    A negative slope (negatives nearer the positives than the positives are to each other) is
    clamped to an uninformative ``(0, 0)``.

    Parameters
    ----------
    positives, negatives
        Unit (P, D) and (N, D) embeddings, P >= 2 and N >= 1 (else ``(0, 0)``).
    c
        Inverse regularisation of the one-feature fit.
    """
    from sklearn.linear_model import LogisticRegression

    if len(positives) < 2 or len(negatives) == 0:
        return 0.0, 0.0
    pp = positives @ positives.T
    np.fill_diagonal(pp, -np.inf)
    s = np.r_[pp.max(axis=1), (negatives @ positives.T).max(axis=1)][:, None]
    y = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=1000).fit(s, y)
    scale = float(model.coef_[0, 0])
    if scale <= 0:
        return 0.0, 0.0
    return scale, float(model.intercept_[0])


def fit(
    positives: np.ndarray,
    negatives: np.ndarray,
    *,
    c: float = DEFAULT_C,
    weight: float = LOGISTIC_WEIGHT,
    anchors: int = ANCHORS,
) -> Learner:
    """Fit the round's learner on labelled embeddings.

    Parameters
    ----------
    positives, negatives
        (P, D) and (N, D) embeddings of good and bad tiles (seeds count as good).
    c
        Inverse regularisation of the logistic regression.
    weight
        Weight of the logistic expert's log-odds in the pool (1: logistic alone).
    anchors
        Leading positives that always query (the seeds, which the engine passes first).

    Returns
    -------
    Learner
        Similarity-only while there are no negatives (or no positives to contrast them with),
        else the pool of the logistic and similarity experts.

    Raises
    ------
    ValueError
        If ``weight`` is outside [0, 1].
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight {weight} is outside [0, 1]")
    from sklearn.linear_model import LogisticRegression

    pos = _unit(np.asarray(positives, np.float32))  # (P, D), P may be 0
    neg = np.asarray(negatives, np.float32)
    if len(pos) == 0 or len(neg) == 0:
        return Learner("similarity", pos, n_pos=len(pos), n_neg=len(neg), anchors=anchors)
    neg = _unit(neg.reshape(len(neg), pos.shape[1]))
    x = np.concatenate([pos, neg])
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=1000)
    model.fit(x, y)
    scale, offset = similarity_expert(pos, neg, c=c)
    return Learner(
        "logistic",
        pos,
        coef=model.coef_[0].astype(np.float32),
        intercept=float(model.intercept_[0]),
        sim_scale=scale,
        sim_offset=offset,
        weight=weight,
        n_pos=len(pos),
        n_neg=len(neg),
        anchors=anchors,
    )
