"""Lens-candidate alerts: which scored tiles become alerts, their cross-match, and what is sent.

Pure functions and value objects; the only I/O is reading the known-lens catalogue once. The
detector service turns scored tiles into :class:`AlertCandidate` objects with
:func:`build_alerts`, stores them with ``db.alerts.create_alerts`` (alert rows and their webhook
outbox rows in one transaction; a replay creates nothing) and publishes
:meth:`AlertCandidate.message` for the stored rows on ``alerts.lens``. The notifier
(:mod:`detectors.notify`) posts the Slack-compatible body kept in the outbox.

Known lenses come from ``lenscat`` (Vujeva et al. 2024, a community catalogue of ~33k known
strong lenses). Its package ``__init__`` builds an astropy table through ligo.skymap, matplotlib
and healpy (~6 s, and a NumPy deprecation warning at import), none of which a cross-match needs,
so the CSV file the package ships is read directly, the way ``lenscat.catalog`` reads it
(``name``, ``RA [deg]``, ``DEC [deg]``, ``zlens``, ``type``, ``grading``, ``ref``).
"""

from __future__ import annotations

import csv
import importlib.metadata
import math
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord

from db.alerts import AlertCreate, AlertPublic, webhook_target
from db.models import TilePublic

#: the alert kind of lens candidates (``alerts.kind``)
LENS_KIND = "lens"
#: the catalogue file inside the lenscat distribution
LENSCAT_FILE = "lenscat/data/catalog.csv"
#: catalogue columns kept with a match, when the catalogue has them
EXTRA_COLUMNS = ("type", "grading", "zlens")

_UNIT_IN_NAME = re.compile(r"^(?P<name>.*?)\s*\[(?P<unit>[A-Za-z0-9_]+)\]$")


class CatalogueError(RuntimeError):
    """The known-lens catalogue cannot be found or read."""


# -- known lenses ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class KnownLens:
    """The nearest known lens within the cross-match radius."""

    name: str
    separation: u.Quantity
    ra: float
    dec: float
    type: str | None = None
    grading: str | None = None
    zlens: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The match as JSON-ready values (separation in arcsec)."""
        return {
            "name": self.name,
            "separation_arcsec": round(float(self.separation.to_value(u.arcsec)), 4),
            "ra": self.ra,
            "dec": self.dec,
            "type": self.type,
            "grading": self.grading,
            "zlens": self.zlens,
        }


def _radius_arcsec(radius: Any) -> float:
    """A cross-match radius as arcseconds; refuses a bare number (its unit would be a guess)."""
    if not isinstance(radius, u.Quantity):
        raise TypeError(f"radius must be an astropy angle such as 5 * u.arcsec, got {radius!r}")
    value = float(radius.to_value(u.arcsec))  # raises UnitConversionError for a non-angle
    if not value > 0:
        raise ValueError(f"radius must be positive, got {radius}")
    return value


def _degrees(value: Any) -> np.ndarray:
    """Coordinates as float degrees; a bare number is taken to be degrees (the tiles table's unit)."""
    if isinstance(value, u.Quantity):
        return np.atleast_1d(value.to_value(u.deg)).astype(float)
    return np.atleast_1d(np.asarray(value, dtype=float))


class KnownLenses:
    """A catalogue of known lenses to cross-match candidates against.

    Parameters
    ----------
    names
        Catalogue names, one per entry.
    ra, dec
        ICRS coordinates in degrees (or astropy angles).
    columns
        Further string columns kept with a match (``type``, ``grading``, ``zlens``).
    source
        The catalogue and its version, recorded with every alert (e.g. ``lenscat 1.1.3``).
    """

    def __init__(
        self,
        names: Sequence[str],
        ra: Any,
        dec: Any,
        *,
        columns: Mapping[str, Sequence[str | None]] | None = None,
        source: str = "",
    ) -> None:
        ra_deg, dec_deg = _degrees(ra), _degrees(dec)
        if not len(names) == len(ra_deg) == len(dec_deg):
            raise ValueError(f"{len(names)} names but {len(ra_deg)} RA and {len(dec_deg)} Dec values")
        self.names = [str(n) for n in names]
        self.ra = ra_deg
        self.dec = dec_deg
        self.columns = {k: list(v) for k, v in (columns or {}).items()}
        self.source = source
        # one SkyCoord for the whole catalogue: astropy keeps the KD-tree it builds on the first
        # match on this object, so later matches are a tree query each
        self._coords = SkyCoord(ra=ra_deg * u.deg, dec=dec_deg * u.deg, frame="icrs")

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def from_csv(cls, path: Path, *, source: str = "") -> KnownLenses:
        """Read a catalogue CSV with ``name`` and ``RA [unit]``/``DEC [unit]`` columns (lenscat's layout).

        Raises
        ------
        CatalogueError
            If the file is missing or has no name/RA/Dec columns.
        """
        try:
            with path.open(newline="", encoding="utf-8") as fh:
                reader = csv.reader(fh)
                header = next(reader)
                rows = list(reader)
        except (OSError, StopIteration, csv.Error, UnicodeDecodeError) as exc:
            raise CatalogueError(f"cannot read the known-lens catalogue {path}: {exc!r}") from exc
        columns: dict[str, tuple[int, str | None]] = {}
        for i, raw in enumerate(header):
            m = _UNIT_IN_NAME.match(raw.strip())
            key, unit = (m["name"], m["unit"]) if m else (raw.strip(), None)
            columns[key.lower()] = (i, unit)
        missing = {"name", "ra", "dec"} - columns.keys()
        if missing:
            raise CatalogueError(f"{path}: no {', '.join(sorted(missing))} column in {header}")

        def angles(key: str) -> np.ndarray:
            i, unit = columns[key]
            values = np.array([float(r[i]) for r in rows], dtype=float)
            # lenscat gives the unit in the column name; it is degrees today, but convert anyway
            return (values * u.Unit(unit or "deg")).to_value(u.deg)

        try:
            ra, dec = angles("ra"), angles("dec")
        except (ValueError, IndexError) as exc:
            raise CatalogueError(f"{path}: unreadable coordinates: {exc}") from exc
        extra = {k: [r[columns[k][0]] or None for r in rows] for k in EXTRA_COLUMNS if k in columns}
        names = [r[columns["name"][0]] for r in rows]
        return cls(names, ra, dec, columns=extra, source=source)

    @classmethod
    def from_lenscat(cls) -> KnownLenses:
        """The catalogue shipped by the installed ``lenscat`` package (read once per process).

        Raises
        ------
        CatalogueError
            If lenscat is not installed or its catalogue file is not where 1.x keeps it.
        """
        return _lenscat()

    def match(self, ra: Any, dec: Any, *, radius: u.Quantity) -> KnownLens | None:
        """The nearest known lens within ``radius`` of one position, or None.

        Parameters
        ----------
        ra, dec
            ICRS position, astropy angles or degrees.
        radius
            Cross-match radius, an astropy angle (``5 * u.arcsec``).
        """
        return self.match_many(ra, dec, radius=radius)[0]

    def match_many(self, ra: Any, dec: Any, *, radius: u.Quantity) -> list[KnownLens | None]:
        """:meth:`match` for many positions at once (one catalogue tree query).

        Positions that are NaN (a tile without coordinates) match nothing.
        """
        limit = _radius_arcsec(radius)
        ra_deg, dec_deg = _degrees(ra), _degrees(dec)
        if ra_deg.shape != dec_deg.shape:
            raise ValueError(f"{ra_deg.size} RA values but {dec_deg.size} Dec values")
        out: list[KnownLens | None] = [None] * ra_deg.size
        ok = np.flatnonzero(np.isfinite(ra_deg) & np.isfinite(dec_deg))
        if not len(self) or not ok.size:
            return out
        coords = SkyCoord(ra=ra_deg[ok] * u.deg, dec=dec_deg[ok] * u.deg, frame="icrs")
        idx, sep2d, _ = coords.match_to_catalog_sky(self._coords)
        for pos, j, sep in zip(ok, np.atleast_1d(idx), np.atleast_1d(sep2d.to(u.arcsec)), strict=True):
            if sep.to_value(u.arcsec) <= limit:
                j = int(j)
                extra = {k: self.columns[k][j] for k in EXTRA_COLUMNS if k in self.columns}
                out[int(pos)] = KnownLens(
                    name=self.names[j],
                    separation=sep,
                    ra=float(self.ra[j]),
                    dec=float(self.dec[j]),
                    **extra,
                )
        return out


@cache
def _lenscat() -> KnownLenses:
    try:
        dist = importlib.metadata.distribution("lenscat")
    except importlib.metadata.PackageNotFoundError as exc:
        raise CatalogueError("the lenscat package is not installed (pip install 'lenscat>=1.1,<2')") from exc
    for f in dist.files or []:
        if str(f).replace("\\", "/").endswith(LENSCAT_FILE):
            return KnownLenses.from_csv(Path(str(dist.locate_file(f))), source=f"lenscat {dist.version}")
    raise CatalogueError(f"lenscat {dist.version} ships no {LENSCAT_FILE}")


# -- which tiles become alerts ------------------------------------------------------------------
@dataclass(frozen=True)
class ScoredTile:
    """A tile with one detector score, as the detector service has it after scoring."""

    tile_id: str
    survey: str
    external_id: str
    ra: float | None
    dec: float | None
    score: float
    model_version: str
    detector: str
    pixels_uri: str

    @classmethod
    def from_tile(cls, tile: TilePublic, *, score: float, model_version: str, detector: str) -> ScoredTile:
        """From a stored tile (``db.repo.tiles_by_id``) and its score."""
        return cls(
            tile_id=str(tile.id),
            survey=tile.survey,
            external_id=tile.external_id,
            ra=tile.ra,
            dec=tile.dec,
            score=float(score),
            model_version=model_version,
            detector=detector,
            pixels_uri=tile.pixels_uri,
        )


def select_alerts(tiles: Iterable[ScoredTile], *, threshold: float) -> list[ScoredTile]:
    """The tiles whose score reaches ``threshold``, one per (tile, model version), in input order.

    A tile scored twice in one batch (a replayed record next to the original) keeps its highest
    score; NaN never alerts.
    """
    best: dict[tuple[str, str], ScoredTile] = {}
    for tile in tiles:
        if not (math.isfinite(tile.score) and tile.score >= threshold):
            continue
        key = (tile.tile_id, tile.model_version)
        if key not in best or tile.score > best[key].score:
            best[key] = tile
    return list(best.values())


@dataclass(frozen=True)
class AlertCandidate:
    """A tile that crossed the threshold, with its cross-match: everything an alert says."""

    tile: ScoredTile
    threshold: float
    radius_arcsec: float
    #: catalogue matched against (``lenscat 1.1.3``); empty when the tile has no coordinates
    catalog: str
    match: KnownLens | None = None
    kind: str = LENS_KIND

    @property
    def known(self) -> bool:
        """Whether a known lens lies within the cross-match radius."""
        return self.match is not None

    @property
    def key(self) -> tuple[str, str, str]:
        """(tile id, model version, kind): what makes an alert unique."""
        return (self.tile.tile_id, self.tile.model_version, self.kind)

    def crossmatch(self) -> dict[str, Any]:
        """The cross-match as stored in ``alerts.crossmatch``."""
        doc: dict[str, Any] = {
            "known": self.known,
            "catalog": self.catalog,
            "radius_arcsec": self.radius_arcsec,
            "searched": bool(self.catalog),
            "detector": self.tile.detector,
            "threshold": self.threshold,
        }
        if self.match is not None:
            doc["match"] = self.match.as_dict()
        return doc

    def create(self) -> AlertCreate:
        """The row to hand to ``db.alerts.create_alerts`` (with the webhook body for its outbox)."""
        return AlertCreate(
            tile_id=uuid.UUID(self.tile.tile_id),
            model_version=self.tile.model_version,
            kind=self.kind,
            score=self.tile.score,
            crossmatch=self.crossmatch(),
            notification=self.slack_payload(),
        )

    def message(self, *, alert_id: int, created_at: datetime) -> dict[str, Any]:
        """The ``alert.v1`` record for ``alerts.lens`` once the alert row exists."""
        m = self.match
        return {
            "alert_id": int(alert_id),
            "kind": self.kind,
            "tile_id": self.tile.tile_id,
            "survey": self.tile.survey,
            "external_id": self.tile.external_id,
            "ra": self.tile.ra,
            "dec": self.tile.dec,
            "score": float(self.tile.score),
            "threshold": float(self.threshold),
            "model_version": self.tile.model_version,
            "detector": self.tile.detector,
            "pixels_uri": self.tile.pixels_uri,
            "known": self.known,
            "known_name": m.name if m else None,
            "known_separation_arcsec": float(m.separation.to_value(u.arcsec)) if m else None,
            "known_type": m.type if m else None,
            "known_grading": m.grading if m else None,
            "crossmatch_catalog": self.catalog,
            "crossmatch_radius_arcsec": float(self.radius_arcsec),
            "created_at": created_at,
        }

    def slack_payload(self) -> dict[str, Any]:
        """A Slack incoming-webhook body (``text`` fallback plus Block Kit ``blocks``)."""
        t = self.tile
        where = _position(t.ra, t.dec)
        status = self._status()
        text = (
            f"Lens candidate ({'known' if self.known else 'new'}): {t.survey}/{t.external_id} at {where}, "
            f"score {t.score:.3f} ≥ {self.threshold:g} ({t.detector}, model {t.model_version}). {status}"
        )
        fields = [
            ("Tile", f"{t.survey}/{t.external_id}"),
            ("Coordinates (ICRS)", where),
            ("Score", f"{t.score:.4f} (threshold {self.threshold:g})"),
            ("Known lens", status),
            ("Model version", f"{t.model_version} ({t.detector})"),
            ("Cutout", f"`{t.pixels_uri}`"),
        ]
        return {
            "text": _escape(text),
            "blocks": [
                {
                    "type": "header",
                    "text": {
                        "type": "plain_text",
                        # Slack refuses header text over 150 characters
                        "text": f"{'Known' if self.known else 'New'} lens candidate: {t.external_id}"[:150],
                    },
                },
                {
                    "type": "section",
                    "fields": [
                        {"type": "mrkdwn", "text": f"*{name}*\n{_escape(value)}"[:2000]}
                        for name, value in fields
                    ],
                },
                {
                    "type": "context",
                    "elements": [{"type": "mrkdwn", "text": _escape(f"tile {t.tile_id} · kind {self.kind}")}],
                },
            ],
        }

    def _status(self) -> str:
        if self.match is not None:
            m = self.match
            details = ", ".join(v for v in (m.type, m.grading) if v)
            sep = m.separation.to_value(u.arcsec)
            return (
                f"known: {m.name} at {sep:.2f}″" + (f" ({details})" if details else "") + f", {self.catalog}"
            )
        if not self.catalog:
            return "not cross-matched (no coordinates)"
        return f"new: no known lens within {self.radius_arcsec:g}″ in {self.catalog}"


def _position(ra: float | None, dec: float | None) -> str:
    if ra is None or dec is None:
        return "no coordinates"
    return f"RA {ra:.5f}°, Dec {dec:+.5f}°"


def _escape(text: str) -> str:
    # Slack mrkdwn treats these three as control characters (links, mentions)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def build_alerts(
    tiles: Iterable[ScoredTile],
    *,
    threshold: float,
    known: KnownLenses,
    radius: u.Quantity,
    kind: str = LENS_KIND,
) -> list[AlertCandidate]:
    """Select the tiles that become alerts and cross-match them against ``known``.

    Parameters
    ----------
    tiles
        A batch of scored tiles.
    threshold
        Alerting score (``Settings.alert_threshold``): a score >= threshold alerts.
    known
        Known lenses (``KnownLenses.from_lenscat()``).
    radius
        Cross-match radius, an astropy angle (``settings.crossmatch_radius_arcsec * u.arcsec``).
    kind
        The alert kind stored in ``alerts.kind``.
    """
    radius_arcsec = _radius_arcsec(radius)
    chosen = select_alerts(tiles, threshold=threshold)
    if not chosen:
        return []
    nan = float("nan")
    ra = np.array([nan if t.ra is None else t.ra for t in chosen], dtype=float)
    dec = np.array([nan if t.dec is None else t.dec for t in chosen], dtype=float)
    matches = known.match_many(ra, dec, radius=radius)
    return [
        AlertCandidate(
            tile=t,
            threshold=threshold,
            radius_arcsec=radius_arcsec,
            catalog=known.source if t.ra is not None and t.dec is not None else "",
            match=m,
            kind=kind,
        )
        for t, m in zip(chosen, matches, strict=True)
    ]


def alert_messages(
    candidates: Iterable[AlertCandidate], rows: Iterable[AlertPublic]
) -> list[tuple[bytes, dict[str, Any]]]:
    """(Kafka key, ``alert.v1`` record) for each stored alert row that has a candidate.

    ``rows`` are what ``db.alerts.create_alerts`` returned (new alerts) or, to re-publish after a
    crash between the database commit and the publish, ``db.alerts.alerts_for_tiles``. The key is
    the tile id, so every alert of a tile lands in one partition, in order.
    """
    by_key = {c.key: c for c in candidates}
    out: list[tuple[bytes, dict[str, Any]]] = []
    for row in rows:
        cand = by_key.get((str(row.tile_id), row.model_version, row.kind))
        if cand is not None and row.id is not None:
            out.append((cand.tile.tile_id.encode(), cand.message(alert_id=row.id, created_at=row.created_at)))
    return out


__all__ = [
    "LENS_KIND",
    "AlertCandidate",
    "CatalogueError",
    "KnownLens",
    "KnownLenses",
    "ScoredTile",
    "alert_messages",
    "build_alerts",
    "select_alerts",
    "webhook_target",
]
