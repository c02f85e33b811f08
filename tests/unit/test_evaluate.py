"""encoder.evaluate / encoder.baselines: paired few-shot splits, the JSON contract, features.

``small_lenses`` is in tests/conftest.py; the ResNet18 training test is in
tests/integration/test_baselines.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from encoder import baselines
from encoder.data import read_folder
from encoder.evaluate import (
    EvaluationError,
    FeatureProbe,
    feasible_shots,
    make_splits,
    register,
    run_morphology,
)
from galsift.cli import CommandGroups
from galsift.settings import Settings


def test_splits_are_paired_nested_and_cover_all_labelled_images() -> None:
    labels = np.array([0] * 30 + [1] * 17)
    s5 = make_splits(labels, shots=5, repeats=4, seed=7)
    s10 = make_splits(labels, shots=10, repeats=4, seed=7)
    assert len(s5) == 4
    for a, b in zip(s5, s10, strict=True):
        assert np.bincount(labels[a.train]).tolist() == [5, 5]
        assert np.intersect1d(a.train, a.test).size == 0
        assert np.union1d(a.train, a.test).tolist() == list(range(len(labels)))
        assert set(a.train) <= set(b.train)  # the 5 shots are among the 10
    again = make_splits(labels, shots=5, repeats=4, seed=7)
    assert all(np.array_equal(a.train, b.train) for a, b in zip(s5, again, strict=True))
    assert len({tuple(s.train) for s in s5}) == 4  # repeats differ
    other = make_splits(labels, shots=5, repeats=4, seed=8)
    assert any(not np.array_equal(a.train, b.train) for a, b in zip(s5, other, strict=True))
    with pytest.raises(EvaluationError):
        make_splits(labels, shots=13, repeats=1, seed=0)  # 17 < 13 + 5


def test_infeasible_shot_counts_are_skipped_with_a_note() -> None:
    labels = np.array([0] * 60 + [1] * 20)
    kept, notes = feasible_shots(labels, [5, 10, 15, 20, 50])
    assert kept == [5, 10, 15]
    assert len(notes) == 2 and "20 shots" in notes[0]


def test_labels_must_be_binary() -> None:
    probe = FeatureProbe("f", np.zeros((6, 2)))
    with pytest.raises(EvaluationError, match="threshold"):
        run_morphology(np.array([0, 1, 2, 0, 1, 2]), [probe], reference="f", shots=[1], repeats=1)


class _Recorder:
    """A method that scores with a fixed feature and remembers every split it was given."""

    def __init__(self, name: str, feature: np.ndarray) -> None:
        self.name = name
        self.feature = feature
        self.seen: list[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = []

    def scores(
        self, train: np.ndarray, y_train: np.ndarray, test: np.ndarray, *, repeat: int, shots: int
    ) -> np.ndarray:
        self.seen.append((repeat, shots, tuple(train), tuple(test)))
        return self.feature[test]


def test_every_method_sees_the_same_split_within_a_repeat() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 40)
    informative = labels + rng.normal(0, 0.5, len(labels))
    a = _Recorder("lvm", informative)
    b = _Recorder("noise", rng.normal(size=len(labels)))
    probe = FeatureProbe("probe", informative[:, None])
    run = run_morphology(
        labels, [a, b, probe], reference="lvm", shots=[5, 10], repeats=3, seed=3, progress=False
    )
    assert a.seen == b.seen and len(a.seen) == 6
    expected = [
        (s.repeat, k, tuple(s.train), tuple(s.test))
        for r in range(3)
        for k in (5, 10)
        for s in [run.splits[k][r]]
    ]
    assert a.seen == expected
    # the linear head keeps the sign: an informative feature gives a high AUC, noise does not
    assert np.mean(run.aucs[("probe", 10)]) > 0.8
    assert np.mean(run.aucs[("lvm", 10)]) > np.mean(run.aucs[("noise", 10)])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="galsift")
    top = parser.add_subparsers(dest="command", required=True)
    ev = top.add_parser("eval")
    bench = top.add_parser("bench")
    groups = CommandGroups(
        top=top,
        train=top.add_parser("train").add_subparsers(dest="train_command", required=True),
        eval=ev.add_subparsers(dest="eval_command", required=True),
        bench=bench.add_subparsers(dest="bench_command", required=True),
    )
    register(groups)
    return parser


def test_eval_morphology_writes_the_json_contract(
    small_lenses: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval.json"
    argv = [
        "eval", "morphology", "--data", str(small_lenses), "--label", "lens", "--model", "lvm_tiny",
        "--shots", "5,7,8", "--repeats", "2", "--baselines", "pca,photometry", "--json", str(out),
        "--no-progress",
    ]  # fmt: skip
    args = _parser().parse_args(argv)
    threads = torch.get_num_threads()
    status = args.func(args, Settings(data_dir=tmp_path / "var"))
    assert status == 0
    assert torch.get_num_threads() == threads  # the --threads choice does not leak
    doc = json.loads(out.read_text())
    assert set(doc) == {"command", "data", "model_version", "results"}
    assert doc["command"] == "eval morphology" and doc["data"] == str(small_lenses)
    version = doc["model_version"]
    assert version.startswith("lvm_tiny")
    auc_rows = [r for r in doc["results"] if "auc_mean" in r]
    diff_rows = [r for r in doc["results"] if "vs" in r]
    assert {(r["model"], r["shots"]) for r in auc_rows} == {
        (m, k) for m in (version, "pca_raw", "photometry") for k in (5, 7)
    }
    for r in auc_rows:
        assert set(r) == {"model", "shots", "repeats", "auc_mean", "auc_std"}
        assert r["repeats"] == 2 and 0.0 <= r["auc_mean"] <= 1.0 and r["auc_std"] >= 0.0
    assert {(r["vs"], r["shots"]) for r in diff_rows} == {
        (m, k) for m in ("pca_raw", "photometry") for k in (5, 7)
    }
    for r in diff_rows:
        assert set(r) == {"model", "shots", "vs", "diff_mean", "diff_std", "win_frac"}
        assert r["model"] == version and 0.0 <= r["win_frac"] <= 1.0
        mine = next(a for a in auc_rows if a["model"] == version and a["shots"] == r["shots"])
        theirs = next(a for a in auc_rows if a["model"] == r["vs"] and a["shots"] == r["shots"])
        assert r["diff_mean"] == pytest.approx(mine["auc_mean"] - theirs["auc_mean"])
    printed = capsys.readouterr().out
    assert "5 shots per class" in printed and "pca_raw" in printed and "LVM wins" in printed
    assert "skipped 8 shots" in printed


def test_eval_morphology_refuses_non_binary_labels(
    small_lenses: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with (small_lenses / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    folder = tmp_path / "frac"
    shutil.copytree(small_lenses / "images", folder / "images")
    with (folder / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "score"])
        writer.writeheader()
        writer.writerows({"file": r["file"], "score": str(0.1 * (i % 10))} for i, r in enumerate(rows))
    argv = ["eval", "morphology", "--data", str(folder), "--label", "score", "--model", "lvm_tiny"]
    args = _parser().parse_args([*argv, "--baselines", "pca", "--no-progress"])
    assert args.func(args, Settings(data_dir=tmp_path / "var")) == 2
    assert "--threshold" in capsys.readouterr().err


def test_photometry_features_follow_flux(small_lenses: Path) -> None:
    data = read_folder(small_lenses, size=32)
    f1 = baselines.photometry_features(data.images[:4])
    f2 = baselines.photometry_features(data.images[:4] * 2.0)
    n_ap = 3 * len(baselines.APERTURE_FRACTIONS)
    assert f1.shape[0] == 4 and np.isfinite(f1).all()
    np.testing.assert_allclose(f2[:, :n_ap], 2.0 * f1[:, :n_ap], rtol=1e-5)
    pca = baselines.pca_features(data.images, n_components=5)
    assert pca.shape == (len(data), 5)
