"""The light learner fitted in every HITL round, and its serialisable state.

While a session has no negative labels the learner is similarity-only: a tile scores by its
cosine similarity to the nearest positive, mapped to [0, 1]. Once there are negatives it is a
class-balanced logistic regression on the (L2-normalised) embeddings, so a handful of positives
among many negatives still pull the boundary. Both expose :meth:`Learner.directions`, the query
vectors candidate retrieval asks the HNSW index about; for a linear model on unit vectors the
tiles nearest (cosine) to the weight vector are exactly its top scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

#: inverse regularisation of the logistic learner. Unit-norm 256-d features have components of
#: ~0.06, so sklearn's default C=1 shrinks every weight to near zero; 10 lets a dozen labels speak.
DEFAULT_C = 10.0
#: most positives used as retrieval queries per round (the newest ones; the seeds always count)
MAX_POSITIVE_QUERIES = 8


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class Learner:
    """A fitted learner: ``similarity`` (positives only) or ``logistic``.

    Attributes
    ----------
    kind
        ``similarity`` or ``logistic``.
    positives
        Unit (P, D) positive embeddings (the retrieval queries; the similarity scorer's anchors).
    coef, intercept
        The logistic model (``coef`` is None for a similarity learner).
    n_pos, n_neg
        Labels it was fitted on.
    """

    kind: Literal["similarity", "logistic"]
    positives: np.ndarray
    coef: np.ndarray | None = None
    intercept: float = 0.0
    n_pos: int = 0
    n_neg: int = 0

    def score(self, x: np.ndarray) -> np.ndarray:
        """Scores in [0, 1] of (N, D) embeddings: probability of "good" (logistic) or (1 + cos) / 2."""
        x = np.asarray(x, dtype=np.float32)
        if len(x) == 0:
            return np.zeros(0, np.float32)
        if self.kind == "logistic":
            assert self.coef is not None
            z = x @ self.coef + self.intercept
            return (1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))).astype(np.float32)
        if len(self.positives) == 0:
            return np.full(len(x), 0.5, np.float32)
        sims = _unit(x) @ self.positives.T
        return ((1.0 + sims.max(axis=1)) / 2.0).astype(np.float32)

    def directions(self) -> np.ndarray:
        """Unit query vectors for candidate retrieval: the weight vector first, then positives."""
        queries = [] if self.coef is None else [_unit(self.coef)]
        queries.extend(self.positives[-MAX_POSITIVE_QUERIES:])
        return np.asarray(queries, dtype=np.float32).reshape(len(queries), self.positives.shape[1])

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe state (stored in ``saved_searches.learner``)."""
        return {
            "kind": self.kind,
            "positives": np.round(self.positives, 6).tolist(),
            "coef": None if self.coef is None else np.round(self.coef, 8).tolist(),
            "intercept": float(self.intercept),
            "n_pos": self.n_pos,
            "n_neg": self.n_neg,
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
                n_pos=int(state.get("n_pos", 0)),
                n_neg=int(state.get("n_neg", 0)),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a learner state: {exc}") from exc


def fit(positives: np.ndarray, negatives: np.ndarray, *, c: float = DEFAULT_C) -> Learner:
    """Fit the round's learner on labelled embeddings.

    Parameters
    ----------
    positives, negatives
        (P, D) and (N, D) embeddings of good and bad tiles (seeds count as good).
    c
        Inverse regularisation of the logistic regression.

    Returns
    -------
    Learner
        Similarity-only while there are no negatives (or no positives to contrast them with),
        else a class-balanced logistic regression.
    """
    from sklearn.linear_model import LogisticRegression

    pos = _unit(np.asarray(positives, np.float32))  # (P, D), P may be 0
    neg = np.asarray(negatives, np.float32)
    if len(pos) == 0 or len(neg) == 0:
        return Learner("similarity", pos, n_pos=len(pos), n_neg=len(neg))
    neg = _unit(neg.reshape(len(neg), pos.shape[1]))
    x = np.concatenate([pos, neg])
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=1000)
    model.fit(x, y)
    return Learner(
        "logistic",
        pos,
        coef=model.coef_[0].astype(np.float32),
        intercept=float(model.intercept_[0]),
        n_pos=len(pos),
        n_neg=len(neg),
    )
