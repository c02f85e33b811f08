"""Runs of scheduled jobs: one at a time per job, every run recorded.

:func:`job_run` wraps one run of a job. It takes a PostgreSQL session-level advisory lock keyed
by the job's name on a connection it holds for the whole run, so a second scheduler process, a
restarted scheduler or a manual ``galsift`` run of the same job cannot run it concurrently: they
record a ``skipped`` run instead. The lock dies with the connection, so a run whose process was
killed frees it at once; the next run then finds that run's row still ``running``, marks it
``interrupted``, and goes ahead. A partial unique index (one ``running`` row per job, migration
0007) backs the lock up.

A run stopped by SIGTERM or SIGINT (the scheduler stopping, or dying: its children get SIGTERM
then) records ``interrupted`` itself when the job body runs under :func:`stop_on_signals`.
:func:`unfinished_jobs` lists the jobs whose newest run did not finish, which a scheduler runs
again at once.

The module also holds the few reads the scheduled jobs share: which labels changed since a
run, and the embeddings of recently embedded tiles (what a retrained model re-scores).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from types import FrameType
from typing import Any

import numpy as np
from sqlalchemy import Engine, text

#: first key of the jobs' advisory locks (the second is hashtext(job name))
_JOB_LOCK_NS = 0x10B5  # "jobs"
#: outcomes a finished run can have (``running`` while it runs)
OUTCOMES = ("ok", "refused", "skipped", "failed", "interrupted")
#: after this many unfinished runs in a row a job is no longer reported by :func:`unfinished_jobs`
#: (a job that is killed every time, e.g. by the OOM killer, waits for its next scheduled run
#: instead of being restarted in a loop)
MAX_UNFINISHED_STREAK = 3


class JobInterrupted(BaseException):
    """Raised in a job's body by SIGTERM/SIGINT (see :func:`stop_on_signals`); recorded ``interrupted``.

    A ``BaseException``, like ``KeyboardInterrupt``, so that ``except Exception`` in the job's
    code does not swallow it.
    """


@dataclass
class RunHandle:
    """What a running job reports: set ``metrics``, ``detail`` and (``ok`` or ``refused``) ``outcome``."""

    id: int
    job: str
    #: start of the previous ``ok`` or ``refused`` run: the "since the last run" window starts here
    #: (its start, not its end, so that labels saved while it ran are seen again rather than missed)
    since: datetime | None
    metrics: dict[str, Any] = field(default_factory=dict)
    detail: str = ""
    outcome: str = "ok"


def host_id(pid: int | None = None) -> str:
    """``hostname:pid`` of this process (or of ``pid`` on this host): the ``job_runs.host`` of its runs."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`JobInterrupted` while the block runs (main thread only).

    A scheduler stopping (or dying: its children get SIGTERM through ``PR_SET_PDEATHSIG``) thus
    leaves an ``interrupted`` row, not a ``running`` one, and the job's ``finally`` blocks run.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        raise JobInterrupted(f"signal {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _jsonable(value: Any) -> Any:
    """Metrics as JSON that PostgreSQL accepts: NaN and infinities (not JSON) become null."""
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v) for v in value]
    return value


def _dumps(metrics: dict[str, Any]) -> str:
    return json.dumps(_jsonable(metrics), default=str, allow_nan=False)


@contextmanager
def job_run(engine: Engine, job: str) -> Iterator[RunHandle | None]:
    """Run ``job`` under its lock, recording start, end, outcome and metrics in ``job_runs``.

    Yields
    ------
    RunHandle or None
        None when another process holds the job (a ``skipped`` row is recorded); the body
        must then do nothing.

    Notes
    -----
    :class:`JobInterrupted` or ``KeyboardInterrupt`` in the body records ``interrupted``; any
    other exception records ``failed`` with its message. Both are re-raised.
    """
    with engine.connect() as lock_conn:
        got = lock_conn.execute(
            text("SELECT pg_try_advisory_lock(:ns, hashtext(:job))"), {"ns": _JOB_LOCK_NS, "job": job}
        ).scalar_one()
        lock_conn.commit()
        if not got:
            with engine.begin() as c:
                c.execute(
                    text(
                        "INSERT INTO job_runs (job, outcome, detail, metrics, host, ended_at) "
                        "VALUES (:job, 'skipped', 'already running in another process', '{}', :host, now())"
                    ),
                    {"job": job, "host": host_id()},
                )
            yield None
            return
        try:
            with engine.begin() as c:
                # the lock was free, so a row still 'running' belongs to a process that died
                c.execute(
                    text(
                        "UPDATE job_runs SET outcome = 'interrupted', ended_at = now(), "
                        "detail = 'the process running it stopped before it finished' "
                        "WHERE job = :job AND outcome = 'running'"
                    ),
                    {"job": job},
                )
                since = c.execute(
                    text(
                        "SELECT max(started_at) FROM job_runs WHERE job = :job AND outcome IN ('ok', 'refused')"
                    ),
                    {"job": job},
                ).scalar()
                run_id = c.execute(
                    text(
                        "INSERT INTO job_runs (job, outcome, detail, metrics, host) "
                        "VALUES (:job, 'running', '', '{}', :host) RETURNING id"
                    ),
                    {"job": job, "host": host_id()},
                ).scalar_one()
            handle = RunHandle(id=int(run_id), job=job, since=since)
            try:
                yield handle
            except (JobInterrupted, KeyboardInterrupt) as exc:
                _finish(
                    engine, handle.id, "interrupted", f"stopped by {exc or 'an interrupt'}", handle.metrics
                )
                raise
            except BaseException as exc:
                _finish(engine, handle.id, "failed", f"{type(exc).__name__}: {exc}"[:2000], handle.metrics)
                raise
            if handle.outcome not in ("ok", "refused"):
                raise ValueError(f"a job ends 'ok' or 'refused', not {handle.outcome!r}")
            _finish(engine, handle.id, handle.outcome, handle.detail, handle.metrics)
        finally:
            lock_conn.execute(
                text("SELECT pg_advisory_unlock(:ns, hashtext(:job))"), {"ns": _JOB_LOCK_NS, "job": job}
            )
            lock_conn.commit()


def _finish(engine: Engine, run_id: int, outcome: str, detail: str, metrics: dict[str, Any]) -> None:
    with engine.begin() as c:
        c.execute(
            text(
                "UPDATE job_runs SET outcome = :o, detail = :d, metrics = CAST(:m AS jsonb), ended_at = now() "
                "WHERE id = :i"
            ),
            {"o": outcome, "d": detail, "m": _dumps(metrics), "i": run_id},
        )


def record_failure(engine: Engine, job: str, *, detail: str, host: str) -> int:
    """Record a ``failed`` run for a process that died before :func:`job_run` recorded one.

    The scheduler calls this when a job's command exits with an error and left no row (e.g. the
    command does not exist in this build, or the database was unreachable at its start), so
    that every run it started is in ``job_runs``.
    """
    with engine.begin() as c:
        return int(
            c.execute(
                text(
                    "INSERT INTO job_runs (job, outcome, detail, metrics, host, ended_at) "
                    "VALUES (:job, 'failed', :d, '{}', :host, now()) RETURNING id"
                ),
                {"job": job, "d": detail[:2000], "host": host},
            ).scalar_one()
        )


def runs_by_host(engine: Engine, host: str) -> list[dict[str, Any]]:
    """Runs recorded by one process (``host`` as :func:`host_id` gives it), oldest first."""
    with engine.connect() as c:
        return [
            dict(r)
            for r in c.execute(
                text("SELECT * FROM job_runs WHERE host = :h ORDER BY id"), {"h": host}
            ).mappings()
        ]


def recent_runs(engine: Engine, *, job: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Newest runs first (all jobs, or one)."""
    q = "SELECT * FROM job_runs" + (" WHERE job = :job" if job else "") + " ORDER BY id DESC LIMIT :n"
    with engine.connect() as c:
        return [dict(r) for r in c.execute(text(q), {"job": job, "n": limit}).mappings()]


def _lock_held(c: Any, job: str) -> bool:
    """Whether a live process holds ``job``'s lock (tested by taking it, and giving it back at once)."""
    args = {"ns": _JOB_LOCK_NS, "job": job}
    if not c.execute(text("SELECT pg_try_advisory_lock(:ns, hashtext(:job))"), args).scalar_one():
        return True
    c.execute(text("SELECT pg_advisory_unlock(:ns, hashtext(:job))"), args)
    return False


def job_states(engine: Engine, *, depth: int = MAX_UNFINISHED_STREAK) -> dict[str, list[str]]:
    """Per job, the outcomes of its newest ``depth`` runs that ran (not ``skipped``), newest first.

    A newest ``running`` run whose lock is free (its process died) reads ``dead``.
    """
    with engine.connect() as c:
        rows = c.execute(
            text(
                "SELECT job, outcome FROM ("
                "  SELECT job, outcome, row_number() OVER (PARTITION BY job ORDER BY id DESC) AS k "
                "  FROM job_runs WHERE outcome <> 'skipped') r "
                "WHERE k <= :n ORDER BY job, k"
            ),
            {"n": depth},
        ).all()
        states: dict[str, list[str]] = {}
        for job, outcome in rows:
            states.setdefault(job, []).append(outcome)
        for job, outcomes in states.items():
            if outcomes[0] == "running" and not _lock_held(c, job):
                outcomes[0] = "dead"
        c.commit()
    return states


def running_jobs(engine: Engine) -> set[str]:
    """Jobs running now in a live process (their newest run is ``running`` and its lock is held)."""
    return {job for job, outcomes in job_states(engine, depth=1).items() if outcomes[0] == "running"}


def unfinished_jobs(engine: Engine, *, max_streak: int = MAX_UNFINISHED_STREAK) -> list[str]:
    """Jobs whose newest run did not finish (``running`` with its lock free, or ``interrupted``).

    A scheduler runs these at once (at start-up and then periodically), so a job killed mid-run
    is not lost until its next scheduled time. A job whose last ``max_streak`` runs all failed
    to finish is left out: restarting it again at once would only repeat what killed it.
    """
    out = []
    for job, outcomes in job_states(engine, depth=max_streak).items():
        if outcomes[0] not in ("dead", "interrupted"):
            continue
        if len(outcomes) >= max_streak and all(o in ("dead", "running", "interrupted") for o in outcomes):
            continue
        out.append(job)
    return out


# -- what the scheduled jobs read -----------------------------------------------------------------
def label_changes_since(
    engine: Engine, since: datetime | None, *, label_sets: Sequence[str] = (), concepts: Sequence[str] = ()
) -> dict[str, int]:
    """Labels written (or, for HITL labels, retracted) after ``since``, per label set and concept.

    Parameters
    ----------
    since
        Start of the window; None counts every label.
    label_sets
        Catalogue label sets (``labels.label_set``); keys of the result as they are.
    concepts
        HITL concepts (``hitl_labels.concept``); keys of the result as ``hitl:<concept>``.

    Returns
    -------
    dict
        Only the sets and concepts with changes.
    """
    out: dict[str, int] = {}
    with engine.connect() as c:
        if label_sets:
            rows = c.execute(
                text(
                    "SELECT label_set, count(*) FROM labels WHERE label_set = ANY(:s) "
                    "AND (CAST(:t AS timestamptz) IS NULL OR created_at > :t) GROUP BY label_set"
                ),
                {"s": list(label_sets), "t": since},
            ).all()
            out.update({str(r[0]): int(r[1]) for r in rows})
        if concepts:
            rows = c.execute(
                text(
                    "SELECT concept, count(*) FROM hitl_labels WHERE concept = ANY(:c) "
                    "AND (CAST(:t AS timestamptz) IS NULL OR created_at > :t OR retracted_at > :t) "
                    "GROUP BY concept"
                ),
                {"c": list(concepts), "t": since},
            ).all()
            out.update({f"hitl:{r[0]}": int(r[1]) for r in rows})
    return out


def recent_embeddings(
    engine: Engine, model_version: str, *, hours: float, batch: int = 2048
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Tiles embedded by ``model_version`` within the last ``hours``, in batches of ``batch``.

    Yields
    ------
    (tile ids, float32 (n, D) embeddings)
        Ordered by tile id; keyset pagination, so a large window is read in bounded memory.
    """
    last = "00000000-0000-0000-0000-000000000000"
    while True:
        with engine.connect() as c:
            rows = c.execute(
                text(
                    "SELECT tile_id::text, embedding FROM embeddings WHERE model_version = :mv "
                    "AND created_at >= now() - make_interval(secs => :s) AND tile_id > CAST(:last AS uuid) "
                    "ORDER BY tile_id LIMIT :n"
                ),
                {"mv": model_version, "s": hours * 3600.0, "last": last, "n": batch},
            ).all()
        if not rows:
            return
        ids = [str(r[0]) for r in rows]
        yield ids, np.stack([_vector(r[1]) for r in rows])
        if len(rows) < batch:
            return
        last = ids[-1]


def _vector(value: object) -> np.ndarray:
    """A pgvector value as ``float32`` (numpy from the registered loader, or ``pgvector.Vector``)."""
    to_numpy = getattr(value, "to_numpy", None)
    return np.asarray(to_numpy() if callable(to_numpy) else value, dtype=np.float32)


# -- promotions -----------------------------------------------------------------------------------------
def promoted(engine: Engine, role: str) -> dict[str, Any] | None:
    """The serving promotion of ``role`` (the newest row) with its model version's checkpoint, or None."""
    with engine.connect() as c:
        row = (
            c.execute(
                text(
                    "SELECT p.*, m.checkpoint_uri, m.checksum FROM promotions p "
                    "JOIN model_versions m ON m.name = p.model_version "
                    "WHERE p.role = :r ORDER BY p.id DESC LIMIT 1"
                ),
                {"r": role},
            )
            .mappings()
            .first()
        )
    return None if row is None else dict(row)


def record_promotion(
    engine: Engine,
    *,
    role: str,
    model_version: str,
    previous: str | None,
    reason: str,
    metrics: dict[str, Any],
) -> int:
    """Put ``model_version`` into service for ``role`` (a new ``promotions`` row); returns its id."""
    with engine.begin() as c:
        return int(
            c.execute(
                text(
                    "INSERT INTO promotions (role, model_version, previous, reason, metrics) "
                    "VALUES (:r, :v, :p, :why, CAST(:m AS jsonb)) RETURNING id"
                ),
                {"r": role, "v": model_version, "p": previous, "why": reason, "m": _dumps(metrics)},
            ).scalar_one()
        )
