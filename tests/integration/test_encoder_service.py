"""End to end: tiles published to Kafka come out embedded in pgvector, exactly once per version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from ingest_support import StageRunner, isolated_settings, read_topic, wait_for
from sqlalchemy import Engine, text

from encoder.checkpoint import read_card
from encoder.service import SHIPPED_CHECKPOINT, Embedder, EncodeStage, backfill
from galsift import messages
from galsift.settings import Settings
from ingest.publish import publish_paths
from ingest.service import IngestStage

pytestmark = pytest.mark.integration


def _publish_and_ingest(settings: Settings, engine: Engine, repo_data: Path, uid: str) -> list[str]:
    surveys = [f"enc_dr9_{uid}", f"enc_cfhtls_{uid}"]
    n = publish_paths(settings, [repo_data / "legacy_dr9_fits"], survey=surveys[0]).published
    n += publish_paths(
        settings, [repo_data / "cfhtls_lens_candidates"], survey=surveys[1], limit=21
    ).published
    assert n == 24  # 3 FITS + 21 JPEG
    StageRunner(IngestStage(settings, engine, group_id=f"ingest-{uid}"), idle_exit_s=3).start().join(
        timeout_s=120
    )
    with engine.connect() as conn:
        ids = [
            str(r[0])
            for r in conn.execute(text("SELECT id FROM tiles WHERE survey = ANY(:s)"), {"s": surveys})
        ]
    assert len(ids) == 24
    return ids


def _embedded(engine: Engine, ids: list[str], version: str) -> list[tuple[str, float]]:
    with engine.connect() as conn:
        return [
            (str(r[0]), float(r[1]))
            for r in conn.execute(
                text(
                    "SELECT tile_id, vector_norm(embedding) FROM embeddings "
                    "WHERE model_version = :v AND tile_id::text = ANY(:ids)"
                ),
                {"v": version, "ids": ids},
            )
        ]


def test_published_tiles_are_embedded_once_with_the_shipped_version(
    stack_settings: Settings, engine: Engine, repo_data: Path
) -> None:
    uid = uuid.uuid4().hex[:6]
    settings = isolated_settings(stack_settings, "encode", batch_size=8)
    ids = _publish_and_ingest(settings, engine, repo_data, uid)

    embedder = Embedder(SHIPPED_CHECKPOINT, device="cpu", batch=8)
    stage = EncodeStage(settings, engine, embedder, group_id=f"encoder-{uid}")
    shipped = read_card(SHIPPED_CHECKPOINT)["version"]
    assert stage.version.name == shipped
    StageRunner(stage, idle_exit_s=3).start().join(timeout_s=300)  # type: ignore[arg-type]

    rows = _embedded(engine, ids, shipped)
    assert sorted(t for t, _ in rows) == sorted(ids)
    assert all(abs(norm - 1.0) < 1e-3 for _, norm in rows)  # unit vectors for cosine search
    out = [messages.decode("embedded", r.value) for r in read_topic(settings, settings.topics.embedded)]
    assert {o["tile_id"] for o in out} == set(ids)
    assert {o["model_version"] for o in out} == {shipped}

    # the stored vector is the model's embedding of the stored pixels, not just any unit vector
    from encoder.data import read_stored_tile

    with engine.connect() as conn:
        uri, checksum, stored = conn.execute(
            text(
                "SELECT t.pixels_uri, t.checksum, e.embedding FROM tiles t JOIN embeddings e ON e.tile_id = t.id "
                "WHERE e.model_version = :v AND t.id::text = :t"
            ),
            {"v": shipped, "t": ids[0]},
        ).one()
    again = embedder.embed(read_stored_tile(uri, checksum=checksum, size=embedder.img_size)[None])[0]
    np.testing.assert_allclose(stored.to_numpy(), again, atol=1e-5)


def test_encoder_worker_killed_mid_batch_loses_and_duplicates_nothing(
    stack_settings: Settings, engine: Engine, repo_data: Path, tmp_path: Path
) -> None:
    from deploy.cli import service_env

    uid = uuid.uuid4().hex[:6]
    settings = isolated_settings(stack_settings, "encodekill", batch_size=3, encode_batch=3)
    ids = _publish_and_ingest(settings, engine, repo_data, uid)
    version = read_card(SHIPPED_CHECKPOINT)["version"]
    group = f"encoder-kill-{uid}"
    cmd = [sys.executable, "-m", "galsift.cli", "encode", "--group", group, "--idle-exit", "20"]
    log = tmp_path / "encode.log"
    with log.open("ab") as fh:
        proc = subprocess.Popen(cmd, env=service_env(settings), stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(_embedded(engine, ids, version)) >= 3, timeout_s=180, what="first embeddings")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_at_kill = len(_embedded(engine, ids, version))
    assert done_at_kill < len(ids), "the kill came too late to test anything"

    with log.open("ab") as fh:
        rc = subprocess.run(
            cmd, env=service_env(settings), stdout=fh, stderr=subprocess.STDOUT, timeout=300
        ).returncode
    assert rc == 0, log.read_text()[-3000:]
    rows = _embedded(engine, ids, version)
    assert len(rows) == len(set(t for t, _ in rows)) == len(ids)


def test_backfill_embeds_what_is_missing_and_is_restartable(
    stack_settings: Settings, engine: Engine, repo_data: Path, tmp_path: Path
) -> None:
    from encoder.checkpoint import save_checkpoint
    from encoder.models import create_model

    uid = uuid.uuid4().hex[:6]
    settings = isolated_settings(stack_settings, "backfill")
    ids = _publish_and_ingest(settings, engine, repo_data, uid)
    # a new model version (a fresh lvm_tiny) must cover every stored tile, including earlier tests'
    ckpt = tmp_path / "fresh.safetensors"
    save_checkpoint(ckpt, create_model("lvm_tiny"), card={"data": "none (untrained)"})
    embedder = Embedder(ckpt, device="cpu", batch=16)
    first = backfill(engine, embedder, chunk=8, progress=False)
    with engine.connect() as conn:
        n_tiles = conn.execute(text("SELECT count(*) FROM tiles")).scalar_one()
    version = read_card(ckpt)["version"]
    # tiles of other tests whose pixel files do not exist are counted as failed, not skipped silently
    assert first["embedded"] + first["failed"] == n_tiles
    assert len(_embedded(engine, ids, version)) == len(ids)
    # a restarted backfill skips everything already embedded and retries only the failures
    again = backfill(engine, embedder, chunk=8, progress=False)
    assert again == {"embedded": 0, "failed": first["failed"]}


def _promote_a_candidate(engine: Engine, tmp_path: Path) -> str:
    """Register a perturbed copy of the shipped LVM and promote it, as the continual job does."""
    import torch

    from db import repo
    from db.jobs import record_promotion
    from encoder.checkpoint import load_model, save_checkpoint
    from encoder.serving import model_version_for

    model, _ = load_model(SHIPPED_CHECKPOINT)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "candidate.safetensors"
    save_checkpoint(path, model, card={"note": "a promotion in a test"})
    version = repo.register_model_version(engine, model_version_for(path))
    previous = read_card(SHIPPED_CHECKPOINT)["version"]
    record_promotion(
        engine, role="lvm", model_version=version.name, previous=previous, reason="test", metrics={}
    )
    return version.name


def test_a_running_encoder_serves_a_new_promotion(
    own_db: tuple[Settings, Engine], repo_data: Path, tmp_path: Path
) -> None:
    settings = own_db[0].model_copy(update={"batch_size": 8, "promotion_check_s": 0.0})
    engine = own_db[1]
    uid = uuid.uuid4().hex[:6]
    shipped = read_card(SHIPPED_CHECKPOINT)["version"]

    def ingest(folder: str, survey: str, limit: int) -> list[str]:
        publish_paths(settings, [repo_data / folder], survey=survey, limit=limit)
        StageRunner(IngestStage(settings, engine, group_id=f"ingest-{uid}"), idle_exit_s=3).start().join(
            timeout_s=120
        )
        with engine.connect() as conn:
            return [
                str(r[0]) for r in conn.execute(text("SELECT id FROM tiles WHERE survey = :s"), {"s": survey})
            ]

    def encode() -> EncodeStage:
        embedder = Embedder(SHIPPED_CHECKPOINT, device="cpu", batch=8)
        stage = EncodeStage(settings, engine, embedder, group_id=f"encoder-{uid}", follow_promotions=True)
        StageRunner(stage, idle_exit_s=3).start().join(timeout_s=300)  # type: ignore[arg-type]
        return stage

    before = ingest("legacy_dr9_fits", f"follow_a_{uid}", 3)
    assert encode().version.name == shipped  # nothing promoted yet: the model it was given
    assert len(_embedded(engine, before, shipped)) == 3

    promoted = _promote_a_candidate(engine, tmp_path)
    after = ingest("cfhtls_lens_candidates", f"follow_b_{uid}", 5)
    stage = encode()  # started with the shipped model, as a service that was running all along
    assert stage.version.name == promoted
    assert sorted(t for t, _ in _embedded(engine, after, promoted)) == sorted(after)
    assert _embedded(engine, after, shipped) == []
    out = [messages.decode("embedded", r.value) for r in read_topic(settings, settings.topics.embedded)]
    assert {o["model_version"] for o in out if o["tile_id"] in after} == {promoted}
