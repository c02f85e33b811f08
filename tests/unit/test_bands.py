"""The band contract: ingest accepts exactly what the encoder can show the model, in the right channels."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from test_ingest_validate import _record as ingest_record

from encoder.data import UnknownBandError, read_stored_tile, to_model_input
from galsift.bands import (
    ACCEPTED_BAND_SETS,
    BAND_SCALES,
    BAND_WAVELENGTH_NM,
    NATIVE_CHANNELS,
    BandError,
    kind_of_dtype,
    resolve_bands,
)
from galsift.objectstore import ObjectStore
from galsift.stage import Rejected
from ingest.validate import validate_tile


def _flux(planes: int = 3, seed: int = 0) -> np.ndarray:
    # positive, band-dependent flux so every ratio is defined and every plane differs
    rng = np.random.default_rng(seed)
    return rng.uniform(0.05, 1.0, size=(planes, 16, 16)).astype(np.float32)


def _record(pixels: np.ndarray, bands: list[str]) -> dict[str, Any]:
    # the ingest tests' valid record, with these pixels and band names
    return ingest_record(pixels, bands=bands)


def _rejected(pixels: np.ndarray, bands: list[str]) -> Rejected:
    with pytest.raises(Rejected) as err:
        validate_tile(_record(pixels, bands))
    return err.value


# -- the table ------------------------------------------------------------------------------------
def test_table_maps_flux_bands_red_to_blue_with_scales() -> None:
    assert ACCEPTED_BAND_SETS[0].channels == NATIVE_CHANNELS == ("z", "r", "g")
    for band_set in ACCEPTED_BAND_SETS:
        assert len(band_set.channels) == 3
        if band_set.kind == "flux":
            waves = [BAND_WAVELENGTH_NM[b] for b in band_set.channels]
            assert waves == sorted(waves, reverse=True), band_set
            assert all(b in BAND_SCALES for b in band_set.channels)
    assert [s.label for s in ACCEPTED_BAND_SETS] == ["g,r,z", "g,r,i", "R,G,B"]


def test_galsift_bands_imports_no_stage_package() -> None:
    code = (
        "import sys, galsift.bands; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'ingest', 'encoder', 'db'}); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("bands", "kind", "name", "planes"),
    [
        (["g", "r", "z"], "flux", "grz", (2, 1, 0)),
        (["z", "g", "r"], "flux", "grz", (0, 2, 1)),  # picked by name, any plane order
        ([" G", "R ", "Z"], "flux", "grz", (2, 1, 0)),  # case and blanks do not matter
        (["g", "r", "i"], "flux", "gri", (2, 1, 0)),
        (["i", "r", "g"], "flux", "gri", (0, 1, 2)),
        (["g", "r", "i", "z"], "flux", "grz", (3, 1, 0)),  # g,r,z preferred when both are there
        (["u", "g", "r", "i", "z", "y"], "flux", "grz", (4, 2, 1)),
        (["g", "r", "i", "y"], "flux", "gri", (2, 1, 0)),
        (["R", "G", "B"], "colour", "rgb", (0, 1, 2)),
        (["B", "G", "R"], "colour", "rgb", (2, 1, 0)),
        (["r", "g", "b", "alpha"], "colour", "rgb", (0, 1, 2)),
    ],
)
def test_accepted_sets_resolve(bands: list[str], kind: Any, name: str, planes: tuple[int, ...]) -> None:
    mapping = resolve_bands(bands, kind=kind)
    assert mapping.band_set.name == name
    assert mapping.planes == planes


@pytest.mark.parametrize(
    ("bands", "kind", "match"),
    [
        (["r"], "flux", "no accepted flux band set"),
        (["g", "r"], "flux", "no accepted flux band set"),
        (["g", "r", "y"], "flux", "no accepted flux band set"),
        (["r", "i", "z"], "flux", "no accepted flux band set"),  # would put r in the blue channel
        (["NUV", "FUV", "W1"], "flux", "no accepted flux band set"),
        (["g", "G", "z"], "flux", "repeat"),
        (["g", "", "z"], "flux", "non-empty"),
        (["R", "G", "B"], "flux", "need uint8 pixels"),
        (["g", "r", "z"], "colour", "need float pixels"),
    ],
)
def test_other_sets_are_refused_with_the_accepted_list(bands: list[str], kind: Any, match: str) -> None:
    with pytest.raises(BandError, match=match) as err:
        resolve_bands(bands, kind=kind)
    assert "accepted: g,r,z float flux" in str(err.value) and "R,G,B uint8" in str(err.value)


def test_kind_of_dtype() -> None:
    assert kind_of_dtype("uint8") == "colour"
    assert kind_of_dtype(np.float32) == "flux" and kind_of_dtype(">f4") == "flux"
    with pytest.raises(BandError):
        kind_of_dtype("int16")


# -- ingest ---------------------------------------------------------------------------------------
def test_ingest_accepts_the_contract() -> None:
    validate_tile(_record(_flux(), ["g", "r", "z"]))
    validate_tile(_record(_flux(), ["g", "r", "i"]))
    validate_tile(_record(_flux(4), ["g", "r", "i", "z"]))
    rgb = np.random.default_rng(1).integers(0, 256, size=(3, 16, 16), dtype=np.uint8)
    validate_tile(_record(rgb, ["R", "G", "B"]))


@pytest.mark.parametrize(
    ("planes", "bands", "dtype"),
    [
        (1, ["r"], "float32"),  # one band: used to pass ingest and fail in the encoder
        (1, ["r"], "uint8"),
        (2, ["g", "r"], "float32"),
        (3, ["g", "r", "y"], "float32"),
        (3, ["x1", "x2", "x3"], "float32"),
        (4, ["u", "r", "y", "w1"], "float32"),
        (3, ["R", "G", "B"], "float32"),  # a composite must be uint8
        (3, ["g", "r", "z"], "uint8"),  # flux must be float
    ],
)
def test_ingest_refuses_the_rest_with_reason_bands(planes: int, bands: list[str], dtype: str) -> None:
    pixels = (_flux(planes) * 200).astype(dtype)
    err = _rejected(pixels, bands)
    assert err.reason == "bands"
    assert "accepted: g,r,z float flux" in err.detail


def test_ingest_and_encoder_agree() -> None:
    """Every band list and pixel type ingest accepts, the encoder turns into model input, and back."""
    candidates = [
        ["g", "r", "z"],
        ["g", "r", "i"],
        ["R", "G", "B"],
        ["r"],
        ["g", "r"],
        ["r", "i", "z"],
        ["g", "r", "i", "z"],
        ["g", "r", "y"],
        ["u", "g", "r"],
    ]
    for bands in candidates:
        for dtype in ("float32", "uint8"):
            pixels = (_flux(len(bands)) * 200).astype(dtype)
            try:
                validate_tile(_record(pixels, bands))
                ingest_ok = True
            except Rejected as exc:
                assert exc.reason == "bands"
                ingest_ok = False
            try:
                to_model_input(pixels, bands=bands, size=16)
                encoder_ok = True
            except UnknownBandError:
                encoder_ok = False
            assert ingest_ok == encoder_ok, (bands, dtype)


# -- the encoder's stretch ------------------------------------------------------------------------
def test_stretch_uses_each_bands_scale_in_red_first_order() -> None:
    flux = _flux()
    grz = to_model_input(flux, bands=("g", "r", "z"), size=16)
    gri = to_model_input(flux, bands=("g", "r", "i"), size=16)
    assert not np.allclose(grz, gri)
    # channel ratios are the scaled flux ratios (the stretch multiplies all channels alike):
    # channel 0 is the reddest band with its own scale, channel 2 is g
    np.testing.assert_allclose(
        grz[0] / grz[1], (BAND_SCALES["z"] * flux[2]) / (BAND_SCALES["r"] * flux[1]), rtol=1e-5
    )
    np.testing.assert_allclose(
        gri[0] / gri[1], (BAND_SCALES["i"] * flux[2]) / (BAND_SCALES["r"] * flux[1]), rtol=1e-5
    )
    np.testing.assert_allclose(
        gri[2] / gri[1], (BAND_SCALES["g"] * flux[0]) / (BAND_SCALES["r"] * flux[1]), rtol=1e-5
    )
    # planes are picked by name: the order they are stored in does not matter
    np.testing.assert_array_equal(to_model_input(flux[[2, 0, 1]], bands=("i", "g", "r"), size=16), gri)
    # extra bands are ignored, the preferred set is shown
    griz = np.concatenate([flux[:2], _flux(1, seed=9), flux[2:]])
    np.testing.assert_array_equal(to_model_input(griz, bands=("g", "r", "i", "z"), size=16), grz)
    # no bands named: g,r,z as before
    np.testing.assert_array_equal(to_model_input(flux, size=16), grz)


def test_colour_composites_are_shown_as_stored() -> None:
    rgb = np.random.default_rng(2).integers(0, 256, size=(3, 16, 16), dtype=np.uint8)
    as_stored = rgb.astype(np.float32) / 255
    np.testing.assert_array_equal(to_model_input(rgb, size=16), as_stored)
    np.testing.assert_array_equal(to_model_input(rgb, bands=("R", "G", "B"), size=16), as_stored)
    np.testing.assert_array_equal(to_model_input(rgb[::-1], bands=("B", "G", "R"), size=16), as_stored)
    with pytest.raises(UnknownBandError):
        to_model_input(rgb, bands=("g", "r", "z"), size=16)


def test_read_stored_tile_uses_the_tile_bands(tmp_path: Any) -> None:
    store = ObjectStore(tmp_path.as_uri())
    flux = _flux()
    uri, checksum = store.put_array("tiles/t/x.npy", flux)
    default = read_stored_tile(uri, checksum=checksum, size=16)
    grz = read_stored_tile(uri, checksum=checksum, bands=["g", "r", "z"], size=16)
    gri = read_stored_tile(uri, checksum=checksum, bands=["g", "r", "i"], size=16)
    np.testing.assert_array_equal(default, grz)
    assert not np.allclose(grz, gri)
    one_uri, one_sum = store.put_array("tiles/t/one.npy", flux[:1])
    with pytest.raises(UnknownBandError):
        read_stored_tile(one_uri, checksum=one_sum, bands=["r"], size=16)
