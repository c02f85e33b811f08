"""Reads and writes of the saved-search watcher: scoring inputs, notifications, webhook claims.

The watcher (:mod:`hitl.service`) scores each newly embedded tile with every active saved search
of the tile's model version and stores a row in ``search_notifications`` for every score at or
above the search's threshold. Three rules shape the SQL here:

- **new tiles only**: a search notifies about tiles that *arrived* (``tiles.ingested_at``, kept
  on re-ingest) at or after it was saved. The tiles a scientist saw while refining the search,
  a re-embedding (``embeddings.created_at`` moves on every upsert) and a backfill of an old
  survey are never news;
- **idempotent**: :func:`store_notifications` inserts with ``ON CONFLICT DO NOTHING`` on the
  unique (search, tile) and returns only the rows it created, so a replayed batch adds nothing
  and schedules no second webhook call. It joins the *current* saved searches, so a search
  deleted or deactivated since the watcher loaded it gets nothing;
- **a webhook call is claimed before it is made**: :func:`claim_webhook` moves one due
  ``pending`` row to ``sending`` (counting the attempt) with ``FOR UPDATE SKIP LOCKED`` and
  commits before the call, so two watchers never post one notification, and a watcher that dies
  during the call leaves it ``sending``. The claimer also holds a PostgreSQL session advisory
  lock on the row until it has recorded the outcome; a lock that can be taken on a ``sending``
  row therefore means its claimer is gone, and :func:`sweep_interrupted` gives the row back
  (``pending``): the call may have arrived, so it is made again as the next attempt of the same
  notification id (at least once, like the alert outbox; the receiver drops the repeat).

``search_notifications`` has no next-attempt column: a failed call is due again on a schedule
anchored at the notification's ``created_at`` (``schedule[attempts]`` seconds after it: the
cumulative back-off), which every watcher computes the same way.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, text

#: first key of the advisory locks held on ``sending`` rows (the second is the notification id)
WEBHOOK_LOCK_NS = 0x5EA7  # "seat": distinct from db.alerts' claim lock

#: webhook states of a notification (None: its search has no webhook)
WEBHOOK_STATES = ("pending", "sending", "sent", "failed")

_MAX_ERROR = 2000

# session-level advisory locks on (namespace, notification id); the casts pick the (int4, int4) form
_LOCK = text("SELECT pg_advisory_lock(CAST(:ns AS integer), CAST(:id AS integer))")
_TRY_LOCK = text("SELECT pg_try_advisory_lock(CAST(:ns AS integer), CAST(:id AS integer))")
_UNLOCK = text("SELECT pg_advisory_unlock(CAST(:ns AS integer), CAST(:id AS integer))")


@dataclass(frozen=True)
class WatchVectors:
    """Embeddings of one model version with their tiles' arrival times, in matching order."""

    tile_ids: list[uuid.UUID]
    embeddings: np.ndarray
    ingested_at: list[datetime]

    def __len__(self) -> int:
        return len(self.tile_ids)


def _array(value: Any) -> np.ndarray:
    # pgvector's psycopg adapter returns numpy arrays, or its Vector type in newer releases
    return np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value, dtype=np.float32)


def _watch_vectors(rows: Sequence[Any]) -> WatchVectors:
    if not rows:
        return WatchVectors([], np.zeros((0, 0), np.float32), [])
    return WatchVectors(
        [r[0] for r in rows], np.stack([_array(r[1]) for r in rows]).astype(np.float32), [r[2] for r in rows]
    )


def embeddings_to_watch(engine: Engine, model_version: str, tile_ids: Sequence[uuid.UUID]) -> WatchVectors:
    """The ``model_version`` embeddings of ``tile_ids`` with each tile's ``ingested_at``.

    Tiles without such an embedding (deleted since it was announced) are left out.
    """
    if not tile_ids:
        return _watch_vectors([])
    with engine.connect() as c:
        rows = c.execute(
            text(
                "SELECT e.tile_id, e.embedding, t.ingested_at FROM embeddings e "
                "JOIN tiles t ON t.id = e.tile_id "
                "WHERE e.model_version = :mv AND e.tile_id = ANY(:ids) ORDER BY e.tile_id"
            ),
            {"mv": model_version, "ids": list(tile_ids)},
        ).all()
    return _watch_vectors(rows)


def recent_embeddings(
    engine: Engine, model_version: str, *, arrived_since: datetime, within_s: float
) -> WatchVectors:
    """``model_version`` embeddings of the tiles that arrived since ``arrived_since`` and in the last seconds.

    What a watcher scores when it first sees a saved search: tiles that a watcher with an older
    view of the searches may have passed over in the moments after the search was saved. The
    ``within_s`` bound keeps the query on the newest tiles (index on ``tiles.ingested_at``)
    however old the search is.
    """
    with engine.connect() as c:
        rows = c.execute(
            text(
                "SELECT e.tile_id, e.embedding, t.ingested_at FROM tiles t "
                "JOIN embeddings e ON e.tile_id = t.id AND e.model_version = :mv "
                "WHERE t.ingested_at >= greatest(CAST(:since AS timestamptz), "
                "now() - make_interval(secs => :within)) ORDER BY t.id"
            ),
            {"mv": model_version, "since": arrived_since, "within": float(within_s)},
        ).all()
    return _watch_vectors(rows)


@dataclass(frozen=True)
class NewNotification:
    """A notification row that :func:`store_notifications` created."""

    id: int
    saved_search_id: int
    tile_id: uuid.UUID
    #: ``pending`` when its search has a webhook, else None
    webhook_state: str | None


def store_notifications(
    engine: Engine,
    rows: Sequence[tuple[int, uuid.UUID, float, int]],
) -> list[NewNotification]:
    """Store notifications ``(saved_search_id, tile_id, score, learner_version)``; replays add nothing.

    Only searches that still exist and are active get rows, and a row's webhook is ``pending``
    exactly when its search has a ``webhook_url`` at insert time.

    Returns
    -------
    list of NewNotification
        The rows created by this call (none for a replayed batch).
    """
    if not rows:
        return []
    sql = text(
        "INSERT INTO search_notifications "
        "(saved_search_id, tile_id, score, learner_version, webhook_state, webhook_attempts) "
        "SELECT u.sid, u.tid, u.score, u.lv, "
        "CASE WHEN coalesce(s.webhook_url, '') <> '' THEN 'pending' END, 0 "
        "FROM unnest(CAST(:sid AS integer[]), CAST(:tid AS uuid[]), CAST(:score AS float8[]), "
        "CAST(:lv AS integer[])) AS u(sid, tid, score, lv) "
        "JOIN saved_searches s ON s.id = u.sid AND s.active "
        "JOIN tiles t ON t.id = u.tid "
        "ON CONFLICT ON CONSTRAINT uq_search_notifications DO NOTHING "
        "RETURNING id, saved_search_id, tile_id, webhook_state"
    )
    params = {
        "sid": [int(r[0]) for r in rows],
        "tid": [uuid.UUID(str(r[1])) for r in rows],
        "score": [float(r[2]) for r in rows],
        "lv": [int(r[3]) for r in rows],
    }
    with engine.begin() as c:
        created = c.execute(sql, params).all()
    return [NewNotification(int(r[0]), int(r[1]), r[2], r[3]) for r in created]


# -- webhook delivery ---------------------------------------------------------------------------
@dataclass(frozen=True)
class WebhookClaim:
    """A notification one watcher is posting: its attempt number, where to, and what."""

    id: int
    #: attempts including this one
    attempts: int
    webhook_url: str | None
    payload: dict[str, Any]


_CLAIM = text(
    "WITH due AS ("
    " SELECT n.id FROM search_notifications n"
    " WHERE n.webhook_state = 'pending' AND n.id <> ALL(:ex)"
    "  AND n.created_at + make_interval(secs =>"
    "   (CAST(:schedule AS float8[]))[least(n.webhook_attempts, :last) + 1]) <= now()"
    " ORDER BY n.id LIMIT 1 FOR UPDATE OF n SKIP LOCKED) "
    "UPDATE search_notifications n SET webhook_state = 'sending', webhook_attempts = n.webhook_attempts + 1 "
    "FROM due, saved_searches s, tiles t "
    "WHERE n.id = due.id AND s.id = n.saved_search_id AND t.id = n.tile_id "
    "RETURNING n.id, n.webhook_attempts, s.webhook_url, n.saved_search_id, s.name, s.owner, s.concept, "
    "s.model_version, n.tile_id, t.survey, t.external_id, t.ra, t.dec, t.pixels_uri, n.score, "
    "n.learner_version, n.created_at, t.ingested_at"
)


def claim_webhook(
    conn: Connection, *, schedule: Sequence[float], exclude: Sequence[int] = ()
) -> WebhookClaim | None:
    """Claim the oldest due ``pending`` notification for a webhook call, or None.

    Runs and commits its own transaction on ``conn``, and leaves ``conn`` holding the session
    advisory lock of the claimed row: the caller must keep using ``conn`` for
    :func:`record_webhook` and release the lock with :func:`release_webhook`.

    Parameters
    ----------
    conn
        A connection the caller holds until the outcome is recorded (no transaction open).
    schedule
        ``schedule[k]``: seconds after a notification's creation when its attempt ``k + 1`` is
        due (``schedule[0]`` is normally 0); attempts beyond its length use its last entry.
    exclude
        Notification ids this caller will not take now (its own back-off, e.g. ``Retry-After``).
    """
    if not schedule:
        raise ValueError("the schedule needs at least one entry")
    with conn.begin():
        row = (
            conn.execute(
                _CLAIM,
                {"schedule": [float(s) for s in schedule], "last": len(schedule) - 1, "ex": list(exclude)},
            )
            .mappings()
            .first()
        )
        if row is None:
            return None
        # taken inside the claim's transaction, so no sweeper ever sees this row 'sending' unlocked
        conn.execute(_LOCK, {"ns": WEBHOOK_LOCK_NS, "id": row["id"]})
    payload = {
        "notification_id": int(row["id"]),
        "saved_search": {
            "id": int(row["saved_search_id"]),
            "name": row["name"],
            "owner": row["owner"],
            "concept": row["concept"],
            "model_version": row["model_version"],
            "learner_version": int(row["learner_version"]),
        },
        "tile": {
            "id": str(row["tile_id"]),
            "survey": row["survey"],
            "external_id": row["external_id"],
            "ra": row["ra"],
            "dec": row["dec"],
            "pixels_uri": row["pixels_uri"],
            "ingested_at": row["ingested_at"].isoformat(),
        },
        "score": float(row["score"]),
        "created_at": row["created_at"].isoformat(),
    }
    position = "" if row["ra"] is None else f" at RA {row['ra']:.5f}, Dec {row['dec']:+.5f}"
    # Slack-compatible incoming webhooks show "text"; other receivers read the structured fields
    payload["text"] = (
        f"galsift: new match for saved search '{row['name']}' ({row['owner']}): "
        f"{row['survey']}/{row['external_id']}{position}, score {float(row['score']):.3f}"
    )
    return WebhookClaim(int(row["id"]), int(row["webhook_attempts"]), row["webhook_url"], payload)


def record_webhook(conn: Connection, claim: WebhookClaim, *, state: str, error: str | None = None) -> bool:
    """Store the outcome of a claimed call: ``sent``, ``pending`` (to retry) or ``failed``.

    Returns
    -------
    bool
        False when the row was not this claim's any more (swept after a lost connection).
    """
    if state not in ("sent", "pending", "failed"):
        raise ValueError(f"not an outcome: {state}")
    with conn.begin():
        done = conn.execute(
            text(
                "UPDATE search_notifications SET webhook_state = :state, webhook_error = :err "
                "WHERE id = :id AND webhook_state = 'sending' AND webhook_attempts = :a RETURNING id"
            ),
            {
                "state": state,
                "err": error[:_MAX_ERROR] if error else None,
                "id": claim.id,
                "a": claim.attempts,
            },
        ).first()
    return done is not None


def release_webhook(conn: Connection, claim: WebhookClaim) -> None:
    """Release the advisory lock :func:`claim_webhook` left on ``conn``."""
    with conn.begin():
        conn.execute(_UNLOCK, {"ns": WEBHOOK_LOCK_NS, "id": claim.id})


def sweep_interrupted(conn: Connection) -> list[int]:
    """Give back the ``sending`` notifications whose watcher is gone; returns their ids.

    A claimer holds its row's advisory lock until it has recorded the outcome, and PostgreSQL
    drops the lock with the claimer's connection; a lock this call can take therefore belongs to
    a watcher that died during the call. The call may or may not have arrived, so it is made
    again (``pending``, due by its attempt's schedule): delivery is at least once, like the alert
    outbox's, and the repeat carries the same ``X-Galsift-Notification`` id with the next
    ``X-Galsift-Attempt``, so the receiver can drop it. ``conn`` must hold no webhook lock itself
    (advisory locks are re-entrant per session).
    """
    swept: list[int] = []
    with conn.begin():
        rows = conn.execute(
            text("SELECT id, webhook_attempts FROM search_notifications WHERE webhook_state = 'sending'")
        ).all()
    for nid, attempts in rows:
        with conn.begin():
            got = conn.execute(_TRY_LOCK, {"ns": WEBHOOK_LOCK_NS, "id": nid}).scalar_one()
        if not got:
            continue
        try:
            with conn.begin():
                done = conn.execute(
                    text(
                        "UPDATE search_notifications SET webhook_state = 'pending', webhook_error = :err "
                        "WHERE id = :id AND webhook_state = 'sending' AND webhook_attempts = :a RETURNING id"
                    ),
                    {
                        "id": nid,
                        "a": attempts,
                        "err": f"interrupted: the watcher stopped during attempt {attempts}; "
                        "posted again (the call may have arrived)",
                    },
                ).first()
            if done is not None:
                swept.append(int(nid))
        finally:
            with conn.begin():
                conn.execute(_UNLOCK, {"ns": WEBHOOK_LOCK_NS, "id": nid})
    return swept


def webhook_counts(engine: Engine) -> dict[str, int]:
    """Notifications by webhook state (``none`` for searches without a webhook)."""
    with engine.connect() as c:
        rows = c.execute(
            text(
                "SELECT coalesce(webhook_state, 'none'), count(*) FROM search_notifications GROUP BY 1 ORDER BY 1"
            )
        ).all()
    return {str(r[0]): int(r[1]) for r in rows}


__all__ = [
    "WEBHOOK_LOCK_NS",
    "WEBHOOK_STATES",
    "NewNotification",
    "WatchVectors",
    "WebhookClaim",
    "claim_webhook",
    "embeddings_to_watch",
    "recent_embeddings",
    "record_webhook",
    "release_webhook",
    "store_notifications",
    "sweep_interrupted",
    "webhook_counts",
]
