"""Simulated survey galaxies (GalSim) and strong lenses (lenstronomy), on the fly.

Images are rendered in g, r, z flux (nanomaggies per pixel, zero point 22.5 mag) at the Legacy
Surveys pixel scale (0.262″/px), convolved with a Moffat PSF whose width is drawn per band from
DECaLS-like seeing, with sky and source noise calibrated on the DR9 cutouts in ``data/``, and then
passed through the one preprocessing of real data (:func:`encoder.data.to_model_input`), so a
simulated image and a survey image land in the same model-input space (same stretch, colours and
channel order).

* :func:`simulate_galaxy` — Sérsic bulge (n=4) + exponential disk with independent sizes,
  ellipticities and colours, optionally a star-forming ring or two-armed spiral pattern, plus
  field stars and faint background galaxies.
* :func:`simulate_lens` — SIE + external shear lens (lenstronomy ray shooting, 2× supersampled),
  elliptical Sérsic source with blue colours lensed into arcs/rings, a red de Vaucouleurs lens
  galaxy, plus the same field; returns a mask of the arcs.
* :func:`simulate_batch` — many of both, as model input, with masks; :func:`cached_batch` keeps
  such a pool in an 8-bit ``.npz`` (:func:`save_pool`) for reruns and for GPU nodes without
  GalSim.

Generation takes a few ms per galaxy and ~15-20 ms per lens (96 px); PSF profiles and images are
cached per (band, FWHM bin).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

#: bands rendered, in this order
BANDS = ("g", "r", "z")
#: Legacy Surveys pixel scale in arcsec per pixel
PIXEL_SCALE_ARCSEC = 0.262
#: AB magnitude of one nanomaggy
NANOMAGGY_ZP = 22.5
#: binary truth labels that come with every simulated image (:attr:`SimBatch.labels` columns)
SIM_LABELS = ("lens", "ring", "spiral")


class SimulationError(ValueError):
    """Raised for impossible simulation arguments."""


@dataclass(frozen=True)
class SurveyConditions:
    """Observing conditions drawn per image (DECaLS DR9-like by default).

    Attributes
    ----------
    sky_sigma
        Typical sky noise per pixel in nanomaggies for g, r, z (median of the DR9 cutouts).
    sky_factor
        Range of a per-image factor on ``sky_sigma`` (depth varies across the footprint).
    psf_fwhm
        Range of the PSF FWHM in arcsec, per band.
    gain
        Range of effective electrons per nanomaggy of the coadd (source Poisson noise).
    pixel_scale
        Arcsec per pixel.
    """

    sky_sigma: tuple[float, float, float] = (0.0022, 0.0034, 0.0083)
    sky_factor: tuple[float, float] = (0.7, 1.5)
    psf_fwhm: tuple[tuple[float, float], ...] = ((1.15, 1.9), (1.0, 1.7), (0.9, 1.6))
    gain: tuple[float, float] = (600.0, 2500.0)
    pixel_scale: float = PIXEL_SCALE_ARCSEC


DEFAULT_CONDITIONS = SurveyConditions()


@dataclass
class Simulated:
    """One simulated image in flux.

    Attributes
    ----------
    flux
        ``float32`` (3, H, W) g, r, z flux in nanomaggies per pixel, noise included.
    mask
        ``bool`` (H, W) pixels where lensed arcs stand above the noise; None for galaxies.
    kind
        ``"galaxy"`` or ``"lens"``.
    params
        The drawn parameters (magnitudes, sizes, Einstein radius, ...), for tests and plots.
    """

    flux: np.ndarray
    mask: np.ndarray | None
    kind: str
    params: dict[str, float] = field(default_factory=dict)


@dataclass
class SimBatch:
    """Simulated images as model input.

    Attributes
    ----------
    images
        ``float32`` (N, 3, size, size), from :func:`encoder.data.to_model_input`.
    masks
        ``bool`` (N, size, size) arc masks (all False for galaxies).
    is_lens
        ``bool`` (N,).
    labels
        ``float32`` (N, 3): truth of :data:`SIM_LABELS` (lens, ring, spiral) per image.
    """

    images: np.ndarray
    masks: np.ndarray
    is_lens: np.ndarray
    labels: np.ndarray


def mag_to_nmgy(mag: float) -> float:
    """AB magnitude -> flux in nanomaggies."""
    return float(10 ** ((NANOMAGGY_ZP - mag) / 2.5))


def _band_fluxes(total_r: float, g_r: float, r_z: float) -> np.ndarray:
    """Per-band fluxes (g, r, z) of an object of r-band flux ``total_r`` and colours g-r, r-z."""
    return np.array([total_r * 10 ** (-0.4 * g_r), total_r, total_r * 10 ** (0.4 * r_z)])


def _fwhm_bin(fwhm: float) -> float:
    # quantise so that the PSF caches stay small (0.05" steps are below what the eye can see)
    return round(fwhm * 20) / 20


@lru_cache(maxsize=256)
def _psf(fwhm: float):
    import galsim

    return galsim.Moffat(beta=3.5, fwhm=fwhm)


@lru_cache(maxsize=256)
def _psf_image(fwhm: float, pixel_scale: float) -> np.ndarray:
    """Pixelised PSF (sums to 1) for FFT convolution of numpy-rendered components."""
    n = math.ceil(3 * fwhm / pixel_scale) * 2 + 1
    img = _psf(fwhm).drawImage(nx=n, ny=n, scale=pixel_scale).array.astype(np.float64)
    return img / img.sum()


@lru_cache(maxsize=8)
def _grid(size: int, pixel_scale: float, supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in arcsec (x right, y up), centred like GalSim's true centre."""
    n = size * supersample
    c = (np.arange(n) - (n - 1) / 2) * pixel_scale / supersample
    xx, yy = np.meshgrid(c, c)
    return xx, yy


def _convolve(img: np.ndarray, fwhm: float, pixel_scale: float) -> np.ndarray:
    from scipy.signal import fftconvolve

    return np.asarray(fftconvolve(img, _psf_image(fwhm, pixel_scale), mode="same"))


def _draw_psfs(rng: np.random.Generator, cond: SurveyConditions) -> list[float]:
    return [_fwhm_bin(rng.uniform(lo, hi)) for lo, hi in cond.psf_fwhm]


def _add_noise(
    rng: np.random.Generator, img: np.ndarray, cond: SurveyConditions
) -> tuple[np.ndarray, np.ndarray]:
    """Sky + source Poisson noise (Gaussian approximation); returns (noisy, per-band sky sigma)."""
    factor = rng.uniform(*cond.sky_factor)
    sigma = np.asarray(cond.sky_sigma) * factor * rng.uniform(0.9, 1.1, size=3)
    gain = rng.uniform(*cond.gain)
    var = sigma[:, None, None] ** 2 + np.clip(img, 0, None) / gain
    return img + rng.standard_normal(img.shape) * np.sqrt(var), sigma


def _field(rng: np.random.Generator, size: int, cond: SurveyConditions, fwhms: list[float]):
    """GalSim profiles (one per band) of random field stars and faint background galaxies."""
    import galsim

    half = size * cond.pixel_scale / 2
    per_band: list[list[object]] = [[], [], []]
    for _ in range(rng.poisson(0.8)):
        g_r = rng.uniform(0.3, 1.5)
        fl = _band_fluxes(mag_to_nmgy(rng.uniform(16.5, 22.5)), g_r, 0.45 * g_r + rng.normal(0, 0.1))
        dx, dy = rng.uniform(-half, half, size=2)
        for b in range(3):
            per_band[b].append(galsim.DeltaFunction(flux=fl[b]).shift(dx, dy))
    for _ in range(rng.poisson(1.5)):
        g_r = rng.uniform(0.5, 1.7)
        fl = _band_fluxes(mag_to_nmgy(rng.uniform(19.5, 23.5)), g_r, 0.6 * g_r + rng.normal(0, 0.1))
        dx, dy = rng.uniform(-half, half, size=2)
        shape = galsim.Shear(q=rng.uniform(0.3, 1.0), beta=rng.uniform(0, 180) * galsim.degrees)
        hlr = rng.uniform(0.3, 1.2)
        for b in range(3):
            gal = galsim.Exponential(half_light_radius=hlr, flux=fl[b]).shear(shape).shift(dx, dy)
            per_band[b].append(gal)
    return per_band


def _render(components: list[list[object]], fwhms: list[float], size: int, scale: float) -> np.ndarray:
    """Draw per-band lists of GalSim profiles convolved with each band's PSF."""
    import galsim

    out = np.zeros((3, size, size))
    for b in range(3):
        if components[b]:
            prof = galsim.Convolve(galsim.Add(components[b]), _psf(fwhms[b]))
            out[b] = prof.drawImage(nx=size, ny=size, scale=scale).array
    return out


def _check_size(size: int) -> None:
    if size < 16:
        raise SimulationError(f"size must be at least 16 pixels, got {size}")


def simulate_galaxy(
    rng: np.random.Generator, *, size: int = 96, conditions: SurveyConditions = DEFAULT_CONDITIONS
) -> Simulated:
    """A bulge + disk galaxy (optionally ringed or spiral) with field objects, in g, r, z flux.

    Parameters
    ----------
    rng
        Source of randomness (the image is a pure function of its state).
    size
        Side of the stamp in pixels (at ``conditions.pixel_scale``).
    conditions
        Survey noise, PSF and pixel scale.
    """
    import galsim

    _check_size(size)
    scale = conditions.pixel_scale
    fwhms = _draw_psfs(rng, conditions)
    r_mag = rng.uniform(14.0, 18.0)
    total = mag_to_nmgy(r_mag)
    bt = float(rng.beta(1.2, 2.0))
    disk_hlr = rng.uniform(1.0, 0.22 * size * scale)
    bulge_hlr = disk_hlr * rng.uniform(0.15, 0.5)
    disk_q = rng.uniform(0.12, 1.0)
    angle = rng.uniform(0, 180)
    shift = rng.uniform(-1.0, 1.0, size=2) * scale
    # colours measured on the DR9 cutouts in data/: red cores, bluer disks
    bulge_col = (rng.normal(1.0, 0.1), rng.normal(0.65, 0.08))
    disk_col = (rng.normal(0.6, 0.12), rng.normal(0.42, 0.08))
    # rings and arms only where they can be seen: not edge-on, not tiny, not bulge-dominated
    visible = bt < 0.7 and disk_q > 0.35 and disk_hlr > 1.5
    feature = rng.choice(["none", "ring", "spiral"], p=[0.4, 0.3, 0.3]) if visible else "none"
    feature_frac = rng.uniform(0.25, 0.5) if feature != "none" else 0.0

    bulge_f = _band_fluxes(total * bt, *bulge_col)
    disk_f = _band_fluxes(total * (1 - bt) * (1 - feature_frac), *disk_col)
    bulge_shape = galsim.Shear(q=rng.uniform(0.6, 1.0), beta=(angle + rng.normal(0, 10)) * galsim.degrees)
    disk_shape = galsim.Shear(q=disk_q, beta=angle * galsim.degrees)
    comps = _field(rng, size, conditions, fwhms)
    for b in range(3):
        comps[b].append(
            galsim.DeVaucouleurs(half_light_radius=bulge_hlr, flux=bulge_f[b])
            .shear(bulge_shape)
            .shift(*shift)
        )
        comps[b].append(
            galsim.Exponential(half_light_radius=disk_hlr, flux=disk_f[b]).shear(disk_shape).shift(*shift)
        )
    img = _render(comps, fwhms, size, scale)

    if feature != "none":
        # rings and arms are drawn on the pixel grid in the disk's frame, then PSF-convolved
        xx, yy = _grid(size, scale)
        phi = math.radians(angle)
        u = (xx - shift[0]) * math.cos(phi) + (yy - shift[1]) * math.sin(phi)
        v = (-(xx - shift[0]) * math.sin(phi) + (yy - shift[1]) * math.cos(phi)) / disk_q
        r = np.hypot(u, v)
        if feature == "ring":
            radius = disk_hlr * rng.uniform(1.0, 2.2)
            width = radius * rng.uniform(0.05, 0.15)
            prof = np.exp(-0.5 * ((r - radius) / width) ** 2)
        else:
            pitch = math.radians(rng.uniform(12, 35))
            theta = np.arctan2(v, u)
            arms = 0.5 * (1 + np.cos(2 * (theta - np.log(r + 1e-3) / math.tan(pitch)) + rng.uniform(0, 6.3)))
            h = disk_hlr / 1.68
            prof = np.exp(-r / h) * arms**3 * (1 - np.exp(-((r / (0.5 * h)) ** 2)))
        prof = prof / max(prof.sum(), 1e-12)
        feat_f = _band_fluxes(total * (1 - bt) * feature_frac, rng.normal(0.45, 0.12), rng.normal(0.3, 0.1))
        for b in range(3):
            img[b] += _convolve(prof * feat_f[b], fwhms[b], scale)

    noisy, _ = _add_noise(rng, img, conditions)
    params = {
        "r_mag": r_mag,
        "bulge_to_total": bt,
        "disk_hlr_arcsec": disk_hlr,
        "disk_q": disk_q,
        "ring": float(feature == "ring"),
        "spiral": float(feature == "spiral"),
    }
    return Simulated(noisy.astype(np.float32), None, "galaxy", params)


def _lensed_source(
    rng: np.random.Generator, size: int, scale: float, theta_e: float, light_angle: float
) -> tuple[np.ndarray, dict[str, float]]:
    """Unconvolved lensed-source surface brightness on the pixel grid (sums to 1)."""
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel

    lens = _lens_model(LensModel)
    source = _source_model(LightModel)
    q_mass = rng.uniform(0.55, 1.0)
    phi_mass = math.radians(light_angle + rng.normal(0, 15))
    e_mass = (1 - q_mass) / (1 + q_mass)
    q_src = rng.uniform(0.4, 1.0)
    phi_src = rng.uniform(0, math.pi)
    e_src = (1 - q_src) / (1 + q_src)
    # sources well inside the caustic make rings, further out single arcs (uniform in area)
    beta = theta_e * 0.6 * math.sqrt(rng.uniform(0, 1))
    beta_phi = rng.uniform(0, 2 * math.pi)
    kw_lens = [
        {
            "theta_E": theta_e,
            "e1": e_mass * math.cos(2 * phi_mass),
            "e2": e_mass * math.sin(2 * phi_mass),
            "center_x": 0.0,
            "center_y": 0.0,
        },
        {"gamma1": rng.normal(0, 0.04), "gamma2": rng.normal(0, 0.04)},
    ]
    kw_src = [
        {
            "amp": 1.0,
            "R_sersic": rng.uniform(0.1, 0.6),
            "n_sersic": rng.uniform(0.7, 2.5),
            "e1": e_src * math.cos(2 * phi_src),
            "e2": e_src * math.sin(2 * phi_src),
            "center_x": beta * math.cos(beta_phi),
            "center_y": beta * math.sin(beta_phi),
        },
    ]
    ss = 2
    xx, yy = _grid(size, scale, ss)
    bx, by = lens.ray_shooting(xx.ravel(), yy.ravel(), kw_lens)
    sb = np.asarray(source.surface_brightness(bx, by, kw_src)).reshape(size, ss, size, ss).mean(axis=(1, 3))
    sb = sb / max(float(sb.sum()), 1e-12)
    return sb, {"source_offset_arcsec": beta, "q_mass": q_mass}


@lru_cache(maxsize=1)
def _lens_model(cls):
    return cls(["SIE", "SHEAR"])


@lru_cache(maxsize=1)
def _source_model(cls):
    return cls(["SERSIC_ELLIPSE"])


def simulate_lens(
    rng: np.random.Generator, *, size: int = 96, conditions: SurveyConditions = DEFAULT_CONDITIONS
) -> Simulated:
    """A galaxy-scale strong lens (SIE + shear, Sérsic source) in g, r, z flux, with an arc mask.

    Parameters
    ----------
    rng
        Source of randomness.
    size
        Side of the stamp in pixels.
    conditions
        Survey noise, PSF and pixel scale.

    Returns
    -------
    Simulated
        ``mask`` marks pixels where the PSF-convolved lensed source exceeds 1.5× the r-band sky
        noise (and 5 % of its own peak).
    """
    import galsim

    _check_size(size)
    scale = conditions.pixel_scale
    fwhms = _draw_psfs(rng, conditions)
    theta_e = rng.uniform(1.0, min(3.2, 0.3 * size * scale))
    angle = rng.uniform(0, 180)
    lens_mag = rng.uniform(17.0, 20.0)
    lens_f = _band_fluxes(mag_to_nmgy(lens_mag), rng.uniform(1.1, 1.8), rng.uniform(0.7, 1.1))
    lens_shape = galsim.Shear(q=rng.uniform(0.6, 1.0), beta=angle * galsim.degrees)
    lens_hlr = rng.uniform(0.6, 2.2)
    comps = _field(rng, size, conditions, fwhms)
    for b in range(3):
        comps[b].append(galsim.DeVaucouleurs(half_light_radius=lens_hlr, flux=lens_f[b]).shear(lens_shape))
    img = _render(comps, fwhms, size, scale)

    sb, extra = _lensed_source(rng, size, scale, theta_e, angle)
    arc_mag = rng.uniform(18.5, 21.5)
    src_f = _band_fluxes(mag_to_nmgy(arc_mag), rng.uniform(-0.1, 0.5), rng.uniform(-0.1, 0.4))
    arcs = np.stack([_convolve(sb * src_f[b], fwhms[b], scale) for b in range(3)])
    noisy, sigma = _add_noise(rng, img + arcs, conditions)
    mask = (arcs[1] > 1.5 * sigma[1]) & (arcs[1] > 0.05 * arcs[1].max())
    params = {"theta_e_arcsec": theta_e, "lens_r_mag": lens_mag, "arc_r_mag": arc_mag, **extra}
    return Simulated(noisy.astype(np.float32), mask, "lens", params)


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a square mask the way ``to_model_input`` resizes pixels (bilinear, antialiased)."""
    if mask.shape == (size, size):
        return mask
    import torch

    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    t = torch.nn.functional.interpolate(
        t, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return (t[0, 0] >= 0.5).numpy()


def simulate_batch(
    n: int,
    *,
    rng: np.random.Generator,
    size: int = 96,
    lens_fraction: float = 0.3,
    zoom: tuple[float, float] = (1.0, 1.0),
    conditions: SurveyConditions = DEFAULT_CONDITIONS,
) -> SimBatch:
    """Simulate ``n`` galaxies and lenses and preprocess them like survey data.

    Parameters
    ----------
    n
        Number of images.
    rng
        Source of randomness; the batch is a pure function of its state.
    size
        Side of the model input.
    lens_fraction
        Probability that an image is a lens.
    zoom
        Range of the rendered stamp side relative to ``size``: a stamp of ``size*zoom`` pixels at
        the survey pixel scale is resized to ``size`` (so fields of view vary like cutouts of
        galaxies of different sizes).
    conditions
        Survey noise, PSF and pixel scale.

    Returns
    -------
    SimBatch
        Model inputs from :func:`encoder.data.to_model_input` (bands g, r, z), arc masks, lens
        flags and truth labels.
    """
    from encoder.data import to_model_input

    if n < 0 or not 0.0 <= lens_fraction <= 1.0:
        raise SimulationError("n must be >= 0 and lens_fraction within [0, 1]")
    if not 0 < zoom[0] <= zoom[1]:
        raise SimulationError(f"zoom range {zoom} is not increasing and positive")
    images = np.empty((n, 3, size, size), np.float32)
    masks = np.zeros((n, size, size), bool)
    is_lens = np.zeros(n, bool)
    labels = np.zeros((n, len(SIM_LABELS)), np.float32)
    for i in range(n):
        stamp = max(16, round(size * rng.uniform(*zoom)))
        is_lens[i] = rng.uniform() < lens_fraction
        sim = (simulate_lens if is_lens[i] else simulate_galaxy)(rng, size=stamp, conditions=conditions)
        images[i] = to_model_input(sim.flux, bands=BANDS, size=size)
        labels[i] = [float(is_lens[i]), sim.params.get("ring", 0.0), sim.params.get("spiral", 0.0)]
        if sim.mask is not None:
            masks[i] = _resize_mask(sim.mask, size)
    return SimBatch(images, masks, is_lens, labels)


# --------------------------------------------------------------------------- pool cache
#: range of model-input values the pool cache stores in 8 bits; one step is 0.0078, a rounding
#: error of std 0.0023, against the simulated sky noise of 0.025-0.04 in the same units
CACHE_RANGE = (-0.25, 1.75)


def save_pool(path: Path, batch: SimBatch, *, meta: dict[str, Any]) -> None:
    """Write a simulated pool as a compressed ``.npz`` that :func:`load_pool` reads back.

    Images are quantised to 8 bits over :data:`CACHE_RANGE` (values outside are clipped), which
    makes a pool about 4× smaller than float16 and small enough to ship to a GPU node with its
    training data; masks and labels are stored exactly. ``meta`` (the generation parameters) is
    stored beside them so a cache made with other parameters is never mistaken for this one.
    """
    lo, hi = CACHE_RANGE
    q = np.round((batch.images - lo) / (hi - lo) * 255).clip(0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(
        tmp,
        images=q,
        masks=np.packbits(batch.masks, axis=-1),
        is_lens=batch.is_lens,
        labels=batch.labels,
        meta=np.array(json.dumps(meta, sort_keys=True)),
    )
    os.replace(tmp, path)


def load_pool(path: Path, *, meta: dict[str, Any]) -> SimBatch | None:
    """The pool cached at ``path`` if it was made with ``meta``; None if absent or made otherwise."""
    if not path.is_file():
        return None
    with np.load(path) as f:
        if json.loads(str(f["meta"])) != json.loads(json.dumps(meta, sort_keys=True)):
            return None
        lo, hi = CACHE_RANGE
        images = f["images"].astype(np.float32) * np.float32((hi - lo) / 255) + np.float32(lo)
        size = images.shape[-1]
        masks = np.unpackbits(f["masks"], axis=-1, count=size).astype(bool)
        return SimBatch(images, masks, f["is_lens"], f["labels"])


def cached_batch(n: int, *, cache: Path | None, meta: dict[str, Any], **kwargs: Any) -> SimBatch:
    """:func:`simulate_batch` through the pool cache at ``cache`` (None: no cache).

    Parameters
    ----------
    n
        Number of images.
    cache
        ``.npz`` file of the pool; read when its ``meta`` matches, else (re)written.
    meta
        Everything the pool is a function of besides ``n`` (seed and stream of the generator,
        size, lens fraction, zoom): the cache key.
    **kwargs
        Passed to :func:`simulate_batch`.
    """
    key = {**meta, "n": n}
    if cache is not None and (hit := load_pool(cache, meta=key)) is not None:
        return hit
    batch = simulate_batch(n, **kwargs)
    if cache is not None:
        save_pool(cache, batch, meta=key)
    return batch
