"""DESI Legacy Imaging Surveys cutouts by sky position, through CDS hips2fits (astroquery).

Kept in the astroquery shape (STYLE.md 10-13):

* :meth:`LegacySurveysClass.fetch_cutout_async` sends one hips2fits request per band and returns
  the raw responses (or, with ``get_query_payload=True``, only the request parameters);
* :meth:`LegacySurveysClass.parse_cutout` turns those responses into a :class:`Cutout`, raising
  a :class:`ParseError` that keeps the raw bytes when something unexpected arrived;
* :meth:`LegacySurveysClass.fetch_cutout` does both; :meth:`Cutout.to_tile` makes the
  :class:`~ingest.readers.SurveyTile` that the publisher sends.

Sky quantities are keyword-only astropy quantities. hips2fits serves one band per request, so a
``g,r,z`` cutout is three requests whose WCS must agree; pixels outside the survey footprint come
back blank (NaN) and raise :class:`NoCoverageError` rather than travel downstream.

Only the per-band HiPS of DR10 are known to be published by CDS
(``CDS/P/DESI-Legacy-Surveys/DR10/<band>``; DR10 south contains the DR9 south imaging); pass
``hips_template`` to use another release.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord
from astroquery.hips2fits import hips2fitsClass

from ingest.readers import SurveyTile, iau_name, survey_name, wcs_centre

__all__ = [
    "AdapterError",
    "Cutout",
    "LegacySurveys",
    "LegacySurveysClass",
    "NoCoverageError",
    "ParseError",
    "RawResponse",
    "RemoteServiceError",
]

#: the Legacy Surveys' native pixel scale
NATIVE_PIXEL_SCALE = 0.262 * u.arcsec
#: largest cutout side hips2fits is asked for (and that ingest accepts)
MAX_SIZE = 2048


# -- exceptions (astroquery keeps a small hierarchy per module) ---------------------------------
class AdapterError(Exception):
    """Base class of survey-adapter errors."""


class RemoteServiceError(AdapterError):
    """The service answered with an error status.

    Attributes
    ----------
    status
        HTTP status code.
    payload
        The raw response body, as received.
    params
        The request parameters that produced it.
    """

    def __init__(self, message: str, *, status: int, payload: bytes, params: dict[str, Any]) -> None:
        super().__init__(message)
        self.status = status
        self.payload = payload
        self.params = params


class ParseError(AdapterError):
    """A response arrived but could not be understood; ``payload`` keeps what arrived."""

    def __init__(self, message: str, *, payload: bytes, params: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.payload = payload
        self.params = params or {}


class NoCoverageError(ParseError):
    """The cutout has blank (NaN) pixels: the position is outside or at the edge of the footprint."""

    def __init__(
        self, message: str, *, payload: bytes, params: dict[str, Any] | None = None, blank_fraction: float
    ) -> None:
        super().__init__(message, payload=payload, params=params)
        self.blank_fraction = blank_fraction


# -- results ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RawResponse:
    """One band's raw answer: what was asked and what came back."""

    band: str
    params: dict[str, Any]
    status: int
    content: bytes
    content_type: str = ""


@dataclass(frozen=True, eq=False)
class Cutout:
    """A parsed multi-band cutout.

    Attributes
    ----------
    coord
        Position of the cutout centre, from the returned WCS.
    pixels
        float32 ``(bands, size, size)``.
    bands
        Band names in pixel-axis order.
    pixel_scale
        Angular size of a pixel, from the returned WCS.
    header
        The first band's FITS header text (the WCS shared by all bands).
    hips
        HiPS ids the bands came from.
    """

    coord: SkyCoord
    pixels: np.ndarray
    bands: tuple[str, ...]
    pixel_scale: u.Quantity
    header: str
    hips: tuple[str, ...] = field(default=())

    def to_tile(self, *, survey: str, external_id: str | None = None) -> SurveyTile:
        """The tile to publish; ``external_id`` defaults to the IAU-style name of the centre."""
        ra = float(self.coord.ra.to_value(u.deg))
        dec = float(self.coord.dec.to_value(u.deg))
        return SurveyTile(
            survey=survey_name(survey),
            external_id=external_id or iau_name(ra, dec),
            pixels=self.pixels,
            bands=self.bands,
            pixel_scale=float(self.pixel_scale.to_value(u.arcsec)),
            ra=ra,
            dec=dec,
            header=self.header,
            meta={"source": "hips2fits", "hips": ",".join(self.hips)},
        )


# -- the adapter ---------------------------------------------------------------------------------
class LegacySurveysClass:
    """Fetch Legacy Surveys cutouts by position from CDS hips2fits.

    Parameters
    ----------
    hips_template
        HiPS id with a ``{band}`` placeholder.
    survey
        Survey name given to tiles made from these cutouts.
    timeout
        Seconds to wait for each request.
    """

    hips_template = "CDS/P/DESI-Legacy-Surveys/DR10/{band}"
    survey = "legacy_dr10_hips"
    timeout = 60.0

    def __init__(
        self,
        *,
        hips_template: str | None = None,
        survey: str | None = None,
        timeout: float | None = None,
    ) -> None:
        if hips_template is not None:
            if "{band}" not in hips_template:
                raise ValueError(f"hips_template {hips_template!r} has no {{band}} placeholder")
            self.hips_template = hips_template
        if survey is not None:
            self.survey = survey_name(survey)
        if timeout is not None:
            self.timeout = float(timeout)
        #: the astroquery service object; its requests session is the only network layer
        self.service = hips2fitsClass()
        self.service.timeout = self.timeout

    # -- fetch -------------------------------------------------------------------------------
    def query_payloads(
        self,
        coord: SkyCoord,
        *,
        size: int | u.Quantity = 256,
        pixel_scale: u.Quantity = NATIVE_PIXEL_SCALE,
        bands: Sequence[str] = ("g", "r", "z"),
    ) -> list[dict[str, Any]]:
        """The hips2fits request parameters, one dict per band (nothing is sent)."""
        return self.fetch_cutout_async(
            coord, size=size, pixel_scale=pixel_scale, bands=bands, get_query_payload=True
        )  # type: ignore[return-value]

    def fetch_cutout_async(
        self,
        coord: SkyCoord,
        *,
        size: int | u.Quantity = 256,
        pixel_scale: u.Quantity = NATIVE_PIXEL_SCALE,
        bands: Sequence[str] = ("g", "r", "z"),
        get_query_payload: bool = False,
    ) -> list[RawResponse] | list[dict[str, Any]]:
        """Send one hips2fits request per band and return the raw responses.

        Parameters
        ----------
        coord
            Centre of the cutout (any frame; sent as ICRS).
        size
            Side of the square cutout: pixels (int) or an angle.
        pixel_scale
            Angular size of one output pixel.
        bands
            Bands to fetch, in output order.
        get_query_payload
            Return the request parameters instead of sending them.

        Returns
        -------
        list
            One :class:`RawResponse` per band, or the parameter dicts.

        Raises
        ------
        ValueError
            If the size, scale or bands are unusable.
        """
        from astropy.coordinates import Angle, Latitude, Longitude

        n_pixels = _size_in_pixels(size, pixel_scale)
        if not bands or len(set(bands)) != len(bands):
            raise ValueError(f"bands {list(bands)} must be distinct and non-empty")
        icrs = coord.icrs
        common = {
            "width": n_pixels,
            "height": n_pixels,
            "projection": "TAN",
            "ra": Longitude(icrs.ra),
            "dec": Latitude(icrs.dec),
            "fov": Angle(n_pixels * pixel_scale),
            "coordsys": "icrs",
            "rotation_angle": Angle(0 * u.deg),
            "format": "fits",
            "min_cut": 0.5,
            "max_cut": 99.5,
            "stretch": "linear",
            "cmap": "Greys_r",
        }
        if get_query_payload:
            return [
                self.service.query_async(get_query_payload=True, hips=self._hips(b), **common) for b in bands
            ]
        responses: list[RawResponse] = []
        for band in bands:
            params = self.service.query_async(get_query_payload=True, hips=self._hips(band), **common)
            response = self.service.query_async(hips=self._hips(band), **common)
            responses.append(
                RawResponse(
                    band=band,
                    params=params,
                    status=int(response.status_code),
                    content=bytes(response.content),
                    content_type=str(response.headers.get("Content-Type", "")),
                )
            )
        return responses

    def fetch_cutout(
        self,
        coord: SkyCoord,
        *,
        size: int | u.Quantity = 256,
        pixel_scale: u.Quantity = NATIVE_PIXEL_SCALE,
        bands: Sequence[str] = ("g", "r", "z"),
    ) -> Cutout:
        """Fetch and parse a multi-band cutout (see :meth:`fetch_cutout_async`)."""
        responses = self.fetch_cutout_async(coord, size=size, pixel_scale=pixel_scale, bands=bands)
        return self.parse_cutout(responses, coord=coord)  # type: ignore[arg-type]

    def fetch_tile(
        self,
        coord: SkyCoord,
        *,
        size: int | u.Quantity = 256,
        pixel_scale: u.Quantity = NATIVE_PIXEL_SCALE,
        bands: Sequence[str] = ("g", "r", "z"),
        external_id: str | None = None,
    ) -> SurveyTile:
        """Fetch a cutout and make the tile to publish."""
        cutout = self.fetch_cutout(coord, size=size, pixel_scale=pixel_scale, bands=bands)
        return cutout.to_tile(survey=self.survey, external_id=external_id)

    # -- parse -------------------------------------------------------------------------------
    def parse_cutout(self, responses: Sequence[RawResponse], *, coord: SkyCoord | None = None) -> Cutout:
        """Turn one raw response per band into a :class:`Cutout`.

        Parameters
        ----------
        responses
            From :meth:`fetch_cutout_async`, in band order.
        coord
            The requested centre; when given, the returned WCS must point there (within a pixel).

        Raises
        ------
        RemoteServiceError
            If the service answered with an error status.
        ParseError
            If a body is not a FITS image, or the bands disagree on shape or WCS.
        NoCoverageError
            If pixels are blank (outside the survey footprint).
        """
        if not responses:
            raise ValueError("no responses to parse")
        planes: list[np.ndarray] = []
        headers: list[Any] = []
        for raw in responses:
            data, header = _parse_band(raw)
            planes.append(data)
            headers.append(header)
        first = responses[0]
        shapes = {p.shape for p in planes}
        if len(shapes) != 1:
            raise ParseError(
                f"bands differ in shape: {sorted(shapes)}", payload=first.content, params=first.params
            )
        height, width = planes[0].shape
        centres = [wcs_centre(h, width=width, height=height) for h in headers]
        ra, dec, scale = centres[0]
        if ra is None or dec is None or scale is None:
            raise ParseError("response has no celestial WCS", payload=first.content, params=first.params)
        pixel_scale = scale * u.arcsec
        centre = SkyCoord(ra * u.deg, dec * u.deg, frame="icrs")
        for raw, (bra, bdec, bscale) in zip(responses[1:], centres[1:], strict=True):
            if bra is None or bdec is None or bscale is None or not np.isclose(bscale, scale, rtol=1e-6):
                raise ParseError(
                    f"band {raw.band}: WCS scale differs", payload=raw.content, params=raw.params
                )
            sep = centre.separation(SkyCoord(bra * u.deg, bdec * u.deg, frame="icrs"))
            if sep > 0.01 * pixel_scale:
                raise ParseError(
                    f"band {raw.band}: WCS centre differs by {sep.to(u.arcsec):.3f}",
                    payload=raw.content,
                    params=raw.params,
                )
        if coord is not None and centre.separation(coord) > pixel_scale:
            sep = centre.separation(coord).to(u.arcsec)
            raise ParseError(
                f"cutout centre is {sep:.2f} from the requested position",
                payload=first.content,
                params=first.params,
            )
        pixels = np.stack(planes).astype(np.float32, copy=False)
        blank = int(pixels.size - np.count_nonzero(np.isfinite(pixels)))
        if blank:
            fraction = blank / pixels.size
            raise NoCoverageError(
                f"{fraction:.1%} of the pixels are blank: outside the survey footprint?",
                payload=first.content,
                params=first.params,
                blank_fraction=fraction,
            )
        header = headers[0].copy()
        header["BANDS"] = (
            "".join(r.band for r in responses) if all(len(r.band) == 1 for r in responses) else ""
        )
        for i, raw in enumerate(responses):
            header[f"BAND{i}"] = raw.band
        return Cutout(
            coord=centre,
            pixels=np.ascontiguousarray(pixels),
            bands=tuple(r.band for r in responses),
            pixel_scale=pixel_scale,
            header=header.tostring(sep="\n", endcard=False, padding=False),
            hips=tuple(str(r.params.get("hips", "")) for r in responses),
        )

    def _hips(self, band: str) -> str:
        return self.hips_template.format(band=band)


def _size_in_pixels(size: int | u.Quantity, pixel_scale: u.Quantity) -> int:
    if not isinstance(pixel_scale, u.Quantity) or pixel_scale.unit.physical_type != "angle":
        raise ValueError(f"pixel_scale must be an angle, e.g. 0.262*u.arcsec, not {pixel_scale!r}")
    if pixel_scale <= 0 * u.arcsec:
        raise ValueError(f"pixel_scale must be positive, not {pixel_scale}")
    if isinstance(size, u.Quantity):
        if size.unit.physical_type != "angle":
            raise ValueError(f"size must be pixels or an angle, not {size!r}")
        n = round(float((size / pixel_scale).decompose().value))
    else:
        n = int(size)
    if not 16 <= n <= MAX_SIZE:
        raise ValueError(f"cutout of {n} px per side; 16..{MAX_SIZE} allowed")
    return n


def _parse_band(raw: RawResponse) -> tuple[np.ndarray, Any]:
    from astropy.io import fits

    if raw.status != 200:
        raise RemoteServiceError(
            f"hips2fits answered {raw.status} for band {raw.band}: {_error_message(raw.content)}",
            status=raw.status,
            payload=raw.content,
            params=raw.params,
        )
    try:
        hdul = fits.HDUList.fromstring(raw.content)
        hdu = next(h for h in hdul if h.data is not None)
        data = np.asarray(hdu.data, dtype=np.float32)
        header = hdu.header.copy()
    except StopIteration:
        raise ParseError(
            f"band {raw.band}: FITS without image data", payload=raw.content, params=raw.params
        ) from None
    except Exception as exc:  # astropy raises OSError, ValueError, TypeError, ... on garbage
        raise ParseError(
            f"band {raw.band}: not a FITS image ({type(exc).__name__}: {exc})",
            payload=raw.content,
            params=raw.params,
        ) from exc
    if data.ndim != 2:
        raise ParseError(
            f"band {raw.band}: expected a 2-d image, got shape {data.shape}",
            payload=raw.content,
            params=raw.params,
        )
    expected = (int(raw.params.get("height") or data.shape[0]), int(raw.params.get("width") or data.shape[1]))
    if data.shape != expected:
        raise ParseError(
            f"band {raw.band}: image {data.shape}, asked for {expected}",
            payload=raw.content,
            params=raw.params,
        )
    return data, header


def _error_message(content: bytes) -> str:
    """hips2fits errors are JSON ``{"title": ..., "description": ...}``; anything else verbatim."""
    try:
        doc = json.loads(content)
        return " - ".join(str(doc[k]) for k in ("title", "description") if k in doc) or content[:200].decode(
            "utf-8", "replace"
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return content[:200].decode("utf-8", "replace")


#: a ready-made instance, as astroquery modules provide one (``from ... import LegacySurveys``)
LegacySurveys = LegacySurveysClass()
