"""Alert filters: ``galsift filter add|list|remove|test`` and the filter service ``galsift filters``.

A filter is a user's WHERE clause over ``galsift_api.tile_scores`` (docs/filters.md); validation,
storage and the outbox queries live in :mod:`db.filters`, shared with the dashboard. The service
is a member of the ``filters`` consumer group on ``tiles.detected``; per consumed batch it

1. takes the active filters (reloaded when ``alert_filters`` changed);
2. runs each filter's clause over the batch's tiles that were detected after the filter was
   added, **as the reader role** with ``settings.filter_timeout_s`` (:func:`db.filters.run_clause`).
   A filter that fails (a refused privilege, a type error, the time limit, a clause that returns
   rows outside the batch) is recorded on the filter (``error_count``, ``last_error``) and
   skipped for that batch: it never stops the stream nor the other filters;
3. stores the matches, once per (filter, tile), together with their outbox states, and only then
   lets the base class commit the offsets. A replayed batch stores, and so publishes, nothing.

Two threads beside the consumer loop work the outbox, so a slow broker or webhook holds up no
batch:

- :class:`TopicPublisher` publishes pending matches on ``filter.<name>``. One publisher at a time
  (a PostgreSQL session advisory lock elects it among the service's workers) with a
  **transactional** Kafka producer (one ``transactional_id``): claiming a match marks it
  ``sending`` with the topic's end offsets, the messages are written in one Kafka transaction,
  then marked ``published``. A publisher that stops between the Kafka commit and the database
  mark leaves ``sending`` rows; the next one first fences the old producer
  (``init_transactions`` aborts its open transaction and bars it from writing again), then reads
  the topic (``read_committed``) from the stored offsets: matches found there are marked
  published, the others are published again. Each match therefore reaches the topic exactly
  once for ``read_committed`` consumers (docs/filters.md says what remains).
- :class:`FilterWebhookSender` posts matches to their filters' webhooks: calls are claimed with
  ``FOR UPDATE SKIP LOCKED`` and a lease, retried with exponential back-off up to
  ``webhook_max_attempts``; each call carries ``X-Galsift-Match`` so a receiver can drop the
  repeat that a sender dying mid-call would cause.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

from db.filters import ActiveFilter, FilterRefused
from galsift import messages
from galsift.settings import Settings
from galsift.stage import Envelope, Output, Rejected, Stage
from galsift.webhooks import Poster, PostResult, backoff_s, post_json

if TYPE_CHECKING:
    from kafka import KafkaConsumer, KafkaProducer

    from db.filters import WebhookClaim
    from galsift.cli import CommandGroups

log = logging.getLogger(__name__)

#: Kafka header carrying the match id (the publisher's recovery scan looks for it)
MATCH_HEADER = "galsift-match"
#: advisory-lock keys electing the one topic publisher: (namespace, key)
PUBLISHER_LOCK = (0x6A1F, 1)
#: the publisher's Kafka transactional id: one for all workers, so a new publisher fences the old
TRANSACTIONAL_ID = "galsift-filters-publisher"
#: exit statuses of ``galsift filter``
EXIT_REFUSED = 2
EXIT_CONNECTION = 3

#: one consumed ``tiles.detected`` message: (tile id, detected at, model versions)
Detected = tuple[str, datetime, list[str]]


class FilterStage(Stage[Detected]):
    """Consumer-group member running every active filter over each batch of newly detected tiles.

    Parameters
    ----------
    settings
        Process settings (``topics.detected``, ``filter_timeout_s``, batch sizes).
    engine
        SQLAlchemy engine of the galsift database (the owner: matches are written with it; the
        clauses never run on it).
    on_new
        Called after a batch stored new matches (wakes the publisher and the webhook sender).
    **kw
        Passed to :class:`galsift.stage.Stage` (``group_id``, ``raise_exc``).
    """

    name: ClassVar[str] = "filters"
    input_schema: ClassVar[str] = "detected"

    def __init__(
        self, settings: Settings, engine: Engine, *, on_new: Callable[[], None] | None = None, **kw: Any
    ) -> None:
        from db.repo import DbRecorder

        super().__init__(settings, DbRecorder(engine), **kw)
        self.engine = engine
        self.on_new = on_new
        #: matches this worker stored (a replay stores none)
        self.matched = 0
        self._filters: list[ActiveFilter] = []
        self._stamp: tuple[int, datetime | None] | None = None

    @property
    def input_topic(self) -> str:
        """Tiles whose detections are durable."""
        return self.settings.topics.detected

    def prepare(self, item: Envelope) -> Detected:
        """The (tile id, detected at, model versions) of one ``tiles.detected`` message."""
        value = item.value
        try:
            tile = str(uuid.UUID(str(value["tile_id"])))
        except ValueError as exc:
            raise Rejected("identity", f"tile_id {value.get('tile_id')!r} is not a UUID") from exc
        at = value["detected_at"]
        if at.tzinfo is None:  # fastavro gives aware UTC times; be explicit for naive ones
            at = at.replace(tzinfo=UTC)
        return tile, at, [str(v) for v in value["model_versions"]]

    def filters(self) -> list[ActiveFilter]:
        """The active filters, reloaded when ``alert_filters`` changed (one small query per batch)."""
        from db.filters import active_filters, filters_stamp

        stamp = filters_stamp(self.engine)
        if stamp != self._stamp:
            self._filters, self._stamp = active_filters(self.engine), stamp
            log.info(
                "%s: running %d filter(s): %s",
                self.name,
                len(self._filters),
                ", ".join(f.name for f in self._filters) or "-",
            )
        return self._filters

    def write(self, prepared: Sequence[tuple[Envelope, Detected]]) -> list[Output]:
        """Run the filters over the batch and store the new matches (idempotently)."""
        from db.filters import run_clause, store_matches

        events: dict[str, tuple[datetime, set[str]]] = {}
        for _, (tile, at, versions) in prepared:
            seen = events.get(tile)
            events[tile] = (max(at, seen[0]) if seen else at, set(versions) | (seen[1] if seen else set()))
        found: list[tuple[int, str, list[str]]] = []
        for f in self.filters():
            # a filter takes only tiles detected after it was added: the "new" detections
            batch = [t for t, (at, _) in events.items() if at >= f.created_at]
            if not batch:
                continue
            try:
                tiles = run_clause(self.settings, f.clause, batch, timeout_s=self.settings.filter_timeout_s)
            except FilterRefused as exc:
                if exc.reason == "connection":
                    # not the clause's fault: the base class retries, then replays the batch
                    raise ConnectionError(str(exc)) from None
                self._failed(f, exc)
                continue
            found.extend((f.id, t, sorted(events[t][1])) for t in tiles)
        created = store_matches(self.engine, found)
        if created:
            self.matched += len(created)
            log.info(
                "%s: %d new match(es) for filter(s) %s",
                self.name,
                len(created),
                ", ".join(sorted({f.name for f in self._filters if f.id in {m.filter_id for m in created}})),
            )
            if self.on_new is not None:
                self.on_new()
        return []

    def _failed(self, f: ActiveFilter, exc: FilterRefused) -> None:
        from db.filters import record_filter_error

        # one failing filter must not stop the others (AMPEL-style isolation): record and go on
        log.warning(
            "%s: filter %s failed on this batch (%s), skipped: %s", self.name, f.name, exc.reason, exc
        )
        record_filter_error(self.engine, f.id, f"{exc.reason}: {exc}")


# -- the topic outbox -----------------------------------------------------------------------------------
class TopicPublisher:
    """Publishes pending matches on their filters' topics, each exactly once (see the module docstring).

    Parameters
    ----------
    engine
        The galsift database.
    settings
        Kafka settings.
    transactional_id
        The Kafka transactional id shared by every publisher of this deployment.
    poll_s
        Longest wait between rounds when not woken.
    batch
        Most matches per Kafka transaction.
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        transactional_id: str = TRANSACTIONAL_ID,
        poll_s: float = 1.0,
        batch: int = 500,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.transactional_id = transactional_id
        self.poll_s = poll_s
        self.batch = batch
        self.published = 0
        self._lock_conn: Connection | None = None
        self._producer: KafkaProducer | None = None
        self._consumer: KafkaConsumer | None = None
        self._topics: set[str] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- leadership and clients ------------------------------------------------------------------
    def lead(self) -> bool:
        """Hold the publisher lock (a session advisory lock: released when this process dies)."""
        if self._lock_conn is not None:
            try:
                self._lock_conn.execute(text("SELECT 1"))
                self._lock_conn.commit()
                return True
            except SQLAlchemyError:
                # the session, and with it the lock, is gone: another worker may lead by now
                self.release()
                return False
        conn = self.engine.connect()
        try:
            got = conn.execute(
                text("SELECT pg_try_advisory_lock(:a, :b)"), {"a": PUBLISHER_LOCK[0], "b": PUBLISHER_LOCK[1]}
            ).scalar_one()
            conn.commit()
        except BaseException:
            conn.invalidate()
            conn.close()
            raise
        if not got:
            conn.close()
            return False
        self._lock_conn = conn
        try:
            self._start()
        except BaseException:
            self.release()
            raise
        return True

    def _start(self) -> None:
        """Make the transactional producer (fencing any earlier one) and settle what it left."""
        from kafka import KafkaConsumer

        from galsift.kafka import make_producer

        self._producer = make_producer(self.settings, transactional_id=self.transactional_id)
        # fences the previous publisher: its open transaction is aborted and it can write no more
        self._producer.init_transactions()
        self._consumer = KafkaConsumer(
            bootstrap_servers=self.settings.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            client_id="galsift-filters-publisher",
        )
        self.recover()

    def release(self) -> None:
        """Close the clients and give up the lock (the next round tries to lead again)."""
        producer, self._producer = self._producer, None
        consumer, self._consumer = self._consumer, None
        conn, self._lock_conn = self._lock_conn, None
        if producer is not None:
            try:
                producer.close(timeout=5)
            except Exception:  # closing a broken client must not hide why it broke
                log.debug("filters: closing the publisher's producer failed", exc_info=True)
        if consumer is not None:
            try:
                consumer.close(autocommit=False)
            except Exception:
                log.debug("filters: closing the publisher's consumer failed", exc_info=True)
        if conn is not None:
            # closing only returns the session to the pool, lock and all: unlock it first, and
            # should that fail, end the session (the server then drops the lock)
            try:
                conn.execute(
                    text("SELECT pg_advisory_unlock(:a, :b)"),
                    {"a": PUBLISHER_LOCK[0], "b": PUBLISHER_LOCK[1]},
                )
                conn.commit()
            except SQLAlchemyError:
                conn.invalidate()
            finally:
                conn.close()

    # -- the work -----------------------------------------------------------------------------------
    def recover(self) -> tuple[int, int]:
        """Settle matches left ``sending``: published if the topic holds them, pending otherwise.

        Returns
        -------
        tuple of int
            (found on their topic and marked published, put back to pending).
        """
        from kafka import TopicPartition

        from db.filters import in_doubt, mark_published, release_unpublished

        assert self._consumer is not None
        found_total = released = 0
        for entry in in_doubt(self.engine):
            wanted = set(entry.ids)
            found: dict[int, tuple[int, int]] = {}
            parts = sorted(self._consumer.partitions_for_topic(entry.topic) or [])
            tps = [TopicPartition(entry.topic, p) for p in parts]
            if tps:
                self._consumer.assign(tps)
                for tp in tps:
                    self._consumer.seek(tp, entry.scan_from.get(tp.partition, 0))
                ends = self._consumer.end_offsets(tps)
                deadline = time.monotonic() + 120
                while any(self._consumer.position(tp) < ends[tp] for tp in tps):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"could not read {entry.topic} to its end to settle matches")
                    for records in self._consumer.poll(timeout_ms=500).values():
                        for r in records:
                            value = dict(r.headers or []).get(MATCH_HEADER)
                            if value is not None and int(value) in wanted:
                                found[int(value)] = (r.partition, r.offset)
            found_total += mark_published(self.engine, [(i, p, o) for i, (p, o) in found.items()])
            released += release_unpublished(self.engine, sorted(wanted - set(found)))
        if found_total or released:
            log.warning(
                "filters: settled matches a stopped publisher left: %d were on their topic (not sent "
                "again), %d were not (sent now)",
                found_total,
                released,
            )
        return found_total, released

    def _end_offsets(self, topic: str) -> dict[int, int]:
        from kafka import TopicPartition

        from db.filters import ensure_filter_topics

        assert self._consumer is not None
        if topic not in self._topics:
            # a filter written straight into the table, or a topic deleted since: make it
            ensure_filter_topics(self.settings, [topic])
            self._topics.add(topic)
        parts = sorted(self._consumer.partitions_for_topic(topic) or [])
        ends = self._consumer.end_offsets([TopicPartition(topic, p) for p in parts])
        return {tp.partition: int(offset) for tp, offset in ends.items()}

    def publish_due(self) -> int:
        """One round, as the leader: publish every pending match; returns how many were published."""
        from db.filters import claim_unpublished, mark_published, topics_with_unpublished

        producer = self._producer
        assert producer is not None
        sent = 0
        for filter_id, topic in topics_with_unpublished(self.engine):
            # no early exit on stop: a stopping service's last round publishes what is pending
            while True:
                ends = self._end_offsets(topic)
                claims = claim_unpublished(self.engine, filter_id, scan_from=ends, limit=self.batch)
                if not claims:
                    break
                producer.begin_transaction()
                futures = [
                    (
                        c.id,
                        producer.send(
                            topic,
                            key=c.tile_id.encode(),
                            value=messages.encode("filter_match", c.value),
                            headers=[*messages.headers("filter_match"), (MATCH_HEADER, str(c.id).encode())],
                        ),
                    )
                    for c in claims
                ]
                self.before_commit(claims)
                producer.commit_transaction()
                placed = []
                for match_id, fut in futures:
                    meta = fut.get(timeout=60)
                    placed.append((match_id, int(meta.partition), int(meta.offset)))
                self.after_commit(claims)
                mark_published(self.engine, placed)
                sent += len(placed)
        self.published += sent
        return sent

    def before_commit(self, claims: Sequence[Any]) -> None:
        """Called with the claimed matches after they were sent and before the Kafka commit."""

    def after_commit(self, claims: Sequence[Any]) -> None:
        """Called after the Kafka commit and before the database mark (the crash window tests use)."""

    def round(self) -> int:
        """Lead if possible and publish; a failure drops the clients (the next round recovers)."""
        if not self.lead():
            return 0
        try:
            return self.publish_due()
        except Exception as exc:
            log.warning(
                "filters: publishing failed (%s: %s); will fence, settle and retry",
                type(exc).__name__,
                str(exc).splitlines()[0][:300] if str(exc) else "",
            )
            self.release()
            return 0

    # -- the thread -------------------------------------------------------------------------------
    def wake(self) -> None:
        """Start a round now (new matches were stored)."""
        self._wake.set()

    def run(self) -> int:
        """Publish until :meth:`stop`, riding out broker and database faults with back-off."""
        wait = self.poll_s
        while True:
            # a stop request still gets this last round: matches the final batch stored go out
            stopping = self._stop.is_set()
            self._wake.clear()
            try:
                self.round()
                wait = self.poll_s
            except Exception as exc:  # e.g. the database or broker away while taking the lead
                log.warning(
                    "filters: publisher unavailable (%s: %s); retrying",
                    type(exc).__name__,
                    str(exc).splitlines()[0][:200] if str(exc) else "",
                )
                self.release()
                wait = min(2 * wait, 30.0)
            if stopping:
                break
            self._wake.wait(wait)
        self.release()
        return self.published

    def start(self) -> TopicPublisher:
        """Run :meth:`run` in a daemon thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="filters-publisher", daemon=True)
        self._thread.start()
        return self

    def stop(self, *, timeout_s: float = 60.0) -> None:
        """Finish the current round and release the lock (joins the thread)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None


# -- webhooks ---------------------------------------------------------------------------------------------
class FilterWebhookSender:
    """Posts matches to their filters' webhooks, with a lease per call and exponential back-off.

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
        post: Poster = post_json,
    ) -> None:
        self.engine = engine
        self.max_attempts = settings.webhook_max_attempts
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.post = post
        self.sent = self.failed = self.retried = 0
        #: calls claimed in the current round whose outcome is not stored yet
        self._unrecorded: list[WebhookClaim] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def deliver_due(self, *, limit: int = 50) -> int:
        """One round: claim up to ``limit`` due calls and make them; returns the calls made."""
        from db.filters import claim_webhooks, release_webhook_claims

        if self._unrecorded:
            # the database went away during the last round: its calls are due again now, not
            # when their lease (a whole round's calls long) runs out
            release_webhook_claims(self.engine, self._unrecorded)
            self._unrecorded = []
        # the lease must outlast every call of the round, made one after the other
        lease = timedelta(seconds=limit * (self.timeout_s + 1) + 60)
        claims = claim_webhooks(self.engine, limit=limit, lease=lease)
        self._unrecorded = list(claims)
        for claim in claims:
            self._deliver(claim)
            self._unrecorded.remove(claim)
        return len(claims)

    def _deliver(self, claim: WebhookClaim) -> None:
        """Make one claimed call and record its outcome."""
        from db.alerts import webhook_target
        from db.filters import record_webhook

        if claim.url is None:  # pragma: no cover - filters keep their webhook for life
            record_webhook(self.engine, claim, ok=False, error="the filter has no webhook")
            return
        headers = {
            "X-Galsift-Match": str(claim.id),
            "X-Galsift-Filter": claim.filter_name,
            "X-Galsift-Attempt": str(claim.attempts),
        }
        try:
            result = self.post(claim.url, claim.body, headers, self.timeout_s)
        except Exception as exc:  # a poster must not take the loop down with one call
            result = PostResult(status=None, error=f"{type(exc).__name__}: {exc}")
        target = webhook_target(claim.url)  # logs never show the URL (it may hold a secret)
        if result.ok:
            record_webhook(self.engine, claim, ok=True, status=result.status)
            self.sent += 1
        elif result.final or claim.attempts >= self.max_attempts:
            record_webhook(self.engine, claim, ok=False, status=result.status, error=result.error)
            self.failed += 1
            log.error(
                "filters: webhook %s: match %d FAILED for good after attempt %d/%d: %s",
                target,
                claim.id,
                claim.attempts,
                self.max_attempts,
                result.error,
            )
        else:
            wait = backoff_s(
                claim.attempts,
                base_s=self.backoff_base_s,
                cap_s=self.backoff_cap_s,
                retry_after_s=result.retry_after_s,
            )
            retry_at = datetime.now(UTC) + timedelta(seconds=wait)
            record_webhook(
                self.engine, claim, ok=False, status=result.status, error=result.error, retry_at=retry_at
            )
            self.retried += 1
            log.warning(
                "filters: webhook %s: match %d attempt %d/%d failed: %s; retry in %.0f s",
                target,
                claim.id,
                claim.attempts,
                self.max_attempts,
                result.error,
                wait,
            )

    def wake(self) -> None:
        """Start a round now (new matches were stored)."""
        self._wake.set()

    def run(self) -> None:
        """Deliver until :meth:`stop`; a database that stops answering is ridden out with back-off."""
        wait = self.poll_s
        down_since: float | None = None
        while True:
            # a stop request still gets this last round (the final batch's calls are due now)
            stopping = self._stop.is_set()
            self._wake.clear()
            try:
                made = self.deliver_due()
                wait = self.poll_s
            except SQLAlchemyError as exc:
                # one line when the database goes away, one when it is back: not one per retry
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning(
                        "filters: webhook sender: database unavailable (%s: %s); retrying",
                        type(exc).__name__,
                        str(exc).splitlines()[0][:200] if str(exc) else "",
                    )
                made = 0
                wait = min(2 * wait, 30.0)
            else:
                if down_since is not None:
                    log.warning(
                        "filters: webhook sender: database RECOVERED after %.1f s",
                        time.monotonic() - down_since,
                    )
                    down_since = None
            if stopping:
                break
            if not made:
                self._wake.wait(wait)

    def start(self) -> FilterWebhookSender:
        """Run :meth:`run` in a daemon thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="filters-webhooks", daemon=True)
        self._thread.start()
        return self

    def stop(self, *, timeout_s: float = 120.0) -> None:
        """Make one last round of due calls and leave :meth:`run` (joins the thread)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None


def run(
    settings: Settings,
    *,
    group: str | None = None,
    max_batches: int | None = None,
    idle_exit_s: float | None = None,
    timeout_s: float = 10.0,
    on_start: Callable[[FilterStage], None] | None = None,
) -> int:
    """Entry point of ``galsift filters``: the consumer loop, with the publisher and webhook sender beside it.

    ``on_start`` is handed the stage before it runs (a caller in another thread may then
    :meth:`~galsift.stage.Stage.stop` it); stopping makes one last round of publishing and
    webhook calls.
    """
    from db.engine import get_engine

    engine = get_engine(settings)
    publisher = TopicPublisher(engine, settings)
    sender = FilterWebhookSender(engine, settings, timeout_s=timeout_s)

    def wake() -> None:
        publisher.wake()
        sender.wake()

    stage = FilterStage(settings, engine, group_id=group, on_new=wake)
    publisher.start()
    sender.start()
    if on_start is not None:
        on_start(stage)
    try:
        stage.run(max_batches=max_batches, idle_exit_s=idle_exit_s)
    finally:
        # the outbox may still hold this run's matches: one last round of each before leaving
        wake()
        sender.stop()
        publisher.stop()
        engine.dispose()
    log.info(
        "filters stopping: %d match(es) stored, %d published, %d webhook call(s) sent",
        stage.matched,
        publisher.published,
        sender.sent,
    )
    return 0


# -- command line -----------------------------------------------------------------------------------------
def register(groups: CommandGroups) -> None:
    """Add ``galsift filter add|list|remove|test`` and ``galsift filters`` to the command line."""
    p = groups.top.add_parser(
        "filters",
        help="run the alert-filter service (tiles.detected -> users' filters -> filter.<name>, webhooks)",
        description="A consumer-group member on tiles.detected: runs every active filter's WHERE clause "
        "as the galsift_reader role over each batch of newly detected tiles, stores each new match "
        "once, publishes it on the filter's topic filter.<name> (exactly once for read_committed "
        "consumers) and posts it to the filter's webhook. Runs until SIGTERM/Ctrl-C.",
    )
    p.add_argument("--group", help="consumer group (default: filters)")
    p.add_argument("--max-batches", type=int, help="stop after N batches")
    p.add_argument("--idle-exit", type=float, metavar="S", help="stop after S seconds without input")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="per webhook call (default: 10)")
    p.set_defaults(func=_filters)

    f = groups.top.add_parser(
        "filter",
        help="alert filters: WHERE clauses over tile_scores, each with its own topic (docs/filters.md)",
    )
    sub = f.add_subparsers(dest="filter_command", required=True, metavar="ACTION")
    add = sub.add_parser(
        "add",
        help="validate and store a filter, create its topic filter.<name>",
        description="Store a filter: a WHERE clause over galsift_api.tile_scores (docs/filters.md), "
        "validated by running it as the galsift_reader role within GALSIFT_FILTER_TIMEOUT_S. A "
        "refused clause prints one line on stderr, exits 2 and stores nothing.",
    )
    add.add_argument("name", help="1-64 characters of a-z, 0-9, '_', '-'; the topic is filter.<name>")
    add.add_argument("clause", help='WHERE clause, e.g. "lens_score > 0.9 AND dec < 0"')
    add.add_argument("--owner", default=None, help="the filter's owner (default: your login name)")
    add.add_argument("--webhook", metavar="URL", help="also POST each match as JSON to this URL")
    add.set_defaults(func=_add)
    ls = sub.add_parser("list", help="the filters, their match counts and last errors")
    ls.add_argument("--owner", help="only this user's filters")
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    ls.set_defaults(func=_list)
    rm = sub.add_parser("remove", help="delete a filter and its matches (its topic is kept)")
    rm.add_argument("name")
    rm.add_argument("--owner", help="only if it belongs to this user")
    rm.set_defaults(func=_remove)
    test = sub.add_parser(
        "test", help="dry run: the existing tiles a filter (by name) or a clause matches; stores nothing"
    )
    test.add_argument("filter", help="a stored filter's name, or a WHERE clause")
    test.add_argument("--limit", type=int, default=20, metavar="N", help="most rows shown (default: 20)")
    test.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="statement timeout (default: 30)"
    )
    test.add_argument("--json", action="store_true", help="print one JSON object")
    test.set_defaults(func=_test)


def _filters(args: argparse.Namespace, settings: Settings) -> int:
    return run(
        settings,
        group=args.group,
        max_batches=args.max_batches,
        idle_exit_s=args.idle_exit,
        timeout_s=args.timeout,
    )


def _refused(exc: FilterRefused) -> int:
    print(f"galsift filter: {exc}", file=sys.stderr)
    return EXIT_CONNECTION if exc.reason == "connection" else EXIT_REFUSED


def _add(args: argparse.Namespace, settings: Settings) -> int:
    from db.engine import get_engine
    from db.filters import add_filter

    engine = get_engine(settings)
    try:
        info = add_filter(
            settings,
            engine,
            args.name,
            args.clause,
            owner=args.owner or getpass.getuser(),
            webhook_url=args.webhook,
        )
    except FilterRefused as exc:
        return _refused(exc)
    finally:
        engine.dispose()
    print(f"filter {info.name} added (owner {info.owner}); matches are published on {info.topic}")
    return 0


def _list(args: argparse.Namespace, settings: Settings) -> int:
    from db.engine import get_engine
    from db.filters import list_filters

    engine = get_engine(settings)
    try:
        rows = [f.as_row() for f in list_filters(engine, owner=args.owner)]
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps({"command": "filter list", "owner": args.owner, "filters": rows}))
        return 0
    cols = ("name", "owner", "matches", "published", "webhook", "error_count", "clause")
    table = [[str(r[c] if r[c] is not None else "-") for c in cols] for r in rows]
    widths = [max([len(c), *(len(t[i]) for t in table)]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)).rstrip())
    for r in rows:
        if r["last_error"]:
            print(f"{r['name']}: last error {r['last_error_at']}: {r['last_error']}")
    if not rows:
        print("(no filters)")
    return 0


def _remove(args: argparse.Namespace, settings: Settings) -> int:
    from db.engine import get_engine
    from db.filters import remove_filter

    engine = get_engine(settings)
    try:
        removed = remove_filter(engine, args.name, owner=args.owner)
    finally:
        engine.dispose()
    if not removed:
        print(
            f"galsift filter: no filter named {args.name!r}" + (f" of {args.owner}" if args.owner else ""),
            file=sys.stderr,
        )
        return 1
    print(f"filter {args.name} removed (its topic filter.{args.name} is kept for subscribers)")
    return 0


def _test(args: argparse.Namespace, settings: Settings) -> int:
    from db.engine import get_engine
    from db.filters import dry_run
    from db.sql import format_table, jsonable

    engine = get_engine(settings)
    try:
        clause, result = dry_run(settings, engine, args.filter, limit=args.limit, timeout_s=args.timeout)
    except FilterRefused as exc:
        return _refused(exc)
    finally:
        engine.dispose()
    if args.json:
        print(
            json.dumps(
                {
                    "command": "filter test",
                    "clause": clause,
                    "columns": result.columns,
                    "rows": [[jsonable(v) for v in row] for row in result.rows],
                    "truncated": result.truncated,
                }
            )
        )
        return 0
    print(format_table(result))
    more = " (more: raise --limit)" if result.truncated else ""
    print(f"({len(result.rows)} matching tile(s) shown{more}, {result.elapsed_s:.2f} s; nothing stored)")
    return 0


__all__ = [
    "MATCH_HEADER",
    "TRANSACTIONAL_ID",
    "FilterStage",
    "FilterWebhookSender",
    "TopicPublisher",
    "register",
    "run",
]
