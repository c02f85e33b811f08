"""Runs of scheduled jobs: one at a time per job, every run recorded.

:func:`job_run` wraps one run of a job. It takes a PostgreSQL session-level advisory lock keyed
by the job's name on a connection it holds for the whole run, so a second scheduler process, a
restarted scheduler or a manual ``galsift`` run of the same job cannot run it concurrently: they
record a ``skipped`` run instead. The lock dies with the connection, so a run whose process was
killed frees it at once; the next run then finds that run's row still ``running``, marks it
``interrupted``, and goes ahead. A partial unique index (one ``running`` row per job, migration
0007) backs the lock up.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, text

#: first key of the jobs' advisory locks (the second is hashtext(job name))
_JOB_LOCK_NS = 0x10B5  # "jobs"
#: outcomes a finished run can have (``running`` while it runs)
OUTCOMES = ("ok", "refused", "skipped", "failed", "interrupted")


@dataclass
class RunHandle:
    """What a running job reports: set ``metrics``, ``detail`` and (``ok`` or ``refused``) ``outcome``."""

    id: int
    job: str
    #: end of the previous ``ok`` or ``refused`` run, the start of the "since the last run" window
    since: datetime | None
    metrics: dict[str, Any] = field(default_factory=dict)
    detail: str = ""
    outcome: str = "ok"


def _host() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


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
    An exception in the body records ``failed`` with its message and is re-raised.
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
                    {"job": job, "host": _host()},
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
                    {"job": job, "host": _host()},
                ).scalar_one()
            handle = RunHandle(id=int(run_id), job=job, since=since)
            try:
                yield handle
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
    import json

    with engine.begin() as c:
        c.execute(
            text(
                "UPDATE job_runs SET outcome = :o, detail = :d, metrics = CAST(:m AS jsonb), ended_at = now() "
                "WHERE id = :i"
            ),
            {"o": outcome, "d": detail, "m": json.dumps(metrics, default=str), "i": run_id},
        )


def recent_runs(engine: Engine, *, job: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Newest runs first (all jobs, or one)."""
    q = "SELECT * FROM job_runs" + (" WHERE job = :job" if job else "") + " ORDER BY id DESC LIMIT :n"
    with engine.connect() as c:
        return [dict(r) for r in c.execute(text(q), {"job": job, "n": limit}).mappings()]


def unfinished_jobs(engine: Engine) -> list[str]:
    """Jobs whose newest run did not finish (``running`` with its lock free, or ``interrupted``).

    A scheduler starting up runs these at once, so a job killed mid-run is not lost until its
    next scheduled time.
    """
    with engine.connect() as c:
        latest = c.execute(
            text(
                "SELECT DISTINCT ON (job) job, outcome FROM job_runs "
                "WHERE outcome <> 'skipped' ORDER BY job, id DESC"
            )
        ).all()
        out = []
        for job, outcome in latest:
            if outcome == "interrupted":
                out.append(job)
            elif outcome == "running":
                args = {"ns": _JOB_LOCK_NS, "job": job}
                if c.execute(text("SELECT pg_try_advisory_lock(:ns, hashtext(:job))"), args).scalar_one():
                    # free: its runner died. We took the lock only to test it: give it back
                    c.execute(text("SELECT pg_advisory_unlock(:ns, hashtext(:job))"), args)
                    out.append(job)
        c.commit()
    return out
