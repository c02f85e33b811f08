"""Training and test data of the lens finder: simulated lenses with exact arc masks, and negatives.

Positives are strong lenses made with :mod:`encoder.sim`'s physics (:func:`simulate_lens_system`:
lenstronomy SIE + external shear, elliptical Sérsic source, de Vaucouleurs lens light, field stars
and galaxies, Moffat PSF, sky and source noise, g, r, z at 0.262″/px), with Einstein radii and arc
brightness of the lenses survey searches find. Their instance mask is the lensed-source light
(PSF-convolved source above 1.5× the r-band sky noise, as in :func:`encoder.sim.simulate_lens`)
and their box the bounding box of that mask, one instance per lens system. Lenses whose visible arcs cover
fewer than ``min_arc_pixels`` model-input pixels are redrawn: they carry no detectable signal.

Negatives (empty targets) are

* simulated galaxies (:func:`encoder.sim.simulate_galaxy`: bulge + disk, rings and spirals);
* simulated *look-alikes* (:func:`simulate_lookalike`): the same red lens galaxies and fields as the
  lenses but with no lensed source, and often an unlensed blue neighbour; they keep the detector
  from scoring "red elliptical in the middle" instead of arcs;
* real non-lens images from ``labels.csv`` folders (:class:`NegativeSpec`, e.g. Galaxy Zoo DECaLS
  galaxies, Lens Zoo non-lenses, CFHTLS Space Warps candidates graded non-lens). Only the share of
  each folder picked by a stable hash of its file names is used (``fraction``), and the files used
  are recorded, so an evaluation on the same folder can leave them out.

Optionally (``painted_fraction``, off by default), real non-lenses also become lenses:
:func:`paint_arcs` adds simulated arcs (same lens model, PSF-convolved, through the same stretch)
around their central galaxy, with the mask of the painted light, so that real-looking images occur
in both classes. In a 1,000-image run with a share of 0.2 it lowered the held-out simulation
metrics and the AUROC on the Lens Zoo guide images (lenses against unseen non-lenses), so the
shipped detector was trained without it.

Every simulated stamp covers a random field of 24-40″ (the 30″ CFHTLS fields sit in the middle),
rendered at 0.262″/px and resized to the model input by :func:`encoder.data.to_model_input`, the
service's own preprocessing. Half the simulations are drawn under DECaLS-like conditions and half
under deeper, sharper ones (:data:`SHARP_CONDITIONS`, CFHTLS-like seeing); half are rendered as
JPEG-like colour composites (:func:`colour_composite`: stretch, sky pedestal, clipping, gamma,
8-bit quantisation and JPEG compression, then the colour-composite path of the preprocessing), so
the detector sees both kinds of survey input: stretched flux (FITS tiles) and colour JPEGs.

Each sample is a pure function of ``(seed, index)``, so a set is reproducible and the same for
every backbone trained on it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoder import sim
from encoder.data import load_model_input, to_model_input

#: deeper imaging with better seeing than DECaLS (CFHTLS-like: ~0.7″ seeing, ~1 mag deeper)
SHARP_CONDITIONS = sim.SurveyConditions(
    sky_sigma=(0.0011, 0.0017, 0.0040),
    sky_factor=(0.6, 1.4),
    psf_fwhm=((0.65, 1.1), (0.6, 1.0), (0.6, 1.0)),
)
#: bump when a simulated sample changes for the same (seed, index, kind, config): keys the cache
SIM_VERSION = "1"
#: sample kinds recorded in :attr:`LensSet.kind`
KINDS = ("sim_lens", "sim_galaxy", "sim_lookalike", "real", "real_painted")


class LensDataError(ValueError):
    """Impossible data arguments or an unusable negatives folder."""


@dataclass(frozen=True)
class LensDataConfig:
    """How a lens-finder data set is drawn.

    Attributes
    ----------
    size
        Side of the model input in pixels.
    field_arcsec
        Range of the side of a simulated field, in arcsec (rendered at 0.262″/px, then resized).
    lens_fraction
        Share of lenses among all images.
    real_fraction
        Share of real negatives among all images (when real negatives are given).
    painted_fraction
        Share of all images that are real negatives with simulated arcs painted around their
        central galaxy (:func:`paint_arcs`), counted among the lenses (when real negatives are
        given). Without them every real-looking image would be a negative, and a detector could
        learn "survey look means no lens" instead of looking for arcs.
    lookalike_fraction
        Share of look-alikes among the simulated negatives (the rest are galaxies).
    colour_fraction
        Share of simulated images rendered as JPEG-like colour composites.
    sharp_fraction
        Share of simulated images drawn under :data:`SHARP_CONDITIONS` (others: DECaLS-like).
    min_arc_pixels
        Fewest model-input pixels of visible arcs a simulated lens must have (else redrawn).
    """

    size: int = 96
    field_arcsec: tuple[float, float] = (24.0, 40.0)
    lens_fraction: float = 0.5
    real_fraction: float = 0.25
    painted_fraction: float = 0.0
    lookalike_fraction: float = 0.5
    colour_fraction: float = 0.5
    sharp_fraction: float = 0.5
    min_arc_pixels: int = 8

    def __post_init__(self) -> None:
        for name in (
            "lens_fraction",
            "real_fraction",
            "painted_fraction",
            "lookalike_fraction",
            "colour_fraction",
            "sharp_fraction",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise LensDataError(f"{name} must be within [0, 1], got {value}")
        if self.lens_fraction + self.real_fraction > 1.0:
            raise LensDataError("lens_fraction + real_fraction must not exceed 1")
        if self.painted_fraction > self.lens_fraction:
            raise LensDataError("painted_fraction must not exceed lens_fraction (painted images are lenses)")
        if self.size < 32:
            raise LensDataError(f"size must be at least 32, got {self.size}")
        lo, hi = self.field_arcsec
        if not 0 < lo <= hi:
            raise LensDataError(f"field_arcsec {self.field_arcsec} is not an increasing positive range")


@dataclass
class LensSet:
    """Model-input images with their lens truth.

    Attributes
    ----------
    images
        ``float32`` (N, 3, S, S) from :func:`encoder.data.to_model_input`.
    masks
        ``bool`` (N, S, S) arc masks (all False for negatives).
    is_lens
        ``bool`` (N,).
    kind
        (N,) one of :data:`KINDS` per image.
    colour
        ``bool`` (N,): rendered as (or read from) a colour composite.
    files
        (N,) ``folder/file`` of real images, ``""`` for simulations.
    """

    images: np.ndarray
    masks: np.ndarray
    is_lens: np.ndarray
    kind: np.ndarray
    colour: np.ndarray
    files: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))

    def __post_init__(self) -> None:
        n = len(self.images)
        if len(self.files) == 0 and n:
            self.files = np.full(n, "", dtype=object)
        for name in ("masks", "is_lens", "kind", "colour", "files"):
            if len(getattr(self, name)) != n:
                raise LensDataError(f"{name} has {len(getattr(self, name))} entries for {n} images")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray | Sequence[int]) -> LensSet:
        """The images at ``index`` (a copy)."""
        idx = np.asarray(index, dtype=np.int64)
        return LensSet(
            self.images[idx],
            self.masks[idx],
            self.is_lens[idx],
            self.kind[idx],
            self.colour[idx],
            self.files[idx],
        )

    @staticmethod
    def concat(sets: Sequence[LensSet]) -> LensSet:
        """One set of all images of ``sets``, in order."""
        if not sets:
            raise LensDataError("nothing to concatenate")
        return LensSet(
            np.concatenate([s.images for s in sets]),
            np.concatenate([s.masks for s in sets]),
            np.concatenate([s.is_lens for s in sets]),
            np.concatenate([s.kind for s in sets]),
            np.concatenate([s.colour for s in sets]),
            np.concatenate([s.files for s in sets]),
        )

    def counts(self) -> dict[str, int]:
        """Number of images of each kind, and of colour-composite renderings."""
        out = {k: int(np.sum(self.kind == k)) for k in KINDS}
        out["colour"] = int(self.colour.sum())
        out["total"] = len(self)
        return out


# ---------------------------------------------------------------------------------- rendering
def colour_composite(flux: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Render g, r, z flux as a JPEG-like 8-bit colour composite (red = z, blue = g).

    The flux gets the service's fixed arcsinh stretch (:func:`encoder.data.to_model_input`), then
    what survey composite pipelines add: a random gain, a mild colour balance, a tinted sky
    pedestal, clipping to [0, 1] (saturated cores), a gamma, 8-bit quantisation and JPEG compression (quality 70-95) at twice
    the stamp's resolution, as survey JPEGs sample finer than the model input.

    Parameters
    ----------
    flux
        ``float32`` (3, H, W) g, r, z flux in nanomaggies.
    rng
        Source of randomness.

    Returns
    -------
    numpy.ndarray
        ``uint8`` (3, 2H, 2W) red, green, blue.
    """
    from PIL import Image

    stretched = to_model_input(flux, bands=sim.BANDS, size=flux.shape[-1])
    # colour balance and sky tint differ between composite pipelines (CFHTLS gri composites have
    # a bluish sky); a mild per-channel factor keeps blue arcs bluer than their red lens galaxy
    balance = np.exp(rng.normal(0.0, 0.1, size=3))[:, None, None]
    pedestal = rng.uniform(0.0, 0.06) * rng.uniform(0.7, 1.4, size=3)[:, None, None]
    gain = rng.uniform(0.7, 1.5)
    gamma = rng.uniform(0.8, 1.25)
    y = np.clip(stretched * gain * balance + pedestal, 0.0, 1.0) ** gamma
    rgb = (y * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)
    h, w = rgb.shape[:2]
    im = Image.fromarray(rgb).resize((2 * w, 2 * h), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=int(rng.integers(70, 96)))
    buf.seek(0)
    with Image.open(buf) as decoded:
        out = np.asarray(decoded.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def simulate_lookalike(
    rng: np.random.Generator, *, size: int = 96, conditions: sim.SurveyConditions = sim.DEFAULT_CONDITIONS
) -> sim.Simulated:
    """A lens-like non-lens: a red early-type galaxy with its field and no lensed source.

    The galaxy is drawn like the lens galaxies of :func:`encoder.sim.simulate_lens` (r = 17-20,
    de Vaucouleurs, red colours); with probability 0.6 a blue, unlensed neighbour (compact or
    disk-like, any orientation) sits 1.5-6″ away, as in the companions that make ordinary
    galaxies look like lens candidates.
    """
    import galsim

    scale = conditions.pixel_scale
    fwhms = sim._draw_psfs(rng, conditions)
    angle = rng.uniform(0, 180)
    mag = rng.uniform(17.0, 20.0)
    flux = sim._band_fluxes(sim.mag_to_nmgy(mag), rng.uniform(1.1, 1.8), rng.uniform(0.7, 1.1))
    shape = galsim.Shear(q=rng.uniform(0.6, 1.0), beta=angle * galsim.degrees)
    hlr = rng.uniform(0.6, 2.2)
    comps = sim._field(rng, size, conditions, fwhms)
    neighbour = rng.uniform() < 0.6
    for b in range(3):
        comps[b].append(galsim.DeVaucouleurs(half_light_radius=hlr, flux=flux[b]).shear(shape))
    if neighbour:
        r = rng.uniform(1.5, 6.0)
        phi = rng.uniform(0, 2 * math.pi)
        nb = sim._band_fluxes(
            sim.mag_to_nmgy(rng.uniform(19.0, 22.0)), rng.uniform(-0.1, 0.6), rng.uniform(-0.1, 0.5)
        )
        nshape = galsim.Shear(q=rng.uniform(0.3, 1.0), beta=rng.uniform(0, 180) * galsim.degrees)
        nhlr = rng.uniform(0.15, 0.8)
        for b in range(3):
            comps[b].append(
                galsim.Exponential(half_light_radius=nhlr, flux=nb[b])
                .shear(nshape)
                .shift(r * math.cos(phi), r * math.sin(phi))
            )
    img = sim._render(comps, fwhms, size, scale)
    noisy, _ = sim._add_noise(rng, img, conditions)
    params = {"r_mag": mag, "neighbour": float(neighbour)}
    return sim.Simulated(noisy.astype(np.float32), None, "lookalike", params)


def simulate_lens_system(
    rng: np.random.Generator, *, size: int = 96, conditions: sim.SurveyConditions = sim.DEFAULT_CONDITIONS
) -> sim.Simulated:
    """A galaxy- to group-scale strong lens in g, r, z flux, with the mask of its lensed-source light.

    The physics is :func:`encoder.sim.simulate_lens`'s (its lenstronomy SIE + external shear ray
    shooting of an elliptical Sérsic source, de Vaucouleurs lens light, field, Moffat PSF, sky and
    source noise; the same mask rule: PSF-convolved lensed light above 1.5× the r-band sky noise
    and 5 % of its peak), drawn from the population that survey lens searches find, whose arcs
    stand apart from the lens light: Einstein radius 1.2-4″ (at most 0.3 of the field), lens
    galaxy r = 17.5-20.5, lensed source r = 19-22 in total.
    """
    import galsim

    scale = conditions.pixel_scale
    fwhms = sim._draw_psfs(rng, conditions)
    theta_e = rng.uniform(1.2, min(4.0, 0.3 * size * scale))
    angle = rng.uniform(0, 180)
    lens_mag = rng.uniform(17.5, 20.5)
    lens_f = sim._band_fluxes(sim.mag_to_nmgy(lens_mag), rng.uniform(1.1, 1.8), rng.uniform(0.7, 1.1))
    lens_shape = galsim.Shear(q=rng.uniform(0.6, 1.0), beta=angle * galsim.degrees)
    lens_hlr = rng.uniform(0.5, 2.0)
    comps = sim._field(rng, size, conditions, fwhms)
    for b in range(3):
        comps[b].append(galsim.DeVaucouleurs(half_light_radius=lens_hlr, flux=lens_f[b]).shear(lens_shape))
    img = sim._render(comps, fwhms, size, scale)
    sb, extra = sim._lensed_source(rng, size, scale, theta_e, angle)
    arc_mag = rng.uniform(19.0, 22.0)
    src_f = sim._band_fluxes(sim.mag_to_nmgy(arc_mag), rng.uniform(-0.1, 0.5), rng.uniform(-0.1, 0.4))
    arcs = np.stack([sim._convolve(sb * src_f[b], fwhms[b], scale) for b in range(3)])
    noisy, sigma = sim._add_noise(rng, img + arcs, conditions)
    mask = (arcs[1] > 1.5 * sigma[1]) & (arcs[1] > 0.05 * arcs[1].max())
    params = {"theta_e_arcsec": theta_e, "lens_r_mag": lens_mag, "arc_r_mag": arc_mag, **extra}
    return sim.Simulated(noisy.astype(np.float32), mask, "lens", params)


def paint_arcs(
    host: np.ndarray, rng: np.random.Generator, *, config: LensDataConfig, colour: bool
) -> tuple[np.ndarray, np.ndarray] | None:
    """Paint simulated lensed arcs around the central galaxy of a real model-input image.

    The arcs are those of :func:`simulate_lens_system` (lenstronomy SIE + shear of a Sérsic
    source, Einstein radius 1.2-4″, source r = 19-22, PSF-convolved) for a field drawn from
    ``config.field_arcsec``, centred on the image; they go through the service's stretch alone and
    are added to the host's model input (a faint arc adds nearly linearly under the arcsinh
    stretch), with a random display gain; colour composites are clipped to [0, 1] again.

    The mask is where the painted arcs' green channel exceeds 1.5× the host's sky noise (a robust
    spread of its border) and 5 % of their own peak, the rule of the simulated lenses.

    Parameters
    ----------
    host
        ``float32`` (3, S, S) model input of a real non-lens.
    rng
        Source of randomness.
    config
        Field range, conditions share and ``min_arc_pixels``.
    colour
        Whether the host is a colour composite (values clipped to [0, 1]).

    Returns
    -------
    tuple or None
        ``(image, mask)``, or None when the arcs stay below ``min_arc_pixels`` visible pixels.
    """
    s = config.size
    stamp = max(32, round(rng.uniform(*config.field_arcsec) / sim.PIXEL_SCALE_ARCSEC))
    cond = SHARP_CONDITIONS if rng.uniform() < config.sharp_fraction else sim.DEFAULT_CONDITIONS
    scale = cond.pixel_scale
    fwhms = sim._draw_psfs(rng, cond)
    theta_e = rng.uniform(1.2, min(4.0, 0.3 * stamp * scale))
    sb, _ = sim._lensed_source(rng, stamp, scale, theta_e, rng.uniform(0, 180))
    src_f = sim._band_fluxes(
        sim.mag_to_nmgy(rng.uniform(19.0, 22.0)), rng.uniform(-0.1, 0.5), rng.uniform(-0.1, 0.4)
    )
    arcs = np.stack([sim._convolve(sb * src_f[b], fwhms[b], scale) for b in range(3)]).astype(np.float32)
    display = to_model_input(arcs, bands=sim.BANDS, size=s) * np.float32(rng.uniform(0.7, 1.5))
    image = host + display
    if colour:
        image = np.clip(image, 0.0, 1.0)
    border = np.concatenate(
        [host[1, :4].ravel(), host[1, -4:].ravel(), host[1, :, :4].ravel(), host[1, :, -4:].ravel()]
    )
    sigma = max(1.4826 * float(np.median(np.abs(border - np.median(border)))), 2.0 / 255.0)
    green = display[1]
    mask = (green > 1.5 * sigma) & (green > 0.05 * float(green.max()))
    if mask.sum() < config.min_arc_pixels:
        return None
    return image.astype(np.float32), mask


def painted_set(hosts: LensSet, n: int, *, seed: int, config: LensDataConfig) -> LensSet:
    """``n`` lenses made by :func:`paint_arcs` on hosts drawn in turn from ``hosts`` (real negatives)."""
    if not len(hosts):
        raise LensDataError("no host images to paint arcs on")
    s = config.size
    images = np.empty((n, 3, s, s), np.float32)
    masks = np.zeros((n, s, s), bool)
    picked = np.empty(n, np.int64)
    rng = np.random.default_rng([seed, 13])
    order = np.concatenate([rng.permutation(len(hosts)) for _ in range(math.ceil(n / len(hosts)))])
    j = 0
    for i in range(n):
        for _ in range(50):
            h = int(order[j % len(order)])
            j += 1
            prng = np.random.default_rng([seed, i, j, KINDS.index("real_painted")])
            made = paint_arcs(hosts.images[h], prng, config=config, colour=bool(hosts.colour[h]))
            if made is not None:
                images[i], masks[i] = made
                picked[i] = h
                break
        else:
            raise LensDataError(
                f"no painted lens with {config.min_arc_pixels} visible arc pixels in 50 draws"
            )
    return LensSet(
        images,
        masks,
        np.ones(n, bool),
        np.full(n, "real_painted", dtype=object),
        hosts.colour[picked],
        hosts.files[picked],
    )


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize an arc mask the way the pixels are resized (antialiased bilinear, then ≥ 0.5)."""
    if mask.shape == (size, size):
        return mask.astype(bool)
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    t = torch.nn.functional.interpolate(
        t, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return (t[0, 0] >= 0.5).numpy()


def _model_input(flux: np.ndarray, rng: np.random.Generator, *, colour: bool, size: int) -> np.ndarray:
    if colour:
        return to_model_input(colour_composite(flux, rng), size=size)
    return to_model_input(flux, bands=sim.BANDS, size=size)


def simulate_sample(
    seed: int, index: int, *, kind: str, config: LensDataConfig
) -> tuple[np.ndarray, np.ndarray, bool]:
    """One simulated sample, a pure function of ``(seed, index, kind)``.

    Parameters
    ----------
    seed, index
        Identify the sample.
    kind
        ``sim_lens``, ``sim_galaxy`` or ``sim_lookalike``.
    config
        Size, field, rendering and condition shares.

    Returns
    -------
    tuple
        ``(image, mask, colour)``: ``float32`` (3, S, S) model input, ``bool`` (S, S) arc mask
        and whether it was rendered as a colour composite.
    """
    rng = np.random.default_rng([seed, index, KINDS.index(kind)])
    s = config.size
    for _ in range(50):
        stamp = max(32, round(rng.uniform(*config.field_arcsec) / sim.PIXEL_SCALE_ARCSEC))
        cond = SHARP_CONDITIONS if rng.uniform() < config.sharp_fraction else sim.DEFAULT_CONDITIONS
        colour = bool(rng.uniform() < config.colour_fraction)
        if kind == "sim_lens":
            made = simulate_lens_system(rng, size=stamp, conditions=cond)
            if made.mask is None:
                raise LensDataError("a simulated lens came without its arc mask")
            mask = _resize_mask(made.mask, s)
            if mask.sum() < config.min_arc_pixels:
                continue
        elif kind == "sim_galaxy":
            made = sim.simulate_galaxy(rng, size=stamp, conditions=cond)
            mask = np.zeros((s, s), bool)
        elif kind == "sim_lookalike":
            made = simulate_lookalike(rng, size=stamp, conditions=cond)
            mask = np.zeros((s, s), bool)
        else:
            raise LensDataError(f"unknown simulated kind {kind!r}")
        return _model_input(made.flux, rng, colour=colour, size=s), mask, colour
    raise LensDataError(f"no lens with {config.min_arc_pixels} visible arc pixels in 50 draws (seed {seed})")


def _sim_cache_file(cache_dir: Path, kinds: Sequence[str], seed: int, config: LensDataConfig) -> Path:
    text = json.dumps([SIM_VERSION, seed, list(kinds), asdict(config)], sort_keys=True)
    return cache_dir / f"lens_sims_{hashlib.sha256(text.encode()).hexdigest()[:24]}.npz"


def simulate_set(
    kinds: Sequence[str],
    *,
    seed: int,
    config: LensDataConfig,
    progress: bool = False,
    desc: str = "simulate",
    cache_dir: Path | None = None,
) -> LensSet:
    """Simulate one sample per entry of ``kinds`` (sample ``i`` from ``(seed, i)``).

    With ``cache_dir``, the set is stored there (``.npz``, keyed by :data:`SIM_VERSION`, the
    seed, the kinds and the config) and read back by later runs.
    """
    from tqdm import tqdm

    cached = _sim_cache_file(cache_dir, kinds, seed, config) if cache_dir is not None else None
    if cached is not None and cached.is_file():
        with np.load(cached, allow_pickle=False) as z:
            kind_arr = np.asarray(list(kinds), dtype=object)
            n = len(kinds)
            return LensSet(
                z["images"],
                z["masks"],
                kind_arr == "sim_lens",
                kind_arr,
                z["colour"],
                np.full(n, "", dtype=object),
            )
    n, s = len(kinds), config.size
    images = np.empty((n, 3, s, s), np.float32)
    masks = np.zeros((n, s, s), bool)
    colour = np.zeros(n, bool)
    for i in tqdm(range(n), desc=desc, disable=not progress, unit="img"):
        images[i], masks[i], colour[i] = simulate_sample(seed, i, kind=kinds[i], config=config)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as fh:
            np.savez(fh, images=images, masks=masks, colour=colour)
        tmp.replace(cached)
    kind_arr = np.asarray(list(kinds), dtype=object)
    return LensSet(images, masks, kind_arr == "sim_lens", kind_arr, colour, np.full(n, "", dtype=object))


# ---------------------------------------------------------------------------------- real negatives
@dataclass(frozen=True)
class NegativeSpec:
    """A ``labels.csv`` folder of real non-lenses, optionally filtered by one column.

    Written ``DIR``, ``DIR:COL=VALUE`` or ``DIR:COL!=VALUE`` (e.g.
    ``../shared/data/cfhtls_lens_candidates:lens=0``, ``../shared/data/lenszoo_guide:kind!=lenses``).
    """

    folder: Path
    column: str | None = None
    value: str | None = None
    negate: bool = False

    @classmethod
    def parse(cls, text: str) -> NegativeSpec:
        """Parse ``DIR[:COL=VALUE|:COL!=VALUE]``."""
        folder, sep, cond = text.partition(":")
        if not sep:
            return cls(Path(text))
        if "!=" in cond:
            col, _, val = cond.partition("!=")
            negate = True
        elif "=" in cond:
            col, _, val = cond.partition("=")
            negate = False
        else:
            raise LensDataError(f"negatives {text!r}: expected DIR, DIR:COL=VALUE or DIR:COL!=VALUE")
        if not col.strip():
            raise LensDataError(f"negatives {text!r}: empty column name")
        return cls(Path(folder), col.strip(), val.strip(), negate)

    @property
    def name(self) -> str:
        """The folder's own name (what training records and evaluations match on)."""
        return Path(self.folder).resolve().name

    def __str__(self) -> str:
        if self.column is None:
            return str(self.folder)
        return f"{self.folder}:{self.column}{'!=' if self.negate else '='}{self.value}"

    def matches(self, row: dict[str, str]) -> bool:
        """Whether a ``labels.csv`` row is selected by the filter."""
        if self.column is None:
            return True
        hit = (row.get(self.column) or "").strip() == self.value
        return not hit if self.negate else hit


def in_training_share(folder_name: str, file: str, fraction: float) -> bool:
    """Whether a real image falls in the share used for training (stable hash of its name)."""
    digest = hashlib.sha256(f"{folder_name}/{file}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def load_negatives(
    specs: Sequence[NegativeSpec],
    *,
    size: int,
    fraction: float = 0.5,
    cache_dir: Path | None = None,
) -> tuple[LensSet, list[dict[str, Any]]]:
    """Read the training share of real non-lens images from ``labels.csv`` folders.

    Parameters
    ----------
    specs
        Folders and their row filters.
    size
        Side of the model input.
    fraction
        Share of each folder's selected rows used (by :func:`in_training_share`); the rest are
        never read, so they stay unseen for evaluation.
    cache_dir
        Preprocessing cache of :func:`encoder.data.load_model_input`.

    Returns
    -------
    tuple
        The images (kind ``real``) and, per folder, a record ``{"folder", "filter", "rows",
        "used", "files"}`` for the model card.

    Raises
    ------
    LensDataError
        If a folder has no ``labels.csv``, no ``file`` column, no such filter column, or a named
        file is missing.
    """
    if not 0.0 < fraction <= 1.0:
        raise LensDataError(f"fraction must be within (0, 1], got {fraction}")
    sets: list[LensSet] = []
    records: list[dict[str, Any]] = []
    for spec in specs:
        folder = Path(spec.folder)
        csv_path = folder / "labels.csv"
        if not csv_path.is_file():
            raise LensDataError(f"{folder}: no labels.csv")
        with csv_path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
        if "file" not in columns:
            raise LensDataError(f"{csv_path}: no 'file' column")
        if spec.column is not None and spec.column not in columns:
            raise LensDataError(f"{csv_path}: no column {spec.column!r} (columns: {columns})")
        selected = [r for r in rows if spec.matches(r)]
        used = [r["file"] for r in selected if in_training_share(spec.name, r["file"], fraction)]
        images = np.empty((len(used), 3, size, size), np.float32)
        for i, f in enumerate(used):
            path = folder / f
            if not path.is_file():
                raise LensDataError(f"{csv_path} names a missing file {f}")
            images[i] = load_model_input(path, size=size, cache_dir=cache_dir)
        colour = np.asarray([f.lower().endswith((".jpg", ".jpeg", ".png")) for f in used], dtype=bool)
        n = len(used)
        sets.append(
            LensSet(
                images,
                np.zeros((n, size, size), bool),
                np.zeros(n, bool),
                np.full(n, "real", dtype=object),
                colour,
                np.asarray([f"{spec.name}/{f}" for f in used], dtype=object),
            )
        )
        records.append(
            {"folder": str(spec.folder), "filter": str(spec), "rows": len(selected), "used": n, "files": used}
        )
    if not sets:
        empty = LensSet(
            np.zeros((0, 3, size, size), np.float32),
            np.zeros((0, size, size), bool),
            np.zeros(0, bool),
            np.zeros(0, dtype=object),
            np.zeros(0, bool),
            np.zeros(0, dtype=object),
        )
        return empty, records
    return LensSet.concat(sets), records


# ---------------------------------------------------------------------------------- data sets
def _sim_kinds(n_lens: int, n_neg: int, config: LensDataConfig, rng: np.random.Generator) -> list[str]:
    n_look = round(n_neg * config.lookalike_fraction)
    kinds = ["sim_lens"] * n_lens + ["sim_lookalike"] * n_look + ["sim_galaxy"] * (n_neg - n_look)
    return [kinds[i] for i in rng.permutation(len(kinds))]


def training_set(
    n: int,
    *,
    seed: int,
    config: LensDataConfig,
    negatives: LensSet | None = None,
    progress: bool = False,
    cache_dir: Path | None = None,
) -> LensSet:
    """``n`` training images: simulated lenses, simulated negatives and real negatives.

    ``round(n * lens_fraction)`` are lenses, of which ``round(n * painted_fraction)`` are real
    negatives with painted arcs (:func:`painted_set`) and the rest simulated;
    ``round(n * real_fraction)`` are real negatives drawn from ``negatives`` (without replacement
    while they last, then again in a new order); the rest are simulated negatives. Without real
    negatives, every lens and negative is simulated. The order is shuffled.
    """
    if n < 1:
        raise LensDataError(f"n must be positive, got {n}")
    rng = np.random.default_rng([seed, 7])
    n_lens = round(n * config.lens_fraction)
    have_real = negatives is not None and len(negatives) > 0
    n_real = min(round(n * config.real_fraction), n - n_lens) if have_real else 0
    n_painted = min(round(n * config.painted_fraction), n_lens) if have_real else 0
    sims = simulate_set(
        _sim_kinds(n_lens - n_painted, n - n_lens - n_real, config, rng),
        seed=seed,
        config=config,
        progress=progress,
        desc="simulate training set",
        cache_dir=cache_dir,
    )
    parts = [sims]
    if n_real and negatives is not None:
        reps = math.ceil(n_real / len(negatives))
        order = np.concatenate([rng.permutation(len(negatives)) for _ in range(reps)])[:n_real]
        parts.append(negatives.subset(order))
    if n_painted and negatives is not None:
        parts.append(painted_set(negatives, n_painted, seed=seed, config=config))
    full = LensSet.concat(parts)
    return full.subset(rng.permutation(len(full)))


def heldout_set(
    n: int, *, seed: int, config: LensDataConfig, progress: bool = False, cache_dir: Path | None = None
) -> LensSet:
    """``n`` held-out simulations: half lenses, half simulated negatives (look-alikes and galaxies).

    Drawn from a different seed stream than :func:`training_set` for the same ``seed``, so no
    held-out image is a training image.
    """
    if n < 2:
        raise LensDataError(f"n must be at least 2, got {n}")
    rng = np.random.default_rng([seed, 11])
    n_lens = n // 2
    return simulate_set(
        _sim_kinds(n_lens, n - n_lens, config, rng),
        seed=seed + 1_000_003,
        config=config,
        progress=progress,
        desc="simulate test set",
        cache_dir=cache_dir,
    )


# ---------------------------------------------------------------------------------- targets
def box_from_mask(mask: np.ndarray) -> np.ndarray:
    """``float32`` (1, 4) bounding box ``x0, y0, x1, y1`` (pixel edges) of a mask, or (0, 4)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return np.zeros((0, 4), np.float32)
    return np.asarray([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)


def targets_for(masks: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Targets of torchvision's Mask R-CNN from a batch of arc masks ``(B, S, S)``.

    An image with any mask pixel gets one ``lens`` instance (label 1) with the mask's bounding
    box; an empty mask gives an image with no instance (a negative).
    """
    out = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        if len(xs) == 0:
            s = m.shape[-1]
            out.append(
                {
                    "boxes": torch.zeros((0, 4), dtype=torch.float32),
                    "labels": torch.zeros(0, dtype=torch.int64),
                    "masks": torch.zeros((0, s, s), dtype=torch.uint8),
                }
            )
            continue
        box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()[None]
        out.append(
            {"boxes": box, "labels": torch.ones(1, dtype=torch.int64), "masks": m[None].to(torch.uint8)}
        )
    return out


def dihedral_pair(
    images: torch.Tensor, masks: torch.Tensor, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random flip / right-angle turn of each image and its mask (the sky has no up)."""
    k = torch.randint(0, 4, (images.shape[0],), generator=g)
    flip = torch.randint(0, 2, (images.shape[0],), generator=g).bool()
    xi, mi = images.clone(), masks.clone()
    for i in range(images.shape[0]):
        x, m = torch.rot90(xi[i], int(k[i]), dims=(1, 2)), torch.rot90(mi[i], int(k[i]), dims=(0, 1))
        if flip[i]:
            x, m = torch.flip(x, dims=(2,)), torch.flip(m, dims=(1,))
        xi[i], mi[i] = x, m
    return xi, mi
