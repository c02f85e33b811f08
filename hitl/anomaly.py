"""A seedless start: how unusual a tile is under the LVM embedding.

An isolation forest is fitted on a random sample of one model version's embeddings (at most
:data:`SAMPLE` rows, so the cost does not grow with the table) and ranks that sample: the tiles
it isolates in the fewest splits come first. A scientist with no example of what they want
starts from these and labels what catches their eye.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import numpy as np
from sqlalchemy import Engine

from db import hitl as store

#: embeddings the forest is fitted on and ranks
SAMPLE = 20_000


def scores(x: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Anomaly scores of (N, D) embeddings, higher = more unusual (isolation forest, 200 trees)."""
    from sklearn.ensemble import IsolationForest

    if len(x) == 0:
        return np.zeros(0, np.float32)
    forest = IsolationForest(n_estimators=200, random_state=seed).fit(x)
    return (-forest.score_samples(x)).astype(np.float32)


def rank(
    engine: Engine, model_version: str, *, k: int, exclude: Sequence[uuid.UUID] = (), dim: int, seed: int = 0
) -> list[tuple[uuid.UUID, float]]:
    """The ``k`` most anomalous tiles of a sample of ``model_version``'s embeddings, with scores."""
    sample = store.sample_embeddings(engine, model_version, n=SAMPLE, dim=dim, exclude=exclude)
    s = scores(sample.embeddings, seed=seed)
    top = np.argsort(-s, kind="stable")[:k]
    return [(sample.tile_ids[i], float(s[i])) for i in top]
