"""``galsift eval hitl``: a simulated scientist runs the real HITL engine on a labelled pool.

The pool is a ``labels.csv`` folder whose label column says which images are what is searched
for (e.g. rings) among real distractors. The evaluation

1. embeds the pool with the checkpoint (:func:`hitl.embed.embed_folder`) and registers it in the
   configured PostgreSQL as the tiles of a dedicated survey ``eval-hitl-<folder>-<run>``
   (``pixels_uri`` the file's URI, ``checksum`` its sha256) with their embeddings under a
   dedicated copy of the model version (``<version>~<survey>``: same checkpoint and checksum), so
   that the engine's ANN queries see exactly the pool and no other tile of the live table;
2. for each of ``--draws`` seed draws, picks ``--seeds`` random positives and runs three searches
   from them, each shown ``--per-round`` tiles per round for ``--rounds`` rounds:

   ``galsift_hitl``
       the engine (:class:`hitl.engine.SearchEngine`): a new session per draw (with its own
       owner, so no label leaks between draws), :meth:`~hitl.engine.SearchEngine.next_round`, and
       the scientist's good/bad labels from the label column through
       :meth:`~hitl.engine.SearchEngine.label`;
   ``knn``
       pure nearest-neighbour similarity to the seeds (highest cosine similarity to the nearest
       seed first, exact, no learning from the labels);
   ``random``
       the unseen tiles in random order;
3. reports per round the precision of the page (positives shown / shown) and the cumulative
   positives found (seeds not counted), averaged over the draws, and checks the Must (the engine
   finds more than both baselines from round 3 on) and the Goals (mean precision over rounds
   2-10, share of the pool's positives found).

Everything it wrote (sessions, labels, tiles, embeddings, the version copy) is deleted at the end.
``--half a|b`` keeps one half of a stratified random split of the pool (fixed split seed), the
held-out check of anything tuned on the other half.

This module is imported by ``galsift --help``: heavy imports happen inside functions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from galsift.cli import CommandGroups
    from galsift.settings import Settings
    from hitl.embed import FolderEmbeddings
    from hitl.engine import SearchEngine

#: the engine's row name in the results
ENGINE_NAME = "galsift_hitl"
#: baselines measured in the same run, on the same seeds
BASELINES = ("knn", "random")
#: from this round on the engine must have found more than every baseline (the Must)
MUST_FROM_ROUND = 3
#: rounds averaged for the precision goal (first, last; clipped to --rounds)
GOAL_ROUNDS = (2, 10)
#: precision goals of the issue, by label column (others: none unless --goal-precision)
GOAL_PRECISION = {"ring": 0.6, "lens": 0.3}
#: share of the pool's positives to find within --rounds rounds (the ring goal)
GOAL_FOUND_SHARE = 0.5
#: arcsec per pixel recorded for pool images whose labels.csv has no ``pixel_scale`` (DECaLS)
DEFAULT_PIXEL_SCALE = 0.262
#: seed of the stratified split behind --half (fixed, independent of --seed)
SPLIT_SEED = 20240517


class HitlEvalError(ValueError):
    """A pool or options the evaluation cannot run with."""


@dataclass(frozen=True)
class Pool:
    """The labelled pool as registered in the database.

    Attributes
    ----------
    tile_ids
        Tile id of each image.
    embeddings
        ``float32`` (N, D) unit vectors.
    good
        Whether each image is a positive.
    files
        File names relative to the folder.
    """

    tile_ids: list[uuid.UUID]
    embeddings: np.ndarray
    good: np.ndarray
    files: list[str]

    def __len__(self) -> int:
        return len(self.tile_ids)


@dataclass(frozen=True)
class Trace:
    """One search of one draw: positives and tiles shown per round, and the strategies used."""

    hits: list[int]
    shown: list[int]
    strategies: dict[str, list[int]]
    round_ms: list[float]


# -- the database -----------------------------------------------------------------------------------
@contextmanager
def database(settings: Settings) -> Iterator[Engine]:
    """An engine on the configured database, migrated.

    The embedded server is started when no database URL is set and it is not running, and then
    stopped afterwards; a server that was already running is left running.
    """
    from db.engine import embedded_running, get_engine, start_embedded, stop_embedded, upgrade

    started = False
    if settings.database_url is None and not embedded_running(settings):
        start_embedded(settings)
        started = True
    try:
        upgrade(settings)
        engine = get_engine(settings)
        try:
            yield engine
        finally:
            engine.dispose()
    finally:
        if started:
            stop_embedded(settings)


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def register_pool(
    engine: Engine,
    emb: FolderEmbeddings,
    good: np.ndarray,
    *,
    survey: str,
    model_version: str,
    pixel_scales: Sequence[float] | None = None,
) -> Pool:
    """Store a pool's images as tiles of ``survey`` with their embeddings by ``model_version``.

    The tile id is :func:`galsift.messages.tile_id` of (survey, file), the pixels URI the file's
    ``file://`` URI and the checksum the file's sha256; the model version must be registered.
    """
    from db import repo
    from db.models import EmbeddingCreate, TileCreate
    from encoder.data import load_pixels
    from galsift.messages import tile_id

    tiles, ids = [], []
    for i, (f, path) in enumerate(zip(emb.files, emb.paths, strict=True)):
        pixels, bands = load_pixels(path)
        tid = uuid.UUID(tile_id(survey, f))
        ids.append(tid)
        default_bands = ("R", "G", "B") if pixels.dtype == np.uint8 else ("g", "r", "z")
        tiles.append(
            TileCreate(
                id=tid,
                survey=survey,
                external_id=f,
                bands=list(bands or default_bands),
                pixel_scale=float(pixel_scales[i]) if pixel_scales is not None else DEFAULT_PIXEL_SCALE,
                shape=[int(s) for s in pixels.shape],
                dtype=str(pixels.dtype),
                pixels_uri=path.resolve().as_uri(),
                checksum=_sha256(path),
                meta={"eval": "hitl", "good": bool(good[i])},
            )
        )
    for start in range(0, len(tiles), 500):
        repo.upsert_tiles(engine, tiles[start : start + 500])
        repo.upsert_embeddings(
            engine,
            [
                EmbeddingCreate(tile_id=t, model_version=model_version, embedding=v.tolist())
                for t, v in zip(ids[start : start + 500], emb.embeddings[start : start + 500], strict=True)
            ],
        )
    return Pool(ids, emb.embeddings.astype(np.float32), np.asarray(good, bool), list(emb.files))


def cleanup(engine: Engine, *, survey: str, model_version: str | None) -> None:
    """Delete what an evaluation wrote.

    That is its sessions (owners ``survey``-…), its tiles (cascading to embeddings, shown tiles and
    labels) and the model version copy.
    """
    from sqlalchemy import text

    from db import repo

    pattern = survey.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%") + "%"
    with engine.begin() as c:
        c.execute(text("DELETE FROM hitl_sessions WHERE owner LIKE :p"), {"p": pattern})
    repo.delete_surveys(engine, prefix=survey)
    if model_version is not None:
        with engine.begin() as c:
            c.execute(text("DELETE FROM embeddings WHERE model_version = :m"), {"m": model_version})
            c.execute(text("DELETE FROM model_versions WHERE name = :m"), {"m": model_version})


# -- the searches ---------------------------------------------------------------------------------
def seed_draws(good: np.ndarray, *, n_seeds: int, draws: int, seed: int) -> list[np.ndarray]:
    """Per draw ``d``, ``n_seeds`` positives picked at random (generator seeded by ``(seed, d)``).

    Raises
    ------
    HitlEvalError
        If the pool has fewer than ``n_seeds`` positives.
    """
    pos = np.flatnonzero(good)
    if len(pos) < n_seeds:
        raise HitlEvalError(f"{len(pos)} positives in the pool, fewer than --seeds {n_seeds}")
    return [
        np.sort(np.random.default_rng([seed, d]).choice(pos, n_seeds, replace=False)) for d in range(draws)
    ]


def _pages(order: np.ndarray, good: np.ndarray, *, rounds: int, k: int) -> Trace:
    hits, shown = [], []
    for r in range(rounds):
        page = order[r * k : (r + 1) * k]
        hits.append(int(good[page].sum()))
        shown.append(len(page))
    return Trace(hits, shown, {}, [])


def run_random(pool: Pool, seeds: np.ndarray, *, rounds: int, k: int, rng: np.random.Generator) -> Trace:
    """The ``random`` baseline: the tiles other than the seeds, in random order."""
    rest = np.setdiff1d(np.arange(len(pool)), seeds)
    return _pages(rng.permutation(rest), pool.good, rounds=rounds, k=k)


def run_knn(pool: Pool, seeds: np.ndarray, *, rounds: int, k: int) -> Trace:
    """The ``knn`` baseline: tiles by cosine similarity to their nearest seed, highest first (exact)."""
    sims = (pool.embeddings @ pool.embeddings[seeds].T).max(axis=1)
    sims[seeds] = -np.inf
    order = np.argsort(-sims, kind="stable")[: len(pool) - len(seeds)]
    return _pages(order, pool.good, rounds=rounds, k=k)


def run_engine(
    se: SearchEngine,
    pool: Pool,
    seeds: np.ndarray,
    *,
    owner: str,
    concept: str,
    model_version: str,
    rounds: int,
    k: int,
) -> Trace:
    """The engine: a new session from the seed tiles; each round's page labelled from the pool.

    Raises
    ------
    HitlEvalError
        If the engine shows a tile outside the pool (the model version copy leaked).
    """
    index = {t: i for i, t in enumerate(pool.tile_ids)}
    session = se.new_session(
        owner=owner,
        concept=concept,
        model_version=model_version,
        name=f"eval hitl {concept}",
        tile_ids=[pool.tile_ids[i] for i in seeds],
    )
    hits, shown, ms = [], [], []
    strategies: dict[str, list[int]] = {}
    for r in range(rounds):
        rnd = se.next_round(session.id, k=k)
        try:
            idx = [index[s.tile_id] for s in rnd.shown]
        except KeyError as exc:
            raise HitlEvalError(f"the engine showed tile {exc} from outside the pool") from None
        se.label(session.id, [(pool.tile_ids[i], bool(pool.good[i])) for i in idx], round_no=rnd.round_no)
        hits.append(int(pool.good[idx].sum()) if idx else 0)
        shown.append(len(idx))
        ms.append(sum(v for key, v in rnd.timings_ms.items() if key != "store"))
        for s, i in zip(rnd.shown, idx, strict=True):
            good, total = strategies.setdefault(s.strategy, [0, 0])
            strategies[s.strategy] = [good + int(pool.good[i]), total + 1]
        del r
    return Trace(hits, shown, strategies, ms)


# -- results --------------------------------------------------------------------------------------
def result_rows(traces: dict[str, list[Trace]]) -> list[dict[str, Any]]:
    """One row per method and round: page precision and cumulative positives found.

    Both are the mean (and std) over the draws.
    """
    rows = []
    for model, runs in traces.items():
        hits = np.asarray([t.hits for t in runs], dtype=np.float64)
        shown = np.asarray([t.shown for t in runs], dtype=np.float64)
        prec = np.divide(hits, shown, out=np.zeros_like(hits), where=shown > 0)
        found = np.cumsum(hits, axis=1)
        for r in range(hits.shape[1]):
            rows.append(
                {
                    "model": model,
                    "round": r + 1,
                    "precision": round(float(prec[:, r].mean()), 4),
                    "precision_std": round(float(prec[:, r].std()), 4),
                    "found": round(float(found[:, r].mean()), 3),
                    "found_std": round(float(found[:, r].std()), 3),
                    "shown": round(float(shown[:, r].mean()), 2),
                    "draws": len(runs),
                }
            )
    return rows


def _series(rows: Sequence[dict[str, Any]], model: str, key: str) -> dict[int, float]:
    return {int(r["round"]): float(r[key]) for r in rows if r["model"] == model}


def checks(
    rows: Sequence[dict[str, Any]],
    *,
    positives: int,
    rounds: int,
    goal_precision: float | None,
    engine_name: str = ENGINE_NAME,
) -> dict[str, Any]:
    """The Must and the Goals, from the result rows.

    Returns
    -------
    dict
        ``must`` (engine found > every baseline at every round >= :data:`MUST_FROM_ROUND`, with the
        failing rounds), ``precision_goal`` (mean precision over :data:`GOAL_ROUNDS`) and
        ``found_goal`` (share of the pool's positives found by the last round), each with ``holds``.
    """
    found = _series(rows, engine_name, "found")
    prec = _series(rows, engine_name, "precision")
    fails = []
    for r in range(MUST_FROM_ROUND, rounds + 1):
        for b in BASELINES:
            other = _series(rows, b, "found").get(r)
            if other is not None and not found[r] > other:
                fails.append({"round": r, "baseline": b, "engine": found[r], "baseline_found": other})
    lo, hi = GOAL_ROUNDS[0], min(GOAL_ROUNDS[1], rounds)
    mean_prec = float(np.mean([prec[r] for r in range(lo, hi + 1)])) if hi >= lo else float("nan")
    last = found.get(rounds, 0.0)
    return {
        "must": {
            "rule": f"{engine_name} found > {' and '.join(BASELINES)} at every round >= {MUST_FROM_ROUND}",
            "holds": not fails and rounds >= MUST_FROM_ROUND,
            "failures": fails,
        },
        "precision_goal": {
            "rounds": [lo, hi],
            "mean_precision": round(mean_prec, 4),
            "target": goal_precision,
            "holds": None if goal_precision is None else bool(mean_prec >= goal_precision),
        },
        "found_goal": {
            "found": last,
            "positives": positives,
            "share": round(last / positives, 4) if positives else 0.0,
            "target_share": GOAL_FOUND_SHARE,
            "holds": bool(positives and last >= GOAL_FOUND_SHARE * positives),
        },
    }


def format_table(rows: Sequence[dict[str, Any]], models: Sequence[str]) -> str:
    """Per round: each method's mean precision of the page and mean cumulative positives found."""
    head = f"{'round':>5} | " + " | ".join(f"{m + ' prec':>18} {'found':>6}" for m in models)
    lines = [head, "-" * len(head)]
    rounds = sorted({int(r["round"]) for r in rows})
    for rnd in rounds:
        cells = []
        for m in models:
            row = next(r for r in rows if r["model"] == m and r["round"] == rnd)
            cells.append(f"{row['precision']:>12.3f} ±{row['precision_std']:.2f} {row['found']:>6.1f}")
        lines.append(f"{rnd:>5} | " + " | ".join(cells))
    return "\n".join(lines)


def summarise(check: dict[str, Any], *, label: str) -> str:
    """The Must and Goal lines printed under the table."""
    must = check["must"]
    lines = [f"Must ({must['rule']}): {'HOLDS' if must['holds'] else 'FAILS'}"]
    for f in must["failures"][:6]:
        lines.append(f"  round {f['round']}: {f['engine']:.1f} vs {f['baseline']} {f['baseline_found']:.1f}")
    pg = check["precision_goal"]
    target = "no target" if pg["target"] is None else f"target >= {pg['target']}"
    verdict = "" if pg["holds"] is None else (" MET" if pg["holds"] else " NOT MET")
    lines.append(
        f"Goal: mean precision rounds {pg['rounds'][0]}-{pg['rounds'][1]} = {pg['mean_precision']:.3f} "
        f"({target}){verdict}"
    )
    fg = check["found_goal"]
    lines.append(
        f"Goal: {fg['found']:.1f} of the pool's {fg['positives']} {label} positives found "
        f"({fg['share']:.0%}; target >= {fg['target_share']:.0%}) {'MET' if fg['holds'] else 'NOT MET'}"
    )
    return "\n".join(lines)


def learner_info() -> dict[str, Any]:
    """The learner's settings, for the JSON document."""
    from hitl import learner

    return {k.lower(): getattr(learner, k) for k in dir(learner) if k.isupper() and not k.startswith("_")}


# -- the run --------------------------------------------------------------------------------------
def half_of(good: np.ndarray, half: str) -> np.ndarray:
    """Indices of half ``a`` or ``b`` of a stratified random split (seed :data:`SPLIT_SEED`)."""
    rng = np.random.default_rng(SPLIT_SEED)
    keep = []
    for cls in (False, True):
        idx = rng.permutation(np.flatnonzero(good == cls))
        cut = (len(idx) + 1) // 2
        keep.append(idx[:cut] if half == "a" else idx[cut:])
    return np.sort(np.concatenate(keep))


def _binary(labels: np.ndarray | None, label: str) -> np.ndarray:
    if labels is None or not np.issubdtype(labels.dtype, np.number):
        raise HitlEvalError(f"{label}: labels must be 0/1 (or numeric with --threshold)")
    values = set(np.unique(labels).tolist())
    if not values <= {0, 1}:
        raise HitlEvalError(f"{label}: labels are not binary ({sorted(values)[:6]}...); pass --threshold T")
    return np.asarray(labels == 1, bool)


def _pixel_scales(data: Path, files: Sequence[str]) -> list[float] | None:
    import csv

    with (data / "labels.csv").open(newline="", encoding="utf-8") as fh:
        rows = {r["file"]: r for r in csv.DictReader(fh)}
    out = []
    for f in files:
        try:
            out.append(float(rows[f].get("pixel_scale") or DEFAULT_PIXEL_SCALE))
        except (KeyError, ValueError):
            out.append(DEFAULT_PIXEL_SCALE)
    return out


def run(
    settings: Settings,
    *,
    data: Path,
    label: str,
    threshold: float | None = None,
    seeds: int = 3,
    rounds: int = 10,
    per_round: int = 12,
    draws: int = 10,
    seed: int = 0,
    model: str | None = None,
    half: str | None = None,
    goal_precision: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the evaluation and return the ``--json`` document.

    Parameters
    ----------
    settings
        Configuration (database, data directory for the preprocessing cache, checkpoint).
    data, label, threshold
        The pool folder, its label column and the threshold that binarises a fractional one.
    seeds, rounds, per_round, draws, seed
        Positives per seed draw, rounds per search, tiles per round, seed draws, base seed.
    model
        Checkpoint path or registered version name (default: configured, else the shipped one).
    half
        ``a`` or ``b``: only that half of a stratified split of the pool; None: all of it.
    goal_precision
        Target of the precision goal (default: :data:`GOAL_PRECISION` by label column).
    progress
        Print a line per draw on stderr.

    Raises
    ------
    HitlEvalError
        If the options or the pool do not allow the evaluation.
    """
    from db import repo
    from db.models import ModelVersionCreate
    from encoder.serving import model_version_for, resolve_checkpoint
    from hitl.embed import FolderEmbeddings, embed_folder
    from hitl.engine import SearchEngine

    if min(seeds, rounds, per_round, draws) < 1:
        raise HitlEvalError("--seeds, --rounds, --per-round and --draws must be >= 1")
    t_start = time.perf_counter()
    data = Path(data)
    checkpoint = resolve_checkpoint(None, model, settings)
    mv = model_version_for(checkpoint)
    emb = embed_folder(
        data,
        checkpoint=checkpoint,
        label=label,
        threshold=threshold,
        cache_dir=settings.data_dir / "cache" / "model_input",
    )
    good = _binary(emb.labels, label)
    if half is not None:
        keep = half_of(good, half)
        emb = FolderEmbeddings(
            files=[emb.files[i] for i in keep],
            paths=[emb.paths[i] for i in keep],
            labels=None if emb.labels is None else emb.labels[keep],
            embeddings=emb.embeddings[keep],
        )
        good = good[keep]
    positives = int(good.sum())
    draws_idx = seed_draws(good, n_seeds=seeds, draws=draws, seed=seed)
    embed_s = time.perf_counter() - t_start
    if goal_precision is None:
        goal_precision = GOAL_PRECISION.get(label)

    run_id = uuid.uuid4().hex[:8]
    survey = f"eval-hitl-{data.resolve().name}{'-' + half if half else ''}-{run_id}"[:64]
    eval_mv = f"{mv.name}~{survey}"[:128]
    traces: dict[str, list[Trace]] = {ENGINE_NAME: [], **{b: [] for b in BASELINES}}
    policy: dict[str, Any] = {}
    with database(settings) as engine:
        try:
            repo.register_model_version(
                engine,
                ModelVersionCreate(
                    name=eval_mv,
                    variant=mv.variant,
                    checkpoint_uri=mv.checkpoint_uri,
                    checksum=mv.checksum,
                    card={**mv.card, "eval_copy_of": mv.name},
                ),
            )
            pool = register_pool(
                engine,
                emb,
                good,
                survey=survey,
                model_version=eval_mv,
                pixel_scales=_pixel_scales(data, emb.files),
            )
            se = SearchEngine(engine)
            policy = asdict(se.policy)
            for d, sd in enumerate(draws_idx):
                t0 = time.perf_counter()
                traces[ENGINE_NAME].append(
                    run_engine(
                        se,
                        pool,
                        sd,
                        owner=f"{survey}-draw{d}",
                        concept=label,
                        model_version=eval_mv,
                        rounds=rounds,
                        k=per_round,
                    )
                )
                traces["knn"].append(run_knn(pool, sd, rounds=rounds, k=per_round))
                traces["random"].append(
                    run_random(pool, sd, rounds=rounds, k=per_round, rng=np.random.default_rng([seed, d, 1]))
                )
                if progress:
                    found = {m: sum(t[-1].hits) for m, t in traces.items()}
                    print(
                        f"draw {d + 1}/{draws}: found "
                        + ", ".join(f"{m} {n}" for m, n in found.items())
                        + f" ({time.perf_counter() - t0:.1f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            cleanup(engine, survey=survey, model_version=eval_mv)

    rows = result_rows(traces)
    strategies: dict[str, list[int]] = {}
    for t in traces[ENGINE_NAME]:
        for s, (g, n) in t.strategies.items():
            acc = strategies.setdefault(s, [0, 0])
            acc[0] += g
            acc[1] += n
    round_ms = np.asarray([ms for t in traces[ENGINE_NAME] for ms in t.round_ms])
    return {
        "command": "eval hitl",
        "data": str(data),
        "model_version": mv.name,
        "label": label,
        "threshold": threshold,
        "pool": {
            "images": len(good),
            "positives": positives,
            "half": half,
            "survey": survey,
            "model_version_copy": eval_mv,
        },
        "protocol": {
            "seeds": seeds,
            "rounds": rounds,
            "per_round": per_round,
            "draws": draws,
            "seed": seed,
            "found": "cumulative positives shown (seeds not counted), mean over draws",
            "precision": "positives shown / tiles shown in the round, mean over draws",
        },
        "engine": {
            "learner": learner_info(),
            "acquisition": policy,
            "strategies": {s: {"shown": n, "positives": g} for s, (g, n) in sorted(strategies.items())},
            "round_ms_p50": round(float(np.percentile(round_ms, 50)), 1) if len(round_ms) else None,
            "round_ms_p95": round(float(np.percentile(round_ms, 95)), 1) if len(round_ms) else None,
        },
        "checks": checks(rows, positives=positives, rounds=rounds, goal_precision=goal_precision),
        "seconds": {"embed": round(embed_s, 1), "total": round(time.perf_counter() - t_start, 1)},
        "results": rows,
    }


# -- the command ----------------------------------------------------------------------------------
def register(groups: CommandGroups) -> None:
    """Add ``galsift eval hitl``."""
    p = groups.eval.add_parser(
        "hitl",
        help="a simulated scientist runs the real HITL engine: precision per round, positives found",
        description="Register a labelled pool in the database, then, for several random draws of "
        "seed positives, let a simulated scientist run the real HITL engine (label what each round "
        "shows from the label column) and compare it with pure nearest-neighbour similarity to the "
        "seeds (knn) and random order (random) on the same seeds.",
    )
    p.add_argument("--data", type=Path, required=True, help="folder with labels.csv")
    p.add_argument("--label", required=True, help="0/1 label column (or fractions with --threshold)")
    p.add_argument("--threshold", type=float, default=None, help="binarise the label: >= T -> 1")
    p.add_argument("--seeds", type=int, default=3, help="positive seeds per draw")
    p.add_argument("--rounds", type=int, default=10, help="rounds per search")
    p.add_argument("--per-round", type=int, default=12, help="tiles shown per round (K)")
    p.add_argument("--draws", type=int, default=10, help="random seed draws averaged over")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws")
    p.add_argument("--model", default=None, help="checkpoint or registered version (default: shipped)")
    p.add_argument(
        "--half",
        choices=("a", "b"),
        default=None,
        help="use only this half of a stratified random split of the pool (held-out checks)",
    )
    p.add_argument(
        "--goal-precision",
        type=float,
        default=None,
        help="target mean precision over rounds 2-10 (default: 0.6 for ring, 0.3 for lens)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--no-progress", action="store_true", help="no per-draw lines")
    p.set_defaults(func=_cmd_hitl)


def _cmd_hitl(args: argparse.Namespace, settings: Settings) -> int:
    from encoder.data import DataError

    try:
        doc = run(
            settings,
            data=args.data,
            label=args.label,
            threshold=args.threshold,
            seeds=args.seeds,
            rounds=args.rounds,
            per_round=args.per_round,
            draws=args.draws,
            seed=args.seed,
            model=args.model,
            half=args.half,
            goal_precision=args.goal_precision,
            progress=not args.no_progress,
        )
    except (HitlEvalError, DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pool = doc["pool"]
    print(
        f"{doc['data']}{' (half ' + pool['half'] + ')' if pool['half'] else ''}: {pool['images']} images, "
        f"{pool['positives']} with {doc['label']}=1; model {doc['model_version']}; "
        f"{args.draws} draws of {args.seeds} seeds, {args.rounds} rounds of {args.per_round}"
    )
    print(format_table(doc["results"], (ENGINE_NAME, *BASELINES)))
    eng = doc["engine"]
    strat = ", ".join(f"{s} {v['positives']}/{v['shown']}" for s, v in eng["strategies"].items())
    print(
        f"{ENGINE_NAME}: positives/shown by strategy: {strat}; round latency p50 "
        f"{eng['round_ms_p50']} ms, p95 {eng['round_ms_p95']} ms"
    )
    print(summarise(doc["checks"], label=doc["label"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0
