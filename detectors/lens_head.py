"""The lens head: real graded images turn the lens finder's score into a lens probability.

The Mask R-CNN lens finder (:mod:`detectors.lensfinder`) learns arcs from simulations, and its
top detection score does not transfer to real survey candidates (AUROC 0.47 on CFHTLS Space Warps
candidates). The lens head is the image-level correction the real labels allow: a class-balanced
logistic regression over the tile's stored LVM embedding (the 256-d vector the service already
has; its 22 photometric statistics included) and the logit of the finder's top score, trained on
real images graded lens / non-lens (``galsift train lens-head``) and measured by ``galsift eval
lens`` on the graded images it did not see.

A head also reads two views of the tile's centre, where the arcs of galaxy-scale lenses lie
(Einstein radii of 1-3 arcsec; a few pixels of the 96 px field the stored embedding sees):
:class:`Views`, made from the model input at twice the encoder's side by :func:`views_of`:

- the embedding of the central half of the field at twice the resolution (:func:`centre_view`);
- the colour profile in rings around the centre (:func:`ring_profile`), the signature that
  RingFinder (Gavazzi et al. 2014) searched CFHTLS with: blue arcs around a red deflector.

The two embeddings are reduced to :data:`VIEW_COMPONENTS` principal components before the
regression (512 numbers over a few hundred graded images overfit). On the CFHTLS candidates
the views, with the target survey weighted as much as the other sources (:func:`domain_weights`),
lifted the held-out AUROC from 0.71 to 0.75, and the other way round (trained on the held-out
half, scored on the training half) from 0.65 to 0.71 (README, lens finder).

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
import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: format tag of the card (``/2`` added the views; ``/1`` cards, the stored embedding alone, load)
FORMAT = "galsift-lens-head/2"
_READABLE = frozenset({"galsift-lens-head/1", FORMAT})
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
#: ring edges of :func:`ring_profile`, in fractions of the field's side (0.9, 1.8, 3, 4.5 and
#: 7.5 arcsec in a 30 arcsec CFHTLS field)
RING_EDGES = (0.0, 0.03, 0.06, 0.10, 0.15, 0.25)
#: principal components kept of the field and centre embeddings, chosen among 8, 16 and 32 by
#: cross-validation on the training half (README)
VIEW_COMPONENTS = 16


class LensHeadError(ValueError):
    """A head that cannot be made, read or used with the given encoder and lens finder."""


def rendering_of(dtype: str) -> str:
    """``composite`` for 8-bit colour composites, ``flux`` for float flux (the card's words)."""
    return "composite" if np.dtype(dtype) == np.uint8 else "flux"


@dataclass(frozen=True)
class Views:
    """What a head reads of tiles besides their stored embeddings (see the module docstring).

    Attributes
    ----------
    centre
        (N, D) embeddings of the central half of each field at twice the resolution.
    rings
        (N, R) colour profiles (:func:`ring_profile`).
    """

    centre: np.ndarray
    rings: np.ndarray


def centre_view(images: np.ndarray) -> np.ndarray:
    """The central half of (N, C, 2S, 2S) model input: (N, C, S, S), the centre at twice the resolution.

    Raises
    ------
    LensHeadError
        If the side is not a multiple of 4.
    """
    side = images.shape[-1]
    if side % 4:
        raise LensHeadError(f"model input of side {side}: the centre view needs a multiple of 4")
    q = side // 4
    return np.ascontiguousarray(images[..., q : q + side // 2, q : q + side // 2])


def ring_profile(images: np.ndarray) -> np.ndarray:
    """Colour profile around the centre of (N, 3, S, S) model input (R, G, B = the i, r, g of CFHTLS).

    Per ring of :data:`RING_EDGES`: the mean of each channel, blue minus red, and each channel
    relative to the central disc; (N, 32) for the five rings.
    """
    x = np.asarray(images, np.float64)
    side = x.shape[-1]
    yy, xx = np.mgrid[:side, :side]
    r = np.hypot(yy - (side - 1) / 2, xx - (side - 1) / 2) / side
    rings = np.stack(
        [x[..., (r >= a) & (r < b)].mean(-1) for a, b in itertools.pairwise(RING_EDGES)], 1
    )  # (N, rings, channels)
    blue_minus_red = rings[..., 2] - rings[..., 0]
    relative = rings[:, 1:] - rings[:, :1]
    n = len(x)
    return np.hstack([rings.reshape(n, -1), blue_minus_red, relative.reshape(n, -1)])


def views_of(detail: np.ndarray, embed: Callable[[np.ndarray], np.ndarray]) -> Views:
    """The :class:`Views` of tiles from their model input at twice the encoder's side.

    Parameters
    ----------
    detail
        (N, 3, 2S, 2S) model input of the tiles (``S`` the encoder's input side).
    embed
        The head's encoder: (N, 3, S, S) model input -> (N, D) embeddings.
    """
    return Views(np.asarray(embed(centre_view(detail)), np.float64), ring_profile(detail))


def features(
    embeddings: np.ndarray,
    detector_scores: np.ndarray,
    views: Views | None = None,
    *,
    projection: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """The head's input, before standardisation.

    Without views: the embedding and the logit of the lens finder's top score, (N, D + 1). With
    views: the principal components of the field and centre embeddings (``projection``: mean and
    components), the colour profile and the logit.
    """
    p = np.clip(np.asarray(detector_scores, np.float64), EPS, 1 - EPS)
    logit = np.log(p / (1 - p))[:, None]
    emb = np.asarray(embeddings, np.float64)
    if views is None:
        return np.hstack([emb, logit])
    if projection is None:
        raise LensHeadError("views need the head's projection of the embeddings")
    mean, components = projection
    both = np.hstack([emb, views.centre])
    if both.shape[1] != mean.shape[0]:
        raise LensHeadError(f"embeddings of {emb.shape[1]} dimensions; the head reads {mean.shape[0] // 2}")
    return np.hstack([(both - mean) @ components.T, views.rings, logit])


def in_folder(data: Sequence[dict[str, Any]], folder: str) -> np.ndarray:
    """Which images of :attr:`LabelledImages.data` (in its order) come from ``folder``."""
    name = Path(folder).resolve()
    return np.asarray(
        [Path(str(rec["folder"])).resolve() == name for rec in data for _ in rec["files"]], dtype=bool
    )


def domain_weights(is_target: np.ndarray) -> np.ndarray:
    """Sample weights that give the target survey's images as much weight as all the others.

    The head is judged on one survey's graded candidates (the target) but trained mostly on
    other sources; balancing the two domains is the rule, not a tuned number.

    Raises
    ------
    LensHeadError
        If no image, or every image, is the target's.
    """
    n_target = int(is_target.sum())
    if n_target in (0, len(is_target)):
        raise LensHeadError(f"{n_target} of {len(is_target)} images are the target's; need some of both")
    return np.where(is_target, (len(is_target) - n_target) / n_target, 1.0)


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
        on), ``metrics`` (cross-fitted AUROC with and without the finder's score), ``c``,
        ``views`` and ``target``.
    projection
        Mean and principal components of the field and centre embeddings, for a head that reads
        the tiles' :class:`Views`; None for one that reads the stored embedding alone.
    """

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    card: dict[str, Any]
    projection: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def version(self) -> str:
        """``lens_head-<sha256 of the weights and the versions it reads>[:10]``."""
        h = hashlib.sha256()
        arrays = [self.mean, self.scale, self.coef, np.asarray([self.intercept]), *(self.projection or ())]
        for a in arrays:
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

    @property
    def reads_views(self) -> bool:
        """Whether :meth:`predict` needs the tiles' :class:`Views` (from :func:`views_of`)."""
        return self.projection is not None

    def predict(
        self, embeddings: np.ndarray, detector_scores: np.ndarray, views: Views | None = None
    ) -> np.ndarray:
        """Lens probability of each tile, from its embedding, the finder's top score and its views.

        Raises
        ------
        LensHeadError
            If the inputs do not have the shape the head was fitted on, or its views are missing.
        """
        if self.reads_views and views is None:
            raise LensHeadError(f"{self.version} reads the tiles' views (views_of)")
        x = features(
            embeddings, detector_scores, views if self.reads_views else None, projection=self.projection
        )
        if x.shape[1] != len(self.coef):
            raise LensHeadError(
                f"embeddings of {x.shape[1] - 1} dimensions; the head reads {len(self.coef) - 1}"
            )
        z = ((x - self.mean) / self.scale) @ self.coef + self.intercept
        from scipy.special import expit  # the logistic function without overflow at large |z|

        return np.asarray(expit(z), np.float64)

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
                **(
                    {"view_mean": self.projection[0].tolist(), "view_components": self.projection[1].tolist()}
                    if self.projection is not None
                    else {}
                ),
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
        if doc.get("format") not in _READABLE:
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
            (np.asarray(w["view_mean"], np.float64), np.asarray(w["view_components"], np.float64))
            if "view_components" in w
            else None,
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


def _fit(x: np.ndarray, y: np.ndarray, c: float, weights: np.ndarray | None = None) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
    ).fit(x, y, logisticregression__sample_weight=weights)


def cross_fitted_auroc(
    x: np.ndarray,
    y: np.ndarray,
    *,
    c: float,
    seed: int,
    weights: np.ndarray | None = None,
    among: np.ndarray | None = None,
) -> float:
    """AUROC of out-of-fold scores (:data:`FOLDS` stratified folds) on the training images.

    ``among`` (a boolean mask) measures it on those images only (the target survey's).
    """
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    folds = min(FOLDS, int(np.bincount(y).min()))
    if folds < 2:
        return math.nan
    scores = np.zeros(len(y))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        w = None if weights is None else weights[train]
        scores[test] = _fit(x[train], y[train], c, w).decision_function(x[test])
    keep = np.ones(len(y), bool) if among is None else among
    if len(set(y[keep].tolist())) < 2:
        return math.nan
    return float(roc_auc_score(y[keep], scores[keep]))


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
    views: Views | None = None,
    target: str | None = None,
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
    views
        The images' :class:`Views` (:func:`views_of`); None fits a head on the embedding alone.
    target
        Folder (of ``data``) of the survey the head is judged on: its images get as much weight
        as all the others together (:func:`domain_weights`), and the card reports the
        cross-fitted AUROC among them.
    """
    y = np.asarray(labels, np.int64)
    if len(set(y.tolist())) != 2:
        raise LensHeadError(f"need lenses and non-lenses, got {int(y.sum())} lenses of {len(y)} images")
    projection = None
    if views is not None:
        from sklearn.decomposition import PCA

        # unsupervised, on the training images: the folds below share it
        both = np.hstack([np.asarray(embeddings, np.float64), views.centre])
        pca = PCA(min(VIEW_COMPONENTS, *both.shape), random_state=seed).fit(both)
        projection = (np.asarray(pca.mean_, np.float64), np.asarray(pca.components_, np.float64))
    is_target = None if target is None else in_folder(data, target)
    weights = None if is_target is None else domain_weights(is_target)
    x = features(embeddings, detector_scores, views, projection=projection)
    model = _fit(x, y, c, weights)
    scaler, logit = model[0], model[-1]
    metrics = {
        "n_lenses": int(y.sum()),
        "n_non_lenses": int(len(y) - y.sum()),
        "cross_fitted_auroc": cross_fitted_auroc(x, y, c=c, seed=seed, weights=weights),
        "cross_fitted_auroc_without_finder": cross_fitted_auroc(
            x[:, :-1], y, c=c, seed=seed, weights=weights
        ),
        "finder_auroc": _auroc(np.asarray(detector_scores), y),
    }
    if is_target is not None:
        metrics["cross_fitted_auroc_target"] = cross_fitted_auroc(
            x, y, c=c, seed=seed, weights=weights, among=is_target
        )
    card = {
        "encoder_version": encoder_version,
        "detector_version": detector_version,
        "renderings": sorted({r for rec in data for r in rec.get("renderings", [])}),
        "views": ["field", "centre", "rings"] if views is not None else ["field"],
        "target": None if target is None else str(target),
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
        projection,
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
