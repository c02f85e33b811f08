"""Pretraining, resuming, checkpoints and multi-task finetuning on a tiny model (CPU)."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from encoder.checkpoint import (
    CheckpointError,
    card_path,
    load_model,
    save_checkpoint,
    train_state_path,
)
from encoder.data import read_folder
from encoder.models import create_model
from encoder.sim import simulate_batch
from encoder.train import (
    FinetuneConfig,
    PretrainConfig,
    TrainingError,
    _is_val,
    _labelled_tasks,
    block_mask,
    compare_strategies,
    comparison_rows,
    finetune,
    format_comparison,
    nt_xent,
    pretrain,
)

SIZE = 64
TINY = {"img_size": SIZE}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labels.csv folder of 48 PNG colour composites made from simulations (half lenses)."""
    root = tmp_path_factory.mktemp("sims")
    (root / "images").mkdir()
    batch = simulate_batch(48, rng=np.random.default_rng(5), size=SIZE, lens_fraction=0.5)
    rows = []
    for i, (img, lens) in enumerate(zip(batch.images, batch.is_lens, strict=True)):
        rgb = (np.clip(img + 0.04, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
        name = f"images/sim_{i:03d}.png"
        Image.fromarray(rgb).save(root / name)
        rows.append({"file": name, "lens": int(lens)})
    with (root / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "lens"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def _cfg(folder: Path, out: Path, **kw: object) -> PretrainConfig:
    base = PretrainConfig(
        out=out,
        data=(folder,),
        model="lvm_tiny",
        steps=6,
        batch_size=6,
        lr=2e-3,
        warmup=2,
        sim_fraction=0.34,
        sim_pool=8,
        val_sims=4,
        val_fraction=0.2,
        val_every=3,
        ckpt_every=100,
        seed=3,
        device="cpu",
        progress=False,
        overrides=dict(TINY),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_losses() -> None:
    z = torch.randn(8, 16)
    assert float(nt_xent(z, z, 0.2)) < float(nt_xent(z, torch.randn(8, 16), 0.2))
    m = block_mask(4, 16, ratio=0.5, block=2, g=torch.Generator().manual_seed(0))
    assert m.shape == (4, 16, 16)
    assert torch.allclose(m.float().mean(dim=(1, 2)), torch.full((4,), 0.5))


def test_short_pretraining_lowers_validation_loss(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "pt.safetensors"
    result = pretrain(_cfg(folder, out, steps=30, val_every=15, w_mim=0.5, w_contrast=0.2))
    first, last = result.history[0], result.history[-1]
    assert last["step"] == 30 and result.step == 30
    assert last["val_recon"] < 0.8 * first["val_recon"], (first, last)
    assert last["val_sim_recon"] < first["val_sim_recon"]
    card = json.loads(card_path(out).read_text())
    assert card["variant"] == "lvm_tiny" and card["step"] == 30
    assert card["metrics"]["val_recon"] == pytest.approx(last["val_recon"])
    assert card["data"][0]["folder"] == str(folder)
    model, loaded_card = load_model(out)
    assert loaded_card["version"].startswith("lvm_tiny-")
    with torch.no_grad():
        z = model.embed(torch.rand(2, 3, SIZE, SIZE))
    assert z.shape == (2, 256) and torch.isfinite(z).all()
    # the stats standardisation was fitted on the training data (not the identity any more)
    assert not torch.equal(model.stats_std, torch.ones_like(model.stats_std))


def test_resume_is_bit_identical(folder: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight.safetensors"
    halves = tmp_path / "halves.safetensors"
    pretrain(_cfg(folder, straight))
    first = pretrain(_cfg(folder, halves, stop_after=3))
    assert first.step == 3 and json.loads(card_path(halves).read_text())["step"] == 3
    second = pretrain(_cfg(folder, halves, resume=halves))
    assert second.step == 6
    a, b = load_file(str(straight)), load_file(str(halves))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    oa, ob = load_file(str(train_state_path(straight))), load_file(str(train_state_path(halves)))
    assert oa.keys() == ob.keys() and any(k.startswith("optim.") for k in oa)
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    assert [h["step"] for h in second.history] == [0, 3, 6]


def test_checkpoint_validation(tmp_path: Path) -> None:
    model = create_model("lvm_tiny", **TINY)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, card={"note": "test"}, half=True)
    loaded, card = load_model(path)
    assert card["dtype"] == "float16" and card["note"] == "test"
    assert next(loaded.parameters()).dtype == torch.float32
    for (name, p), q in zip(model.named_parameters(), loaded.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-3, rtol=1e-2), name
    assert not train_state_path(path).exists()
    # a card that describes another architecture is refused, naming the problem
    card_file = card_path(path)
    doc = json.loads(card_file.read_text())
    doc["config"]["embed_dim"] = 48
    card_file.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_model(path)
    doc["config"]["depths"] = [2, 2, 2, 3]
    doc["config"]["embed_dim"] = 32
    card_file.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="missing keys"):
        load_model(path)
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "absent.safetensors")


def test_pretrain_rejects_bad_options(tmp_path: Path) -> None:
    with pytest.raises(TrainingError):
        pretrain(PretrainConfig(out=tmp_path / "x.safetensors", sim_fraction=1.5))
    with pytest.raises(TrainingError):
        pretrain(PretrainConfig(out=tmp_path / "x.safetensors", w_recon=0, w_mim=0, w_contrast=0))


def test_finetune_compare(folder: Path, tmp_path: Path) -> None:
    init = tmp_path / "init.safetensors"
    torch.manual_seed(0)
    save_checkpoint(init, create_model("lvm_tiny", **TINY), card={})
    cfg = FinetuneConfig(
        init=init,
        data=folder,
        labels=("lens",),
        steps=12,
        batch_size=6,
        eval_every=4,
        val_fraction=0.3,
        seed=1,
        device="cpu",
        progress=False,
        out=tmp_path / "ft.safetensors",
    )
    results = compare_strategies(cfg)
    assert set(results) == {"equal", "active"}
    for res in results.values():
        assert set(res.final) == {"classify:lens", "restore", "reconstruct"}
        assert sum(res.steps_per_task.values()) == 12
        for shares in res.shares:
            assert sum(v for k, v in shares.items() if k != "step") == pytest.approx(1.0)
        assert 0.0 <= res.final["classify:lens"]["val_auc"] <= 1.0
    # equal shares stay uniform; active shares move once validation losses differ
    eq = results["equal"].shares[-1]
    assert eq["restore"] == pytest.approx(1 / 3)
    act = results["active"].shares[-1]
    assert act["restore"] != pytest.approx(1 / 3)
    rows = comparison_rows(results)
    assert {r["model"] for r in rows} == {"init", "equal", "active"}
    table = format_comparison(rows)
    assert "classify:lens" in table and "active" in table
    _model, card = load_model(tmp_path / "ft.safetensors")
    assert card["kind"] == "finetune" and card["steps_per_task"] == results["active"].steps_per_task
    assert (tmp_path / "ft-equal.safetensors").is_file()


# ----------------------------------------------------------------------------- finetune regressions
#: the demo lens candidates: 60 real JPEGs, 15 of them with an empty ``lens`` label
DEMO_LENSES = Path(__file__).resolve().parents[2] / "ingest" / "demo_tiles" / "cfhtls_lens_candidates"


def _init(tmp_path: Path) -> Path:
    init = tmp_path / "init.safetensors"
    torch.manual_seed(0)
    save_checkpoint(init, create_model("lvm_tiny", **TINY), card={})
    return init


def _ft(init: Path, data: Path, **kw: object) -> FinetuneConfig:
    base = FinetuneConfig(
        init=init,
        data=data,
        labels=("lens",),
        steps=4,
        batch_size=4,
        eval_every=2,
        val_fraction=0.3,
        seed=1,
        device="cpu",
        progress=False,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_finetune_classify_alone(folder: Path, tmp_path: Path) -> None:
    """``--tasks classify`` alone used to index with the restore split it never computed."""
    result = finetune(_ft(_init(tmp_path), folder, tasks=("classify",)))
    assert set(result.final) == {"classify:lens"}
    assert result.steps_per_task == {"classify:lens": 4}
    assert 0.0 <= result.final["classify:lens"]["val_auc"] <= 1.0


def test_finetune_split_uses_labelled_rows_only(tmp_path: Path) -> None:
    """Empty labels are skipped for classification; its split must be that of the rows kept."""
    with (DEMO_LENSES / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    labelled = [r["file"] for r in rows if r["lens"].strip()]
    assert 0 < len(labelled) < len(rows)  # the demo folder really has empty labels
    cfg = _ft(_init(tmp_path), DEMO_LENSES)
    tasks = {t.name: t for t in _labelled_tasks(cfg, SIZE)}
    held = [f for f in labelled if _is_val(f, cfg.val_fraction)]
    clf = tasks["classify:lens"]
    assert len(clf.val_x) == len(held) and len(clf.train_x) == len(labelled) - len(held)
    assert clf.val_y is not None and clf.train_y is not None
    by_file = read_folder(DEMO_LENSES, label="lens", size=SIZE)
    index = {f: i for i, f in enumerate(by_file.files)}
    expected = torch.from_numpy(by_file.images[[index[f] for f in held]])
    assert torch.equal(clf.val_x, expected)
    want_y = [sorted({"0", "1"}).index(by_file.table[index[f]]["lens"]) for f in held]
    assert clf.val_y.tolist() == want_y
    # restoration sees every row, split by the same file hash: no classification validation
    # image is trained on by another task
    every_held = [r["file"] for r in rows if _is_val(r["file"], cfg.val_fraction)]
    assert len(tasks["restore"].val_x) == len(every_held)
    assert len(tasks["restore"].train_x) == len(rows) - len(every_held)
    restore_val = {_content(x) for x in tasks["restore"].val_x}
    assert {_content(x) for x in clf.val_x} <= restore_val
    assert not {_content(x) for x in tasks["restore"].train_x} & {_content(x) for x in clf.val_x}
    # and a run on these tasks goes through
    result = finetune(replace(cfg, steps=2), tasks=list(tasks.values()))
    assert set(result.final) == {"classify:lens", "restore", "reconstruct"}


def _content(x: torch.Tensor) -> bytes:
    return x.numpy().tobytes()


def test_finetune_rejects_bad_tasks(folder: Path, tmp_path: Path) -> None:
    init = _init(tmp_path)
    with pytest.raises(TrainingError, match="tasks must be among"):
        finetune(_ft(init, folder, tasks=("clasify",)))
    with pytest.raises(TrainingError, match="needs at least one label"):
        finetune(_ft(init, folder, labels=(), tasks=("classify",)))
    with pytest.raises(TrainingError, match="thresholds"):
        finetune(_ft(init, folder, thresholds=(0.5, 0.5)))
