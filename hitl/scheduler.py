"""``galsift scheduler``: the scheduled jobs, each run as a ``galsift`` subprocess; ``galsift jobs``.

The scheduler is APScheduler's ``BackgroundScheduler`` with its job store in the galsift database
(table ``apscheduler_jobs``, created by migration 0007, never by APScheduler). Every job in
:data:`JOBS` is added at start-up with a fixed id and ``replace_existing=True``, ``coalesce=True``,
``max_instances=1`` and no misfire limit, so runs missed while no scheduler was up run once when one
starts. A job whose interval is unchanged keeps its stored next run time across restarts (a job due
during the downtime is not pushed back by a restart).

Each run is ``galsift <command>`` in its own process: stages talk only through Kafka and the
database, a retraining that crashes or eats memory cannot take the scheduler down, and the child
gets SIGTERM when the scheduler dies (``PR_SET_PDEATHSIG``), so nothing outlives it. The command
records its own run in ``job_runs`` under an advisory lock (:func:`db.jobs.job_run`): a job never
runs twice at once, whether from two schedulers, a restart or a manual run, and the loser records
``skipped``. A command that dies before recording anything gets a ``failed`` row from here.

At start-up and every ``--recover-every`` seconds the scheduler runs at once each job whose newest
run did not finish (:func:`db.jobs.unfinished_jobs`): a scheduler killed mid-job loses nothing.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from galsift import metrics
from galsift.settings import Settings, settings_env

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler
    from sqlalchemy import Engine

    from galsift.cli import CommandGroups

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobSpec:
    """One scheduled job.

    Attributes
    ----------
    id
        APScheduler job id (fixed, so every scheduler process shares one stored job).
    argv
        The ``galsift`` command a run executes.
    every
        The settings field holding its interval in seconds.
    covers
        ``job_runs.job`` names whose unfinished runs this job re-runs (a job's command may run
        sub-jobs that record runs of their own, e.g. ``retrain`` runs ``heads``).
    """

    id: str
    argv: tuple[str, ...]
    every: str
    covers: tuple[str, ...]

    def interval_s(self, settings: Settings) -> int:
        """Seconds between runs under ``settings``."""
        return int(getattr(settings, self.every))


#: the scheduled jobs. ``pretrain`` is the weekly continual pretraining of the LVM (its command
#: records its runs as ``pretrain``); a command missing from this build is not scheduled.
JOBS: tuple[JobSpec, ...] = (
    JobSpec("retrain", ("retrain",), "retrain_every_s", covers=("retrain", "heads")),
    JobSpec("pretrain", ("train", "continual"), "pretrain_every_s", covers=("pretrain",)),
)
#: the job function APScheduler stores (a textual reference: the stored state holds no code)
JOB_FUNC = f"{__name__}:run_job"
#: how long children get to record ``interrupted`` after SIGTERM before they are killed
STOP_GRACE_S = 20.0
#: Linux ``prctl`` option: the signal a child gets when its parent thread dies
_PR_SET_PDEATHSIG = 1


# -- child processes ---------------------------------------------------------------------------------
def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when this process dies (Linux), or None.

    SIGTERM rather than SIGKILL: the job then records ``interrupted`` and stops its own children.
    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked dies; the caller's thread waits for
    the child, so it outlives it.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: the child only calls into it
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(143)

    return preexec


def spawn(argv: Sequence[str], settings: Settings) -> subprocess.Popen[bytes]:
    """Start ``galsift <argv…>`` with exactly these settings; it dies with this process.

    Its output goes to this process's stdout/stderr (the scheduler's log under ``galsift up``).
    """
    return subprocess.Popen(
        [sys.executable, "-m", "galsift.cli", *argv],
        stdin=subprocess.DEVNULL,
        env=settings_env(settings),
        preexec_fn=_die_with_parent(),  # only prctl/getppid run in the child
    )


def stop_child(proc: subprocess.Popen[bytes], *, grace_s: float = STOP_GRACE_S) -> int:
    """SIGTERM a child, wait up to ``grace_s`` for it to record its run, then SIGKILL; its status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning("pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, grace_s)
            proc.kill()
    return proc.wait()


def run_recorded(
    job: str,
    argv: Sequence[str],
    settings: Settings,
    engine: Engine,
    *,
    track: Callable[[subprocess.Popen[bytes] | None], None] | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    """Run one job's command in a child process and return its exit status and recorded runs.

    Parameters
    ----------
    job
        The ``job_runs.job`` name the command records.
    argv
        The ``galsift`` command.
    settings, engine
        Settings handed to the child; the database its runs are read from.
    track
        Called with the child once started and with None once it ended (the scheduler keeps
        its running children to stop them on shutdown).

    Returns
    -------
    (status, runs)
        The child's exit status and the ``job_runs`` rows it wrote. A child that exited with an
        error without writing one gets a ``failed`` row here, so no run goes unrecorded.

    Raises
    ------
    db.jobs.JobInterrupted
        When this process is told to stop while the child runs; the child is stopped first.
    """
    from db import jobs

    started = time.monotonic()
    proc = spawn(argv, settings)
    if track is not None:
        track(proc)
    try:
        status = proc.wait()
    except BaseException:
        # interrupted ourselves: stop the child so that it records its run before we exit
        stop_child(proc)
        raise
    finally:
        if track is not None:
            track(None)
    host = jobs.host_id(proc.pid)
    runs = jobs.runs_by_host(engine, host)
    # 143: stopped by SIGTERM before it began its run (nothing ran, so nothing failed)
    if status > 0 and status != 143 and not runs:
        detail = f"`galsift {' '.join(argv)}` exited with status {status} before recording its run"
        jobs.record_failure(engine, job, detail=detail, host=host)
        runs = jobs.runs_by_host(engine, host)
    log.info(
        "%s: `galsift %s` exited %d after %.1f s", job, " ".join(argv), status, time.monotonic() - started
    )
    return status, runs


# -- the job function APScheduler calls --------------------------------------------------------------
class _Runtime:
    """What the job function needs in the scheduler process (APScheduler stores only the job id)."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        #: ids of the jobs this scheduler is running now
        self.active: set[str] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()


_runtime: _Runtime | None = None


def run_job(job_id: str) -> int:
    """Run scheduled job ``job_id`` (a :data:`JOBS` id) as a subprocess and wait for it.

    Returns
    -------
    int
        The command's exit status (its run, with outcome and metrics, is in ``job_runs``).
    """
    rt = _runtime
    if rt is None:
        raise RuntimeError("run_job is called by `galsift scheduler` only")
    spec = next((s for s in JOBS if s.id == job_id), None)
    if spec is None:
        log.error("scheduled job %r is unknown to this build; ignored", job_id)
        return 2
    if rt.stopping.is_set():
        return 0

    holder: list[int] = []

    def track(proc: subprocess.Popen[bytes] | None) -> None:
        with rt.lock:
            if proc is not None:
                holder.append(proc.pid)
                rt.children[proc.pid] = proc
            else:
                for pid in holder:
                    rt.children.pop(pid, None)

    with rt.lock:
        rt.active.add(job_id)
    try:
        status, runs = run_recorded(spec.id, spec.argv, rt.settings, rt.engine, track=track)
    finally:
        with rt.lock:
            rt.active.discard(job_id)
    outcomes = ", ".join(f"{r['job']} {r['outcome']}" for r in runs) or "nothing recorded"
    (log.info if status == 0 else log.warning)("%s: %s", job_id, outcomes)
    return status


# -- the scheduler -------------------------------------------------------------------------------------
def _command_exists(argv: Sequence[str]) -> bool:
    """Whether ``galsift <argv…>`` is a command of this build (walks the argument parser)."""
    from galsift.cli import build_parser

    parser = build_parser()
    for word in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            return False
        parser = subs[0].choices[word]
    return True


class JobScheduler:
    """The scheduler process: APScheduler on the database job store, plus crash recovery.

    Parameters
    ----------
    settings
        Intervals (``retrain_every_s``, ``pretrain_every_s``) and what children get.
    engine
        Engine of the galsift database (job runs, recovery checks).
    jobs
        The jobs to schedule (default :data:`JOBS`; those whose command is missing are left out).
    """

    def __init__(self, settings: Settings, engine: Engine, *, jobs: Sequence[JobSpec] = JOBS) -> None:
        self.settings = settings
        self.engine = engine
        self.jobs = [j for j in jobs if self._available(j)]
        self.scheduler: BackgroundScheduler | None = None
        self._fault_since: float | None = None

    @staticmethod
    def _available(spec: JobSpec) -> bool:
        if _command_exists(spec.argv):
            return True
        log.warning("%s: `galsift %s` is not in this build; not scheduled", spec.id, " ".join(spec.argv))
        return False

    def start(self) -> None:
        """Start APScheduler on the database job store, add the jobs, run unfinished ones now."""
        global _runtime
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        from db.engine import get_engine

        _runtime = _Runtime(self.settings, self.engine)
        # the job store gets its own engine: APScheduler disposes of it at shutdown
        store = _job_store(get_engine(self.settings))
        sched = BackgroundScheduler(
            jobstores={"default": store},
            # one thread per job: each waits on its child process
            executors={"default": ThreadPoolExecutor(max(2, len(JOBS)))},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )
        # paused: the stored jobs are readable (to keep their next run times) before any fires
        sched.start(paused=True)
        self.scheduler = sched
        wanted = {j.id for j in self.jobs}
        for job in sched.get_jobs():
            if job.id not in wanted:
                log.info("removing stored job %s (not scheduled by this build)", job.id)
                sched.remove_job(job.id)
        for spec in self.jobs:
            every = spec.interval_s(self.settings)
            existing = sched.get_job(spec.id)
            kw: dict[str, Any] = {}
            if (
                existing is not None
                and isinstance(existing.trigger, IntervalTrigger)
                and existing.trigger.interval == timedelta(seconds=every)
                and existing.next_run_time is not None
            ):
                # same schedule: keep it, so a run that fell due while no scheduler was up runs now
                trigger: Any = existing.trigger
                kw["next_run_time"] = existing.next_run_time
            else:
                trigger = IntervalTrigger(seconds=every, timezone=UTC)
            sched.add_job(
                JOB_FUNC,
                trigger=trigger,
                args=[spec.id],
                id=spec.id,
                name=f"galsift {' '.join(spec.argv)}",
                replace_existing=True,
                **kw,
            )
            job = sched.get_job(spec.id)
            log.info(
                "scheduled %s every %d s (`galsift %s`), next run %s",
                spec.id,
                every,
                " ".join(spec.argv),
                None if job is None else job.next_run_time,
            )
        self.recover()
        sched.resume()

    def recover(self) -> list[str]:
        """Run now every job whose newest run did not finish; returns their ids.

        Database errors are logged (``FAULT``, then ``RECOVERED``) and retried at the next call:
        the scheduler keeps running while the database is away.
        """
        from db.jobs import running_jobs, unfinished_jobs

        assert self.scheduler is not None
        try:
            names = set(unfinished_jobs(self.engine))
            busy = running_jobs(self.engine) if names else set()
        except Exception as exc:  # any database error: retried at the next check
            if self._fault_since is None:
                self._fault_since = time.monotonic()
                metrics.HEALTH.fault("scheduler", str(exc).splitlines()[0][:200])
                log.warning("scheduler FAULT, will retry: %s", exc)
            return []
        if self._fault_since is not None:
            log.info("scheduler RECOVERED after %.1f s", time.monotonic() - self._fault_since)
            metrics.HEALTH.ok("scheduler")
            self._fault_since = None
        now = datetime.now(UTC)
        # a job running now (here or in another scheduler) finishes what its sub-job left
        rt = _runtime
        assert rt is not None  # set by start()
        with rt.lock:
            busy |= rt.active
        rerun = [s.id for s in self.jobs if names & set(s.covers) and s.id not in busy]
        for job_id in rerun:
            log.info("%s: its last run did not finish; running it now", job_id)
            self.scheduler.modify_job(job_id, next_run_time=now)
        return rerun

    def stop(self, *, grace_s: float = STOP_GRACE_S) -> None:
        """Stop scheduling, SIGTERM the running jobs (they record ``interrupted``), wait, kill."""
        rt = _runtime
        if rt is not None:
            rt.stopping.set()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        if rt is None:
            return
        with rt.lock:
            children = list(rt.children.values())
        for proc in children:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in children:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d still running; killing it", proc.pid)
                proc.kill()
                proc.wait()


def _job_store(engine: Engine) -> Any:
    """APScheduler's SQLAlchemy job store on the table migration 0007 made: it never creates it."""
    from apscheduler.jobstores.base import BaseJobStore
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from sqlalchemy import inspect

    class MigratedJobStore(SQLAlchemyJobStore):
        def start(self, scheduler: Any, alias: str) -> None:
            # BaseJobStore.start, not SQLAlchemyJobStore.start: that one runs CREATE TABLE
            BaseJobStore.start(self, scheduler, alias)
            if not inspect(self.engine).has_table(self.jobs_t.name):
                raise RuntimeError(
                    f"table {self.jobs_t.name} is missing: migrate the database first (galsift stack up)"
                )

    return MigratedJobStore(engine=engine, tablename="apscheduler_jobs")


def serve(settings: Settings, *, recover_every_s: float = 60.0) -> int:
    """Entry point of ``galsift scheduler``: run until SIGTERM or SIGINT."""
    from db.engine import get_engine

    engine = get_engine(settings)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("scheduler: signal %d, stopping (running jobs record 'interrupted')", signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    sched = JobScheduler(settings, engine)
    if settings.metrics_port is not None:
        metrics.serve(settings.metrics_port, host=settings.metrics_host)
    metrics.HEALTH.ok("scheduler")
    try:
        sched.start()
        log.info("scheduler: running %s", ", ".join(j.id for j in sched.jobs) or "no job")
        while not stop.wait(recover_every_s):
            sched.recover()
    finally:
        sched.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.dispose()
    return 0


# -- listing ------------------------------------------------------------------------------------------
def scheduled_jobs(engine: Engine) -> list[dict[str, Any]]:
    """The stored schedule: job id, trigger and next run time (UTC), without starting a scheduler."""
    import pickle

    from sqlalchemy import text

    with engine.connect() as c:
        rows = c.execute(text("SELECT id, next_run_time, job_state FROM apscheduler_jobs ORDER BY id")).all()
    out = []
    for job_id, next_ts, state in rows:
        try:
            trigger = str(pickle.loads(state)["trigger"])  # our own table, written by APScheduler
        except Exception:  # an unreadable state is shown, not fatal
            trigger = "?"
        nxt = None if next_ts is None else datetime.fromtimestamp(float(next_ts), tz=UTC)
        out.append({"id": job_id, "trigger": trigger, "next_run_time": nxt})
    return out


def _fmt_runs(runs: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'id':>6}  {'job':<10} {'outcome':<12} {'started (UTC)':<19} {'secs':>7}  detail / metrics"]
    for r in runs:
        started = r["started_at"].astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        secs = "" if r["ended_at"] is None else f"{(r['ended_at'] - r['started_at']).total_seconds():.1f}"
        info = r["detail"] or ""
        if r["metrics"]:
            info = (info + " " if info else "") + json.dumps(r["metrics"], default=str, separators=(",", ":"))
        lines.append(f"{r['id']:>6}  {r['job']:<10} {r['outcome']:<12} {started:<19} {secs:>7}  {info[:160]}")
    return "\n".join(lines)


def _list(args: argparse.Namespace, settings: Settings) -> int:
    from db.engine import get_engine
    from db.jobs import recent_runs

    engine = get_engine(settings)
    try:
        runs = recent_runs(engine, job=args.job, limit=args.limit)
        schedule = scheduled_jobs(engine)
    finally:
        engine.dispose()
    if args.json is not None:
        doc = {"command": "jobs", "schedule": schedule, "runs": runs}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, default=str, indent=1) + "\n", encoding="utf-8")
    if schedule:
        print("scheduled jobs:")
        for s in schedule:
            nxt = "paused" if s["next_run_time"] is None else s["next_run_time"].strftime("%Y-%m-%d %H:%M:%S")
            print(f"  {s['id']:<10} {s['trigger']:<24} next run {nxt} UTC")
        print()
    print(_fmt_runs(runs) if runs else "no job runs recorded")
    return 0


def _scheduler(args: argparse.Namespace, settings: Settings) -> int:
    if args.list:
        return _list(args, settings)
    return serve(settings, recover_every_s=args.recover_every)


def _retrain(args: argparse.Namespace, settings: Settings) -> int:
    from hitl.jobs import retrain_command

    return retrain_command(settings, heads=not args.no_heads)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def register(groups: CommandGroups) -> None:
    """Add ``galsift scheduler``, ``galsift jobs`` and ``galsift retrain``."""
    from pathlib import Path

    p = groups.top.add_parser(
        "scheduler",
        help="run the scheduled jobs (retraining, continual pretraining); --list shows them and recent runs",
        description="APScheduler with its job store in the database. Jobs: "
        + "; ".join(f"{j.id} = `galsift {' '.join(j.argv)}` every GALSIFT_{j.every.upper()} s" for j in JOBS)
        + ". Each run is a subprocess that records itself in job_runs under a per-job lock, so a "
        "job never runs twice at once (also across scheduler processes); runs missed while no "
        "scheduler was up run once at start; a run cut short (scheduler killed) runs again at "
        "start-up. SIGTERM/Ctrl-C stops it (running jobs record 'interrupted').",
    )
    p.add_argument("--list", action="store_true", help="show the stored schedule and recent runs, then exit")
    p.add_argument(
        "--recover-every",
        type=_positive,
        default=60.0,
        metavar="S",
        help="seconds between checks for runs that did not finish (default 60)",
    )
    jobs = groups.top.add_parser("jobs", help="the stored schedule and recent runs of the scheduled jobs")
    for q in (p, jobs):
        q.add_argument("--job", help="only this job's runs (retrain, heads, pretrain)")
        q.add_argument("--limit", type=int, default=20, help="newest N runs (default 20)")
        q.add_argument("--json", type=Path, default=None, help="also write the schedule and runs as JSON")
    p.set_defaults(func=_scheduler)
    jobs.set_defaults(func=_list)

    r = groups.top.add_parser(
        "retrain",
        help="the retraining job: saved searches and morphology heads from the labels saved since the last run",
        description="Refit every active saved search whose concept got labels since its last fit, "
        "re-score the tiles embedded within GALSIFT_RESCORE_RECENT_HOURS with it and notify above "
        "its threshold; then run `galsift train heads --from-db` (morphology heads from catalogue "
        "and HITL labels, new version promoted, recent tiles re-scored). Recorded in job_runs as "
        "'retrain' (the heads as 'heads'); skipped if already running anywhere.",
    )
    r.add_argument("--no-heads", action="store_true", help="only the saved searches")
    r.set_defaults(func=_retrain)
