"""Read survey files into ``tile.v1`` records.

Two kinds of input are understood, as laid out in DESIGN.md's dataset contract:

* multi-band FITS cutouts with a celestial WCS (the Legacy Surveys cutout-service format: a
  ``(bands, H, W)`` float cube, band names in ``BANDS``/``BAND<i>`` cards). The tile centre comes
  from the WCS, the pixel scale from the WCS's CD/CDELT matrix, and the header text travels with
  the tile;
* folders of colour JPEG/PNG composites described by a ``labels.csv`` (a ``file`` column plus
  label columns). Positions come from ``ra``/``dec`` columns, or from an IAU-style name
  (``J000411.19+020924.0``) in the id, an ``iauname`` column or the file name; labels are copied
  into ``meta``.

Reading is split into finding sources (:func:`iter_sources`, cheap, never opens an image) and
reading one (:meth:`Source.read`), so a publisher can count and report one unreadable file
without stopping the others.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from galsift import messages

#: file name endings read as FITS cubes
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fits.fz")
#: file name endings read as colour composites
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: band names assumed for a 3-plane cube whose header names none (the Legacy Surveys order)
DEFAULT_FITS_BANDS = ("g", "r", "z")
#: band names of a colour composite, in pixel-axis order
COLOUR_BANDS = ("R", "G", "B")
#: arcsec/px recorded for colour composites whose scale nobody states: the DECaLS native scale.
#: Such tiles carry ``meta["pixel_scale"] = "assumed"`` so nobody mistakes it for a measurement.
NOMINAL_PIXEL_SCALE = 0.262
#: columns that may hold the survey's own id of a row, in order of preference
ID_COLUMNS = ("external_id", "id")
#: columns that may hold an IAU-style name, in order of preference
NAME_COLUMNS = ("iauname", "name")

_IAU_NAME = re.compile(
    r"J(?P<h>\d{2})(?P<m>\d{2})(?P<s>\d{2}(?:\.\d+)?)"
    r"(?P<sign>[+-])(?P<d>\d{2})(?P<dm>\d{2})(?P<ds>\d{2}(?:\.\d+)?)"
)
_SURVEY_CHARS = re.compile(r"[^a-z0-9_.-]+")


class ReaderError(ValueError):
    """A source file that cannot be turned into a tile; ``path`` names it."""

    def __init__(self, path: Path | str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = Path(path)
        self.detail = detail


@dataclass(frozen=True, eq=False)
class SurveyTile:
    """One tile read from a survey file, ready to be published to ``tiles.raw``.

    Attributes
    ----------
    survey
        Survey or data release name (``[a-z0-9_.-]``, at most 64 characters).
    external_id
        The survey's own id of the object; ``(survey, external_id)`` is unique.
    pixels
        ``(bands, H, W)`` array: uint8 for colour composites, float32 flux for FITS.
    bands
        Band names in pixel-axis order.
    pixel_scale
        Arcsec per pixel.
    ra, dec
        ICRS position of the tile centre in degrees, or None when the source has none.
    header
        FITS header text (80-character cards separated by newlines), when the source had one.
    obs_time
        Observation time, when the source states it.
    meta
        Provenance and labels, as strings.
    """

    survey: str
    external_id: str
    pixels: np.ndarray
    bands: tuple[str, ...]
    pixel_scale: float
    ra: float | None = None
    dec: float | None = None
    header: str | None = None
    obs_time: datetime | None = None
    meta: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> bytes:
        """Kafka key ``survey/external_id``: one object always lands on one partition."""
        return f"{self.survey}/{self.external_id}".encode()

    @property
    def tile_id(self) -> str:
        """The deterministic tile id every stage agrees on."""
        return messages.tile_id(self.survey, self.external_id)

    def to_record(self, *, pixels_uri: str | None = None) -> dict[str, Any]:
        """The ``tile.v1`` record; raw pixels inline unless ``pixels_uri`` points at a copy."""
        return {
            "survey": self.survey,
            "external_id": self.external_id,
            "ra": self.ra,
            "dec": self.dec,
            "bands": list(self.bands),
            "pixel_scale": float(self.pixel_scale),
            "obs_time": self.obs_time,
            "shape": [int(n) for n in self.pixels.shape],
            "dtype": str(self.pixels.dtype),
            "compression": "none",
            "pixels": None if pixels_uri else messages.pack_pixels(self.pixels, compression="none"),
            "pixels_uri": pixels_uri,
            "header": self.header,
            "meta": dict(self.meta),
        }

    def encode(self, *, pixels_uri: str | None = None) -> bytes:
        """The Kafka message value (a validated ``tile.v1`` Avro body)."""
        return messages.encode("tile", self.to_record(pixels_uri=pixels_uri))


@dataclass(frozen=True)
class Source:
    """A file to read, with the survey it belongs to and its ``labels.csv`` row, if any."""

    path: Path
    survey: str
    row: Mapping[str, str] | None = None

    @property
    def kind(self) -> str:
        """``fits`` or ``image``."""
        return "fits" if _has_suffix(self.path, FITS_SUFFIXES) else "image"

    def read(self) -> SurveyTile:
        """Read the file into a :class:`SurveyTile`.

        Raises
        ------
        ReaderError
            If the file is missing, unreadable or lacks what a tile needs.
        """
        labels = _labels(self.row)
        external_id = _external_id(self.path, self.row)
        if self.kind == "fits":
            tile = read_fits(self.path, survey=self.survey, external_id=external_id)
            if not labels:
                return tile
            ra, dec = tile.ra, tile.dec
            if ra is None:  # the WCS is the better position; the table only fills a gap
                ra, dec = _row_position(self.path, self.row, external_id)
            return replace(tile, ra=ra, dec=dec, meta={**tile.meta, **labels})
        ra, dec = _row_position(self.path, self.row, external_id)
        scale = _row_pixel_scale(self.path, self.row)
        return read_image(
            self.path,
            survey=self.survey,
            external_id=external_id,
            ra=ra,
            dec=dec,
            pixel_scale=scale,
            meta=labels,
        )


# -- finding sources ---------------------------------------------------------------------------
def survey_name(text: str) -> str:
    """Normalise a folder name or argument into a survey name (``[a-z0-9_.-]``, <= 64 chars).

    Raises
    ------
    ValueError
        If nothing usable remains.
    """
    name = _SURVEY_CHARS.sub("_", text.strip().lower()).strip("_.-")[:64]
    if not name:
        raise ValueError(f"{text!r} does not make a survey name")
    return name


def iter_sources(
    paths: Iterable[Path | str], *, survey: str | None = None, limit: int | None = None
) -> Iterator[Source]:
    """Find the tiles in ``paths`` (files, or dataset folders) without opening them.

    Parameters
    ----------
    paths
        FITS or image files, or folders. A folder with ``labels.csv`` yields the files its ``file``
        column names, in table order, with their rows; a folder without one yields every FITS and
        image file below it, in name order.
    survey
        Survey name for every tile; by default the name of the folder given (for a file given
        directly, its parent folder).
    limit
        Stop after this many sources in total.

    Raises
    ------
    ReaderError
        If a path does not exist, or a ``labels.csv`` has no ``file`` column.
    """
    count = 0
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ReaderError(path, "no such file or folder")
        folder = path if path.is_dir() else path.parent
        name = survey_name(survey if survey is not None else folder.resolve().name)
        for source in _sources_in(path, name):
            if limit is not None and count >= limit:
                return
            yield source
            count += 1


def read_tiles(
    paths: Iterable[Path | str], *, survey: str | None = None, limit: int | None = None
) -> Iterator[SurveyTile]:
    """Read every tile in ``paths`` (see :func:`iter_sources`); the first bad file raises."""
    for source in iter_sources(paths, survey=survey, limit=limit):
        yield source.read()


def _sources_in(path: Path, survey: str) -> Iterator[Source]:
    if path.is_file():
        if path.name == "labels.csv":
            yield from _table_sources(path, survey)
        elif _supported(path):
            yield Source(path, survey)
        else:
            raise ReaderError(path, f"not a FITS ({', '.join(FITS_SUFFIXES)}) or image file")
        return
    table = path / "labels.csv"
    if table.is_file():
        yield from _table_sources(table, survey)
        return
    for file in sorted(p for p in path.rglob("*") if p.is_file() and _supported(p)):
        yield Source(file, survey)


def _table_sources(table: Path, survey: str) -> Iterator[Source]:
    with table.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "file" not in reader.fieldnames:
            raise ReaderError(table, "labels.csv has no 'file' column")
        for row in reader:
            clean = {k: (v or "").strip() for k, v in row.items() if k is not None}
            yield Source(table.parent / clean["file"], survey, clean)


def _supported(path: Path) -> bool:
    return _has_suffix(path, FITS_SUFFIXES + IMAGE_SUFFIXES)


def _has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    return path.name.lower().endswith(tuple(suffixes))


def _stem(path: Path) -> str:
    name = path.name
    for suffix in FITS_SUFFIXES + IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


# -- positions from names and tables ------------------------------------------------------------
def parse_iau_name(text: str) -> tuple[float, float] | None:
    """RA and Dec in degrees from an IAU-style name such as ``J000411.19+020924.0``.

    The name may be embedded in a longer string (``CFHTLSJ020142.1-041520``,
    ``gz_decals_rings__J000411.19+020924.0``). IAU names truncate the position, so the result is
    good to the last digit given.

    Returns
    -------
    tuple of float or None
        ``(ra, dec)``, or None if ``text`` holds no valid name.
    """
    match = _IAU_NAME.search(text)
    if match is None:
        return None
    h, m, s = int(match["h"]), int(match["m"]), float(match["s"])
    d, dm, ds = int(match["d"]), int(match["dm"]), float(match["ds"])
    if h >= 24 or m >= 60 or s >= 60 or dm >= 60 or ds >= 60:
        return None
    dec = d + dm / 60 + ds / 3600
    if dec > 90:
        return None
    ra = 15.0 * (h + m / 60 + s / 3600)
    return ra, (-dec if match["sign"] == "-" else dec)


def iau_name(ra: float, dec: float, *, prefix: str = "J") -> str:
    """IAU-style name ``Jhhmmss.ss+ddmmss.s`` of a position (truncated, as the IAU asks).

    :func:`parse_iau_name` reads it back to within 0.01 s of RA and 0.1 arcsec of Dec.
    """
    centiseconds = int((ra % 360.0) / 15.0 * 360_000)
    h, rest = divmod(centiseconds, 360_000)
    m, rest = divmod(rest, 6_000)
    deciarcsec = int(abs(dec) * 36_000)
    d, drest = divmod(deciarcsec, 36_000)
    dm, drest = divmod(drest, 600)
    sign = "-" if dec < 0 else "+"
    return f"{prefix}{h:02d}{m:02d}{rest / 100:05.2f}{sign}{d:02d}{dm:02d}{drest / 10:04.1f}"


def _external_id(path: Path, row: Mapping[str, str] | None) -> str:
    for column in ID_COLUMNS:
        if row and row.get(column):
            return row[column]
    return _stem(path)


def _labels(row: Mapping[str, str] | None) -> dict[str, str]:
    return dict(row) if row else {}


def _row_position(
    path: Path, row: Mapping[str, str] | None, external_id: str
) -> tuple[float | None, float | None]:
    if row and row.get("ra") and row.get("dec"):
        try:
            ra, dec = float(row["ra"]), float(row["dec"])
        except ValueError as exc:
            raise ReaderError(path, f"ra/dec columns are not numbers: {exc}") from exc
        return ra % 360.0, dec
    candidates = [external_id, *(row.get(c, "") for c in NAME_COLUMNS if row), _stem(path)]
    for text in candidates:
        position = parse_iau_name(text) if text else None
        if position is not None:
            return position
    return None, None


def _row_pixel_scale(path: Path, row: Mapping[str, str] | None) -> float | None:
    if row and row.get("pixel_scale"):
        try:
            return float(row["pixel_scale"])
        except ValueError as exc:
            raise ReaderError(path, f"pixel_scale column is not a number: {exc}") from exc
    return None


# -- FITS ---------------------------------------------------------------------------------------
def read_fits(
    path: Path | str,
    *,
    survey: str,
    external_id: str | None = None,
    bands: Sequence[str] | None = None,
) -> SurveyTile:
    """Read a multi-band FITS cutout with a celestial WCS.

    Parameters
    ----------
    path
        The FITS file; the first HDU with 2- or 3-dimensional data is used.
    survey
        Survey name of the tile.
    external_id
        The object's id; by default the file name without its suffix.
    bands
        Band names, overriding the header's ``BANDS``/``BAND<i>``/``FILTER`` cards.

    Returns
    -------
    SurveyTile
        float32 ``(bands, H, W)`` pixels; the centre pixel's world position as ``ra``/``dec``.

    Raises
    ------
    ReaderError
        If the file holds no image, or band names or the pixel scale cannot be determined.
    """
    from astropy.io import fits

    path = Path(path)
    try:
        with fits.open(path, memmap=False) as hdul:
            hdu = next((h for h in hdul if h.data is not None and h.data.ndim in (2, 3)), None)
            if hdu is None:
                raise ReaderError(path, "no 2- or 3-dimensional image HDU")
            header = hdu.header.copy()
            data = np.asarray(hdu.data, dtype=np.float32)
    except ReaderError:
        raise
    except (OSError, ValueError, TypeError) as exc:
        raise ReaderError(path, f"cannot read FITS: {exc}") from exc
    if data.ndim == 2:
        data = data[np.newaxis]
    names = tuple(bands) if bands is not None else header_bands(header, n=data.shape[0])
    if names is None:
        raise ReaderError(path, f"{data.shape[0]} planes and no band names in the header")
    if len(names) != data.shape[0]:
        raise ReaderError(path, f"{data.shape[0]} planes but bands {list(names)}")
    ra, dec, scale = wcs_centre(header, width=data.shape[2], height=data.shape[1])
    if ra is None:
        position = coordinates_from_filename(path.name)
        ra, dec = position if position else (None, None)
    if scale is None:
        raise ReaderError(path, "no celestial WCS: cannot tell the pixel scale")
    meta = {"file": path.name}
    for card, key in (("SURVEY", "origin_survey"), ("VERSION", "release"), ("IMAGETYP", "imagetype")):
        if card in header:
            meta[key] = str(header[card]).strip()
    return SurveyTile(
        survey=survey,
        external_id=external_id or _stem(path),
        pixels=np.ascontiguousarray(data),
        bands=names,
        pixel_scale=scale,
        ra=ra,
        dec=dec,
        header=header.tostring(sep="\n", endcard=False, padding=False),
        obs_time=_obs_time(header),
        meta=meta,
    )


def header_bands(header: Any, *, n: int) -> tuple[str, ...] | None:
    """Band names of an ``n``-plane cube from its header, or the default for 3 unnamed planes.

    ``BAND0..BAND<n-1>`` win over ``BANDS`` (one letter per band, as the Legacy Surveys cutout
    service writes it), then ``FILTER``/``BAND`` for a single plane.
    """
    cards = [str(header.get(f"BAND{i}", "")).strip() for i in range(n)]
    if all(cards):
        return tuple(cards)
    letters = str(header.get("BANDS", "")).strip()
    if len(letters) == n:
        return tuple(letters)
    if n == 1:
        for card in ("FILTER", "BAND"):
            if str(header.get(card, "")).strip():
                return (str(header[card]).strip(),)
    if n == len(DEFAULT_FITS_BANDS):
        return DEFAULT_FITS_BANDS
    return None


def wcs_centre(header: Any, *, width: int, height: int) -> tuple[float | None, float | None, float | None]:
    """World position of the image centre and the pixel scale (arcsec/px) from a FITS header.

    Uses only the two celestial axes, so a ``(band, y, x)`` cube header works. The centre is pixel
    ``((width - 1) / 2, (height - 1) / 2)`` in 0-based pixel coordinates.

    Returns
    -------
    tuple
        ``(ra, dec, scale)``, all None when the header has no celestial WCS.
    """
    import warnings

    from astropy.utils.exceptions import AstropyWarning
    from astropy.wcs import WCS, FITSFixedWarning
    from astropy.wcs.utils import proj_plane_pixel_scales

    with warnings.catch_warnings():
        # cutout-service headers lack RADESYS/MJD-OBS: astropy warns while assuming ICRS
        warnings.simplefilter("ignore", FITSFixedWarning)
        warnings.simplefilter("ignore", AstropyWarning)
        try:
            wcs = WCS(header, naxis=2)
        except Exception:  # astropy raises many types for unusable WCS cards
            return None, None, None
    if not wcs.has_celestial or wcs.celestial.naxis != 2:
        return None, None, None
    cel = wcs.celestial
    lon, lat = cel.wcs_pix2world([[(width - 1) / 2, (height - 1) / 2]], 0)[0]
    if not (math.isfinite(lon) and math.isfinite(lat)):
        return None, None, None
    scales = proj_plane_pixel_scales(cel) * np.array([u.to("arcsec") for u in cel.wcs.cunit])
    return float(lon) % 360.0, float(lat), float(np.mean(scales))


def coordinates_from_filename(name: str) -> tuple[float, float] | None:
    """``(ra, dec)`` from a cutout-service file name ``cutout_<ra>_<dec>.fits``, if it is one."""
    match = re.search(r"cutout_(-?\d+(?:\.\d+)?)_(-?\d+(?:\.\d+)?)", name)
    if match is None:
        return None
    ra, dec = float(match[1]), float(match[2])
    if not (0 <= ra < 360 and -90 <= dec <= 90):
        return None
    return ra, dec


def _obs_time(header: Any) -> datetime | None:
    from astropy.time import Time

    try:
        if header.get("DATE-OBS"):
            t = Time(str(header["DATE-OBS"]), scale="utc")
        elif header.get("MJD-OBS"):
            t = Time(float(header["MJD-OBS"]), format="mjd", scale="utc")
        else:
            return None
    except ValueError:
        return None
    return t.to_datetime(timezone=UTC)


# -- colour composites --------------------------------------------------------------------------
def read_image(
    path: Path | str,
    *,
    survey: str,
    external_id: str | None = None,
    ra: float | None = None,
    dec: float | None = None,
    pixel_scale: float | None = None,
    meta: Mapping[str, str] | None = None,
) -> SurveyTile:
    """Read a JPEG/PNG colour composite as uint8 ``(3, H, W)`` pixels (R, G, B).

    Parameters
    ----------
    path
        The image file; greyscale and RGBA images are converted to RGB.
    survey, external_id
        Identity of the tile; ``external_id`` defaults to the file name without suffix.
    ra, dec
        Position in degrees; if not given, parsed from an IAU name in the id, else left empty.
    pixel_scale
        Arcsec per pixel; if not given, :data:`NOMINAL_PIXEL_SCALE`, flagged in ``meta``.
    meta
        Labels and provenance to keep with the tile.

    Raises
    ------
    ReaderError
        If the file is missing or not a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ReaderError(path, f"cannot read image: {exc}") from exc
    ident = external_id or _stem(path)
    if ra is None or dec is None:
        position = parse_iau_name(ident) or parse_iau_name(path.name)
        ra, dec = position if position else (None, None)
    info = {"file": path.name, **(meta or {})}
    if pixel_scale is None:
        pixel_scale = NOMINAL_PIXEL_SCALE
        info["pixel_scale"] = "assumed"
    return SurveyTile(
        survey=survey,
        external_id=ident,
        pixels=np.ascontiguousarray(rgb.transpose(2, 0, 1)),
        bands=COLOUR_BANDS,
        pixel_scale=float(pixel_scale),
        ra=ra,
        dec=dec,
        meta=info,
    )
