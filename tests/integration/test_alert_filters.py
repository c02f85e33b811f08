"""Alert filters against the real Kafka broker and PostgreSQL: exactly once, and attacks.

Tiles and their detections are written straight into the database and announced on
``tiles.detected`` as the detector does (the detector's own announcements are checked in
test_detector_service.py), so these tests need no model. They check that

- a filter's topic (read ``read_committed``) and its webhook receive exactly the newly detected
  tiles that match, once each — also when the service is restarted and replays every
  announcement, when the detector announces a tile again, and when the publisher dies between its
  Kafka commit and its database mark, or before its Kafka commit;
- hostile clauses are refused by ``galsift filter add`` with one clear line within the time limit
  and store nothing, and, written into the table anyway, fail one by one at run time (recorded on
  the filter) while the service keeps serving the good filter, and change nothing.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from ingest_support import StageRunner, isolated_settings, wait_for
from kafka import KafkaConsumer, TopicPartition
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError
from test_sql_reader import _fingerprint

from db import repo
from db.filters import get_filter, list_filters
from db.models import ModelVersionCreate, TileCreate
from detectors.filters import MATCH_HEADER, FilterStage, TopicPublisher
from detectors.filters import run as run_filters
from galsift import messages
from galsift.kafka import make_producer
from galsift.settings import Settings

pytestmark = pytest.mark.integration

#: the filters' statement timeout in these tests, and what a refusal may take beyond it
TIMEOUT_S = 2.0
SLACK_S = 4.0


class Webhook:
    """A local webhook that records every call (body and headers)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.calls.append({"body": json.loads(body), "match": self.headers.get("X-Galsift-Match")})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook/SECRET"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


@dataclass
class Sky:
    """Tiles of one survey with a lens score each (written as the detector would)."""

    engine: Engine
    survey: str
    version: str
    scores: dict[str, float]

    def add(self, names_scores: dict[str, float]) -> list[str]:
        """Store tiles with these lens scores; returns their ids."""
        ids = [messages.tile_id(self.survey, n) for n in names_scores]
        repo.upsert_tiles(
            self.engine,
            [
                TileCreate(
                    id=uuid.UUID(t),
                    survey=self.survey,
                    external_id=n,
                    ra=10.0 + i,
                    dec=-5.0,
                    healpix=0,
                    bands=["g", "r", "z"],
                    pixel_scale=0.262,
                    shape=[3, 8, 8],
                    dtype="float32",
                    pixels_uri=f"file:///objects/{self.survey}/{n}.npy",
                    checksum="0" * 64,
                )
                for i, (t, n) in enumerate(zip(ids, names_scores, strict=True))
            ],
        )
        with self.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO detections (tile_id, model_version, detector, label, score, extra) "
                    "VALUES (:t, :v, 'lens_finder', 'lens', :s, '{}')"
                ),
                [
                    {"t": t, "v": self.version, "s": s}
                    for t, s in zip(ids, names_scores.values(), strict=True)
                ],
            )
        self.scores.update(zip(ids, names_scores.values(), strict=True))
        return ids


@pytest.fixture
def sky(engine: Engine) -> Sky:
    tag = uuid.uuid4().hex[:8]
    version = f"filtertest-lens-{tag}"
    repo.register_model_version(
        engine, ModelVersionCreate(name=version, variant="test", checkpoint_uri="file:///x", checksum="f" * 8)
    )
    return Sky(engine, f"filtertest-{tag}", version, {})


def announce(settings: Settings, sky: Sky, ids: list[str]) -> None:
    """Publish ``tiles.detected`` for these tiles, as the detector does after its write."""
    producer = make_producer(settings)
    try:
        for t in ids:
            producer.send(
                settings.topics.detected,
                key=t.encode(),
                value=messages.encode(
                    "detected",
                    {"tile_id": t, "model_versions": [sky.version], "detected_at": datetime.now(UTC)},
                ),
                headers=messages.headers("detected"),
            )
        producer.flush()
    finally:
        producer.close()


def read_committed(settings: Settings, topic: str, *, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Every committed record of ``topic`` (as a ``read_committed`` subscriber sees it), decoded."""
    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(tps)
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            for records in consumer.poll(timeout_ms=500).values():
                for r in records:
                    value = messages.decode("filter_match", r.value, header=messages.header_value(r.headers))
                    assert dict(r.headers)[MATCH_HEADER] == str(value["match_id"]).encode()
                    out.append(value)
        return out
    finally:
        consumer.close()


def cli(settings: Settings, *argv: str) -> int:
    """Run ``galsift …`` in this process (the handler, as the console script calls it)."""
    from galsift.cli import build_parser

    args = build_parser().parse_args(list(argv))
    return int(args.func(args, settings) or 0)


def caught_up(settings: Settings, group: str) -> bool:
    """Whether ``group`` has committed offsets at the end of every ``tiles.detected`` partition."""
    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, group_id=group, enable_auto_commit=False
    )
    try:
        topic = settings.topics.detected
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        ends = consumer.end_offsets(tps)
        return bool(tps) and all((consumer.committed(tp) or 0) >= ends[tp] for tp in tps)
    finally:
        consumer.close(autocommit=False)


def serve(settings: Settings, group: str, *, timeout_s: float = 300.0) -> None:
    """Run ``galsift filters`` (consumer, publisher, webhook sender) until its group has read
    every announcement, then stop it (it makes one last round of publishing and webhook calls)."""
    errors: list[BaseException] = []
    stages: list[FilterStage] = []

    def target() -> None:
        try:
            run_filters(settings, group=group, timeout_s=5.0, on_start=stages.append)
        except BaseException as exc:  # handed to the test thread below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)  # the stage's signal handlers stay pytest's
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not (stages and caught_up(settings, group)) and thread.is_alive():
            assert time.monotonic() < deadline, "the filter service did not catch up"
            time.sleep(0.5)
    finally:
        for stage in stages:
            stage.stop()
        thread.join(timeout_s)
    assert not thread.is_alive(), "the filter service did not stop"
    if errors:
        raise errors[0]


def states(engine: Engine, name: str) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT m.tile_id::text, m.topic_state || '/' || coalesce(m.webhook_state, '-') FROM filter_matches m "
                "JOIN alert_filters f ON f.id = m.filter_id WHERE f.name = :n"
            ),
            {"n": name},
        )
        return {r[0]: r[1] for r in rows}


# -- exactly once ---------------------------------------------------------------------------------------------
def test_a_filter_receives_exactly_the_new_matching_detections_once(
    stack_settings: Settings, engine: Engine, sky: Sky, webhook: Webhook, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = isolated_settings(stack_settings, "filters", filter_timeout_s=TIMEOUT_S)
    tag = sky.survey.rsplit("-", 1)[1]
    name, quiet = f"lenses-{tag}", f"nothing-{tag}"
    # detected before the filter existed: never matched, even though it would be
    old = sky.add({"old_lens": 0.95})
    announce(settings, sky, old)
    time.sleep(0.05)

    clause = f"lens_score > 0.5 AND survey = '{sky.survey}'"
    assert cli(settings, "filter", "add", name, clause, "--owner", "alice", "--webhook", webhook.url) == 0
    assert cli(settings, "filter", "add", quiet, "lens_score > 2", "--owner", "bob") == 0
    out = capsys.readouterr().out
    assert f"filter.{name}" in out
    info = get_filter(engine, name)
    assert info is not None and info.webhook is not None and "SECRET" not in info.webhook

    # the dry run sees the existing rows (the old lens too), stores nothing
    assert cli(settings, "filter", "test", name, "--json") == 0
    dry = json.loads(capsys.readouterr().out)
    assert [row[0] for row in dry["rows"]] == old
    assert states(engine, name) == {}

    lenses = sky.add({"lens_a": 0.91, "lens_b": 0.62, "lens_c": 0.99})
    galaxies = sky.add({"gal_a": 0.02, "gal_b": 0.49, "gal_c": 0.3})
    announce(settings, sky, lenses + galaxies)
    group = f"filters-{tag}"
    serve(settings, group)

    def check() -> None:
        got = read_committed(settings, f"filter.{name}")
        assert sorted(m["tile_id"] for m in got) == sorted(lenses)
        assert len({m["match_id"] for m in got}) == len(lenses)
        assert {m["filter"] for m in got} == {name}
        by_tile = {m["tile_id"]: m for m in got}
        for t in lenses:
            assert by_tile[t]["lens_score"] == pytest.approx(sky.scores[t])
            assert by_tile[t]["model_versions"] == [sky.version]
        assert read_committed(settings, f"filter.{quiet}") == []
        assert sorted(c["body"]["tile_id"] for c in webhook.calls) == sorted(lenses)
        assert sorted(int(c["match"]) for c in webhook.calls) == sorted(m["match_id"] for m in got)
        assert states(engine, name) == dict.fromkeys(lenses, "published/sent")

    check()

    # the service restarted with its group (nothing new), then a new group replaying every
    # announcement from the start, then the detector announcing the tiles again
    serve(settings, group)
    serve(settings, f"{group}-replay")
    announce(settings, sky, lenses + galaxies)
    serve(settings, group)
    check()

    # a later lens is matched, and only it
    late = sky.add({"lens_late": 0.8})
    announce(settings, sky, late + galaxies)
    serve(settings, group)
    lenses += late
    check()
    listed = {f.name: f for f in list_filters(engine, owner="alice")}
    assert set(listed) >= {name} and quiet not in listed
    assert listed[name].matches == listed[name].published == listed[name].webhook_sent == 4

    assert cli(settings, "filter", "remove", quiet) == 0
    assert get_filter(engine, quiet) is None


def test_calls_of_a_round_the_database_left_are_made_again_at_once(
    stack_settings: Settings, engine: Engine, sky: Sky, webhook: Webhook, monkeypatch: pytest.MonkeyPatch
) -> None:
    import db.filters
    from detectors.filters import FilterWebhookSender

    settings = isolated_settings(stack_settings, "filters", filter_timeout_s=TIMEOUT_S)
    tag = sky.survey.rsplit("-", 1)[1]
    name = f"sender-{tag}"
    clause = f"survey = '{sky.survey}'"
    assert cli(settings, "filter", "add", name, clause, "--owner", "dana", "--webhook", webhook.url) == 0
    tiles = sky.add({"sender_a": 0.9, "sender_b": 0.8})
    announce(settings, sky, tiles)
    serve(settings, f"filters-{tag}")
    assert states(engine, name) == dict.fromkeys(tiles, "published/sent")
    # both calls due again (as after a failed attempt), and the next round's outcomes cannot be
    # stored: the database goes away after the calls were claimed and the first one was made
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE filter_matches m SET webhook_state = 'pending', webhook_next_at = now() "
                "FROM alert_filters f WHERE f.id = m.filter_id AND f.name = :n"
            ),
            {"n": name},
        )
    sender = FilterWebhookSender(engine, settings)

    def database_gone(*args: Any, **kw: Any) -> None:
        raise OperationalError("UPDATE filter_matches", {}, Exception("server closed the connection"))

    monkeypatch.setattr(db.filters, "record_webhook", database_gone)
    before = len(webhook.calls)
    with pytest.raises(OperationalError):
        sender.deliver_due()
    assert len(webhook.calls) == before + 1
    monkeypatch.undo()
    # the database is back: the round's two calls are made now, not when their lease (a whole
    # round's calls long, ~10 minutes) runs out; the one already made comes again as its next
    # attempt, which the receiver drops by its match id
    assert sender.deliver_due() == 2
    assert states(engine, name) == dict.fromkeys(tiles, "published/sent")
    repeated = webhook.calls[before]["match"]
    assert sorted(c["match"] for c in webhook.calls[before + 1 :]) == sorted(
        str(i) for i in match_ids(engine, name)
    )
    assert repeated in {c["match"] for c in webhook.calls[before + 1 :]}


def match_ids(engine: Engine, name: str) -> list[int]:
    with engine.connect() as conn:
        return [
            int(r[0])
            for r in conn.execute(
                text(
                    "SELECT m.id FROM filter_matches m JOIN alert_filters f ON f.id = m.filter_id WHERE f.name = :n"
                ),
                {"n": name},
            )
        ]


class SimulatedCrashError(Exception):
    """A publisher dying at a chosen point."""


class CrashingPublisher(TopicPublisher):
    """Dies after its Kafka commit (``after``) or before it (``before``), leaving rows ``sending``."""

    def __init__(self, *args: Any, when: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.when = when
        #: the dead publisher's producer, closed by the test once a new one has fenced it
        self.zombies: list[Any] = []

    def before_commit(self, claims: Any) -> None:
        if self.when == "before":
            raise SimulatedCrashError("before the Kafka commit")

    def after_commit(self, claims: Any) -> None:
        if self.when == "after":
            raise SimulatedCrashError("after the Kafka commit, before the database mark")

    def release(self) -> None:
        # a dead process closes nothing: keep the producer's open transaction as it is, drop the lock
        self.zombies.append(self._producer)
        self._producer = None
        self._consumer = None
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None:
            conn.invalidate()


@pytest.mark.parametrize("when", ["after", "before"])
def test_a_publisher_dying_mid_publish_loses_nothing_and_repeats_nothing(
    stack_settings: Settings, engine: Engine, sky: Sky, when: str
) -> None:
    settings = isolated_settings(stack_settings, f"filtercrash{when}", filter_timeout_s=TIMEOUT_S)
    tag = sky.survey.rsplit("-", 1)[1]
    name = f"crash-{when}-{tag}"
    assert cli(settings, "filter", "add", name, f"lens_score > 0.5 AND survey = '{sky.survey}'") == 0
    lenses = sky.add({f"lens{i}": 0.9 for i in range(5)})
    announce(settings, sky, lenses + sky.add({"gal": 0.1}))
    # the consumer loop alone: the matches are stored, pending
    runner = StageRunner(FilterStage(settings, engine, group_id=f"filters-{tag}", raise_exc=True)).start()  # type: ignore[arg-type]
    wait_for(lambda: caught_up(settings, f"filters-{tag}"), timeout_s=300, what="the filter stage")
    runner.join(timeout_s=60, stop=True)
    assert set(states(engine, name).values()) == {"pending/-"}

    crashing = CrashingPublisher(engine, settings, when=when)
    try:
        assert crashing.round() == 0  # it died mid-round
        assert set(states(engine, name).values()) == {"sending/-"}
        if when == "after":
            # committed in Kafka, not marked in the database: the window a plain outbox repeats
            assert len(read_committed(settings, f"filter.{name}")) == 5
        else:
            assert read_committed(settings, f"filter.{name}") == []

        # the next publisher fences the dead one's producer, reads the topic and settles the rows
        publisher = TopicPublisher(engine, settings)
        try:
            assert publisher.round() == (5 if when == "before" else 0)
        finally:
            publisher.release()
    finally:
        for zombie in crashing.zombies:
            with contextlib.suppress(Exception):  # fenced: it may complain, it must not write
                zombie.close(timeout=2)
    got = read_committed(settings, f"filter.{name}")
    assert sorted(m["tile_id"] for m in got) == sorted(lenses)
    assert set(states(engine, name).values()) == {"published/-"}


# -- attacks -------------------------------------------------------------------------------------------------
def hostile_clauses(owner: str) -> list[str]:
    """WHERE clauses that must never succeed: test_sql_reader's attacks, in clause form."""
    return [
        # breaking out of the clause: more than one expression
        "1=1) UNION SELECT id FROM public.tiles --",
        "true) UNION SELECT tile_id FROM tile_scores WHERE (true",
        "true) OR (true",
        "true; DROP TABLE public.tiles",
        "true; DELETE FROM public.labels",
        "true UNION ALL SELECT id FROM galsift_api.tiles",
        "true ORDER BY 1",
        "true LIMIT 1",
        "true FOR UPDATE",
        "true GROUP BY 1",
        "true /*",
        "",
        # time and size
        "pg_sleep(60) IS NULL",
        "set_config('statement_timeout', '0', false) IS NOT NULL AND pg_sleep(60) IS NULL",
        "(WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r) > 0",
        "(SELECT count(*) FROM generate_series(1, 100000) a CROSS JOIN generate_series(1, 100000) b) > 0",
        # server files, large objects
        "length(pg_read_file('/etc/passwd')) > 0",
        "pg_read_binary_file('postgresql.conf') IS NOT NULL",
        "EXISTS (SELECT pg_ls_dir('.'))",
        "lo_import('/etc/passwd') > 0",
        "lo_create(0) > 0",
        "lo_from_bytea(0, '\\x41'::bytea) > 0",
        # data-modifying subqueries, writes through functions, locks
        "(WITH d AS (DELETE FROM public.labels RETURNING 1) SELECT count(*) FROM d) >= 0",
        "(WITH u AS (UPDATE galsift_api.tiles SET survey = 'x' RETURNING 1) SELECT count(*) FROM u) >= 0",
        "query_to_xml('DELETE FROM public.tiles', true, true, '') IS NOT NULL",
        "EXISTS (SELECT 1 FROM galsift_api.tiles FOR UPDATE)",
        "nextval('public.labels_id_seq') > 0",
        "pg_try_advisory_lock(27167, 1)",
        "EXISTS (SELECT * FROM dblink('dbname=postgres', 'DELETE FROM tiles') AS t(x text))",
        # roles, settings, search_path
        f"set_config('role', '{owner}', false) IS NOT NULL",
        "set_config('search_path', 'public, pg_catalog', false) IS NOT NULL "
        "AND EXISTS (SELECT 1 FROM public.embeddings)",
        "set_config('transaction_read_only', 'off', false) IS NOT NULL",
        "current_setting('data_directory') IS NOT NULL",
        # secrets: the catalogue, webhooks, other users' labels and filters
        "EXISTS (SELECT rolpassword FROM pg_authid)",
        "EXISTS (SELECT passwd FROM pg_shadow)",
        "EXISTS (SELECT webhook_url FROM public.saved_searches)",
        "EXISTS (SELECT webhook_url FROM public.alert_filters)",
        "EXISTS (SELECT author FROM public.hitl_labels)",
        "(SELECT concept FROM public.hitl_labels LIMIT 1)::int = 1",
        # signals, notifications, maintenance
        "pg_notify('galsift_filter_test', 'pwned') IS NULL",
        # (in a count, not an EXISTS: PostgreSQL drops an EXISTS subquery's select list unevaluated)
        "(SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE pid <> pg_backend_pid()) >= 0",
        "(SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity WHERE pid <> pg_backend_pid()) >= 0",
        "pg_reload_conf()",
    ]


#: tables the filter service writes while it serves (its matches, its counters, the filters' errors)
SERVICE_TABLES = ("public.alert_filters", "public.filter_matches", "public.stage_stats")


def test_hostile_clauses_are_refused_and_the_service_keeps_serving(
    stack_settings: Settings,
    engine: Engine,
    sky: Sky,
    webhook: Webhook,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import psycopg

    from db.sql import reader_conninfo

    settings = isolated_settings(stack_settings, "filterattack", filter_timeout_s=TIMEOUT_S)
    tag = sky.survey.rsplit("-", 1)[1]
    sky.add({"seed": 0.7})  # the validation sample is not empty
    with engine.connect() as conn:
        owner = str(conn.execute(text("SELECT current_user")).scalar_one())
    clauses = hostile_clauses(owner)
    assert len(clauses) >= 30
    before = _fingerprint(engine)
    with psycopg.connect(reader_conninfo(stack_settings, login=owner), autocommit=True) as listener:
        listener.execute("LISTEN galsift_filter_test")

        # through `galsift filter add`: refused, one line, within the time limit, nothing stored
        problems = []
        for i, clause in enumerate(clauses):
            started = time.monotonic()
            status = cli(settings, "filter", "add", f"evil{i}-{tag}", clause, "--webhook", webhook.url)
            took = time.monotonic() - started
            captured = capsys.readouterr()
            lines = captured.err.strip().splitlines()
            if status != 2:
                problems.append(f"status {status}: {clause}")
            elif len(lines) != 1 or not lines[0].startswith("galsift filter: ") or len(lines[0]) < 30:
                problems.append(f"unclear: {clause} -> {captured.err!r}")
            elif took > TIMEOUT_S + SLACK_S:
                problems.append(f"took {took:.1f} s: {clause}")
            if get_filter(engine, f"evil{i}-{tag}") is not None:
                problems.append(f"stored: {clause}")
        assert problems == [], "\n".join(problems)
        # bad names are refused too
        for bad in ("UPPER", "a.b", "x" * 65, "../x", "a b"):
            assert cli(settings, "filter", "add", bad, "true") == 2
        capsys.readouterr()
        assert _fingerprint(engine) == before

        # written into the table anyway: each fails at run time, alone, and is recorded
        good = f"good-{tag}"
        assert cli(settings, "filter", "add", good, f"lens_score > 0.5 AND survey = '{sky.survey}'") == 0
        capsys.readouterr()
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO alert_filters (name, owner, clause, topic, webhook_url, active, error_count) "
                    "VALUES (:n, 'mallory', :c, :t, :w, true, 0)"
                ),
                [
                    {"n": f"evil{i}-{tag}", "c": c, "t": f"filter.evil{i}-{tag}", "w": webhook.url}
                    for i, c in enumerate(clauses)
                ],
            )
        lenses = sky.add({"lens_a": 0.9, "lens_b": 0.8})
        galaxies = sky.add({"gal_a": 0.1})
        before = {k: v for k, v in _fingerprint(engine).items() if k not in SERVICE_TABLES}
        announce(settings, sky, lenses + galaxies)
        started = time.monotonic()
        serve(settings, f"filters-{tag}")
        took = time.monotonic() - started

        # the good filter served, once per match
        assert sorted(m["tile_id"] for m in read_committed(settings, f"filter.{good}")) == sorted(lenses)
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT f.name, f.error_count, f.last_error, count(m.id) FROM alert_filters f "
                    "LEFT JOIN filter_matches m ON m.filter_id = f.id WHERE f.name LIKE :p GROUP BY f.id"
                ),
                {"p": f"evil%-{tag}"},
            ).all()
        assert len(rows) == len(clauses)
        for filter_name, errors, last_error, n in rows:
            clause = clauses[int(filter_name[4:].split("-")[0])]
            assert n == 0, f"matched: {clause}"
            assert errors >= 1 and last_error and "\n" not in last_error, (clause, last_error)
        # every filter ran within its limit: the batch took about the sum of the limits at most
        slow = 4  # the clauses that only run out of time
        assert took < slow * (TIMEOUT_S + SLACK_S) + len(clauses) * 2.0 + 30, took
        # no webhook call: only the hostile filters have one, and they matched nothing
        assert webhook.calls == []
        assert list(listener.notifies(timeout=0.5, stop_after=1)) == []
    after = {k: v for k, v in _fingerprint(engine).items() if k not in SERVICE_TABLES}
    assert after == before

    # and it keeps serving: a later lens reaches the good filter
    late = sky.add({"lens_late": 0.95})
    announce(settings, sky, late)
    serve(settings, f"filters-{tag}")
    got = read_committed(settings, f"filter.{good}")
    assert sorted(m["tile_id"] for m in got) == sorted(lenses + late)
