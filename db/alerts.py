"""Alerts and their webhook outbox.

The detector writes an alert and one outbox row per webhook target in one transaction
(:func:`create_alerts`). ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` on the alerts' unique key
(tile, model version, kind) returns only alerts that did not exist, and only those get outbox
rows, so a replayed batch creates nothing and schedules no second delivery.

The notifier works the outbox: :func:`claim_due_deliveries` takes due rows with
``FOR UPDATE SKIP LOCKED`` and leases them (their ``next_attempt_at`` moves past the lease), so
two notifiers never hold the same delivery and one that died gives its rows back when the lease
runs out; :func:`record_delivery` stores the outcome. The HTTP call happens between the two,
outside any transaction, so a slow webhook holds no lock the detector could wait on.

Times are passed in (``now``) rather than read from the server, so the back-off and the hourly
rate limit can be tested without waiting; they default to the caller's clock.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Engine, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import Field, SQLModel

from db.models import Alert, AlertDelivery, AlertDeliveryPublic

#: the states of an outbox row
DELIVERY_STATES = ("pending", "sent", "failed")
#: first key of the advisory locks that serialise claims per target (second key: hash of target)
_CLAIM_LOCK_NS = 0x6A1E  # "alert"
#: longest error text kept per attempt
_MAX_ERROR = 2000


class AlertCreate(SQLModel):
    """An alert as the detector hands it over, with the body its webhooks will receive."""

    tile_id: uuid.UUID
    model_version: str = Field(max_length=128)
    kind: str = Field(max_length=64)
    score: float
    crossmatch: dict[str, Any] = Field(default_factory=dict)
    notification: dict[str, Any] = Field(
        default_factory=dict, description="JSON body posted to each webhook (kept in the outbox rows)"
    )

    @property
    def key(self) -> tuple[str, str, str]:
        """(tile id, model version, kind): what makes an alert unique."""
        return (str(self.tile_id), self.model_version, self.kind)


class AlertPublic(SQLModel):
    """A stored alert."""

    id: int
    tile_id: uuid.UUID
    model_version: str
    kind: str
    score: float
    crossmatch: dict[str, Any]
    sent_at: datetime | None = Field(description="first successful webhook delivery")
    created_at: datetime


class AlertListing(AlertPublic):
    """A stored alert with its tile's identity and its deliveries, as operators list them."""

    survey: str
    external_id: str
    ra: float | None
    dec: float | None
    pixels_uri: str
    deliveries: dict[str, int] = Field(description="outbox rows by state")


@dataclass(frozen=True)
class DeliveryClaim:
    """A delivery a notifier holds until its lease ends: post ``payload`` to ``target``."""

    id: int
    alert_id: int
    target: str
    #: attempts including this one
    attempts: int
    payload: dict[str, Any]


class CreatedAlerts(list[AlertPublic]):
    """The alerts a :func:`create_alerts` call created (a list), and in ``all`` every alert of the batch.

    ``all`` holds the new alerts and those that existed already (a replayed batch), in the order
    given, so a detector can publish the whole batch's alerts again after a crash between its
    commit and its publish, while the webhooks, fed from the outbox, are never called twice.
    """

    def __init__(self, created: Iterable[AlertPublic] = (), *, batch: Iterable[AlertPublic] = ()) -> None:
        super().__init__(created)
        #: every alert of the batch, new or existing, in the order given
        self.all = list(batch)


def webhook_target(url: str) -> str:
    """The name an outbox row gives a webhook: host plus a hash of the URL, never the URL.

    Slack-style webhook URLs carry their secret in the path; the name keeps it out of the
    database and the logs while staying stable, so the notifier can map it back to the
    configured URL. A name (anything that is not an http(s) URL) is returned as it is.
    """
    if not url.startswith(("http://", "https://")):
        return url
    parts = urlsplit(url)
    host = parts.hostname or "webhook"
    port = f":{parts.port}" if parts.port else ""
    return f"{host}{port}#{hashlib.sha256(url.encode()).hexdigest()[:12]}"


_ALERT_COLUMNS = ("id", "tile_id", "model_version", "kind", "score", "crossmatch", "sent_at", "created_at")


def create_alerts(
    engine: Engine, alerts: Sequence[AlertCreate], targets: Sequence[str], *, now: datetime | None = None
) -> CreatedAlerts:
    """Store alerts and schedule their deliveries, in one transaction.

    Parameters
    ----------
    engine
        The galsift database.
    alerts
        Alerts of one batch; repeated keys are stored once (the first one given).
    targets
        Webhook targets: names, or the configured URLs, which are stored as their
        :func:`webhook_target` names (the notifier finds them by those). Each new alert gets one
        pending outbox row per target.
    now
        When the deliveries become due (default: now).

    Returns
    -------
    CreatedAlerts
        The alerts this call created, in the order given; alerts that existed already (a
        replayed batch) are left out and get no new delivery. Its ``all`` has every alert of the
        batch, new or not.
    """
    unique: dict[tuple[str, str, str], AlertCreate] = {}
    for alert in alerts:
        unique.setdefault(alert.key, alert)
    if not unique:
        return CreatedAlerts()
    names = list(dict.fromkeys(webhook_target(t) for t in targets))
    table = Alert.__table__  # type: ignore[attr-defined]  # SQLModel sets it on table classes
    rows = [
        a.model_dump(include={"tile_id", "model_version", "kind", "score", "crossmatch"})
        for a in unique.values()
    ]
    stmt = (
        insert(table)
        .values(rows)
        .on_conflict_do_nothing(constraint="uq_alerts_tile_version_kind")
        .returning(*(table.c[c] for c in _ALERT_COLUMNS))
    )
    due = now or datetime.now(UTC)
    with engine.begin() as conn:
        created = {
            (str(r["tile_id"]), r["model_version"], r["kind"]): AlertPublic.model_validate(dict(r))
            for r in conn.execute(stmt).mappings()
        }
        outbox = [
            {
                "alert_id": alert.id,
                "target": target,
                "payload": unique[key].notification,
                "state": "pending",
                "attempts": 0,
                "next_attempt_at": due,
            }
            for key, alert in created.items()
            for target in names
        ]
        if outbox:
            conn.execute(
                insert(AlertDelivery.__table__)  # type: ignore[attr-defined]
                .values(outbox)
                .on_conflict_do_nothing(constraint="uq_alert_deliveries_alert_target")
            )
        existing: dict[tuple[str, str, str], AlertPublic] = {}
        if len(created) < len(unique):
            # the replayed part of the batch: read in the same transaction, so it is consistent
            wanted = [k for k in unique if k not in created]
            result = conn.execute(
                text(
                    f"SELECT {', '.join(_ALERT_COLUMNS)} FROM alerts WHERE (tile_id, model_version, kind) "
                    "IN (SELECT * FROM unnest(CAST(:t AS uuid[]), CAST(:m AS text[]), CAST(:k AS text[])))"
                ),
                {
                    "t": [uuid.UUID(k[0]) for k in wanted],
                    "m": [k[1] for k in wanted],
                    "k": [k[2] for k in wanted],
                },
            ).mappings()
            for r in result:
                existing[(str(r["tile_id"]), r["model_version"], r["kind"])] = AlertPublic.model_validate(
                    dict(r)
                )
    stored = {**existing, **created}
    return CreatedAlerts(
        (created[k] for k in unique if k in created), batch=(stored[k] for k in unique if k in stored)
    )


def alerts_for_tiles(
    engine: Engine, tile_ids: Sequence[str | uuid.UUID], *, model_version: str, kind: str
) -> list[AlertPublic]:
    """The stored alerts of these tiles by one model version and kind (new or from earlier runs).

    A detector that crashed after storing a batch's alerts but before publishing them finds them
    here on the replay, where :func:`create_alerts` returns nothing.
    """
    if not tile_ids:
        return []
    sql = text(
        f"SELECT {', '.join(_ALERT_COLUMNS)} FROM alerts WHERE tile_id = ANY(:ids) "
        "AND model_version = :mv AND kind = :kind ORDER BY id"
    )
    ids = [uuid.UUID(str(i)) for i in tile_ids]
    with engine.connect() as conn:
        result = conn.execute(sql, {"ids": ids, "mv": model_version, "kind": kind}).mappings()
        return [AlertPublic.model_validate(dict(r)) for r in result]


def claim_due_deliveries(
    engine: Engine,
    *,
    limit: int,
    now: datetime | None = None,
    targets: Sequence[str] | None = None,
    rate_per_hour: int | None = None,
    lease: timedelta = timedelta(minutes=5),
) -> list[DeliveryClaim]:
    """Take up to ``limit`` due pending deliveries for this notifier.

    Parameters
    ----------
    engine
        The galsift database.
    limit
        Most deliveries to claim.
    now
        The notifier's clock (default: now).
    targets
        Only these targets (the webhooks this notifier knows the URLs of); None: every target.
    rate_per_hour
        Most deliveries per target in any hour: deliveries sent in the last hour and those other
        notifiers hold count against it; the rest stay pending for a later claim.
    lease
        How long the claim holds: the delivery is not due again until then, so a notifier that
        died mid-call gives it back. Must exceed the time to post everything claimed.

    Returns
    -------
    list of DeliveryClaim
        Claimed deliveries with ``attempts`` already counted, oldest due first.
    """
    if limit < 1:
        return []
    now = now or datetime.now(UTC)
    params: dict[str, Any] = {"now": now, "since": now - timedelta(hours=1), "until": now + lease}
    claims: list[DeliveryClaim] = []
    with engine.begin() as conn:
        if targets is None:
            targets = [
                str(r[0])
                for r in conn.execute(
                    text(
                        "SELECT DISTINCT target FROM alert_deliveries "
                        "WHERE state = 'pending' AND next_attempt_at <= :now"
                    ),
                    params,
                )
            ]
        for target in sorted(set(targets)):
            room = limit - len(claims)
            if room <= 0:
                break
            p = {**params, "t": target}
            if rate_per_hour is not None:
                # count-then-claim must not interleave with another notifier's for the same target,
                # or both could take the last slot of the hour; a target being claimed by someone
                # else right now is skipped (like SKIP LOCKED), never waited for
                locked = conn.execute(
                    text("SELECT pg_try_advisory_xact_lock(CAST(:ns AS integer), hashtext(:t))"),
                    {**p, "ns": _CLAIM_LOCK_NS},
                ).scalar_one()
                if not locked:
                    continue
                used = conn.execute(_RATE_USED, p).scalar_one()
                room = min(room, rate_per_hour - int(used))
                if room <= 0:
                    continue
            rows = conn.execute(_CLAIM, {**p, "n": room}).mappings().all()
            claims.extend(
                DeliveryClaim(
                    id=int(r["id"]),
                    alert_id=int(r["alert_id"]),
                    target=str(r["target"]),
                    attempts=int(r["attempts"]),
                    payload=dict(r["payload"]),
                )
                for r in sorted(rows, key=lambda r: (r["due"], r["id"]))
            )
    return claims


#: a target's calls in the last hour: sent ones, and ones another notifier holds right now
_RATE_USED = text(
    "SELECT count(*) FROM alert_deliveries WHERE target = :t AND ("
    "(state = 'sent' AND sent_at > :since) OR "
    "(state = 'pending' AND claimed_at IS NOT NULL AND next_attempt_at > :now))"
)

#: lock a target's oldest due rows, skipping rows another transaction holds, and lease them
_CLAIM = text(
    "WITH due AS ("
    " SELECT id, next_attempt_at FROM alert_deliveries"
    " WHERE target = :t AND state = 'pending' AND next_attempt_at <= :now"
    " ORDER BY next_attempt_at, id LIMIT :n FOR UPDATE SKIP LOCKED) "
    "UPDATE alert_deliveries d SET attempts = d.attempts + 1, claimed_at = :now, next_attempt_at = :until "
    "FROM due WHERE d.id = due.id "
    "RETURNING d.id, d.alert_id, d.target, d.attempts, d.payload, due.next_attempt_at AS due"
)


def record_delivery(
    engine: Engine,
    delivery_id: int,
    *,
    ok: bool,
    status: int | None = None,
    error: str | None = None,
    next_attempt_at: datetime | None = None,
    attempt: int | None = None,
    now: datetime | None = None,
) -> str | None:
    """Store the outcome of one attempt.

    Parameters
    ----------
    engine
        The galsift database.
    delivery_id
        The claimed delivery.
    ok
        The webhook accepted the call: the delivery is ``sent`` (and the alert's ``sent_at`` set).
    status, error
        HTTP status and error text of the attempt, kept for operators.
    next_attempt_at
        When a failed attempt is retried; None gives up (state ``failed``).
    attempt
        The claim's ``attempts``; when given, an outcome from a claim whose lease ran out and was
        claimed again is ignored.
    now
        The notifier's clock (default: now).

    Returns
    -------
    str or None
        The new state, or None when the delivery was not pending (or not this claim's) any more.
    """
    now = now or datetime.now(UTC)
    table = AlertDelivery.__table__  # type: ignore[attr-defined]
    values: dict[str, Any] = {
        "last_status": status,
        "last_error": error[:_MAX_ERROR] if error else None,
        "claimed_at": None,
    }
    if ok:
        values.update(state="sent", sent_at=now)
    elif next_attempt_at is None:
        values.update(state="failed")
    else:
        values.update(state="pending", next_attempt_at=next_attempt_at)
    stmt = update(table).where(table.c.id == delivery_id, table.c.state == "pending")
    if attempt is not None:
        stmt = stmt.where(table.c.attempts == attempt)
    with engine.begin() as conn:
        alert_id = conn.execute(stmt.values(**values).returning(table.c.alert_id)).scalar_one_or_none()
        if alert_id is None:
            return None
        if ok:
            conn.execute(
                text("UPDATE alerts SET sent_at = :now WHERE id = :a AND sent_at IS NULL"),
                {"now": now, "a": alert_id},
            )
    return str(values["state"])


def release_deliveries(
    engine: Engine, claims: Sequence[DeliveryClaim], *, now: datetime | None = None
) -> int:
    """Make claimed deliveries due at ``now`` again, unless their outcome was recorded; returns how many.

    For a notifier whose round the database left before the outcomes were stored: without this
    the deliveries would wait for their lease (a whole batch of calls long). One that was posted
    comes again as its next attempt, which the receiver drops by its ``X-Galsift-Delivery`` id.
    ``now`` is the notifier's clock, as :func:`claim_due_deliveries` compares with it.
    """
    if not claims:
        return 0
    with engine.begin() as conn:
        result = conn.execute(
            text(
                "UPDATE alert_deliveries d SET next_attempt_at = :now, claimed_at = NULL "
                "FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS integer[])) AS c(id, attempts) "
                "WHERE d.id = c.id AND d.attempts = c.attempts AND d.state = 'pending'"
            ),
            {
                "ids": [c.id for c in claims],
                "attempts": [c.attempts for c in claims],
                "now": now or datetime.now(UTC),
            },
        )
        return int(result.rowcount)


def recent_alerts(engine: Engine, *, limit: int = 50, kind: str | None = None) -> list[AlertListing]:
    """The newest alerts with their tiles and delivery states, newest first (dashboard, CLI)."""
    where = "WHERE a.kind = :kind" if kind is not None else ""
    sql = text(
        "SELECT a.id, a.tile_id, a.model_version, a.kind, a.score, a.crossmatch, a.sent_at, a.created_at, "
        "t.survey, t.external_id, t.ra, t.dec, t.pixels_uri, "
        "COALESCE((SELECT jsonb_object_agg(s.state, s.n) FROM (SELECT state, count(*) AS n "
        "FROM alert_deliveries d WHERE d.alert_id = a.id GROUP BY state) s), '{}'::jsonb) AS deliveries "
        f"FROM alerts a JOIN tiles t ON t.id = a.tile_id {where} "
        "ORDER BY a.created_at DESC, a.id DESC LIMIT :n"
    )
    with engine.connect() as conn:
        result = conn.execute(sql, {"n": limit, "kind": kind}).mappings()
        return [AlertListing.model_validate(dict(r)) for r in result]


def deliveries(engine: Engine, *, alert_id: int | None = None, limit: int = 100) -> list[AlertDeliveryPublic]:
    """Outbox rows, newest first, optionally of one alert."""
    where = "WHERE alert_id = :a" if alert_id is not None else ""
    sql = text(f"SELECT * FROM alert_deliveries {where} ORDER BY id DESC LIMIT :n")
    with engine.connect() as conn:
        result = conn.execute(sql, {"a": alert_id, "n": limit}).mappings()
        return [AlertDeliveryPublic.model_validate(dict(r)) for r in result]


def delivery_counts(engine: Engine) -> dict[str, dict[str, int]]:
    """Outbox rows by target and state, e.g. ``{"hooks.slack.com#1a2b": {"sent": 12, "pending": 1}}``."""
    sql = text("SELECT target, state, count(*) FROM alert_deliveries GROUP BY target, state ORDER BY 1, 2")
    out: dict[str, dict[str, int]] = {}
    with engine.connect() as conn:
        for target, state, n in conn.execute(sql):
            out.setdefault(str(target), {})[str(state)] = int(n)
    return out


__all__ = [
    "DELIVERY_STATES",
    "AlertCreate",
    "AlertListing",
    "AlertPublic",
    "CreatedAlerts",
    "DeliveryClaim",
    "alerts_for_tiles",
    "claim_due_deliveries",
    "create_alerts",
    "deliveries",
    "delivery_counts",
    "recent_alerts",
    "record_delivery",
    "webhook_target",
]
