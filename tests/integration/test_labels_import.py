"""``galsift labels import`` through real Kafka and PostgreSQL, then ``galsift train morphology``."""

from __future__ import annotations

import argparse
import csv
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from ingest_support import StageRunner, isolated_settings
from sqlalchemy import Engine, text

from db import labels as dblabels
from db import repo
from db.models import EmbeddingCreate, ModelVersionCreate
from galsift import messages
from galsift.cli import CommandGroups
from galsift.settings import Settings
from ingest.labels import LabelImportError, LabelRule, import_labels
from ingest.service import IngestStage

pytestmark = pytest.mark.integration

MORPH_CLASSES = ("smooth_round", "smooth_cigar", "edge_on", "spiral", "merger")


def _csv(folder: Path) -> list[dict[str, str]]:
    with (folder / "labels.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _labels(engine: Engine, label_set: str) -> dict[str, tuple[int, str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT tile_id::text, value, author FROM labels WHERE label_set = :s"), {"s": label_set}
        ).all()
    assert len(rows) == len({r[0] for r in rows}), "one label per tile"
    return {r[0]: (int(r[1]), str(r[2])) for r in rows}


def _stem(file: str) -> str:
    return Path(file).name.rsplit(".", 1)[0]


def test_import_publishes_waits_labels_and_trains(
    stack_settings: Settings,
    engine: Engine,
    repo_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    uid = uuid.uuid4().hex[:8]
    settings = isolated_settings(stack_settings, "labels")
    survey_m, survey_l = f"it_morph_{uid}", f"it_lens_{uid}"
    set_m, set_l = f"it_morph_{uid}", f"it_lens_{uid}"
    morph_dir, lens_dir = repo_data / "gz_decals_examples", repo_data / "cfhtls_lens_candidates"

    runner = StageRunner(IngestStage(settings, engine, group_id=f"ingest-{uid}", raise_exc=True)).start()
    try:
        report = import_labels(
            settings,
            engine,
            morph_dir,
            label_set=set_m,
            rule=LabelRule("morphology", classes=MORPH_CLASSES),
            survey=survey_m,
            wait_s=120,
            poll_s=0.5,
            progress=False,
        )
        lens = import_labels(
            settings,
            engine,
            lens_dir,
            label_set=set_l,
            rule=LabelRule("lens"),
            survey=survey_l,
            wait_s=120,
            poll_s=0.5,
            progress=False,
        )
    finally:
        runner.join(timeout_s=60, stop=True)

    # every labelled row was published (none was stored before), stored by ingest, then labelled
    morph_rows = [r for r in _csv(morph_dir) if r["morphology"]]
    assert report.rows == len(morph_rows) == 20 and report.skipped_empty == len(_csv(morph_dir)) - 20
    assert (report.already_stored, report.published, report.stored_after_wait) == (0, 20, 20)
    assert report.complete and report.inserted == 20 and report.rejected == report.timed_out == 0
    assert report.kind == "classes" and report.classes == list(MORPH_CLASSES)
    stored = _labels(engine, set_m)
    expected = {
        messages.tile_id(survey_m, _stem(r["file"])): MORPH_CLASSES.index(r["morphology"]) for r in morph_rows
    }
    assert {t: v for t, (v, _) in stored.items()} == expected
    assert {a for _, a in stored.values()} == {f"catalogue:{set_m}"}
    with engine.connect() as conn:
        n_tiles = conn.execute(
            text("SELECT count(*) FROM tiles WHERE survey = :s"), {"s": survey_m}
        ).scalar_one()
    assert n_tiles == 20  # only the labelled rows were published
    declared = dblabels.get_label_set(engine, set_m)
    assert declared is not None and declared.kind == "classes" and declared.classes == list(MORPH_CLASSES)

    lens_rows = [r for r in _csv(lens_dir) if r["lens"]]
    assert lens.kind == "binary" and lens.complete and lens.inserted == len(lens_rows)
    lens_stored = _labels(engine, set_l)
    by_id = {messages.tile_id(survey_l, _stem(r["file"])): int(r["lens"]) for r in lens_rows}
    assert {t: v for t, (v, _) in lens_stored.items()} == by_id

    # a re-import publishes nothing and adds no row; another rule for the same set is refused
    again = import_labels(
        settings,
        engine,
        morph_dir,
        label_set=set_m,
        rule=LabelRule("morphology"),
        survey=survey_m,
        wait_s=5,
        progress=False,
    )
    assert (again.already_stored, again.published, again.inserted, again.updated, again.unchanged) == (
        20,
        0,
        0,
        0,
        20,
    )
    assert _labels(engine, set_m) == stored
    with pytest.raises(LabelImportError, match="exists as"):
        import_labels(
            settings,
            engine,
            lens_dir,
            label_set=set_l,
            rule=LabelRule("swap_posterior", threshold=0.5),
            survey=survey_l,
            publish=False,
            progress=False,
        )
    assert dblabels.label_counts(engine, set_l) == {v: list(by_id.values()).count(v) for v in (0, 1)}

    # embeddings of a stand-in encoder version, informative about the labels, straight into pgvector
    enc = f"it-enc-{uid}"
    repo.register_model_version(
        engine, ModelVersionCreate(name=enc, variant="test", checkpoint_uri="file:///none", checksum="0" * 64)
    )
    rng = np.random.default_rng(0)
    pattern = np.sign(rng.normal(size=(16, 256)))  # one direction per label value: 0-4 morphology, 10-11 lens
    rows = []
    for tid, value in [*expected.items(), *by_id.items()]:
        v = rng.normal(size=256) + 0.5 * pattern[value if tid in expected else 10 + value]
        unit = (v / np.linalg.norm(v)).tolist()
        rows.append(EmbeddingCreate(tile_id=uuid.UUID(tid), model_version=enc, embedding=unit))
    repo.upsert_embeddings(engine, rows)

    from detectors.cli_morphology import register
    from detectors.morphology import MorphologyHeads

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
    out = tmp_path / "heads.json"
    argv = ["train", "morphology", "--task", f"morphology={set_m}", "--task", f"lens={set_l}"]
    argv += ["--task", f"absent=it_none_{uid}", "--encoder-version", enc, "--out", str(out)]
    argv += ["--json", str(tmp_path / "metrics.json"), "--no-progress"]
    args = parser.parse_args(argv)
    assert args.func(args, settings) == 0
    printed = capsys.readouterr().out

    heads = MorphologyHeads.load(out)
    assert heads.encoder_version == enc
    # merger 11, spiral 3, smooth_cigar 3 kept; smooth_round (2) and edge_on (1) too few to hold out
    assert heads.labels == ["smooth_cigar", "spiral", "merger", "lens"]
    assert "absent: skipped" in printed and f"registered model version {heads.version}" in printed
    version = repo.get_model_version(engine, heads.version)
    assert version is not None and version.variant == "morphology-heads"
    assert version.checksum == heads.checksum and version.checkpoint_uri == out.resolve().as_uri()
    card_tasks = {t["task"]: t for t in version.card["tasks"]}
    assert card_tasks["morphology"]["label_counts"] == {
        c: [r["morphology"] for r in morph_rows].count(c) for c in MORPH_CLASSES
    }
    assert card_tasks["lens"]["label_counts"] == {
        "0": list(by_id.values()).count(0),
        "1": sum(by_id.values()),
    }
    assert version.card["encoder_version"] == enc
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["model_version"] == heads.version and metrics["command"] == "train morphology"
    lens_auc = next(r["auroc"] for r in metrics["results"] if r["task"] == "lens")
    assert lens_auc > 0.9  # the stand-in embeddings carry the label
    # what the detector service will do: score stored vectors of this encoder version
    x = dblabels.labelled_embeddings(engine, label_set=set_l, model_version=enc)
    scores = {s.label: s.probability for s in heads.predict(x.embeddings)}
    assert set(scores) == set(heads.labels) and all(np.all((p >= 0) & (p <= 1)) for p in scores.values())
    # the service loads the shipped heads with the engine: their version is registered for its rows
    shipped = MorphologyHeads.load(engine=engine)
    assert repo.get_model_version(engine, shipped.version) is not None
    assert MorphologyHeads.load(out, engine=engine).version == heads.version  # idempotent
