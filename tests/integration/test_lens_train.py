"""``galsift train lens`` and ``galsift eval lens`` end to end on a handful of images (CPU).

A few simulated lenses train both backbones for a few steps on the same batches; the LVM
detector's loss falls and its checkpoint loads; the evaluation of a tiny graded folder writes the
JSON contract with one row per backbone and leaves out the real negatives the detectors saw.
No stack is started: these tests only need the shipped encoder checkpoint.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectors import lens_data
from detectors.lens_train import LensTrainConfig, LensTrainResult, train_lens
from detectors.lensfinder import LensFinder
from galsift.cli import main

pytestmark = pytest.mark.integration

SIZE = 96  # the shipped encoder's input size


@pytest.fixture(scope="module")
def graded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labels.csv folder of 12 PNG composites: 6 simulated lenses (grade 2) and 6 non-lenses (0)."""
    root = tmp_path_factory.mktemp("graded")
    (root / "images").mkdir()
    cfg = lens_data.LensDataConfig(size=SIZE, colour_fraction=0.0)
    sims = lens_data.simulate_set(["sim_lens", "sim_lookalike"] * 6, seed=11, config=cfg)
    rows = []
    for i, (img, lens) in enumerate(zip(sims.images, sims.is_lens, strict=True)):
        rgb = (np.clip(img + 0.03, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
        name = f"images/sim_{i:02d}.png"
        Image.fromarray(rgb).save(root / name)
        rows.append({"file": name, "expert_grade": 2.0 if lens else 0.0})
    with (root / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "expert_grade"])
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def trained(graded: Path, tmp_path_factory: pytest.TempPathFactory) -> list[LensTrainResult]:
    out = tmp_path_factory.mktemp("ckpt") / "lens_{backbone}.safetensors"
    cfg = LensTrainConfig(
        out=str(out),
        backbones=("lvm", "resnet50"),
        n_train=4,
        n_test=4,
        steps=10,
        batch_size=4,
        lr=1e-3,
        warmup=2,
        negatives=(f"{graded}:expert_grade=0.0",),
        negative_fraction=0.5,
        data=lens_data.LensDataConfig(size=SIZE, lens_fraction=0.75, real_fraction=0.25),
        log_every=1,
        progress=False,
    )
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_lens(cfg)
    finally:
        torch.set_num_threads(before)


def test_training_lowers_the_loss(trained: list[LensTrainResult]) -> None:
    lvm = trained[0]
    assert lvm.backbone == "lvm" and len(lvm.history) == 10
    losses = [h["loss"] for h in lvm.history]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert all(np.isfinite(h["loss"]) for r in trained for h in r.history)


def test_checkpoints_load_and_detect(trained: list[LensTrainResult]) -> None:
    for r in trained:
        card = json.loads(r.path.with_suffix(".json").read_text())
        assert card["backbone"] == r.backbone and card["step"] == 10
        assert set(card["metrics"]) >= {"detection_accuracy", "mask_iou", "auroc"}
        assert card["data"]["train"]["total"] == 4 and card["data"]["negatives"][0]["used"] >= 1
        finder = LensFinder.load(r.path, backbone=r.backbone, image_size=SIZE)
        assert finder.version == card["version"]
        dets = finder.detect(np.zeros((2, 3, SIZE, SIZE), np.float32))
        assert len(dets) == 2 and all(0.0 <= d.score <= 1.0 for d in dets)
    # same data and budget: both saw the same number of steps and training images
    a, b = (json.loads(r.path.with_suffix(".json").read_text()) for r in trained)
    assert a["data"]["train"] == b["data"]["train"] and a["step"] == b["step"]


def test_eval_writes_the_json_contract(trained: list[LensTrainResult], graded: Path, tmp_path: Path) -> None:
    out = tmp_path / "lens.json"
    args = ["eval", "lens", "--data", str(graded), "--score-col", "expert_grade"]
    args += [
        "--positive-min",
        "1.7",
        "--negative-max",
        "0.5",
        "--json",
        str(out),
        "--no-progress",
        "--no-cache",
    ]
    for r in trained:
        args += ["--model", str(r.path)]
    assert main(args) == 0
    doc = json.loads(out.read_text())
    assert doc["command"] == "eval lens" and doc["data"] == str(graded)
    assert doc["model_version"] == trained[0].card["version"]
    rows = doc["results"]
    assert [r["model"] for r in rows] == [t.card["version"] for t in trained]
    used = trained[0].card["data"]["negatives"][0]["used"]
    for row in rows:
        for key in ("auroc", "tpr_at_fpr_0.01", "tpr_at_0fp"):
            assert 0.0 <= row[key] <= 1.0
        assert row["n_positive"] == 6 and row["n_negative"] == 6 - used and row["n_excluded"] == used
