"""``galsift train heads --from-db``: retrain the morphology heads from the labels in the database.

The scheduled retraining job (``galsift retrain``) runs this command; it can also be run by hand.
One run, recorded in ``job_runs`` as ``heads`` under the job's lock (:func:`db.jobs.job_run`):

1. **anything new?** It trains only when labels changed since the last finished run (catalogue
   labels of the tasks' label sets, HITL labels of the concepts the heads know), when the
   serving heads take another encoder version's embeddings than the serving encoder's, or with
   ``--force``; otherwise the run is ``ok`` with "no new labels".
2. **labels.** Per task of :data:`detectors.morphology.DEFAULT_TASKS`: the catalogue label set
   (:func:`detectors.morphology.load_task`) plus the HITL labels whose concept is the task's
   name (a binary task, e.g. concept ``ring``: good = 1, bad = 0) or one of its classes (a
   multi-class task, e.g. concept ``spiral``: good labels only, since "not a spiral" names no
   class). Per tile the HITL users' majority counts (ties are left out), and it overrides the
   catalogue: a scientist looking at the tile in context corrects the catalogue.
3. **train** with :func:`detectors.morphology.train_heads` (held-out AUC, calibration, card).
   Tasks that cannot be trained (too few labels) keep the serving heads' head when those take
   the same embeddings, so a retraining never drops a detector. Too few labels for every task:
   the run is ``refused`` with the reason.
4. **register and promote**: weights and card under ``<data_dir>/models/morphology/``, a
   ``model_versions`` row (checksum, card) and a ``promotions`` row for role ``morphology``,
   which the detector service loads at start-up (:func:`promoted_heads_path`).
5. **re-score** the tiles embedded within ``settings.rescore_recent_hours``: their detection rows
   under the new version.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sqlalchemy import Engine

    from detectors.morphology import MorphologyHeads, TaskData
    from galsift.cli import CommandGroups
    from galsift.settings import Settings

log = logging.getLogger(__name__)

#: the ``job_runs.job`` of this command
JOB = "heads"
#: the ``promotions.role`` of the morphology heads
ROLE = "morphology"


@dataclass
class HeadsOutcome:
    """How one run ended: ``ok`` or ``refused``, why, and what it measured."""

    outcome: str
    detail: str
    metrics: dict[str, Any] = field(default_factory=dict)


# -- what serves ------------------------------------------------------------------------------------
def promoted_heads_path(engine: Engine) -> Path | None:
    """The weights file of the promoted morphology heads, or None (then the shipped heads serve).

    A promotion whose file is gone (another machine's data directory) is ignored with a warning.
    """
    from urllib.parse import unquote, urlparse

    from db.jobs import promoted

    row = promoted(engine, ROLE)
    if row is None:
        return None
    uri = urlparse(str(row["checkpoint_uri"]))
    path = Path(unquote(uri.path)) if uri.scheme == "file" else None
    if path is None or not path.is_file():
        log.warning(
            "promoted morphology heads %s: %s is not a local file; using the shipped heads",
            row["model_version"],
            row["checkpoint_uri"],
        )
        return None
    return path


def heads_encoder_version(engine: Engine, settings: Settings) -> str:
    """The encoder version the heads must take: the promoted LVM's, else the configured encoder's."""
    from db.jobs import promoted
    from detectors.morphology import serving_encoder_version

    lvm = promoted(engine, "lvm")
    return str(lvm["model_version"]) if lvm is not None else serving_encoder_version(settings)


# -- labels -------------------------------------------------------------------------------------------
def _hitl_majority(engine: Engine, concept: str, encoder_version: str) -> dict[str, tuple[Any, bool]]:
    """Tile -> (embedding, good) from every user's effective HITL label of ``concept``; ties left out."""
    import numpy as np

    from db.hitl import effective_labels
    from galsift.constants import EMBEDDING_DIM

    labels = effective_labels(engine, concept=concept, model_version=encoder_version, dim=EMBEDDING_DIM)
    votes: dict[str, list[bool]] = {}
    vecs: dict[str, np.ndarray] = {}
    for tile, vec, good in zip(labels.tile_ids, labels.embeddings, labels.good, strict=True):
        votes.setdefault(str(tile), []).append(bool(good))
        vecs[str(tile)] = vec
    out: dict[str, tuple[Any, bool]] = {}
    for tid, v in votes.items():
        yes = sum(v)
        if 2 * yes != len(v):
            out[tid] = (vecs[tid], 2 * yes > len(v))
    return out


def task_concepts(engine: Engine, task: str, label_set: str) -> list[str]:
    """The HITL concepts that label a task: its name (binary) or its declared classes."""
    from db.labels import get_label_set

    declared = get_label_set(engine, label_set)
    if declared is not None and declared.kind == "classes":
        return list(declared.classes)
    if declared is not None and declared.kind == "integer":
        return []  # catalogue codes: no concept names them
    return [task]


def task_data(
    engine: Engine, task: str, label_set: str, *, encoder_version: str
) -> tuple[TaskData | None, dict[str, int]]:
    """A task's catalogue labels merged with the matching HITL labels, and how many of each.

    Returns
    -------
    (TaskData or None, counts)
        None when neither source has a labelled, embedded tile; ``counts`` has ``catalogue``,
        ``hitl`` (tiles labelled through HITL) and ``hitl_overrides`` (of those, catalogue tiles).
    """
    import numpy as np

    from db.labels import get_label_set
    from detectors.morphology import TaskData, load_task

    declared = get_label_set(engine, label_set)
    catalogue = load_task(engine, task, label_set, encoder_version=encoder_version)
    by_tile: dict[str, tuple[np.ndarray, int]] = {}
    if catalogue is not None:
        by_tile = {
            t: (x, int(y)) for t, x, y in zip(catalogue.tile_ids, catalogue.x, catalogue.y, strict=True)
        }
    n_catalogue = len(by_tile)
    if declared is not None and declared.kind == "classes":
        classes = list(catalogue.classes) if catalogue is not None else list(declared.classes)
        hitl: dict[str, tuple[np.ndarray, int]] = {}
        for j, cls in enumerate(classes):
            for tid, (vec, good) in _hitl_majority(engine, cls, encoder_version).items():
                if good:
                    hitl[tid] = (vec, j)
    elif declared is not None and declared.kind == "integer":
        classes = list(catalogue.classes) if catalogue is not None else []
        hitl = {}
    else:
        classes = ["0", "1"]
        hitl = {t: (v, int(g)) for t, (v, g) in _hitl_majority(engine, task, encoder_version).items()}
    overrides = len(set(hitl) & set(by_tile))
    by_tile.update(hitl)
    counts = {"catalogue": n_catalogue, "hitl": len(hitl), "hitl_overrides": overrides}
    if not by_tile:
        return None, counts
    ids = sorted(by_tile)
    x = np.stack([np.asarray(by_tile[t][0], dtype=np.float64) for t in ids])
    y = np.asarray([by_tile[t][1] for t in ids], dtype=np.int64)
    name = f"{label_set}+hitl" if hitl else label_set
    return TaskData(task, name, classes, x, y, ids), counts


# -- one run --------------------------------------------------------------------------------------------
def _auc(metrics: Mapping[str, Any]) -> float | None:
    value = metrics.get("macro_auc") if isinstance(metrics.get("auc"), dict) else metrics.get("auc")
    return None if value is None else round(float(value), 4)


def _carry_over(new: MorphologyHeads, serving: MorphologyHeads) -> MorphologyHeads:
    """``new`` plus the serving heads' heads for tasks ``new`` lacks (same embeddings only)."""
    from detectors.morphology import MorphologyError, MorphologyHeads

    if serving.encoder_version != new.encoder_version or serving.dim != new.dim:
        return new
    trained = {h.task for h in new.heads}
    kept = [h for h in serving.heads if h.task not in trained]
    if not kept:
        return new
    card = {**new.card, "carried_over": {"from": serving.version, "tasks": [h.task for h in kept]}}
    try:
        return MorphologyHeads(
            [*new.heads, *kept], encoder_version=new.encoder_version, dim=new.dim, card=card
        )
    except MorphologyError as exc:  # a carried head would write a label a new one writes
        log.warning("heads: not carrying over %s: %s", [h.task for h in kept], exc)
        return new


def rescore_recent(engine: Engine, heads: MorphologyHeads, *, hours: float) -> int:
    """Write the heads' detection rows for the tiles embedded within ``hours``; returns tiles scored."""
    import uuid

    from db.detections import upsert_detections
    from db.jobs import recent_embeddings
    from db.models import DetectionCreate

    n = 0
    for ids, vectors in recent_embeddings(engine, heads.encoder_version, hours=hours):
        rows = [
            DetectionCreate(
                tile_id=uuid.UUID(tid),
                model_version=heads.version,
                detector=s.detector,
                label=s.label,
                score=float(p),
            )
            for s in heads.predict(vectors)
            for tid, p in zip(ids, s.probability, strict=True)
        ]
        upsert_detections(engine, rows)
        n += len(ids)
    return n


def retrain_heads(
    engine: Engine,
    settings: Settings,
    *,
    since: datetime | None,
    force: bool = False,
    encoder_version: str | None = None,
    tasks: Mapping[str, str] | None = None,
    rescore: bool = True,
    seed: int = 0,
) -> HeadsOutcome:
    """One retraining of the morphology heads (module docstring, steps 1-5).

    Parameters
    ----------
    engine, settings
        The database; ``data_dir`` (artifacts) and ``rescore_recent_hours``.
    since
        Start of the previous finished run (labels newer than this are new); None: first run.
    force
        Train even without new labels.
    encoder_version
        Embeddings to train on; default :func:`heads_encoder_version`.
    tasks
        Task -> catalogue label set; default :data:`detectors.morphology.DEFAULT_TASKS`.
    rescore
        Re-score the recently embedded tiles with the new heads.
    seed
        Seed of the held-out split and the calibration folds.
    """
    from db.jobs import label_changes_since, record_promotion
    from detectors import morphology as morph

    tasks = dict(tasks or morph.DEFAULT_TASKS)
    enc = encoder_version or heads_encoder_version(engine, settings)
    serving = morph.MorphologyHeads.load(promoted_heads_path(engine))
    concepts = sorted({c for t, s in tasks.items() for c in task_concepts(engine, t, s)})
    changes = label_changes_since(engine, since, label_sets=list(tasks.values()), concepts=concepts)
    metrics: dict[str, Any] = {
        "encoder_version": enc,
        "serving": serving.version,
        "new_labels": changes,
        "since": since,
    }
    if since is not None and not changes and serving.encoder_version == enc and not force:
        return HeadsOutcome("ok", f"no new labels since {since:%Y-%m-%d %H:%M:%S %Z}", metrics)

    loaded, label_counts, notes = [], {}, []
    for task, label_set in tasks.items():
        data, counts = task_data(engine, task, label_set, encoder_version=enc)
        label_counts[task] = {**counts, **(data.counts() if data is not None else {})}
        if data is None:
            notes.append(f"{task}: no labelled tile embedded by {enc}")
        else:
            loaded.append(data)
    metrics["labels"] = label_counts
    if not loaded:
        return HeadsOutcome("refused", "no labelled embeddings: " + "; ".join(notes), metrics)
    try:
        result = morph.train_heads(
            loaded,
            encoder_version=enc,
            seed=seed,
            progress=False,
            source={
                "database": "labels + hitl_labels JOIN embeddings",
                "label_sets": tasks,
                "counts": label_counts,
            },
        )
    except morph.MorphologyError as exc:
        return HeadsOutcome("refused", str(exc), metrics)
    heads = _carry_over(result.heads, serving)
    metrics["auc"] = {task: _auc(m) for task, m in result.metrics.items()}
    metrics["notes"] = notes + result.notes
    metrics["tasks"] = [h.task for h in heads.heads]
    if heads.version == serving.version:
        return HeadsOutcome("ok", f"retrained heads are the serving ones ({serving.version})", metrics)

    path = settings.data_dir / "models" / "morphology" / f"{heads.version}.json"
    heads.save(path)
    heads.register(engine, path)
    used = sum(len(d.y) for d in loaded)
    record_promotion(
        engine,
        role=ROLE,
        model_version=heads.version,
        previous=serving.version,
        reason=f"retrained on {used} labelled tiles ({sum(changes.values())} label changes since the last run)",
        metrics={"auc": metrics["auc"], "labels": label_counts, "encoder_version": enc},
    )
    metrics["version"] = heads.version
    metrics["previous"] = serving.version
    metrics["artifact"] = str(path)
    metrics["tiles_rescored"] = (
        rescore_recent(engine, heads, hours=settings.rescore_recent_hours) if rescore else 0
    )
    aucs = ", ".join(f"{t} {a}" for t, a in metrics["auc"].items())
    return HeadsOutcome(
        "ok",
        f"promoted {heads.version} (was {serving.version}; held-out AUC {aucs}); "
        f"{metrics['tiles_rescored']} recent tiles re-scored",
        metrics,
    )


# -- the command ------------------------------------------------------------------------------------------
def register(groups: CommandGroups) -> None:
    """Add ``galsift train heads``."""
    p = groups.train.add_parser(
        "heads",
        help="retrain the morphology heads from the labels in the database, promote, re-score recent tiles",
        description="What the scheduled retraining job runs. Trains only when labels changed since "
        "the last run (catalogue label sets of the default tasks, and HITL labels whose concept is a "
        "task or class name, e.g. ring), registers and promotes the new heads (the detector service "
        "loads them at start-up) and re-scores the tiles embedded within GALSIFT_RESCORE_RECENT_HOURS. "
        "Recorded in job_runs as 'heads'; skipped if already running anywhere. For a one-off "
        "training with chosen tasks and options, see `galsift train morphology`.",
    )
    p.add_argument(
        "--from-db",
        action="store_true",
        required=True,
        help="train on the labels and embeddings in the database (the only source today)",
    )
    p.add_argument(
        "--encoder-version", default=None, help="embeddings to train on (default: the serving encoder's)"
    )
    p.add_argument("--force", action="store_true", help="train even if no label changed since the last run")
    p.add_argument("--no-rescore", action="store_true", help="do not re-score the recently embedded tiles")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split and calibration folds")
    p.add_argument("--json", type=Path, default=None, help="write the run's outcome and metrics as JSON here")
    p.set_defaults(func=_heads)


def _heads(args: argparse.Namespace, settings: Settings) -> int:
    from db.engine import get_engine
    from db.jobs import JobInterrupted, job_run, stop_on_signals

    engine = get_engine(settings)
    try:
        with stop_on_signals(), job_run(engine, JOB) as run:
            if run is None:
                print("train heads: already running in another process; skipped")
                return 0
            res = retrain_heads(
                engine,
                settings,
                since=run.since,
                force=args.force,
                encoder_version=args.encoder_version,
                rescore=not args.no_rescore,
                seed=args.seed,
            )
            run.outcome, run.detail, run.metrics = res.outcome, res.detail, res.metrics
        print(f"train heads: {res.outcome}: {res.detail}")
        if args.json is not None:
            doc = {"command": "train heads", "outcome": res.outcome, "detail": res.detail, **res.metrics}
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(doc, default=str, indent=1) + "\n", encoding="utf-8")
        return 0
    except JobInterrupted as exc:
        print(f"train heads: interrupted ({exc})", file=sys.stderr)
        return 143
    except Exception as exc:  # recorded 'failed' by job_run; the exit status says so
        log.exception("train heads failed")
        print(f"train heads: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
