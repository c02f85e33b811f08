"""encoder.data: the one preprocessing (colour and flux), folder reading, stored tiles, dataset."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from encoder.data import (
    DataError,
    ImageDataset,
    InputShapeError,
    LabelsError,
    NonFiniteInputError,
    UnknownBandError,
    load_pixels,
    read_folder,
    read_stored_tile,
    to_model_input,
)
from galsift.objectstore import ObjectStore


@pytest.fixture(scope="module")
def dr9_fits(repo_data: Path) -> Path:
    return sorted((repo_data / "legacy_dr9_fits").glob("*.fits"))[0]


@pytest.fixture(scope="module")
def lens_rows(repo_data: Path) -> list[dict[str, str]]:
    with (repo_data / "cfhtls_lens_candidates" / "labels.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_fits_becomes_finite_float_model_input(dr9_fits: Path) -> None:
    flux, bands = load_pixels(dr9_fits)
    assert bands == ("g", "r", "z")
    assert flux.dtype == np.float32 and flux.dtype.isnative and flux.shape == (3, 256, 256)
    for size in (128, 96):
        x = to_model_input(flux, bands=bands, size=size)
        assert x.shape == (3, size, size) and x.dtype == np.float32
        assert np.isfinite(x).all()
    # not normalised per image: a galaxy core is far above the sky, the sky stays near zero
    x = to_model_input(flux, bands=bands)
    assert 0.3 < float(x.max()) < 10.0
    assert abs(float(np.median(x))) < 0.1


def test_brighter_copy_stays_brighter_and_keeps_its_colour(dr9_fits: Path) -> None:
    flux, bands = load_pixels(dr9_fits)
    x1 = to_model_input(flux, bands=bands)
    x3 = to_model_input(3.0 * flux, bands=bands)
    lit = x1 > 0
    assert lit.mean() > 0.3
    assert (x3[lit] > x1[lit]).all()
    assert x3.sum() > x1.sum()
    # colour = ratio between bands, per pixel, unchanged by a global flux scaling
    ok = (np.abs(x1[1]) > 1e-2) & (np.abs(x3[1]) > 1e-2)
    assert ok.sum() > 100
    for band in (0, 2):
        np.testing.assert_allclose(x3[band][ok] / x3[1][ok], x1[band][ok] / x1[1][ok], rtol=1e-4, atol=1e-6)


def test_flux_bands_come_out_reddest_first() -> None:
    flux = np.zeros((3, 64, 64), np.float32)
    flux[2, 24:40, 24:40] = 1.0  # z only
    x = to_model_input(flux, bands=("g", "r", "z"), size=32)
    assert x[0].max() > 0.1
    assert np.abs(x[1:]).max() == 0.0
    # the same fixed stretch regardless of the rest of the image: no per-image normalisation
    flux2 = flux.copy()
    flux2[2, 0:4, 0:4] = 50.0  # a bright star in a corner
    x2 = to_model_input(flux2, bands=("g", "r", "z"), size=32)
    np.testing.assert_allclose(x2[0, 14:18, 14:18], x[0, 14:18, 14:18], rtol=1e-6)


def test_jpeg_becomes_model_input(repo_data: Path, lens_rows: list[dict[str, str]]) -> None:
    rgb, bands = load_pixels(repo_data / "cfhtls_lens_candidates" / lens_rows[0]["file"])
    assert bands is None and rgb.dtype == np.uint8 and rgb.shape == (3, 256, 256)
    x = to_model_input(rgb)
    assert x.shape == (3, 128, 128) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    # /255 and an averaging resize: the mean brightness of each channel is kept
    np.testing.assert_allclose(x.mean(axis=(1, 2)), rgb.mean(axis=(1, 2)) / 255.0, atol=2e-3)
    # an already-sized image is only scaled
    np.testing.assert_array_equal(to_model_input(rgb, size=256), rgb.astype(np.float32) / 255.0)


def test_non_square_input_is_centre_cropped() -> None:
    img = np.zeros((3, 100, 200), np.uint8)
    img[:, :, 50:150] = 255  # the central square is white, the sides black
    x = to_model_input(img, size=50)
    assert x.shape == (3, 50, 50)
    assert x[:, :, 2:-2].min() > 0.99


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_flux_is_refused(dr9_fits: Path, bad: float) -> None:
    flux, bands = load_pixels(dr9_fits)
    flux[1, 10, 20] = bad
    with pytest.raises(NonFiniteInputError, match="NaN or infinite"):
        to_model_input(flux, bands=bands)
    assert issubclass(NonFiniteInputError, DataError) and issubclass(DataError, ValueError)


def test_bad_shapes_dtypes_and_bands_are_refused() -> None:
    with pytest.raises(InputShapeError):
        to_model_input(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(InputShapeError):
        to_model_input(np.zeros((4, 64, 64), np.float32))
    with pytest.raises(InputShapeError):
        to_model_input(np.zeros((3, 64, 64), np.int32))
    with pytest.raises(UnknownBandError):
        to_model_input(np.zeros((3, 8, 8), np.float32), bands=("g", "r", "y"))
    with pytest.raises(UnknownBandError):
        to_model_input(np.zeros((3, 8, 8), np.float32), bands=("g", "r"))


def _make_folder(tmp: Path, src: Path, rows: list[dict[str, str]], dr9_fits: Path) -> Path:
    """A small labels.csv folder: 6 real JPEGs (one with an empty label) and one real FITS."""
    folder = tmp / "set"
    (folder / "images").mkdir(parents=True)
    out = []
    fractions = ["0.9", "0.2", "", "0.5", "0.49", "0.7"]
    for row, frac in zip(rows[:3] + rows[-3:], fractions, strict=True):
        shutil.copy(src / row["file"], folder / row["file"])
        out.append({"file": row["file"], "frac": frac, "kind": "jpeg"})
    shutil.copy(dr9_fits, folder / "images" / dr9_fits.name)
    out.append({"file": f"images/{dr9_fits.name}", "frac": "0.6", "kind": "fits"})
    with (folder / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "frac", "kind"])
        writer.writeheader()
        writer.writerows(out)
    return folder


def test_read_folder_skips_empty_labels_and_binarises(
    tmp_path: Path, repo_data: Path, lens_rows: list[dict[str, str]], dr9_fits: Path
) -> None:
    folder = _make_folder(tmp_path, repo_data / "cfhtls_lens_candidates", lens_rows, dr9_fits)
    s = read_folder(folder, label="frac", threshold=0.5, size=64)
    assert len(s) == 6 and s.images.shape == (6, 3, 64, 64) and s.images.dtype == np.float32
    assert s.labels is not None and s.labels.tolist() == [1, 0, 1, 0, 1, 1]
    assert "" not in [r["frac"] for r in s.table]
    assert s.files[-1].endswith(".fits") and np.isfinite(s.images).all()
    # the FITS row went through the flux stretch, the JPEG rows through /255
    flux, bands = load_pixels(folder / s.files[-1])
    np.testing.assert_array_equal(s.images[-1], to_model_input(flux, bands=bands, size=64))
    raw = read_folder(folder, label="frac", size=64)
    assert raw.labels is not None and raw.labels.dtype == np.float64
    assert read_folder(folder, size=64, limit=2).labels is None
    assert len(read_folder(folder, size=64)) == 7
    with pytest.raises(LabelsError, match="numeric"):
        read_folder(folder, label="kind", threshold=0.5, size=64)
    with pytest.raises(LabelsError, match="no label column"):
        read_folder(folder, label="nope", size=64)


def test_read_folder_cache_follows_file_changes(
    tmp_path: Path, repo_data: Path, lens_rows: list[dict[str, str]], dr9_fits: Path
) -> None:
    folder = _make_folder(tmp_path, repo_data / "cfhtls_lens_candidates", lens_rows, dr9_fits)
    cache = tmp_path / "cache"
    first = read_folder(folder, label="frac", size=32, cache_dir=cache)
    assert len(list(cache.glob("*.npy"))) == 6
    again = read_folder(folder, label="frac", size=32, cache_dir=cache)
    np.testing.assert_array_equal(first.images, again.images)
    # replace the first image by another one: a new modification time, a new entry
    target = folder / first.files[0]
    shutil.copy(folder / first.files[1], target)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = read_folder(folder, label="frac", size=32, cache_dir=cache)
    np.testing.assert_array_equal(changed.images[0], first.images[1])


def test_read_stored_tile_verifies_checksum(tmp_path: Path, dr9_fits: Path) -> None:
    flux, bands = load_pixels(dr9_fits)
    store = ObjectStore((tmp_path / "objects").as_uri())
    uri, checksum = store.put_array("dr9/tile.npy", flux)
    x = read_stored_tile(uri, checksum=checksum, bands=bands, size=96)
    np.testing.assert_array_equal(x, to_model_input(flux, bands=bands, size=96))
    with pytest.raises(OSError, match="checksum"):
        read_stored_tile(uri, checksum="0" * 64, size=96)


def test_image_dataset_returns_float_tensors() -> None:
    images = np.random.default_rng(0).random((4, 3, 16, 16)).astype(np.float32)
    ds = ImageDataset(images, np.array([0, 1, 1, 0]), transform=lambda t: torch.flip(t, dims=(2,)))
    x, y = ds[1]
    assert len(ds) == 4 and x.dtype == torch.float32 and y.dtype == torch.float32 and float(y) == 1.0
    torch.testing.assert_close(x, torch.flip(torch.from_numpy(images[1]), dims=(2,)))
    unlabelled = ImageDataset(images)
    assert isinstance(unlabelled[0], torch.Tensor)
    with pytest.raises(DataError):
        ImageDataset(images, np.array([0, 1]))
