"""Survey-like, colour-preserving augmentations of model-input batches.

Every transform acts on a float batch ``(B, 3, H, W)`` and draws its randomness from an explicit
``torch.Generator`` (so training is reproducible step by step). None of them changes the bands
differently: no per-channel jitter, no hue or saturation change, no flux rescaling, because the
embedding must keep the flux and colour information that separates, e.g., red lens galaxies with
blue arcs from ordinary ellipticals.

* :func:`dihedral` — the 8 flips/right-angle turns (the sky has no preferred orientation);
* :func:`random_affine` — rotation by any angle and a zoom into a random crop (reflect padding);
* :func:`scale_flux` — one brightness factor for all bands (colours, i.e. band ratios, kept);
* :func:`shift` — small translations (reflect padding);
* :func:`psf_blur` — extra Gaussian seeing, the same kernel in every band;
* :func:`add_noise` — extra Gaussian sky noise, the same level in every band;
* :func:`composite_style` — the sky pedestal and clipping of survey JPEG composites, used on
  simulated flux so both kinds of input are seen;
* :class:`Augment` — a configurable chain of the above; :func:`degrade` — the stronger blur +
  noise used to make restoration/reconstruction inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def dihedral(x: Tensor, g: torch.Generator) -> Tensor:
    """One random element of the dihedral group D4 per image (turns by 90°, mirror)."""
    k = torch.randint(0, 4, (x.shape[0],), generator=g)
    flip = torch.randint(0, 2, (x.shape[0],), generator=g).bool()
    out = x.clone()
    for turn in range(1, 4):
        sel = k == turn
        if sel.any():
            out[sel] = torch.rot90(out[sel], turn, dims=(2, 3))
    if flip.any():
        out[flip] = torch.flip(out[flip], dims=(3,))
    return out


def random_affine(
    x: Tensor,
    g: torch.Generator,
    *,
    crop_scale: tuple[float, float] = (0.6, 1.0),
    rotate: bool = True,
) -> Tensor:
    """Rotate each image by a random angle and zoom into a random crop of side ``crop_scale``.

    The crop (a fraction of the side) is placed at random inside the image; everything is
    resampled bilinearly to the input size, with reflection at the borders.
    """
    b = x.shape[0]
    scale = _uniform(b, crop_scale[0], crop_scale[1], g)
    angle = _uniform(b, 0.0, 2 * math.pi, g) if rotate else torch.zeros(b)
    tx = (1 - scale) * _uniform(b, -1.0, 1.0, g)
    ty = (1 - scale) * _uniform(b, -1.0, 1.0, g)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def scale_flux(x: Tensor, g: torch.Generator, *, factor: tuple[float, float] = (0.75, 1.33)) -> Tensor:
    """Multiply each image by one random factor (log-uniform in ``factor``), all bands alike."""
    lo, hi = math.log(factor[0]), math.log(factor[1])
    f = torch.exp(_uniform(x.shape[0], lo, hi, g)).to(x.device, x.dtype)
    return x * f[:, None, None, None]


def shift(x: Tensor, g: torch.Generator, *, max_px: int = 3) -> Tensor:
    """Translate each image by up to ``max_px`` pixels in x and y (reflect padding)."""
    if max_px <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_px, max_px, max_px, max_px), mode="reflect")
    offsets = torch.randint(0, 2 * max_px + 1, (b, 2), generator=g)
    return torch.stack(
        [padded[i, :, int(dy) : int(dy) + h, int(dx) : int(dx) + w] for i, (dy, dx) in enumerate(offsets)]
    )


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Blur image ``i`` by a Gaussian of ``sigma[i]`` pixels, the same kernel in every band."""
    b, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    s = sigma.to(x.device, x.dtype).clamp(min=1e-3)[:, None]
    k1 = torch.exp(-0.5 * (t[None] / s) ** 2)
    k1 = k1 / k1.sum(dim=1, keepdim=True)
    # separable blur as grouped convolutions: one kernel per (image, band)
    kx = k1.repeat_interleave(c, dim=0)[:, None, None, :]
    ky = k1.repeat_interleave(c, dim=0)[:, None, :, None]
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kx, groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), ky, groups=b * c)
    return y.reshape(b, c, h, w)


def psf_blur(x: Tensor, g: torch.Generator, *, max_sigma: float = 1.0, p: float = 0.5) -> Tensor:
    """With probability ``p`` per image, extra seeing of up to ``max_sigma`` pixels."""
    sigma = _uniform(x.shape[0], 0.0, max_sigma, g) * (torch.rand(x.shape[0], generator=g) < p)
    if float(sigma.max()) < 0.05:
        return x
    return gaussian_blur(x, sigma)


def add_noise(x: Tensor, g: torch.Generator, *, max_sigma: float = 0.02, p: float = 0.5) -> Tensor:
    """With probability ``p`` per image, Gaussian noise of up to ``max_sigma`` (all bands alike)."""
    sigma = _uniform(x.shape[0], 0.0, max_sigma, g) * (torch.rand(x.shape[0], generator=g) < p)
    noise = torch.randn(x.shape, generator=g, dtype=x.dtype)
    return x + noise.to(x.device) * sigma.to(x.device, x.dtype)[:, None, None, None]


def composite_style(x: Tensor, g: torch.Generator, *, max_pedestal: float = 0.07, p: float = 0.5) -> Tensor:
    """With probability ``p`` per image, add a grey sky pedestal and clip to [0, 1].

    Survey JPEG composites show the sky as dark grey and saturate bright cores; stretched flux
    (FITS, simulations) has sky at 0, negative noise and unclipped cores. Applying this to
    simulated images lets the model see both renderings of the same physics.
    """
    sel = torch.rand(x.shape[0], generator=g) < p
    if not sel.any():
        return x
    pedestal = _uniform(x.shape[0], 0.0, max_pedestal, g)[:, None, None, None].to(x.device, x.dtype)
    styled = (x + pedestal).clamp(0.0, 1.0)
    return torch.where(sel.to(x.device)[:, None, None, None], styled, x)


@dataclass(frozen=True)
class Augment:
    """A chain of the colour-preserving augmentations, for contrastive views.

    Attributes
    ----------
    flips
        Apply :func:`dihedral`.
    max_shift
        Largest translation in pixels (:func:`shift`).
    blur_sigma, blur_p
        Largest extra seeing in pixels and how often (:func:`psf_blur`).
    noise_sigma, noise_p
        Largest extra noise and how often (:func:`add_noise`).
    rotate, crop_scale
        Rotate by any angle / zoom into crops of this side range (:func:`random_affine`); off
        when ``rotate`` is False and ``crop_scale`` is None.
    brightness
        Range of a common flux factor (:func:`scale_flux`), or None.
    """

    flips: bool = True
    max_shift: int = 3
    blur_sigma: float = 1.0
    blur_p: float = 0.5
    noise_sigma: float = 0.02
    noise_p: float = 0.5
    rotate: bool = False
    crop_scale: tuple[float, float] | None = None
    brightness: tuple[float, float] | None = None

    def __call__(self, x: Tensor, g: torch.Generator) -> Tensor:
        """Augment a batch ``(B, 3, H, W)`` with randomness from ``g``."""
        if self.flips:
            x = dihedral(x, g)
        if self.rotate or self.crop_scale is not None:
            x = random_affine(x, g, crop_scale=self.crop_scale or (1.0, 1.0), rotate=self.rotate)
        if self.brightness is not None:
            x = scale_flux(x, g, factor=self.brightness)
        x = shift(x, g, max_px=self.max_shift)
        x = psf_blur(x, g, max_sigma=self.blur_sigma, p=self.blur_p)
        return add_noise(x, g, max_sigma=self.noise_sigma, p=self.noise_p)


def degrade(x: Tensor, g: torch.Generator, *, max_blur: float = 1.5, max_noise: float = 0.05) -> Tensor:
    """Degraded copy for restoration / reconstruction training: blur then noise, both random.

    Each image gets a blur of 0..``max_blur`` pixels and noise of 0..``max_noise`` (some images
    stay nearly clean, so the model also learns to leave clean input alone).
    """
    sigma = _uniform(x.shape[0], 0.0, max_blur, g)
    y = gaussian_blur(x, sigma)
    return add_noise(y, g, max_sigma=max_noise, p=1.0)
