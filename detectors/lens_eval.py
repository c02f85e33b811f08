"""``galsift eval lens``: how well the lens detectors rank real graded candidates.

For a ``labels.csv`` folder with a numeric grade column, images graded at least
``positive_min`` are lenses and images graded at most ``negative_max`` are non-lenses; the ones in
between are left out. Each detector scores every image with its top detection score (0 when it
detects nothing), through the same preprocessing as the service (:func:`encoder.data.read_folder`
at the detector's input size). Reported per detector, all on the same images:

* ``auroc`` — area under the ROC curve (scikit-learn);
* ``tpr_at_fpr_0.01`` — the largest true-positive rate at a false-positive rate of at most 1 %;
* ``tpr_at_0fp`` — the share of lenses scored strictly above every non-lens.

Images a detector was trained on (the real negatives its card lists for a folder of the same
name) are left out for every detector of the run, and their number is reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detectors.lens_head import LensHead
from detectors.lensfinder import LensFinder


class LensEvalError(ValueError):
    """An evaluation that cannot run as asked (bad folder, column or thresholds)."""


def binary_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AUROC, TPR at FPR ≤ 1 % and TPR at zero false positives.

    Parameters
    ----------
    scores
        Higher means more lens-like.
    labels
        1 for lenses, 0 for non-lenses; both must occur.

    Returns
    -------
    dict
        ``auroc``, ``tpr_at_fpr_0.01``, ``tpr_at_0fp``.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    if y.min() == y.max():
        raise LensEvalError("need both lenses and non-lenses to compute the metrics")
    fpr, tpr, _ = roc_curve(y, s)
    at_1pct = float(tpr[fpr <= 0.01].max()) if np.any(fpr <= 0.01) else 0.0
    top_negative = s[y == 0].max()
    return {
        "auroc": float(roc_auc_score(y, s)),
        "tpr_at_fpr_0.01": at_1pct,
        "tpr_at_0fp": float(np.mean(s[y == 1] > top_negative)),
    }


@dataclass
class LensEvalRun:
    """The outcome of one evaluation.

    Attributes
    ----------
    data
        The folder.
    rows
        One flat row per detector (``model``, ``backbone``, ``auroc``, ``tpr_at_fpr_0.01``,
        ``tpr_at_0fp``, ``n_positive``, ``n_negative``, ``n_excluded``).
    versions
        Detector version names, in row order.
    """

    data: Path
    rows: list[dict[str, Any]]
    versions: list[str]


def trained_files(card: dict[str, Any], folder_name: str) -> set[str]:
    """Files of a folder named ``folder_name`` that a detector card says were trained on."""
    out: set[str] = set()
    for rec in (card.get("data") or {}).get("negatives") or []:
        if Path(str(rec.get("folder", ""))).name == folder_name:
            out.update(str(f) for f in rec.get("files") or [])
    return out


@dataclass(frozen=True)
class HeadScorer:
    """A lens head with what it reads: the embedding of an encoder and a lens finder's score.

    Attributes
    ----------
    head
        The fitted head.
    embed
        Model input (N, 3, S, S) of side ``size`` -> (N, D) embeddings of the head's encoder.
    size
        The encoder's input side.
    """

    head: LensHead
    embed: Callable[[np.ndarray], np.ndarray]
    size: int


def run_lens_eval(
    data: Path,
    finders: Sequence[LensFinder],
    *,
    score_col: str,
    positive_min: float,
    negative_max: float,
    heads: Sequence[HeadScorer] = (),
    cache_dir: Path | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> LensEvalRun:
    """Score a graded folder with every detector (and lens head) and compute the metrics.

    Every row is measured on the same images: those that neither a detector nor a head was
    trained on (their cards list them). A head's row scores its finder's output through it.

    Raises
    ------
    LensEvalError
        If the thresholds overlap, a class is empty after leaving out trained-on files, or a
        head's lens finder is not among ``finders``.
    encoder.data.DataError
        If the folder does not follow the dataset contract or the column is not numeric.
    """
    from tqdm import tqdm

    from detectors import lens_head
    from encoder.data import read_folder

    if positive_min <= negative_max:
        raise LensEvalError(f"--positive-min {positive_min} must exceed --negative-max {negative_max}")
    folder = Path(data)
    by_version = {f.version: f for f in finders}
    for h in heads:
        if h.head.detector_version not in by_version:
            raise LensEvalError(
                f"{h.head.version} reads lens finder {h.head.detector_version}, which is not loaded"
            )
    name = folder.resolve().name
    excluded: set[str] = set()
    for f in finders:
        excluded |= trained_files(f.card, name)
    for h in heads:
        excluded |= lens_head.trained_files(h.head.card, name)
    sets: dict[int, Any] = {}

    def graded(size: int) -> tuple[Any, np.ndarray, np.ndarray, int]:
        if size not in sets:
            sets[size] = read_folder(folder, label=score_col, size=size, cache_dir=cache_dir)
        image_set = sets[size]
        grades = np.asarray(image_set.labels, dtype=np.float64)
        keep = np.asarray([f not in excluded for f in image_set.files])
        positive = (grades >= positive_min) & keep
        negative = (grades <= negative_max) & keep
        if not positive.any() or not negative.any():
            raise LensEvalError(
                f"{folder}: {int(positive.sum())} lenses and {int(negative.sum())} non-lenses after "
                f"leaving out {int((~keep).sum())} trained-on images; need both"
            )
        left_out = int((~keep & ((grades >= positive_min) | (grades <= negative_max))).sum())
        return image_set, positive, negative, left_out

    def row(
        model: str, backbone: str, scores: np.ndarray, positive: np.ndarray, negative: np.ndarray, n_out: int
    ) -> dict[str, Any]:
        use = positive | negative
        return {
            "model": model,
            "backbone": backbone,
            **binary_metrics(scores, positive[use].astype(int)),
            "n_positive": int(positive.sum()),
            "n_negative": int(negative.sum()),
            "n_excluded": n_out,
        }

    rows: list[dict[str, Any]] = []
    finder_scores: dict[str, np.ndarray] = {}
    for finder in tqdm(finders, desc="detectors", disable=not progress):
        image_set, positive, negative, n_out = graded(finder.image_size)
        scores = finder.scores(image_set.images[positive | negative], batch_size=batch_size)
        finder_scores[finder.version] = scores
        rows.append(row(finder.version, finder.backbone, scores, positive, negative, n_out))
    for h in heads:
        finder = by_version[h.head.detector_version]
        image_set, positive, negative, n_out = graded(h.size)
        use = positive | negative
        embeddings = h.embed(image_set.images[use])
        # a head that reads the tiles' centres sees the same images at twice the side
        views = lens_head.views_of(graded(2 * h.size)[0].images[use], h.embed) if h.head.reads_views else None
        scores = h.head.predict(embeddings, finder_scores[finder.version], views)
        rows.append(
            row(h.head.version, f"{finder.backbone} + real-label head", scores, positive, negative, n_out)
        )
    return LensEvalRun(folder, rows, [r["model"] for r in rows])


def format_table(run: LensEvalRun) -> str:
    """A Markdown table of the rows."""

    def num(v: float) -> str:
        return "–" if math.isnan(v) else f"{v:.3f}"

    lines = [
        "| model | backbone | AUROC | TPR @ FPR 1% | TPR @ 0 FP | lenses | non-lenses | left out (trained on) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in run.rows:
        lines.append(
            f"| `{r['model']}` | {r['backbone']} | {num(r['auroc'])} | {num(r['tpr_at_fpr_0.01'])} | "
            f"{num(r['tpr_at_0fp'])} | {r['n_positive']} | {r['n_negative']} | {r['n_excluded']} |"
        )
    return "\n".join(lines)


def json_document(run: LensEvalRun, *, data_arg: str, model_version: str) -> dict[str, Any]:
    """The ``--json`` document: ``{"command", "data", "model_version", "results"}``."""
    return {"command": "eval lens", "data": data_arg, "model_version": model_version, "results": run.rows}
