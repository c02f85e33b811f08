"""encoder.evaluate on multi-class labels: one-vs-rest per-class AUC, macro AUC, the JSON rows."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from encoder.evaluate import (
    EvaluationError,
    FeatureProbe,
    class_labels,
    register,
    result_rows,
    run_morphology,
    run_multiclass,
)
from galsift.cli import CommandGroups
from galsift.settings import Settings


def test_class_labels_tells_classes_from_binary_and_fractions() -> None:
    idx, names = class_labels(np.array(["spiral", "merger", "spiral", "edge_on"]))  # type: ignore[misc]
    assert names == ["edge_on", "merger", "spiral"] and idx.tolist() == [2, 1, 2, 0]
    idx, names = class_labels(np.array([3, 7, 3, 9]))  # type: ignore[misc]
    assert names == ["3", "7", "9"] and idx.tolist() == [0, 1, 0, 2]
    assert class_labels(np.array([0, 1, 1])) is None
    assert class_labels(np.array([0.2, 0.7, 0.9])) is None  # fractions: --threshold, not classes
    assert class_labels(None) is None


def _three_classes(rng: np.random.Generator, n: int = 30) -> tuple[np.ndarray, np.ndarray]:
    y = np.repeat(np.arange(3), n)
    x = rng.normal(size=(len(y), 6))
    x[np.arange(len(y)), y] += 4.0  # each class shifted along its own axis
    return x, y


class _OneVsRestRecorder:
    """A binary-only method: remembers the splits and binary labels it is trained on."""

    def __init__(self, name: str, feature: np.ndarray) -> None:
        self.name = name
        self.feature = feature
        self.seen: list[tuple[int, int, tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = []

    def scores(
        self, train: np.ndarray, y_train: np.ndarray, test: np.ndarray, *, repeat: int, shots: int
    ) -> np.ndarray:
        self.seen.append((repeat, shots, tuple(train), tuple(test), tuple(y_train)))
        return self.feature[test]


def test_multiclass_aucs_per_class_and_macro_on_paired_splits() -> None:
    rng = np.random.default_rng(0)
    x, y = _three_classes(rng)
    probe = FeatureProbe("lvm", x)
    noise = FeatureProbe("noise", rng.normal(size=x.shape))
    ovr = _OneVsRestRecorder("ovr", x[:, 0])
    run = run_multiclass(
        y,
        ["a", "b", "c"],
        [probe, noise, ovr],
        reference="lvm",
        shots=[2, 5],
        repeats=4,
        seed=1,
        progress=False,
    )
    assert run.classes == ["a", "b", "c"] and run.shots() == [2, 5]
    for k in (2, 5):
        for c in "abc":
            assert np.mean(run.class_aucs[("lvm", k, c)]) > 0.9
        # the macro AUC of a repeat is the mean of its per-class AUCs
        per_repeat = np.mean([run.class_aucs[("lvm", k, c)] for c in "abc"], axis=0)
        np.testing.assert_allclose(run.aucs[("lvm", k)], per_repeat)
        assert abs(np.mean(run.aucs[("noise", k)]) - 0.5) < 0.15
    # the binary-only method is trained one-vs-rest: once per class, on the same split as the others
    assert len(ovr.seen) == 4 * 2 * 3
    for r in range(4):
        for k in (2, 5):
            split = run.splits[k][r]
            calls = [s for s in ovr.seen if s[0] == r and s[1] == k]
            assert {s[2] for s in calls} == {tuple(split.train)}
            assert sorted(sum(s[4]) for s in calls) == [k, k, k]  # k positives for each class
    # class feature 0 only separates class "a"
    assert np.mean(run.class_aucs[("ovr", 5, "a")]) > 0.9
    # shots are nested within a repeat, as in the binary protocol
    assert set(run.splits[2][0].train) <= set(run.splits[5][0].train)


def test_small_classes_are_left_out_with_a_note_and_two_classes_are_needed() -> None:
    rng = np.random.default_rng(1)
    y = np.array([0] * 12 + [1] * 12 + [2] * 3)
    x = rng.normal(size=(len(y), 4))
    run = run_multiclass(
        y,
        ["big", "other", "rare"],
        [FeatureProbe("m", x)],
        reference="m",
        shots=[2, 5],
        repeats=2,
        progress=False,
    )
    assert run.classes == ["big", "other"] and run.n_labelled == 24
    assert any("rare" in n for n in run.notes)
    assert run.shots() == [2, 5]
    with pytest.raises(EvaluationError, match="fewer than 2 classes"):
        run_multiclass(
            y, ["big", "other", "rare"], [FeatureProbe("m", x)], reference="m", shots=[8], progress=False
        )


def test_json_rows_keep_the_design_keys() -> None:
    rng = np.random.default_rng(2)
    x, y = _three_classes(rng, 12)
    methods = [FeatureProbe("lvm", x), FeatureProbe("pca_raw", rng.normal(size=x.shape))]
    run = run_multiclass(y, ["a", "b", "c"], methods, reference="lvm", shots=[3], repeats=3, progress=False)
    rows = result_rows(run)
    auc_rows = [r for r in rows if "auc_mean" in r]
    assert {(r["model"], r["class"]) for r in auc_rows} == {
        (m, c) for m in ("lvm", "pca_raw") for c in ("a", "b", "c", "macro")
    }
    for r in auc_rows:
        assert set(r) == {"model", "shots", "class", "repeats", "auc_mean", "auc_std"}
    diff = [r for r in rows if "vs" in r]
    assert len(diff) == 1 and diff[0]["class"] == "macro" and diff[0]["vs"] == "pca_raw"
    macro = {r["model"]: r["auc_mean"] for r in auc_rows if r["class"] == "macro"}
    assert diff[0]["diff_mean"] == pytest.approx(macro["lvm"] - macro["pca_raw"])
    # binary runs keep their rows without a class key
    yb = (y == 0).astype(np.int64)
    binary = run_morphology(
        yb, [FeatureProbe("lvm", x)], reference="lvm", shots=[3], repeats=2, progress=False
    )
    assert all("class" not in r for r in result_rows(binary))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="galsift")
    top = parser.add_subparsers(dest="command", required=True)
    groups = CommandGroups(
        top=top,
        train=top.add_parser("train").add_subparsers(dest="train_command", required=True),
        eval=top.add_parser("eval").add_subparsers(dest="eval_command", required=True),
        bench=top.add_parser("bench").add_subparsers(dest="bench_command", required=True),
    )
    register(groups)
    return parser


def test_eval_morphology_runs_the_bundled_five_class_set(
    repo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = repo_data / "gz_decals_examples"
    out = tmp_path / "m.json"
    base = ["eval", "morphology", "--data", str(data), "--label", "morphology", "--model", "lvm_tiny"]
    argv = [
        *base,
        "--shots",
        "1",
        "--min-test",
        "1",
        "--repeats",
        "2",
        "--baselines",
        "pca",
        "--json",
        str(out),
    ]
    args = _parser().parse_args([*argv, "--no-progress"])
    assert args.func(args, Settings(data_dir=tmp_path / "var")) == 0
    doc = json.loads(out.read_text())
    classes = {r["class"] for r in doc["results"] if "auc_mean" in r}
    # the bundled examples: merger 11, spiral 3, smooth_cigar 3, smooth_round 2, edge_on 1
    assert classes == {"merger", "spiral", "smooth_cigar", "smooth_round", "macro"}
    printed = capsys.readouterr().out
    assert "left out class edge_on" in printed and "one-vs-rest AUC per class" in printed
    # with the default shot counts no two classes can be both trained on and tested: a clear refusal
    args = _parser().parse_args([*base, "--baselines", "pca", "--no-progress"])
    assert args.func(args, Settings(data_dir=tmp_path / "var")) == 2
    assert "fewer than 2 classes" in capsys.readouterr().err


def test_a_threshold_that_leaves_one_class_says_where_the_values_lie(
    repo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = repo_data / "cfhtls_lens_candidates"
    with (src / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))[:12]
    folder = tmp_path / "fractions"
    (folder / "images").mkdir(parents=True)
    for r in rows:
        shutil.copy(src / r["file"], folder / r["file"])
    with (folder / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "featured_fraction"])
        writer.writeheader()
        writer.writerows(
            {"file": r["file"], "featured_fraction": f"{0.6 + 0.02 * i:.2f}"} for i, r in enumerate(rows)
        )
    argv = ["eval", "morphology", "--data", str(folder), "--label", "featured_fraction", "--threshold", "0.5"]
    args = _parser().parse_args([*argv, "--model", "lvm_tiny", "--baselines", "pca", "--no-progress"])
    assert args.func(args, Settings(data_dir=tmp_path / "var")) == 2
    err = capsys.readouterr().err
    assert "only class {1}" in err and "[0.6, 0.82]" in err
