"""Validation of a decoded ``tile.v1`` record, before anything is stored.

The Avro schema already fixed the field types when the message was decoded; this module checks
what a schema cannot: that the shape, band list and pixel bytes agree, that pixels are finite,
that the position is on the sky and that sizes are sane. Each failure raises
:class:`galsift.stage.Rejected` with a short reason class, which the stage base class turns into a
dead letter (``tiles.dead``) and an ``ingest_errors`` row.

Reasons: ``identity``, ``shape``, ``bands``, ``size``, ``dtype``, ``pixel_scale``,
``coordinates``, ``payload``, ``nonfinite``.

``bands`` also enforces the band contract of :mod:`galsift.bands` (g,r,z or g,r,i float flux,
R,G,B ``uint8`` composites, or more bands holding one of these sets): a tile the encoder could
not show to the model is refused here, where its reason reaches ``tiles.dead``, rather than
stored and failed later.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from galsift import messages
from galsift.bands import BandError, kind_of_dtype, resolve_bands
from galsift.stage import Rejected

#: pixel types a tile may carry (the ``PixelType`` enum of tile.v1)
ALLOWED_DTYPES = frozenset({"uint8", "float32"})
#: smallest and largest image side accepted, in pixels
MIN_SIDE = 16
MAX_SIDE = 2048
#: most bands a tile may have (a structural bound; the band contract then asks for a known set)
MAX_BANDS = 16
#: survey names become object-store path segments and Kafka keys: keep them tame
SURVEY_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
#: an external id becomes part of the Kafka key; it is never a path (the tile id is)
MAX_EXTERNAL_ID = 256

ArrayReader = Callable[[str], np.ndarray]


def validate_tile(record: Mapping[str, Any], *, read_uri: ArrayReader | None = None) -> np.ndarray:
    """Check a decoded ``tile.v1`` record and return its pixels as a ``(bands, H, W)`` array.

    Parameters
    ----------
    record
        The record as :func:`galsift.messages.decode` returned it.
    read_uri
        Reads pixels given by ``pixels_uri``; by default :func:`galsift.objectstore.read_array`
        (``.npy``) or astropy for ``.fits`` URIs.

    Returns
    -------
    numpy.ndarray
        The pixels, with the record's shape and dtype, all finite.

    Raises
    ------
    galsift.stage.Rejected
        With the reason class of the first check that failed.
    """
    check_identity(record)
    shape = check_geometry(record)
    check_coordinates(record.get("ra"), record.get("dec"))
    pixels = load_pixels(record, shape=shape, read_uri=read_uri)
    check_finite(pixels)
    return pixels


def check_identity(record: Mapping[str, Any]) -> None:
    """Survey and external id must make a usable key, object-store path and tile id."""
    survey, external_id = record.get("survey", ""), record.get("external_id", "")
    if not SURVEY_PATTERN.match(survey):
        raise Rejected("identity", f"survey {survey!r} must match {SURVEY_PATTERN.pattern}")
    if not external_id or len(external_id) > MAX_EXTERNAL_ID or not external_id.isprintable():
        raise Rejected(
            "identity", f"external_id {external_id[:80]!r} must be 1..{MAX_EXTERNAL_ID} printable characters"
        )


def check_geometry(record: Mapping[str, Any]) -> tuple[int, int, int]:
    """Shape, band list, sizes, dtype and pixel scale; returns the shape as a tuple."""
    shape = record.get("shape") or []
    if len(shape) != 3:
        raise Rejected("shape", f"shape {shape} must be (bands, height, width)")
    n_bands, height, width = (int(n) for n in shape)
    bands = record.get("bands") or []
    if not 1 <= len(bands) <= MAX_BANDS:
        raise Rejected("bands", f"{len(bands)} bands; 1..{MAX_BANDS} allowed")
    if len(bands) != n_bands:
        raise Rejected("bands", f"{len(bands)} band names {bands} for {n_bands} planes")
    if len(set(bands)) != len(bands) or not all(bands):
        raise Rejected("bands", f"band names {bands} must be distinct and non-empty")
    for side, name in ((height, "height"), (width, "width")):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise Rejected("size", f"{name} {side} px outside {MIN_SIDE}..{MAX_SIDE}")
    dtype = str(record.get("dtype"))
    if dtype not in ALLOWED_DTYPES:
        raise Rejected("dtype", f"dtype {dtype!r} not in {sorted(ALLOWED_DTYPES)}")
    check_band_contract(bands, dtype)
    scale = record.get("pixel_scale")
    if not isinstance(scale, int | float) or not math.isfinite(scale) or not 0 < scale <= 3600:
        raise Rejected("pixel_scale", f"pixel_scale {scale!r} must be in (0, 3600] arcsec/px")
    return n_bands, height, width


def check_band_contract(bands: Sequence[str], dtype: str) -> None:
    """The bands and pixel type must be one the encoder accepts (see :mod:`galsift.bands`).

    Parameters
    ----------
    bands
        Band names of the tile's planes.
    dtype
        Pixel type of the tile (already one of :data:`ALLOWED_DTYPES`).

    Raises
    ------
    galsift.stage.Rejected
        With reason ``bands`` and a message listing the accepted band sets.
    """
    try:
        resolve_bands(bands, kind=kind_of_dtype(dtype))
    except BandError as exc:
        raise Rejected("bands", str(exc)) from exc


def check_coordinates(ra: float | None, dec: float | None) -> None:
    """RA in [0, 360), Dec in [-90, 90], both given or both absent."""
    if ra is None and dec is None:
        return
    if ra is None or dec is None:
        raise Rejected("coordinates", f"ra={ra} dec={dec}: give both or neither")
    if not (math.isfinite(ra) and 0.0 <= ra < 360.0):
        raise Rejected("coordinates", f"ra {ra} outside [0, 360)")
    if not (math.isfinite(dec) and -90.0 <= dec <= 90.0):
        raise Rejected("coordinates", f"dec {dec} outside [-90, 90]")


def load_pixels(
    record: Mapping[str, Any], *, shape: tuple[int, int, int], read_uri: ArrayReader | None = None
) -> np.ndarray:
    """Decompress inline pixels, or read them from ``pixels_uri``; check shape and dtype."""
    dtype = str(record["dtype"])
    inline, uri = record.get("pixels"), record.get("pixels_uri")
    if inline is not None and uri:
        raise Rejected("payload", "both inline pixels and pixels_uri given")
    if inline is not None:
        try:
            return messages.unpack_pixels(
                inline, shape=shape, dtype=dtype, compression=record.get("compression", "zlib")
            )
        except messages.MessageError as exc:
            raise Rejected(exc.reason, exc.detail) from exc
    if not uri:
        raise Rejected("payload", "neither inline pixels nor pixels_uri")
    reader = read_uri or read_pixels_uri
    try:
        pixels = np.asarray(reader(uri))
    except Exception as exc:  # fsspec and the file formats raise many types; all mean "unreadable"
        raise Rejected("payload", f"cannot read {uri}: {type(exc).__name__}: {exc}") from exc
    if pixels.shape != shape:
        raise Rejected("shape", f"{uri} holds shape {list(pixels.shape)}, record says {list(shape)}")
    if pixels.dtype != np.dtype(dtype):
        raise Rejected("dtype", f"{uri} holds {pixels.dtype}, record says {dtype}")
    return pixels


def read_pixels_uri(uri: str) -> np.ndarray:
    """Read a ``.npy`` (object store) or ``.fits`` pixel file named by an fsspec URI."""
    if uri.lower().endswith((".fits", ".fits.gz", ".fit")):
        import fsspec
        from astropy.io import fits

        with fsspec.open(uri, "rb") as fh, fits.open(fh, memmap=False) as hdul:
            data = next(h.data for h in hdul if h.data is not None)
            return np.asarray(data, dtype=data.dtype.newbyteorder("="))
    from galsift.objectstore import read_array

    return read_array(uri)


def check_finite(pixels: np.ndarray) -> None:
    """Float pixels must all be finite (NaN/inf poison every statistic downstream)."""
    if pixels.dtype.kind == "f":
        bad = int(pixels.size - np.count_nonzero(np.isfinite(pixels)))
        if bad:
            raise Rejected("nonfinite", f"{bad} of {pixels.size} pixels are NaN or infinite")
