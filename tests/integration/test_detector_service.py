"""End to end: simulated lenses and galaxies through Kafka, ingest, the encoder and the detector
service; one alert per lens (row, ``alerts.lens`` message, webhook call), none for galaxies, known
lenses marked, and no second webhook call after the detector is killed mid-batch and restarted.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ingest_support import StageRunner, isolated_settings, read_topic, wait_for
from sqlalchemy import Engine, text

from detectors.alerts import KnownLenses
from detectors.lensfinder import LensFinder
from detectors.morphology import MorphologyHeads
from detectors.notify import deliver_due
from detectors.service import DetectStage, load_head, load_head_encoder, register_versions
from encoder.service import SHIPPED_CHECKPOINT, Embedder, EncodeStage
from encoder.sim import simulate_galaxy, simulate_lens
from galsift import messages
from galsift.settings import Settings
from ingest.publish import TilePublisher
from ingest.readers import SurveyTile, read_image
from ingest.service import IngestStage

pytestmark = pytest.mark.integration

DEMO = Path(__file__).resolve().parents[2] / "ingest" / "demo_tiles"


class Webhook:
    """A local Slack-style webhook that records every call and answers ``status``."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.status = 200
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.calls.append({"body": json.loads(body), "status": hook.status})
                self.send_response(hook.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
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


def _tiles(survey: str, known: KnownLenses) -> tuple[list[SurveyTile], dict[str, str]]:
    """Two bright simulated lenses (one at a catalogued lens) and three ordinary galaxies."""
    rng = np.random.default_rng(7)
    kinds: dict[str, str] = {}
    tiles: list[SurveyTile] = []
    specs = [
        ("lens_known", "lens", float(known.ra[0]), float(known.dec[0])),
        ("lens_new", "lens", 12.345, -33.21),
        ("gal_a", "galaxy", 40.1, 1.2),
        ("gal_b", "galaxy", 41.7, -2.5),
        ("gal_c", "galaxy", 150.2, 2.2),
    ]
    for name, kind, ra, dec in specs:
        sim = simulate_lens(rng) if kind == "lens" else simulate_galaxy(rng)
        tiles.append(
            SurveyTile(
                survey=survey,
                external_id=name,
                pixels=sim.flux.astype(np.float32),
                bands=("g", "r", "z"),
                pixel_scale=0.262,
                ra=ra,
                dec=dec,
            )
        )
        kinds[messages.tile_id(survey, name)] = kind
    return tiles, kinds


def _composite(survey: str) -> SurveyTile:
    """A real CFHTLS colour composite (JPEG) of a graded lens candidate, from the bundled demo."""
    folder = DEMO / "cfhtls_lens_candidates"
    with (folder / "labels.csv").open(newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["lens"] == "1")
    return read_image(
        folder / row["file"],
        survey=survey,
        external_id="composite",
        ra=200.5,
        dec=-5.5,
        pixel_scale=float(row["pixel_scale"]),
    )


def _ingest_and_embed(settings: Settings, engine: Engine, tiles: list[SurveyTile]) -> str:
    """Publish the tiles and run ingest and the encoder over them; returns a run id for groups."""
    with TilePublisher(settings) as pub:
        for tile in tiles:
            pub.send(tile)
    uid = uuid.uuid4().hex[:6]
    StageRunner(IngestStage(settings, engine, group_id=f"ingest-{uid}"), idle_exit_s=3).start().join(
        timeout_s=120
    )
    embedder = Embedder(SHIPPED_CHECKPOINT, device="cpu")
    StageRunner(EncodeStage(settings, engine, embedder, group_id=f"enc-{uid}"), idle_exit_s=3).start().join(
        timeout_s=300
    )
    return uid


def _alerts(engine: Engine, survey: str) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT a.id, a.tile_id::text AS tile_id, a.model_version, a.crossmatch, a.score FROM alerts a "
                    "JOIN tiles t ON t.id = a.tile_id WHERE t.survey = :s"
                ),
                {"s": survey},
            ).mappings()
        )


def _detections(engine: Engine, survey: str) -> dict[tuple[str, str], float]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT d.tile_id::text, d.detector, d.label, d.score FROM detections d "
                "JOIN tiles t ON t.id = d.tile_id WHERE t.survey = :s"
            ),
            {"s": survey},
        )
        return {(r[0], f"{r[1]}:{r[2]}"): float(r[3]) for r in rows}


def test_lenses_alert_once_galaxies_never_and_known_lenses_are_marked(
    stack_settings: Settings, engine: Engine, webhook: Webhook
) -> None:
    settings = isolated_settings(stack_settings, "detect", alert_webhooks=[webhook.url], alert_threshold=0.5)
    survey = f"det_{uuid.uuid4().hex[:6]}"
    known = KnownLenses.from_lenscat()
    tiles, kinds = _tiles(survey, known)
    composite = _composite(survey)
    uid = _ingest_and_embed(settings, engine, [*tiles, composite])
    lens = LensFinder.load()
    morphology = MorphologyHeads.load()
    head, head_path = load_head(settings, lens)
    assert head is not None, "the shipped lens head reads the shipped finder's score"
    assert head.reads_views, "and the centres of the tiles, embedded by its encoder"
    register_versions(engine, lens=lens, morphology=morphology, head=head, head_path=head_path)
    stage = DetectStage(
        settings,
        engine,
        lens=lens,
        morphology=morphology,
        known=known,
        head=head,
        head_encoder=load_head_encoder(engine, head),
        group_id=f"det-{uid}",
    )
    StageRunner(stage, idle_exit_s=3).start().join(timeout_s=300)

    scores = _detections(engine, survey)
    lens_scores = {t: s for (t, d), s in scores.items() if d == "lens_finder:lens"}
    assert set(lens_scores) == {*kinds, composite.tile_id}, "every tile gets a lens score"
    assert any(d.startswith("morphology:") for _, d in scores), "and morphology probabilities"
    # the real-label head scores the colour composite only: it was trained on composites
    head_scores = {t: s for (t, d), s in scores.items() if d == "lens_head:lens"}
    assert set(head_scores) == {composite.tile_id}
    head_alerts = head_scores[composite.tile_id] >= settings.alert_threshold
    alerts = _alerts(engine, survey)
    alerted = {a["tile_id"] for a in alerts}
    lenses = {t for t, k in kinds.items() if k == "lens"}
    assert alerted == lenses | ({composite.tile_id} if head_alerts else set()), (lens_scores, head_scores)
    by_name = {a["tile_id"]: a for a in alerts}
    assert by_name[messages.tile_id(survey, "lens_known")]["crossmatch"]["known"] is True
    assert by_name[messages.tile_id(survey, "lens_new")]["crossmatch"]["known"] is False
    if head_alerts:
        assert by_name[composite.tile_id]["model_version"] == head.version
    # SQL readers and the alert filters see the head's score where there is one
    with engine.connect() as conn:
        view = dict(
            conn.execute(
                text("SELECT tile_id::text, lens_score FROM galsift_api.tile_scores WHERE survey = :s"),
                {"s": survey},
            ).all()
        )
    assert view == {**lens_scores, **head_scores}

    published = [messages.decode("alert", r.value) for r in read_topic(settings, settings.topics.alerts)]
    assert sorted(m["tile_id"] for m in published) == sorted(alerted)
    # every scored tile is announced on tiles.detected (the alert filters' input), after its write
    detected = [messages.decode("detected", r.value) for r in read_topic(settings, settings.topics.detected)]
    assert {m["tile_id"] for m in detected} == {*kinds, composite.tile_id}
    assert all(lens.version in m["model_versions"] for m in detected)

    deliver_due(engine, settings)
    assert len(webhook.calls) == len(alerted)
    deliver_due(engine, settings)  # nothing left to send
    assert len(webhook.calls) == len(alerted)


def _detect_process(settings: Settings, group: str, log: Path) -> subprocess.Popen[bytes]:
    from deploy.cli import service_command, service_env

    with log.open("ab") as out:
        return subprocess.Popen(
            service_command(["detect", "--group", group]),
            env=service_env(settings),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def test_a_detector_killed_mid_batch_sends_no_second_webhook_call(
    stack_settings: Settings, engine: Engine, webhook: Webhook, tmp_path: Path
) -> None:
    # batches of one tile: the kill lands between the lens's durable write and later batches
    settings = isolated_settings(
        stack_settings, "detkill", alert_webhooks=[webhook.url], alert_threshold=0.5, batch_size=1
    )
    survey = f"detk_{uuid.uuid4().hex[:6]}"
    tiles, kinds = _tiles(survey, KnownLenses.from_lenscat())
    uid = _ingest_and_embed(settings, engine, tiles)
    group = f"det-{uid}"
    log = tmp_path / "detect.log"
    proc = _detect_process(settings, group, log)
    try:
        wait_for(
            lambda: bool(_alerts(engine, survey)) or proc.poll() is not None,
            timeout_s=300,
            what="the first alert",
        )
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    proc = _detect_process(settings, group, log)
    try:
        wait_for(
            lambda: (
                (len(_alerts(engine, survey)) == 2 and len(_detections(engine, survey)) > 0)
                or proc.poll() is not None
            ),
            timeout_s=300,
            what="both alerts after the restart",
        )
        wait_for(
            lambda: (
                {t for (t, d) in _detections(engine, survey) if d == "lens_finder:lens"} == set(kinds)
                or proc.poll() is not None
            ),
            timeout_s=300,
            what="every tile scored",
        )
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    deliver_due(engine, settings)
    assert len(_alerts(engine, survey)) == 2
    assert len(webhook.calls) == 2, "a replayed batch must not schedule a second delivery"
