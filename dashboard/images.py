"""Cutouts for the dashboard: stored tiles as 8-bit RGB with an astronomical stretch.

Two kinds of stored pixels (see :mod:`galsift.bands`):

* **colour composites** (``uint8`` R,G,B, from JPEG/PNG surveys) are shown as stored: they were
  stretched once by whoever made them, and stretching again would only change their look;
* **flux** (float nanomaggies, g,r,z or g,r,i) gets the Lupton et al. (2004) colour-preserving
  arcsinh stretch with the per-band scales of :data:`galsift.bands.BAND_SCALES` and the softening
  of the model's input (:mod:`encoder.data`): ``out_b = x_b * asinh(Q I) / (sqrt(Q) I)`` with
  ``x_b = a_b * flux_b`` and ``I = mean_b x_b``. A scientist sees exactly what the model saw. A
  pixel brighter than 1 in some channel is divided by its brightest channel (Lupton's saturation
  rule, as in :func:`astropy.visualization.make_lupton_rgb`): bright cores keep their colour
  instead of clipping to white. It is written out here rather than taken from astropy, whose
  ``LuptonAsinhStretch`` normalises differently across versions.

Any band set outside the contract falls back to a grey asinh stretch of the first plane
(:mod:`astropy.visualization`: ``AsinhStretch`` between percentiles), so a strange tile still shows
instead of breaking a page.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np

from galsift.bands import BAND_SCALES, BandError, kind_of_dtype, resolve_bands

#: softening of the model's arcsinh stretch (encoder.data.ASINH_Q; repeated here so the dashboard
#: needs no torch import just to draw a picture)
ASINH_Q = 20.0
#: side of the thumbnails the pages show, in pixels
THUMB_SIZE = 128


def to_rgb(pixels: np.ndarray, bands: Sequence[str] | None = None) -> np.ndarray:
    """A stored tile as an ``uint8`` (H, W, 3) image.

    Parameters
    ----------
    pixels
        (C, H, W) ``uint8`` colour composite or float flux; a 2-D array is one grey plane.
    bands
        Band names of the planes (the tile row's ``bands``); None assumes g,r,z for flux and
        R,G,B for colour.

    Returns
    -------
    numpy.ndarray
        ``uint8`` (H, W, 3), red/green/blue.
    """
    arr = np.asarray(pixels)
    if arr.ndim == 2:
        arr = arr[None]
    try:
        kind = kind_of_dtype(arr.dtype)
    except BandError:
        return _grey(arr[0].astype(np.float64))
    names = list(bands) if bands is not None and len(bands) == arr.shape[0] else None
    if names is None and arr.shape[0] == 3:
        names = ["R", "G", "B"] if kind == "colour" else ["g", "r", "z"]
    try:
        if names is None:
            raise BandError("no band names")
        mapping = resolve_bands(names, kind=kind)
    except BandError:
        return _grey(arr[0].astype(np.float64))
    planes = arr[list(mapping.planes)]
    if kind == "colour":
        return np.ascontiguousarray(planes.transpose(1, 2, 0))
    flux = np.nan_to_num(planes.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return lupton_rgb(flux, mapping.channels)


def lupton_rgb(flux: np.ndarray, channels: Sequence[str]) -> np.ndarray:
    """The colour-preserving arcsinh stretch of (3, H, W) flux, red first, as ``uint8`` (H, W, 3).

    ``channels`` names the band of each plane (its scale). See the module docstring.
    """
    x = flux * np.asarray([BAND_SCALES[b] for b in channels], dtype=np.float64)[:, None, None]
    qi = ASINH_Q * x.mean(axis=0)
    small = np.abs(qi) < 1e-4
    # asinh(q)/q -> 1 near 0: the limit avoids 0/0 on empty sky
    gain = np.where(small, 1.0, np.arcsinh(qi) / np.where(small, 1.0, qi)) * math.sqrt(ASINH_Q)
    out = np.clip(x * gain[None], 0.0, None)
    out /= np.maximum(1.0, out.max(axis=0))[None]
    return np.ascontiguousarray((out * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0))


def _grey(plane: np.ndarray) -> np.ndarray:
    """An asinh-stretched grey image of one plane, between its 1st and 99.5th percentiles."""
    from astropy.visualization import AsinhStretch, ImageNormalize, PercentileInterval

    finite = np.nan_to_num(plane, nan=0.0, posinf=0.0, neginf=0.0)
    norm = ImageNormalize(finite, interval=PercentileInterval(99.5), stretch=AsinhStretch())
    grey = (np.clip(np.asarray(norm(finite)), 0.0, 1.0) * 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def thumbnail(rgb: np.ndarray, *, size: int = THUMB_SIZE) -> np.ndarray:
    """``rgb`` resized (antialiased) so its longer side is ``size``; small tiles are enlarged."""
    from PIL import Image

    im = Image.fromarray(rgb)
    scale = size / max(im.size)
    if scale != 1.0:
        im = im.resize(
            (max(1, round(im.width * scale)), max(1, round(im.height * scale))),
            Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST,
        )
    return np.asarray(im)


def png_bytes(rgb: np.ndarray) -> bytes:
    """PNG bytes of an ``uint8`` (H, W, 3) image (what ``st.image`` and downloads take)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def placeholder(text: str = "no pixels", *, size: int = THUMB_SIZE) -> np.ndarray:
    """A dark grey square with ``text``: a tile whose pixels cannot be read still takes its cell."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (40, 40, 48))
    ImageDraw.Draw(im).text((6, size // 2 - 6), text[:20], fill=(200, 200, 200))
    return np.asarray(im)
