"""Lens alerts without services: the lenscat cross-match, the threshold, the Slack body, alert.v1."""

from __future__ import annotations

import csv
import dataclasses
import importlib.metadata
import math
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import astropy.units as u
import pytest

from db.alerts import AlertPublic
from detectors.alerts import (
    AlertCandidate,
    CatalogueError,
    KnownLenses,
    ScoredTile,
    alert_messages,
    build_alerts,
    select_alerts,
    webhook_target,
)
from galsift import messages


@pytest.fixture(scope="module")
def known() -> KnownLenses:
    return KnownLenses.from_lenscat()


def _lenscat_rows() -> list[dict[str, str]]:
    """The catalogue as lenscat ships it, read here independently of the code under test."""
    dist = importlib.metadata.distribution("lenscat")
    (path,) = [f for f in dist.files or [] if str(f).endswith("lenscat/data/catalog.csv")]
    with Path(str(dist.locate_file(path))).open(newline="") as fh:
        return list(csv.DictReader(fh))


def _tile(
    score: float = 0.95, *, ra: float | None = 150.0, dec: float | None = 2.0, n: int = 0
) -> ScoredTile:
    return ScoredTile(
        tile_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"tile/{n}")),
        survey="legacy_dr10",
        external_id=f"J{n:04d}",
        ra=ra,
        dec=dec,
        score=score,
        model_version="lens_tiny-abc123",
        detector="lens_maskrcnn",
        pixels_uri=f"file:///var/objects/legacy_dr10/J{n:04d}.npy",
    )


# -- cross-match ----------------------------------------------------------------------------------
def test_lenscat_catalogue_is_loaded_whole(known: KnownLenses) -> None:
    rows = _lenscat_rows()
    assert len(known) == len(rows) > 30_000
    assert known.source == f"lenscat {importlib.metadata.version('lenscat')}"
    assert KnownLenses.from_lenscat() is known  # read once per process


def test_a_lenscat_entry_matches_at_its_own_coordinates(known: KnownLenses) -> None:
    rows = _lenscat_rows()
    # an isolated entry (no neighbour within 1'), so the nearest one is unambiguous
    for row in rows[1000:]:
        ra, dec = float(row["RA [deg]"]), float(row["DEC [deg]"])
        near = [
            r
            for r in rows
            if abs(float(r["DEC [deg]"]) - dec) < 0.02
            and abs(float(r["RA [deg]"]) - ra) < 0.05
            and r is not row
        ]
        if not near:
            break
    match = known.match(ra * u.deg, dec * u.deg, radius=5 * u.arcsec)
    assert match is not None
    assert match.name == row["name"]
    assert match.separation.to_value(u.arcsec) < 1e-3
    assert match.type == row["type"] and match.grading == row["grading"]
    # a bare number is degrees, as in the tiles table
    assert known.match(ra, dec, radius=5 * u.arcsec) == match
    # one degree away in declination there is nothing within 5″ (nor within 1′)
    other_dec = dec - 1.0 if dec > 0 else dec + 1.0
    assert known.match(ra * u.deg, other_dec * u.deg, radius=60 * u.arcsec) is None
    # 3″ off still matches at 5″ but not at 2″
    off = (dec + 3.0 / 3600.0) * u.deg
    assert known.match(ra * u.deg, off, radius=5 * u.arcsec) is not None
    assert known.match(ra * u.deg, off, radius=2 * u.arcsec) is None


def test_match_many_takes_nan_as_no_position(known: KnownLenses) -> None:
    row = _lenscat_rows()[0]
    ra, dec = float(row["RA [deg]"]), float(row["DEC [deg]"])
    out = known.match_many([ra, math.nan, ra], [dec, 0.0, dec - 1.0], radius=5 * u.arcsec)
    assert out[0] is not None and out[1] is None and out[2] is None


def test_radius_must_be_an_angle(known: KnownLenses) -> None:
    with pytest.raises(TypeError, match="astropy angle"):
        known.match(10.0, 10.0, radius=5)
    with pytest.raises(u.UnitConversionError):
        known.match(10.0, 10.0, radius=5 * u.m)
    with pytest.raises(ValueError, match="positive"):
        known.match(10.0, 10.0, radius=0 * u.arcsec)


def test_catalogue_file_without_coordinates_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cat.csv"
    path.write_text("name,zlens\nA,0.5\n")
    with pytest.raises(CatalogueError, match="dec, ra"):
        KnownLenses.from_csv(path)
    with pytest.raises(CatalogueError, match="cannot read"):
        KnownLenses.from_csv(tmp_path / "missing.csv")


def test_catalogue_units_in_column_names_are_honoured(tmp_path: Path) -> None:
    path = tmp_path / "cat.csv"
    path.write_text("name,RA [arcmin],DEC [deg],type\nX,600.0,2.0,galaxy\n")
    cat = KnownLenses.from_csv(path, source="test")
    match = cat.match(10.0, 2.0, radius=1 * u.arcsec)
    assert match is not None and match.name == "X" and match.type == "galaxy"


# -- which tiles alert ----------------------------------------------------------------------------
def test_threshold_is_inclusive_and_nan_never_alerts() -> None:
    tiles = [_tile(0.9, n=1), _tile(0.8999, n=2), _tile(float("nan"), n=3), _tile(1.0, n=4)]
    chosen = select_alerts(tiles, threshold=0.9)
    assert [t.external_id for t in chosen] == ["J0001", "J0004"]


def test_a_tile_twice_in_a_batch_alerts_once_with_its_best_score() -> None:
    chosen = select_alerts([_tile(0.91, n=1), _tile(0.97, n=1), _tile(0.95, n=2)], threshold=0.9)
    assert [(t.external_id, t.score) for t in chosen] == [("J0001", 0.97), ("J0002", 0.95)]


def test_build_alerts_marks_known_lenses(known: KnownLenses) -> None:
    row = _lenscat_rows()[0]
    ra, dec = float(row["RA [deg]"]), float(row["DEC [deg]"])
    tiles = [
        _tile(0.99, ra=ra, dec=dec, n=1),  # a known lens
        _tile(0.97, ra=ra, dec=dec - 1.0, n=2),  # a new one
        _tile(0.96, ra=None, dec=None, n=3),  # no coordinates: cannot be matched
        _tile(0.10, ra=ra, dec=dec, n=4),  # below threshold: no alert even though known
    ]
    alerts = build_alerts(tiles, threshold=0.9, known=known, radius=5 * u.arcsec)
    assert [a.tile.external_id for a in alerts] == ["J0001", "J0002", "J0003"]
    first, second, third = alerts
    assert first.known and first.match is not None and first.match.name == row["name"]
    assert first.crossmatch()["match"]["name"] == row["name"]
    assert first.crossmatch()["known"] is True and first.crossmatch()["radius_arcsec"] == 5.0
    assert not second.known and second.crossmatch()["searched"] is True
    assert not third.known and third.crossmatch()["searched"] is False and third.catalog == ""
    create = first.create()
    assert create.tile_id == uuid.UUID(first.tile.tile_id) and create.kind == "lens"
    assert create.score == 0.99 and create.notification == first.slack_payload()


# -- what is sent -------------------------------------------------------------------------------
def _candidate(known_lenses: KnownLenses, *, known: bool) -> AlertCandidate:
    row = _lenscat_rows()[0]
    ra, dec = float(row["RA [deg]"]), float(row["DEC [deg]"])
    tile = _tile(0.973, ra=ra, dec=dec if known else dec - 1.0, n=7)
    (cand,) = build_alerts([tile], threshold=0.9, known=known_lenses, radius=5 * u.arcsec)
    return cand


def _texts(payload: dict[str, Any]) -> str:
    parts = [payload["text"]]
    for block in payload["blocks"]:
        if "text" in block:
            parts.append(block["text"]["text"])
        parts += [f["text"] for f in block.get("fields", [])]
        parts += [e["text"] for e in block.get("elements", [])]
    return "\n".join(parts)


@pytest.mark.parametrize("is_known", [True, False])
def test_slack_payload_shape(known: KnownLenses, is_known: bool) -> None:
    cand = _candidate(known, known=is_known)
    payload = cand.slack_payload()
    assert set(payload) == {"text", "blocks"} and isinstance(payload["text"], str)
    assert [b["type"] for b in payload["blocks"]] == ["header", "section", "context"]
    header = payload["blocks"][0]["text"]
    assert header["type"] == "plain_text" and len(header["text"]) <= 150
    fields = payload["blocks"][1]["fields"]
    assert 1 <= len(fields) <= 10 and all(f["type"] == "mrkdwn" and len(f["text"]) <= 2000 for f in fields)
    text = _texts(payload)
    t = cand.tile
    for needed in (t.external_id, t.survey, f"{t.ra:.5f}", "0.973", t.model_version, t.pixels_uri, t.tile_id):
        assert needed in text, needed
    if is_known:
        assert "known" in payload["text"].lower() and cand.match is not None and cand.match.name in text
    else:
        assert "(new)" in payload["text"] and "no known lens within 5″" in text


def test_slack_text_is_escaped() -> None:
    tile = _tile(0.95, ra=None, dec=None, n=1)
    tile = dataclasses.replace(tile, external_id="<!channel> & co")
    cand = AlertCandidate(tile=tile, threshold=0.9, radius_arcsec=5.0, catalog="")
    payload = cand.slack_payload()
    # the header is plain_text (never parsed for mentions); everything else is mrkdwn
    header = payload["blocks"][0]["text"]
    assert header["type"] == "plain_text" and "<!channel> & co" in header["text"]
    payload["blocks"] = payload["blocks"][1:]
    text = _texts(payload)
    assert "<!channel>" not in text and "&lt;!channel&gt; &amp; co" in text
    assert "no coordinates" in text


@pytest.mark.parametrize("is_known", [True, False])
def test_alert_message_round_trip(known: KnownLenses, is_known: bool) -> None:
    cand = _candidate(known, known=is_known)
    created = datetime(2026, 11, 28, 12, 30, 15, 123000, tzinfo=UTC)
    record = cand.message(alert_id=42, created_at=created)
    body = messages.encode("alert", record)
    back = messages.decode("alert", body, header=b"galsift.alert.v1")
    assert back == record
    assert messages.headers("alert") == [("schema", b"galsift.alert.v1")]
    assert back["known"] is is_known and back["alert_id"] == 42 and back["created_at"] == created
    if is_known:
        assert back["known_name"] == cand.match.name if cand.match else False
        assert back["known_separation_arcsec"] is not None and back["known_separation_arcsec"] < 1e-3
        assert back["known_type"] in {"galaxy", "group", "cluster"}
    else:
        assert back["known_name"] is None and back["known_separation_arcsec"] is None


def test_alert_message_without_coordinates_and_bad_records() -> None:
    tile = _tile(0.95, ra=None, dec=None, n=3)
    cand = AlertCandidate(tile=tile, threshold=0.9, radius_arcsec=5.0, catalog="")
    record = cand.message(alert_id=1, created_at=datetime.now(UTC))
    back = messages.decode("alert", messages.encode("alert", record))
    assert back["ra"] is None and back["dec"] is None and back["crossmatch_catalog"] == ""
    with pytest.raises(messages.MessageError):
        messages.encode("alert", {**record, "score": "high"})
    with pytest.raises(messages.MessageError):
        messages.decode("alert", messages.encode("alert", record), header=b"galsift.alert.v2")


def test_alert_messages_pair_rows_with_candidates(known: KnownLenses) -> None:
    cands = build_alerts(
        [_tile(0.95, n=1), _tile(0.96, n=2)], threshold=0.9, known=known, radius=5 * u.arcsec
    )
    now = datetime.now(UTC)
    row = AlertPublic(
        id=9,
        tile_id=uuid.UUID(cands[1].tile.tile_id),
        model_version=cands[1].tile.model_version,
        kind="lens",
        score=0.96,
        crossmatch=cands[1].crossmatch(),
        sent_at=None,
        created_at=now,
    )
    ((key, record),) = alert_messages(cands, [row])
    assert key == cands[1].tile.tile_id.encode() and record["alert_id"] == 9
    assert record["external_id"] == "J0002" and record["created_at"] == now


def test_webhook_target_hides_the_secret() -> None:
    url = "https://hooks.slack.com/services/T000/B000/XXXXSECRET"
    name = webhook_target(url)
    assert name.startswith("hooks.slack.com#") and "SECRET" not in name and "T000" not in name
    assert webhook_target(url) == name != webhook_target(url + "2")
    assert webhook_target("http://127.0.0.1:8080/hook").startswith("127.0.0.1:8080#")
    assert webhook_target("ops-channel") == "ops-channel"  # already a name
