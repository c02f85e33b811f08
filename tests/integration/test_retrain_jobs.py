"""The scheduler's retraining job end to end: labels saved, the job runs, new versions serve.

``galsift scheduler`` runs ``galsift retrain`` (a subprocess), which refits the saved search on
the labels given after it was saved, notifies its owner of recent tiles above the threshold,
and runs ``galsift train heads --from-db``, which trains the ring head on the HITL labels,
registers and promotes the new heads and re-scores the recently embedded tiles.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, text
from test_scheduler import fresh_database, label_rings, runs, seed_tiles, start_scheduler, stop, wait_for

from galsift.settings import Settings

pytestmark = pytest.mark.integration


def test_scheduled_retrain_refits_searches_promotes_heads_and_rescores(
    stack_settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    from db import hitl as store
    from db.engine import get_engine
    from detectors.morphology import MorphologyHeads
    from detectors.retrain import promoted_heads_path, retrain_heads
    from hitl.engine import SearchEngine

    settings = fresh_database(stack_settings, engine, tmp_path, "retrain")
    db = get_engine(settings)
    log = tmp_path / "scheduler.log"
    try:
        enc, ids, is_ring = seed_tiles(db)
        shipped = MorphologyHeads.load()
        assert shipped.encoder_version == enc  # the heads carried over below take these embeddings

        # a scientist labels, saves the search, then labels more: the saved learner is now stale
        session_id, _ = label_rings(db, enc, ids, is_ring, labels=range(3, 19))
        search = SearchEngine(db)
        saved = search.save(session_id, threshold=0.6)
        assert saved.learner_version == 1
        later = [(ids[i], bool(is_ring[i])) for i in range(19, 31)]
        search.label(session_id, later)

        proc = start_scheduler(settings, log, retrain_every_s=2)
        try:
            run = wait_for(
                "a finished retrain run",
                lambda: next(
                    (r for r in runs(db, "retrain") if r["outcome"] not in ("running", "skipped")), None
                ),
                timeout_s=240,
                logs=[log],
            )
        finally:
            assert stop(proc) == 0
        assert run["outcome"] == "ok", run

        # (a) the saved search was refitted on all 28 labels and notified about recent rings
        searches = run["metrics"]["searches"]
        assert (searches["active"], searches["refitted"], searches["errors"]) == (1, 1, [])
        assert searches["tiles_rescored"] == len(ids)
        refitted = store.saved_searches(db)[0]
        assert refitted.learner_version == 2 and refitted.last_label_id > saved.last_label_id
        notes = store.notifications(db, saved_search_id=refitted.id, limit=1000)
        assert notes and all(n["score"] >= 0.6 and n["learner_version"] == 2 for n in notes)
        seen = {str(t) for t in store.excluded_tiles(db, session_id, author="ana", concept="ring")}
        notified = {str(n["tile_id"]) for n in notes}
        assert not notified & seen  # nothing the owner already labelled or seeded
        ring_of = dict(zip(ids, is_ring, strict=True))
        assert all(ring_of[t] for t in notified), "only rings score above 0.6"

        # (b) the heads: trained on the HITL ring labels, registered, promoted, recent tiles re-scored
        heads_run = next(r for r in runs(db, "heads") if r["outcome"] == "ok")
        version = heads_run["metrics"]["version"]
        assert run["metrics"]["heads"]["version"] == version
        assert heads_run["metrics"]["labels"]["ring"]["hitl"] == 28
        assert heads_run["metrics"]["auc"]["ring"] > 0.9  # the embeddings carry the label
        assert heads_run["metrics"]["tiles_rescored"] == len(ids)
        with db.connect() as c:
            mv = (
                c.execute(text("SELECT * FROM model_versions WHERE name = :v"), {"v": version})
                .mappings()
                .one()
            )
            promo = c.execute(text("SELECT * FROM promotions WHERE role = 'morphology'")).mappings().all()
            scored = c.execute(
                text(
                    "SELECT label, count(DISTINCT tile_id) FROM detections WHERE model_version = :v GROUP BY label"
                ),
                {"v": version},
            ).all()
        assert mv["variant"] == "morphology-heads" and len(mv["checksum"]) == 64
        assert mv["card"]["carried_over"]["tasks"] == ["morphology"]  # the task the labels cannot retrain
        assert [(p["model_version"], p["previous"]) for p in promo] == [(version, shipped.version)]
        by_label: dict[str, int] = {str(k): int(v) for k, v in scored}
        assert by_label["ring"] == len(ids) and set(by_label) == set(shipped.labels)
        with db.connect() as c:
            ring_scores: dict[str, float] = dict(
                c.execute(
                    text(
                        "SELECT tile_id::text, score FROM detections "
                        "WHERE model_version = :v AND label = 'ring'"
                    ),
                    {"v": version},
                ).all()
            )
        pos = np.mean([s for t, s in ring_scores.items() if ring_of[t]])
        neg = np.mean([s for t, s in ring_scores.items() if not ring_of[t]])
        assert pos > neg + 0.3

        # the detector service loads the promoted heads at start-up
        path = promoted_heads_path(db)
        assert path is not None and path.is_relative_to(settings.data_dir)
        assert MorphologyHeads.load(path).version == version

        # no label since: the next run trains nothing; a new label: it trains again
        quiet = retrain_heads(db, settings, since=datetime.now(UTC))
        assert quiet.outcome == "ok" and quiet.detail.startswith("no new labels"), quiet
        search.label(session_id, [(ids[31], bool(is_ring[31])), (ids[32], bool(is_ring[32]))])
        again = retrain_heads(db, settings, since=heads_run["started_at"], rescore=False)
        assert again.outcome == "ok" and again.metrics["version"] != version, again
        assert promoted_heads_path(db) == Path(again.metrics["artifact"])
    finally:
        db.dispose()
