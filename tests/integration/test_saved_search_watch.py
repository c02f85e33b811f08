"""Saved searches keep watching: real Kafka, the real PostgreSQL, the real engine and encoder.

A scientist seeds a session with two real lens candidates, marks three real galaxies bad and
saves it with a webhook. A new tile that looks like one of the lenses is then published to
Kafka, goes through ingest and the encoder, and the watcher notifies the owner (a stored row and
one webhook call) within a minute of its arrival; a new tile like the galaxies, and the tiles that
were there before the save, notify nobody. A second watcher that replays the whole topic adds
no row and no call; a malformed message goes to the dead-letter topic.

The webhook machinery is then checked on its own, on the database: retries with back-off after
a 503, a 404 given up at once, two senders racing never posting one notification twice, and a
call interrupted by a dying watcher posted again (at least once, same notification id).
"""

from __future__ import annotations

import argparse
import csv
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ingest_support import StageRunner, isolated_settings, read_topic, wait_for
from sqlalchemy import Engine, text

from db.hitl import create_session, save_search
from db.models import EmbeddingCreate, HitlSessionCreate, ModelVersionCreate, SavedSearch, TileCreate
from db.notifications import claim_webhook, store_notifications, sweep_interrupted
from db.repo import register_model_version, upsert_embeddings, upsert_tiles
from encoder.service import SHIPPED_CHECKPOINT, Embedder, EncodeStage
from galsift import messages
from galsift.constants import EMBEDDING_DIM
from galsift.kafka import make_producer
from galsift.settings import Settings
from hitl.engine import SearchEngine
from hitl.learner import Learner
from hitl.service import WatchStage, WebhookSender, register
from ingest.publish import TilePublisher
from ingest.readers import SurveyTile, read_image
from ingest.service import IngestStage

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "ingest" / "demo_tiles"


class Hook:
    """A local webhook: records every call; answers the queued statuses, then ``status``."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.status = 200
        self.queued: list[int] = []
        self._lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with hook._lock:
                    status = hook.queued.pop(0) if hook.queued else hook.status
                    hook.calls.append(
                        {
                            "body": json.loads(body),
                            "notification": self.headers.get("X-Galsift-Notification"),
                            "attempt": self.headers.get("X-Galsift-Attempt"),
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
        # a path of its own, so no test sees another's calls
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook/{uuid.uuid4().hex}"

    def ids(self) -> list[int]:
        with self._lock:
            return [int(c["notification"]) for c in self.calls]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


def _demo_rows(folder: str, column: str, value: str, n: int) -> list[dict[str, str]]:
    with (DEMO / folder / "labels.csv").open(newline="") as fh:
        return [r for r in csv.DictReader(fh) if r[column] == value][:n]


def _tile(survey: str, name: str, row: dict[str, str], folder: str, *, mirror: bool = False) -> SurveyTile:
    tile = read_image(
        DEMO / folder / row["file"],
        survey=survey,
        external_id=name,
        ra=float(row["ra"]) if row.get("ra") else None,
        dec=float(row["dec"]) if row.get("dec") else None,
        pixel_scale=float(row["pixel_scale"]) if row.get("pixel_scale") else None,
    )
    # a later observation of the same object: the sky does not care about left and right
    return replace(tile, pixels=np.ascontiguousarray(tile.pixels[:, :, ::-1])) if mirror else tile


def _through_the_pipeline(settings: Settings, engine: Engine, tiles: list[SurveyTile], uid: str) -> None:
    """Publish tiles to Kafka; run ingest and the encoder until every tile's vector is stored.

    Both stages then stop after committing, so their tiles.embedded messages are out.
    """
    with TilePublisher(settings) as pub:
        for tile in tiles:
            pub.send(tile)
    ingest = StageRunner(IngestStage(settings, engine, group_id=f"ingest-{uid}")).start()
    encode_stage = EncodeStage(
        settings, engine, Embedder(SHIPPED_CHECKPOINT, device="cpu"), group_id=f"enc-{uid}"
    )
    encode = StageRunner(encode_stage).start()  # type: ignore[arg-type]  # any Stage runs
    ids = [uuid.UUID(t.tile_id) for t in tiles]

    def embedded() -> bool:
        with engine.connect() as conn:
            n = conn.execute(text("SELECT count(*) FROM embeddings WHERE tile_id = ANY(:ids)"), {"ids": ids})
            return int(n.scalar_one()) == len(ids)

    try:
        wait_for(embedded, timeout_s=90, interval_s=0.3, what="the tiles ingested and embedded")
        # the encoder publishes and commits right after storing: wait for its counters to say so
        wait_for(
            lambda: encode_stage.counters.accepted >= len(ids), timeout_s=30, what="the encoder's commit"
        )
    finally:
        ingest.join(timeout_s=60, stop=True)
        encode.join(timeout_s=60, stop=True)


def _notifications(engine: Engine, search_id: int) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [
            dict(r)
            for r in conn.execute(
                text(
                    "SELECT n.*, t.external_id, t.ingested_at FROM search_notifications n "
                    "JOIN tiles t ON t.id = n.tile_id WHERE n.saved_search_id = :s ORDER BY n.id"
                ),
                {"s": search_id},
            ).mappings()
        ]


def _parser() -> argparse.ArgumentParser:
    """A ``galsift`` parser with the commands :func:`hitl.service.register` adds."""
    from galsift.cli import CommandGroups

    parser = argparse.ArgumentParser(prog="galsift")
    top = parser.add_subparsers(dest="command", required=True)
    groups = CommandGroups(top=top, train=top, eval=top, bench=top)
    register(groups)
    return parser


class Watcher:
    """The ``galsift watch`` process's two loops, in threads: the stage and the webhook sender."""

    def __init__(self, settings: Settings, engine: Engine, group: str) -> None:
        self.sender = WebhookSender(engine, settings, poll_s=0.5, timeout_s=5.0).start()
        self.stage = WatchStage(settings, engine, group_id=group, on_pending=self.sender.wake)
        self.runner = StageRunner(self.stage)  # type: ignore[arg-type]  # any Stage runs

    def start(self) -> Watcher:
        self.runner.start()
        return self

    def stop(self) -> Any:
        try:
            return self.runner.join(timeout_s=60, stop=True)
        finally:
            self.sender.stop()


def test_a_new_matching_tile_notifies_the_owner_once_and_nothing_else_does(
    stack_settings: Settings, engine: Engine, hook: Hook, tmp_path: Path
) -> None:
    # a refresh well under the test's deadline; the catch-up covers the save-to-reload gap anyway
    settings = isolated_settings(stack_settings, "watch", watch_refresh_s=1.0)
    uid = uuid.uuid4().hex[:6]
    survey = f"watch_{uid}"
    owner = f"alice_{uid}"
    lens_rows = _demo_rows("cfhtls_lens_candidates", "lens", "1", 2)
    galaxy_rows = _demo_rows("gz_decals_examples", "kind", "a", 3)
    lenses = [_tile(survey, f"lens_{i}", r, "cfhtls_lens_candidates") for i, r in enumerate(lens_rows)]
    galaxies = [_tile(survey, f"gal_{i}", r, "gz_decals_examples") for i, r in enumerate(galaxy_rows)]
    _through_the_pipeline(settings, engine, [*lenses, *galaxies], uid)

    # the scientist's session: two lenses as seeds, the galaxies marked bad, saved with a webhook
    with engine.connect() as conn:
        version = conn.execute(
            text("SELECT model_version FROM embeddings WHERE tile_id = :t"),
            {"t": uuid.UUID(lenses[0].tile_id)},
        ).scalar_one()
    search_engine = SearchEngine(engine)
    session = search_engine.new_session(
        owner=owner, concept=f"lens_{uid}", model_version=version, tile_ids=[t.tile_id for t in lenses]
    )
    search_engine.label(session.id, [(t.tile_id, False) for t in galaxies])
    saved = search_engine.save(session.id, threshold=0.5, webhook_url=hook.url)
    assert saved.id is not None
    learner = Learner.from_json(saved.learner)
    assert learner.kind == "logistic"

    # a watcher of its own group reads tiles.embedded from the start: the five tiles that were
    # there before the save are scored and must not notify (two of them are the seeds themselves)
    watcher = Watcher(settings, engine, f"watch-{uid}").start()
    try:
        new_lens = _tile(survey, "lens_0_again", lens_rows[0], "cfhtls_lens_candidates", mirror=True)
        new_galaxy = _tile(survey, "gal_0_again", galaxy_rows[0], "gz_decals_examples", mirror=True)
        _through_the_pipeline(settings, engine, [new_lens, new_galaxy], uid)
        wait_for(
            lambda: len(hook.calls) >= 1 and watcher.stage.counters.consumed >= 7,
            timeout_s=90,
            what="the webhook call and all seven embedded tiles consumed",
        )
        wait_for(
            lambda: {n["webhook_state"] for n in _notifications(engine, saved.id or 0)} <= {"sent", "failed"},
            timeout_s=30,
            what="the deliveries recorded",
        )
    finally:
        counters = watcher.stop()
    assert counters.rejected == 0

    rows = _notifications(engine, saved.id)
    assert [r["external_id"] for r in rows] == ["lens_0_again"], rows
    note = rows[0]
    assert note["score"] >= 0.5
    assert note["learner_version"] == saved.learner_version
    assert note["webhook_attempts"] == 1 and note["webhook_error"] is None
    assert (note["created_at"] - note["ingested_at"]).total_seconds() < 60, "within a minute of arrival"
    # the look-alike galaxy was embedded and scored below the threshold (not merely missed)
    with engine.connect() as conn:
        vectors = {
            r[0]: np.asarray(r[1].to_numpy() if hasattr(r[1], "to_numpy") else r[1], np.float32)
            for r in conn.execute(
                text(
                    "SELECT tile_id, embedding FROM embeddings WHERE model_version = :v AND tile_id = ANY(:ids)"
                ),
                {"v": version, "ids": [uuid.UUID(new_galaxy.tile_id), uuid.UUID(lenses[1].tile_id)]},
            )
        }
    assert float(learner.score(vectors[uuid.UUID(new_galaxy.tile_id)][None])[0]) < 0.5
    # and an old tile that would match (a seed) notified nobody: it arrived before the save
    assert float(learner.score(vectors[uuid.UUID(lenses[1].tile_id)][None])[0]) >= 0.5

    assert len(hook.calls) == 1
    call = hook.calls[0]
    assert call["status"] == 200 and call["notification"] == str(note["id"])
    body = call["body"]
    assert body["saved_search"]["owner"] == owner and body["saved_search"]["id"] == saved.id
    assert body["tile"]["external_id"] == "lens_0_again" and body["tile"]["survey"] == survey
    assert "lens_0_again" in body["text"]

    # a restarted watcher in a new group replays the whole topic, plus a malformed message
    producer = make_producer(settings)
    producer.send(
        settings.topics.embedded,
        key=b"bad",
        value=messages.encode("embedded", {"tile_id": "not-a-uuid", "model_version": version, "dim": 256}),
        headers=messages.headers("embedded"),
    ).get(timeout=30)
    producer.close()
    replay = Watcher(settings, engine, f"watch-replay-{uid}").start()
    try:
        wait_for(lambda: replay.stage.counters.consumed >= 8, timeout_s=90, what="the replay")
    finally:
        counters = replay.stop()
    assert counters.rejected == 1 and replay.stage.notified == 0
    assert [r["id"] for r in _notifications(engine, saved.id)] == [note["id"]]
    assert WebhookSender(engine, settings).deliver_due().claimed == 0
    assert len(hook.calls) == 1, "a replay must not post again"
    dead = [messages.decode("dead", r.value) for r in read_topic(settings, settings.topics.dead)]
    assert [(d["stage"], d["reason"]) for d in dead] == [("watch", "identity")]

    # the owner lists it (``galsift notifications``; the parser holds only this module's commands)
    out = tmp_path / "notes.json"
    args = _parser().parse_args(["notifications", "--owner", owner, "--json", str(out)])
    assert args.func(args, settings) == 0
    listed = json.loads(out.read_text())["results"]
    assert [(r["tile"], r["webhook"], r["search_id"]) for r in listed] == [
        (f"{survey}/lens_0_again", "sent", saved.id)
    ]
    _deactivate(engine, saved.id)


# -- the webhook machinery on the database ---------------------------------------------------------
def _deactivate(engine: Engine, search_id: int) -> None:
    """Leave no active search behind for other tests' watchers."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE saved_searches SET active = false WHERE id = :s"), {"s": search_id})


def _stored_tiles(engine: Engine, survey: str, n: int) -> list[uuid.UUID]:
    """``n`` tile rows of a survey of their own (their pixels are never read here)."""
    tiles = [
        TileCreate(
            id=uuid.UUID(messages.tile_id(survey, f"T{i:02d}")),
            survey=survey,
            external_id=f"T{i:02d}",
            ra=150.0 + 0.01 * i,
            dec=2.0,
            bands=["g", "r", "z"],
            pixel_scale=0.262,
            shape=[3, 64, 64],
            dtype="float32",
            pixels_uri=f"file:///objects/{survey}/T{i:02d}.npy",
            checksum="0" * 64,
        )
        for i in range(n)
    ]
    upsert_tiles(engine, tiles)
    return [t.id for t in tiles if t.id is not None]


def _saved_search(
    engine: Engine, *, learner: Learner, threshold: float, webhook_url: str | None
) -> tuple[int, str]:
    """A saved search of a model version of its own: (search id, model version)."""
    uid = uuid.uuid4().hex[:8]
    version = f"watch_test-{uid}"
    register_model_version(
        engine,
        ModelVersionCreate(
            name=version, variant="test", checkpoint_uri="file:///dev/null", checksum="0" * 64, card={}
        ),
    )
    session = create_session(
        engine, HitlSessionCreate(owner=f"bob_{uid}", concept="ring", model_version=version, name="rings")
    )
    search = save_search(
        engine,
        SavedSearch(
            session_id=session.id,
            owner=session.owner,
            name="rings",
            concept="ring",
            model_version=version,
            threshold=threshold,
            webhook_url=webhook_url,
            learner=learner.to_json(),
        ),
    )
    assert search.id is not None
    return search.id, version


def _axis(i: int) -> np.ndarray:
    v = np.zeros(EMBEDDING_DIM, np.float32)
    v[i] = 1.0
    return v


def test_a_search_first_seen_catches_up_on_the_tiles_that_arrived_since_its_save(
    stack_settings: Settings, engine: Engine
) -> None:
    # the moments between a save and a watcher's next reload lose no tile: a watcher scores the
    # newest tiles with every search it has not seen before (here: at its start), and only those
    # that arrived after the save
    learner = Learner("similarity", _axis(0)[None])
    survey = f"watch_catchup_{uuid.uuid4().hex[:8]}"
    before = _stored_tiles(engine, survey + "_old", 1)
    search_id, version = _saved_search(engine, learner=learner, threshold=0.9, webhook_url=None)
    match, other = _stored_tiles(engine, survey, 2)
    upsert_embeddings(
        engine,
        [
            EmbeddingCreate(tile_id=t, model_version=version, embedding=v.tolist())
            for t, v in ((before[0], _axis(0)), (match, _axis(0)), (other, _axis(1)))
        ],
    )
    stage = WatchStage(stack_settings, engine)
    try:
        assert search_id in {s.id for s in stage.searches()}
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT tile_id, score, webhook_state FROM search_notifications WHERE saved_search_id = :s"
                ),
                {"s": search_id},
            ).all()
        assert [(r[0], round(r[1], 3), r[2]) for r in rows] == [(match, 1.0, None)]
        # seen now: asking again (no change) scores nothing twice
        notified = stage.notified
        stage.searches()
        assert stage.notified == notified
    finally:
        stage.close()
        _deactivate(engine, search_id)


@pytest.fixture
def search_with_tiles(engine: Engine, hook: Hook) -> Iterator[tuple[int, list[uuid.UUID]]]:
    """A saved search with ``hook`` as its webhook and 13 stored tiles (no Kafka needed)."""
    learner = Learner("similarity", _axis(0)[None])
    search_id, _ = _saved_search(engine, learner=learner, threshold=0.5, webhook_url=hook.url)
    yield search_id, _stored_tiles(engine, f"watch_hook_{uuid.uuid4().hex[:8]}", 13)
    _deactivate(engine, search_id)


def _states(engine: Engine, ids: list[int]) -> dict[int, tuple[str | None, int, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT id, webhook_state, webhook_attempts, webhook_error FROM search_notifications "
                "WHERE id = ANY(:ids)"
            ),
            {"ids": ids},
        ).all()
    return {int(r[0]): (r[1], int(r[2]), r[3]) for r in rows}


def test_webhooks_retry_give_up_never_post_twice_and_again_after_a_crash(
    stack_settings: Settings, engine: Engine, hook: Hook, search_with_tiles: tuple[int, list[uuid.UUID]]
) -> None:
    search_id, tile_ids = search_with_tiles
    settings = stack_settings.model_copy(update={"webhook_max_attempts": 3})

    def sender() -> WebhookSender:
        return WebhookSender(engine, settings, backoff_base_s=0.3, backoff_cap_s=1.0, timeout_s=5.0)

    # stored twice (a replay): one row, one pending call
    first = store_notifications(engine, [(search_id, tile_ids[0], 0.9, 1)])
    assert store_notifications(engine, [(search_id, tile_ids[0], 0.9, 1)]) == []
    assert [n.webhook_state for n in first] == ["pending"]
    retried = first[0].id

    # 503 then 200: retried after the back-off, sent on the second attempt
    hook.queued = [503]
    s = sender()
    deadline = time.monotonic() + 20
    while _states(engine, [retried])[retried][0] != "sent":
        assert time.monotonic() < deadline, _states(engine, [retried])
        s.deliver_due()
        time.sleep(0.1)
    assert _states(engine, [retried])[retried] == ("sent", 2, None)
    assert hook.ids() == [retried, retried]
    assert [c["status"] for c in hook.calls] == [503, 200]

    # a 404 cannot be fixed by retrying: failed after one attempt
    hook.calls.clear()
    gone = store_notifications(engine, [(search_id, tile_ids[1], 0.9, 1)])[0].id
    hook.queued = [404]
    sender().deliver_due()
    state, attempts, error = _states(engine, [gone])[gone]
    assert (state, attempts) == ("failed", 1) and error is not None and "404" in error

    # two watchers' senders racing over ten due notifications: each is posted exactly once
    hook.calls.clear()
    batch = [n.id for n in store_notifications(engine, [(search_id, t, 0.8, 1) for t in tile_ids[2:12]])]
    assert len(batch) == 10
    racers = [sender(), sender()]
    threads = [threading.Thread(target=r.deliver_due) for r in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(hook.ids()) == sorted(batch)
    assert {v[0] for v in _states(engine, batch).values()} == {"sent"}

    # a watcher dies during a call (its claim committed, its connection gone): the row is given
    # back and posted again, as attempt 2 of the same notification id (at least once)
    crashed = store_notifications(engine, [(search_id, tile_ids[12], 0.8, 1)])[0].id
    hook.calls.clear()
    conn = engine.connect()
    claim = claim_webhook(conn, schedule=[0.0])
    assert claim is not None and claim.id == crashed
    with engine.connect() as other:
        assert sweep_interrupted(other) == [], "a live claimer's row is not swept"
    pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    conn.invalidate()  # the process is gone: PostgreSQL drops its session and its lock
    conn.close()

    def session_ended() -> bool:
        # the server ends the session (and frees its lock) once it reads the closed socket
        with engine.connect() as other:
            live = other.execute(text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": pid})
            return live.scalar_one() == 0

    wait_for(session_ended, timeout_s=30, interval_s=0.05, what="the crashed watcher's session to end")
    with engine.connect() as other:
        assert sweep_interrupted(other) == [crashed]
    state, attempts, error = _states(engine, [crashed])[crashed]
    assert (state, attempts) == ("pending", 1) and error is not None and "interrupted" in error
    s = sender()
    deadline = time.monotonic() + 20  # attempt 2 is due after the schedule's first back-off
    while not hook.calls and time.monotonic() < deadline:
        s.deliver_due()
    assert hook.ids() == [crashed], "an interrupted call is made again"
    assert [c["attempt"] for c in hook.calls] == ["2"]
    assert _states(engine, [crashed])[crashed][:2] == ("sent", 2)
