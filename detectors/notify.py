"""The notifier: delivers alerts from the outbox to the configured webhooks.

It runs on its own (``galsift notify``), apart from the detector, which only writes outbox rows
in the transaction that stores its alerts: a webhook that is slow, down or answering 500 never
holds up a tile. Each round it claims due deliveries (``db.alerts.claim_due_deliveries``: SKIP
LOCKED, leased, within each target's hourly rate), POSTs each stored JSON body with a timeout
and records the outcome. A failed attempt is retried after ``2**(attempts - 1) * backoff_base_s``
seconds (capped, or later when the server sends ``Retry-After``); after
``Settings.webhook_max_attempts`` attempts, or on an answer that retrying cannot change (4xx other
than 408/425/429), the delivery is marked ``failed``. One log line per failed attempt, one when a
target recovers.

Delivery is at least once: a notifier killed between the call and the record gives the delivery
back when its lease ends. Each call carries ``X-Galsift-Delivery``, ``X-Galsift-Alert`` and
``X-Galsift-Attempt`` headers, so a receiver that cares can drop the rare repeat (the same
delivery id, a later attempt), as for the saved searches' webhooks.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from db.alerts import DeliveryClaim, claim_due_deliveries, record_delivery, release_deliveries
from detectors.alerts import webhook_target
from galsift import metrics
from galsift.settings import Settings

# the generic call lives in galsift.webhooks (the saved-search watcher posts too); re-exported
# here because this module is where callers of the notifier have always found them
from galsift.webhooks import RETRYABLE_4XX, Poster, PostResult, backoff_s, post_json

log = logging.getLogger(__name__)


@dataclass
class NotifyReport:
    """What one or more notifier rounds did."""

    claimed: int = 0
    sent: int = 0
    retried: int = 0
    failed: int = 0

    def add(self, other: NotifyReport) -> None:
        """Add another report's counts to this one."""
        self.claimed += other.claimed
        self.sent += other.sent
        self.retried += other.retried
        self.failed += other.failed


class Notifier:
    """Delivers due outbox rows to the webhooks named in the settings.

    Parameters
    ----------
    engine
        The galsift database.
    settings
        ``alert_webhooks``, ``webhook_rate_per_hour`` and ``webhook_max_attempts`` are used.
    webhooks
        Webhook URLs instead of ``settings.alert_webhooks``.
    timeout_s
        Per-call timeout.
    batch
        Most deliveries claimed per round.
    backoff_base_s, backoff_cap_s
        Wait after the first failed attempt, doubled per attempt up to the cap.
    post
        How a body is posted (:func:`post_json`; tests may pass another).
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        webhooks: Sequence[str] | None = None,
        timeout_s: float = 10.0,
        batch: int = 20,
        backoff_base_s: float = 2.0,
        backoff_cap_s: float = 3600.0,
        post: Poster = post_json,
    ) -> None:
        urls = settings.alert_webhooks if webhooks is None else list(webhooks)
        self.engine = engine
        self.settings = settings
        #: target name (as in the outbox) -> URL; the URL itself never reaches the database or the log
        self.urls = {webhook_target(url): url for url in urls}
        self.timeout_s = timeout_s
        self.batch = batch
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.post = post
        # a claim is posted one after the other: the lease must outlast posting a whole batch
        self.lease = timedelta(seconds=batch * (timeout_s + 1.0) + 30.0)
        self._stop = threading.Event()
        #: deliveries claimed in the current round whose outcome is not stored yet
        self._unrecorded: list[DeliveryClaim] = []
        #: targets whose last attempt failed -> failed attempts since, for the recovery line
        self._failing: dict[str, int] = {}

    @property
    def targets(self) -> list[str]:
        """Outbox target names of the configured webhooks (what the detector writes rows for)."""
        return list(self.urls)

    def backoff(self, attempts: int, retry_after_s: float | None = None) -> timedelta:
        """Wait before the next attempt after ``attempts`` failed ones."""
        return timedelta(
            seconds=backoff_s(
                attempts, base_s=self.backoff_base_s, cap_s=self.backoff_cap_s, retry_after_s=retry_after_s
            )
        )

    def deliver_due(self, *, now: datetime | None = None) -> NotifyReport:
        """One round: claim due deliveries, post them, record each outcome.

        Parameters
        ----------
        now
            The clock for claims, back-off and the rate limit (default: now).
        """
        report = NotifyReport()
        if not self.urls:
            return report
        clock = now or datetime.now(UTC)
        if self._unrecorded:
            # the database went away during the last round: its deliveries are due again now,
            # not when their lease (a whole batch of calls long) runs out
            release_deliveries(self.engine, self._unrecorded, now=clock)
            self._unrecorded = []
        claims = claim_due_deliveries(
            self.engine,
            limit=self.batch,
            now=clock,
            targets=self.targets,
            rate_per_hour=self.settings.webhook_rate_per_hour,
            lease=self.lease,
        )
        report.claimed = len(claims)
        self._unrecorded = list(claims)
        for claim in claims:
            if self._stop.is_set():
                # stopping: leave the rest claimed; their lease runs out and they are claimed again
                break
            self._deliver(claim, report, now=now)
            self._unrecorded.remove(claim)
        return report

    def _deliver(self, claim: DeliveryClaim, report: NotifyReport, *, now: datetime | None) -> None:
        headers = {
            "X-Galsift-Delivery": str(claim.id),
            "X-Galsift-Alert": str(claim.alert_id),
            "X-Galsift-Attempt": str(claim.attempts),
        }
        try:
            result = self.post(self.urls[claim.target], claim.payload, headers, self.timeout_s)
        except Exception as exc:  # a poster must not take the loop down with one delivery
            result = PostResult(status=None, error=f"{type(exc).__name__}: {exc}")
        clock = now or datetime.now(UTC)
        max_attempts = self.settings.webhook_max_attempts
        if result.ok:
            state = record_delivery(
                self.engine, claim.id, ok=True, status=result.status, attempt=claim.attempts, now=clock
            )
            if state == "sent":
                report.sent += 1
            failures = self._failing.pop(claim.target, 0)
            if failures:
                log.warning("webhook %s RECOVERED after %d failed attempt(s)", claim.target, failures)
            return
        give_up = result.final or claim.attempts >= max_attempts
        retry_at = None if give_up else clock + self.backoff(claim.attempts, result.retry_after_s)
        record_delivery(
            self.engine,
            claim.id,
            ok=False,
            status=result.status,
            error=result.error,
            next_attempt_at=retry_at,
            attempt=claim.attempts,
            now=clock,
        )
        self._failing[claim.target] = self._failing.get(claim.target, 0) + 1
        if retry_at is None:
            report.failed += 1
            log.error(
                "webhook %s: alert %d delivery %d FAILED for good after attempt %d/%d: %s",
                claim.target,
                claim.alert_id,
                claim.id,
                claim.attempts,
                max_attempts,
                result.error,
            )
        else:
            report.retried += 1
            log.warning(
                "webhook %s: alert %d delivery %d attempt %d/%d failed: %s; retry in %.0f s",
                claim.target,
                claim.alert_id,
                claim.id,
                claim.attempts,
                max_attempts,
                result.error,
                (retry_at - clock).total_seconds(),
            )

    def run(
        self, *, poll_s: float = 2.0, idle_exit_s: float | None = None, max_rounds: int | None = None
    ) -> NotifyReport:
        """Deliver until stopped (SIGTERM/SIGINT, :meth:`stop`), ``max_rounds`` or ``idle_exit_s`` idle.

        A database that stops answering is ridden out: one line when it starts, back-off, one
        line when it answers again.
        """
        previous = self._install_signal_handlers()
        try:
            return self._loop(poll_s=poll_s, idle_exit_s=idle_exit_s, max_rounds=max_rounds)
        finally:
            # give the embedding program (a test runner, the detector service) its handlers back
            for signum, old in previous.items():
                signal.signal(signum, old)

    def _loop(self, *, poll_s: float, idle_exit_s: float | None, max_rounds: int | None) -> NotifyReport:
        total = NotifyReport()
        rounds = 0
        idle_since = time.monotonic()
        down_since: float | None = None
        backoff = poll_s
        log.info("notifier starting: %d webhook(s) %s", len(self.urls), ", ".join(self.urls) or "(none)")
        if self.settings.metrics_port is not None:
            metrics.serve(self.settings.metrics_port, host=self.settings.metrics_host)
        metrics.HEALTH.ok("notify")
        while not self._stop.is_set():
            try:
                report = self.deliver_due()
            except SQLAlchemyError as exc:
                if down_since is None:
                    down_since = time.monotonic()
                    metrics.HEALTH.fault("notify", f"database unavailable ({type(exc).__name__})")
                    log.warning("notifier: database unavailable (%s); retrying", type(exc).__name__)
                self._stop.wait(backoff)
                backoff = min(2 * backoff, 30.0)
                continue
            if down_since is not None:
                log.warning("notifier: database RECOVERED after %.1f s", time.monotonic() - down_since)
                metrics.HEALTH.ok("notify")
                down_since, backoff = None, poll_s
            total.add(report)
            rounds += 1
            if max_rounds is not None and rounds >= max_rounds:
                break
            if report.claimed:
                idle_since = time.monotonic()
                if report.claimed >= self.batch:
                    continue  # more may be due right away
            elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                break
            self._stop.wait(poll_s)
        log.info("notifier stopping: %d sent, %d retried, %d failed", total.sent, total.retried, total.failed)
        return total

    def stop(self) -> None:
        """Finish the current delivery and leave :meth:`run`."""
        self._stop.set()

    def _install_signal_handlers(self) -> dict[int, Any]:
        """Stop on SIGTERM/SIGINT; returns the handlers replaced (none outside the main thread)."""

        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("notifier: signal %d, stopping", signum)
            self.stop()

        previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return previous  # signals reach only the main thread (tests run notifiers in threads)
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, handler)
        return previous


def deliver_due(engine: Engine, settings: Settings, *, now: datetime | None = None) -> NotifyReport:
    """One notifier round with the settings' webhooks (for a service that delivers in its own loop)."""
    return Notifier(engine, settings).deliver_due(now=now)


__all__ = ["RETRYABLE_4XX", "Notifier", "NotifyReport", "PostResult", "Poster", "deliver_due", "post_json"]
