"""The lens finder: Mask R-CNN on the LVM encoder (and the ResNet50 baseline), its data and cards.

Everything runs on CPU at 64 px with a randomly initialised tiny LVM, except the tests that check
the initialisation from the shipped encoder checkpoint (96 px, one image).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from detectors import lens_data
from detectors.lens_eval import binary_metrics, trained_files
from detectors.lensfinder import (
    DEFAULT_ENCODER_CHECKPOINT,
    DetectorConfig,
    IncompatibleDetector,
    LensDetection,
    LensFinder,
    LensFinderError,
    build_lens_detector,
    detector_config,
    save_detector,
)
from encoder.checkpoint import IncompatibleCheckpoint, card_path, load_model

SIZE = 64
TINY_LVM = {"img_size": SIZE, "window_size": 4}


def tiny(backbone: str, **kw: Any) -> Any:
    if backbone == "lvm":
        return build_lens_detector(
            "lvm", lvm_checkpoint=None, lvm_overrides=TINY_LVM, image_size=SIZE, seed=0, **kw
        )
    return build_lens_detector("resnet50", image_size=SIZE, seed=0, **kw)


def batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two images: one with a ring-shaped 'arc' instance, one negative."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, SIZE, SIZE, generator=g) * 0.1
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    r = torch.sqrt((yy - 31.5) ** 2 + (xx - 31.5) ** 2)
    ring = (r > 7) & (r < 10)
    images[0, 2][ring] += 0.6
    masks = torch.stack([ring, torch.zeros_like(ring)])
    return list(images), lens_data.targets_for(masks)


@pytest.fixture(scope="module")
def lvm_model() -> Any:
    return tiny("lvm")


@pytest.fixture(scope="module")
def resnet_model() -> Any:
    return tiny("resnet50")


@pytest.mark.parametrize("which", ["lvm", "resnet50"])
def test_forward_train_and_eval(which: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(f"{'lvm' if which == 'lvm' else 'resnet'}_model")
    images, targets = batch()
    model.train()
    losses = model(images, targets)
    assert set(losses) == {
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
        "loss_objectness",
        "loss_rpn_box_reg",
    }
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for o in out:
        assert set(o) >= {"boxes", "scores", "labels", "masks"}
        k = len(o["scores"])
        assert o["boxes"].shape == (k, 4) and o["masks"].shape == (k, 1, SIZE, SIZE)
        assert bool(torch.all((o["scores"] >= 0) & (o["scores"] <= 1)))
    cfg = detector_config(model)
    assert cfg.image_size == SIZE and model.transform.min_size == (SIZE,) and model.transform.max_size == SIZE


@pytest.mark.parametrize("which", ["lvm", "resnet50"])
def test_fpn_over_four_stages(which: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(f"{'lvm' if which == 'lvm' else 'resnet'}_model")
    fpn = model.backbone.fpn
    assert len(fpn.inner_blocks) == 4 and len(fpn.layer_blocks) == 4
    with torch.no_grad():
        maps = model.backbone(torch.zeros(1, 3, SIZE, SIZE))
    assert list(maps) == ["0", "1", "2", "3", "pool"]
    assert [m.shape[-1] for m in maps.values()] == [SIZE // 4, SIZE // 8, SIZE // 16, SIZE // 32, SIZE // 64]
    assert all(m.shape[1] == model.backbone.out_channels for m in maps.values())


def test_lvm_backbone_carries_encoder_only(lvm_model: torch.nn.Module) -> None:
    keys = list(lvm_model.state_dict())
    assert not any(".decoder." in k or ".embed_proj." in k for k in keys)
    assert any(k.startswith("backbone.body.stages.3.") for k in keys)


def _trainable(module: torch.nn.Module) -> bool:
    flags = {p.requires_grad for p in module.parameters()}
    assert len(flags) == 1, "a part is partly frozen"
    return flags.pop()


@pytest.mark.parametrize("layers", [0, 2, 5])
def test_trainable_layers_lvm(layers: int) -> None:
    model = tiny("lvm", trainable_layers=layers)
    body = model.backbone.body
    parts = [[body.stem, body.patch_embed]] + [[body.stages[i], body.stage_norms[i]] for i in range(4)]
    expected = [False] * (5 - layers) + [True] * layers
    assert [all(_trainable(m) for m in part) for part in parts] == expected
    # the pyramid and the heads always train
    assert _trainable(model.backbone.fpn) and _trainable(model.roi_heads) and _trainable(model.rpn)
    assert detector_config(model).trainable_layers == layers


def test_trainable_layers_resnet50() -> None:
    model = tiny("resnet50", trainable_layers=2)
    body = model.backbone.body
    assert [
        _trainable(getattr(body, n)) for n in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
    ] == [
        False,
        False,
        False,
        False,
        True,
        True,
    ]
    assert isinstance(body.bn1, torch.nn.BatchNorm2d)  # trainable BatchNorm: trained from scratch


def test_default_trainable_layers() -> None:
    assert detector_config(tiny("resnet50")).trainable_layers == 5  # from scratch: everything
    assert detector_config(tiny("lvm")).trainable_layers == 5  # random LVM: everything


def test_init_from_shipped_encoder() -> None:
    model = build_lens_detector("lvm", seed=0)
    cfg = detector_config(model)
    assert cfg.image_size == 96 and cfg.trainable_layers == 3 and cfg.lvm_variant == "lvm_tiny"
    assert cfg.image_mean == (0.0, 0.0, 0.0) and cfg.image_std == (1.0, 1.0, 1.0)
    lvm, _ = load_model(DEFAULT_ENCODER_CHECKPOINT)
    ours = model.backbone.body.state_dict()
    for k, v in lvm.state_dict().items():
        if k.startswith(("stages.", "stem.", "patch_embed.")):
            assert torch.equal(ours[k], v), k
    model.eval()
    with torch.no_grad():
        out = model([torch.zeros(3, 96, 96)])
    assert out[0]["masks"].shape[-2:] == (96, 96)


def test_refuses_encoder_with_other_preprocessing(tmp_path: Path) -> None:
    weights = tmp_path / "enc.safetensors"
    shutil.copy(DEFAULT_ENCODER_CHECKPOINT, weights)
    card = json.loads(card_path(DEFAULT_ENCODER_CHECKPOINT).read_text())
    card["preprocess_version"] = "0-other"
    card_path(weights).write_text(json.dumps(card))
    with pytest.raises(IncompatibleCheckpoint):
        build_lens_detector("lvm", lvm_checkpoint=weights)


def test_bad_arguments() -> None:
    with pytest.raises(LensFinderError):
        build_lens_detector("vit")
    with pytest.raises(LensFinderError):
        tiny("resnet50", trainable_layers=6)
    with pytest.raises(LensFinderError):  # the LVM was built for 64 px
        build_lens_detector("lvm", lvm_checkpoint=None, lvm_overrides=TINY_LVM, image_size=96)
    with pytest.raises(LensFinderError):
        DetectorConfig.from_dict({"backbone": "lvm", "nonsense": 1})


@pytest.fixture()
def saved(tmp_path: Path, lvm_model: torch.nn.Module) -> Path:
    path = tmp_path / "lens_lvm.safetensors"
    save_detector(path, lvm_model, card={"metrics": {"detection_accuracy": 0.5}}, half=True)
    return path


def test_card_round_trip(saved: Path, lvm_model: torch.nn.Module) -> None:
    card = json.loads(card_path(saved).read_text())
    assert card["backbone"] == "lvm" and card["image_size"] == SIZE and card["dtype"] == "float16"
    assert card["preprocess_version"] and card["input_channels"] == ["z", "r", "g"] and card["band_sets"]
    finder = LensFinder.load(saved, backbone="lvm", image_size=SIZE)
    assert finder.version == card["version"] and finder.version.startswith("lens_lvm-")
    images = np.zeros((3, 3, SIZE, SIZE), np.float32)
    dets = finder.detect(images, min_score=0.0)
    assert len(dets) == 3 and all(isinstance(d, LensDetection) for d in dets)
    for d in dets:
        assert 0.0 <= d.score <= 1.0
        assert d.boxes.dtype == np.float32 and d.boxes.shape == (len(d), 4)
        assert d.masks.dtype == bool and d.masks.shape == (len(d), SIZE, SIZE)
        assert d.score == (float(d.scores.max()) if len(d) else 0.0)
    none = finder.detect(images, min_score=1.1)
    assert all(len(d) == 0 and d.masks.shape == (0, SIZE, SIZE) for d in none)
    np.testing.assert_allclose(finder.scores(images), [d.score for d in dets])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("preprocess_version", "999"),
        ("input_channels", ["g", "r", "z"]),
        ("band_sets", ["g,r,z"]),
        ("image_size", 96),
        ("backbone", "resnet50"),
    ],
)
def test_card_mismatch_refused(saved: Path, field: str, value: object) -> None:
    cp = card_path(saved)
    card = json.loads(cp.read_text())
    card[field] = value
    cp.write_text(json.dumps(card))
    with pytest.raises(IncompatibleDetector):
        LensFinder.load(saved)


def test_expectations_refused(saved: Path) -> None:
    with pytest.raises(IncompatibleDetector):
        LensFinder.load(saved, backbone="resnet50")
    with pytest.raises(IncompatibleDetector):
        LensFinder.load(saved, image_size=96)


def test_detect_refuses_bad_input(lvm_model: torch.nn.Module) -> None:
    finder = LensFinder(lvm_model, {})
    assert finder.version == "lens_lvm-unsaved"
    with pytest.raises(LensFinderError):
        finder.detect(np.zeros((1, 3, 96, 96), np.float32))
    with pytest.raises(LensFinderError):
        finder.detect(np.full((1, 3, SIZE, SIZE), np.nan, np.float32))
    with pytest.raises(LensFinderError):
        finder.detect(np.zeros((1, 3, SIZE, SIZE), np.uint8))


# ------------------------------------------------------------------------------------ data
def test_simulated_lens_has_mask_and_is_reproducible() -> None:
    cfg = lens_data.LensDataConfig(size=SIZE, colour_fraction=0.0)
    img, mask, colour = lens_data.simulate_sample(3, 0, kind="sim_lens", config=cfg)
    again, mask2, _ = lens_data.simulate_sample(3, 0, kind="sim_lens", config=cfg)
    assert img.shape == (3, SIZE, SIZE) and img.dtype == np.float32 and not colour
    assert mask.sum() >= cfg.min_arc_pixels
    np.testing.assert_array_equal(img, again)
    np.testing.assert_array_equal(mask, mask2)
    box = lens_data.box_from_mask(mask)
    assert box.shape == (1, 4) and box[0, 2] > box[0, 0] and box[0, 3] > box[0, 1]
    neg, neg_mask, _ = lens_data.simulate_sample(3, 1, kind="sim_lookalike", config=cfg)
    assert not neg_mask.any() and np.isfinite(neg).all()


def test_colour_composite_is_8bit_rgb() -> None:
    rng = np.random.default_rng(0)
    flux = lens_data.simulate_lookalike(rng, size=40).flux
    rgb = lens_data.colour_composite(flux, rng)
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 80, 80)


def test_painted_arcs_on_a_real_looking_host() -> None:
    rng = np.random.default_rng(4)
    host = np.clip(rng.normal(0.04, 0.01, size=(3, SIZE, SIZE)), 0, 1).astype(np.float32)
    cfg = lens_data.LensDataConfig(size=SIZE)
    made = None
    for _ in range(10):
        made = lens_data.paint_arcs(host, rng, config=cfg, colour=True)
        if made is not None:
            break
    assert made is not None
    image, mask = made
    assert mask.sum() >= cfg.min_arc_pixels and image.min() >= 0.0 and image.max() <= 1.0
    # the arcs add light where the mask is, and the rest stays close to the host
    assert (image - host)[1][mask].mean() > 5 * abs((image - host)[1][~mask].mean())


def test_training_set_mixes_kinds() -> None:
    cfg = lens_data.LensDataConfig(size=SIZE, lens_fraction=0.5, real_fraction=0.25, painted_fraction=0.25)
    rng = np.random.default_rng(0)
    hosts = lens_data.LensSet(
        np.clip(rng.normal(0.04, 0.01, size=(3, 3, SIZE, SIZE)), 0, 1).astype(np.float32),
        np.zeros((3, SIZE, SIZE), bool),
        np.zeros(3, bool),
        np.full(3, "real", dtype=object),
        np.ones(3, bool),
        np.asarray(["f/a.jpg", "f/b.jpg", "f/c.jpg"], dtype=object),
    )
    train = lens_data.training_set(8, seed=1, config=cfg, negatives=hosts)
    counts = train.counts()
    assert counts["total"] == 8 and counts["real"] == 2 and counts["real_painted"] == 2
    assert counts["sim_lens"] == 2 and counts["sim_galaxy"] + counts["sim_lookalike"] == 2
    assert np.array_equal(train.is_lens, train.masks.any(axis=(1, 2)))
    assert set(train.files[train.kind == "real_painted"]) <= set(hosts.files)
    # without real negatives everything is simulated
    only_sims = lens_data.training_set(4, seed=1, config=cfg).counts()
    assert only_sims["real"] == only_sims["real_painted"] == 0 and only_sims["sim_lens"] == 2


def test_targets_and_flips_keep_masks_on_their_pixels() -> None:
    _, targets = batch()
    assert targets[0]["boxes"].shape == (1, 4) and targets[0]["labels"].tolist() == [1]
    assert targets[1]["boxes"].shape == (0, 4) and targets[1]["masks"].shape == (0, SIZE, SIZE)
    x = torch.zeros(4, 3, 16, 16)
    m = torch.zeros(4, 16, 16, dtype=torch.bool)
    x[:, 0, 2, 5] = 1.0
    m[:, 2, 5] = True
    fx, fm = lens_data.dihedral_pair(x, m, torch.Generator().manual_seed(1))
    assert torch.equal(fx[:, 0] > 0, fm)


def test_negative_specs_and_training_share() -> None:
    spec = lens_data.NegativeSpec.parse("data/cfhtls:lens=0")
    assert spec.column == "lens" and spec.value == "0" and not spec.negate
    assert spec.matches({"lens": "0"}) and not spec.matches({"lens": "1"})
    neg = lens_data.NegativeSpec.parse("data/zoo:kind!=lenses")
    assert neg.negate and neg.matches({"kind": "non-lenses"}) and not neg.matches({"kind": "lenses"})
    assert lens_data.NegativeSpec.parse("data/gz").column is None
    with pytest.raises(lens_data.LensDataError):
        lens_data.NegativeSpec.parse("data/x:nonsense")
    picks = [lens_data.in_training_share("f", f"img{i}.jpg", 0.5) for i in range(400)]
    assert 0.4 < np.mean(picks) < 0.6
    assert picks == [lens_data.in_training_share("f", f"img{i}.jpg", 0.5) for i in range(400)]


def test_load_negatives_records_files(repo_data: Path) -> None:
    spec = lens_data.NegativeSpec.parse(f"{repo_data / 'cfhtls_lens_candidates'}:lens=0")
    negs, records = lens_data.load_negatives([spec], size=SIZE, fraction=0.5)
    assert len(negs) == records[0]["used"] > 0 and records[0]["rows"] > records[0]["used"]
    assert not negs.is_lens.any() and not negs.masks.any() and set(negs.kind) == {"real"}
    card = {"data": {"negatives": records}}
    assert trained_files(card, "cfhtls_lens_candidates") == set(records[0]["files"])
    assert trained_files(card, "other") == set()


# ------------------------------------------------------------------------------------ metrics
def test_binary_metrics() -> None:
    y = np.array([1, 1, 1, 0, 0, 0])
    perfect = binary_metrics(np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1]), y)
    assert perfect == {"auroc": 1.0, "tpr_at_fpr_0.01": 1.0, "tpr_at_0fp": 1.0}
    # one negative above two positives: AUROC 7/9; at zero false positives only the top lens
    m = binary_metrics(np.array([0.9, 0.5, 0.4, 0.6, 0.2, 0.1]), y)
    assert m["auroc"] == pytest.approx(7 / 9)
    assert m["tpr_at_0fp"] == pytest.approx(1 / 3) and m["tpr_at_fpr_0.01"] == pytest.approx(1 / 3)
    # a tie with the top negative does not count as found
    assert binary_metrics(np.array([0.5, 0.5, 0.4, 0.5, 0.2, 0.1]), y)["tpr_at_0fp"] == 0.0
