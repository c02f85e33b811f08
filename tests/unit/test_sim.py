"""Simulated galaxies and lenses, and the colour-preserving augmentations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoder import augment
from encoder.sim import (
    SimulationError,
    mag_to_nmgy,
    simulate_batch,
    simulate_galaxy,
    simulate_lens,
)


def test_galaxy_is_finite_and_bright_in_the_centre() -> None:
    sim = simulate_galaxy(np.random.default_rng(1), size=64)
    assert sim.flux.shape == (3, 64, 64) and sim.flux.dtype == np.float32
    assert np.isfinite(sim.flux).all()
    assert sim.mask is None and sim.kind == "galaxy"
    centre = sim.flux[:, 28:36, 28:36].mean()
    edge = np.median(sim.flux[:, :8, :])
    assert centre > 10 * abs(edge)


def test_simulations_are_reproducible() -> None:
    a = simulate_lens(np.random.default_rng(7), size=48)
    b = simulate_lens(np.random.default_rng(7), size=48)
    c = simulate_lens(np.random.default_rng(8), size=48)
    assert np.array_equal(a.flux, b.flux)
    assert not np.array_equal(a.flux, c.flux)


def test_lens_has_arcs_and_a_mask_on_them() -> None:
    rng = np.random.default_rng(3)
    sims = [simulate_lens(rng, size=64) for _ in range(6)]
    for sim in sims:
        assert sim.flux.shape == (3, 64, 64) and np.isfinite(sim.flux).all()
        assert sim.mask is not None and sim.mask.shape == (64, 64)
        assert 1.0 <= sim.params["theta_e_arcsec"] <= 3.2
    with_arcs = [s for s in sims if s.mask is not None and s.mask.sum() > 0]
    assert len(with_arcs) >= 4
    for sim in with_arcs:
        assert sim.mask is not None
        # arcs surround the lens: the mask is not concentrated on the central pixel
        ys, xs = np.nonzero(sim.mask)
        radius = np.hypot(ys - 31.5, xs - 31.5)
        assert radius.max() > 2.0


def test_batch_is_model_input_with_masks() -> None:
    batch = simulate_batch(6, rng=np.random.default_rng(0), size=48, lens_fraction=0.5, zoom=(1.0, 1.5))
    assert batch.images.shape == (6, 3, 48, 48) and batch.images.dtype == np.float32
    assert batch.masks.shape == (6, 48, 48) and batch.masks.dtype == bool
    assert np.isfinite(batch.images).all()
    assert not batch.masks[~batch.is_lens].any()
    # stretched flux: sky near 0, galaxy cores of order 1 (like colour composites)
    assert -0.5 < float(np.median(batch.images)) < 0.3
    assert float(batch.images.max()) > 0.3
    with pytest.raises(SimulationError):
        simulate_batch(1, rng=np.random.default_rng(0), lens_fraction=2.0)


def test_magnitudes() -> None:
    assert mag_to_nmgy(22.5) == pytest.approx(1.0)
    assert mag_to_nmgy(17.5) == pytest.approx(100.0)


def _colour_image() -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = torch.exp(-((xx - 12) ** 2 + (yy - 18) ** 2) / 20)
    return torch.stack([blob, 0.5 * blob, 0.25 * blob])[None].repeat(4, 1, 1, 1)


def test_geometric_augmentations_keep_colour_and_flux() -> None:
    x = _colour_image()
    g = torch.Generator().manual_seed(0)
    for out in (augment.dihedral(x, g), augment.shift(x, g, max_px=2), augment.psf_blur(x, g, p=1.0)):
        assert out.shape == x.shape
        ratio = out[:, 1].sum(dim=(1, 2)) / out[:, 0].sum(dim=(1, 2))
        assert torch.allclose(ratio, torch.full((4,), 0.5), atol=1e-4)
    flipped = augment.dihedral(x, g)
    # flips and turns permute pixels: the sorted values are unchanged
    assert torch.allclose(flipped.flatten(1).sort().values, x.flatten(1).sort().values)


def test_blur_spreads_light_and_noise_is_zero_mean() -> None:
    x = _colour_image()
    blurred = augment.gaussian_blur(x, torch.full((4,), 2.0))
    assert float(blurred.max()) < float(x.max())
    assert float(blurred.sum()) == pytest.approx(float(x.sum()), rel=1e-3)
    g = torch.Generator().manual_seed(1)
    noisy = augment.add_noise(torch.zeros(4, 3, 64, 64), g, max_sigma=0.05, p=1.0)
    assert abs(float(noisy.mean())) < 5e-3
    degraded = augment.degrade(x, g)
    assert degraded.shape == x.shape and not torch.equal(degraded, x)


def test_composite_style_clips_to_unit_range() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, 16, 16)
    out = augment.composite_style(x, g, p=1.0)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_rotation_crop_and_flux_scale_keep_colour() -> None:
    x = _colour_image()
    g = torch.Generator().manual_seed(3)
    rotated = augment.random_affine(x, g, crop_scale=(0.7, 1.0), rotate=True)
    assert rotated.shape == x.shape and not torch.allclose(rotated, x)
    assert torch.allclose(rotated[:, 1], 0.5 * rotated[:, 0], atol=1e-5)
    scaled = augment.scale_flux(x, g, factor=(0.5, 2.0))
    ratio = scaled.flatten(1).amax(dim=1) / x.flatten(1).amax(dim=1)
    assert bool(((ratio >= 0.5 - 1e-6) & (ratio <= 2.0 + 1e-6)).all())
    assert torch.allclose(scaled[:, 2], 0.25 * scaled[:, 0], atol=1e-6)
    identity = augment.random_affine(x, g, crop_scale=(1.0, 1.0), rotate=False)
    assert torch.allclose(identity, x, atol=1e-5)


def test_pool_cache_round_trips_within_one_quantisation_step(tmp_path) -> None:
    from encoder.sim import CACHE_RANGE, cached_batch

    kwargs = {"rng": np.random.default_rng(5), "size": 32, "lens_fraction": 0.5}
    meta = {"seed": 5, "size": 32}
    fresh = cached_batch(6, cache=tmp_path / "pool.npz", meta=meta, **kwargs)
    assert (tmp_path / "pool.npz").is_file()
    # a second call reads the file: it does not simulate (a generator in another state would
    # give other images)
    again = cached_batch(6, cache=tmp_path / "pool.npz", meta=meta, rng=np.random.default_rng(99), size=32)
    step = (CACHE_RANGE[1] - CACHE_RANGE[0]) / 255
    inside = (fresh.images > CACHE_RANGE[0]) & (fresh.images < CACHE_RANGE[1])
    assert np.abs(again.images - fresh.images)[inside].max() <= step / 2 + 1e-6
    assert np.array_equal(again.masks, fresh.masks) and fresh.masks.any()
    assert np.array_equal(again.labels, fresh.labels) and np.array_equal(again.is_lens, fresh.is_lens)


def test_pool_cache_made_with_other_options_is_not_used(tmp_path) -> None:
    from encoder.sim import cached_batch, load_pool

    path = tmp_path / "pool.npz"
    cached_batch(3, cache=path, meta={"seed": 1}, rng=np.random.default_rng(1), size=32)
    assert load_pool(path, meta={"seed": 1, "n": 3}) is not None
    assert load_pool(path, meta={"seed": 2, "n": 3}) is None
    other = cached_batch(4, cache=path, meta={"seed": 1}, rng=np.random.default_rng(1), size=32)
    assert len(other.images) == 4 and load_pool(path, meta={"seed": 1, "n": 4}) is not None
