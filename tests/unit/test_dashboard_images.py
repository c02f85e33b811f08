"""Cutouts of the dashboard: the flux stretch is the model's, colour composites are shown as stored."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dashboard import images


def _model_stretch(flux: np.ndarray, bands: tuple[str, str, str]) -> np.ndarray:
    """encoder.data's stretch written out (channels red first); a pixel brighter than 1 in any
    channel is scaled down as a whole (Lupton's saturation rule: the hue survives)."""
    from galsift.bands import BAND_SCALES

    x = flux.astype(np.float64) * np.array([BAND_SCALES[b] for b in bands])[:, None, None]
    i = x.mean(axis=0)
    out = x * np.arcsinh(images.ASINH_Q * i) / (math.sqrt(images.ASINH_Q) * i)
    out = np.clip(out, 0, None)
    return out / np.maximum(1.0, out.max(axis=0))


def test_flux_tile_gets_the_model_stretch_with_z_in_red() -> None:
    rng = np.random.default_rng(0)
    g, r, z = (rng.uniform(0.01, 0.3, (8, 8)) for _ in range(3))
    pixels = np.stack([g, r, z]).astype(np.float32)  # stored in g, r, z plane order
    rgb = images.to_rgb(pixels, ["g", "r", "z"])
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    expected = _model_stretch(np.stack([z, r, g]), ("z", "r", "g")).transpose(1, 2, 0)
    # rounded to 8 bits: half a grey level
    assert np.abs(rgb.astype(float) - expected * 255).max() <= 0.51


def test_band_order_follows_the_names_not_the_planes() -> None:
    rng = np.random.default_rng(1)
    planes = rng.uniform(0.01, 0.3, (3, 6, 6)).astype(np.float32)
    as_grz = images.to_rgb(planes, ["g", "r", "z"])
    as_zrg = images.to_rgb(planes[::-1].copy(), ["z", "r", "g"])
    np.testing.assert_array_equal(as_grz, as_zrg)


def test_colour_composite_is_shown_as_stored() -> None:
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (3, 5, 7), dtype=np.uint8)
    np.testing.assert_array_equal(images.to_rgb(pixels, ["R", "G", "B"]), pixels.transpose(1, 2, 0))
    np.testing.assert_array_equal(images.to_rgb(pixels), pixels.transpose(1, 2, 0))


@pytest.mark.parametrize(
    "pixels,bands",
    [
        (np.full((2, 4, 4), 0.1, np.float32), ["u", "y"]),  # outside the band contract
        (np.full((4, 4), 0.1, np.float32), None),  # one plane
        (np.array([[[np.nan, 1.0], [0.5, np.inf]]] * 3, np.float32), ["g", "r", "z"]),  # non-finite
        (np.ones((3, 4, 4), np.int16), None),  # neither colour nor flux
    ],
)
def test_odd_tiles_still_show(pixels: np.ndarray, bands: list[str] | None) -> None:
    rgb = images.to_rgb(pixels, bands)
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8


def test_thumbnail_and_png() -> None:
    rgb = np.zeros((64, 32, 3), np.uint8)
    thumb = images.thumbnail(rgb, size=128)
    assert thumb.shape == (128, 64, 3)
    assert images.png_bytes(thumb)[:8] == b"\x89PNG\r\n\x1a\n"
    assert images.placeholder("missing").shape == (images.THUMB_SIZE, images.THUMB_SIZE, 3)
