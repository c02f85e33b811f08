"""Self-supervised pretraining and active multi-task finetuning of the LVM.

Pretraining (:func:`pretrain`) mixes survey images (any ``labels.csv`` folders or folders of
FITS/JPEG files; labels unused) with on-the-fly simulations (:mod:`encoder.sim`) and optimises a
weighted sum of

* **reconstruction** — the decoder restores a blurred, noisy copy of an augmented view (the
  paper's objective), L1 on the visible pixels;
* **masked image modelling** — blocks of tokens are replaced by a learned mask token and the
  decoder fills them in (SimMIM-style), L1 on the masked pixels;
* **contrastive** — NT-Xent (SimCLR) between the learned part of the embeddings
  (:meth:`LVM.learned_embedding_from`, through a small projection head) of the corrupted view and
  a second, clean augmented view. The fixed input statistics of :meth:`LVM.embed` are left out of
  this loss, otherwise they solve it (two views of one galaxy share its fluxes and colours) and
  the learned features stay untrained. Views differ by rotations at any angle, crops, flux
  scale, seeing and noise, none of which changes colours (:mod:`encoder.augment`);
* **simulation truth** (optional, ``w_sim``) — a linear head on the learned embedding of the
  clean view predicts what the simulator put in each simulated image (lens, ring, spiral; binary
  cross entropy). No survey label is used: the supervision comes from the simulator alone.

One encoder pass of the corrupted view serves all three terms. Every step draws its batch,
augmentations, masks and stochastic depth from generators seeded by ``(seed, step)``, so a run is
deterministic on CPU and a resumed run continues exactly where a straight run would be.

Finetuning (:func:`finetune`) trains classification heads (2 FC layers on the pooled encoder
features), a restoration head (its own copy of the decoder: degraded -> clean) and the
reconstruction head (the model's decoder: masked -> full) on the shared encoder. Each step trains
one task; with ``strategy="active"`` a task's share of steps is a softmax over its validation loss
relative to its starting value (a task that lags gets more steps), with ``"equal"`` shares are
uniform. :func:`compare_strategies` runs both on the same budget and seed.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoder.augment import Augment, composite_style, degrade
from encoder.checkpoint import (
    check_compatible,
    load_train_state,
    load_weights,
    read_card,
    save_checkpoint,
)
from encoder.models import LVM, N_INPUT_STATS, create_model

if TYPE_CHECKING:
    from encoder.sim import SimBatch

log = logging.getLogger(__name__)


class TrainingError(ValueError):
    """Options or data with which training cannot run."""


# --------------------------------------------------------------------------- shared helpers
def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; any other name as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _autocast(device: torch.device) -> AbstractContextManager[Any]:
    # bf16 autocast on CUDA only: on CPU the same code runs in float32 (deterministic)
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _generator(seed: int, step: int, stream: int) -> torch.Generator:
    # one independent stream per (seed, step, purpose): resuming needs no saved RNG state
    digest = hashlib.sha256(f"{seed}/{step}/{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _np_rng(seed: int, step: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, stream])


def _content_hash(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def _is_val(key: str, fraction: float) -> bool:
    # a split that depends only on the content or file name: stable across runs and machines
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32 < fraction


def block_mask(batch: int, grid: int, *, ratio: float, block: int, g: torch.Generator) -> Tensor:
    """Random token mask ``(batch, grid, grid)``: ``ratio`` of ``block``×``block`` token blocks set."""
    if not 0.0 <= ratio < 1.0:
        raise TrainingError(f"mask ratio must be in [0, 1), got {ratio}")
    cells = math.ceil(grid / block)
    n_mask = round(ratio * cells * cells)
    scores = torch.rand(batch, cells * cells, generator=g)
    idx = scores.argsort(dim=1)[:, :n_mask]
    m = torch.zeros(batch, cells * cells, dtype=torch.bool)
    m.scatter_(1, idx, True)
    m = m.view(batch, cells, cells).repeat_interleave(block, 1).repeat_interleave(block, 2)
    return m[:, :grid, :grid]


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's normalised-temperature cross entropy between two batches of paired views."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def _param_groups(modules: Sequence[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    # no decay on norms, biases, tokens and relative-position tables (as timm's no_weight_decay)
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim <= 1 or "relative_position_bias_table" in name or "token" in name:
                no_decay.append(p)
            else:
                decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _lr_at(step: int, *, total: int, base: float, minimum: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return minimum + 0.5 * (base - minimum) * (1 + math.cos(math.pi * min(1.0, frac)))


def _to_device(x: Tensor, device: torch.device) -> Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def _prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def _progress(iterable: range, *, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=not enabled, dynamic_ncols=True, mininterval=2.0)


# --------------------------------------------------------------------------- data
@dataclass
class UnlabelledImages:
    """Deduplicated model inputs of several folders, split into train and validation."""

    train: np.ndarray
    val: np.ndarray
    sources: list[dict[str, Any]]


def _folder_images(folder: Path, *, size: int, limit: int | None, cache_dir: Path | None) -> np.ndarray:
    from encoder.data import FITS_SUFFIXES, IMAGE_SUFFIXES, load_model_input, read_folder

    if (folder / "labels.csv").is_file():
        return read_folder(folder, size=size, limit=limit, cache_dir=cache_dir).images
    suffixes = IMAGE_SUFFIXES + FITS_SUFFIXES
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
    if limit is not None:
        files = files[:limit]
    if not files:
        raise TrainingError(f"{folder}: no labels.csv and no JPEG/PNG/FITS files")
    return np.stack([load_model_input(p, size=size, cache_dir=cache_dir) for p in files])


def load_unlabelled(
    folders: Sequence[Path],
    *,
    size: int,
    val_fraction: float,
    limit: int | None = None,
    cache_dir: Path | None = None,
) -> UnlabelledImages:
    """Read folders as model input, drop exact duplicates, split by content hash.

    Parameters
    ----------
    folders
        ``labels.csv`` folders (labels ignored) or folders of image/FITS files.
    size
        Model input side.
    val_fraction
        Fraction of distinct images held out for validation (chosen by content hash, so the
        same image is always on the same side).
    limit
        At most this many images per folder.
    cache_dir
        Preprocessing cache (see :func:`encoder.data.load_model_input`).
    """
    seen: set[str] = set()
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    sources = []
    for folder in folders:
        images = _folder_images(Path(folder), size=size, limit=limit, cache_dir=cache_dir)
        new = 0
        for img in images:
            key = _content_hash(img)
            if key in seen:
                continue
            seen.add(key)
            new += 1
            (val if _is_val(key, val_fraction) else train).append(img)
        sources.append({"folder": str(folder), "images": len(images), "new": new})
        log.info("%s: %d images, %d not seen before", folder, len(images), new)
    if not train:
        raise TrainingError("no training images (all folders empty or all held out)")
    empty = np.zeros((0, 3, size, size), np.float32)
    return UnlabelledImages(np.stack(train), np.stack(val) if val else empty, sources)


# --------------------------------------------------------------------------- pretraining
@dataclass
class PretrainConfig:
    """Options of :func:`pretrain` (the ``galsift train pretrain`` flags)."""

    out: Path
    data: tuple[Path, ...] = ()
    model: str = "lvm_tiny"
    steps: int = 1000
    stop_after: int | None = None
    resume: Path | None = None
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup: int = 50
    weight_decay: float = 0.05
    w_recon: float = 1.0
    w_mim: float = 1.0
    w_contrast: float = 0.5
    w_sim: float = 0.5
    recon_fraction: float = 1.0
    mask_ratio: float = 0.4
    mask_block: int = 2
    temperature: float = 0.2
    sim_fraction: float = 0.5
    sim_pool: int = 1024
    sim_lens_fraction: float = 0.35
    sim_zoom: tuple[float, float] = (0.8, 2.0)
    val_fraction: float = 0.1
    val_sims: int = 64
    val_every: int = 100
    ckpt_every: int = 500
    seed: int = 0
    device: str = "auto"
    limit: int | None = None
    cache_dir: Path | None = None
    sim_cache: Path | None = None
    half: bool = False
    progress: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)

    def to_card(self) -> dict[str, Any]:
        """JSON-ready copy (paths as strings)."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
            elif isinstance(v, tuple):
                d[k] = [str(x) if isinstance(x, Path) else x for x in v]
        return d


def simulated_pools(cfg: PretrainConfig, *, size: int) -> tuple[SimBatch, SimBatch]:
    """The simulated training and validation pools of a pretraining run (empty without sims).

    Each pool is a function of (seed, stream, size, lens fraction, zoom), which is also its key
    in the ``cfg.sim_cache`` folder.
    """
    from encoder.sim import cached_batch

    def sims(n: int, stream: int) -> SimBatch:
        meta = {
            "seed": cfg.seed,
            "stream": stream,
            "size": size,
            "lens_fraction": cfg.sim_lens_fraction,
            "zoom": list(cfg.sim_zoom),
        }
        return cached_batch(
            n,
            cache=None if cfg.sim_cache is None else cfg.sim_cache / f"pool{stream}.npz",
            meta=meta,
            rng=_np_rng(cfg.seed, 0, stream),
            size=size,
            lens_fraction=cfg.sim_lens_fraction,
            zoom=cfg.sim_zoom,
        )

    on = cfg.sim_fraction > 0
    return sims(cfg.sim_pool if on else 0, 101), sims(cfg.val_sims if on else 0, 102)


class PretrainHeads(nn.Module):
    """Auxiliary modules of pretraining (not part of the shipped model)."""

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        from encoder.sim import SIM_LABELS

        self.proj = nn.Sequential(
            nn.Linear(embedding_dim, embedding_dim), nn.GELU(), nn.Linear(embedding_dim, 128)
        )
        self.sim = nn.Linear(embedding_dim, len(SIM_LABELS))


@dataclass
class PretrainResult:
    """What :func:`pretrain` did: final step, metric history and the checkpoint card."""

    step: int
    history: list[dict[str, float]]
    card: dict[str, Any]


class _Pretrainer:
    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.start_step = 0
        self.history: list[dict[str, float]] = []
        # initial weights (model and heads) are a function of the seed
        torch.manual_seed(cfg.seed)
        if cfg.resume is not None:
            card = read_card(cfg.resume)
            check_compatible(card, cfg.resume)
            self.model: LVM = create_model(card["variant"], **card["config"])
            load_weights(self.model, cfg.resume)
            self.start_step = int(card["step"])
            self.history = list(card.get("history", []))
        else:
            self.model = create_model(cfg.model, **cfg.overrides)
        self.size = self.model.img_size
        self.augment = Augment(rotate=True, crop_scale=(0.6, 1.0), brightness=(0.75, 1.33))
        self.heads = PretrainHeads(self.model.embedding_dim - N_INPUT_STATS)
        _prepare_model(self.model, self.device)
        self.heads.to(self.device)
        self.optimizer = torch.optim.AdamW(
            _param_groups([self.model, self.heads], cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95)
        )
        if cfg.resume is not None:
            load_train_state(cfg.resume, optimizer=self.optimizer, modules={"heads": self.heads})

    # data -----------------------------------------------------------------
    def load_data(self) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        if cfg.data:
            self.real = load_unlabelled(
                cfg.data,
                size=self.size,
                val_fraction=cfg.val_fraction,
                limit=cfg.limit,
                cache_dir=cfg.cache_dir,
            )
        elif cfg.sim_fraction < 1.0:
            raise TrainingError("no --data given: use --sim-fraction 1 to train on simulations only")
        else:
            empty = np.zeros((0, 3, self.size, self.size), np.float32)
            self.real = UnlabelledImages(empty, empty, [])
        from encoder.sim import SIM_LABELS

        pool, val = simulated_pools(cfg, size=self.size)
        self.sims, self.val_sims = pool.images, val.images
        self.sim_targets = torch.from_numpy(pool.labels)
        self.val_sim_targets = val.labels
        self.sim_label_names = SIM_LABELS
        log.info(
            "data: %d train / %d val real images, %d + %d simulated (%.0f s)",
            len(self.real.train),
            len(self.real.val),
            len(self.sims),
            len(self.val_sims),
            time.perf_counter() - t0,
        )
        self.train_real = torch.from_numpy(self.real.train)
        self.train_sims = torch.from_numpy(self.sims)
        if cfg.resume is None:
            sample = np.concatenate([self.real.train[:2048], self.sims[:512]])
            self.model.set_stats_normalisation(torch.from_numpy(sample).to(self.device))

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """Images of one step (real first, then simulated) and the simulated ones' truth."""
        cfg = self.cfg
        rng = _np_rng(cfg.seed, step, 1)
        g = _generator(cfg.seed, step, 1)
        n_sim = round(cfg.batch_size * cfg.sim_fraction) if len(self.train_sims) else 0
        if len(self.train_real) == 0:
            n_sim = cfg.batch_size
        parts = []
        if cfg.batch_size - n_sim > 0:
            parts.append(self.train_real[rng.integers(0, len(self.train_real), cfg.batch_size - n_sim)])
        sim_idx = torch.from_numpy(rng.integers(0, max(1, len(self.train_sims)), n_sim))
        if n_sim:
            parts.append(composite_style(self.train_sims[sim_idx], g))
        return torch.cat(parts), self.sim_targets[sim_idx] if n_sim else self.sim_targets[:0]

    # step -----------------------------------------------------------------
    def losses(self, x: Tensor, sim_truth: Tensor, g: torch.Generator) -> dict[str, Tensor]:
        cfg, model = self.cfg, self.model
        # augment where the model runs: the random draws come from ``g`` on the CPU either way,
        # so the batch is the same, but on a GPU the image work no longer waits for the CPU
        x = _to_device(x, self.device)
        v1 = self.augment(x, g)
        corrupted = degrade(v1, g) if cfg.w_recon > 0 or cfg.w_mim > 0 else v1
        mask = None
        if cfg.w_mim > 0:
            mask = block_mask(len(x), model.config.grid, ratio=cfg.mask_ratio, block=cfg.mask_block, g=g)
        use_sim = cfg.w_sim > 0 and len(sim_truth) > 0
        v2 = self.augment(x, g) if cfg.w_contrast > 0 or use_sim else None
        out: dict[str, Tensor] = {}
        with _autocast(self.device):
            feats = model.encode(corrupted, None if mask is None else mask.to(self.device))
            if cfg.w_recon > 0 or cfg.w_mim > 0:
                # the decoder may see only the first k images: it costs as much as the encoder
                k = max(2, round(len(x) * cfg.recon_fraction))
                rec = model.decode([f[:k] for f in feats]).float()
                err = (rec - v1[:k]).abs().mean(dim=1, keepdim=True)
                if mask is None:
                    out["recon"] = err.mean()
                else:
                    pm = mask[:k].to(self.device, err.dtype)[:, None]
                    pm = F.interpolate(pm, scale_factor=model.config.patch_size, mode="nearest")
                    out["recon"] = (err * (1 - pm)).sum() / (1 - pm).sum().clamp(min=1)
                    out["mim"] = (err * pm).sum() / pm.sum().clamp(min=1)
            if v2 is not None:
                z2 = model.learned_embedding_from(model.encode(v2))
                if cfg.w_contrast > 0:
                    z1 = model.learned_embedding_from(feats)
                    out["contrast"] = nt_xent(self.heads.proj(z1), self.heads.proj(z2), cfg.temperature)
                if use_sim:
                    # simulated images are the last rows of the batch
                    logits = self.heads.sim(z2[len(x) - len(sim_truth) :]).float()
                    out["sim"] = F.binary_cross_entropy_with_logits(logits, sim_truth.to(self.device))
        return out

    def total(self, parts: dict[str, Tensor]) -> Tensor:
        w = {
            "recon": self.cfg.w_recon,
            "mim": self.cfg.w_mim,
            "contrast": self.cfg.w_contrast,
            "sim": self.cfg.w_sim,
        }
        return sum((w[k] * v for k, v in parts.items()), torch.zeros((), device=self.device))

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        self.model.train()
        self.heads.train()
        # stochastic depth draws from the global generator: seed it per step
        torch.manual_seed(int(_generator(cfg.seed, step, 3).initial_seed()))
        lr = _lr_at(step, total=cfg.steps, base=cfg.lr, minimum=cfg.min_lr, warmup=cfg.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, sim_truth = self.batch(step)
        parts = self.losses(x, sim_truth, _generator(cfg.seed, step, 2))
        loss = self.total(parts)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for grp in self.optimizer.param_groups for p in grp["params"]], 1.0)
        self.optimizer.step()
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}, "lr": lr}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Held-out metrics with fixed noise.

        Reconstruction of degraded images, masked modelling, top-1 agreement of two views'
        learned embeddings and the simulation-truth AUCs.
        """
        self.model.eval()
        self.heads.eval()
        metrics: dict[str, float] = {}
        for name, images in (("val", self.real.val), ("val_sim", self.val_sims)):
            if len(images) == 0:
                continue
            recon, mim, top1, n = 0.0, 0.0, 0.0, 0
            for start in range(0, len(images), 64):
                x = torch.from_numpy(images[start : start + 64])
                g = _generator(self.cfg.seed, -1 - start, 9)
                corrupted = degrade(x, g)
                mask = block_mask(len(x), self.model.config.grid, ratio=0.4, block=self.cfg.mask_block, g=g)
                x_d, c_d = _to_device(x, self.device), _to_device(corrupted, self.device)
                with _autocast(self.device):
                    full = self.model(c_d).float()
                    masked = self.model(x_d, mask.to(self.device)).float()
                    views = [_to_device(self.augment(x, g), self.device) for _ in range(2)]
                    z1, z2 = (
                        F.normalize(self.model.learned_embedding_from(self.model.encode(v)).float(), dim=1)
                        for v in views
                    )
                recon += float((full - x_d).abs().mean()) * len(x)
                pm = F.interpolate(mask[:, None].float(), scale_factor=self.model.config.patch_size)
                pm = pm.to(self.device)
                mim += float(((masked - x_d).abs() * pm).sum() / (pm.sum() * 3).clamp(min=1)) * len(x)
                top1 += float(
                    ((z1 @ z2.t()).argmax(dim=1) == torch.arange(len(x), device=self.device)).float().sum()
                )
                n += len(x)
            metrics[f"{name}_recon"] = recon / n
            metrics[f"{name}_mim"] = mim / n
            metrics[f"{name}_view_top1"] = top1 / n
        if self.cfg.w_sim > 0 and len(self.val_sims):
            # how well the simulation-truth head reads lenses/rings/spirals off the embedding
            scores = []
            for start in range(0, len(self.val_sims), 64):
                x = _to_device(torch.from_numpy(self.val_sims[start : start + 64]), self.device)
                with _autocast(self.device):
                    z = self.model.learned_embedding_from(self.model.encode(x))
                    scores.append(self.heads.sim(z).float().cpu().numpy())
            logits = np.concatenate(scores)
            for j, label in enumerate(self.sim_label_names):
                y = self.val_sim_targets[:, j]
                if 0 < y.sum() < len(y):
                    metrics[f"val_sim_{label}_auc"] = _auc(logits[:, j], y)
        return metrics

    def card(self, step: int, elapsed: float) -> dict[str, Any]:
        from encoder.data import PREPROCESS_VERSION

        last = self.history[-1] if self.history else {}
        return {
            "kind": "pretrain",
            "training": self.cfg.to_card(),
            "data": self.real.sources,
            "train_images": len(self.real.train),
            "val_images": len(self.real.val),
            "simulated": {
                "pool": len(self.sims),
                "fraction": self.cfg.sim_fraction,
                "lens_fraction": self.cfg.sim_lens_fraction,
            },
            "preprocess_version": PREPROCESS_VERSION,
            "metrics": {k: v for k, v in last.items() if k.startswith("val")},
            "history": self.history,
            "elapsed_s": round(elapsed, 1),
            "device": str(self.device),
        }

    def save(self, step: int, elapsed: float, *, final: bool) -> dict[str, Any]:
        ship = final and self.cfg.half
        return save_checkpoint(
            self.cfg.out,
            self.model,
            card=self.card(step, elapsed),
            step=step,
            optimizer=None if ship else self.optimizer,
            extra_modules=None if ship else {"heads": self.heads},
            half=ship,
        )

    def run(self) -> PretrainResult:
        cfg = self.cfg
        self.load_data()
        t0 = time.perf_counter()
        end = cfg.steps if cfg.stop_after is None else min(cfg.steps, self.start_step + cfg.stop_after)
        if self.start_step == 0 and not self.history:
            self.history.append({"step": 0, **self.validate()})
        bar = _progress(range(self.start_step, end), enabled=cfg.progress, desc="pretrain")
        running: dict[str, float] = {}
        step = self.start_step
        for step in bar:
            stats = self.train_step(step)
            running = {k: 0.9 * running.get(k, v) + 0.1 * v for k, v in stats.items()}
            done = step + 1
            if cfg.progress:
                bar.set_postfix({k: f"{v:.3g}" for k, v in running.items() if k != "lr"})
            if done % cfg.val_every == 0 or done == end:
                self.history.append(
                    {"step": done, **{f"train_{k}": v for k, v in running.items()}, **self.validate()}
                )
                log.info("step %d: %s", done, self.history[-1])
            if done % cfg.ckpt_every == 0 and done != end:
                self.save(done, time.perf_counter() - t0, final=False)
        final_step = max(end, self.start_step)
        card = self.save(final_step, time.perf_counter() - t0, final=final_step >= cfg.steps)
        return PretrainResult(final_step, self.history, card)


def step_seconds(cfg: PretrainConfig, *, steps: int = 8, warmup: int = 3) -> float:
    """Median seconds of one pretraining step of ``cfg`` on its device (data loaded first).

    For sizing a run to a time budget; nothing is written and the weights are thrown away.
    """
    trainer = _Pretrainer(cfg)
    trainer.load_data()
    times = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        trainer.train_step(step)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[warmup:]))


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Pretrain (or resume pretraining) an LVM; writes the checkpoint at ``cfg.out``.

    Parameters
    ----------
    cfg
        Options; ``steps`` is the schedule's total, ``stop_after`` ends this invocation early
        (resume later with ``resume=<checkpoint>``).

    Returns
    -------
    PretrainResult
        Final step, validation history and the written card.
    """
    if not 0.0 < cfg.recon_fraction <= 1.0:
        raise TrainingError(f"recon_fraction must be within (0, 1], got {cfg.recon_fraction}")
    if cfg.steps < 1 or cfg.batch_size < 2:
        raise TrainingError("steps must be >= 1 and batch_size >= 2 (contrastive pairs)")
    if not 0.0 <= cfg.sim_fraction <= 1.0:
        raise TrainingError(f"sim_fraction must be within [0, 1], got {cfg.sim_fraction}")
    if (
        cfg.w_recon < 0
        or cfg.w_mim < 0
        or cfg.w_contrast < 0
        or cfg.w_recon + cfg.w_mim + cfg.w_contrast == 0
    ):
        raise TrainingError("loss weights must be >= 0 and not all 0")
    return _Pretrainer(cfg).run()


# --------------------------------------------------------------------------- finetuning
@dataclass
class FinetuneConfig:
    """Options of :func:`finetune` (the ``galsift train finetune`` flags)."""

    init: Path
    data: Path
    labels: tuple[str, ...]
    thresholds: tuple[float | None, ...] = ()
    out: Path | None = None
    strategy: Literal["active", "equal"] = "active"
    tasks: tuple[str, ...] = ("classify", "restore", "reconstruct")
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.05
    eval_every: int = 25
    temperature: float = 0.25
    floor: float = 0.2
    val_fraction: float = 0.25
    mask_ratio: float = 0.4
    seed: int = 0
    device: str = "auto"
    limit: int | None = None
    cache_dir: Path | None = None
    progress: bool = True

    def to_card(self) -> dict[str, Any]:
        """JSON-ready copy (paths as strings)."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
            elif isinstance(v, tuple):
                d[k] = list(v)
        return d


class ClassifierHead(nn.Module):
    """Two fully connected layers on the pooled multi-scale encoder features."""

    def __init__(self, in_features: int, n_classes: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, n_classes)
        )

    def forward(self, pooled: Tensor) -> Tensor:
        """Class logits."""
        return self.net(pooled)


@dataclass
class _Task:
    name: str
    kind: Literal["classify", "restore", "reconstruct"]
    train_x: Tensor
    val_x: Tensor
    train_y: Tensor | None = None
    val_y: Tensor | None = None
    classes: list[str] = field(default_factory=list)
    metric: str = "val_loss"


@dataclass
class FinetuneResult:
    """Outcome of one finetuning run."""

    strategy: str
    initial: dict[str, dict[str, float]]
    final: dict[str, dict[str, float]]
    shares: list[dict[str, float]]
    steps_per_task: dict[str, int]
    card: dict[str, Any] | None = None


def _labelled_tasks(cfg: FinetuneConfig, size: int) -> list[_Task]:
    """Read the folder into tasks, every task split by the same file-name hash.

    A file is on the same side for every task (held out from restoration and reconstruction
    whenever it is held out from classification), so no validation image is ever trained on.
    Classification reads only the rows whose label is set; the split is computed on those rows.
    """
    from encoder.data import read_folder

    tasks: list[_Task] = []
    if "restore" in cfg.tasks or "reconstruct" in cfg.tasks:
        every = read_folder(cfg.data, size=size, limit=cfg.limit, cache_dir=cfg.cache_dir)
        held_all = np.array([_is_val(f, cfg.val_fraction) for f in every.files], dtype=bool)
        if held_all.all() or not held_all.any():
            raise TrainingError(
                f"{cfg.data}: {len(every.files)} images give no train/validation split "
                f"at val_fraction {cfg.val_fraction}"
            )
        tr, va = torch.from_numpy(every.images[~held_all]), torch.from_numpy(every.images[held_all])
        for kind in ("restore", "reconstruct"):
            if kind in cfg.tasks:
                tasks.append(_Task(kind, kind, tr, va))
    if "classify" in cfg.tasks:
        thresholds = list(cfg.thresholds) + [None] * (len(cfg.labels) - len(cfg.thresholds))
        for label, threshold in zip(cfg.labels, thresholds, strict=True):
            s = read_folder(
                cfg.data,
                label=label,
                threshold=threshold,
                size=size,
                limit=cfg.limit,
                cache_dir=cfg.cache_dir,
            )
            if s.labels is None:
                raise TrainingError(f"no labels read for column {label!r}")
            classes = sorted({str(v) for v in s.labels})
            if len(classes) < 2:
                raise TrainingError(f"label {label!r} has fewer than 2 classes")
            y = torch.tensor([classes.index(str(v)) for v in s.labels])
            # the split of the labelled rows only: rows with an empty label were skipped by
            # read_folder, so a mask over every row would not line up with these images
            held = torch.tensor([_is_val(f, cfg.val_fraction) for f in s.files], dtype=torch.bool)
            if held.all() or not held.any():
                raise TrainingError(f"label {label!r}: too few images for a validation split")
            x = torch.from_numpy(s.images)
            tasks.append(
                _Task(f"classify:{label}", "classify", x[~held], x[held], y[~held], y[held], classes)
            )
    if not tasks:
        raise TrainingError(f"no tasks among {cfg.tasks}")
    return tasks


def _auc(scores: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, scores)) if len(np.unique(y)) == 2 else float("nan")


class _Finetuner:
    def __init__(self, cfg: FinetuneConfig, tasks: list[_Task]) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        card = read_card(cfg.init)
        check_compatible(card, cfg.init)
        torch.manual_seed(cfg.seed)
        self.model: LVM = create_model(card["variant"], **card["config"])
        load_weights(self.model, cfg.init)
        self.init_card = card
        self.tasks = tasks
        self.heads = nn.ModuleDict()
        pooled_dim = sum(self.model.config.dims)
        for t in tasks:
            if t.kind == "classify":
                self.heads[t.name.replace(":", "__")] = ClassifierHead(pooled_dim, len(t.classes))
            elif t.kind == "restore":
                # restoration owns a copy of the pretrained decoder; reconstruction uses the model's
                self.heads["restore"] = copy.deepcopy(self.model.decoder)
        _prepare_model(self.model, self.device)
        self.heads.to(self.device)
        self.optimizer = torch.optim.AdamW(
            _param_groups([self.model, self.heads], cfg.weight_decay), lr=cfg.lr
        )
        self.augment = Augment(blur_p=0.3, noise_p=0.3)

    def _loss(
        self, task: _Task, x: Tensor, y: Tensor | None, g: torch.Generator, *, train: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Mean loss of one batch and, for classification, the last-class probabilities."""
        model = self.model
        with _autocast(self.device):
            if task.kind == "classify":
                if y is None:
                    raise TrainingError(f"task {task.name} has no labels")
                xin = self.augment(x, g) if train else x
                feats = model.encode(_to_device(xin, self.device))
                head = self.heads[task.name.replace(":", "__")]
                logits = head(model.pooled_from(feats)).float()
                loss = F.cross_entropy(logits, y.to(self.device))
                return loss, logits.softmax(dim=1)[:, -1].detach()
            if task.kind == "restore":
                feats = model.encode(_to_device(degrade(x, g), self.device))
                out = self.heads["restore"](feats, model.stage_norms[-1])
            else:
                grid = model.config.grid
                mask = block_mask(len(x), grid, ratio=self.cfg.mask_ratio, block=2, g=g)
                out = model.decode(model.encode(_to_device(x, self.device), mask.to(self.device)))
        return (out.float() - _to_device(x, self.device)).abs().mean(), None

    @torch.no_grad()
    def evaluate(self) -> dict[str, dict[str, float]]:
        self.model.eval()
        self.heads.eval()
        result: dict[str, dict[str, float]] = {}
        for ti, task in enumerate(self.tasks):
            total, scores = 0.0, []
            for start in range(0, len(task.val_x), 64):
                x = task.val_x[start : start + 64]
                y = None if task.val_y is None else task.val_y[start : start + 64]
                loss, s = self._loss(task, x, y, _generator(self.cfg.seed, -1 - start, 20 + ti), train=False)
                total += float(loss) * len(x)
                if s is not None:
                    scores.append(s.cpu().numpy())
            metrics = {"val_loss": total / max(1, len(task.val_x))}
            if task.kind == "classify" and task.val_y is not None and len(task.classes) == 2:
                metrics["val_auc"] = _auc(np.concatenate(scores), task.val_y.numpy())
            result[task.name] = metrics
        return result

    def shares(
        self, initial: dict[str, dict[str, float]], current: dict[str, dict[str, float]]
    ) -> np.ndarray:
        n = len(self.tasks)
        if self.cfg.strategy == "equal":
            return np.full(n, 1.0 / n)
        rel = np.array(
            [current[t.name]["val_loss"] / max(initial[t.name]["val_loss"], 1e-12) for t in self.tasks]
        )
        soft = np.exp((rel - rel.max()) / self.cfg.temperature)
        soft /= soft.sum()
        return self.cfg.floor / n + (1 - self.cfg.floor) * soft

    def run(self) -> FinetuneResult:
        cfg = self.cfg
        initial = self.evaluate()
        current = initial
        share = self.shares(initial, current)
        history = [{"step": 0, **{t.name: float(s) for t, s in zip(self.tasks, share, strict=True)}}]
        counts = {t.name: 0 for t in self.tasks}
        bar = _progress(range(cfg.steps), enabled=cfg.progress, desc=f"finetune ({cfg.strategy})")
        for step in bar:
            self.model.train()
            self.heads.train()
            torch.manual_seed(int(_generator(cfg.seed, step, 13).initial_seed()))
            rng = _np_rng(cfg.seed, step, 11)
            ti = int(rng.choice(len(self.tasks), p=share))
            task = self.tasks[ti]
            idx = torch.from_numpy(rng.integers(0, len(task.train_x), cfg.batch_size))
            lr = _lr_at(
                step, total=cfg.steps, base=cfg.lr, minimum=cfg.lr * 0.05, warmup=min(20, cfg.steps // 10 + 1)
            )
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            y = None if task.train_y is None else task.train_y[idx]
            loss, _ = self._loss(task, task.train_x[idx], y, _generator(cfg.seed, step, 12), train=True)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            counts[task.name] += 1
            if (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                current = self.evaluate()
                share = self.shares(initial, current)
                history.append(
                    {"step": step + 1, **{t.name: float(s) for t, s in zip(self.tasks, share, strict=True)}}
                )
                if cfg.progress:
                    bar.set_postfix(
                        {
                            t.name.split(":")[-1][:10]: f"{s:.2f}"
                            for t, s in zip(self.tasks, share, strict=True)
                        }
                    )
        final = self.evaluate()
        return FinetuneResult(cfg.strategy, initial, final, history, counts)

    def save(self, out: Path, result: FinetuneResult) -> dict[str, Any]:
        card = {
            "kind": "finetune",
            "init": str(self.cfg.init),
            "init_version": self.init_card.get("version"),
            "training": self.cfg.to_card(),
            "tasks": {
                t.name: {"kind": t.kind, "classes": t.classes, "train": len(t.train_x), "val": len(t.val_x)}
                for t in self.tasks
            },
            "metrics": result.final,
            "initial_metrics": result.initial,
            "shares": result.shares,
            "steps_per_task": result.steps_per_task,
            "data": [{"folder": str(self.cfg.data)}],
        }
        return save_checkpoint(
            out,
            self.model,
            card=card,
            optimizer=self.optimizer,
            step=self.cfg.steps,
            extra_modules={"heads": self.heads},
        )


#: task kinds :func:`finetune` knows
TASK_KINDS = ("classify", "restore", "reconstruct")


def _check_tasks(cfg: FinetuneConfig) -> None:
    unknown = sorted(set(cfg.tasks) - set(TASK_KINDS))
    if unknown or not cfg.tasks:
        raise TrainingError(f"tasks must be among {list(TASK_KINDS)}, got {list(cfg.tasks)}")
    if "classify" in cfg.tasks and not cfg.labels:
        raise TrainingError("the classify task needs at least one label column (--label)")
    if len(cfg.thresholds) > len(cfg.labels):
        raise TrainingError(f"{len(cfg.thresholds)} thresholds for {len(cfg.labels)} label columns")


def finetune(cfg: FinetuneConfig, *, tasks: list[_Task] | None = None) -> FinetuneResult:
    """Multi-task finetuning of a pretrained checkpoint (see the module docstring).

    Parameters
    ----------
    cfg
        Options; ``cfg.out`` (if set) receives the finetuned model and its heads.
    tasks
        Pre-loaded tasks (used by :func:`compare_strategies` to read the data once).
    """
    if cfg.strategy not in ("active", "equal"):
        raise TrainingError(f"strategy must be 'active' or 'equal', got {cfg.strategy!r}")
    if cfg.steps < 1:
        raise TrainingError("steps must be >= 1")
    _check_tasks(cfg)
    card = read_card(cfg.init)
    # before any data is read: a checkpoint made for other preprocessing cannot be finetuned
    check_compatible(card, cfg.init)
    size = int(card["config"]["img_size"])
    runner = _Finetuner(cfg, tasks if tasks is not None else _labelled_tasks(cfg, size))
    result = runner.run()
    if cfg.out is not None:
        result.card = runner.save(cfg.out, result)
    return result


def compare_strategies(cfg: FinetuneConfig) -> dict[str, FinetuneResult]:
    """Run ``equal`` and ``active`` finetuning from the same checkpoint, seed and budget.

    With ``cfg.out`` set, the active run is saved there and the equal run beside it with an
    ``-equal`` suffix.
    """
    _check_tasks(cfg)
    card = read_card(cfg.init)
    check_compatible(card, cfg.init)
    tasks = _labelled_tasks(cfg, int(card["config"]["img_size"]))
    results = {}
    for strategy in ("equal", "active"):
        out = cfg.out
        if out is not None and strategy == "equal":
            out = out.with_name(out.stem + "-equal" + out.suffix)
        results[strategy] = finetune(replace(cfg, strategy=strategy, out=out), tasks=tasks)
    return results


def comparison_rows(results: dict[str, FinetuneResult]) -> list[dict[str, Any]]:
    """Flat rows (``model`` = strategy, task, metric, value) for tables and ``--json``."""
    rows: list[dict[str, Any]] = []
    first = next(iter(results.values()))
    for task, metrics in first.initial.items():
        for metric, value in metrics.items():
            rows.append({"model": "init", "task": task, "metric": metric, "value": value, "steps": 0})
    for strategy, res in results.items():
        for task, metrics in res.final.items():
            for metric, value in metrics.items():
                rows.append(
                    {
                        "model": strategy,
                        "task": task,
                        "metric": metric,
                        "value": value,
                        "steps": res.steps_per_task[task],
                    }
                )
    return rows


def format_comparison(rows: list[dict[str, Any]]) -> str:
    """Table: one line per (task, metric), columns init / equal / active (steps in brackets)."""
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for r in rows:
        cells.setdefault((r["task"], r["metric"]), {})[r["model"]] = f"{r['value']:.4f}" + (
            f" [{r['steps']}]" if r["model"] != "init" else ""
        )
    models = [m for m in ("init", "equal", "active") if any(m in c for c in cells.values())]
    header = f"{'task':<28} {'metric':<9} " + " ".join(f"{m:>15}" for m in models)
    lines = [header, "-" * len(header)]
    for (task, metric), c in cells.items():
        lines.append(f"{task:<28} {metric:<9} " + " ".join(f"{c.get(m, ''):>15}" for m in models))
    lines.append("val_loss: lower is better (cross entropy, L1); val_auc: higher is better; [steps spent]")
    return "\n".join(lines)
