"""Which K candidates a round shows, and why (the acquisition strategy).

The page mixes three strategies; each shown tile records the one that chose it:

``exploit``
    the highest scores: what the scientist most likely wants (most of the page);
``uncertain``
    the scores nearest the learner's decision boundary (0.5), whose labels teach the learner
    most; only once the learner has negatives to draw a boundary with;
``diverse``
    among the better-scoring half of what is left, the tile farthest (cosine) from everything
    already on the page: it keeps the search from tunnelling into one corner of the embedding.

No two tiles on a page are near-duplicates (cosine similarity above ``duplicate_cosine``): the
same galaxy in two overlapping cutouts costs the scientist a click and teaches nothing. The bound
is for *the same* image or object, not for look-alikes: under the shipped ``lvm_tiny`` 144 of the
153 rings of ``hitl_ring_pool`` have a different galaxy above cosine 0.985 (the old bound, which
cost about a ring per round), while 2 pairs per pool exceed 0.9999.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STRATEGIES = ("exploit", "uncertain", "diverse")


@dataclass(frozen=True)
class Acquisition:
    """Shares of the page per strategy (exploitation takes the rest) and the near-duplicate bound."""

    uncertain: float = 1 / 12
    diverse: float = 1 / 12
    duplicate_cosine: float = 0.9999

    def __post_init__(self) -> None:
        if min(self.uncertain, self.diverse) < 0 or self.uncertain + self.diverse > 1:
            raise ValueError("uncertain and diverse shares must be >= 0 and sum to <= 1")

    def counts(self, k: int, *, has_boundary: bool) -> dict[str, int]:
        """Tiles per strategy on a page of ``k`` (at least one exploit pick when k >= 1)."""
        unc = round(self.uncertain * k) if has_boundary else 0
        div = round(self.diverse * k)
        while unc + div > max(0, k - 1):
            if div >= unc and div > 0:
                div -= 1
            else:
                unc -= 1
        return {"exploit": k - unc - div, "uncertain": unc, "diverse": div}


@dataclass(frozen=True)
class Pick:
    """A chosen candidate: its index into the candidate arrays and the strategy that chose it."""

    index: int
    strategy: str


def select(
    vectors: np.ndarray,
    scores: np.ndarray,
    k: int,
    *,
    policy: Acquisition,
    has_boundary: bool,
    priority: np.ndarray | None = None,
) -> list[Pick]:
    """Choose up to ``k`` of the candidates, in display order (exploit, then uncertain, then diverse).

    Parameters
    ----------
    vectors
        Unit (N, D) candidate embeddings.
    scores
        (N,) learner scores in [0, 1].
    k
        Page size.
    policy
        Shares and the near-duplicate bound.
    has_boundary
        Whether the learner has a decision boundary (negatives); without one no tile is picked
        for uncertainty.
    priority
        (N,) order of exploitation and of the diverse pick's better half, higher first
        (:meth:`hitl.learner.Learner.priority`); None: ``scores``. Uncertainty always reads
        ``scores``, the probabilities.

    Returns
    -------
    list of Pick
        At most ``k`` picks; fewer only when fewer non-duplicate candidates exist.
    """
    n = len(scores)
    if n == 0 or k <= 0:
        return []
    sims = vectors @ vectors.T
    taken = np.zeros(n, bool)
    picks: list[Pick] = []

    def ok(i: int) -> bool:
        if taken[i]:
            return False
        chosen = [p.index for p in picks]
        return not chosen or float(sims[i, chosen].max()) < policy.duplicate_cosine

    def take(order: np.ndarray, m: int, strategy: str) -> None:
        for i in order:
            if m <= 0:
                return
            if ok(int(i)):
                taken[i] = True
                picks.append(Pick(int(i), strategy))
                m -= 1

    want = policy.counts(k, has_boundary=has_boundary)
    by_score = np.argsort(-(scores if priority is None else priority), kind="stable")
    take(by_score, want["exploit"], "exploit")
    if want["uncertain"]:
        take(np.argsort(np.abs(scores - 0.5), kind="stable"), want["uncertain"], "uncertain")
    for _ in range(want["diverse"]):
        rest = [int(i) for i in by_score if not taken[i]]
        pool = [i for i in rest[: max(1, len(rest) // 2)] if ok(i)]
        if not pool:
            break
        chosen = [p.index for p in picks]
        far = pool[int(np.argmin(sims[np.ix_(pool, chosen)].max(axis=1)))] if chosen else pool[0]
        taken[far] = True
        picks.append(Pick(far, "diverse"))
    if len(picks) < k:  # a strategy ran dry (duplicates, few candidates): fill by score
        take(by_score, k - len(picks), "exploit")
    return picks
