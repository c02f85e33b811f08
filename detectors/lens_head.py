"""The lens head: real graded images turn the lens finder's score into a lens probability.

The Mask R-CNN lens finder (:mod:`detectors.lensfinder`) learns arcs from simulations, and its
top detection score does not transfer to real survey candidates (AUROC 0.47 on CFHTLS Space Warps
candidates). The lens head is the image-level correction the real labels allow: a class-balanced
logistic regression over the tile's stored LVM embedding (the 256-d vector the service already
has; its 22 photometric statistics included) and the logit of the finder's top score, trained on
real images graded lens / non-lens (``galsift train lens-head``) and measured by ``galsift eval
lens`` on the graded images it did not see.

The head is tied to one encoder version (the embedding it reads) and one lens-finder version (the
score it reads); :meth:`LensHead.load` refuses another. Its card also lists the renderings it was
trained on: the shared graded sets are colour composites (JPEG), and on stretched flux tiles
(FITS, the survey feed) the head calls ordinary simulated galaxies lenses, so the detector
service applies it only to tiles of the renderings in its card (:meth:`LensHead.applies_to`).
Its weights are a few hundred floats,
kept in a JSON card with the data it was trained on (so ``galsift eval lens`` leaves those images
out), the cross-fitted AUROC on its training images and how it was made.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: format tag of the card
FORMAT = "galsift-lens-head/1"
#: ``model_versions.variant`` and ``detections.detector`` of the head
VARIANT = "lens_head"
#: where the shipped head lives
DEFAULT_LENS_HEAD = Path(__file__).resolve().parent / "checkpoints" / "lens_head.json"
#: inverse regularisation on standardised features: the few-shot evaluation's (HEAD_C)
DEFAULT_C = 0.1
#: folds of the cross-fitting that measures the head on its own training images
FOLDS = 5
#: detector scores are clipped into (EPS, 1 - EPS) before their logit
EPS = 1e-4


class LensHeadError(ValueError):
    """A head that cannot be made, read or used with the given encoder and lens finder."""


def rendering_of(dtype: str) -> str:
    """``composite`` for 8-bit colour composites, ``flux`` for float flux (the card's words)."""
    return "composite" if np.dtype(dtype) == np.uint8 else "flux"


def features(embeddings: np.ndarray, detector_scores: np.ndarray) -> np.ndarray:
    """The head's input: the embedding and the logit of the lens finder's top score, (N, D + 1)."""
    p = np.clip(np.asarray(detector_scores, np.float64), EPS, 1 - EPS)
    return np.hstack([np.asarray(embeddings, np.float64), np.log(p / (1 - p))[:, None]])


@dataclass(frozen=True)
class LensHead:
    """A fitted head: standardisation, logistic weights and the card.

    Attributes
    ----------
    mean, scale
        Standardisation of :func:`features` (per column).
    coef, intercept
        Logistic regression on the standardised features.
    card
        ``encoder_version``, ``detector_version``, ``data`` (folders, filters and files trained
        on), ``metrics`` (cross-fitted AUROC with and without the finder's score), ``c``.
    """

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    card: dict[str, Any]

    @property
    def version(self) -> str:
        """``lens_head-<sha256 of the weights and the versions it reads>[:10]``."""
        h = hashlib.sha256()
        for a in (self.mean, self.scale, self.coef, np.asarray([self.intercept])):
            h.update(np.ascontiguousarray(a, np.float64).tobytes())
        h.update(f"{self.encoder_version}|{self.detector_version}".encode())
        return f"{VARIANT}-{h.hexdigest()[:10]}"

    @property
    def encoder_version(self) -> str:
        """The embedding's model version."""
        return str(self.card["encoder_version"])

    @property
    def detector_version(self) -> str:
        """The lens finder's model version."""
        return str(self.card["detector_version"])

    @property
    def renderings(self) -> frozenset[str]:
        """The renderings it was trained on (``composite``, ``flux``; see :func:`rendering_of`)."""
        return frozenset(self.card.get("renderings", ()))

    def applies_to(self, *, encoder_version: str, dtype: str) -> bool:
        """Whether it may score a tile embedded by ``encoder_version`` with pixels of ``dtype``.

        Only tiles of a rendering it was trained on: the shipped head, fitted on colour
        composites, calls ordinary galaxies in stretched flux lenses (README).
        """
        return encoder_version == self.encoder_version and rendering_of(dtype) in self.renderings

    def predict(self, embeddings: np.ndarray, detector_scores: np.ndarray) -> np.ndarray:
        """Lens probability of each tile, from its embedding and the finder's top score."""
        x = features(embeddings, detector_scores)
        if x.shape[1] != len(self.coef):
            raise LensHeadError(
                f"embeddings of {x.shape[1] - 1} dimensions; the head reads {len(self.coef) - 1}"
            )
        z = ((x - self.mean) / self.scale) @ self.coef + self.intercept
        return np.asarray(1.0 / (1.0 + np.exp(-z)), np.float64)

    def save(self, path: Path) -> None:
        """Write the card with the weights (JSON)."""
        doc = {
            "format": FORMAT,
            "version": self.version,
            **self.card,
            "weights": {
                "mean": self.mean.tolist(),
                "scale": self.scale.tolist(),
                "coef": self.coef.tolist(),
                "intercept": self.intercept,
            },
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(
        cls, path: Path, *, encoder_version: str | None = None, detector_version: str | None = None
    ) -> LensHead:
        """Read a saved head; refuse it when it reads another encoder's or lens finder's output.

        Raises
        ------
        LensHeadError
            If the file is not a lens-head card, its weights do not give its version, or it was
            made for another encoder or lens-finder version than the ones given.
        """
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise LensHeadError(f"{path}: cannot read a lens head ({exc})") from exc
        if doc.get("format") != FORMAT:
            raise LensHeadError(f"{path}: format {doc.get('format')!r}, expected {FORMAT!r}")
        w = doc.pop("weights")
        stated = doc.pop("version")
        doc.pop("format")
        head = cls(
            np.asarray(w["mean"], np.float64),
            np.asarray(w["scale"], np.float64),
            np.asarray(w["coef"], np.float64),
            float(w["intercept"]),
            doc,
        )
        if head.version != stated:
            raise LensHeadError(f"{path}: the weights give {head.version}, the card says {stated}")
        for what, want, have in (
            ("encoder", encoder_version, head.encoder_version),
            ("lens finder", detector_version, head.detector_version),
        ):
            if want is not None and want != have:
                raise LensHeadError(
                    f"{path}: made for {what} {have}, not {want}: retrain it (galsift train lens-head)"
                )
        return head


def _fit(x: np.ndarray, y: np.ndarray, c: float) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
    ).fit(x, y)


def cross_fitted_auroc(x: np.ndarray, y: np.ndarray, *, c: float, seed: int) -> float:
    """AUROC of out-of-fold scores (:data:`FOLDS` stratified folds) on the training images."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    folds = min(FOLDS, int(np.bincount(y).min()))
    if folds < 2:
        return math.nan
    scores = np.zeros(len(y))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        scores[test] = _fit(x[train], y[train], c).decision_function(x[test])
    return float(roc_auc_score(y, scores))


def fit_lens_head(
    embeddings: np.ndarray,
    detector_scores: np.ndarray,
    labels: np.ndarray,
    *,
    encoder_version: str,
    detector_version: str,
    data: Sequence[dict[str, Any]],
    c: float = DEFAULT_C,
    seed: int = 0,
) -> LensHead:
    """Fit the head on labelled real images.

    Parameters
    ----------
    embeddings
        (N, D) stored embeddings of the images (the serving encoder's).
    detector_scores
        (N,) top detection scores of the lens finder on the same images.
    labels
        (N,) 1 for a lens, 0 for a non-lens.
    encoder_version, detector_version
        The versions that produced the two inputs (checked whenever the head is loaded).
    data
        What was trained on (folder, filter, label, files), kept in the card.
    c
        Inverse regularisation of the logistic regression.
    seed
        Seed of the cross-fitting folds.
    """
    y = np.asarray(labels, np.int64)
    if len(set(y.tolist())) != 2:
        raise LensHeadError(f"need lenses and non-lenses, got {int(y.sum())} lenses of {len(y)} images")
    x = features(embeddings, detector_scores)
    model = _fit(x, y, c)
    scaler, logit = model[0], model[-1]
    metrics = {
        "n_lenses": int(y.sum()),
        "n_non_lenses": int(len(y) - y.sum()),
        "cross_fitted_auroc": cross_fitted_auroc(x, y, c=c, seed=seed),
        "cross_fitted_auroc_without_finder": cross_fitted_auroc(x[:, :-1], y, c=c, seed=seed),
        "finder_auroc": _auroc(np.asarray(detector_scores), y),
    }
    card = {
        "encoder_version": encoder_version,
        "detector_version": detector_version,
        "renderings": sorted({r for rec in data for r in rec.get("renderings", [])}),
        "c": c,
        "seed": seed,
        "data": list(data),
        "metrics": metrics,
    }
    return LensHead(
        np.asarray(scaler.mean_, np.float64),
        np.asarray(scaler.scale_, np.float64),
        np.asarray(logit.coef_[0], np.float64),
        float(logit.intercept_[0]),
        card,
    )


def _auroc(scores: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, scores))


def trained_files(card: dict[str, Any], folder_name: str) -> set[str]:
    """Files of a folder named ``folder_name`` that a head's card says it was trained on."""
    return {
        str(f)
        for rec in card.get("data") or []
        if Path(str(rec.get("folder", ""))).name == folder_name
        for f in rec.get("files") or []
    }


@dataclass
class LabelledImages:
    """Real images with lens labels, and what was taken from where (for the card)."""

    images: np.ndarray
    labels: np.ndarray
    data: list[dict[str, Any]]


def load_labelled(
    positives: Sequence[Any],
    negatives: Sequence[Any],
    *,
    size: int,
    fraction: float,
    cache_dir: Path | None = None,
) -> LabelledImages:
    """The training share of real lenses and non-lenses from ``labels.csv`` folders.

    Parameters
    ----------
    positives, negatives
        :class:`detectors.lens_data.NegativeSpec` folder filters (``DIR[:COL=VALUE|:COL!=VALUE]``).
    size
        Model input side.
    fraction
        Share of each folder's selected images trained on, chosen by a stable hash of the file
        name (:func:`detectors.lens_data.in_training_share`, the lens finder's rule), so the rest
        of a graded folder stays held out for ``galsift eval lens``.
    cache_dir
        Preprocessing cache.
    """
    from detectors.lens_data import in_training_share
    from encoder.data import FITS_SUFFIXES, read_folder

    images: list[np.ndarray] = []
    labels: list[int] = []
    data: list[dict[str, Any]] = []
    sets: dict[Path, Any] = {}
    for label, specs in ((1, positives), (0, negatives)):
        for spec in specs:
            folder = Path(spec.folder)
            if folder not in sets:
                sets[folder] = read_folder(folder, size=size, cache_dir=cache_dir)
            image_set = sets[folder]
            if spec.column is not None and image_set.table and spec.column not in image_set.table[0]:
                raise LensHeadError(f"{folder}: no column {spec.column!r}")
            picked = [
                i
                for i, (file, row) in enumerate(zip(image_set.files, image_set.table, strict=True))
                if spec.matches(row) and in_training_share(spec.name, file, fraction)
            ]
            images.extend(image_set.images[picked])
            labels.extend([label] * len(picked))
            files = [image_set.files[i] for i in picked]
            data.append(
                {
                    "folder": str(folder),
                    "filter": str(spec),
                    "label": label,
                    # colour composites and stretched flux are different inputs to the head
                    "renderings": sorted(
                        {"flux" if f.lower().endswith(FITS_SUFFIXES) else "composite" for f in files}
                    ),
                    "files": files,
                }
            )
    if not images:
        raise LensHeadError("no labelled images selected")
    return LabelledImages(np.stack(images), np.asarray(labels, np.int64), data)
