"""Validation of decoded tiles: each way a tile can be bad gets its own reason."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from galsift import messages
from galsift.objectstore import ObjectStore
from galsift.settings import Settings
from galsift.stage import Envelope, Rejected
from ingest.service import IngestStage, healpix_index
from ingest.validate import MAX_BANDS, validate_tile


def _record(array: np.ndarray | None = None, /, **over: Any) -> dict[str, Any]:
    pixels = array
    if pixels is None:
        pixels = np.random.default_rng(3).normal(size=(3, 32, 32)).astype(np.float32)
    record: dict[str, Any] = {
        "survey": "legacy_dr9_fits",
        "external_id": "cutout_1_2",
        "ra": 10.5,
        "dec": -1.25,
        "bands": ["g", "r", "z"][: pixels.shape[0]]
        if pixels.shape[0] <= 3
        else [f"b{i}" for i in range(pixels.shape[0])],
        "pixel_scale": 0.262,
        "obs_time": None,
        "shape": list(pixels.shape),
        "dtype": str(pixels.dtype),
        "compression": "zlib",
        "pixels": messages.pack_pixels(pixels),
        "pixels_uri": None,
        "header": None,
        "meta": {},
    }
    record.update(over)
    return record


def _reason(record: dict[str, Any]) -> str:
    with pytest.raises(Rejected) as err:
        validate_tile(record)
    return err.value.reason


def test_good_tiles_pass_with_exact_pixels() -> None:
    pixels = np.random.default_rng(5).normal(size=(3, 40, 48)).astype(np.float32)
    out = validate_tile(_record(pixels))
    assert out.dtype == np.float32 and out.tobytes() == pixels.tobytes()
    rgb = np.random.default_rng(6).integers(0, 256, size=(3, 64, 64), dtype=np.uint8)
    np.testing.assert_array_equal(validate_tile(_record(rgb, bands=["R", "G", "B"], ra=None, dec=None)), rgb)
    # edge values of the ranges are fine
    validate_tile(_record(ra=0.0, dec=-90.0))
    validate_tile(_record(ra=359.999999, dec=90.0))


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"shape": [32, 32]}, "shape"),
        ({"shape": [3, 32, 32, 1]}, "shape"),
        ({"shape": [3, 32, 30]}, "shape"),  # bytes do not match the shape
        ({"bands": ["g", "r"]}, "bands"),  # wrong band count for 3 planes
        ({"bands": []}, "bands"),
        ({"bands": ["g", "g", "z"]}, "bands"),
        ({"dtype": "float64"}, "dtype"),
        ({"pixel_scale": 0.0}, "pixel_scale"),
        ({"pixel_scale": float("nan")}, "pixel_scale"),
        ({"ra": 360.0}, "coordinates"),
        ({"ra": -0.5}, "coordinates"),
        ({"dec": 90.5}, "coordinates"),
        ({"dec": float("nan")}, "coordinates"),
        ({"ra": None}, "coordinates"),  # one without the other
        ({"survey": "Bad/Survey"}, "identity"),
        ({"survey": ""}, "identity"),
        ({"external_id": ""}, "identity"),
        ({"external_id": "x\n"}, "identity"),
        ({"pixels": None}, "payload"),  # neither inline nor URI
        ({"pixels": b"\x78\x9c garbage"}, "payload"),  # not zlib
        ({"pixels_uri": "file:///nowhere/x.npy"}, "payload"),  # both inline and URI
    ],
)
def test_each_bad_case_has_its_reason(over: dict[str, Any], reason: str) -> None:
    assert _reason(_record(**over)) == reason


def test_sizes() -> None:
    small = np.zeros((3, 8, 32), np.float32)
    assert _reason(_record(small)) == "size"
    big = np.zeros((1, 2049, 16), np.uint8)
    assert _reason(_record(big, bands=["r"])) == "size"
    many = np.zeros((MAX_BANDS + 1, 16, 16), np.float32)
    assert _reason(_record(many)) == "bands"
    # the most bands allowed pass when an accepted set (here g,r,z) is among them
    ok = np.zeros((MAX_BANDS, 16, 16), np.float32)
    bands = ["g", "r", "z"] + [f"b{i}" for i in range(3, MAX_BANDS)]
    assert validate_tile(_record(ok, bands=bands)).shape == (MAX_BANDS, 16, 16)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_pixels(bad: float) -> None:
    pixels = np.ones((3, 32, 32), np.float32)
    pixels[1, 5, 7] = bad
    with pytest.raises(Rejected) as err:
        validate_tile(_record(pixels))
    assert err.value.reason == "nonfinite" and "1 of 3072" in err.value.detail


def test_truncated_pixel_bytes() -> None:
    pixels = np.ones((3, 32, 32), np.float32)
    raw = pixels.tobytes()[:-4]
    assert _reason(_record(pixels, pixels=zlib.compress(raw))) == "shape"
    assert _reason(_record(pixels, pixels=messages.pack_pixels(pixels)[:-8])) == "payload"


def test_pixels_by_uri(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path.as_uri())
    pixels = np.random.default_rng(9).normal(size=(3, 32, 32)).astype(np.float32)
    uri, _ = store.put_array("incoming/x.npy", pixels)
    out = validate_tile(_record(pixels, pixels=None, pixels_uri=uri))
    assert out.tobytes() == pixels.tobytes()
    assert _reason(_record(pixels, pixels=None, pixels_uri=uri, shape=[3, 32, 16])) == "shape"
    uri8, _ = store.put_array("incoming/y.npy", pixels.astype(np.float64))
    assert _reason(_record(pixels, pixels=None, pixels_uri=uri8)) == "dtype"
    assert _reason(_record(pixels, pixels=None, pixels_uri=(tmp_path / "missing.npy").as_uri())) == "payload"
    nan = pixels.copy()
    nan[0, 0, 0] = np.nan
    uri_nan, _ = store.put_array("incoming/z.npy", nan)
    assert _reason(_record(pixels, pixels=None, pixels_uri=uri_nan)) == "nonfinite"


def test_stage_prepare_adds_healpix_and_header(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path)  # type: ignore[call-arg]
    stage = IngestStage(settings, engine=None)  # type: ignore[arg-type]
    record = _record(header="SIMPLE  =                    T", meta={"lens": "1"})
    env = Envelope("tiles.raw", 0, 5, b"k", messages.encode("tile", record), record)
    prepared = stage.prepare(env)
    assert prepared.tile_id == messages.tile_id("legacy_dr9_fits", "cutout_1_2")
    assert prepared.object_key == f"tiles/legacy_dr9_fits/{prepared.tile_id}.npy"
    assert prepared.meta == {"lens": "1", "fits_header": "SIMPLE  =                    T"}
    assert prepared.healpix == healpix_index(10.5, -1.25)
    with pytest.raises(Rejected):
        stage.prepare(Envelope("tiles.raw", 0, 6, b"k", b"", _record(ra=400.0)))


def test_healpix_index_contains_the_position() -> None:
    import astropy.units as u
    from astropy.coordinates import SkyCoord
    from astropy_healpix import HEALPix

    from galsift.constants import HEALPIX_ORDER

    hp = HEALPix(nside=2**HEALPIX_ORDER, order="nested")
    rng = np.random.default_rng(11)
    for ra, dec in zip(rng.uniform(0, 360, 50), np.degrees(np.arcsin(rng.uniform(-1, 1, 50))), strict=True):
        index = healpix_index(float(ra), float(dec))
        assert index is not None and 0 <= index < hp.npix
        lon, lat = hp.healpix_to_lonlat([index])
        centre = SkyCoord(lon[0], lat[0])
        # a nested order-10 pixel is ~3.4 arcmin across: its centre is within one pixel size
        assert centre.separation(SkyCoord(ra * u.deg, dec * u.deg)) < hp.pixel_resolution
    assert healpix_index(None, None) is None
