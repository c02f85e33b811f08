"""The Legacy Surveys hips2fits adapter, offline, on a recorded exchange.

Only the HTTP layer (the astroquery service's ``requests`` session) is replaced: it answers from
``tests/data/recorded/`` and checks that the adapter asks exactly what was recorded. The one test
that talks to the real service is marked ``remote_data`` and runs only when selected with
``-m remote_data``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import astropy.units as u
import numpy as np
import pytest
import requests
from astropy.coordinates import SkyCoord
from astropy.io import fits

from galsift import messages
from ingest.adapters.legacysurvey import (
    LegacySurveysClass,
    NoCoverageError,
    ParseError,
    RawResponse,
    RemoteServiceError,
)

RECORDED = Path(__file__).resolve().parent.parent / "data" / "recorded"


def _recording() -> dict[str, Any]:
    return json.loads((RECORDED / "hips2fits_dr9_cutout.json").read_text())


class RecordedSession:
    """Stands in for ``requests.Session.request``: answers from the recording, logs the calls."""

    def __init__(
        self, recording: dict[str, Any], *, override: dict[str, tuple[int, bytes, str]] | None = None
    ) -> None:
        self.exchanges = {ex["params"]["hips"]: ex for ex in recording["exchanges"]}
        self.override = override or {}
        self.calls: list[dict[str, Any]] = []

    def request(
        self, method: str, url: str, *, params: dict[str, Any] | None = None, **kwargs: Any
    ) -> requests.Response:
        assert params is not None
        self.calls.append(
            {"method": method, "url": url, "params": dict(params), "timeout": kwargs.get("timeout")}
        )
        exchange = self.exchanges[params["hips"]]
        assert method == exchange["method"] and url == exchange["url"]
        assert params == exchange["params"], "the adapter's request differs from the recording"
        status, body, ctype = self.override.get(
            params["hips"],
            (exchange["status"], (RECORDED / exchange["body_file"]).read_bytes(), exchange["content_type"]),
        )
        response = requests.Response()
        response.status_code = status
        response._content = body
        response.headers["Content-Type"] = ctype
        response.url = url
        return response


@pytest.fixture
def adapter() -> LegacySurveysClass:
    return LegacySurveysClass(survey="legacy_dr10_hips")


def _install(monkeypatch: pytest.MonkeyPatch, adapter: LegacySurveysClass, session: RecordedSession) -> None:
    monkeypatch.setattr(adapter.service._session, "request", session.request)


def _request_args(recording: dict[str, Any]) -> tuple[SkyCoord, dict[str, Any]]:
    ra, dec = recording["coord_deg"]
    coord = SkyCoord(ra * u.deg, dec * u.deg, frame="icrs")
    kwargs = {
        "size": recording["size"],
        "pixel_scale": recording["pixel_scale_arcsec"] * u.arcsec,
        "bands": recording["bands"],
    }
    return coord, kwargs


def test_payload_only_mode_matches_the_recorded_requests(adapter: LegacySurveysClass) -> None:
    recording = _recording()
    coord, kwargs = _request_args(recording)
    payloads = adapter.query_payloads(coord, **kwargs)
    assert payloads == [ex["params"] for ex in recording["exchanges"]]
    assert [p["hips"] for p in payloads] == [f"CDS/P/DESI-Legacy-Surveys/DR10/{b}" for b in "grz"]
    assert payloads[0]["fov"] == pytest.approx(64 * 0.262 / 3600)
    # an angular size is the same request
    assert (
        adapter.query_payloads(coord, size=64 * 0.262 * u.arcsec, pixel_scale=0.262 * u.arcsec, bands="grz")
        == payloads
    )


def test_fetch_cutout_from_the_recording(
    adapter: LegacySurveysClass, monkeypatch: pytest.MonkeyPatch, repo_data: Path
) -> None:
    recording = _recording()
    session = RecordedSession(recording)
    _install(monkeypatch, adapter, session)
    coord, kwargs = _request_args(recording)

    raw = adapter.fetch_cutout_async(coord, **kwargs)
    assert [r.band for r in raw] == ["g", "r", "z"]  # type: ignore[union-attr]
    assert len(session.calls) == 3 and all(c["timeout"] == adapter.timeout for c in session.calls)

    cutout = adapter.fetch_cutout(coord, **kwargs)
    assert cutout.bands == ("g", "r", "z")
    assert cutout.pixels.shape == (3, 64, 64) and cutout.pixels.dtype == np.float32
    # the pixels are the centre of the real DR9 cutout the recording was made from
    source = fits.getdata(repo_data / recording["source"]).astype(np.float32)
    np.testing.assert_array_equal(cutout.pixels, source[:, 96:160, 96:160])
    assert cutout.coord.separation(coord) < 1 * u.mas
    assert cutout.pixel_scale.to_value(u.arcsec) == pytest.approx(0.262, rel=1e-9)

    tile = cutout.to_tile(survey=adapter.survey)
    assert tile.external_id == "J000030.87-011246.8"
    assert tile.key == b"legacy_dr10_hips/J000030.87-011246.8"
    header = fits.Header.fromstring(tile.header or "", sep="\n")
    assert header["BANDS"] == "grz" and header["CTYPE1"] == "RA---TAN"
    record = messages.decode("tile", tile.encode())
    assert record["bands"] == ["g", "r", "z"] and record["shape"] == [3, 64, 64]
    assert record["ra"] == pytest.approx(recording["coord_deg"][0])


def test_error_status_keeps_the_payload(adapter: LegacySurveysClass, monkeypatch: pytest.MonkeyPatch) -> None:
    recording = _recording()
    body = json.dumps({"title": "Bad request", "description": "HiPS not found"}).encode()
    session = RecordedSession(
        recording, override={"CDS/P/DESI-Legacy-Surveys/DR10/r": (400, body, "application/json")}
    )
    _install(monkeypatch, adapter, session)
    coord, kwargs = _request_args(recording)
    with pytest.raises(RemoteServiceError, match=r"400.*Bad request - HiPS not found") as err:
        adapter.fetch_cutout(coord, **kwargs)
    assert err.value.status == 400 and err.value.payload == body
    assert err.value.params["hips"].endswith("/r")


def test_garbage_body_raises_parse_error_with_the_raw_bytes(
    adapter: LegacySurveysClass, monkeypatch: pytest.MonkeyPatch
) -> None:
    recording = _recording()
    body = b"<html>maintenance</html>"
    session = RecordedSession(
        recording, override={"CDS/P/DESI-Legacy-Surveys/DR10/z": (200, body, "text/html")}
    )
    _install(monkeypatch, adapter, session)
    coord, kwargs = _request_args(recording)
    with pytest.raises(ParseError, match="band z: not a FITS image") as err:
        adapter.fetch_cutout(coord, **kwargs)
    assert err.value.payload == body


def _raw_bands(recording: dict[str, Any]) -> list[RawResponse]:
    return [
        RawResponse(
            band=ex["params"]["hips"][-1],
            params=ex["params"],
            status=200,
            content=(RECORDED / ex["body_file"]).read_bytes(),
        )
        for ex in recording["exchanges"]
    ]


def _refits(raw: RawResponse, *, data: np.ndarray | None = None, **cards: Any) -> RawResponse:
    hdul = fits.HDUList.fromstring(raw.content)
    hdu = fits.PrimaryHDU(hdul[0].data if data is None else data, hdul[0].header)
    for key, value in cards.items():
        hdu.header[key] = value
    buf = fits.HDUList([hdu])
    import io

    out = io.BytesIO()
    buf.writeto(out)
    return RawResponse(band=raw.band, params=raw.params, status=200, content=out.getvalue())


def test_parse_checks_coverage_shape_and_wcs(adapter: LegacySurveysClass) -> None:
    recording = _recording()
    coord, _ = _request_args(recording)
    raws = _raw_bands(recording)
    assert adapter.parse_cutout(raws, coord=coord).pixels.shape == (3, 64, 64)

    blank = fits.HDUList.fromstring(raws[1].content)[0].data.copy()
    blank[:10] = np.nan
    with pytest.raises(NoCoverageError) as err:
        adapter.parse_cutout([raws[0], _refits(raws[1], data=blank), raws[2]], coord=coord)
    assert err.value.blank_fraction == pytest.approx(10 * 64 / (3 * 64 * 64))

    with pytest.raises(ParseError, match="asked for"):
        adapter.parse_cutout([raws[0], _refits(raws[1], data=blank[:32]), raws[2]])

    shifted = _refits(raws[2], CRVAL2=recording["coord_deg"][1] + 1.0 / 3600)
    with pytest.raises(ParseError, match="band z: WCS centre differs"):
        adapter.parse_cutout([raws[0], raws[1], shifted])

    elsewhere = SkyCoord(coord.ra + 10 * u.arcsec, coord.dec)
    with pytest.raises(ParseError, match="from the requested position"):
        adapter.parse_cutout(raws, coord=elsewhere)


def test_arguments_are_checked(adapter: LegacySurveysClass) -> None:
    coord = SkyCoord(10 * u.deg, 0 * u.deg)
    with pytest.raises(ValueError, match="angle"):
        adapter.query_payloads(coord, pixel_scale=0.262)
    with pytest.raises(ValueError, match=r"16\.\.2048"):
        adapter.query_payloads(coord, size=8)
    with pytest.raises(ValueError, match=r"16\.\.2048"):
        adapter.query_payloads(coord, size=10 * u.deg)
    with pytest.raises(ValueError, match="distinct"):
        adapter.query_payloads(coord, bands=["g", "g"])
    with pytest.raises(ValueError, match="placeholder"):
        LegacySurveysClass(hips_template="CDS/P/DESI-Legacy-Surveys/DR10/g")
    galactic = SkyCoord(l=96.3 * u.deg, b=-60.2 * u.deg, frame="galactic")
    params = adapter.query_payloads(galactic, size=32)[0]
    assert params["ra"] == pytest.approx(galactic.icrs.ra.deg) and params["coordsys"] == "icrs"


@pytest.mark.remote_data
def test_live_cutout(request: pytest.FixtureRequest) -> None:
    if "remote_data" not in (request.config.option.markexpr or ""):
        pytest.skip("reaches the network: run with -m remote_data")
    cutout = LegacySurveysClass().fetch_cutout(
        SkyCoord(0.1286636 * u.deg, -1.2130041 * u.deg), size=64, bands="grz"
    )
    assert cutout.pixels.shape == (3, 64, 64)
    assert np.isfinite(cutout.pixels).all()
