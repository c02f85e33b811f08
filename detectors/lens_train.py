"""``galsift train lens``: train the lens finder (LVM backbone) and its ResNet50 baseline.

Both backbones get the same budget: the same training images (:mod:`detectors.lens_data`, drawn
once per run), the same batches in the same order with the same flips and turns, the same number
of optimiser steps, the same optimiser, schedule and heads. Only the backbone differs.

After training, each detector is scored on held-out simulations (a separate seed stream, half
lenses) and the checkpoint is written with its card. The held-out metrics are

* **detection accuracy**: the share of images classified correctly when an image counts as a
  lens if its top detection score is at least :data:`detectors.lensfinder.DETECTION_THRESHOLD`
  (0.5, the same for both backbones);
* **mask IoU**: on true positives, the intersection over union of the top detection's mask with
  the true arc mask, averaged;
* and, for information, the AUROC of the top score and the share of true positives whose top box
  overlaps the true box with IoU ≥ 0.5.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detectors import lens_data
from detectors.lens_data import LensDataConfig, LensSet, NegativeSpec
from detectors.lensfinder import (
    BACKBONES,
    DEFAULT_ENCODER_CHECKPOINT,
    DETECTION_THRESHOLD,
    LensFinder,
    build_lens_detector,
    detector_config,
    save_detector,
    trainable_summary,
)

log = logging.getLogger(__name__)

#: the paper's numbers at 1,000 training samples (Fu et al. 2024), for the printed table
PAPER_ACCURACY = {"lvm": 0.967, "resnet50": 0.931}


class LensTrainingError(ValueError):
    """Impossible training options."""


@dataclass(frozen=True)
class LensTrainConfig:
    """Options of ``galsift train lens``.

    Attributes
    ----------
    out
        Checkpoint path (``*.safetensors``); ``{backbone}`` in it is replaced by the backbone name
        and must be present when more than one backbone is trained.
    backbones
        Backbones to train, each on the same data and budget.
    n_train, n_test
        Training images and held-out simulations.
    steps
        Optimiser steps per backbone; None: ``ceil(epochs * n_train / batch_size)``.
    epochs
        Passes over the training set when ``steps`` is None.
    batch_size, lr, weight_decay, warmup, clip_grad
        AdamW with linear warm-up then cosine decay to 5 % of ``lr``; gradient-norm clipping.
    lvm_checkpoint
        Encoder checkpoint that initialises the LVM backbone.
    trainable_layers
        Backbone parts left trainable (None: 3 for the pretrained LVM, 5 for the ResNet50).
    negatives
        Real non-lens folders (:class:`detectors.lens_data.NegativeSpec` strings).
    negative_fraction
        Share of each negatives folder used (a stable hash of the file names picks it).
    data
        How the images are drawn (size, shares of kinds, renderings).
    seed
        Seed of the data, the initialisation, the batch order and the augmentations.
    device
        torch device.
    half
        Write float16 weights (for shipping).
    progress
        Show progress bars.
    log_every
        Steps between loss records in the card's history.
    cache_dir
        Preprocessing cache for real images (None: off).
    sim_cache_dir
        Cache of simulated sets (None: off).
    """

    out: str
    backbones: tuple[str, ...] = ("lvm",)
    n_train: int = 1000
    n_test: int = 200
    steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup: int = 20
    clip_grad: float = 10.0
    lvm_checkpoint: Path = DEFAULT_ENCODER_CHECKPOINT
    trainable_layers: int | None = None
    negatives: tuple[str, ...] = ()
    negative_fraction: float = 0.5
    data: LensDataConfig = field(default_factory=LensDataConfig)
    seed: int = 0
    device: str = "cpu"
    half: bool = False
    progress: bool = True
    log_every: int = 10
    cache_dir: Path | None = None
    sim_cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if not self.backbones or any(b not in BACKBONES for b in self.backbones):
            raise LensTrainingError(f"backbones must be among {BACKBONES}, got {self.backbones}")
        if len(self.backbones) > 1 and "{backbone}" not in self.out:
            raise LensTrainingError("--out must contain {backbone} when several backbones are trained")
        if self.n_train < 1 or self.n_test < 2 or self.batch_size < 1:
            raise LensTrainingError("n_train >= 1, n_test >= 2 and batch_size >= 1 are needed")
        if self.steps is not None and self.steps < 1:
            raise LensTrainingError(f"steps must be positive, got {self.steps}")

    @property
    def total_steps(self) -> int:
        """Optimiser steps per backbone."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * self.n_train / self.batch_size))

    def out_path(self, backbone: str) -> Path:
        """Where the checkpoint of ``backbone`` goes."""
        path = Path(self.out.replace("{backbone}", backbone))
        if path.suffix != ".safetensors":
            raise LensTrainingError(f"--out must end in .safetensors, got {path}")
        return path

    def to_card(self) -> dict[str, Any]:
        """The options as JSON-ready values, for the card."""
        d = asdict(self)
        d["total_steps"] = self.total_steps
        return json.loads(json.dumps(d, default=str))


@dataclass
class LensTrainResult:
    """One trained backbone.

    Attributes
    ----------
    backbone
        ``lvm`` or ``resnet50``.
    path
        The written checkpoint.
    card
        Its card.
    metrics
        Held-out simulation metrics (see :func:`heldout_metrics`).
    history
        Mean losses every ``log_every`` steps.
    seconds
        Wall-clock training time.
    """

    backbone: str
    path: Path
    card: dict[str, Any]
    metrics: dict[str, float]
    history: list[dict[str, float]]
    seconds: float


def lr_at(step: int, *, total: int, base: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 5 % of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / area) if area > 0 else 0.0


def heldout_metrics(finder: LensFinder, test: LensSet, *, batch_size: int = 16) -> dict[str, float]:
    """Image-level detection accuracy, mask IoU on true positives, AUROC and box hits.

    Parameters
    ----------
    finder
        The detector.
    test
        Held-out images with their truth (:func:`detectors.lens_data.heldout_set`).
    batch_size
        Images per forward pass.

    Returns
    -------
    dict
        ``detection_accuracy``, ``mask_iou`` (mean over true positives; NaN if none), ``auroc``,
        ``box_hit`` (share of true positives whose top box has IoU ≥ 0.5 with the truth),
        ``tpr`` and ``fpr`` at the threshold, ``n_test``.
    """
    from sklearn.metrics import roc_auc_score

    dets = finder.detect(test.images, min_score=0.0, batch_size=batch_size)
    scores = np.asarray([d.score for d in dets])
    called = scores >= DETECTION_THRESHOLD
    truth = test.is_lens.astype(bool)
    ious, hits = [], []
    for det, is_lens, mask, call in zip(dets, truth, test.masks, called, strict=True):
        if not (is_lens and call):
            continue
        ious.append(_iou(det.masks[0], mask))
        hits.append(_box_iou(det.boxes[0], lens_data.box_from_mask(mask)[0]) >= 0.5)
    both = truth.any() and (~truth).any()
    return {
        "detection_accuracy": float(np.mean(called == truth)),
        "mask_iou": float(np.mean(ious)) if ious else float("nan"),
        "box_hit": float(np.mean(hits)) if hits else float("nan"),
        "auroc": float(roc_auc_score(truth, scores)) if both else float("nan"),
        "tpr": float(called[truth].mean()) if truth.any() else float("nan"),
        "fpr": float(called[~truth].mean()) if (~truth).any() else float("nan"),
        "n_test": len(test),
    }


def _progress(total: int, *, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, mininterval=2.0)


def train_one(
    backbone: str,
    cfg: LensTrainConfig,
    train: LensSet,
    *,
    on_step: Any = None,
) -> tuple[torch.nn.Module, list[dict[str, float]], float]:
    """Train one backbone's detector on ``train`` with the budget of ``cfg``.

    Returns
    -------
    tuple
        ``(model, history, seconds)``; the model is in eval mode on ``cfg.device``.
    """
    device = torch.device(cfg.device)
    model = build_lens_detector(
        backbone,
        lvm_checkpoint=cfg.lvm_checkpoint,
        trainable_layers=cfg.trainable_layers,
        image_size=cfg.data.size,
        seed=cfg.seed,
    ).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    images = torch.from_numpy(train.images)
    masks = torch.from_numpy(train.masks)
    gen = torch.Generator().manual_seed(cfg.seed)
    total = cfg.total_steps
    batch = min(cfg.batch_size, len(train))
    order, pos = torch.randperm(len(train), generator=gen), 0
    history: list[dict[str, float]] = []
    running: dict[str, float] = {}
    started = time.monotonic()
    model.train()
    bar = _progress(total, enabled=cfg.progress, desc=f"train lens {backbone}")
    for step in range(total):
        if pos + batch > len(order):
            order, pos = torch.randperm(len(train), generator=gen), 0
        idx = order[pos : pos + batch]
        pos += batch
        x, m = lens_data.dihedral_pair(images[idx], masks[idx], gen)
        targets = [{k: v.to(device) for k, v in t.items()} for t in lens_data.targets_for(m)]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total=total, base=cfg.lr, warmup=cfg.warmup)
        losses = model(list(x.to(device)), targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise LensTrainingError(f"{backbone}: loss is {float(loss)} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        opt.step()
        values = {k: float(v.detach()) for k, v in losses.items()}
        values["loss"] = float(loss.detach())
        for k, v in values.items():
            running[k] = running.get(k, 0.0) + v
        if on_step is not None:
            on_step(step, values)
        n_run = (step % cfg.log_every) + 1
        if n_run == cfg.log_every or step == total - 1:
            history.append({"step": step + 1, **{k: v / n_run for k, v in running.items()}})
            running = {}
        bar.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
        bar.update(1)
    bar.close()
    return model.eval(), history, time.monotonic() - started


def _data_record(
    cfg: LensTrainConfig, train: LensSet, test: LensSet, negatives: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "train": train.counts(),
        "test": test.counts(),
        "config": json.loads(json.dumps(asdict(cfg.data))),
        "negatives": negatives,
        "simulations": (
            "detectors.lens_data: lenstronomy SIE + shear, Sérsic sources, lens light, field, Moffat PSF, "
            "sky + source noise, g,r,z at 0.262 arcsec/px, fields of "
            f"{cfg.data.field_arcsec[0]:g}-{cfg.data.field_arcsec[1]:g} arcsec; arc masks from the "
            "lensed-source light; look-alike and galaxy negatives; real negatives"
            + (
                f", {cfg.data.painted_fraction:g} of all images real negatives with painted arcs"
                if cfg.data.painted_fraction
                else ""
            )
        ),
    }


def train_lens(cfg: LensTrainConfig) -> list[LensTrainResult]:
    """Draw the data once, then train, score and save every backbone of ``cfg`` on it.

    Returns
    -------
    list of LensTrainResult
        One per backbone, in the order of ``cfg.backbones``.
    """
    specs = [NegativeSpec.parse(s) for s in cfg.negatives]
    negatives, neg_records = lens_data.load_negatives(
        specs, size=cfg.data.size, fraction=cfg.negative_fraction, cache_dir=cfg.cache_dir
    )
    train = lens_data.training_set(
        cfg.n_train,
        seed=cfg.seed,
        config=cfg.data,
        negatives=negatives,
        progress=cfg.progress,
        cache_dir=cfg.sim_cache_dir,
    )
    test = lens_data.heldout_set(
        cfg.n_test, seed=cfg.seed, config=cfg.data, progress=cfg.progress, cache_dir=cfg.sim_cache_dir
    )
    log.info("training set %s; held-out set %s", train.counts(), test.counts())
    data_card = _data_record(cfg, train, test, neg_records)
    results = []
    for backbone in cfg.backbones:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model, history, seconds = train_one(backbone, cfg, train)
        finder = LensFinder(model, {}, device=cfg.device)
        metrics = heldout_metrics(finder, test)
        path = cfg.out_path(backbone)
        config = detector_config(model)
        card = save_detector(
            path,
            model.cpu(),
            card={
                "training": {**cfg.to_card(), "backbone": backbone, "seconds": round(seconds, 1)},
                "encoder_init": _encoder_init(cfg, backbone),
                "parameters_by_part": trainable_summary(model),
                "trainable_layers": config.trainable_layers,
                "data": data_card,
                "metrics": metrics,
                "history": history,
                "step": cfg.total_steps,
            },
            half=cfg.half,
        )
        log.info("%s: %s -> %s (%s)", backbone, metrics, path, card["version"])
        results.append(LensTrainResult(backbone, path, card, metrics, history, seconds))
    return results


def _encoder_init(cfg: LensTrainConfig, backbone: str) -> dict[str, Any] | None:
    if backbone != "lvm":
        return None
    from encoder.checkpoint import read_card

    card = read_card(Path(cfg.lvm_checkpoint))
    return {"path": str(cfg.lvm_checkpoint), "version": card.get("version"), "variant": card.get("variant")}


def result_rows(results: Sequence[LensTrainResult]) -> list[dict[str, Any]]:
    """Flat rows (one per backbone) for the table and the JSON document."""
    rows = []
    for r in results:
        rows.append(
            {
                "model": r.card["version"],
                "backbone": r.backbone,
                "steps": r.card["step"],
                "seconds": round(r.seconds, 1),
                "detection_accuracy": r.metrics["detection_accuracy"],
                "mask_iou": r.metrics["mask_iou"],
                "box_hit": r.metrics["box_hit"],
                "auroc": r.metrics["auroc"],
                "final_loss": r.history[-1]["loss"] if r.history else float("nan"),
                "paper_accuracy": PAPER_ACCURACY[r.backbone],
                "path": str(r.path),
            }
        )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of :func:`result_rows`."""

    def num(v: Any) -> str:
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    lines = [
        "| model | backbone | steps | s | detection accuracy | mask IoU (TP) | box hit (TP) | AUROC | paper |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| `{r['model']}` | {r['backbone']} | {r['steps']} | {r['seconds']:.0f} | "
            f"{num(r['detection_accuracy'])} | {num(r['mask_iou'])} | {num(r['box_hit'])} | "
            f"{num(r['auroc'])} | {r['paper_accuracy']:.3f} |"
        )
    return "\n".join(lines)
