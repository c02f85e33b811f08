"""The alert outbox on the real PostgreSQL, delivering to a local test webhook.

A replay creates no second alert and no second call; a webhook answering 500 is retried with
back-off and recorded, then succeeds; two notifiers never send one delivery twice; the hourly
rate limit holds deliveries back; a hanging webhook never holds up the detector's writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import astropy.units as u
import pytest
from sqlalchemy import Engine, text

from db.alerts import (
    AlertCreate,
    alerts_for_tiles,
    claim_due_deliveries,
    create_alerts,
    deliveries,
    delivery_counts,
    recent_alerts,
)
from db.models import ModelVersionCreate, TileCreate
from db.repo import register_model_version, tiles_by_id, upsert_tiles
from detectors.alerts import AlertCandidate, KnownLenses, ScoredTile, build_alerts, webhook_target
from detectors.notify import Notifier
from galsift import messages
from galsift.settings import Settings

pytestmark = pytest.mark.integration


class Hook:
    """A local webhook: records every call and answers ``status`` (after ``delay_s``)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.status = 200
        self.delay_s = 0.0
        self.started = threading.Event()
        self._lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                hook.started.set()
                time.sleep(hook.delay_s)
                with hook._lock:
                    status = hook.status
                    hook.calls.append(
                        {
                            "body": json.loads(body),
                            "delivery": self.headers.get("X-Galsift-Delivery"),
                            "alert": self.headers.get("X-Galsift-Alert"),
                            "attempt": self.headers.get("X-Galsift-Attempt"),
                            "content_type": self.headers.get("Content-Type"),
                            "status": status,
                        }
                    )
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        # a path of its own: every test has its own target name, so tests never see each other's rows
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook/{uuid.uuid4().hex}"
        self.target = webhook_target(self.url)

    def answered(self, status: int) -> int:
        with self._lock:
            return sum(1 for c in self.calls if c["status"] == status)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


@pytest.fixture(scope="module")
def model_version(engine: Engine) -> str:
    name = f"lens_test-{uuid.uuid4().hex[:8]}"
    register_model_version(
        engine,
        ModelVersionCreate(
            name=name, variant="lens_test", checkpoint_uri="file:///dev/null", checksum="0" * 64, card={}
        ),
    )
    return name


def _scored(
    engine: Engine, model_version: str, n: int, *, positions: list[tuple[float, float]] | None = None
) -> list[ScoredTile]:
    """``n`` stored tiles of a survey of their own, scored 0.95 by ``model_version``."""
    survey = f"it_alerts_{uuid.uuid4().hex[:8]}"
    positions = positions or [(150.0 + 0.1 * i, 2.0) for i in range(n)]
    creates = [
        TileCreate(
            id=uuid.UUID(messages.tile_id(survey, f"T{i:03d}")),
            survey=survey,
            external_id=f"T{i:03d}",
            ra=ra,
            dec=dec,
            bands=["g", "r", "z"],
            pixel_scale=0.262,
            shape=[3, 64, 64],
            dtype="float32",
            pixels_uri=f"file:///objects/{survey}/T{i:03d}.npy",
            checksum="0" * 64,
        )
        for i, (ra, dec) in enumerate(positions)
    ]
    upsert_tiles(engine, creates)
    stored = sorted(tiles_by_id(engine, [c.id for c in creates]), key=lambda t: t.external_id)
    return [
        ScoredTile.from_tile(t, score=0.95, model_version=model_version, detector="lens_maskrcnn")
        for t in stored
    ]


def _candidates(tiles: list[ScoredTile], known: KnownLenses | None = None) -> list[AlertCandidate]:
    catalog = known or KnownLenses(["nowhere"], [0.0], [-89.0], source="test")
    return build_alerts(tiles, threshold=0.9, known=catalog, radius=5 * u.arcsec)


def _creates(cands: list[AlertCandidate]) -> list[AlertCreate]:
    return [c.create() for c in cands]


def _settings(stack_settings: Settings, hook: Hook, **over: Any) -> Settings:
    return stack_settings.model_copy(update={"alert_webhooks": [hook.url], **over})


def _delivery_rows(engine: Engine, target: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [
            dict(r)
            for r in conn.execute(
                text("SELECT * FROM alert_deliveries WHERE target = :t ORDER BY id"), {"t": target}
            ).mappings()
        ]


def test_a_replayed_batch_alerts_and_notifies_once(
    engine: Engine, stack_settings: Settings, model_version: str, hook: Hook
) -> None:
    known = KnownLenses.from_lenscat()
    lens = known.names[0], float(known.ra[0]), float(known.dec[0])
    # tile 0 sits on a lenscat entry, tile 1 one degree away, tile 2 scores below the threshold
    tiles = _scored(
        engine, model_version, 3, positions=[(lens[1], lens[2]), (lens[1], lens[2] - 1.0), (10.0, 10.0)]
    )
    tiles[2] = dataclasses.replace(tiles[2], score=0.2)
    cands = _candidates(tiles, known)
    assert len(cands) == 2
    other = webhook_target("https://hooks.example.org/not-configured-here")

    first = create_alerts(engine, _creates(cands), [hook.target, other])
    assert [str(a.tile_id) for a in first] == [tiles[0].tile_id, tiles[1].tile_id]
    assert [a.id for a in first.all] == [a.id for a in first]
    # the replay: same batch, same outcome, nothing new; the batch's alerts are still at hand
    replay = create_alerts(engine, _creates(cands), [hook.target, other])
    assert replay == [] and [a.id for a in replay.all] == [a.id for a in first]
    assert create_alerts(engine, _creates(cands + cands), [hook.target]) == []
    stored = alerts_for_tiles(engine, [t.tile_id for t in tiles], model_version=model_version, kind="lens")
    assert [a.id for a in stored] == [a.id for a in first]
    crossmatch = {str(a.tile_id): a.crossmatch for a in stored}
    assert crossmatch[tiles[0].tile_id]["known"] is True
    assert crossmatch[tiles[0].tile_id]["match"]["name"] == lens[0]
    assert crossmatch[tiles[1].tile_id]["known"] is False
    assert [d["state"] for d in _delivery_rows(engine, hook.target)] == ["pending", "pending"]

    notifier = Notifier(engine, _settings(stack_settings, hook))
    report = notifier.run(poll_s=0.05, idle_exit_s=0.5)
    assert report.sent == 2 and len(hook.calls) == 2
    # a second notifier pass and a third replay call nobody again
    create_alerts(engine, _creates(cands), [hook.target, other])
    Notifier(engine, _settings(stack_settings, hook)).run(poll_s=0.05, idle_exit_s=0.3)
    assert len(hook.calls) == 2

    by_alert = {int(c["alert"]): c for c in hook.calls}
    assert set(by_alert) == {a.id for a in first}
    call = by_alert[first[0].id]
    assert call["content_type"] == "application/json"
    assert call["body"] == cands[0].slack_payload() and lens[0] in call["body"]["text"]
    rows = _delivery_rows(engine, hook.target)
    assert [(d["state"], d["attempts"], d["last_status"]) for d in rows] == [("sent", 1, 200)] * 2
    assert all(d["sent_at"] is not None and d["claimed_at"] is None for d in rows)
    # the target this notifier has no URL for keeps its rows pending, for a notifier that has
    assert [d["state"] for d in _delivery_rows(engine, other)] == ["pending", "pending"]
    assert delivery_counts(engine)[hook.target] == {"sent": 2}
    listed = {a.id: a for a in recent_alerts(engine, limit=50, kind="lens")}
    assert listed[first[0].id].deliveries == {"sent": 1, "pending": 1}
    assert listed[first[0].id].sent_at is not None and listed[first[0].id].external_id == "T000"


def test_deliveries_of_a_round_the_database_left_are_made_again_at_once(
    engine: Engine, stack_settings: Settings, model_version: str, hook: Hook, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import OperationalError

    import detectors.notify

    alerts = create_alerts(engine, _creates(_candidates(_scored(engine, model_version, 2))), [hook.target])
    notifier = Notifier(engine, _settings(stack_settings, hook))

    def database_gone(*args: Any, **kw: Any) -> None:
        raise OperationalError("UPDATE alert_deliveries", {}, Exception("server closed the connection"))

    # the database goes away after the round claimed both deliveries and posted the first
    monkeypatch.setattr(detectors.notify, "record_delivery", database_gone)
    with pytest.raises(OperationalError):
        notifier.deliver_due()
    assert len(hook.calls) == 1
    monkeypatch.undo()
    # back: both are due now, not when their lease (a whole batch of calls long) runs out; the
    # one already posted comes again as its next attempt, which the receiver drops by its id
    report = notifier.deliver_due()
    assert report.claimed == 2 and report.sent == 2
    rows = _delivery_rows(engine, hook.target)
    assert [d["state"] for d in rows] == ["sent", "sent"]
    repeated = hook.calls[0]
    again = [c for c in hook.calls[1:] if c["delivery"] == repeated["delivery"]]
    assert len(again) == 1 and int(again[0]["attempt"]) == int(repeated["attempt"]) + 1
    assert {int(c["alert"]) for c in hook.calls} == {a.id for a in alerts}


def test_a_failing_webhook_is_retried_with_backoff_and_recorded(
    engine: Engine,
    stack_settings: Settings,
    model_version: str,
    hook: Hook,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (alert,) = create_alerts(engine, _creates(_candidates(_scored(engine, model_version, 1))), [hook.target])
    notifier = Notifier(engine, _settings(stack_settings, hook, webhook_max_attempts=5), backoff_base_s=2.0)
    hook.status = 500
    t0 = datetime.now(UTC) + timedelta(seconds=1)
    with caplog.at_level(logging.WARNING, logger="detectors.notify"):
        assert notifier.deliver_due(now=t0).retried == 1
        (row,) = _delivery_rows(engine, hook.target)
        assert (row["state"], row["attempts"], row["last_status"]) == ("pending", 1, 500)
        assert "HTTP 500" in row["last_error"] and row["next_attempt_at"] == t0 + timedelta(seconds=2)
        # backing off: not due again before 2 s, then after 4 s more
        assert notifier.deliver_due(now=t0 + timedelta(seconds=1.5)).claimed == 0
        assert notifier.deliver_due(now=t0 + timedelta(seconds=2.5)).retried == 1
        (row,) = _delivery_rows(engine, hook.target)
        assert row["attempts"] == 2 and row["next_attempt_at"] == t0 + timedelta(seconds=2.5 + 4)
        assert notifier.deliver_due(now=t0 + timedelta(seconds=6)).claimed == 0
        hook.status = 200
        assert notifier.deliver_due(now=t0 + timedelta(seconds=7)).sent == 1
    (row,) = _delivery_rows(engine, hook.target)
    assert (row["state"], row["attempts"], row["last_status"], row["last_error"]) == ("sent", 3, 200, None)
    assert hook.answered(500) == 2 and hook.answered(200) == 1
    lines = [r.getMessage() for r in caplog.records]
    assert sum(" attempt " in m and " failed: HTTP 500" in m for m in lines) == 2
    assert sum("RECOVERED" in m for m in lines) == 1
    assert all(hook.url not in m for m in lines)  # the URL (a secret for Slack) is never logged
    with engine.connect() as conn:
        assert conn.execute(text("SELECT sent_at FROM alerts WHERE id = :a"), {"a": alert.id}).scalar()


def test_a_delivery_fails_for_good_after_the_last_attempt(
    engine: Engine, stack_settings: Settings, model_version: str, hook: Hook
) -> None:
    create_alerts(engine, _creates(_candidates(_scored(engine, model_version, 2))), [hook.target])
    notifier = Notifier(engine, _settings(stack_settings, hook, webhook_max_attempts=2), backoff_base_s=1.0)
    hook.status = 503
    t0 = datetime.now(UTC) + timedelta(seconds=1)
    assert notifier.deliver_due(now=t0).retried == 2
    assert notifier.deliver_due(now=t0 + timedelta(seconds=5)).failed == 2
    rows = _delivery_rows(engine, hook.target)
    assert [(d["state"], d["attempts"], d["last_status"]) for d in rows] == [("failed", 2, 503)] * 2
    assert notifier.deliver_due(now=t0 + timedelta(hours=2)).claimed == 0
    assert len(hook.calls) == 4
    # each call names its attempt, so a receiver can tell a retry of one delivery from a repeat
    assert sorted((c["delivery"], c["attempt"]) for c in hook.calls) == sorted(
        (str(d["id"]), str(k)) for d in rows for k in (1, 2)
    )


def test_two_notifiers_never_send_one_delivery_twice(
    engine: Engine, stack_settings: Settings, model_version: str, hook: Hook
) -> None:
    n = 30
    create_alerts(engine, _creates(_candidates(_scored(engine, model_version, n))), [hook.target])
    hook.delay_s = 0.01
    settings = _settings(stack_settings, hook, webhook_rate_per_hour=10_000)
    notifiers = [Notifier(engine, settings, batch=4) for _ in range(2)]
    reports: list[Any] = [None, None]

    def work(i: int) -> None:
        reports[i] = notifiers[i].run(poll_s=0.02, idle_exit_s=1.0)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    ids = [c["delivery"] for c in hook.calls]
    assert len(ids) == n and len(set(ids)) == n
    assert reports[0].sent + reports[1].sent == n
    assert all(d["state"] == "sent" and d["attempts"] == 1 for d in _delivery_rows(engine, hook.target))


def test_claims_skip_locked_rows_instead_of_waiting(engine: Engine, model_version: str, hook: Hook) -> None:
    create_alerts(engine, _creates(_candidates(_scored(engine, model_version, 5))), [hook.target])
    ids = [d["id"] for d in _delivery_rows(engine, hook.target)]
    claimed: list[int] = []
    with engine.connect() as holder:
        # another notifier in the middle of its claim holds the first three rows
        holder.execute(
            text("SELECT id FROM alert_deliveries WHERE id = ANY(:ids) FOR UPDATE"), {"ids": ids[:3]}
        )

        def claim() -> None:
            now = datetime.now(UTC) + timedelta(seconds=1)
            claimed.extend(
                c.id for c in claim_due_deliveries(engine, limit=10, now=now, targets=[hook.target])
            )

        worker = threading.Thread(target=claim)
        worker.start()
        worker.join(timeout=10)
        blocked = worker.is_alive()
        holder.rollback()
    worker.join(timeout=30)
    assert not blocked, "the claim waited for locked rows instead of skipping them"
    assert sorted(claimed) == ids[3:]


def test_the_rate_limit_holds_back_deliveries(
    engine: Engine, stack_settings: Settings, model_version: str, hook: Hook
) -> None:
    create_alerts(engine, _creates(_candidates(_scored(engine, model_version, 5))), [hook.target])
    notifier = Notifier(engine, _settings(stack_settings, hook, webhook_rate_per_hour=3))
    t0 = datetime.now(UTC) + timedelta(seconds=1)
    assert notifier.deliver_due(now=t0).sent == 3
    assert notifier.deliver_due(now=t0 + timedelta(minutes=30)).claimed == 0
    assert delivery_counts(engine)[hook.target] == {"sent": 3, "pending": 2}
    # an hour after the first three, the rest go
    assert notifier.deliver_due(now=t0 + timedelta(minutes=61)).sent == 2
    assert len(hook.calls) == 5
    # two notifiers at once share the limit: a concurrent claim never exceeds it
    create_alerts(engine, _creates(_candidates(_scored(engine, model_version, 6))), [hook.target])
    t1 = t0 + timedelta(minutes=200)
    results: list[int] = []
    barrier = threading.Barrier(2)

    def claim() -> None:
        barrier.wait()
        got = claim_due_deliveries(engine, limit=10, now=t1, targets=[hook.target], rate_per_hour=3)
        results.append(len(got))

    threads = [threading.Thread(target=claim) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results) == [0, 3]
    # claimed but not yet recorded (in flight) counts too: nothing more this hour
    assert claim_due_deliveries(engine, limit=10, now=t1, targets=[hook.target], rate_per_hour=3) == []


def test_a_hanging_webhook_never_holds_up_new_alerts(
    engine: Engine, stack_settings: Settings, model_version: str, hook: Hook
) -> None:
    (first,) = create_alerts(engine, _creates(_candidates(_scored(engine, model_version, 1))), [hook.target])
    hook.delay_s = 3.0
    notifier = Notifier(engine, _settings(stack_settings, hook), timeout_s=10.0)
    worker = threading.Thread(target=notifier.deliver_due)
    worker.start()
    try:
        assert hook.started.wait(timeout=30)
        # the detector's next batch: alerts and outbox rows are written while the call hangs
        # (given the URL, as the settings have it: it is stored under the target's name)
        started = time.monotonic()
        more = create_alerts(engine, _creates(_candidates(_scored(engine, model_version, 3))), [hook.url])
        assert len(more) == 3 and time.monotonic() - started < 2.0
        assert worker.is_alive()
    finally:
        worker.join(timeout=30)
    assert [(d.state, d.attempts) for d in deliveries(engine, alert_id=first.id)] == [("sent", 1)]
    assert sorted(d["state"] for d in _delivery_rows(engine, hook.target)) == ["pending"] * 3 + ["sent"]
    with engine.connect() as conn:
        assert not conn.execute(
            text("SELECT count(*) FROM alert_deliveries WHERE target LIKE 'http%'")
        ).scalar()
