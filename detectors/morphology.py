"""Morphology heads on the LVM embedding: trained from the database, calibrated, versioned.

One light head per task on the 256-d embedding of one encoder model version:

* a **multi-class task** (the paper's five Galaxy Zoo DECaLS classes: smooth round, smooth cigar,
  edge-on, spiral, merger/irregular; label set ``gz_decals_morphology``) gives one probability
  per class, summing to 1;
* a **binary task** (featured/disk, edge-on disk, spiral arms, ring) gives the probability of
  the feature.

A head is standardisation + class-balanced logistic regression (scikit-learn), so a rare class
is not ignored; balancing shifts the raw probabilities away from the class frequencies, which
the **calibration** takes back: per class a monotone map (Platt's sigmoid, or isotonic) fitted
on out-of-fold scores of the training part (k-fold cross-fitting, as scikit-learn's
``CalibratedClassifierCV(ensemble=False)``; a multi-class task is calibrated one-vs-rest and
renormalised). A stratified **held-out part** that neither the head nor its calibration saw
measures AUC (per class and macro), the expected calibration error (ECE, 10 equal-width bins)
and the Brier score before and after calibration, and feeds a reliability plot.

Classes with fewer than ``min_per_class`` labelled images are left out of a task (recorded in
the card), and a task with fewer than two classes left is skipped: a head is only as good as the
labels in the database, and retraining as scientists save labels is the way to add classes.

The artifact is not a pickle: ``<name>.json`` holds the coefficients, standardisation and
calibration maps as JSON numbers (written deterministically, so the same training gives the same
bytes), ``<name>.card.json`` the card (tasks, classes, encoder model version, held-out metrics,
training label counts, configuration). The model version is ``morphology-heads-<sha256[:10]>``
of the weights file and is registered in ``model_versions``; every detection row the detector
service writes names it (detector ``morphology``, label = class or feature name).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from db.models import ModelVersionPublic
    from galsift.settings import Settings

log = logging.getLogger(__name__)

#: the ``detections.detector`` of every morphology score
DETECTOR = "morphology"
#: ``model_versions.variant`` of the heads; versions are ``<VARIANT>-<sha256[:10]>``
VARIANT = "morphology-heads"
#: format tag of the weights file
FORMAT = "galsift-morphology-heads/1"
#: task name -> label set read from the database by default (missing sets are skipped)
DEFAULT_TASKS: Mapping[str, str] = {
    "morphology": "gz_decals_morphology",
    "featured": "gz_decals_featured",
    "edge_on_disk": "gz_decals_edge_on",
    "spiral_arms": "gz_decals_spiral_arms",
    "ring": "gz_decals_ring",
}
#: inverse regularisation of the logistic heads on standardised features: fixed, and the same as
#: the few-shot evaluation's head (encoder.evaluate.HEAD_C)
DEFAULT_C = 0.1
#: values tried when ``c`` is None ("auto"): the one with the best out-of-fold AUC on the training
#: part is taken (ties: the stronger regularisation). On a few hundred labels the differences are
#: within their noise, hence not the default.
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
#: share of each class held out for the metrics
DEFAULT_HOLDOUT = 0.25
#: classes with fewer labelled images are left out of a task
MIN_PER_CLASS = 3
#: most folds of the cross-fitting that produces the calibration scores
MAX_FOLDS = 5
#: bins of the ECE and the reliability plot
ECE_BINS = 10
#: the shipped heads (trained on the shipped encoder's embeddings, see the README)
SHIPPED_HEADS = Path(__file__).resolve().parent / "checkpoints" / "morphology_heads.json"

Calibration = Literal["sigmoid", "isotonic"]


class MorphologyError(ValueError):
    """Labels, options or an artifact with which the heads cannot be trained or used."""


class HeadScores(NamedTuple):
    """One label's calibrated probabilities for a batch: what a ``detections`` row stores."""

    #: ``detections.detector``
    detector: str
    #: ``detections.label``: a class of a multi-class task, or a binary task's name
    label: str
    #: (N,) calibrated probabilities in [0, 1]
    probability: np.ndarray


# -- calibration maps ------------------------------------------------------------------------------
def fit_platt(scores: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Platt's sigmoid ``p = 1 / (1 + exp(-(a * s + b)))`` fitted to binary ``y``, with ``a >= 0``.

    Uses Platt's smoothed targets ((N+ + 1) / (N+ + 2) and 1 / (N- + 2)), which keep a few
    examples from giving probabilities of exactly 0 or 1; ``a >= 0`` keeps the map increasing
    (a head that ranks worse than chance on the fitting scores gets a constant).

    Returns
    -------
    tuple
        ``(a, b)``.
    """
    from scipy.optimize import minimize

    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(y, dtype=np.float64)
    n_pos, n_neg = float(t.sum()), float(len(t) - t.sum())
    target = np.where(t > 0.5, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    scale = float(np.std(s)) or 1.0

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = w[0] * s / scale + w[1]
        # log(1 + exp(z)) - target * z, and its gradient, computed stably
        lse = np.logaddexp(0.0, z)
        p = np.exp(z - lse)
        g = p - target
        return float(np.sum(lse - target * z)), np.array([np.sum(g * s / scale), np.sum(g)])

    prior = math.log((n_pos + 1.0) / (n_neg + 1.0))
    res = minimize(
        loss, x0=np.array([1.0, prior]), jac=True, method="L-BFGS-B", bounds=[(0.0, None), (None, None)]
    )
    return float(res.x[0] / scale), float(res.x[1])


def fit_isotonic(scores: np.ndarray, y: np.ndarray) -> tuple[list[float], list[float]]:
    """A non-decreasing step map of scores to frequencies (scikit-learn's isotonic regression).

    Returns
    -------
    tuple
        ``(x, y)`` knots; the map interpolates linearly between them and is constant outside.
    """
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip", increasing=True)
    iso.fit(np.asarray(scores, dtype=np.float64), np.asarray(y, dtype=np.float64))
    return [float(v) for v in iso.X_thresholds_], [float(v) for v in iso.y_thresholds_]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


# -- one head ----------------------------------------------------------------------------------------
@dataclass
class Head:
    """One task's head: standardisation, linear scores, calibration maps.

    Attributes
    ----------
    task
        Task name (a binary task's detection label).
    label_set
        The label set it was trained on.
    kind
        ``binary`` or ``multiclass``.
    classes
        Class names; for a binary task ``["0", "1"]``.
    mean, scale
        Standardisation of the embedding, (D,).
    coef, intercept
        Linear scores ``z = ((x - mean) / scale) @ coef.T + intercept``: (1, D) and (1,) for a
        binary task (score of class 1), (K, D) and (K,) for K classes.
    calibration
        ``{"method": "sigmoid", "a": [...], "b": [...]}`` or ``{"method": "isotonic", "x":
        [[...]], "y": [[...]]}``, one map per score column.
    """

    task: str
    label_set: str
    kind: str
    classes: list[str]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    calibration: dict[str, Any]

    @property
    def labels(self) -> list[str]:
        """Detection labels this head writes."""
        return [self.task] if self.kind == "binary" else list(self.classes)

    def decision(self, x: np.ndarray) -> np.ndarray:
        """Linear scores, (N, 1) for a binary task, (N, K) otherwise."""
        z = ((np.asarray(x, dtype=np.float64) - self.mean) / self.scale) @ self.coef.T + self.intercept
        return np.asarray(z)

    def raw_probability(self, x: np.ndarray) -> np.ndarray:
        """Uncalibrated probabilities of the balanced head: (N,) of class 1, or (N, K)."""
        z = self.decision(x)
        return _sigmoid(z[:, 0]) if self.kind == "binary" else _softmax(z)

    def calibrate(self, z: np.ndarray) -> np.ndarray:
        """Calibrated probabilities from linear scores: (N,) of class 1, or (N, K) summing to 1."""
        cols = []
        for j in range(z.shape[1]):
            if self.calibration["method"] == "sigmoid":
                a, b = self.calibration["a"][j], self.calibration["b"][j]
                cols.append(_sigmoid(a * z[:, j] + b))
            else:
                cols.append(np.interp(z[:, j], self.calibration["x"][j], self.calibration["y"][j]))
        p = np.stack(cols, axis=1)
        if self.kind == "binary":
            return np.clip(p[:, 0], 0.0, 1.0)
        total = p.sum(axis=1, keepdims=True)
        # every one-vs-rest map at 0 (isotonic floor): fall back to the uncalibrated head
        fallback = _softmax(z)
        return np.where(total > 0, p / np.where(total > 0, total, 1.0), fallback)

    def probability(self, x: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of embeddings ``x``: (N,) of class 1, or (N, K)."""
        return self.calibrate(self.decision(x))

    def to_json(self) -> dict[str, Any]:
        """The head as JSON numbers."""
        return {
            "task": self.task,
            "label_set": self.label_set,
            "kind": self.kind,
            "classes": list(self.classes),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept.tolist(),
            "calibration": self.calibration,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Head:
        """Rebuild a head from :meth:`to_json` output, checking shapes.

        Raises
        ------
        MorphologyError
            If fields are missing or shapes do not agree.
        """
        try:
            head = cls(
                task=str(obj["task"]),
                label_set=str(obj["label_set"]),
                kind=str(obj["kind"]),
                classes=[str(c) for c in obj["classes"]],
                mean=np.asarray(obj["mean"], dtype=np.float64),
                scale=np.asarray(obj["scale"], dtype=np.float64),
                coef=np.asarray(obj["coef"], dtype=np.float64),
                intercept=np.asarray(obj["intercept"], dtype=np.float64),
                calibration=dict(obj["calibration"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MorphologyError(f"malformed head: {exc}") from exc
        k = 1 if head.kind == "binary" else len(head.classes)
        d = head.mean.shape[0] if head.mean.ndim == 1 else -1
        method = head.calibration.get("method")
        maps = head.calibration.get("a" if method == "sigmoid" else "x", [])
        if (
            head.kind not in ("binary", "multiclass")
            or head.coef.shape != (k, d)
            or head.scale.shape != (d,)
            or head.intercept.shape != (k,)
            or method not in ("sigmoid", "isotonic")
            or len(maps) != k
        ):
            raise MorphologyError(f"head {head.task!r}: inconsistent shapes or calibration")
        return head


def fit_linear(
    x: np.ndarray, y: np.ndarray, *, c: float, columns: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Standardise, then class-balanced logistic regression.

    Parameters
    ----------
    x, y
        Embeddings and class indices.
    c
        Inverse regularisation.
    columns
        Score columns wanted: 1 (a binary task: the score of class 1) or the number of classes K
        (a multi-class task; with K = 2 the single logit is split into ``(-z/2, z/2)``, whose
        softmax is the same probability).

    Returns
    -------
    tuple
        ``(mean, scale, coef, intercept)`` as in :class:`Head`.
    """
    from sklearn.linear_model import LogisticRegression

    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    lr = LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
    lr.fit((x - mean) / scale, y)
    coef = np.asarray(lr.coef_, dtype=np.float64)
    intercept = np.asarray(lr.intercept_, dtype=np.float64)
    if columns == 2 and coef.shape[0] == 1:
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    if coef.shape[0] != columns:
        raise MorphologyError(f"expected {columns} score columns, the head has {coef.shape[0]}")
    return mean, scale, coef, intercept


def _folds(y: np.ndarray, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    """Fold index of every example, each class dealt round-robin after a shuffle (stratified)."""
    fold = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = np.arange(len(idx)) % n_folds
    return fold


def out_of_fold_scores(
    x: np.ndarray, y: np.ndarray, *, c: float, columns: int, n_folds: int, seed: int
) -> np.ndarray:
    """Linear scores (N, ``columns``) of every training example by a head fitted without its fold."""
    rng = np.random.default_rng(seed)
    fold = _folds(y, n_folds, rng)
    out = np.zeros((len(y), columns))
    for f in range(n_folds):
        test = fold == f
        mean, scale, coef, intercept = fit_linear(x[~test], y[~test], c=c, columns=columns)
        out[test] = ((x[test] - mean) / scale) @ coef.T + intercept
    return out


def fit_head(
    task: str,
    label_set: str,
    x: np.ndarray,
    y: np.ndarray,
    classes: Sequence[str],
    *,
    c: float | None = DEFAULT_C,
    calibration: Calibration = "sigmoid",
    seed: int = 0,
) -> Head:
    """Fit one head and its calibration maps on a training part.

    Parameters
    ----------
    task, label_set
        Names recorded in the head.
    x
        (N, D) embeddings.
    y
        (N,) class indices into ``classes`` (0/1 for a binary task); every class needs at least
        two examples (one per calibration fold).
    classes
        Class names: ``["0", "1"]`` makes a binary task (one probability, labelled ``task``),
        anything else a multi-class task (one probability per class, summing to 1).
    c
        Inverse regularisation of the logistic regression; None: the value of :data:`C_GRID`
        with the best out-of-fold AUC (mean one-vs-rest AUC for a multi-class task).
    calibration
        ``sigmoid`` (Platt) or ``isotonic``.
    seed
        Seed of the calibration folds.

    Raises
    ------
    MorphologyError
        If a class is missing or has a single example, or ``calibration`` is unknown.

    Notes
    -----
    The calibration maps are fitted on the out-of-fold scores of the chosen ``c``, the same
    folds that chose it; the held-out part of :func:`train_heads` never takes part in either.
    """
    counts = np.bincount(y, minlength=len(classes))
    if len(classes) < 2 or counts.min() < 2:
        raise MorphologyError(f"{task}: need >= 2 classes with >= 2 examples each, got {counts.tolist()}")
    if calibration not in ("sigmoid", "isotonic"):
        raise MorphologyError(f"unknown calibration {calibration!r}")
    kind = "binary" if list(classes) == ["0", "1"] else "multiclass"
    columns = 1 if kind == "binary" else len(classes)
    folds = int(min(MAX_FOLDS, counts.min()))
    targets = [y == 1] if kind == "binary" else [y == j for j in range(len(classes))]
    tried: dict[float, float] = {}
    best: tuple[float, np.ndarray] | None = None
    for value in C_GRID if c is None else (c,):
        scores = out_of_fold_scores(x, y, c=value, columns=columns, n_folds=folds, seed=seed)
        tried[value] = float(
            np.mean([_auc(t.astype(np.float64), scores[:, j]) or 0.5 for j, t in enumerate(targets)])
        )
        if best is None or tried[value] > tried[best[0]] + 1e-9:
            best = (value, scores)
    if best is None:  # pragma: no cover - the loop runs at least once
        raise MorphologyError("no regularisation tried")
    chosen, oof = best
    mean, scale, coef, intercept = fit_linear(x, y, c=chosen, columns=columns)
    if calibration == "sigmoid":
        fits = [fit_platt(oof[:, j], t) for j, t in enumerate(targets)]
        cal: dict[str, Any] = {"method": "sigmoid", "a": [a for a, _ in fits], "b": [b for _, b in fits]}
    else:
        knots = [fit_isotonic(oof[:, j], t) for j, t in enumerate(targets)]
        cal = {"method": "isotonic", "x": [k[0] for k in knots], "y": [k[1] for k in knots]}
    cal["folds"] = folds
    cal["C"] = chosen
    cal["oof_auc_by_C"] = {f"{k:g}": round(v, 4) for k, v in tried.items()}
    return Head(
        task=task,
        label_set=label_set,
        kind=kind,
        classes=[str(v) for v in classes],
        mean=mean,
        scale=scale,
        coef=coef,
        intercept=intercept,
        calibration=cal,
    )


# -- metrics -----------------------------------------------------------------------------------------
def expected_calibration_error(p: np.ndarray, y: np.ndarray, *, bins: int = ECE_BINS) -> float:
    """ECE of binary probabilities: bin-weighted |mean probability - observed frequency|, equal-width bins."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(p) == 0:
        return float("nan")
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.sum() * abs(p[m].mean() - y[m].mean())
    return float(total / len(p))


def reliability_curve(p: np.ndarray, y: np.ndarray, *, bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Per non-empty bin: mean probability, observed frequency and count (for the plot)."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    out: dict[str, list[float]] = {"mean_probability": [], "observed": [], "count": []}
    for b in range(bins):
        m = which == b
        if m.any():
            out["mean_probability"].append(float(p[m].mean()))
            out["observed"].append(float(y[m].mean()))
            out["count"].append(float(m.sum()))
    return out


def _auc(y: np.ndarray, s: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, s))


def heldout_metrics(head: Head, x: np.ndarray, y: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics of a head on held-out examples, and the reliability curves behind them.

    For a binary task: AUC of the calibrated probability, ECE and Brier score of the raw and the
    calibrated probability. For a multi-class task: per-class one-vs-rest AUC and their mean
    (``macro_auc``), the class-wise ECE (mean over classes of the one-vs-rest ECE) and the
    multi-class Brier score, raw and calibrated.

    Returns
    -------
    tuple
        ``(metrics, curves)``; ``curves`` has ``raw`` and ``calibrated`` reliability curves
        (class-wise pooled for a multi-class task).
    """
    raw = head.raw_probability(x)
    cal = head.probability(x)
    if head.kind == "binary":
        ind = (y == 1).astype(np.float64)
        metrics: dict[str, Any] = {
            "n": len(y),
            "positives": int(ind.sum()),
            "auc": _auc(ind, cal),
            "ece_raw": expected_calibration_error(raw, ind),
            "ece_calibrated": expected_calibration_error(cal, ind),
            "brier_raw": float(np.mean((raw - ind) ** 2)),
            "brier_calibrated": float(np.mean((cal - ind) ** 2)),
        }
        flat_raw, flat_cal, flat_y = raw, cal, ind
    else:
        k = len(head.classes)
        onehot = np.eye(k)[y]
        per_class = {c: _auc(onehot[:, j], cal[:, j]) for j, c in enumerate(head.classes)}
        known = [v for v in per_class.values() if v is not None]
        metrics = {
            "n": len(y),
            "class_counts": {c: int(onehot[:, j].sum()) for j, c in enumerate(head.classes)},
            "auc": per_class,
            "macro_auc": float(np.mean(known)) if known else None,
            "ece_raw": float(
                np.mean([expected_calibration_error(raw[:, j], onehot[:, j]) for j in range(k)])
            ),
            "ece_calibrated": float(
                np.mean([expected_calibration_error(cal[:, j], onehot[:, j]) for j in range(k)])
            ),
            "brier_raw": float(np.mean(np.sum((raw - onehot) ** 2, axis=1))),
            "brier_calibrated": float(np.mean(np.sum((cal - onehot) ** 2, axis=1))),
        }
        flat_raw, flat_cal, flat_y = raw.ravel(), cal.ravel(), onehot.ravel()
    curves = {"raw": reliability_curve(flat_raw, flat_y), "calibrated": reliability_curve(flat_cal, flat_y)}
    return metrics, curves


# -- training data -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskData:
    """One task's labelled embeddings.

    Attributes
    ----------
    task, label_set
        Task name and the label set it reads.
    classes
        Class names, indexed by ``y``; ``["0", "1"]`` for a binary task.
    x
        (N, D) embeddings.
    y
        (N,) class indices.
    tile_ids
        The labelled tiles (empty when the data did not come from the database).
    """

    task: str
    label_set: str
    classes: list[str]
    x: np.ndarray
    y: np.ndarray
    tile_ids: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """``binary`` or ``multiclass``."""
        return "binary" if len(self.classes) == 2 and self.classes == ["0", "1"] else "multiclass"

    def counts(self) -> dict[str, int]:
        """Labelled examples per class name."""
        n = np.bincount(self.y, minlength=len(self.classes))
        return {c: int(v) for c, v in zip(self.classes, n, strict=True)}


def keep_classes(data: TaskData, *, min_per_class: int) -> tuple[TaskData | None, dict[str, int]]:
    """Leave out classes with fewer than ``min_per_class`` examples.

    Returns
    -------
    tuple
        ``(data or None, dropped)``: None when fewer than two classes are left; ``dropped`` maps
        each left-out class to its count. A binary task keeps its ``["0", "1"]`` coding.
    """
    counts = data.counts()
    dropped = {c: n for c, n in counts.items() if n < min_per_class}
    kept = [c for c in data.classes if c not in dropped]
    if len(kept) < 2:
        return None, dropped
    if not dropped:
        return data, {}
    old = [data.classes.index(c) for c in kept]
    remap = {o: i for i, o in enumerate(old)}
    mask = np.isin(data.y, old)
    y = np.asarray([remap[int(v)] for v in data.y[mask]], dtype=np.int64)
    ids = [t for t, m in zip(data.tile_ids, mask, strict=False) if m] if data.tile_ids else []
    return TaskData(data.task, data.label_set, kept, data.x[mask], y, ids), dropped


def holdout_split(y: np.ndarray, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: about ``fraction`` of each class (at least 1, leaving at least 2) held out.

    Returns
    -------
    tuple
        ``(train, heldout)`` sorted indices.
    """
    if not 0.0 < fraction < 1.0:
        raise MorphologyError(f"holdout fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n = min(max(1, round(fraction * len(idx))), len(idx) - 2)
        held.extend(idx[: max(0, n)].tolist())
    heldout = np.sort(np.asarray(held, dtype=np.int64))
    train = np.setdiff1d(np.arange(len(y)), heldout)
    return train, heldout


def serving_encoder_version(settings: Settings) -> str:
    """The model version the encoder service registers for the configured checkpoint.

    The same name as the encoder's ``model_version_for``: the card's ``version``, else
    ``<variant>-<sha256[:10]>`` of the weights.
    """
    from encoder.checkpoint import file_sha256, read_card

    path = settings.model_checkpoint or (
        Path(__file__).resolve().parents[1] / "encoder" / "checkpoints" / "lvm_tiny.safetensors"
    )
    card = read_card(Path(path))
    return str(card.get("version") or f"{card['variant']}-{file_sha256(Path(path))[:10]}")


def load_task(engine: Engine, task: str, label_set: str, *, encoder_version: str) -> TaskData | None:
    """A task's labels joined to the embeddings of ``encoder_version``; None if it has none.

    The label set's declaration (``label_sets``) gives the classes: ``classes`` sets use their
    class names, ``integer`` sets their codes as names, binary sets (and undeclared ones, such as
    saved HITL searches) ``["0", "1"]``.
    """
    from db import labels as dblabels

    declared = dblabels.get_label_set(engine, label_set)
    data = dblabels.labelled_embeddings(engine, label_set=label_set, model_version=encoder_version)
    if len(data) == 0:
        return None
    if declared is None or declared.kind == "binary":
        classes = ["0", "1"]
        y = data.values
        if not set(np.unique(y).tolist()) <= {0, 1}:
            raise MorphologyError(
                f"label set {label_set!r} is binary but has values {sorted(set(y.tolist()))}"
            )
    elif declared.kind == "classes":
        classes = list(declared.classes)
        y = data.values
        if y.min() < 0 or y.max() >= len(classes):
            raise MorphologyError(f"label set {label_set!r}: values outside its {len(classes)} classes")
    else:  # integer codes: each code one class
        codes = sorted(set(data.values.tolist()))
        classes = [str(v) for v in codes]
        y = np.searchsorted(np.asarray(codes), data.values)
    return TaskData(
        task, label_set, classes, data.embeddings.astype(np.float64), y.astype(np.int64), data.tile_ids
    )


# -- the heads -----------------------------------------------------------------------------------------
class MorphologyHeads:
    """Every task's head for one encoder model version, as one versioned artifact.

    Parameters
    ----------
    heads
        The heads; their detection labels must be unique.
    encoder_version
        The encoder model version whose embeddings they take (score only those).
    dim
        Embedding dimension.
    card
        Documentation and metrics (``<name>.card.json``); not needed to predict.

    Raises
    ------
    MorphologyError
        If two heads would write the same detection label or dimensions disagree.
    """

    def __init__(
        self, heads: Sequence[Head], *, encoder_version: str, dim: int, card: Mapping[str, Any] | None = None
    ) -> None:
        labels = [lab for h in heads for lab in h.labels]
        if len(set(labels)) != len(labels):
            raise MorphologyError(f"detection labels must be unique across tasks, got {labels}")
        if any(h.mean.shape != (dim,) for h in heads):
            raise MorphologyError(f"every head must take {dim}-d embeddings")
        self.heads = list(heads)
        self.encoder_version = encoder_version
        self.dim = dim
        self.card: dict[str, Any] = dict(card or {})
        self._weights = self._weights_bytes()
        #: the registered model version name, ``morphology-heads-<sha256[:10]>`` of the weights
        self.version = f"{VARIANT}-{hashlib.sha256(self._weights).hexdigest()[:10]}"

    @property
    def labels(self) -> list[str]:
        """Every detection label, in prediction order."""
        return [lab for h in self.heads for lab in h.labels]

    @property
    def label_tasks(self) -> dict[str, str]:
        """Detection label -> task name (for ``detections.extra``)."""
        return {lab: h.task for h in self.heads for lab in h.labels}

    @property
    def checksum(self) -> str:
        """sha256 of the weights file's bytes."""
        return hashlib.sha256(self._weights).hexdigest()

    def predict(self, embeddings: np.ndarray) -> list[HeadScores]:
        """Calibrated probabilities of every label for a batch of embeddings.

        Parameters
        ----------
        embeddings
            (N, D) vectors of :attr:`encoder_version` (e.g. rows of ``embeddings``).

        Returns
        -------
        list of HeadScores
            One ``(detector, label, probability (N,))`` per label: a multi-class task's classes
            (summing to 1 per tile), then each binary task's feature.

        Raises
        ------
        MorphologyError
            If ``embeddings`` is not (N, D) or holds NaN or infinity.
        """
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise MorphologyError(f"expected (N, {self.dim}) embeddings, got {x.shape}")
        if not np.isfinite(x).all():
            raise MorphologyError("embeddings contain NaN or infinity")
        out = []
        for h in self.heads:
            p = h.probability(x) if len(x) else np.zeros((0,) if h.kind == "binary" else (0, len(h.classes)))
            if h.kind == "binary":
                out.append(HeadScores(DETECTOR, h.task, p.astype(np.float64)))
            else:
                out.extend(
                    HeadScores(DETECTOR, c, p[:, j].astype(np.float64)) for j, c in enumerate(h.classes)
                )
        return out

    # -- files -------------------------------------------------------------------------------------
    def _weights_bytes(self) -> bytes:
        doc = {
            "format": FORMAT,
            "detector": DETECTOR,
            "encoder_version": self.encoder_version,
            "dim": self.dim,
            "heads": [h.to_json() for h in self.heads],
        }
        return (json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n").encode()

    @staticmethod
    def card_path(path: Path) -> Path:
        """``<name>.card.json`` next to ``<name>.json``."""
        p = Path(path)
        return p.with_name(p.stem + ".card.json")

    def save(self, path: Path) -> Path:
        """Write the weights (``path``) and the card next to it; returns ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        card = {**self.card, "version": self.version, "weights_sha256": self.checksum}
        for target, data in (
            (path, self._weights),
            (self.card_path(path), (json.dumps(card, indent=1, allow_nan=False) + "\n").encode()),
        ):
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        self.card = card
        return path

    @classmethod
    def load(cls, path: Path | str | None = None, *, engine: Engine | None = None) -> MorphologyHeads:
        """Read heads saved by :meth:`save` (the card is read when present and must match).

        Parameters
        ----------
        path
            The weights file; None: the shipped heads (:data:`SHIPPED_HEADS`).
        engine
            When given, the heads' model version is registered (idempotent), so the detection
            rows that name it can be written.

        Raises
        ------
        MorphologyError
            If the file is missing, not this format, inconsistent, or its card names other weights.
        """
        path = SHIPPED_HEADS if path is None else Path(path)
        if not path.is_file():
            raise MorphologyError(f"no morphology heads at {path}")
        raw = path.read_bytes()
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise MorphologyError(f"{path}: not JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise MorphologyError(
                f"{path}: format {doc.get('format') if isinstance(doc, dict) else None!r}, expected {FORMAT!r}"
            )
        card: dict[str, Any] = {}
        cp = cls.card_path(path)
        if cp.is_file():
            card = json.loads(cp.read_text(encoding="utf-8"))
        heads = cls(
            [Head.from_json(h) for h in doc["heads"]],
            encoder_version=str(doc["encoder_version"]),
            dim=int(doc["dim"]),
            card=card,
        )
        if heads._weights != raw:
            raise MorphologyError(f"{path}: not written by MorphologyHeads.save (re-serialisation differs)")
        if card and card.get("weights_sha256") != heads.checksum:
            raise MorphologyError(f"{cp} describes other weights than {path}")
        if engine is not None:
            heads.register(engine, path)
        return heads

    def register(self, engine: Engine, path: Path) -> ModelVersionPublic:
        """Register the saved heads in ``model_versions`` (idempotent for the same weights)."""
        from db import repo
        from db.models import ModelVersionCreate

        return repo.register_model_version(
            engine,
            ModelVersionCreate(
                name=self.version,
                variant=VARIANT,
                checkpoint_uri=Path(path).resolve().as_uri(),
                checksum=self.checksum,
                card={**self.card, "version": self.version},
            ),
        )


# -- training -------------------------------------------------------------------------------------------
@dataclass
class TrainingResult:
    """Heads with what was measured while making them."""

    heads: MorphologyHeads
    metrics: dict[str, dict[str, Any]]
    curves: dict[str, dict[str, Any]]
    notes: list[str]


def train_heads(
    tasks: Sequence[TaskData],
    *,
    encoder_version: str,
    c: float | None = DEFAULT_C,
    holdout: float = DEFAULT_HOLDOUT,
    calibration: Calibration = "sigmoid",
    min_per_class: int = MIN_PER_CLASS,
    seed: int = 0,
    source: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> TrainingResult:
    """Fit, calibrate and measure one head per task; build the card.

    Parameters
    ----------
    tasks
        Labelled embeddings per task (:func:`load_task`), all of ``encoder_version``.
    encoder_version
        The encoder model version of the embeddings.
    c
        Inverse regularisation of the logistic heads; None: chosen per task (see :func:`fit_head`).
    holdout
        Share of each class held out for the metrics.
    calibration
        ``sigmoid`` (Platt; for small label sets) or ``isotonic``.
    min_per_class
        Classes with fewer labelled images are left out (>= 3: one held out, two to cross-fit).
    seed
        Seed of the held-out split and the calibration folds.
    source
        Where the labels came from, for the card.
    progress
        Progress bar over tasks (stderr).

    Raises
    ------
    MorphologyError
        If no task has enough labels.
    """
    import sys

    from tqdm import tqdm

    if min_per_class < 3:
        raise MorphologyError("min_per_class must be >= 3 (one held out, two to cross-fit the calibration)")
    t0 = time.perf_counter()
    heads: list[Head] = []
    metrics: dict[str, dict[str, Any]] = {}
    curves: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    card_tasks: list[dict[str, Any]] = []
    dims = {t.x.shape[1] for t in tasks if len(t.y)}
    if len(dims) > 1:
        raise MorphologyError(f"tasks have embeddings of different dimensions {sorted(dims)}")
    for data in tqdm(tasks, desc="morphology heads", unit="task", disable=not progress, file=sys.stderr):
        counts = data.counts()
        kept, dropped = keep_classes(data, min_per_class=min_per_class)
        if kept is None:
            notes.append(
                f"{data.task}: skipped, fewer than 2 classes with >= {min_per_class} labels {counts}"
            )
            continue
        if dropped:
            notes.append(
                f"{data.task}: left out class(es) with < {min_per_class} labels: "
                + ", ".join(f"{c} ({n})" for c, n in dropped.items())
            )
        train, held = holdout_split(kept.y, fraction=holdout, seed=seed)
        head = fit_head(
            kept.task,
            kept.label_set,
            kept.x[train],
            kept.y[train],
            kept.classes,
            c=c,
            calibration=calibration,
            seed=seed,
        )
        m, cv = heldout_metrics(head, kept.x[held], kept.y[held])
        heads.append(head)
        metrics[kept.task] = m
        curves[kept.task] = cv
        card_tasks.append(
            {
                "task": kept.task,
                "label_set": kept.label_set,
                "kind": head.kind,
                "classes": head.classes if head.kind == "multiclass" else [],
                "labels": head.labels,
                "label_counts": counts,
                "dropped_classes": dropped,
                "train_counts": {
                    c: int(v)
                    for c, v in zip(
                        kept.classes, np.bincount(kept.y[train], minlength=len(kept.classes)), strict=True
                    )
                },
                "heldout_counts": {
                    c: int(v)
                    for c, v in zip(
                        kept.classes, np.bincount(kept.y[held], minlength=len(kept.classes)), strict=True
                    )
                },
                "calibration": {"method": head.calibration["method"], "folds": head.calibration["folds"]},
                "C": head.calibration["C"],
                "oof_auc_by_C": head.calibration["oof_auc_by_C"],
                "heldout_metrics": m,
            }
        )
    if not heads:
        raise MorphologyError("no task has enough labels to train a head: " + "; ".join(notes))
    from encoder.checkpoint import git_commit

    dim = int(heads[0].mean.shape[0])
    card = {
        "format": FORMAT,
        "kind": "morphology-heads",
        "variant": VARIANT,
        "detector": DETECTOR,
        "encoder_version": encoder_version,
        "dim": dim,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "tasks": card_tasks,
        "training": {
            "head": "standardise + LogisticRegression(class_weight='balanced')",
            "C": "chosen per task by out-of-fold AUC from " + str(list(C_GRID)) if c is None else c,
            "holdout": holdout,
            "calibration": calibration,
            "calibration_fit": "out-of-fold scores of the training part (stratified k-fold, k <= 5)",
            "min_per_class": min_per_class,
            "seed": seed,
            "ece_bins": ECE_BINS,
            "seconds": round(time.perf_counter() - t0, 2),
        },
        "source": dict(source or {}),
        "notes": notes,
    }
    result = MorphologyHeads(heads, encoder_version=encoder_version, dim=dim, card=card)
    return TrainingResult(heads=result, metrics=metrics, curves=curves, notes=notes)


def train_from_database(
    engine: Engine,
    *,
    tasks: Mapping[str, str],
    encoder_version: str,
    **kw: Any,
) -> TrainingResult:
    """Read every task's labels joined to ``encoder_version``'s embeddings and :func:`train_heads`.

    Parameters
    ----------
    engine
        Engine of the galsift database.
    tasks
        Task name -> label set; sets with no labelled, embedded tile are skipped with a note.
    encoder_version
        The encoder model version whose embeddings the heads take (the serving one).
    **kw
        Passed to :func:`train_heads`.
    """
    from db import labels as dblabels

    loaded, notes = [], []
    for task, label_set in tasks.items():
        data = load_task(engine, task, label_set, encoder_version=encoder_version)
        if data is None:
            counts = dblabels.label_counts(engine, label_set)
            why = (
                "no labels"
                if not counts
                else f"{sum(counts.values())} labels, none embedded by {encoder_version}"
            )
            notes.append(f"{task}: skipped, label set {label_set!r} has {why}")
            continue
        loaded.append(data)
    if not loaded:
        raise MorphologyError("no labelled embeddings: " + "; ".join(notes))
    source = {
        "database": "labels JOIN embeddings",
        "label_sets": dict(tasks),
        "labelled_tiles": {d.task: len(d.y) for d in loaded},
    }
    result = train_heads(loaded, encoder_version=encoder_version, source=source, **kw)
    result.notes[:0] = notes
    result.heads.card["notes"] = result.notes
    return result


# -- report ------------------------------------------------------------------------------------------
def format_metrics(result: TrainingResult) -> str:
    """Held-out metrics as a table (one row per task, then per class of a multi-class task)."""
    lines = [
        f"{'task':<16}{'label':<16}{'n':>5}{'pos':>6}{'AUC':>8}{'ECE raw':>10}{'ECE cal':>10}{'Brier cal':>11}"
    ]
    for task, m in result.metrics.items():
        if isinstance(m.get("auc"), dict):
            for cls, auc in m["auc"].items():
                shown = "—" if auc is None else f"{auc:.3f}"
                lines.append(f"{task:<16}{cls:<16}{m['n']:>5}{m['class_counts'][cls]:>6}{shown:>8}")
            macro = "—" if m["macro_auc"] is None else f"{m['macro_auc']:.3f}"
            lines.append(
                f"{task:<16}{'macro':<16}{m['n']:>5}{'':>6}{macro:>8}{m['ece_raw']:>10.3f}"
                f"{m['ece_calibrated']:>10.3f}{m['brier_calibrated']:>11.3f}"
            )
        else:
            auc = "—" if m["auc"] is None else f"{m['auc']:.3f}"
            lines.append(
                f"{task:<16}{task:<16}{m['n']:>5}{m['positives']:>6}{auc:>8}{m['ece_raw']:>10.3f}"
                f"{m['ece_calibrated']:>10.3f}{m['brier_calibrated']:>11.3f}"
            )
    lines.extend(f"note: {n}" for n in result.notes)
    return "\n".join(lines)


def plot_reliability(result: TrainingResult, path: Path) -> Path:
    """Reliability diagram per task on the held-out part: raw (dashed) vs calibrated (solid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result.curves)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        m = result.metrics[task]
        ax.plot([0, 1], [0, 1], color="0.7", lw=1)
        for which, style in (("raw", "--"), ("calibrated", "-")):
            cv = result.curves[task][which]
            ax.plot(
                cv["mean_probability"],
                cv["observed"],
                style,
                marker="o",
                ms=3,
                label=f"{which} (ECE {m[f'ece_{which}']:.3f})",
            )
        ax.set_title(f"{task} (held-out n={m['n']})", fontsize=9)
        ax.set_xlabel("predicted probability")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper left")
    axes[0][0].set_ylabel("observed frequency")
    fig.suptitle(f"{result.heads.version} on {result.heads.encoder_version}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metrics_rows(result: TrainingResult) -> list[dict[str, Any]]:
    """Flat JSON rows (DESIGN.md keys): one per (task, class) AUC, plus calibration columns."""
    rows: list[dict[str, Any]] = []
    for task, m in result.metrics.items():
        common = {"model": result.heads.version, "task": task, "n": m["n"]}
        if isinstance(m.get("auc"), dict):
            for cls, auc in m["auc"].items():
                rows.append({**common, "class": cls, "auroc": auc})
            rows.append(
                {
                    **common,
                    "class": "macro",
                    "auroc": m["macro_auc"],
                    "ece_raw": m["ece_raw"],
                    "ece_calibrated": m["ece_calibrated"],
                    "brier_calibrated": m["brier_calibrated"],
                }
            )
        else:
            rows.append(
                {
                    **common,
                    "class": task,
                    "auroc": m["auc"],
                    "ece_raw": m["ece_raw"],
                    "ece_calibrated": m["ece_calibrated"],
                    "brier_calibrated": m["brier_calibrated"],
                }
            )
    return rows
