"""``galsift train continual`` end to end on the real stack, with the shipped tiny LVM.

Tiles of the bundled demo sets go through Kafka and the ingest service into a database of the
test's own (created on the session's PostgreSQL server and migrated), so a promotion made here
cannot change the serving LVM of any other test, and the backfill embeds this test's tiles only.
Catalogue labels are imported as ``galsift labels import`` does and HITL labels written as the
engine writes them; then the job runs four times through its CLI:

1. too few new tiles (``pretrain_min_tiles`` above what was ingested): refused, nothing trained;
2. a margin no candidate can reach: trains, compares on both label sources, refused with the
   comparison recorded;
3. a margin any candidate passes: trains, compares, promotes (promotions row, model version,
   every tile backfilled), and the encoder now resolves to the promoted checkpoint;
4. again: the serving version is now the promoted one and no tile is newer than its window,
   so it is refused for too few tiles.
"""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ingest_support import StageRunner, wait_for
from sqlalchemy import Engine, text

from db.hitl import add_labels
from db.models import HitlLabelCreate
from encoder.checkpoint import read_card, train_state_path
from encoder.continual import TaskScore, decide
from encoder.service import SHIPPED_CHECKPOINT, resolve_checkpoint
from galsift.cli import CommandGroups
from galsift.settings import Settings
from ingest.labels import LabelRule, import_labels, parse_column
from ingest.publish import publish_paths
from ingest.service import IngestStage

pytestmark = pytest.mark.integration

#: a tiny CPU schedule: the point is the job's path, not a better model
TRAIN = ["--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--sim-fraction", "0"]
TRAIN += ["--folds", "3", "--repeats", "1", "--device", "cpu", "--threads", "1", "--no-progress"]


def _cli(argv: list[str], settings: Settings) -> int:
    from encoder.cli import register

    parser = argparse.ArgumentParser(prog="galsift")
    top = parser.add_subparsers(dest="command", required=True)
    register(
        CommandGroups(
            top=top,
            train=top.add_parser("train").add_subparsers(dest="train_command", required=True),
            eval=top.add_parser("eval").add_subparsers(dest="eval_command", required=True),
            bench=top.add_parser("bench").add_subparsers(dest="bench_command", required=True),
        )
    )
    args = parser.parse_args(["train", "continual", *argv])
    return int(args.func(args, settings))


def _last_run(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT * FROM job_runs WHERE job = 'pretrain' ORDER BY id DESC LIMIT 1")
        ).mappings()
        return dict(row.one())


def _scalar(engine: Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(text(sql), params).scalar()


def _ingest(settings: Settings, engine: Engine, repo_data: Path, uid: str) -> dict[str, str]:
    surveys = {"lens": f"ct_lens_{uid}", "morph": f"ct_morph_{uid}", "fits": f"ct_fits_{uid}"}
    n = publish_paths(settings, [repo_data / "cfhtls_lens_candidates"], survey=surveys["lens"]).published
    n += publish_paths(settings, [repo_data / "gz_decals_examples"], survey=surveys["morph"]).published
    n += publish_paths(settings, [repo_data / "legacy_dr9_fits"], survey=surveys["fits"]).published
    assert n == 123
    # wait for the rows rather than for an idle consumer: a first consumer group on a fresh
    # broker can sit in coordinator discovery for longer than any idle timeout
    runner = StageRunner(IngestStage(settings, engine, group_id=f"ingest-{uid}")).start()
    try:
        wait_for(
            lambda: _scalar(engine, "SELECT count(*) FROM tiles") == 123, timeout_s=240, what="123 tiles"
        )
    finally:
        runner.join(timeout_s=60, stop=True)
    return surveys


def _label(settings: Settings, engine: Engine, repo_data: Path, surveys: dict[str, str]) -> None:
    lens_dir, morph_dir = repo_data / "cfhtls_lens_candidates", repo_data / "gz_decals_examples"
    # catalogue labels, as `galsift labels import --no-publish` writes them: 25 non-lenses, 20 lenses
    report = import_labels(
        settings,
        engine,
        lens_dir,
        label_set="it_lens",
        rule=LabelRule("lens"),
        survey=surveys["lens"],
        publish=False,
        progress=False,
    )
    assert report.value_counts == {0: 25, 1: 20}
    # morphology: only "merger" has >= 5 tiles, so the set cannot be compared on and is skipped
    import_labels(
        settings,
        engine,
        morph_dir,
        label_set="it_morph",
        rule=LabelRule("morphology"),
        survey=surveys["morph"],
        publish=False,
        progress=False,
    )
    # HITL labels, as the engine writes them: a scientist marks expert grade >= 1 as good
    graded = parse_column(lens_dir, LabelRule("expert_grade", threshold=1.0), survey=surveys["lens"])
    add_labels(
        engine,
        [
            HitlLabelCreate(
                tile_id=uuid.UUID(r.tile_id), concept="it_grade", author="tester", good=bool(r.value)
            )
            for r in graded.rows
        ],
    )


def test_promotion_rule() -> None:
    def score(delta: float) -> TaskScore:
        return TaskScore("t", 40, [0, 1], [0.7, 0.7], [0.7 + delta, 0.7 + delta])

    assert decide([score(0.02), score(0.0)], 0.01) == (True, pytest.approx(0.01))
    assert decide([score(0.005)], 0.01)[0] is False
    assert decide([score(-0.2)], -1.0)[0] is True
    promote, delta = decide([], -1.0)
    assert promote is False and np.isnan(delta)


def test_continual_job_refuses_trains_compares_promotes(
    own_db: tuple[Settings, Engine], repo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, engine = own_db
    uid = uuid.uuid4().hex[:6]
    surveys = _ingest(settings, engine, repo_data, uid)
    _label(settings, engine, repo_data, surveys)
    shipped = read_card(SHIPPED_CHECKPOINT)["version"]

    # 1. fewer new tiles than the minimum: refused with the reason, nothing trained
    assert (
        _cli(
            [*TRAIN, "--json", str(tmp_path / "1.json")],
            settings.model_copy(update={"pretrain_min_tiles": 1000}),
        )
        == 0
    )
    run1 = _last_run(engine)
    assert run1["outcome"] == "refused"
    assert run1["detail"].startswith("too few new tiles: 123 ") and "< 1000" in run1["detail"]
    assert run1["metrics"]["current"] == shipped and run1["metrics"]["new_tiles"] == 123
    assert "candidate" not in run1["metrics"] and "comparison" not in run1["metrics"]
    assert not (settings.data_dir / "models").exists()
    assert json.loads((tmp_path / "1.json").read_text())["outcome"] == "refused"

    enough = settings.model_copy(update={"pretrain_min_tiles": 100})

    # 2. trained and compared, but the margin is out of reach: refused with the comparison recorded
    assert _cli([*TRAIN, "--margin", "1.0", "--json", str(tmp_path / "2.json")], enough) == 0
    run2 = _last_run(engine)
    m2 = run2["metrics"]
    assert run2["outcome"] == "refused" and "not better by the margin" in run2["detail"]
    # 123 tiles read, 2 of them exact duplicates among the demo images (dropped before the split)
    assert m2["training"]["steps"] == 2 and m2["training"]["tiles_read"] == 123
    assert m2["training"]["train_tiles"] + m2["training"]["val_tiles"] == 121
    tasks = {t["task"]: t for t in m2["comparison"]["tasks"]}
    assert set(tasks) == {"labels:it_lens", "hitl:it_grade"}
    assert tasks["labels:it_lens"]["tiles"] == 45 and tasks["hitl:it_grade"]["tiles"] == 60
    for t in tasks.values():
        assert 0.0 <= t["auc_current"] <= 1.0 and 0.0 <= t["auc_candidate"] <= 1.0
        assert t["delta"] == pytest.approx(t["auc_candidate"] - t["auc_current"])
    assert m2["comparison"]["mean_delta"] == pytest.approx(np.mean([t["delta"] for t in tasks.values()]))
    assert m2["comparison"]["mean_delta"] < 1.0
    assert "labels:it_morph" in m2["skipped_label_sets"]
    # the candidate and its card stay for inspection, with the parent recorded; not its training state
    cand2 = Path(m2["candidate_checkpoint"])
    card2 = read_card(cand2)
    assert card2["parent"] == shipped and card2["kind"] == "continual"
    assert card2["continual"]["job_run"] == run2["id"] and card2["version"] == m2["candidate"] != shipped
    assert not train_state_path(cand2).exists()
    assert _scalar(engine, "SELECT count(*) FROM promotions") == 0
    doc2 = json.loads((tmp_path / "2.json").read_text())
    assert {(r["role"], r["label_set"]) for r in doc2["results"]} == {
        (role, task) for role in ("current", "candidate") for task in tasks
    }
    assert "labels:it_lens" in capsys.readouterr().out

    # 3. a margin any candidate passes: promoted, registered, every tile backfilled
    assert _cli([*TRAIN, "--margin", "-1.0"], enough) == 0
    run3 = _last_run(engine)
    m3 = run3["metrics"]
    assert run3["outcome"] == "ok" and run3["detail"].startswith(f"promoted {m3['candidate']}")
    assert {t["task"] for t in m3["comparison"]["tasks"]} == set(tasks)
    with engine.connect() as conn:
        promo = conn.execute(text("SELECT * FROM promotions ORDER BY id")).mappings().all()
    assert len(promo) == 1
    assert promo[0]["role"] == "lvm" and promo[0]["model_version"] == m3["candidate"]
    assert (
        promo[0]["previous"] == shipped
        and promo[0]["metrics"]["mean_delta"] == m3["comparison"]["mean_delta"]
    )
    assert (
        _scalar(engine, "SELECT card->>'parent' FROM model_versions WHERE name = :v", v=m3["candidate"])
        == shipped
    )
    assert m3["backfill"] == {"embedded": 123, "failed": 0}
    assert (
        _scalar(engine, "SELECT count(*) FROM embeddings WHERE model_version = :v", v=m3["candidate"]) == 123
    )
    # the encoder started without --model now serves the promoted checkpoint, which keeps its training state
    promoted = resolve_checkpoint(engine, None, settings)
    assert promoted == Path(m3["candidate_checkpoint"]) and train_state_path(promoted).exists()

    # 4. the promoted version is now current, and nothing was ingested after its window
    assert _cli(TRAIN, enough) == 0
    run4 = _last_run(engine)
    assert run4["outcome"] == "refused" and run4["detail"].startswith("too few new tiles: 0 ")
    assert run4["metrics"]["current"] == m3["candidate"]
    with engine.connect() as conn:
        outcomes = [
            r[0]
            for r in conn.execute(text("SELECT outcome FROM job_runs WHERE job = 'pretrain' ORDER BY id"))
        ]
    assert outcomes == ["refused", "refused", "ok", "refused"]
