"""The saved-search watcher (``galsift watch``) and the notification listing (``galsift notifications``).

A saved search (:meth:`hitl.engine.SearchEngine.save`) is a standing query. The watcher is a
member of the ``watch`` consumer group on ``tiles.embedded``; per consumed batch it

1. takes the active saved searches from its cache, which it reloads when
   :func:`db.hitl.searches_changed_since` moves (asked at most every ``watch_refresh_s``);
2. reads the batch's embeddings by each message's model version, with each tile's arrival time;
3. scores every tile that arrived after a search was saved with that search's learner
   (searches of other model versions never see it);
4. stores a notification for every score at or above the search's threshold
   (:func:`db.notifications.store_notifications`: unique per (search, tile), so a replayed
   batch adds nothing), and only then lets the base class commit the offsets.

Bad messages go to the dead-letter topic and ``ingest_errors`` like every stage's
(:class:`galsift.stage.Stage`). A search that the watcher first sees (just saved, or at start-up)
is also run over the tiles that arrived in the last moments, so a tile embedded between the save
and the next reload is not passed over.

Webhooks are posted by a :class:`WebhookSender` thread beside the consumer loop, never by the
loop itself, so a slow or failing webhook holds up no tile: it is woken when new notifications
with a webhook were stored, and polls for retries. Each call is claimed in the database before it
is made (``FOR UPDATE SKIP LOCKED``; see :mod:`db.notifications`): two watchers never post one
notification, a replay never re-posts it, and one interrupted by a crash is posted again (at
least once, like the alert outbox; the repeat has the same ``X-Galsift-Notification`` id and the
next ``X-Galsift-Attempt``, so a receiver can drop it). A failed call is retried with exponential back-off up to
``webhook_max_attempts``; an answer no retry can change (4xx other than 408/425/429) fails at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from galsift.settings import Settings
from galsift.stage import Envelope, Output, Rejected, Stage
from galsift.webhooks import Poster, PostResult, backoff_s, post_json

if TYPE_CHECKING:
    from db.notifications import WatchVectors, WebhookClaim
    from galsift.cli import CommandGroups
    from hitl.learner import Learner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchedSearch:
    """An active saved search as the watcher scores with it."""

    id: int
    owner: str
    name: str
    model_version: str
    threshold: float
    learner_version: int
    #: tiles that arrived before this are never notified (the scientist worked with them)
    created_at: datetime
    learner: Learner


class WatchStage(Stage[tuple[uuid.UUID, str]]):
    """Consumer-group member scoring newly embedded tiles with every active saved search.

    Parameters
    ----------
    settings
        Process settings (``topics.embedded``, ``watch_refresh_s``, batch sizes).
    engine
        SQLAlchemy engine of the galsift database.
    on_pending
        Called after a batch stored notifications whose webhook is pending (wakes the sender).
    **kw
        Passed to :class:`galsift.stage.Stage` (``group_id``, ``raise_exc``).
    """

    name: ClassVar[str] = "watch"
    input_schema: ClassVar[str] = "embedded"

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        on_pending: Callable[[], None] | None = None,
        **kw: Any,
    ) -> None:
        from db.repo import DbRecorder

        super().__init__(settings, DbRecorder(engine), **kw)
        self.engine = engine
        self.on_pending = on_pending
        #: notifications this worker created (replays count nothing)
        self.notified = 0
        self._searches: list[WatchedSearch] | None = None
        self._stamp: datetime | None = None
        self._checked = -float("inf")
        #: (search id, learner version) whose learner could not be read: logged once each
        self._broken: set[tuple[int, int]] = set()

    @property
    def input_topic(self) -> str:
        """Tiles whose vectors are in pgvector."""
        return self.settings.topics.embedded

    def prepare(self, item: Envelope) -> tuple[uuid.UUID, str]:
        """The (tile id, model version) announced by one ``tiles.embedded`` message."""
        value = item.value
        try:
            tile_id = uuid.UUID(str(value["tile_id"]))
        except ValueError as exc:
            raise Rejected("identity", f"tile_id {value.get('tile_id')!r} is not a UUID") from exc
        return tile_id, str(value["model_version"])

    def write(self, prepared: Sequence[tuple[Envelope, tuple[uuid.UUID, str]]]) -> list[Output]:
        """Score the batch with the active searches and store the notifications (idempotently)."""
        from db.notifications import embeddings_to_watch

        searches = self.searches()
        by_version: dict[str, list[uuid.UUID]] = {}
        for _, (tile_id, version) in prepared:
            ids = by_version.setdefault(version, [])
            if tile_id not in ids:
                ids.append(tile_id)
        rows: list[tuple[int, uuid.UUID, float, int]] = []
        for version, ids in by_version.items():
            watching = [s for s in searches if s.model_version == version]
            if not watching:
                continue  # no query in this embedding space: nothing to read
            vectors = embeddings_to_watch(self.engine, version, ids)
            if len(vectors) < len(ids):
                # the encoder commits only after the vector is stored: a missing row was deleted
                # since; there is nothing to score and nothing to retry
                log.warning(
                    "%s: %d embedded tiles no longer in the database", self.name, len(ids) - len(vectors)
                )
            rows.extend(self.score(watching, vectors))
        self.store(rows)
        return []

    # -- the searches ----------------------------------------------------------------------------
    def searches(self) -> list[WatchedSearch]:
        """The active saved searches, reloaded when they changed (checked every ``watch_refresh_s``).

        Searches not seen before are run over the tiles that arrived lately (see
        :meth:`catch_up`), so the moments between a save and the reload lose no tile.
        """
        from db.hitl import searches_changed_since

        now = time.monotonic()
        if self._searches is not None and now - self._checked < self.settings.watch_refresh_s:
            return self._searches
        stamp = searches_changed_since(self.engine)
        self._checked = now
        if self._searches is not None and stamp == self._stamp:
            return self._searches
        known = {(s.id, s.created_at) for s in self._searches or []}
        loaded = self._load()
        fresh = [s for s in loaded if (s.id, s.created_at) not in known]
        if fresh:
            self.catch_up(fresh)
        # only now: a failed catch-up leaves the cache as it was, so the next batch tries again
        self._searches, self._stamp = loaded, stamp
        log.info(
            "%s: watching %d saved search(es)%s",
            self.name,
            len(loaded),
            f" ({len(fresh)} new: {', '.join(str(s.id) for s in fresh)})" if fresh else "",
        )
        return loaded

    def _load(self) -> list[WatchedSearch]:
        from db.hitl import saved_searches
        from hitl.learner import Learner

        out: list[WatchedSearch] = []
        for row in saved_searches(self.engine, active_only=True):
            sid = int(row.id or 0)
            try:
                learner = Learner.from_json(row.learner)
            except ValueError as exc:
                # one broken search must not stop the others (AMPEL-style isolation)
                if (sid, row.learner_version) not in self._broken:
                    self._broken.add((sid, row.learner_version))
                    log.error(
                        "%s: saved search %d has an unreadable learner, skipped: %s", self.name, sid, exc
                    )
                continue
            out.append(
                WatchedSearch(
                    id=sid,
                    owner=row.owner,
                    name=row.name,
                    model_version=row.model_version,
                    threshold=float(row.threshold),
                    learner_version=int(row.learner_version),
                    created_at=row.created_at,
                    learner=learner,
                )
            )
        return out

    def catch_up(self, searches: Sequence[WatchedSearch]) -> int:
        """Score the tiles that arrived in the last moments with searches new to this watcher.

        The moments are ``watch_refresh_s + watch_catch_up_s`` seconds: the gap between a save and
        the reload, and, after a restart, the tiles of a batch whose write a killed watcher did not
        finish (the commit-after-write rule alone re-delivers those; this is a second net).

        Returns
        -------
        int
            Notifications created.
        """
        from db.notifications import recent_embeddings

        window = self.settings.watch_refresh_s + self.settings.watch_catch_up_s
        rows: list[tuple[int, uuid.UUID, float, int]] = []
        for version in sorted({s.model_version for s in searches}):
            group = [s for s in searches if s.model_version == version]
            vectors = recent_embeddings(
                self.engine, version, arrived_since=min(s.created_at for s in group), within_s=window
            )
            rows.extend(self.score(group, vectors))
        return self.store(rows)

    # -- scoring and storing ---------------------------------------------------------------------
    def score(
        self, searches: Sequence[WatchedSearch], vectors: WatchVectors
    ) -> list[tuple[int, uuid.UUID, float, int]]:
        """Notification rows ``(search, tile, score, learner version)`` of one model version's tiles.

        Only tiles that arrived at or after a search was saved are scored by it, and only scores at
        or above its threshold become rows.
        """
        if not len(vectors):
            return []
        arrived = np.asarray([t.timestamp() for t in vectors.ingested_at])
        rows: list[tuple[int, uuid.UUID, float, int]] = []
        for search in searches:
            new = np.flatnonzero(arrived >= search.created_at.timestamp())
            if not len(new):
                continue
            try:
                scores = search.learner.score(vectors.embeddings[new])
            except ValueError as exc:  # e.g. a learner of another embedding width
                log.error("%s: saved search %d cannot score these tiles: %s", self.name, search.id, exc)
                continue
            for i, score in zip(new, scores, strict=True):
                if float(score) >= search.threshold:
                    rows.append((search.id, vectors.tile_ids[i], float(score), search.learner_version))
        return rows

    def store(self, rows: Sequence[tuple[int, uuid.UUID, float, int]]) -> int:
        """Store notification rows; returns how many were new (a replay stores none)."""
        from db.notifications import store_notifications

        created = store_notifications(self.engine, rows)
        if not created:
            return 0
        self.notified += len(created)
        pending = sum(1 for n in created if n.webhook_state == "pending")
        log.info(
            "%s: %d new notification(s) for search(es) %s, %d webhook call(s) queued",
            self.name,
            len(created),
            ", ".join(sorted({str(n.saved_search_id) for n in created})),
            pending,
        )
        if pending and self.on_pending is not None:
            self.on_pending()
        return len(created)


# -- webhooks -------------------------------------------------------------------------------------
@dataclass
class SendReport:
    """What one or more sender rounds did."""

    sent: int = 0
    retried: int = 0
    failed: int = 0
    swept: int = 0

    @property
    def claimed(self) -> int:
        """Calls made (or given up before the call)."""
        return self.sent + self.retried + self.failed

    def add(self, other: SendReport) -> None:
        """Add another report's counts to this one."""
        self.sent += other.sent
        self.retried += other.retried
        self.failed += other.failed
        self.swept += other.swept


class WebhookSender:
    """Posts pending notifications to their saved searches' webhooks.

    Parameters
    ----------
    engine
        The galsift database.
    settings
        ``webhook_max_attempts`` is used.
    timeout_s
        Per-call timeout.
    poll_s
        Longest wait between rounds when not woken (retries come due without a wake-up).
    backoff_base_s, backoff_cap_s
        Wait after the first failed attempt, doubled per attempt up to the cap.
    sweep_s
        How often ``sending`` rows of watchers that died during a call are given back (posted again).
    post
        How a body is posted (:func:`galsift.webhooks.post_json`).
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        timeout_s: float = 10.0,
        poll_s: float = 2.0,
        backoff_base_s: float = 2.0,
        backoff_cap_s: float = 3600.0,
        sweep_s: float = 30.0,
        post: Poster = post_json,
    ) -> None:
        self.engine = engine
        self.max_attempts = settings.webhook_max_attempts
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.sweep_s = sweep_s
        self.post = post
        # attempt k+1 is due schedule[k] s after the notification was stored: the cumulative
        # back-off, which every watcher derives alike (the row has no next-attempt column)
        waits = [self.backoff(k) for k in range(1, self.max_attempts)]
        self.schedule = [0.0, *np.cumsum(waits).tolist()]
        #: notification id -> monotonic time before which this sender will not retry it (its
        #: own back-off and Retry-After, on top of the shared schedule)
        self._not_before: dict[int, float] = {}
        self._last_sweep = -float("inf")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def backoff(self, attempts: int, retry_after_s: float | None = None) -> float:
        """Seconds to wait after ``attempts`` failed attempts."""
        return backoff_s(
            attempts, base_s=self.backoff_base_s, cap_s=self.backoff_cap_s, retry_after_s=retry_after_s
        )

    def deliver_due(self, *, limit: int = 100) -> SendReport:
        """One round: sweep interrupted calls (every ``sweep_s``), then post up to ``limit`` due ones.

        Notifications are claimed one at a time, just before their call, so a sender that dies
        leaves at most one notification unsent.
        """
        from db.notifications import claim_webhook, sweep_interrupted

        report = SendReport()
        now = time.monotonic()
        if now - self._last_sweep >= self.sweep_s:
            with self.engine.connect() as conn:
                swept = sweep_interrupted(conn)
            self._last_sweep = now
            report.swept = len(swept)
            if swept:
                log.warning(
                    "watch: %d webhook call(s) interrupted by a stopped watcher, to be posted again: %s",
                    len(swept),
                    ", ".join(map(str, swept)),
                )
        self._not_before = {k: t for k, t in self._not_before.items() if t > now}
        with self.engine.connect() as conn:
            while report.claimed < limit and not self._stop.is_set():
                claim = claim_webhook(conn, schedule=self.schedule, exclude=list(self._not_before))
                if claim is None:
                    break
                try:
                    self._deliver(conn, claim, report)
                except BaseException:
                    # the claim's advisory lock must not outlive this failure in a pooled
                    # connection: ending the session drops it, and the sweep takes the row
                    conn.invalidate()
                    raise
        return report

    def _deliver(self, conn: Connection, claim: WebhookClaim, report: SendReport) -> None:
        from db.alerts import webhook_target
        from db.notifications import record_webhook, release_webhook

        if not claim.webhook_url:
            record_webhook(conn, claim, state="failed", error="the saved search has no webhook_url any more")
            release_webhook(conn, claim)
            report.failed += 1
            return
        target = webhook_target(claim.webhook_url)  # logs never show the URL (it may hold a secret)
        headers = {"X-Galsift-Notification": str(claim.id), "X-Galsift-Attempt": str(claim.attempts)}
        try:
            result = self.post(claim.webhook_url, claim.payload, headers, self.timeout_s)
        except Exception as exc:  # a poster must not take the loop down with one call
            result = PostResult(status=None, error=f"{type(exc).__name__}: {exc}")
        if result.ok:
            record_webhook(conn, claim, state="sent")
            report.sent += 1
        elif result.final or claim.attempts >= self.max_attempts:
            record_webhook(conn, claim, state="failed", error=result.error)
            report.failed += 1
            log.error(
                "watch: webhook %s: notification %d FAILED for good after attempt %d/%d: %s",
                target,
                claim.id,
                claim.attempts,
                self.max_attempts,
                result.error,
            )
        else:
            wait = self.backoff(claim.attempts, result.retry_after_s)
            self._not_before[claim.id] = time.monotonic() + wait
            record_webhook(conn, claim, state="pending", error=result.error)
            report.retried += 1
            log.warning(
                "watch: webhook %s: notification %d attempt %d/%d failed: %s; retry in %.0f s or later",
                target,
                claim.id,
                claim.attempts,
                self.max_attempts,
                result.error,
                wait,
            )
        release_webhook(conn, claim)

    # -- the thread ------------------------------------------------------------------------------
    def wake(self) -> None:
        """Start a round now (new notifications were stored)."""
        self._wake.set()

    def run(self) -> SendReport:
        """Deliver until :meth:`stop`; a database that stops answering is ridden out with back-off."""
        total = SendReport()
        down_since: float | None = None
        wait = self.poll_s
        while not self._stop.is_set():
            self._wake.clear()
            try:
                report = self.deliver_due()
            except SQLAlchemyError as exc:
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning(
                        "watch: webhook sender: database unavailable (%s); retrying", type(exc).__name__
                    )
                self._stop.wait(wait)
                wait = min(2 * wait, 30.0)
                continue
            if down_since is not None:
                log.warning(
                    "watch: webhook sender: database RECOVERED after %.1f s", time.monotonic() - down_since
                )
                down_since, wait = None, self.poll_s
            total.add(report)
            self._wake.wait(self.poll_s)
        return total

    def start(self) -> WebhookSender:
        """Run :meth:`run` in a daemon thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="watch-webhooks", daemon=True)
        self._thread.start()
        return self

    def stop(self, *, timeout_s: float | None = None) -> None:
        """Finish the current call, record it and leave :meth:`run` (joins the thread)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 5.0 if timeout_s is None else timeout_s)
            self._thread = None


def run(
    settings: Settings,
    *,
    group: str | None = None,
    max_batches: int | None = None,
    idle_exit_s: float | None = None,
    timeout_s: float = 10.0,
) -> int:
    """Entry point of ``galsift watch``: the consumer loop, with the webhook sender beside it."""
    from db.engine import get_engine

    engine = get_engine(settings)
    sender = WebhookSender(engine, settings, timeout_s=timeout_s)
    stage = WatchStage(settings, engine, group_id=group, on_pending=sender.wake)
    sender.start()
    try:
        stage.run(max_batches=max_batches, idle_exit_s=idle_exit_s)
    finally:
        sender.stop()
        engine.dispose()
    log.info("watch stopping: %d notification(s) created", stage.notified)
    return 0


# -- command line ---------------------------------------------------------------------------------
def register(groups: CommandGroups) -> None:
    """Add ``galsift watch`` and ``galsift notifications`` to the command line."""
    p = groups.top.add_parser(
        "watch",
        help="run the saved-search watcher (tiles.embedded -> saved searches -> notifications, webhooks)",
        description="A consumer-group member on tiles.embedded: scores each new tile with every active "
        "saved search of its model version, stores a notification for each score at or above the "
        "search's threshold (once per search and tile), and posts it to the search's webhook with "
        "retries and back-off. Runs until SIGTERM/Ctrl-C.",
    )
    p.add_argument("--group", help="consumer group (default: watch)")
    p.add_argument("--max-batches", type=int, help="stop after N batches")
    p.add_argument("--idle-exit", type=float, metavar="S", help="stop after S seconds without input")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="per webhook call (default: 10)")
    p.set_defaults(func=_watch)

    p = groups.top.add_parser(
        "notifications", help="saved-search notifications: new tiles that matched a standing search"
    )
    p.add_argument("--owner", help="only this user's searches")
    p.add_argument("--search", type=int, metavar="ID", help="only this saved search")
    p.add_argument("--limit", type=int, default=20, metavar="N", help="most notifications (default: 20)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the rows as JSON")
    p.set_defaults(func=_notifications)


def _watch(args: argparse.Namespace, settings: Settings) -> int:
    return run(
        settings,
        group=args.group,
        max_batches=args.max_batches,
        idle_exit_s=args.idle_exit,
        timeout_s=args.timeout,
    )


def notification_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat, JSON-safe rows of :func:`db.hitl.notifications` (the table and ``--json``)."""
    return [
        {
            "id": r["id"],
            "created_at": r["created_at"].isoformat(timespec="seconds"),
            "owner": r["owner"],
            "search_id": r["saved_search_id"],
            "search": r["search_name"],
            "tile_id": str(r["tile_id"]),
            "tile": f"{r['survey']}/{r['external_id']}",
            "ra": r["ra"],
            "dec": r["dec"],
            "score": round(float(r["score"]), 4),
            "learner_version": r["learner_version"],
            "webhook": r["webhook_state"] or "none",
            "webhook_attempts": r["webhook_attempts"],
            "webhook_error": r["webhook_error"],
        }
        for r in rows
    ]


def _notifications(args: argparse.Namespace, settings: Settings) -> int:
    from db.engine import get_engine
    from db.hitl import notifications

    if args.limit < 1:
        print("galsift notifications: --limit must be >= 1", file=sys.stderr)
        return 2
    engine = get_engine(settings)
    try:
        rows = notification_rows(
            notifications(engine, owner=args.owner, saved_search_id=args.search, limit=args.limit)
        )
    finally:
        engine.dispose()
    cols = ("id", "created_at", "owner", "search", "tile", "score", "webhook")
    table = [[str(r[c]) for c in cols] for r in rows]
    widths = [max([len(c), *(len(t[i]) for t in table)]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)))
    if not rows:
        print("(no notifications)")
    if args.json:
        doc = {"command": "notifications", "owner": args.owner, "search": args.search, "results": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return 0


__all__ = [
    "SendReport",
    "WatchStage",
    "WatchedSearch",
    "WebhookSender",
    "notification_rows",
    "register",
    "run",
]
