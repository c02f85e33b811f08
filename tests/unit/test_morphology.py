"""detectors.morphology: heads on embeddings, calibration, the artifact and its card (no services)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from detectors import morphology as morph
from detectors.morphology import (
    SHIPPED_HEADS,
    MorphologyError,
    MorphologyHeads,
    TaskData,
    expected_calibration_error,
    fit_head,
    fit_platt,
    heldout_metrics,
    holdout_split,
    train_heads,
)

DIM = 16


def _blobs(
    rng: np.random.Generator, counts: list[int], *, shift: float, dim: int = DIM
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes whose means differ by ``shift`` along their own axis."""
    xs, ys = [], []
    for c, n in enumerate(counts):
        mean = np.zeros(dim)
        mean[c] = shift
        xs.append(rng.normal(size=(n, dim)) + mean)
        ys.append(np.full(n, c))
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64)


def _binary(rng: np.random.Generator, n0: int, n1: int, *, shift: float, name: str = "ring") -> TaskData:
    x, y = _blobs(rng, [n0, n1], shift=shift)
    return TaskData(name, f"set_{name}", ["0", "1"], x, y)


def _multi(rng: np.random.Generator, counts: list[int], *, shift: float) -> TaskData:
    x, y = _blobs(rng, counts, shift=shift)
    names = ["smooth_round", "spiral", "merger", "edge_on"][: len(counts)]
    return TaskData("morphology", "set_morph", names, x, y)


def test_heads_learn_separable_embeddings() -> None:
    rng = np.random.default_rng(0)
    tasks = [_binary(rng, 80, 80, shift=4.0), _multi(rng, [40, 40, 40], shift=4.0)]
    result = train_heads(tasks, encoder_version="enc-test", progress=False)
    assert result.metrics["ring"]["auc"] > 0.97
    m = result.metrics["morphology"]
    assert set(m["auc"]) == {"smooth_round", "spiral", "merger"}
    assert all(a > 0.97 for a in m["auc"].values()) and m["macro_auc"] > 0.97
    heads = result.heads
    assert heads.labels == ["ring", "smooth_round", "spiral", "merger"]
    x_new, y_new = _blobs(rng, [30, 30, 30], shift=4.0)
    scores = heads.predict(x_new)
    assert [(s.detector, s.label) for s in scores] == [("morphology", lab) for lab in heads.labels]
    for s in scores:
        assert s.probability.shape == (90,) and np.all((s.probability >= 0) & (s.probability <= 1))
    morph_p = np.stack([s.probability for s in scores[1:]], axis=1)
    np.testing.assert_allclose(morph_p.sum(axis=1), 1.0, atol=1e-9)
    assert (morph_p.argmax(axis=1) == y_new).mean() > 0.9


def test_calibration_takes_back_the_class_balancing_on_a_skewed_task() -> None:
    rng = np.random.default_rng(1)
    # 8% positives, overlapping: a balanced head puts the boundary at p = 0.5, far above the prior
    train = _binary(rng, 920, 80, shift=1.5)
    head = fit_head("rare", "set_rare", train.x, train.y, ["0", "1"], calibration="sigmoid", seed=0)
    x_test, y_test = _blobs(rng, [4600, 400], shift=1.5)
    m, curves = heldout_metrics(head, x_test, y_test)
    assert m["ece_raw"] > 0.15  # the balanced head's raw probabilities are far too high
    assert m["ece_calibrated"] < 0.04
    assert m["ece_calibrated"] < m["ece_raw"] / 4
    assert m["brier_calibrated"] < m["brier_raw"]
    assert abs(head.probability(x_test).mean() - y_test.mean()) < 0.03  # predicted rate ~ the prior
    assert sum(curves["calibrated"]["count"]) == len(y_test)
    iso = fit_head("rare", "set_rare", train.x, train.y, ["0", "1"], calibration="isotonic", seed=0)
    m_iso, _ = heldout_metrics(iso, x_test, y_test)
    assert m_iso["ece_calibrated"] < m["ece_raw"] / 2


@pytest.mark.parametrize("method", ["sigmoid", "isotonic"])
def test_calibrated_probabilities_are_monotone_in_the_score_and_bounded(method: str) -> None:
    rng = np.random.default_rng(2)
    task = _binary(rng, 60, 30, shift=1.0)
    head = fit_head("f", "s", task.x, task.y, ["0", "1"], calibration=method, seed=3)  # type: ignore[arg-type]
    z = np.linspace(-30, 30, 2001)[:, None]
    p = head.calibrate(z)
    assert np.all((p >= 0) & (p <= 1))
    assert np.all(np.diff(p) >= -1e-12)


def test_platt_never_inverts_a_ranking() -> None:
    rng = np.random.default_rng(3)
    s = rng.normal(size=200)
    y = (s < 0).astype(np.int64)  # scores anti-correlated with the label
    a, b = fit_platt(s, y)
    assert a >= 0.0
    assert abs(1 / (1 + np.exp(-b)) - y.mean()) < 0.05  # a ~ 0: the prior, whatever the score


def test_ece_of_perfectly_calibrated_and_of_confident_wrong_probabilities() -> None:
    rng = np.random.default_rng(4)
    p = rng.uniform(size=20000)
    y = rng.uniform(size=p.size) < p
    assert expected_calibration_error(p, y) < 0.02
    assert expected_calibration_error(np.full(100, 0.95), np.zeros(100)) == pytest.approx(0.95)


def test_holdout_is_stratified_and_keeps_two_for_training() -> None:
    y = np.array([0] * 40 + [1] * 8 + [2] * 3)
    train, held = holdout_split(y, fraction=0.25, seed=0)
    assert np.intersect1d(train, held).size == 0 and len(train) + len(held) == len(y)
    assert np.bincount(y[held]).tolist() == [10, 2, 1]
    assert np.bincount(y[train]).min() >= 2
    again, _ = holdout_split(y, fraction=0.25, seed=0)
    assert np.array_equal(train, again)


def test_rare_classes_and_one_class_tasks_are_left_out_with_notes() -> None:
    rng = np.random.default_rng(5)
    morph_task = _multi(rng, [20, 15, 2, 1], shift=4.0)  # merger 2, edge_on 1
    single = TaskData("featured", "set_f", ["0", "1"], rng.normal(size=(30, DIM)), np.ones(30, np.int64))
    result = train_heads([morph_task, single], encoder_version="enc", progress=False)
    assert [h.task for h in result.heads.heads] == ["morphology"]
    assert result.heads.heads[0].classes == ["smooth_round", "spiral"]
    # a multi-class task cut down to two classes still writes one probability per class
    assert result.heads.labels == ["smooth_round", "spiral"]
    assert any("merger (2)" in n and "edge_on (1)" in n for n in result.notes)
    assert any(n.startswith("featured: skipped") for n in result.notes)
    card_task = result.heads.card["tasks"][0]
    assert card_task["dropped_classes"] == {"merger": 2, "edge_on": 1}
    assert card_task["label_counts"] == {"smooth_round": 20, "spiral": 15, "merger": 2, "edge_on": 1}
    with pytest.raises(MorphologyError, match="no task"):
        train_heads([single], encoder_version="enc", progress=False)


def test_detection_labels_must_be_unique_across_tasks() -> None:
    rng = np.random.default_rng(6)
    with pytest.raises(MorphologyError, match="unique"):
        train_heads(
            [_multi(rng, [20, 20], shift=3.0), _binary(rng, 20, 20, shift=3.0, name="spiral")],
            encoder_version="enc",
            progress=False,
        )


def _trained(tmp_path: Path) -> tuple[morph.TrainingResult, Path]:
    rng = np.random.default_rng(7)
    result = train_heads(
        [_multi(rng, [30, 20, 12], shift=3.0), _binary(rng, 50, 20, shift=2.0)],
        encoder_version="lvm_tiny-test",
        source={"label_sets": {"morphology": "set_morph", "ring": "set_ring"}},
        progress=False,
    )
    path = result.heads.save(tmp_path / "heads.json")
    return result, path


def test_artifact_round_trip_card_and_version(tmp_path: Path) -> None:
    result, path = _trained(tmp_path)
    heads = result.heads
    assert (
        heads.version.startswith("morphology-heads-") and len(heads.version) == len("morphology-heads-") + 10
    )
    raw = path.read_bytes()
    assert raw.startswith(b"{") and json.loads(raw)["format"] == morph.FORMAT  # JSON, not a pickle
    loaded = MorphologyHeads.load(path)
    assert loaded.version == heads.version and loaded.encoder_version == "lvm_tiny-test"
    x = np.random.default_rng(8).normal(size=(25, DIM))
    for a, b in zip(heads.predict(x), loaded.predict(x), strict=True):
        assert a.label == b.label
        np.testing.assert_array_equal(a.probability, b.probability)
    card = json.loads(MorphologyHeads.card_path(path).read_text())
    assert card["version"] == heads.version and card["variant"] == "morphology-heads"
    assert card["encoder_version"] == "lvm_tiny-test" and card["dim"] == DIM
    assert card["weights_sha256"] == heads.checksum
    tasks = {t["task"]: t for t in card["tasks"]}
    assert tasks["morphology"]["classes"] == ["smooth_round", "spiral", "merger"]
    assert tasks["morphology"]["label_counts"] == {"smooth_round": 30, "spiral": 20, "merger": 12}
    assert tasks["ring"]["labels"] == ["ring"] and tasks["ring"]["label_counts"] == {"0": 50, "1": 20}
    for t in tasks.values():
        held, train = t["heldout_counts"], t["train_counts"]
        assert {k: held[k] + train[k] for k in held} == t["label_counts"]
        assert 0.5 < (t["heldout_metrics"].get("macro_auc") or t["heldout_metrics"]["auc"]) <= 1.0
        assert t["calibration"]["method"] == "sigmoid"
    assert card["training"]["calibration"] == "sigmoid" and card["source"]["label_sets"]["ring"] == "set_ring"
    # the same training gives the same bytes, hence the same version
    again, _ = _trained(tmp_path / "again")
    assert again.heads.version == heads.version


def test_load_refuses_a_card_for_other_weights_and_foreign_files(tmp_path: Path) -> None:
    _, path = _trained(tmp_path)
    card_path = MorphologyHeads.card_path(path)
    card = json.loads(card_path.read_text())
    card["weights_sha256"] = "0" * 64
    card_path.write_text(json.dumps(card))
    with pytest.raises(MorphologyError, match="other weights"):
        MorphologyHeads.load(path)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(MorphologyError, match="format"):
        MorphologyHeads.load(other)
    with pytest.raises(MorphologyError, match="no morphology heads"):
        MorphologyHeads.load(tmp_path / "missing.json")


def test_predict_refuses_wrong_shapes_and_nonfinite_input(tmp_path: Path) -> None:
    result, _ = _trained(tmp_path)
    with pytest.raises(MorphologyError, match=r"\(N, 16\)"):
        result.heads.predict(np.zeros((3, DIM + 1)))
    bad = np.zeros((2, DIM))
    bad[1, 3] = np.nan
    with pytest.raises(MorphologyError, match="NaN"):
        result.heads.predict(bad)
    empty = result.heads.predict(np.zeros((0, DIM)))
    assert all(s.probability.shape == (0,) for s in empty)


def test_reliability_plot_and_metric_rows(tmp_path: Path) -> None:
    result, _ = _trained(tmp_path)
    png = morph.plot_reliability(result, tmp_path / "rel.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = morph.metrics_rows(result)
    assert {r["class"] for r in rows if r["task"] == "morphology"} == {
        "smooth_round",
        "spiral",
        "merger",
        "macro",
    }
    assert all(r["model"] == result.heads.version for r in rows)
    table = morph.format_metrics(result)
    assert "macro" in table and "ring" in table


def test_shipped_heads_load_and_name_the_shipped_encoder() -> None:
    heads = MorphologyHeads.load(SHIPPED_HEADS)
    assert MorphologyHeads.load().version == heads.version  # the default path
    encoder_card = json.loads(
        (SHIPPED_HEADS.parents[2] / "encoder" / "checkpoints" / "lvm_tiny.json").read_text()
    )
    assert heads.encoder_version == encoder_card["version"]
    assert heads.card["version"] == heads.version and heads.dim == 256
    assert heads.card["tasks"], "the card lists the tasks"
    x = np.random.default_rng(9).normal(size=(4, 256))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for s in heads.predict(x):
        assert s.detector == "morphology" and np.all((s.probability >= 0) & (s.probability <= 1))


def test_train_morphology_command_is_registered() -> None:
    from detectors.cli_morphology import register
    from galsift.cli import CommandGroups

    parser = argparse.ArgumentParser(prog="galsift")
    top = parser.add_subparsers(dest="command", required=True)
    groups = CommandGroups(
        top=top,
        train=top.add_parser("train").add_subparsers(dest="train_command", required=True),
        eval=top.add_parser("eval").add_subparsers(dest="eval_command", required=True),
        bench=top.add_parser("bench").add_subparsers(dest="bench_command", required=True),
    )
    register(groups)
    args = parser.parse_args(
        ["train", "morphology", "--task", "ring=gz_decals_ring", "--task", "m=gz_morph", "--holdout", "0.3"]
    )
    assert args.task == [("ring", "gz_decals_ring"), ("m", "gz_morph")] and args.holdout == 0.3
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "morphology", "--task", "no-equals-sign"])


def test_auto_regularisation_is_chosen_on_out_of_fold_scores_only() -> None:
    rng = np.random.default_rng(10)
    task = _binary(rng, 40, 40, shift=2.0)
    head = fit_head("f", "s", task.x, task.y, ["0", "1"], c=None, seed=0)
    tried = head.calibration["oof_auc_by_C"]
    assert set(tried) == {f"{c:g}" for c in morph.C_GRID}
    assert head.calibration["C"] in morph.C_GRID
    assert tried[f"{head.calibration['C']:g}"] == max(tried.values())
    fixed = fit_head("f", "s", task.x, task.y, ["0", "1"], seed=0)
    assert fixed.calibration["C"] == morph.DEFAULT_C and set(fixed.calibration["oof_auc_by_C"]) == {"0.1"}
