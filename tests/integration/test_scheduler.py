"""``galsift scheduler`` on the real stack: killed mid-job and restarted, and two at once.

Each test gets a database of its own on the session's PostgreSQL (migrated like any other), so
the shared job table, job store and promotions of other tests cannot interfere. Jobs run as the
real ``galsift retrain`` subprocesses on embeddings written straight into pgvector.

The helpers here are shared with ``test_retrain_jobs.py``.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from sqlalchemy import Engine, text

from galsift import messages
from galsift.settings import Settings

pytestmark = pytest.mark.integration

T = TypeVar("T")

#: a tile's embedding is noise plus this much of the ring direction when it is a "ring"
RING_SIGNAL = 2.5


# -- helpers shared with test_retrain_jobs.py --------------------------------------------------------
def fresh_database(stack_settings: Settings, engine: Engine, tmp_path: Path, name: str) -> Settings:
    """Settings on a new, migrated database of the session's server (and a data_dir of their own)."""
    from sqlalchemy.engine import make_url

    from db.engine import database_url, upgrade

    db = f"it_{name}_{uuid.uuid4().hex[:8]}"
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text(f'CREATE DATABASE "{db}"'))
    url = make_url(database_url(stack_settings)).set(database=db).render_as_string(hide_password=False)
    settings = stack_settings.model_copy(update={"database_url": url, "data_dir": tmp_path / "data"})
    upgrade(settings)
    return settings


def seed_tiles(engine: Engine, *, n: int = 60, survey: str = "it_sched") -> tuple[str, list[str], np.ndarray]:
    """``n`` tiles embedded just now by the serving encoder version; the even ones are "rings".

    Returns
    -------
    (encoder version, tile ids, is_ring)
    """
    from db import repo
    from db.models import EmbeddingCreate, TileCreate
    from encoder.checkpoint import read_card
    from encoder.service import model_version_for

    ckpt = Path(__file__).resolve().parents[2] / "encoder" / "checkpoints" / "lvm_tiny.safetensors"
    mv = repo.register_model_version(engine, model_version_for(ckpt, read_card(ckpt)))
    rng = np.random.default_rng(7)
    direction = rng.normal(size=256)
    direction /= np.linalg.norm(direction)
    ids = [messages.tile_id(survey, f"t{i:04d}") for i in range(n)]
    is_ring = np.arange(n) % 2 == 0
    repo.upsert_tiles(
        engine,
        [
            TileCreate(
                id=uuid.UUID(tid),
                survey=survey,
                external_id=f"t{i:04d}",
                bands=["g", "r", "z"],
                pixel_scale=0.262,
                shape=[3, 64, 64],
                dtype="float32",
                pixels_uri=f"file:///nonexistent/{tid}.npy",
                checksum="0" * 64,
            )
            for i, tid in enumerate(ids)
        ],
    )
    rows = []
    for tid, ring in zip(ids, is_ring, strict=True):
        v = rng.normal(size=256) / np.sqrt(256) * 4 + (RING_SIGNAL * direction if ring else 0)
        rows.append(
            EmbeddingCreate(
                tile_id=uuid.UUID(tid), model_version=mv.name, embedding=(v / np.linalg.norm(v)).tolist()
            )
        )
    repo.upsert_embeddings(engine, rows)
    return mv.name, ids, is_ring


def label_rings(
    engine: Engine, encoder_version: str, ids: list[str], is_ring: np.ndarray, *, labels: range
) -> tuple[int, list[int]]:
    """A HITL session for concept ``ring`` (3 ring seeds) with the tiles ``labels`` labelled truthfully.

    Returns
    -------
    (session id, label ids)
    """
    from hitl.engine import SearchEngine

    search = SearchEngine(engine)
    seeds = [t for t, r in zip(ids, is_ring, strict=True) if r][:3]
    session = search.new_session(owner="ana", concept="ring", model_version=encoder_version, tile_ids=seeds)
    picked = [(ids[i], bool(is_ring[i])) for i in labels]
    return session.id, search.label(session.id, picked)


def start_scheduler(
    settings: Settings, log: Path, *, recover_every: float = 1.0, **over: Any
) -> subprocess.Popen[bytes]:
    """``galsift scheduler`` with ``settings`` (plus ``over``) in a child process logging to ``log``."""
    from deploy.cli import service_command, service_env

    with log.open("ab") as out:
        return subprocess.Popen(
            service_command(["scheduler", "--recover-every", str(recover_every)]),
            env=service_env(settings.model_copy(update=over)),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop(proc: subprocess.Popen[bytes], *, timeout_s: float = 30.0) -> int:
    """SIGTERM a scheduler and wait for it (it stops its running jobs first)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def wait_for(what: str, probe: Callable[[], T | None], *, timeout_s: float, logs: list[Path]) -> T:
    """Poll ``probe`` until it returns something truthy; on timeout fail with the schedulers' logs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(0.05)
    tails = "\n".join(
        f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-40:]) for p in logs
    )
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{tails}")


def runs(engine: Engine, job: str) -> list[dict[str, Any]]:
    """Every run of ``job``, oldest first."""
    with engine.connect() as c:
        return [
            dict(r)
            for r in c.execute(
                text("SELECT * FROM job_runs WHERE job = :j ORDER BY id"), {"j": job}
            ).mappings()
        ]


def assert_no_overlap(engine: Engine, job: str) -> None:
    """No two runs of ``job`` that ran (anything but ``skipped``) overlap in time."""
    ran = sorted((r for r in runs(engine, job) if r["outcome"] != "skipped"), key=lambda r: r["started_at"])
    for a, b in itertools.pairwise(ran):
        assert a["ended_at"] is not None, f"run {a['id']} never ended but run {b['id']} started"
        assert a["ended_at"] <= b["started_at"], f"{job} runs {a['id']} and {b['id']} overlap"


# -- tests ------------------------------------------------------------------------------------------
def test_killed_scheduler_job_runs_again_and_never_twice_at_once(
    stack_settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    from db.engine import get_engine

    settings = fresh_database(stack_settings, engine, tmp_path, "kill")
    db = get_engine(settings)
    logs = [tmp_path / "scheduler-1.log", tmp_path / "scheduler-2.log"]
    try:
        enc, ids, is_ring = seed_tiles(db)
        label_rings(db, enc, ids, is_ring, labels=range(3, 31))

        first = start_scheduler(settings, logs[0], retrain_every_s=1)
        try:
            running = wait_for(
                "a running retrain",
                lambda: next((r for r in runs(db, "retrain") if r["outcome"] == "running"), None),
                timeout_s=180,
                logs=logs[:1],
            )
            first.send_signal(signal.SIGKILL)  # no clean-up of its own: its children get SIGTERM
            first.wait()
        finally:
            if first.poll() is None:
                first.kill()

        # a long interval: only the restarted scheduler's recovery can run the job again now
        second = start_scheduler(settings, logs[1], retrain_every_s=3600)
        try:
            again = wait_for(
                "the retrain to run again to ok",
                lambda: next(
                    (r for r in runs(db, "retrain") if r["id"] > running["id"] and r["outcome"] == "ok"), None
                ),
                timeout_s=240,
                logs=logs,
            )
        finally:
            assert stop(second) == 0

        killed = next(r for r in runs(db, "retrain") if r["id"] == running["id"])
        assert killed["outcome"] == "interrupted", killed
        assert again["metrics"]["heads"]["outcome"] == "ok", again["metrics"]
        assert_no_overlap(db, "retrain")
        assert_no_overlap(db, "heads")
        # the job is not lost: the rerun trained and promoted the heads the killed run did not finish
        with db.connect() as c:
            promoted = c.execute(
                text("SELECT count(*) FROM promotions WHERE role = 'morphology'")
            ).scalar_one()
        assert promoted == 1
    finally:
        db.dispose()


def test_two_schedulers_never_run_a_job_concurrently(
    stack_settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    from db.engine import get_engine

    settings = fresh_database(stack_settings, engine, tmp_path, "two")
    db = get_engine(settings)
    logs = [tmp_path / "scheduler-a.log", tmp_path / "scheduler-b.log"]
    try:
        # no labels: each run is short (the heads refuse), yet long enough for the two to collide
        seed_tiles(db)
        procs = [start_scheduler(settings, log, retrain_every_s=1) for log in logs]
        try:

            def contended() -> bool:
                rr = runs(db, "retrain")
                return any(r["outcome"] == "skipped" for r in rr) and any(r["outcome"] == "ok" for r in rr)

            wait_for("a skipped and an ok retrain run", contended, timeout_s=240, logs=logs)
        finally:
            codes = [stop(p) for p in procs]
        assert codes == [0, 0]
        assert_no_overlap(db, "retrain")
        assert_no_overlap(db, "heads")
        rr = runs(db, "retrain")
        assert {r["outcome"] for r in rr} <= {"ok", "skipped", "interrupted"}, rr
        skipped = [r for r in rr if r["outcome"] == "skipped"]
        assert all(r["detail"] == "already running in another process" for r in skipped)
        # both processes scheduled from one stored job
        with db.connect() as c:
            stored = c.execute(text("SELECT id FROM apscheduler_jobs ORDER BY id")).scalars().all()
        assert "retrain" in stored and len(stored) == len(set(stored))
    finally:
        db.dispose()


def test_scheduler_list_and_jobs_show_runs(stack_settings: Settings, engine: Engine, tmp_path: Path) -> None:
    from db.engine import get_engine
    from db.jobs import job_run
    from deploy.cli import service_command, service_env

    settings = fresh_database(stack_settings, engine, tmp_path, "list")
    db = get_engine(settings)
    try:
        with job_run(db, "retrain") as run:
            assert run is not None
            run.metrics = {"nan": float("nan"), "n": np.int64(3)}  # stored as JSON null and 3
            run.detail = "by hand"
        out = subprocess.run(
            service_command(["jobs", "--json", str(tmp_path / "jobs.json")]),
            env=service_env(settings),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert "retrain" in out and "by hand" in out and '"nan":null' in out
        assert (tmp_path / "jobs.json").is_file()
    finally:
        db.dispose()
