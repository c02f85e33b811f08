"""Few-shot morphology evaluation: ``galsift eval morphology``.

For each shot count k and each of R repeats, k images per class are drawn at random for training
and *all* other labelled images form the test set. Within a repeat every method sees exactly the
same split (paired comparison), and a repeat's splits are nested across shot counts (the 5 shots
are among the 10 shots), because each class is permuted once per repeat and the first k taken.

Methods: the LVM's stored embedding (:meth:`LVM.embed`) + a linear head (standardise, then
logistic regression); against, on the same splits, the same architecture untrained, raw-pixel PCA
and photometry features with the same head, and a ResNet18 trained from scratch on the shots
(:mod:`encoder.baselines`). The score is the test AUC; the table shows mean ± std over repeats
and the paired difference LVM − baseline (mean ± std, and how often the LVM wins).

A **multi-class** label column (class names such as ``morphology``'s ``spiral``, or integer codes
with more than two values) runs the same protocol with k shots of every class: the linear head
is multinomial, a binary-only method (the ResNet18) is trained one-vs-rest, and each class is
scored one-vs-rest on the test images. Rows give per-class AUC and the macro AUC (mean over
classes within a repeat, then mean ± std over repeats); the paired differences are on the macro
AUC. Classes with fewer than ``min(shots) + --min-test`` images are left out (with a note), since
they could not be both trained on and tested. Vote fractions are binarised with ``--threshold``.

This module is imported by ``galsift --help``: heavy imports happen inside functions.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from galsift.cli import CommandGroups
    from galsift.settings import Settings

log = logging.getLogger(__name__)

#: the shipped model, evaluated when --model is not given
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "lvm_tiny.safetensors"
#: shot counts (per class) of the main table
DEFAULT_SHOTS = (5, 10, 20, 50)
#: extra shot counts for the ResNet18 baseline only: how many labels it needs to match the LVM
DEFAULT_RESNET_EXTRA_SHOTS = (100, 200)
#: a class needs at least shots + this many images, so its test part is not empty
MIN_TEST_PER_CLASS = 5
#: baselines selectable with ``--baselines`` ("stages" is a diagnostic, not a default)
BASELINES = ("untrained", "pca", "photometry", "resnet18", "stages")
DEFAULT_BASELINES = ("untrained", "pca", "photometry", "resnet18")
#: seed of the untrained baseline's initialisation (fixed, independent of --seed)
UNTRAINED_SEED = 1234
#: inverse regularisation of the logistic-regression head on standardised features: fixed and
#: the same for every method (no selection on test data); strong, since there are few shots
HEAD_C = 0.1


class EvaluationError(ValueError):
    """Labels or options with which the evaluation cannot run."""


@dataclass(frozen=True)
class Split:
    """One train/test split: indices into the labelled images."""

    repeat: int
    shots: int
    train: np.ndarray
    test: np.ndarray


class Method(Protocol):
    """A method scored by the evaluation: trains on a split's shots, scores its test images."""

    name: str

    def scores(
        self, train: np.ndarray, y_train: np.ndarray, test: np.ndarray, *, repeat: int, shots: int
    ) -> np.ndarray:
        """Scores of the ``test`` images (higher = more likely class 1)."""
        ...


def binary_labels(labels: np.ndarray | None) -> np.ndarray:
    """Check that labels are 0/1 with both classes present and return them as ``int64``.

    Raises
    ------
    EvaluationError
        If labels are missing, not numeric, not binary or have a single class.
    """
    if labels is None:
        raise EvaluationError("no labels")
    if not np.issubdtype(labels.dtype, np.number):
        raise EvaluationError("labels are not numeric")
    values = set(np.unique(labels).tolist())
    if not values <= {0, 1}:
        shown = sorted(values)[:6]
        raise EvaluationError(f"labels are not binary ({shown}...); pass --threshold T")
    if values != {0, 1}:
        raise EvaluationError(f"only class {values} present; need both 0 and 1")
    return labels.astype(np.int64)


def feasible_shots(
    labels: np.ndarray, shots: Sequence[int], *, min_test: int = MIN_TEST_PER_CLASS
) -> tuple[list[int], list[str]]:
    """The shot counts every class can afford (shots + ``min_test`` images), and notes on the rest."""
    counts = np.bincount(labels, minlength=2)
    kept, notes = [], []
    for k in shots:
        if k < 1:
            raise EvaluationError(f"shots must be positive, got {k}")
        if counts.min() >= k + min_test:
            kept.append(k)
        else:
            notes.append(f"skipped {k} shots: class sizes {counts.tolist()} < {k} + {min_test} test images")
    return kept, notes


def make_splits(labels: np.ndarray, *, shots: int, repeats: int, seed: int) -> list[Split]:
    """The paired random splits of the evaluation, one per repeat.

    Each repeat permutes each class once (random generator seeded by ``(seed, repeat)``) and takes
    its first ``shots`` images for training; all other labelled images are the test set. So every
    method sees the same split, and a repeat's splits at different shot counts are nested.

    Parameters
    ----------
    labels
        Binary labels of all images.
    shots
        Training images per class.
    repeats
        Number of splits.
    seed
        Base seed.

    Raises
    ------
    EvaluationError
        If a class has fewer than ``shots + MIN_TEST_PER_CLASS`` images.
    """
    labels = binary_labels(labels)
    if not feasible_shots(labels, [shots])[0]:
        raise EvaluationError(f"{shots} shots: a class has fewer than {shots + MIN_TEST_PER_CLASS}")
    return _draw_splits(labels, n_classes=2, shots=shots, repeats=repeats, seed=seed)


def _draw_splits(labels: np.ndarray, *, n_classes: int, shots: int, repeats: int, seed: int) -> list[Split]:
    """Per repeat, each class permuted (seeded by ``(seed, repeat)``) and its first ``shots`` taken."""
    splits = []
    for r in range(repeats):
        rng = np.random.default_rng([seed, r])
        train = np.concatenate(
            [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in range(n_classes)]
        )
        train = np.sort(train)
        test = np.setdiff1d(np.arange(len(labels)), train)
        splits.append(Split(repeat=r, shots=shots, train=train, test=test))
    return splits


def class_labels(labels: np.ndarray | None) -> tuple[np.ndarray, list[str]] | None:
    """Class indices and names of a multi-class label column, or None for a binary/fractional one.

    Text labels are classes (sorted by name); integer labels with more than two values are
    classes named by their value. 0/1 and fractional labels return None (the binary path, where
    fractions are refused with a hint to ``--threshold``).
    """
    if labels is None:
        return None
    if np.issubdtype(labels.dtype, np.number):
        if not np.issubdtype(labels.dtype, np.integer) or len(np.unique(labels)) <= 2:
            return None
        values = np.unique(labels)
        return np.searchsorted(values, labels).astype(np.int64), [str(v) for v in values.tolist()]
    names = sorted({str(v) for v in labels.tolist()})
    index = {c: i for i, c in enumerate(names)}
    return np.asarray([index[str(v)] for v in labels.tolist()], dtype=np.int64), names


def linear_head_scores(train_x: np.ndarray, y_train: np.ndarray, test_x: np.ndarray) -> np.ndarray:
    """Standardise with the training features, fit logistic regression, score the test features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    head = make_pipeline(StandardScaler(), LogisticRegression(C=HEAD_C, max_iter=5000))
    head.fit(train_x, y_train)
    return np.asarray(head.decision_function(test_x), dtype=np.float64)


@dataclass
class FeatureProbe:
    """A method made of fixed per-image features and the linear head."""

    name: str
    features: np.ndarray
    #: the head is multinomial on multi-class labels (see :func:`score_matrix`)
    multiclass = True

    def scores(
        self, train: np.ndarray, y_train: np.ndarray, test: np.ndarray, *, repeat: int, shots: int
    ) -> np.ndarray:
        """Fit the head on the ``train`` features and score the ``test`` features."""
        return linear_head_scores(self.features[train], y_train, self.features[test])


def _batched(model: nn.Module, images: np.ndarray, fn: str, batch_size: int, device: str) -> np.ndarray:
    import torch

    model.eval().to(device)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(device)
            if fn == "embed":
                z = model.embed(x)  # type: ignore[operator]
            else:  # global-average-pooled maps of every encoder stage, concatenated
                maps = model.forward_intermediates(x)  # type: ignore[operator]
                z = torch.cat([m.float().mean(dim=(2, 3)) for m in maps], dim=1)
            out.append(z.float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def embed_images(
    model: nn.Module, images: np.ndarray, *, batch_size: int = 64, device: str = "cpu"
) -> np.ndarray:
    """The stored embedding (:meth:`LVM.embed`) of (N, 3, S, S) model input, as (N, D) ``float32``."""
    return _batched(model, images, "embed", batch_size, device)


def stage_features(
    model: nn.Module, images: np.ndarray, *, batch_size: int = 64, device: str = "cpu"
) -> np.ndarray:
    """Pooled maps of all encoder stages, concatenated (a diagnostic against :func:`embed_images`)."""
    return _batched(model, images, "stages", batch_size, device)


@dataclass
class MorphologyRun:
    """AUCs of every method, shot count and repeat, with the splits they were measured on."""

    reference: str
    repeats: int
    aucs: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    splits: dict[int, list[Split]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    n_labelled: int = 0
    #: class names of a multi-class run (``aucs`` then holds the macro AUC); empty when binary
    classes: list[str] = field(default_factory=list)
    #: one-vs-rest AUCs of a multi-class run, by (method, shots, class)
    class_aucs: dict[tuple[str, int, str], list[float]] = field(default_factory=dict)

    def methods(self) -> list[str]:
        """Method names in first-seen order."""
        return list(dict.fromkeys(name for name, _ in self.aucs))

    def shots(self) -> list[int]:
        """Shot counts in increasing order."""
        return sorted({k for _, k in self.aucs})


def run_morphology(
    labels: np.ndarray,
    methods: Sequence[Method],
    *,
    reference: str,
    shots: Sequence[int] = DEFAULT_SHOTS,
    repeats: int = 20,
    seed: int = 0,
    extra_shots: Mapping[str, Sequence[int]] | None = None,
    progress: bool = True,
    min_test: int = MIN_TEST_PER_CLASS,
) -> MorphologyRun:
    """Score every method on the same random splits at every feasible shot count.

    Parameters
    ----------
    labels
        Binary labels of all images (indices match the methods' images/features).
    methods
        Methods to score; one of them must be named ``reference`` (the LVM).
    reference
        Name of the method the paired differences are taken against.
    shots
        Shot counts (training images per class) for every method.
    repeats
        Random splits per shot count.
    seed
        Base seed of the splits.
    extra_shots
        More shot counts for some methods only, by method name (e.g. the ResNet18 at 100, 200).
    progress
        Show a progress bar over repeats (on stderr).
    min_test
        Test images each class needs beyond the shots; shot counts it cannot afford are skipped.
    """
    from sklearn.metrics import roc_auc_score
    from tqdm import tqdm

    y = binary_labels(labels)
    if repeats < 1:
        raise EvaluationError(f"repeats must be positive, got {repeats}")
    names = [m.name for m in methods]
    if reference not in names or len(set(names)) != len(names):
        raise EvaluationError(f"method names {names} must be unique and include {reference!r}")
    extra = extra_shots or {}
    all_shots = sorted({*shots, *(k for ks in extra.values() for k in ks)})
    kept, notes = feasible_shots(y, all_shots, min_test=min_test)
    run = MorphologyRun(reference=reference, repeats=repeats, notes=notes, n_labelled=len(y))
    plan = {k: [m for m in methods if k in shots or k in extra.get(m.name, ())] for k in kept}
    for k in kept:
        run.splits[k] = _draw_splits(y, n_classes=2, shots=k, repeats=repeats, seed=seed)
        for m in plan[k]:
            run.aucs[(m.name, k)] = []
    for r in tqdm(range(repeats), desc="repeats", disable=not progress, file=sys.stderr):
        for k in kept:
            split = run.splits[k][r]
            for m in plan[k]:
                t0 = time.perf_counter()
                s = m.scores(split.train, y[split.train], split.test, repeat=r, shots=k)
                run.seconds[m.name] = run.seconds.get(m.name, 0.0) + time.perf_counter() - t0
                run.aucs[(m.name, k)].append(float(roc_auc_score(y[split.test], s)))
    return run


def score_matrix(
    method: Method,
    train: np.ndarray,
    y_train: np.ndarray,
    test: np.ndarray,
    *,
    n_classes: int,
    repeat: int,
    shots: int,
) -> np.ndarray:
    """(n_test, n_classes) class scores of a method on a multi-class split.

    A method with ``multiclass = True`` (the linear head: multinomial logistic regression) is
    trained once; any other is trained one-vs-rest, once per class.
    """
    if getattr(method, "multiclass", False):
        s = np.asarray(method.scores(train, y_train, test, repeat=repeat, shots=shots), dtype=np.float64)
        if s.ndim == 1:  # two classes: one decision value for class 1
            s = np.column_stack([-s, s])
        return s
    cols = [
        method.scores(train, (y_train == c).astype(np.int64), test, repeat=repeat, shots=shots)
        for c in range(n_classes)
    ]
    return np.column_stack([np.asarray(c, dtype=np.float64) for c in cols])


def run_multiclass(
    labels: np.ndarray,
    classes: Sequence[str],
    methods: Sequence[Method],
    *,
    reference: str,
    shots: Sequence[int] = DEFAULT_SHOTS,
    repeats: int = 20,
    seed: int = 0,
    min_test: int = MIN_TEST_PER_CLASS,
    extra_shots: Mapping[str, Sequence[int]] | None = None,
    progress: bool = True,
) -> MorphologyRun:
    """Few-shot one-vs-rest AUC per class, and macro AUC, on paired multi-class splits.

    Parameters
    ----------
    labels
        Class index (0..C-1) of every image.
    classes
        Class names, indexed by ``labels``.
    methods
        Methods to score (see :func:`score_matrix`); one named ``reference``.
    reference
        Name of the method the paired (macro AUC) differences are taken against.
    shots
        Training images per class.
    repeats
        Random splits per shot count.
    seed
        Base seed of the splits.
    min_test
        Test images every class needs at a shot count; classes with fewer than
        ``min(shots) + min_test`` images are left out of the run (noted).
    extra_shots
        More shot counts for some methods only, by method name.
    progress
        Show a progress bar over repeats (on stderr).

    Returns
    -------
    MorphologyRun
        ``aucs`` holds the macro AUC per repeat, ``class_aucs`` the per-class AUCs, ``classes``
        the classes kept.

    Raises
    ------
    EvaluationError
        If fewer than two classes can afford the smallest shot count, or method names clash.
    """
    from sklearn.metrics import roc_auc_score
    from tqdm import tqdm

    y = np.asarray(labels, dtype=np.int64)
    if repeats < 1:
        raise EvaluationError(f"repeats must be positive, got {repeats}")
    if y.size == 0 or y.min() < 0 or y.max() >= len(classes):
        raise EvaluationError(f"labels must index the {len(classes)} classes")
    names = [m.name for m in methods]
    if reference not in names or len(set(names)) != len(names):
        raise EvaluationError(f"method names {names} must be unique and include {reference!r}")
    extra = extra_shots or {}
    all_shots = sorted({*shots, *(k for ks in extra.values() for k in ks)})
    if not all_shots or min(all_shots) < 1:
        raise EvaluationError(f"shots must be positive, got {all_shots}")
    counts = np.bincount(y, minlength=len(classes))
    need = min(all_shots) + min_test
    keep = [c for c in range(len(classes)) if counts[c] >= need]
    notes = [
        f"left out class {classes[c]} ({counts[c]} images < {min(all_shots)} shots + {min_test} test)"
        for c in range(len(classes))
        if counts[c] < need
    ]
    if len(keep) < 2:
        raise EvaluationError(
            f"fewer than 2 classes have {need} images (counts {dict(zip(classes, counts.tolist(), strict=True))}); "
            "try fewer --shots or a smaller --min-test"
        )
    mask = np.isin(y, keep)
    index = np.flatnonzero(mask)
    remap = {c: i for i, c in enumerate(keep)}
    yk = np.asarray([remap[int(v)] for v in y[mask]], dtype=np.int64)
    kept_names = [classes[c] for c in keep]
    kept_shots, more = feasible_shots(yk, all_shots, min_test=min_test)
    run = MorphologyRun(
        reference=reference, repeats=repeats, notes=notes + more, n_labelled=len(yk), classes=kept_names
    )
    plan = {k: [m for m in methods if k in shots or k in extra.get(m.name, ())] for k in kept_shots}
    for k in kept_shots:
        run.splits[k] = _draw_splits(yk, n_classes=len(keep), shots=k, repeats=repeats, seed=seed)
        for m in plan[k]:
            run.aucs[(m.name, k)] = []
            for c in kept_names:
                run.class_aucs[(m.name, k, c)] = []
    for r in tqdm(range(repeats), desc="repeats", disable=not progress, file=sys.stderr):
        for k in kept_shots:
            split = run.splits[k][r]
            train, test = index[split.train], index[split.test]
            for m in plan[k]:
                t0 = time.perf_counter()
                s = score_matrix(m, train, yk[split.train], test, n_classes=len(keep), repeat=r, shots=k)
                run.seconds[m.name] = run.seconds.get(m.name, 0.0) + time.perf_counter() - t0
                per_class = [float(roc_auc_score(yk[split.test] == j, s[:, j])) for j in range(len(keep))]
                for c, a in zip(kept_names, per_class, strict=True):
                    run.class_aucs[(m.name, k, c)].append(a)
                run.aucs[(m.name, k)].append(float(np.mean(per_class)))
    return run


def result_rows(run: MorphologyRun) -> list[dict[str, Any]]:
    """Flat JSON rows: one per (method, shots), then paired-difference rows against the reference.

    A multi-class run has one row per (method, shots, class), then the macro AUC rows
    (``class: "macro"``); its paired differences are on the macro AUC and carry ``class`` too.
    """

    def stats(a: Sequence[float]) -> dict[str, Any]:
        return {
            "repeats": len(a),
            "auc_mean": float(np.mean(a)),
            "auc_std": float(np.std(a, ddof=1)) if len(a) > 1 else 0.0,
        }

    macro = {"class": "macro"} if run.classes else {}
    rows: list[dict[str, Any]] = []
    for k in run.shots():
        for name in run.methods():
            a = run.aucs.get((name, k))
            if a is None:
                continue
            for c in run.classes:
                rows.append({"model": name, "shots": k, "class": c, **stats(run.class_aucs[(name, k, c)])})
            rows.append({"model": name, "shots": k, **macro, **stats(a)})
    for k in run.shots():
        ref = run.aucs.get((run.reference, k))
        if ref is None:
            continue
        for name in run.methods():
            if name == run.reference or (name, k) not in run.aucs:
                continue
            d = np.asarray(ref) - np.asarray(run.aucs[(name, k)])
            rows.append(
                {
                    "model": run.reference,
                    "shots": k,
                    **macro,
                    "vs": name,
                    "diff_mean": float(d.mean()),
                    "diff_std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                    "win_frac": float((d > 0).mean()),
                }
            )
    return rows


def shots_to_match(run: MorphologyRun, *, method: str, target_shots: int = 10) -> str | None:
    """How many shots ``method`` needs to reach the reference's mean AUC at ``target_shots``.

    Returns a sentence naming the fewest measured shot count that reaches it (or saying none
    does), or None when either was not measured.
    """
    ref = run.aucs.get((run.reference, target_shots))
    if ref is None:
        return None
    goal = float(np.mean(ref))
    tried = [k for k in run.shots() if (method, k) in run.aucs]
    if not tried:
        return None
    for k in tried:
        if float(np.mean(run.aucs[(method, k)])) >= goal:
            return (
                f"{method} reaches the LVM's {target_shots}-shot AUC ({goal:.3f}) at {k} shots per "
                f"class ({k / target_shots:g}x the labels)"
            )
    best = max(tried)
    return (
        f"{method} does not reach the LVM's {target_shots}-shot AUC ({goal:.3f}) within "
        f"{best} shots per class (> {best / target_shots:g}x the labels; at {best}: "
        f"{float(np.mean(run.aucs[(method, best)])):.3f})"
    )


def format_tables(run: MorphologyRun) -> str:
    """Human-readable tables, one per shot count."""
    rows = result_rows(run)
    lines = []
    width = max(len(n) for n in run.methods()) + 2
    for k in run.shots():
        test_n = len(run.splits[k][0].test)
        what = f"{len(run.classes)} classes, macro AUC" if run.classes else "AUC"
        lines.append(f"\n{k} shots per class  ({run.repeats} paired repeats, {test_n} test images; {what})")
        lines.append(f"  {'method':<{width}}{'AUC mean ± std':<18}{'LVM − method (mean ± std)':<28}LVM wins")
        diffs = {r["vs"]: r for r in rows if r["shots"] == k and "vs" in r}
        for r in rows:
            if r["shots"] != k or "vs" in r or r.get("class", "macro") != "macro":
                continue
            auc = f"{r['auc_mean']:.3f} ± {r['auc_std']:.3f}"
            d = diffs.get(r["model"])
            if r["model"] == run.reference:
                rest = f"{'(reference)':<28}"
            elif d is None:
                rest = f"{'—':<28}"
            else:
                rest = f"{d['diff_mean']:+.3f} ± {d['diff_std']:.3f}".ljust(28) + f"{d['win_frac']:.0%}"
            lines.append(f"  {r['model']:<{width}}{auc:<18}{rest}")
        if run.classes:
            lines.append("  one-vs-rest AUC per class (mean ± std; the column above is their macro mean)")
            lines.append(f"  {'method':<{width}}" + "".join(f"{c:<16}" for c in run.classes))
            for name in run.methods():
                if (name, k) not in run.aucs:
                    continue
                cells = []
                for c in run.classes:
                    a = run.class_aucs[(name, k, c)]
                    sd = float(np.std(a, ddof=1)) if len(a) > 1 else 0.0
                    cells.append(f"{float(np.mean(a)):.3f} ± {sd:.3f}".ljust(16))
                lines.append(f"  {name:<{width}}" + "".join(cells))
    for note in run.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    return values


def _baseline_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in BASELINES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown baseline(s) {unknown}; choose from {BASELINES}")
    return values


def register(groups: CommandGroups) -> None:
    """Add ``galsift eval morphology``."""
    p = groups.eval.add_parser(
        "morphology",
        help="few-shot AUC of LVM embeddings + linear head vs baselines on the same splits",
        description="Few-shot AUC of the LVM embeddings + a linear head against baselines "
        "trained on the same shots (paired random splits).",
    )
    p.add_argument("--data", type=Path, required=True, help="folder with labels.csv")
    p.add_argument(
        "--label",
        required=True,
        help="label column: 0/1; class names or integer codes (multi-class: per-class and macro AUC); "
        "or vote fractions with --threshold",
    )
    p.add_argument("--threshold", type=float, default=None, help="binarise the label: >= T -> 1")
    p.add_argument(
        "--min-test",
        type=int,
        default=MIN_TEST_PER_CLASS,
        help=f"test images every class needs beyond its shots (default {MIN_TEST_PER_CLASS}); "
        "multi-class: classes with fewer than min(shots) + this are left out",
    )
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint (.safetensors) or a variant name for an untrained model "
        "(default: the shipped encoder/checkpoints/lvm_tiny.safetensors)",
    )
    p.add_argument("--shots", type=_int_list, default=list(DEFAULT_SHOTS), help="default 5,10,20,50")
    p.add_argument("--repeats", type=int, default=20, help="paired random splits per shot count")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument(
        "--baselines",
        type=_baseline_list,
        default=list(DEFAULT_BASELINES),
        help=f"comma-separated subset of {','.join(BASELINES)} (default: {','.join(DEFAULT_BASELINES)})",
    )
    p.add_argument(
        "--resnet-shots",
        type=_int_list,
        default=list(DEFAULT_RESNET_EXTRA_SHOTS),
        help="extra shot counts for resnet18_scratch only, where the classes allow (default 100,200)",
    )
    p.add_argument("--resnet-steps", type=int, default=None, help="optimiser steps per ResNet18 run")
    p.add_argument("--resnet-size", type=int, default=None, help="ResNet18 input side (default 48)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N labelled images")
    p.add_argument("--batch-size", type=int, default=64, help="embedding batch size")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: half the CPU cores; on a busy machine, threads that "
        "spin against other processes cost more than they give)",
    )
    p.add_argument("--no-cache", action="store_true", help="do not use the preprocessing cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_morphology)


def _device(settings: Settings) -> str:
    import torch

    if settings.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return settings.device


def load_reference(spec: str | None, *, seed: int) -> tuple[nn.Module, str]:
    """The model to evaluate and its version name.

    Parameters
    ----------
    spec
        A checkpoint path, a registered variant name (built untrained with ``seed``), or None for
        the shipped checkpoint.
    seed
        Seed of the initialisation when ``spec`` names an untrained variant.

    Raises
    ------
    EvaluationError
        If ``spec`` is neither an existing checkpoint nor a variant, or the shipped one is missing.
    """
    import torch

    from encoder.models import create_model, list_models

    if spec is not None and spec in list_models():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = create_model(spec)
        return model.eval(), f"{spec}-untrained"
    from encoder import checkpoint

    path = Path(spec) if spec is not None else DEFAULT_CHECKPOINT
    if not path.is_file():
        raise EvaluationError(
            f"no checkpoint at {path}; pass --model PATH or a variant ({', '.join(list_models())})"
        )
    model, card = checkpoint.load_model(path)
    return model.eval(), _version_name(card, path)


def _threshold_hint(data: Any, args: argparse.Namespace) -> str:
    """Where the column's values lie, when a threshold left a single class."""
    if args.threshold is None:
        return ""
    try:
        values = np.asarray([float(r[args.label]) for r in data.table], dtype=np.float64)
    except (KeyError, ValueError):
        return ""
    return (
        f" ({args.label} ranges over [{values.min():.3g}, {values.max():.3g}] here, median "
        f"{np.median(values):.3g}: --threshold {args.threshold:g} puts every image in one class)"
    )


def _version_name(card: dict[str, Any], path: Path) -> str:
    for key in ("version", "model_version", "name"):
        value = card.get(key)
        if isinstance(value, str) and value:
            return value
    return path.stem


def _cmd_morphology(args: argparse.Namespace, settings: Settings) -> int:
    import torch

    before = torch.get_num_threads()
    threads = args.threads if args.threads is not None else (os.cpu_count() or 2) // 2
    torch.set_num_threads(max(1, threads))
    try:
        return _morphology(args, settings)
    finally:
        torch.set_num_threads(before)


def _morphology(args: argparse.Namespace, settings: Settings) -> int:
    from encoder import baselines
    from encoder.data import read_folder

    t_start = time.perf_counter()
    device = _device(settings)
    try:
        model, version = load_reference(args.model, seed=args.seed)
    except EvaluationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = int(model.img_size)  # type: ignore[arg-type]
    cache = None if args.no_cache else settings.data_dir / "cache" / "model_input"
    data = read_folder(
        args.data, label=args.label, threshold=args.threshold, size=size, limit=args.limit, cache_dir=cache
    )
    multi = class_labels(data.labels) if args.threshold is None else None
    if multi is not None:
        labels, classes = multi
        counts = np.bincount(labels, minlength=len(classes))
        shown = ", ".join(f"{c} {n}" for c, n in zip(classes, counts.tolist(), strict=True))
        print(
            f"{args.data}: {len(labels)} labelled images in {len(classes)} classes ({shown}), "
            f"model {version} at {size}px on {device}"
        )
    else:
        try:
            labels = binary_labels(data.labels)
        except EvaluationError as exc:
            print(f"error: {args.label}: {exc}{_threshold_hint(data, args)}", file=sys.stderr)
            return 2
        counts = np.bincount(labels, minlength=2)
        print(
            f"{args.data}: {len(labels)} labelled images ({counts[1]} with {args.label}=1, "
            f"{counts[0]} with 0), model {version} at {size}px on {device}"
        )

    methods: list[Method] = []
    seconds: dict[str, float] = {}

    def timed(name: str, make: Any) -> Any:
        t0 = time.perf_counter()
        out = make()
        seconds[name] = time.perf_counter() - t0
        return out

    kw = {"batch_size": args.batch_size, "device": device}
    methods.append(FeatureProbe(version, timed(version, lambda: embed_images(model, data.images, **kw))))
    variant = str(getattr(model, "variant", "model"))
    if "stages" in args.baselines:
        name = f"{version}:stages"
        methods.append(FeatureProbe(name, timed(name, lambda: stage_features(model, data.images, **kw))))
    if "untrained" in args.baselines:
        name = f"{variant}_untrained"
        fresh = baselines.untrained_like(model, seed=UNTRAINED_SEED)
        methods.append(FeatureProbe(name, timed(name, lambda: embed_images(fresh, data.images, **kw))))
    if "pca" in args.baselines:
        methods.append(FeatureProbe("pca_raw", timed("pca_raw", lambda: baselines.pca_features(data.images))))
    if "photometry" in args.baselines:
        feats = timed("photometry", lambda: baselines.photometry_features(data.images))
        methods.append(FeatureProbe("photometry", feats))
    extra: dict[str, list[int]] = {}
    if "resnet18" in args.baselines:
        overrides = {"steps": args.resnet_steps, "size": args.resnet_size}
        config = replace(baselines.ResNetConfig(), **{k: v for k, v in overrides.items() if v is not None})
        methods.append(baselines.ResNet18Scratch(data.images, config=config, seed=args.seed))
        extra[baselines.ResNet18Scratch.name] = [k for k in args.resnet_shots if k not in args.shots]
        print(f"resnet18_scratch: {config.size}px, {config.steps} steps of <= {config.batch_size}")
    try:
        # one-vs-rest per class for a multi-class column, the binary task otherwise
        task = (
            functools.partial(run_multiclass, labels, classes)
            if multi is not None
            else functools.partial(run_morphology, labels)
        )
        run = task(
            methods,
            reference=version,
            shots=args.shots,
            repeats=args.repeats,
            seed=args.seed,
            min_test=args.min_test,
            extra_shots=extra,
            progress=not args.no_progress,
        )
    except EvaluationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, s in seconds.items():
        run.seconds[name] = run.seconds.get(name, 0.0) + s
    print(format_tables(run))
    if "resnet18" in args.baselines:
        sentence = shots_to_match(run, method=baselines.ResNet18Scratch.name)
        if sentence:
            print(sentence)
    wall = time.perf_counter() - t_start
    spent = ", ".join(f"{n} {s:.0f}s" for n, s in run.seconds.items())
    print(f"time: {wall:.0f}s wall ({spent})")
    if args.json is not None:
        doc = {
            "command": "eval morphology",
            "data": str(args.data),
            "model_version": version,
            "results": result_rows(run),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
        print(f"wrote {args.json}")
    return 0
