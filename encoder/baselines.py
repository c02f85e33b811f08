"""Baselines for the few-shot morphology evaluation (``galsift eval morphology``).

Every baseline sees the same model input (:func:`encoder.data.to_model_input`) and the same
train/test splits as the LVM:

* :func:`pca_features`: raw-pixel PCA, fitted once on all images of the dataset with labels
  unused (unsupervised, like the LVM's pretraining), followed by the same linear head as the LVM;
* :func:`photometry_features`: per-band aperture fluxes, percentiles, colours and concentration,
  followed by the same linear head;
* :func:`untrained_like`: the LVM architecture with fresh random weights (fixed seed);
* :class:`ResNet18Scratch`: torchvision ``resnet18(weights=None)`` trained from scratch on the
  shots of each split with dihedral augmentation and a fixed step budget (deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

#: aperture radii of the photometry baseline, as fractions of the image side
APERTURE_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)
#: percentiles of each band over the whole image used by the photometry baseline
PERCENTILES = (50.0, 90.0, 99.0)


def pca_features(images: np.ndarray, *, n_components: int = 32, seed: int = 0) -> np.ndarray:
    """Raw-pixel PCA projections of every image (fitted on all images, labels unused).

    Parameters
    ----------
    images
        (N, C, H, W) model input.
    n_components
        Number of principal components kept (capped at N - 1).
    seed
        Seed of the randomised SVD.

    Returns
    -------
    numpy.ndarray
        (N, n_components) ``float32``.
    """
    from sklearn.decomposition import PCA

    flat = images.reshape(len(images), -1).astype(np.float32)
    k = max(1, min(n_components, len(images) - 1))
    return PCA(n_components=k, random_state=seed).fit_transform(flat).astype(np.float32)


def photometry_features(images: np.ndarray) -> np.ndarray:
    """Simple per-band flux and colour statistics of model input.

    Per band: mean within centred circular apertures (:data:`APERTURE_FRACTIONS` of the side)
    and image percentiles (:data:`PERCENTILES`); colours as differences of adjacent bands in
    each aperture (the stretch is logarithmic at high flux, so differences act as flux ratios);
    concentration as inner-over-outer aperture ratio per band.

    Parameters
    ----------
    images
        (N, 3, H, W) model input.

    Returns
    -------
    numpy.ndarray
        (N, n_features) ``float32``.
    """
    n, c, h, w = images.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2)
    apertures = []
    for frac in APERTURE_FRACTIONS:
        mask = (r < frac * h).astype(np.float32)
        apertures.append(np.einsum("nchw,hw->nc", images, mask) / mask.sum())
    ap = np.stack(apertures, axis=2)  # (N, C, A)
    pct = np.percentile(images.reshape(n, c, -1), PERCENTILES, axis=2).transpose(1, 2, 0)
    colours = ap[:, :-1, :] - ap[:, 1:, :]
    concentration = ap[:, :, 0] / (np.abs(ap[:, :, -1]) + 1e-3)
    feats = [ap.reshape(n, -1), pct.reshape(n, -1), colours.reshape(n, -1), concentration]
    return np.concatenate(feats, axis=1).astype(np.float32)


def untrained_like(model: nn.Module, *, seed: int = 0) -> nn.Module:
    """The same architecture with fresh random weights; data-derived buffers are kept.

    Parameters are re-drawn by building the variant anew under ``seed``; buffers (e.g. input
    standardisation statistics, position tables) are copied from ``model``, because they are not
    learned by gradient descent and the comparison is about learned weights.

    Parameters
    ----------
    model
        An :class:`encoder.models.LVM` (needs ``variant`` and ``config``).
    seed
        Seed of the random initialisation.
    """
    from encoder.models import create_model

    config: Any = getattr(model, "config", None)
    overrides = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh: nn.Module = create_model(model.variant, **overrides)  # type: ignore[arg-type]
    own = dict(model.named_buffers())
    with torch.no_grad():
        for name, buf in fresh.named_buffers():
            if name in own and own[name].shape == buf.shape:
                buf.copy_(own[name])
    return fresh.eval()


def dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Apply one random element of the dihedral group D4 (turns by 90°, flips) per image."""
    k = torch.randint(0, 4, (x.shape[0],), generator=generator)
    flip = torch.randint(0, 2, (x.shape[0],), generator=generator).bool()
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        xi = torch.rot90(x[i], int(k[i]), dims=(1, 2))
        out[i] = torch.flip(xi, dims=(2,)) if flip[i] else xi
    return out


@dataclass(frozen=True)
class ResNetConfig:
    """Training budget of the ResNet18 baseline (fixed, identical for every split)."""

    #: side of the (downsampled) input; 48 rather than 64 so that 20 repeats of both evaluation
    #: sets fit in ~25 minutes on 2 shared CPU cores (64 costs ~1.4x)
    size: int = 48
    #: optimiser steps per training run, whatever the number of shots (30 steps of 10 images at 5
    #: shots per class is 30 epochs; of 32 at 50 shots, ~10 epochs)
    steps: int = 30
    #: largest batch (smaller when there are fewer training images)
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4


def resize_images(images: np.ndarray, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of (N, C, H, W) model input to ``size``, as a tensor."""
    t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    if t.shape[-1] == size and t.shape[-2] == size:
        return t
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class _Standardise(nn.Module):
    """Per-channel standardisation with fixed statistics (those of the training images)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def train_resnet18(
    images: torch.Tensor, labels: np.ndarray, *, config: ResNetConfig, seed: int
) -> tuple[nn.Module, list[float]]:
    """Train ``torchvision.models.resnet18(weights=None)`` from scratch as a binary classifier.

    Deterministic for a given ``seed`` (initialisation, batches and augmentations all come from
    it). Inputs are standardised per channel with statistics of the training images.

    Parameters
    ----------
    images
        (N, 3, size, size) training images (see :func:`resize_images`).
    labels
        N binary labels.
    config
        The fixed training budget.
    seed
        Seed of the initialisation, the batch order and the augmentations.

    Returns
    -------
    tuple
        The trained model in eval mode (the training standardisation included, so it takes the
        same images) and the loss of every step.
    """
    from torchvision.models import resnet18

    y = torch.as_tensor(np.asarray(labels, dtype=np.float32))
    mean = images.mean(dim=(0, 2, 3), keepdim=True)
    std = images.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-3)
    x = _Standardise(mean, std)(images)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = resnet18(weights=None, num_classes=1)
    # the fused kernel makes the CPU optimiser step over 11M parameters ~3x cheaper
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    batch = max(2, min(config.batch_size, len(x)))
    order = torch.randperm(len(x), generator=gen)
    pos = 0
    losses = []
    model.train()
    for _ in range(config.steps):
        if pos + batch > len(order):
            order, pos = torch.randperm(len(x), generator=gen), 0
        idx = order[pos : pos + batch]
        pos += batch
        logits = model(dihedral(x[idx], gen))[:, 0]
        loss = F.binary_cross_entropy_with_logits(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return nn.Sequential(_Standardise(mean, std), model).eval(), losses


@torch.no_grad()
def resnet_scores(model: nn.Module, images: torch.Tensor, *, batch_size: int = 128) -> np.ndarray:
    """Logits of a model from :func:`train_resnet18` for (N, 3, size, size) images."""
    out = [model(images[i : i + batch_size])[:, 0] for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy().astype(np.float64)


class ResNet18Scratch:
    """The ``resnet18_scratch`` baseline: one ResNet18 trained per split, scored on its test set.

    Parameters
    ----------
    images
        (N, 3, H, W) model input of the whole dataset; resized once to ``config.size``.
    config
        The fixed training budget.
    seed
        Base seed; each split trains with a seed derived from it, the repeat and the shot count.
    """

    name = "resnet18_scratch"

    def __init__(self, images: np.ndarray, *, config: ResNetConfig | None = None, seed: int = 0) -> None:
        self.config = config or ResNetConfig()
        self.images = resize_images(images, self.config.size)
        self.seed = seed

    def scores(
        self, train: np.ndarray, y_train: np.ndarray, test: np.ndarray, *, repeat: int, shots: int
    ) -> np.ndarray:
        """Train on the images ``train`` (labels ``y_train``) and return scores for ``test``."""
        run_seed = (self.seed * 1_000_003 + repeat * 1009 + shots) % (2**31)
        model, _ = train_resnet18(self.images[train], y_train, config=self.config, seed=run_seed)
        return resnet_scores(model, self.images[test])
