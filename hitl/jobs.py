"""The retraining job (``galsift retrain``): saved searches and morphology heads from new labels.

One run, recorded in ``job_runs`` as ``retrain`` under the job's lock (:func:`db.jobs.job_run`):

1. every active saved search whose concept got labels since its learner was fitted is refitted
   (:meth:`hitl.engine.SearchEngine.refit_saved`); the tiles embedded within
   ``settings.rescore_recent_hours`` are scored with the new learner and those at or above the
   search's threshold become notifications (idempotent: a tile notified before is not again);
2. the morphology heads are retrained by their own command, ``galsift train heads --from-db``
   (detector code, run as a child process and recorded as ``heads``), which trains only when
   labels changed, promotes the new version and re-scores recent tiles.

A search that fails to refit does not stop the others (its error is in the run's metrics and
the run ends ``failed`` after the rest is done). SIGTERM (the scheduler stopping or dying)
records ``interrupted``; the scheduler then runs the job again.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from db.jobs import RunHandle
    from db.models import SavedSearch
    from galsift.settings import Settings
    from hitl.learner import Learner

log = logging.getLogger(__name__)

#: the ``job_runs.job`` of this job
JOB = "retrain"
#: the morphology heads' retraining command (detectors/retrain.py) and its ``job_runs.job``
HEADS_ARGV = ("train", "heads", "--from-db")
HEADS_JOB = "heads"


class RetrainError(RuntimeError):
    """Part of the run failed (after the rest was done); the run is recorded ``failed``."""


@dataclass
class SearchesReport:
    """What the saved-search part of a run did."""

    active: int = 0
    refitted: list[dict[str, Any]] = field(default_factory=list)
    unchanged: int = 0
    errors: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        """JSON for ``job_runs.metrics``."""
        return {
            "active": self.active,
            "refitted": len(self.refitted),
            "unchanged": self.unchanged,
            "tiles_rescored": sum(r["tiles_rescored"] for r in self.refitted),
            "notifications": sum(r["notifications"] for r in self.refitted),
            "per_search": self.refitted,
            "errors": self.errors,
        }


def rescore_search(
    engine: Engine, search: SavedSearch, learner: Learner, learner_version: int, *, hours: float
) -> tuple[int, int]:
    """Score the recently embedded tiles with a saved search's new learner; notify above threshold.

    Tiles its owner has already seen in the session or labelled for the concept are not notified
    (they know them). Returns ``(tiles scored, notifications added)``.
    """
    import uuid

    from db import hitl as store
    from db.jobs import recent_embeddings

    seen = {
        str(t)
        for t in store.excluded_tiles(engine, search.session_id, author=search.owner, concept=search.concept)
    }
    scored = added = 0
    for ids, vectors in recent_embeddings(engine, search.model_version, hours=hours):
        scores = learner.score(vectors)
        scored += len(ids)
        rows = [
            {
                "saved_search_id": search.id,
                "tile_id": uuid.UUID(tid),
                "score": float(s),
                "learner_version": learner_version,
                "webhook_state": "pending" if search.webhook_url else None,
            }
            for tid, s in zip(ids, scores, strict=True)
            if s >= search.threshold and tid not in seen
        ]
        added += store.insert_notifications(engine, rows)
    return scored, added


def refit_searches(engine: Engine, settings: Settings) -> SearchesReport:
    """Refit every active saved search with new labels and re-score recent tiles with it."""
    from db import hitl as store
    from hitl.engine import SearchEngine

    report = SearchesReport()
    searcher = SearchEngine(engine)
    for search in store.saved_searches(engine, active_only=True):
        report.active += 1
        try:
            refit = searcher.refit_saved(search)
            if refit is None:
                report.unchanged += 1
                continue
            version, learner = refit
            scored, added = rescore_search(
                engine, search, learner, version, hours=settings.rescore_recent_hours
            )
        except Exception as exc:  # one broken search must not stop the others
            log.exception("retrain: saved search %s failed", search.id)
            report.errors.append(f"search {search.id}: {type(exc).__name__}: {exc}")
            continue
        report.refitted.append(
            {
                "search": search.id,
                "concept": search.concept,
                "learner_version": version,
                "learner": learner.kind,
                "n_pos": learner.n_pos,
                "n_neg": learner.n_neg,
                "tiles_rescored": scored,
                "notifications": added,
            }
        )
        log.info(
            "retrain: search %s (%s) refitted to learner v%d on %d+/%d-, %d recent tiles scored, %d notified",
            search.id,
            search.concept,
            version,
            learner.n_pos,
            learner.n_neg,
            scored,
            added,
        )
    return report


def retrain_heads(settings: Settings, engine: Engine) -> dict[str, Any]:
    """Run ``galsift train heads --from-db`` as a child process and summarise its recorded run.

    Raises
    ------
    RetrainError
        If it failed (its ``heads`` run says why).
    """
    from hitl.scheduler import run_recorded

    status, runs = run_recorded(HEADS_JOB, HEADS_ARGV, settings, engine)
    run = runs[-1] if runs else {}
    summary = {
        "status": status,
        "run": run.get("id"),
        "outcome": run.get("outcome"),
        "detail": run.get("detail"),
        **{
            k: v
            for k, v in (run.get("metrics") or {}).items()
            if k in ("version", "previous", "labels", "new_labels", "tiles_rescored", "auc")
        },
    }
    if status != 0 or summary["outcome"] not in ("ok", "refused", "skipped"):
        raise RetrainError(f"morphology heads: {summary['outcome']} (exit {status}): {summary['detail']}")
    return summary


def run_retrain(settings: Settings, engine: Engine, run: RunHandle, *, heads: bool = True) -> None:
    """The body of one ``retrain`` run: fills ``run``'s metrics and detail.

    Raises
    ------
    RetrainError
        If a saved search or the heads failed (the run is then recorded ``failed``, with
        everything else done and in its metrics).
    """
    report = refit_searches(engine, settings)
    run.metrics["searches"] = report.metrics()
    failures = list(report.errors)
    heads_line = "heads not run"
    if heads:
        try:
            summary = retrain_heads(settings, engine)
            run.metrics["heads"] = summary
            heads_line = f"heads {summary['outcome']}: {summary['detail']}"
        except RetrainError as exc:
            run.metrics["heads"] = {"error": str(exc)}
            failures.append(str(exc))
    run.detail = (
        f"{len(report.refitted)}/{report.active} saved searches refitted "
        f"({run.metrics['searches']['notifications']} notifications); {heads_line}"
    )
    if failures:
        raise RetrainError("; ".join(failures))


def retrain_command(settings: Settings, *, heads: bool = True) -> int:
    """Entry point of ``galsift retrain``: one recorded run; exit 0 also when skipped.

    Returns
    -------
    int
        0 (ok or skipped), 1 (failed), 143 (interrupted by a signal).
    """
    from db.engine import get_engine
    from db.jobs import JobInterrupted, job_run, stop_on_signals

    engine = get_engine(settings)
    try:
        with stop_on_signals(), job_run(engine, JOB) as run:
            if run is None:
                print("retrain: already running in another process; skipped")
                return 0
            run_retrain(settings, engine, run, heads=heads)
            print(f"retrain: {run.detail}")
        return 0
    except JobInterrupted as exc:
        print(f"retrain: interrupted ({exc})", file=sys.stderr)
        return 143
    except RetrainError as exc:
        print(f"retrain: failed: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
