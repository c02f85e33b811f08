"""Continual self-supervised pretraining of the serving LVM on the stream: ``galsift train continual``.

One run (the scheduler's weekly ``pretrain`` job, or by hand) is recorded in ``job_runs`` through
:func:`db.jobs.job_run`, which also keeps two runs from overlapping. It

1. takes the **serving** LVM as the current version: the checkpoint the encoder service loads when
   started without ``--model`` (:func:`encoder.service.resolve_checkpoint`: the configured
   ``model_checkpoint`` if set, else the newest ``promotions`` row of role ``lvm``, else the shipped
   checkpoint), registered in ``model_versions`` if it is not yet. A promoted version whose
   embedding backfill an earlier run left unfinished (killed) is backfilled first;
2. reads the tiles ingested since that version was made: after ``continual.tiles_until`` of its
   card (the end of the window a continual candidate was trained on), else after the card's
   ``created`` time. Fewer than ``pretrain_min_tiles`` readable tiles: outcome ``refused``, no
   training. So do label sets too small to compare on (step 4's minimum), checked before training;
3. continues the self-supervised pretraining (:mod:`encoder.train`'s loop and objective, the
   loss weights of the parent's card) from the current weights, its input-statistics
   standardisation and, when the parent was itself trained here, its projection heads and
   optimizer state, on those tiles (a few epochs, seeded, with a share of simulations that
   keeps rare kinds in view), and saves the candidate with its card (``parent`` = the current
   version) under ``<data_dir>/models/``;
4. compares candidate and current on the labelled data in the database, by the rule below;
5. promotes only a candidate better by the margin: it registers the candidate's model version,
   inserts a ``promotions`` row (role ``lvm``, previous version, reason, the comparison) and
   backfills every stored tile's embedding with it (:func:`encoder.service.backfill` works from the
   missing embeddings, so a killed backfill resumes where it stopped, in the next run or with
   ``galsift encode --backfill``). Otherwise the outcome is ``refused`` with the comparison in the
   run's metrics and detail.

The comparison rule
-------------------
Every catalogue label set (``labels``; a tile counts once, with its newest label) and every HITL
concept (``hitl_labels``; the newest unretracted label of a tile, over all users) is one task.
Classes with fewer than ``min_per_class`` tiles are dropped; a task needs at least two classes
left and ``min_labelled`` tiles, otherwise it is skipped (and said so). The labelled tiles are
read from the object store and embedded by both models (the stored 256-d embedding, the serving
code path). On each task the score is the cross-validated AUC of a linear probe (standardise,
logistic regression, as :func:`encoder.evaluate.linear_head_scores`): stratified k-fold
(``k = min(folds, smallest class)``), out-of-fold scores pooled, macro one-vs-rest AUC for
several classes, averaged over ``repeats`` shuffles. Both models see the same folds (a paired
comparison). The candidate is promoted when the mean over tasks of (candidate AUC - current
AUC) is at least ``margin`` (default 0.01): a candidate that is merely as good does not churn
every stored vector, and differences below a hundredth of AUC are within the fold-to-fold noise
of label sets this size.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from db.models import ModelVersionPublic
    from encoder.train import UnlabelledImages
    from galsift.settings import Settings

log = logging.getLogger(__name__)

#: the job's name in ``job_runs`` (and its advisory lock)
JOB = "pretrain"
#: the ``promotions`` role of the serving LVM
ROLE = "lvm"
#: parent card's training options a continual run keeps (the objective stays the same)
INHERITED = (
    "w_recon",
    "w_mim",
    "w_contrast",
    "w_sim",
    "recon_fraction",
    "mask_ratio",
    "mask_block",
    "temperature",
    "sim_lens_fraction",
    "sim_zoom",
    "weight_decay",
)


class ContinualError(ValueError):
    """Options with which the job cannot run."""


@dataclass
class ContinualConfig:
    """Options of :func:`run_continual` (the ``galsift train continual`` flags).

    Attributes
    ----------
    epochs
        Passes over the new tiles' training part (``steps = ceil(epochs * tiles / batch_size)``).
    max_steps
        At most this many optimisation steps (None: no cap).
    batch_size, lr, min_lr, warmup
        Schedule of the continued pretraining (cosine from ``lr`` to ``min_lr``). The peak rate is
        lower than a first pretraining's, so a week of tiles adjusts the model, not replaces it.
    sim_fraction, sim_pool
        Share of every batch drawn from a pool of ``sim_pool`` simulations (0: survey tiles only).
    val_fraction
        New tiles held out (by content hash) for the before/after validation metrics.
    max_tiles
        At most this many new tiles are trained on, a seeded pseudo-random sample of the window
        (bounds the memory: tiles are held in RAM as model input).
    min_tiles
        Fewest new readable tiles to train on; None: ``settings.pretrain_min_tiles``.
    margin
        Promote when the mean AUC difference (candidate - current) is at least this.
    min_labelled, min_per_class, max_labelled
        Task sizes of the comparison (see the module docstring); ``max_labelled`` caps one task
        (seeded sample) so the comparison stays cheap on large label sets.
    folds, repeats
        Cross-validation of the linear probe.
    seed
        Seed of every random choice (deterministic on CPU).
    device
        Torch device or ``auto``; None: ``settings.device``.
    progress
        Progress bars on stderr.
    """

    epochs: float = 2.0
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 2e-4
    min_lr: float = 1e-5
    warmup: int = 20
    sim_fraction: float = 0.25
    sim_pool: int = 512
    val_fraction: float = 0.1
    max_tiles: int = 20_000
    min_tiles: int | None = None
    margin: float = 0.01
    min_labelled: int = 20
    min_per_class: int = 5
    max_labelled: int = 5_000
    folds: int = 5
    repeats: int = 3
    seed: int = 0
    device: str | None = None
    progress: bool = True

    def check(self) -> None:
        """Refuse options the job cannot run with.

        Raises
        ------
        ContinualError
            On an out-of-range option.
        """
        if not self.epochs > 0 or (self.max_steps is not None and self.max_steps < 1):
            raise ContinualError("epochs must be > 0 and max_steps >= 1")
        if self.batch_size < 2:
            raise ContinualError("batch_size must be >= 2 (contrastive pairs)")
        if not 0.0 <= self.sim_fraction < 1.0:
            raise ContinualError("sim_fraction must be within [0, 1): the new tiles are the point")
        if not 0.0 < self.val_fraction < 0.5:
            raise ContinualError("val_fraction must be within (0, 0.5)")
        if self.min_per_class < 2 or self.folds < 2 or self.repeats < 1:
            raise ContinualError("min_per_class and folds must be >= 2, repeats >= 1")
        if self.max_tiles < 1 or self.max_labelled < 2 * self.min_per_class:
            raise ContinualError("max_tiles must be >= 1 and max_labelled >= 2 * min_per_class")


@dataclass
class Current:
    """The serving LVM: its registry row, checkpoint, card, and whether a promotion put it there."""

    version: ModelVersionPublic
    checkpoint: Path
    card: dict[str, Any]
    promoted: bool


@dataclass
class TaskScore:
    """One label set's cross-validated linear-probe AUC for both models."""

    task: str
    tiles: int
    classes: list[int]
    current: list[float]
    candidate: list[float]

    @property
    def delta(self) -> float:
        """Mean paired difference candidate - current over the repeats."""
        return float(np.mean(np.asarray(self.candidate) - np.asarray(self.current)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "task": self.task,
            "tiles": self.tiles,
            "classes": self.classes,
            "auc_current": float(np.mean(self.current)),
            "auc_candidate": float(np.mean(self.candidate)),
            "auc_current_std": float(np.std(self.current)),
            "auc_candidate_std": float(np.std(self.candidate)),
            "delta": self.delta,
        }


@dataclass
class ContinualResult:
    """What one run did: outcome (``ok`` = promoted, ``refused``, ``skipped``), why, and the numbers."""

    outcome: str
    detail: str
    metrics: dict[str, Any] = field(default_factory=dict)
    run_id: int | None = None
    current: str | None = None
    candidate: str | None = None
    scores: list[TaskScore] = field(default_factory=list)

    @property
    def promoted(self) -> bool:
        """Whether the candidate was promoted."""
        return self.outcome == "ok"


@dataclass
class _Task:
    name: str
    tile_ids: list[str]
    values: np.ndarray


# --------------------------------------------------------------------------- the serving version
def current_version(engine: Engine, settings: Settings) -> Current:
    """The LVM the encoder serves (see :func:`encoder.service.resolve_checkpoint`), registered.

    Parameters
    ----------
    engine
        Engine of the galsift database.
    settings
        Process settings (``model_checkpoint``).

    Returns
    -------
    Current
        Its model version, checkpoint path, card, and whether it is the newest ``lvm`` promotion.
    """
    from db import repo
    from encoder.checkpoint import read_card
    from encoder.service import model_version_for, promoted_version, resolve_checkpoint

    checkpoint = resolve_checkpoint(engine, None, settings)
    card = read_card(checkpoint)
    version = repo.register_model_version(engine, model_version_for(checkpoint, card))
    promoted = promoted_version(engine)
    return Current(version, checkpoint, card, promoted is not None and promoted.name == version.name)


def _window_start(card: dict[str, Any]) -> dt.datetime | None:
    """Start of the "tiles since this version" window, from its card (None: every tile)."""
    raw = (card.get("continual") or {}).get("tiles_until") or card.get("created")
    if not raw:
        return None
    start = dt.datetime.fromisoformat(str(raw))
    # cards write UTC with an offset; a naive time would compare wrongly with timestamptz
    return start if start.tzinfo is not None else start.replace(tzinfo=dt.UTC)


def _db_now(engine: Engine) -> dt.datetime:
    from sqlalchemy import text

    # the database's clock, the one ingested_at was written with
    with engine.connect() as c:
        now: dt.datetime = c.execute(text("SELECT now()")).scalar_one()
    return now


def count_new_tiles(engine: Engine, since: dt.datetime | None, until: dt.datetime) -> int:
    """Tiles with ``since < ingested_at <= until``."""
    from sqlalchemy import text

    with engine.connect() as c:
        return int(
            c.execute(
                text(
                    "SELECT count(*) FROM tiles WHERE ingested_at <= :until "
                    "AND (CAST(:since AS timestamptz) IS NULL OR ingested_at > :since)"
                ),
                {"since": since, "until": until},
            ).scalar_one()
        )


def _new_tile_rows(
    engine: Engine, since: dt.datetime | None, until: dt.datetime, *, limit: int, seed: int
) -> list[tuple[str, str, str, list[str]]]:
    from sqlalchemy import text

    # a seeded pseudo-random sample when the window holds more than ``limit`` tiles: hashing the
    # id with the seed spreads it over the whole window instead of its oldest or newest part
    sql = text(
        "SELECT id::text, pixels_uri, checksum, bands FROM tiles WHERE ingested_at <= :until "
        "AND (CAST(:since AS timestamptz) IS NULL OR ingested_at > :since) "
        "ORDER BY md5(id::text || :seed) LIMIT :n"
    )
    with engine.connect() as c:
        rows = c.execute(sql, {"since": since, "until": until, "seed": str(seed), "n": limit}).all()
    return [(str(r[0]), str(r[1]), str(r[2]), [str(b) for b in r[3]]) for r in rows]


def _load_tiles(
    rows: Sequence[tuple[str, str, str, list[str]]], size: int, *, progress: bool, desc: str
) -> tuple[list[str], np.ndarray, int]:
    """Model input of stored tiles (object store, checksum verified); unreadable ones are skipped."""
    from tqdm.auto import tqdm

    from encoder.service import load_tile
    from galsift.stage import Rejected

    def one(row: tuple[str, str, str, list[str]]) -> np.ndarray | None:
        tid, uri, checksum, bands = row
        try:
            return load_tile(uri, checksum, size, bands=bands)
        except Rejected as exc:
            # the encoder service records these; here a tile less to learn from is no failure
            log.warning("continual: tile %s skipped: %s", tid, exc)
            return None

    ids: list[str] = []
    images: list[np.ndarray] = []
    # reading is I/O (an object store, s3 in production): a few threads keep it from dominating
    with ThreadPoolExecutor(max_workers=8) as pool:
        for row, img in tqdm(
            zip(rows, pool.map(one, rows), strict=True),
            total=len(rows),
            desc=desc,
            unit="tile",
            disable=not progress,
        ):
            if img is not None:
                ids.append(row[0])
                images.append(img)
    stacked = np.stack(images) if images else np.zeros((0, 3, size, size), np.float32)
    return ids, stacked, len(rows) - len(ids)


def _split(images: np.ndarray, val_fraction: float) -> UnlabelledImages:
    """Drop exact duplicates and split by content hash, as :func:`encoder.train.load_unlabelled`."""
    from encoder.train import UnlabelledImages, _content_hash, _is_val

    seen: set[str] = set()
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for img in images:
        key = _content_hash(img)
        if key in seen:
            continue
        seen.add(key)
        (val if _is_val(key, val_fraction) else train).append(img)
    empty = np.zeros((0, *images.shape[1:]), np.float32)
    return UnlabelledImages(
        np.stack(train) if train else empty,
        np.stack(val) if val else empty,
        [{"source": "tiles", "images": len(images), "new": len(seen)}],
    )


# --------------------------------------------------------------------------- training
def _pretrainer_class() -> type:
    """The continual trainer, built on :class:`encoder.train._Pretrainer` (imported lazily: torch)."""
    import torch

    from encoder.checkpoint import load_train_state, load_weights, train_state_path
    from encoder.train import PretrainConfig, _np_rng, _Pretrainer

    class ContinualPretrainer(_Pretrainer):
        """:class:`_Pretrainer` started from a checkpoint's weights on images already in memory.

        It differs from ``resume=`` in that the schedule starts again (a new warm-up and decay
        over this run's steps) and the parent needs no training state (the shipped checkpoint has
        none); it differs from a fresh run in that the weights, and with them the input-statistics
        standardisation of the embedding, come from the parent and are not re-estimated.
        """

        def __init__(
            self, cfg: PretrainConfig, parent: Path, images: UnlabelledImages, card: dict[str, Any]
        ) -> None:
            super().__init__(cfg)
            load_weights(self.model, parent)
            if train_state_path(parent).is_file():
                # a parent trained here: its projection heads (and moments) continue too, so the
                # contrastive term does not start from a random head that would pull the encoder
                load_train_state(parent, optimizer=self.optimizer, modules={"heads": self.heads})
            self.images = images
            self.extra_card = card

        def load_data(self) -> None:
            from encoder.sim import SIM_LABELS, simulate_batch

            cfg = self.cfg
            self.real = self.images
            n_labels = len(SIM_LABELS)
            if cfg.sim_fraction > 0:
                pool = simulate_batch(
                    cfg.sim_pool,
                    rng=_np_rng(cfg.seed, 0, 101),
                    size=self.size,
                    lens_fraction=cfg.sim_lens_fraction,
                    zoom=cfg.sim_zoom,
                )
                self.sims, self.sim_targets = pool.images, torch.from_numpy(pool.labels)
            else:
                # no simulation at all: the simulator costs seconds even for an empty pool
                self.sims = np.zeros((0, 3, self.size, self.size), np.float32)
                self.sim_targets = torch.zeros((0, n_labels))
            # validation stays on held-out new tiles: before/after metrics of this run's data
            self.val_sims = np.zeros((0, 3, self.size, self.size), np.float32)
            self.val_sim_targets = np.zeros((0, n_labels), np.float32)
            self.sim_label_names = SIM_LABELS
            self.train_real = torch.from_numpy(self.real.train)
            self.train_sims = torch.from_numpy(self.sims)
            # no set_stats_normalisation: the parent's standardisation is part of its embedding

        def card(self, step: int, elapsed: float) -> dict[str, Any]:
            return {**super().card(step, elapsed), **self.extra_card}

    return ContinualPretrainer


def train_candidate(
    current: Current,
    images: UnlabelledImages,
    out: Path,
    cfg: ContinualConfig,
    *,
    device: str,
    extra_card: dict[str, Any],
) -> dict[str, Any]:
    """Continue the current version's self-supervised pretraining on ``images``; write ``out``.

    Parameters
    ----------
    current
        The parent.
    images
        New tiles as model input, split into train and validation.
    out
        Candidate weights path (``*.safetensors``); the card goes beside it.
    cfg
        Schedule and data mix.
    device
        Torch device name.
    extra_card
        Card fields recording the run (parent, tile window, job run).

    Returns
    -------
    dict
        ``card`` (the written card), ``steps``, ``val_start`` and ``val_end`` (held-out metrics).
    """
    from encoder.train import PretrainConfig, TrainingError

    if len(images.train) == 0:
        raise TrainingError("no new tile left for training after the validation split")
    steps = max(1, math.ceil(cfg.epochs * len(images.train) / cfg.batch_size))
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    parent_training = current.card.get("training") or {}
    inherited = {k: parent_training[k] for k in INHERITED if k in parent_training}
    if "sim_zoom" in inherited:
        inherited["sim_zoom"] = tuple(inherited["sim_zoom"])
    pcfg = PretrainConfig(
        out=out,
        model=str(current.card["variant"]),
        overrides=dict(current.card.get("config") or {}),
        steps=steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        # a warm-up of at most a tenth of a short run: Adam's moments settle, the rate still decays
        warmup=max(1, min(cfg.warmup, steps // 10)),
        sim_fraction=cfg.sim_fraction,
        sim_pool=cfg.sim_pool,
        val_fraction=cfg.val_fraction,
        val_every=steps,
        ckpt_every=steps + 1,
        seed=cfg.seed,
        device=device,
        progress=cfg.progress,
        **inherited,
    )
    trainer = _pretrainer_class()(pcfg, current.checkpoint, images, extra_card)
    result = trainer.run()
    return {
        "card": result.card,
        "steps": result.step,
        "val_start": result.history[0] if result.history else {},
        "val_end": result.history[-1] if result.history else {},
    }


# --------------------------------------------------------------------------- labelled data
def labelled_tasks(engine: Engine, *, max_per_task: int, seed: int) -> list[_Task]:
    """Catalogue label sets and HITL concepts, one label per tile each (newest; unretracted)."""
    from sqlalchemy import text

    catalogue = (
        "SELECT DISTINCT ON (label_set, tile_id) 'labels:' || label_set, tile_id::text, value "
        "FROM labels ORDER BY label_set, tile_id, created_at DESC, id DESC"
    )
    # a tile two users disagree on counts with the newest label (the retraining jobs see both)
    hitl = (
        "SELECT DISTINCT ON (concept, tile_id) 'hitl:' || concept, tile_id::text, good::int "
        "FROM hitl_labels WHERE retracted_at IS NULL ORDER BY concept, tile_id, id DESC"
    )
    by_task: dict[str, list[tuple[str, int]]] = {}
    with engine.connect() as c:
        for sql in (catalogue, hitl):
            for name, tid, value in c.execute(text(sql)):
                by_task.setdefault(str(name), []).append((str(tid), int(value)))
    rng = np.random.default_rng(seed)
    tasks = []
    for name in sorted(by_task):
        rows = sorted(by_task[name])
        if len(rows) > max_per_task:
            pick = np.sort(rng.choice(len(rows), max_per_task, replace=False))
            rows = [rows[i] for i in pick]
        tasks.append(_Task(name, [t for t, _ in rows], np.asarray([v for _, v in rows], np.int64)))
    return tasks


def usable_tasks(
    tasks: Sequence[_Task], *, min_labelled: int, min_per_class: int
) -> tuple[list[_Task], dict[str, str]]:
    """Tasks reduced to their classes of ``min_per_class`` tiles, and why the others were skipped."""
    kept, skipped = [], {}
    for t in tasks:
        values, counts = np.unique(t.values, return_counts=True)
        classes = values[counts >= min_per_class]
        mask = np.isin(t.values, classes)
        if len(classes) < 2 or int(mask.sum()) < min_labelled:
            skipped[t.name] = (
                f"{int(mask.sum())} tiles in {len(classes)} classes of >= {min_per_class} "
                f"(needs >= 2 classes and >= {min_labelled} tiles)"
            )
            continue
        kept.append(_Task(t.name, [i for i, m in zip(t.tile_ids, mask, strict=True) if m], t.values[mask]))
    return kept, skipped


def cv_auc(x: np.ndarray, y: np.ndarray, *, folds: int, repeats: int, seed: int) -> list[float]:
    """Cross-validated linear-probe AUC, one value per repeat (see the module docstring).

    Parameters
    ----------
    x
        (N, D) features.
    y
        (N,) class labels (any integers; two or more classes).
    folds
        Most folds (fewer when the smallest class is smaller).
    repeats
        Shuffles of the folds; the ``r``-th uses ``seed + r``, so two models scored with the same
        arguments see the same folds.
    seed
        Seed of the first shuffle.
    """
    from threadpoolctl import threadpool_limits

    classes, yi = np.unique(y, return_inverse=True)
    k = int(min(folds, np.bincount(yi).min()))
    # one BLAS thread: these fits are tiny (hundreds of rows, 256 columns); two threads made
    # each fit 9x slower on a loaded 2-core machine (0.44 s against 0.05 s, measured)
    with threadpool_limits(limits=1, user_api="blas"):
        return [_cv_auc_once(x, yi, k=k, binary=len(classes) == 2, seed=seed + r) for r in range(repeats)]


def _cv_auc_once(x: np.ndarray, yi: np.ndarray, *, k: int, binary: bool, seed: int) -> float:
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    from encoder.evaluate import linear_head_scores

    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    scores = np.zeros((len(yi),) if binary else (len(yi), int(yi.max()) + 1))
    for tr, te in skf.split(x, yi):
        scores[te] = linear_head_scores(x[tr], yi[tr], x[te])
    if binary:
        return float(roc_auc_score(yi, scores))
    e = np.exp(scores - scores.max(axis=1, keepdims=True))
    return float(roc_auc_score(yi, e / e.sum(axis=1, keepdims=True), multi_class="ovr"))


def compare(
    tasks: Sequence[_Task],
    features: dict[str, dict[str, np.ndarray]],
    cfg: ContinualConfig,
) -> list[TaskScore]:
    """Score every task with both models' features (``features[model][tile_id]``), same folds."""
    scores = []
    for t in tasks:
        ids = [i for i in t.tile_ids if i in features["current"] and i in features["candidate"]]
        keep = np.isin(t.tile_ids, ids)
        y = t.values[keep]
        # tiles whose pixels could not be read may have shrunk a class below the minimum
        _, counts = np.unique(y, return_counts=True)
        if len(counts) < 2 or counts.min() < 2:
            continue
        per_model = {
            m: cv_auc(
                np.stack([features[m][i] for i in ids]),
                y,
                folds=cfg.folds,
                repeats=cfg.repeats,
                seed=cfg.seed,
            )
            for m in ("current", "candidate")
        }
        scores.append(
            TaskScore(
                t.name, len(ids), [int(v) for v in np.unique(y)], per_model["current"], per_model["candidate"]
            )
        )
    return scores


def decide(scores: Sequence[TaskScore], margin: float) -> tuple[bool, float]:
    """The promotion rule: the mean over tasks of the paired AUC difference is at least ``margin``.

    Returns
    -------
    tuple
        ``(promote, mean_delta)``; no task scored: ``(False, nan)``.
    """
    if not scores:
        return False, float("nan")
    mean_delta = float(np.mean([s.delta for s in scores]))
    return mean_delta >= margin, mean_delta


def _embed_labelled(
    engine: Engine,
    tasks: Sequence[_Task],
    checkpoints: dict[str, Path],
    *,
    device: str,
    progress: bool,
) -> dict[str, dict[str, np.ndarray]]:
    """Embed every labelled tile once per model, from the stored pixels."""
    from sqlalchemy import bindparam, text
    from sqlalchemy.dialects.postgresql import ARRAY, UUID

    from encoder.service import Embedder

    wanted = sorted({i for t in tasks for i in t.tile_ids})
    sql = text(
        "SELECT id::text, pixels_uri, checksum, bands FROM tiles WHERE id = ANY(:ids) ORDER BY id"
    ).bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=False))))
    with engine.connect() as c:
        rows = [
            (str(r[0]), str(r[1]), str(r[2]), [str(b) for b in r[3]]) for r in c.execute(sql, {"ids": wanted})
        ]
    out: dict[str, dict[str, np.ndarray]] = {}
    loaded: dict[int, tuple[list[str], np.ndarray]] = {}
    for role, path in checkpoints.items():
        embedder = Embedder(path, device=device)
        if embedder.img_size not in loaded:
            ids, images, _ = _load_tiles(rows, embedder.img_size, progress=progress, desc="labelled tiles")
            loaded[embedder.img_size] = (ids, images)
        ids, images = loaded[embedder.img_size]
        vectors = embedder.embed(images) if len(images) else np.zeros((0, 0), np.float32)
        out[role] = dict(zip(ids, vectors, strict=True))
    return out


# --------------------------------------------------------------------------- the job
def _finite(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as None: jsonb refuses them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def run_continual(
    settings: Settings, cfg: ContinualConfig, *, engine: Engine | None = None
) -> ContinualResult:
    """One run of the continual-pretraining job (see the module docstring), recorded in ``job_runs``.

    Parameters
    ----------
    settings
        Process settings (database, object store, ``data_dir``, ``pretrain_min_tiles``, device).
    cfg
        Options.
    engine
        Engine of the galsift database (default: one from ``settings``).

    Returns
    -------
    ContinualResult
        ``ok`` when a candidate was promoted, ``refused`` with the reason otherwise, ``skipped``
        when another process is running the job.

    Raises
    ------
    ContinualError
        On bad options (nothing is recorded).
    """
    from db.jobs import job_run

    cfg.check()
    own = engine is None
    if engine is None:
        from db.engine import get_engine

        engine = get_engine(settings)
    try:
        with job_run(engine, JOB) as run:
            if run is None:
                return ContinualResult("skipped", "already running in another process")
            # the run's own metrics dict: what a failing run had measured is recorded with it
            result = _run(settings, engine, cfg, run_id=run.id, metrics=run.metrics)
            run.outcome = "ok" if result.outcome == "ok" else "refused"
            run.detail = result.detail
            run.metrics = _finite(result.metrics)
        result.run_id = run.id
        return result
    finally:
        if own:
            engine.dispose()  # its pooled connections, not left to the garbage collector


def _run(
    settings: Settings, engine: Engine, cfg: ContinualConfig, *, run_id: int, metrics: dict[str, Any]
) -> ContinualResult:
    from db import repo
    from db.jobs import record_promotion
    from encoder.service import Embedder, backfill, model_version_for

    t0 = time.perf_counter()
    # seconds per phase, in the run's metrics: what a weekly run spends its time on
    timings: dict[str, float] = {}

    def lap(phase: str, since: float) -> float:
        now = time.perf_counter()
        timings[phase] = round(now - since, 2)
        return now

    device = cfg.device or settings.device
    min_tiles = cfg.min_tiles if cfg.min_tiles is not None else settings.pretrain_min_tiles
    current = current_version(engine, settings)
    metrics.update(current=current.version.name, margin=cfg.margin, min_tiles=min_tiles, timings=timings)
    res = ContinualResult("refused", "", metrics, current=current.version.name)

    if current.promoted and repo.count_missing_embeddings(engine, current.version.name):
        # a run killed during its backfill left the serving version with tiles it never embedded
        metrics["resumed_backfill"] = backfill(
            engine, Embedder(current.checkpoint, device=device), progress=cfg.progress
        )

    since, until = _window_start(current.card), _db_now(engine)
    metrics["tiles_since"] = since.isoformat() if since else None
    metrics["tiles_until"] = until.isoformat()
    new = count_new_tiles(engine, since, until)
    metrics["new_tiles"] = new
    if new < min_tiles:
        res.detail = f"too few new tiles: {new} ingested since {current.version.name} was made, < {min_tiles}"
        return res

    # labelled data before training: no point training a candidate that cannot be compared
    tasks, skipped = usable_tasks(
        labelled_tasks(engine, max_per_task=cfg.max_labelled, seed=cfg.seed),
        min_labelled=cfg.min_labelled,
        min_per_class=cfg.min_per_class,
    )
    metrics["skipped_label_sets"] = skipped
    if not tasks:
        res.detail = (
            f"too few labelled tiles to compare on: no label set or HITL concept with >= "
            f"{cfg.min_labelled} tiles in >= 2 classes of >= {cfg.min_per_class}"
        )
        return res

    size = int(current.card["config"]["img_size"])
    rows = _new_tile_rows(engine, since, until, limit=cfg.max_tiles, seed=cfg.seed)
    t = lap("prepare", t0)
    _, images, unreadable = _load_tiles(rows, size, progress=cfg.progress, desc="new tiles")
    t = lap("read_tiles", t)
    metrics["unreadable_tiles"] = unreadable
    if len(images) < min_tiles:
        res.detail = f"too few readable new tiles: {len(images)} of {new}, < {min_tiles}"
        return res
    split = _split(images, cfg.val_fraction)
    del images
    variant = str(current.card["variant"])
    # the time as well as the run id: two databases on one data directory (tests, a restored
    # backup) number their runs alike, and a candidate file must never be overwritten
    stamp = until.strftime("%Y%m%dT%H%M%S")
    out = settings.data_dir / "models" / f"{variant}-continual-{stamp}-run{run_id}.safetensors"
    extra_card = {
        "kind": "continual",
        "parent": current.version.name,
        "parent_checkpoint": current.version.checkpoint_uri,
        "continual": {
            "job_run": run_id,
            "tiles_since": metrics["tiles_since"],
            "tiles_until": metrics["tiles_until"],
            "tiles": len(split.train) + len(split.val),
            "parent_step": current.card.get("step"),
        },
    }
    trained = train_candidate(current, split, out, cfg, device=device, extra_card=extra_card)
    t = lap("train", t)
    card = trained["card"]
    res.candidate = str(card["version"])
    metrics.update(
        candidate=res.candidate,
        candidate_checkpoint=str(out),
        training={
            "steps": trained["steps"],
            "tiles_read": int(split.sources[0]["images"]),
            "train_tiles": len(split.train),
            "val_tiles": len(split.val),
            "val_start": trained["val_start"],
            "val_end": trained["val_end"],
        },
    )

    features = _embed_labelled(
        engine, tasks, {"current": current.checkpoint, "candidate": out}, device=device, progress=cfg.progress
    )
    t = lap("embed_labelled", t)
    scores = compare(tasks, features, cfg)
    t = lap("compare", t)
    res.scores = scores
    promote, mean_delta = decide(scores, cfg.margin)
    metrics["comparison"] = {
        "rule": "promote iff mean over label sets of (candidate AUC - current AUC) >= margin",
        "metric": f"linear-probe AUC, stratified {cfg.folds}-fold x {cfg.repeats}",
        "tasks": [s.to_dict() for s in scores],
        "mean_current": float(np.mean([np.mean(s.current) for s in scores])) if scores else None,
        "mean_candidate": float(np.mean([np.mean(s.candidate) for s in scores])) if scores else None,
        "mean_delta": mean_delta,
    }
    summary = ", ".join(f"{s.task} {np.mean(s.current):.3f}->{np.mean(s.candidate):.3f}" for s in scores)
    if not promote:
        res.detail = (
            f"candidate {res.candidate} not better by the margin: mean AUC change {mean_delta:+.4f} "
            f"< {cfg.margin} ({summary})"
            if scores
            else "too few readable labelled tiles to compare on"
        )
        # a refused candidate's weights and card stay for inspection; its training state (twice
        # the weights' size) only serves continuing from it, which no run will do
        from encoder.checkpoint import train_state_path

        train_state_path(out).unlink(missing_ok=True)
        metrics["seconds"] = round(time.perf_counter() - t0, 1)
        return res

    version = repo.register_model_version(engine, model_version_for(out, card))
    reason = (
        f"continual pretraining on {metrics['training']['tiles_read']} of {new} new tiles: mean AUC change "
        f"{mean_delta:+.4f} >= {cfg.margin} ({summary})"
    )
    record_promotion(
        engine,
        role=ROLE,
        model_version=version.name,
        previous=current.version.name,
        reason=reason,
        metrics=_finite(metrics["comparison"]),
    )
    # after the promotion row: a killed backfill then leaves the serving version with missing
    # vectors, which the next run (or galsift encode --backfill) completes
    metrics["backfill"] = backfill(engine, Embedder(out, device=device), progress=cfg.progress)
    lap("backfill", t)
    if settings.model_checkpoint is not None:
        metrics["note"] = "settings.model_checkpoint pins the encoder: unset it to serve the promotion"
    res.outcome = "ok"
    res.detail = f"promoted {version.name} (previous {current.version.name}): {reason}"
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    return res


# --------------------------------------------------------------------------- CLI
def result_rows(result: ContinualResult) -> list[dict[str, Any]]:
    """Flat rows (one per model and label set) for ``--json``."""
    rows = []
    for s in result.scores:
        for role, aucs in (("current", s.current), ("candidate", s.candidate)):
            rows.append(
                {
                    "model": result.current if role == "current" else result.candidate,
                    "role": role,
                    "label_set": s.task,
                    "tiles": s.tiles,
                    "repeats": len(aucs),
                    "auc_mean": float(np.mean(aucs)),
                    "auc_std": float(np.std(aucs)),
                }
            )
    return rows


def format_result(result: ContinualResult) -> str:
    """Table of the comparison (when there was one) and the outcome."""
    lines = []
    if result.scores:
        header = f"{'label set':<36} {'tiles':>6} {'current':>9} {'candidate':>10} {'delta':>8}"
        lines += [header, "-" * len(header)]
        for s in result.scores:
            lines.append(
                f"{s.task[:36]:<36} {s.tiles:>6} {np.mean(s.current):>9.4f} "
                f"{np.mean(s.candidate):>10.4f} {s.delta:>+8.4f}"
            )
    lines.append(f"{result.outcome}: {result.detail}")
    return "\n".join(lines)


def register(train: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``galsift train continual``."""
    d = ContinualConfig()
    p = train.add_parser(
        "continual",
        help="continue the serving LVM's self-supervised pretraining on new tiles; promote if better",
        description="One run of the continual-pretraining job: train a candidate from the serving LVM "
        "on the tiles ingested since it was made, compare both on the labelled data in the database "
        "(cross-validated linear-probe AUC per label set, averaged), promote and backfill only if "
        "the candidate is better by --margin. Recorded in job_runs (job 'pretrain').",
    )
    p.add_argument("--epochs", type=float, default=d.epochs, help="passes over the new tiles")
    p.add_argument("--max-steps", type=int, default=None, help="cap on optimisation steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--sim-fraction", type=float, default=d.sim_fraction, help="share of batches simulated")
    p.add_argument("--sim-pool", type=int, default=d.sim_pool, help="simulations generated at start")
    p.add_argument("--max-tiles", type=int, default=d.max_tiles, help="most new tiles trained on")
    p.add_argument(
        "--min-tiles", type=int, default=None, help="fewest new tiles (default: settings.pretrain_min_tiles)"
    )
    p.add_argument("--margin", type=float, default=d.margin, help="AUC gain needed to promote")
    p.add_argument("--min-labelled", type=int, default=d.min_labelled, help="fewest tiles of a label set")
    p.add_argument("--min-per-class", type=int, default=d.min_per_class, help="fewest tiles of a class")
    p.add_argument("--folds", type=int, default=d.folds)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=None, help="torch device or 'auto' (default: settings.device)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", type=Path, default=None, help="write the comparison and outcome as JSON")
    p.set_defaults(func=_cmd_continual)


def _cmd_continual(args: argparse.Namespace, settings: Settings) -> int:
    import torch

    before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _continual(args, settings)
    finally:
        # the setting is process-wide: a caller (the scheduler, a test) keeps its own
        torch.set_num_threads(before)


def _continual(args: argparse.Namespace, settings: Settings) -> int:
    from encoder.checkpoint import CheckpointError
    from encoder.data import DataError
    from encoder.train import TrainingError

    cfg = ContinualConfig(
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        sim_fraction=args.sim_fraction,
        sim_pool=args.sim_pool,
        max_tiles=args.max_tiles,
        min_tiles=args.min_tiles,
        margin=args.margin,
        min_labelled=args.min_labelled,
        min_per_class=args.min_per_class,
        folds=args.folds,
        repeats=args.repeats,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    try:
        result = run_continual(settings, cfg)
    except (ContinualError, TrainingError, DataError, CheckpointError, FileNotFoundError) as exc:
        # recorded as a failed run by job_run (except option errors, raised before it starts)
        print(f"galsift train continual: {exc}", file=sys.stderr)
        return 2
    print(format_result(result))
    if args.json:
        doc = {
            "command": "train continual",
            "data": "tiles",
            "model_version": result.candidate if result.promoted else result.current,
            "outcome": result.outcome,
            "detail": result.detail,
            "job_run": result.run_id,
            "config": asdict(cfg),
            "metrics": _finite(result.metrics),
            "results": result_rows(result),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    return 0
