"""Readers on the real survey files: WCS positions, bands, pixel scale, labels, IAU names."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from PIL import Image

from galsift import messages
from ingest.readers import (
    NOMINAL_PIXEL_SCALE,
    ReaderError,
    coordinates_from_filename,
    iau_name,
    iter_sources,
    parse_iau_name,
    read_fits,
    read_image,
    read_tiles,
    survey_name,
)

DR9 = "legacy_dr9_fits"


def _dr9_files(repo_data: Path) -> list[Path]:
    files = sorted((repo_data / DR9).glob("*.fits"))
    assert len(files) == 3
    return files


def test_dr9_centres_from_wcs_match_file_names_and_headers(repo_data: Path) -> None:
    tiles = list(read_tiles([repo_data / DR9]))
    files = _dr9_files(repo_data)
    assert sorted(t.external_id for t in tiles) == sorted(f.name.removesuffix(".fits") for f in files)
    for tile in tiles:
        path = repo_data / DR9 / f"{tile.external_id}.fits"
        # what the file name says ...
        m = re.fullmatch(r"cutout_(-?[\d.]+)_(-?[\d.]+)\.fits", path.name)
        assert m is not None
        named = SkyCoord(float(m[1]) * u.deg, float(m[2]) * u.deg)
        # ... what the header's reference point says ...
        header = fits.getheader(path)
        ref = SkyCoord(header["CRVAL1"] * u.deg, header["CRVAL2"] * u.deg)
        # ... and what the reader computed from the WCS at the image centre
        assert tile.ra is not None and tile.dec is not None
        centre = SkyCoord(tile.ra * u.deg, tile.dec * u.deg)
        assert centre.separation(named) < 1 * u.mas
        assert centre.separation(ref) < 1 * u.mas
        assert 0 <= tile.ra < 360 and -90 <= tile.dec <= 90


def test_dr9_wcs_centre_is_the_centre_pixel_not_just_crval(tmp_path: Path, repo_data: Path) -> None:
    src = _dr9_files(repo_data)[0]
    with fits.open(src) as hdul:
        hdu = hdul[0].copy()
    # move the reference pixel to a corner: the centre must still be found through the WCS
    hdu.header["CRPIX1"], hdu.header["CRPIX2"] = 1.0, 1.0
    moved = tmp_path / "moved.fits"
    hdu.writeto(moved)
    tile = read_fits(moved, survey="t")
    crval = SkyCoord(hdu.header["CRVAL1"] * u.deg, hdu.header["CRVAL2"] * u.deg)
    centre = SkyCoord(tile.ra * u.deg, tile.dec * u.deg)
    # the centre pixel (127.5, 127.5) is 127.5 * sqrt(2) pixels from the corner reference pixel
    expected = 127.5 * np.sqrt(2) * 0.262 * u.arcsec
    assert abs(centre.separation(crval) - expected) < 0.01 * u.arcsec
    # CD1_1 < 0: RA decreases with x; CD2_2 > 0: Dec increases with y
    assert centre.ra < crval.ra
    assert centre.dec > crval.dec


def test_dr9_bands_scale_pixels_and_header(repo_data: Path) -> None:
    for path in _dr9_files(repo_data):
        tile = read_fits(path, survey="legacy_dr9_fits")
        data = fits.getdata(path)
        assert tile.bands == ("g", "r", "z")
        assert tile.pixels.dtype == np.float32 and tile.pixels.shape == (3, 256, 256)
        np.testing.assert_array_equal(tile.pixels, data)
        assert tile.pixel_scale == pytest.approx(0.262, rel=1e-6)
        assert tile.header is not None
        header = fits.Header.fromstring(tile.header, sep="\n")
        assert header["CRVAL1"] == fits.getheader(path)["CRVAL1"]
        assert tile.meta["release"] == "DR9-south"
        assert tile.key == f"legacy_dr9_fits/{tile.external_id}".encode()


def test_fits_bands_default_and_errors(tmp_path: Path) -> None:
    data = np.arange(3 * 32 * 32, dtype=np.float32).reshape(3, 32, 32)
    header = fits.Header()
    header["CTYPE1"], header["CTYPE2"] = "RA---TAN", "DEC--TAN"
    header["CRVAL1"], header["CRVAL2"] = 10.0, -5.0
    header["CRPIX1"], header["CRPIX2"] = 16.5, 16.5
    header["CD1_1"], header["CD2_2"] = -0.5 / 3600, 0.5 / 3600
    fits.PrimaryHDU(data, header).writeto(tmp_path / "plain.fits")
    tile = read_fits(tmp_path / "plain.fits", survey="t")
    assert tile.bands == ("g", "r", "z")  # nothing in the header: the Legacy Surveys order
    assert tile.pixel_scale == pytest.approx(0.5)
    assert (tile.ra, tile.dec) == pytest.approx((10.0, -5.0))

    fits.PrimaryHDU(data[:2], header).writeto(tmp_path / "two.fits")
    with pytest.raises(ReaderError, match="no band names"):
        read_fits(tmp_path / "two.fits", survey="t")
    assert read_fits(tmp_path / "two.fits", survey="t", bands=["i", "y"]).bands == ("i", "y")

    single = header.copy()
    single["FILTER"] = "r"
    fits.PrimaryHDU(data[0], single).writeto(tmp_path / "one.fits")
    one = read_fits(tmp_path / "one.fits", survey="t")
    assert one.bands == ("r",) and one.pixels.shape == (1, 32, 32)

    fits.PrimaryHDU(data).writeto(tmp_path / "nowcs.fits")
    with pytest.raises(ReaderError, match="pixel scale"):
        read_fits(tmp_path / "nowcs.fits", survey="t")

    (tmp_path / "junk.fits").write_bytes(b"not a fits file at all")
    with pytest.raises(ReaderError):
        read_fits(tmp_path / "junk.fits", survey="t")


def test_coordinates_from_filename() -> None:
    assert coordinates_from_filename("cutout_5.346842288970947_-0.3606750667095184.fits") == (
        pytest.approx(5.346842288970947),
        pytest.approx(-0.3606750667095184),
    )
    assert coordinates_from_filename("cutout_400_0.fits") is None
    assert coordinates_from_filename("image.fits") is None


def _cfhtls_rows(repo_data: Path, n: int) -> list[dict[str, str]]:
    with (repo_data / "cfhtls_lens_candidates" / "labels.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))[:n]


def _sexagesimal_name(ra: float, dec: float) -> str:
    """An IAU-style name ``Jhhmmss.ss+ddmmss.s`` written by astropy, independently of ingest.readers."""
    coord = SkyCoord(ra * u.deg, dec * u.deg, frame="icrs")
    ra_s = coord.ra.to_string(unit=u.hourangle, sep="", precision=2, pad=True)
    dec_s = coord.dec.to_string(unit=u.deg, sep="", precision=1, pad=True, alwayssign=True)
    return f"J{ra_s}{dec_s}"


def test_colour_folder_with_ra_dec_columns(repo_data: Path) -> None:
    folder = repo_data / "cfhtls_lens_candidates"
    rows = _cfhtls_rows(repo_data, 5)
    tiles = list(read_tiles([folder], limit=5))
    assert len(tiles) == 5
    for tile, row in zip(tiles, rows, strict=True):
        assert tile.survey == "cfhtls_lens_candidates"
        assert tile.external_id == Path(row["file"]).stem
        assert (tile.ra, tile.dec) == (float(row["ra"]), float(row["dec"]))
        assert tile.pixels.dtype == np.uint8 and tile.pixels.shape == (3, 256, 256)
        with Image.open(folder / row["file"]) as im:
            rgb = np.asarray(im.convert("RGB"))
        np.testing.assert_array_equal(tile.pixels, rgb.transpose(2, 0, 1))
        for column in ("lens", "expert_grade", "zooniverse_id", "z_lens"):
            assert tile.meta[column] == row[column]
        assert tile.bands == ("R", "G", "B")
        # a pixel_scale column is a measurement: taken as given, not flagged as assumed
        assert tile.pixel_scale == float(row["pixel_scale"]) != NOMINAL_PIXEL_SCALE
        assert tile.meta["pixel_scale"] == row["pixel_scale"]


def test_colour_folder_positions_from_iau_names(tmp_path: Path, repo_data: Path) -> None:
    """A table with an ``iauname`` column and neither ra/dec columns nor names in the file names."""
    src = repo_data / "cfhtls_lens_candidates"
    rows = _cfhtls_rows(repo_data, 10)
    folder = tmp_path / "named"
    folder.mkdir()
    with (folder / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["iauname", "lens", "file"])
        writer.writeheader()
        for i, row in enumerate(rows):
            shutil.copy(src / row["file"], folder / f"tile_{i:02d}.jpg")
            name = _sexagesimal_name(float(row["ra"]), float(row["dec"]))
            writer.writerow({"iauname": name, "lens": row["lens"], "file": f"tile_{i:02d}.jpg"})
    tiles = list(read_tiles([folder]))
    assert len(tiles) == 10
    for tile, row in zip(tiles, rows, strict=True):
        name = tile.meta["iauname"]
        # an independent reading of the name through astropy's sexagesimal parser
        ra_s, dec_s = name[1:10], name[10:]
        ref = SkyCoord(
            f"{ra_s[:2]}h{ra_s[2:4]}m{ra_s[4:]}s {dec_s[:3]}d{dec_s[3:5]}m{dec_s[5:]}s", frame="icrs"
        )
        assert tile.ra == pytest.approx(ref.ra.deg, abs=1e-9)
        assert tile.dec == pytest.approx(ref.dec.deg, abs=1e-9)
        # and the name is the catalogue position, to its last digit
        true = SkyCoord(float(row["ra"]) * u.deg, float(row["dec"]) * u.deg)
        assert SkyCoord(tile.ra * u.deg, tile.dec * u.deg).separation(true) < 0.25 * u.arcsec
        assert tile.meta["lens"] == row["lens"] and tile.meta["lens"] in {"0", "1", ""}


def test_colour_folder_without_positions(repo_data: Path) -> None:
    tiles = list(read_tiles([repo_data / "gz_decals_examples"], survey="GZ Examples!", limit=3))
    assert [t.survey for t in tiles] == ["gz_examples"] * 3
    assert all(t.ra is None and t.dec is None for t in tiles)
    assert all("question" in t.meta and "answer" in t.meta for t in tiles)
    # no pixel_scale column: the nominal scale, flagged so nobody takes it for a measurement
    assert all(t.pixel_scale == NOMINAL_PIXEL_SCALE and t.meta["pixel_scale"] == "assumed" for t in tiles)


def test_pool_names_embed_iau_names(tmp_path: Path, repo_data: Path) -> None:
    """A pool folder names its files ``<survey>__<IAU name>``; the position comes from that name."""
    src = repo_data / "cfhtls_lens_candidates"
    row = _cfhtls_rows(repo_data, 1)[0]
    ra, dec = float(row["ra"]), float(row["dec"])
    pool = tmp_path / "lens_pool"
    (pool / "images").mkdir(parents=True)
    file = f"images/cfhtls_lens_candidates__{_sexagesimal_name(ra, dec)}.jpg"
    shutil.copy(src / row["file"], pool / file)
    (pool / "labels.csv").write_text(f"file,lens\n{file},{row['lens']}\n")
    tile = next(read_tiles([pool], limit=1))
    assert tile.external_id.startswith("cfhtls_lens_candidates__J")
    assert tile.ra is not None and tile.dec is not None
    position = SkyCoord(tile.ra * u.deg, tile.dec * u.deg)
    assert position.separation(SkyCoord(ra * u.deg, dec * u.deg)) < 0.25 * u.arcsec


def test_iau_names_round_trip() -> None:
    rng = np.random.default_rng(7)
    for ra, dec in zip(rng.uniform(0, 360, 200), rng.uniform(-90, 90, 200), strict=True):
        name = iau_name(float(ra), float(dec))
        parsed = parse_iau_name(name)
        assert parsed is not None
        back = SkyCoord(parsed[0] * u.deg, parsed[1] * u.deg)
        # truncation to 0.01 s of RA (0.15 arcsec at the equator) and 0.1 arcsec of Dec
        assert back.separation(SkyCoord(ra * u.deg, dec * u.deg)) < 0.25 * u.arcsec
    assert parse_iau_name("CFHTLSJ020142.1-041520") == pytest.approx((30.425416666, -4.2555555555))
    for bad in ("J250000.00+000000.0", "J006000.00+000000.0", "J000000.00+950000.0", "no name", ""):
        assert parse_iau_name(bad) is None


def test_sources_errors(tmp_path: Path) -> None:
    with pytest.raises(ReaderError, match="no such file"):
        list(iter_sources([tmp_path / "missing"]))
    (tmp_path / "labels.csv").write_text("name,label\na,1\n")
    with pytest.raises(ReaderError, match="'file' column"):
        list(iter_sources([tmp_path]))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ReaderError, match="not a FITS"):
        list(iter_sources([tmp_path / "notes.txt"]))


def test_unreadable_image_is_reported_per_file(tmp_path: Path) -> None:
    Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    sources = list(iter_sources([tmp_path]))
    assert [s.path.name for s in sources] == ["bad.jpg", "good.png"]
    with pytest.raises(ReaderError, match="cannot read image"):
        sources[0].read()
    good = sources[1].read()
    assert good.pixels[:, 0, 0].tolist() == [10, 20, 30]
    assert good.survey == survey_name(tmp_path.name)
    assert good.external_id == "good" and good.ra is None


def test_rgba_and_grey_images_become_rgb(tmp_path: Path) -> None:
    Image.new("RGBA", (20, 24), (1, 2, 3, 4)).save(tmp_path / "a.png")
    Image.new("L", (20, 24), 9).save(tmp_path / "b.png")
    a = read_image(tmp_path / "a.png", survey="t")
    b = read_image(tmp_path / "b.png", survey="t", ra=1.0, dec=2.0, pixel_scale=0.5)
    assert a.pixels.shape == b.pixels.shape == (3, 24, 20)
    assert b.pixels[:, 0, 0].tolist() == [9, 9, 9]
    assert (b.ra, b.dec, b.pixel_scale) == (1.0, 2.0, 0.5) and "pixel_scale" not in b.meta


def test_records_are_valid_tile_messages(repo_data: Path) -> None:
    fits_tile = next(read_tiles([repo_data / DR9], limit=1))
    jpg_tile = next(read_tiles([repo_data / "cfhtls_lens_candidates"], limit=1))
    for tile in (fits_tile, jpg_tile):
        body = tile.encode()
        record = messages.decode("tile", body, header=messages.headers("tile")[0][1])
        assert record["survey"] == tile.survey and record["external_id"] == tile.external_id
        # publishers send raw pixels: zlib (~20 MB/s) bounded publishing at ~100 tiles/s
        assert record["compression"] == "none"
        pixels = messages.unpack_pixels(
            record["pixels"], shape=record["shape"], dtype=record["dtype"], compression="none"
        )
        assert pixels.dtype == tile.pixels.dtype
        assert pixels.tobytes() == tile.pixels.tobytes()
        assert record["meta"] == dict(tile.meta)
