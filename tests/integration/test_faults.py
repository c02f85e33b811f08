"""The fault-injection suite: one steady stream of real tiles through the whole pipeline, while,
in turn, every service is SIGKILLed (and restarted, as a supervisor would; a Kafka stage while
it writes a batch, the encoder once more after its write is durable and before its commit, so
that the replay lands on its own rows), the Kafka broker is restarted, PostgreSQL is stopped for
30 s, the object store's directory is filled to its quota, and poison messages are fed at every
consumed topic.

The stack is this module's own (a broker, an embedded PostgreSQL and an object store under a
temporary directory), so stopping its parts disturbs no other test. The object store is a
size-limited tmpfs mounted on ``<data_dir>/objects``: filling it makes the writes of ingest (and
of the detector's lens masks) fail with ``ENOSPC``, as a full disk or volume quota would. The six
services of ``galsift up`` run as subprocesses, each with its ``/healthz``; alerts go to a local
webhook through the notifier, and one saved search (threshold 0: every new tile matches) notifies
through the watcher's webhook sender. Every tile must therefore end as: one ``tiles`` row with its
pixels, one embedding, one lens-finder score (and one lens-head score if it is a colour
composite), one alert when its lens score is above the (tiny) alert threshold with exactly one webhook call, one saved-search notification with exactly one
webhook call, and one match of the suite's alert filter (every scored tile matches), published
once on the filter's topic and posted once to its webhook.

Afterwards every published tile is checked against the database and the webhook's calls: lost
(a stage's output missing) and duplicated (a second row, alert or call), per fault (tiles are
tagged with the fault running when they were published); every poison message must be in
``tiles.dead`` with its reason and nothing else there; and every service must be back to
``/healthz`` 200 without help. The summary table is printed at the end.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import itertools
import os
import re
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from faults_support import (
    ALERT_THRESHOLD,
    ANY_STAGE,
    SERVICE_NAMES,
    Hook,
    Poison,
    Row,
    Stream,
    Supervisor,
    dead_letters,
    demo_tiles,
    filter_messages,
    free_port_run,
    group_lag,
    passed,
    poison_messages,
    rows,
    scalar,
    send_poison,
    table,
    wait_until,
)
from sqlalchemy import Connection, Engine, text

from galsift.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.faults]

REPO = Path(__file__).resolve().parents[2]
#: the checkpoint the encoder serves in a fresh database (no promoted LVM)
LVM_TINY = REPO / "encoder" / "checkpoints" / "lvm_tiny.safetensors"
#: tiles per second of the steady stream (the detector's Mask R-CNN on 2 CPU cores sets the pace)
RATE = 0.2
#: tiles published at the start of each fault, so that each fault lands in work in flight
BURST = 4
#: records per batch: small, so a burst is several batches and a kill lands between two
BATCH = 2
#: the PostgreSQL outage
PG_OUTAGE_S = 30.0
#: size of the object store's filesystem
STORE_SIZE = "64m"
#: the longest any one wait may take (generous: the machine may be loaded), never a sleep
DEADLINE_S = float(os.environ.get("FAULTS_DEADLINE_S", "420"))
#: consumer group and input topic of each Kafka stage (the services' default groups)
GROUPS = {
    "ingest": "ingest",
    "encode": "encoder",
    "detect": "detector",
    "watch": "watch",
    "filters": "filters",
}
#: the table each Kafka stage writes its batch to (first): the SIGKILL rows lock it to catch the
#: stage in the middle of a write
WRITES = {
    "ingest": "tiles",
    "encode": "embeddings",
    "detect": "detections",
    "watch": "search_notifications",
    "filters": "filter_matches",
}
#: the alert filter the suite defines: every scored tile matches, one topic message and one
#: webhook call each
FILTER = "faults-all"
#: sessions whose INSERT into table :t waits for a lock (the stage's write; not, say, the
#: filters' outbox publisher, whose UPDATEs on filter_matches wait too)
WAITING_ON_LOCK = (
    "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
    "JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE c.relname = :t AND NOT l.granted AND a.query ILIKE 'INSERT INTO ' || :t || '%'"
)


def _mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a size-limited tmpfs on ``path``; None when mounted, else why it could not be."""
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip() or f"exit {proc.returncode}"


def _fill(directory: Path) -> Path:
    """Write one file into ``directory`` until its filesystem says ENOSPC; returns the file."""
    filler = directory / "filler.bin"
    with filler.open("wb", buffering=0) as fh:
        for chunk in (1 << 20, 1 << 14, 1 << 10):
            block = b"\xff" * chunk
            while True:
                try:
                    fh.write(block)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    break
    return filler


@dataclass
class Pipeline:
    """The running pipeline and what the suite has learnt about it."""

    settings: Settings
    engine: Engine
    sup: Supervisor
    stream: Stream
    hook: Hook
    store_mount: str | None
    rows: list[Row] = field(default_factory=list)
    #: per phase, per service: the log written during the phase
    logs: dict[str, dict[str, str]] = field(default_factory=dict)
    #: per phase: services seen answering 503 while the fault lasted
    unhealthy: dict[str, set[str]] = field(default_factory=dict)
    #: the bad messages fed
    poisoned: list[Poison] = field(default_factory=list)
    #: per phase: what the verdict found wrong, tile by tile
    problems: dict[str, list[str]] = field(default_factory=dict)
    #: waits that ran out (a fault the pipeline did not recover from)
    unsettled: list[str] = field(default_factory=list)
    #: per phase, per service: where its log stood when the phase began
    marks: dict[str, dict[str, int]] = field(default_factory=dict)
    #: the ``job_runs`` id of the retraining run killed with the scheduler
    killed_run: int | None = None

    # -- helpers ------------------------------------------------------------------------------
    def begin(self, phase: str) -> dict[str, int]:
        """Start a phase: tag new tiles with it; returns where each log ends now."""
        self.sup.check()
        self.stream.phase = phase
        self.marks[phase] = {n: len(self.sup.log_text(n)) for n in SERVICE_NAMES}
        return self.marks[phase]

    def end(self, phase: str, marks: dict[str, int]) -> None:
        """Keep what each service logged during the phase."""
        self.logs[phase] = {n: self.sup.log_text(n)[marks[n] :] for n in SERVICE_NAMES}

    def through(self, ids: list[str], stages: tuple[str, ...] = ("detect", "watch")) -> bool:
        """Whether every tile of ``ids`` has passed every stage of ``stages``."""
        return all(passed(self.engine, s, ids) == len(ids) for s in stages)

    def watch_health(self, phase: str, until: float) -> None:
        """Poll every service's ``/healthz`` until ``until`` (monotonic), noting who answers 503."""
        seen = self.unhealthy.setdefault(phase, set())
        while time.monotonic() < until:
            for name in SERVICE_NAMES:
                if self.sup.health(name, timeout_s=1.0) == 503:
                    seen.add(name)
            time.sleep(min(1.0, max(0.0, until - time.monotonic())))

    def lag(self, stage: str) -> int:
        """Work in flight at one Kafka stage (its group's uncommitted records)."""
        topics = self.settings.topics
        topic = {
            "ingest": topics.raw,
            "encode": topics.accepted,
            "detect": topics.embedded,
            "watch": topics.embedded,
            # the alert filters read what the detector scored
            "filters": topics.detected,
        }.get(stage)
        if not topic:
            return 0
        try:
            return group_lag(self.settings, GROUPS.get(stage, stage), topic)
        except Exception:  # the broker away: unknown
            return 0

    def total_lag(self) -> int:
        """Work in flight in the whole pipeline."""
        return sum(self.lag(s) for s in GROUPS)

    def settle(self, predicate: Callable[[], bool], what: str, *, since: float) -> float | None:
        """Seconds from ``since`` until ``predicate`` held, or None if it did not by the deadline.

        A fault whose protection is broken loses or doubles tiles and may never settle: the suite
        then goes on, and the verdict counts what was lost in that fault's row.
        """
        try:
            wait_until(predicate, timeout_s=DEADLINE_S, what=what, interval_s=0.5)
        except TimeoutError:
            self.unsettled.append(what)
            return None
        return time.monotonic() - since

    def recovered(self, ids: list[str], stages: tuple[str, ...] = ("detect", "watch")) -> bool:
        """Every service healthy and the phase's burst through ``stages``."""
        self.sup.check()
        return self.sup.all_healthy() and self.through(ids, stages)

    # -- the faults -----------------------------------------------------------------------------
    def poison(self) -> None:
        """Bad messages at every consumed topic: each must end in ``tiles.dead`` with its reason."""
        phase = "poison at every topic"
        marks = self.begin(phase)
        stored = rows(self.engine, "SELECT pixels_uri FROM tiles ORDER BY ingested_at LIMIT 1")
        # a FITS tile (float flux in g, r, z): its NaN copy is bad only for its NaN
        flux = next(t for t in self.stream.sources if t.pixels.dtype.kind == "f")
        bad = poison_messages(self.settings, self.stream.survey, flux, stored[0][0])
        started = time.monotonic()
        send_poison(self.settings, bad)
        want = {(stage, p.key) for p in bad for stage in p.expect}

        def all_dead() -> bool:
            got = set()
            for d in dead_letters(self.settings):
                key = (d["key"] or b"").decode()
                got |= {(d["stage"], key), (ANY_STAGE, key)}
            return want <= got

        wait_until(all_dead, timeout_s=DEADLINE_S, what="every poison message dead-lettered", interval_s=1.0)
        self.rows.append(Row(phase, in_flight=len(want), recovery_s=time.monotonic() - started))
        self.poisoned = bad
        self.end(phase, marks)

    def sigkill(self, name: str) -> None:
        """SIGKILL one service in the middle of a burst, restart it at once, wait for its recovery.

        A Kafka stage is killed while it is writing a polled batch: the suite holds a lock on the
        table the stage writes (``WRITES``; reads go on) from before the burst is published until
        the stage's write waits for it, so the kill lands after the poll and before the batch is
        durable, wherever the timing falls. It has recovered when it is healthy again and the
        whole burst came out. The notifier is killed while the webhook holds one of its calls open
        (claimed and posted, its outcome not yet recorded), and has recovered when every alert
        then pending is delivered (the killed claim after its lease); any other service has
        recovered when it answers ``/healthz`` 200 again.
        """
        phase = f"SIGKILL {name}"
        marks = self.begin(phase)
        # every delivery waiting at the kill, the held call's included
        pending_sql = "SELECT id FROM alert_deliveries WHERE state = 'pending'"
        with self.engine.connect() as hold:
            if name in WRITES:
                ids = self._burst_into_locked_write(hold, name)
            elif name == "notify":
                # the next alert call is received and held open: the kill lands between the
                # notifier's claim and its record of the outcome
                self.hook.hold_next("/alerts")
                ids = self.stream.send(BURST)
                wait_until(self.hook.held.is_set, timeout_s=DEADLINE_S, what="a held alert call")
            else:
                ids = self.stream.send(BURST)
            pending = [int(r[0]) for r in rows(self.engine, pending_sql)]
            in_flight = len(pending) if name == "notify" else self.lag(name)
            t0 = time.monotonic()
            self.sup.kill(name)
            hold.rollback()  # the lock goes; the killed writer's transaction never commits
            self.hook.release()
        self.sup.start(name)

        def recovered() -> bool:
            self.sup.check()
            if self.sup.health(name) != 200:
                return False
            if name in GROUPS:
                return passed(self.engine, name, ids) == len(ids)
            if name == "notify" and pending:
                return scalar(
                    self.engine,
                    "SELECT count(*) FROM alert_deliveries WHERE id = ANY(:d) AND state = 'sent'",
                    d=pending,
                ) == len(pending)
            return True

        took = self.settle(recovered, f"{name} restarted and back at work", since=t0)
        self.rows.append(Row(phase, in_flight=in_flight, recovery_s=took))
        self.end(phase, marks)

    def sigkill_scheduler_mid_job(self) -> None:
        """SIGKILL the scheduler while its retraining job runs; the restarted one must run it again.

        The scheduler is restarted with a one-second retraining interval, so the job falls due at
        once, and killed (with the job's process: one process group) as soon as the run is
        recorded ``running``. It comes back with the suite's hour-long interval, so before the
        deadline only its recovery of unfinished jobs can run the job again. Lost: the job never
        ran again to ``ok``; duplicated: two runs of it overlapped.
        """
        phase = "SIGKILL scheduler (mid-job)"
        marks = self.begin(phase)
        before = scalar(self.engine, "SELECT coalesce(max(id), 0) FROM job_runs WHERE job = 'retrain'")
        self.sup.kill("scheduler")
        self.sup.start("scheduler", retrain_every_s=1)
        running = "SELECT coalesce(max(id), 0) FROM job_runs WHERE job = 'retrain' AND outcome = 'running'"
        wait_until(
            lambda: scalar(self.engine, running) > before,
            timeout_s=DEADLINE_S,
            what="a running retrain",
            interval_s=0.05,
        )
        t0 = time.monotonic()
        self.sup.kill("scheduler")
        self.killed_run = int(scalar(self.engine, running))
        self.sup.start("scheduler")  # the suite's settings: the next scheduled run is an hour away

        def recovered() -> bool:
            self.sup.check()
            return self.sup.health("scheduler") == 200 and bool(self.reruns())

        took = self.settle(recovered, "the killed retrain run again", since=t0)
        self.rows.append(Row(phase, in_flight=1, recovery_s=took, note="1 job run"))
        self.end(phase, marks)

    def reruns(self) -> list[int]:
        """Runs of ``retrain`` after the one killed mid-job that finished ``ok``."""
        return [
            int(r[0])
            for r in rows(
                self.engine,
                "SELECT id FROM job_runs WHERE job = 'retrain' AND id > :k AND outcome = 'ok'",
                k=self.killed_run,
            )
        ]

    def job_overlaps(self) -> int:
        """Pairs of consecutive ``retrain`` or ``heads`` runs that ran at the same time."""
        overlaps = 0
        for job in ("retrain", "heads"):
            ran = rows(
                self.engine,
                "SELECT started_at, ended_at FROM job_runs WHERE job = :j AND outcome <> 'skipped' "
                "ORDER BY started_at",
                j=job,
            )
            # a run killed with its process never ends: only the run after it may follow it
            overlaps += sum(1 for a, b in itertools.pairwise(ran) if a[1] is not None and a[1] > b[0])
        return overlaps

    def _burst_into_locked_write(self, hold: Connection, name: str) -> list[str]:
        """Lock the table stage ``name`` writes, publish a burst, wait until the write waits.

        The lock (SHARE ROW EXCLUSIVE: INSERTs wait, SELECTs do not) is held by ``hold``'s
        transaction until it ends; returns the burst's tile ids.
        """
        hold.execute(text(f"LOCK TABLE {WRITES[name]} IN SHARE ROW EXCLUSIVE MODE"))
        ids = self.stream.send(BURST)
        wait_until(
            lambda: scalar(self.engine, WAITING_ON_LOCK, t=WRITES[name]) > 0,
            timeout_s=DEADLINE_S,
            what=f"{name} writing the burst",
            interval_s=0.02,
        )
        return ids

    def sigkill_after_write(self, name: str) -> None:
        """SIGKILL a Kafka stage after its batch is durable and before its offsets are committed.

        The stage's write waits on a table lock (as in :meth:`sigkill`); the broker is then frozen
        (SIGSTOP) and the lock released, so the write goes through while the publish and the
        commit that follow it cannot. The stage is killed there; the broker thaws (SIGCONT) and
        the restarted stage replays the batch over its own rows, which the upserts must absorb.
        """
        from deploy import stack

        phase = f"SIGKILL {name} after its write"
        marks = self.begin(phase)
        broker = stack.kafka_status(self.settings).pid
        assert broker is not None, "no broker pid"
        with self.engine.connect() as hold:
            ids = self._burst_into_locked_write(hold, name)
            in_flight = self.lag(name)
            self.stream.pause()  # the publisher waits for the broker (see Stream.pause)
            os.kill(broker, signal.SIGSTOP)
            try:
                hold.rollback()
                wait_until(
                    lambda: passed(self.engine, name, ids) > 0,
                    timeout_s=DEADLINE_S,
                    what=f"{name}'s write durable",
                    interval_s=0.02,
                )
                t0 = time.monotonic()
                self.sup.kill(name)
            finally:
                os.kill(broker, signal.SIGCONT)
                self.stream.resume()
        self.sup.start(name)

        def recovered() -> bool:
            self.sup.check()
            return self.sup.health(name) == 200 and passed(self.engine, name, ids) == len(ids)

        took = self.settle(recovered, f"{name} restarted and its batch replayed", since=t0)
        self.rows.append(Row(phase, in_flight=in_flight, recovery_s=took))
        self.end(phase, marks)

    def broker_restart(self) -> None:
        """Stop the Kafka broker (controlled shutdown) in the middle of a burst and start it again."""
        from deploy import stack

        phase = "Kafka broker restart"
        marks = self.begin(phase)
        ids = self.stream.send(BURST)
        wait_until(
            lambda: passed(self.engine, "ingest", ids) > 0, timeout_s=DEADLINE_S, what="the burst ingesting"
        )
        in_flight = self.total_lag()
        self.stream.pause()  # the survey's publisher waits for the broker (see Stream.pause)
        try:
            stack.kafka_down(self.settings)
            stack.kafka_up(self.settings)
        finally:
            self.stream.resume()
        t0 = time.monotonic()
        took = self.settle(
            lambda: self.recovered(ids, ("watch",)), "recovery from the broker restart", since=t0
        )
        self.rows.append(Row(phase, in_flight=in_flight, recovery_s=took))
        self.end(phase, marks)

    def postgres_outage(self) -> None:
        """Stop PostgreSQL for ``PG_OUTAGE_S`` in the middle of a burst; start it again."""
        from deploy import stack

        phase = f"PostgreSQL stopped {PG_OUTAGE_S:.0f} s"
        marks = self.begin(phase)
        ids = self.stream.send(BURST)
        wait_until(
            lambda: passed(self.engine, "ingest", ids) > 0, timeout_s=DEADLINE_S, what="the burst ingesting"
        )
        in_flight = self.total_lag()
        assert stack.postgres_down(self.settings)
        # the fault itself: 30 s without a database, while the stream goes on
        self.watch_health(phase, time.monotonic() + PG_OUTAGE_S)
        crashed_during = self.sup.crashed()
        stack.postgres_up(self.settings, migrate=False)
        t0 = time.monotonic()
        took = self.settle(
            lambda: self.recovered(ids, ("watch",)), "recovery from the database outage", since=t0
        )
        self.rows.append(Row(phase, in_flight=in_flight, recovery_s=took))
        self.end(phase, marks)
        assert not crashed_during, f"services exited while the database was away: {crashed_during}"

    def store_full(self) -> None:
        """Fill the object store's filesystem to its quota in the middle of a burst, then free it."""
        phase = "object store full (ENOSPC)"
        if self.store_mount is not None:
            self.rows.append(Row(phase, note=f"NOT RUN: no size-limited mount ({self.store_mount})"))
            return
        marks = self.begin(phase)
        filler = _fill(self.settings.data_dir / "objects")
        ids = self.stream.send(BURST)
        # ingest cannot store pixels: it must ride it out (503), not dead-letter the tiles
        self.watch_until_fault("ingest", phase)
        in_flight = self.lag("ingest")
        filler.unlink()
        t0 = time.monotonic()
        took = self.settle(lambda: self.recovered(ids, ("watch",)), "recovery from the full store", since=t0)
        self.rows.append(Row(phase, in_flight=in_flight, recovery_s=took))
        self.end(phase, marks)

    def watch_until_fault(self, name: str, phase: str) -> None:
        """Wait until ``name`` reports the fault on ``/healthz``."""
        seen = self.unhealthy.setdefault(phase, set())

        def faulted() -> bool:
            self.sup.check()
            if self.sup.health(name) == 503:
                seen.add(name)
                return True
            return False

        wait_until(faulted, timeout_s=DEADLINE_S, what=f"{name} reporting the fault on /healthz")

    # -- the verdict ------------------------------------------------------------------------------
    def verdict(self, search_id: int) -> dict[str, Counter[str]]:
        """Per phase: tiles lost and duplicated (see the module docstring for what is checked)."""
        from db.filters import topic_for
        from galsift.objectstore import read_array

        ids = [uuid.UUID(i) for i in self.stream.ids()]
        phase_of = dict(self.stream.published)
        lost: Counter[str] = Counter()
        dup: Counter[str] = Counter()
        problems: dict[str, list[str]] = {}

        def per_tile(sql: str) -> dict[str, tuple[Any, ...]]:
            params = {"ids": ids, "s": search_id, "f": FILTER}
            return {str(r[0]): tuple(r[1:]) for r in rows(self.engine, sql, **params)}

        tiles = per_tile("SELECT id, pixels_uri, checksum FROM tiles WHERE id = ANY(:ids)")
        emb = per_tile(
            "SELECT tile_id, count(*), count(DISTINCT model_version) FROM embeddings "
            "WHERE tile_id = ANY(:ids) GROUP BY tile_id"
        )
        # the finder's rows, and the tile's lens score: the lens head's where it scored the tile
        # (colour composites), else the finder's; the head's rows are counted like the finder's
        det = per_tile(
            "SELECT tile_id, count(*) FILTER (WHERE detector = 'lens_finder'), "
            "count(DISTINCT model_version) FILTER (WHERE detector = 'lens_finder'), "
            "coalesce(max(score) FILTER (WHERE detector = 'lens_head'), "
            "max(score) FILTER (WHERE detector = 'lens_finder')), "
            "count(*) FILTER (WHERE detector = 'lens_head'), "
            "count(DISTINCT model_version) FILTER (WHERE detector = 'lens_head') FROM detections "
            "WHERE tile_id = ANY(:ids) AND detector IN ('lens_finder', 'lens_head') GROUP BY tile_id"
        )
        alerts = per_tile(
            "SELECT a.tile_id, count(DISTINCT a.id), count(d.id), "
            "count(d.id) FILTER (WHERE d.state = 'sent'), array_agg(d.id) FROM alerts a "
            "LEFT JOIN alert_deliveries d ON d.alert_id = a.id WHERE a.tile_id = ANY(:ids) GROUP BY a.tile_id"
        )
        notes = per_tile(
            "SELECT tile_id, count(*), count(*) FILTER (WHERE webhook_state = 'sent'), array_agg(id) "
            "FROM search_notifications WHERE saved_search_id = :s AND tile_id = ANY(:ids) GROUP BY tile_id"
        )
        matches = per_tile(
            "SELECT m.tile_id, count(*), count(*) FILTER (WHERE m.topic_state = 'published'), "
            "count(*) FILTER (WHERE m.webhook_state = 'sent'), array_agg(m.id) FROM filter_matches m "
            "JOIN alert_filters f ON f.id = m.filter_id WHERE f.name = :f "
            "AND m.tile_id = ANY(:ids) GROUP BY m.tile_id"
        )
        on_topic = filter_messages(self.settings, topic_for(FILTER))
        match_calls = self.hook.counts("match")
        match_repeats = self.hook.attempt_repeats("match")
        alert_calls = self.hook.counts("delivery")
        note_calls = self.hook.counts("notification")
        note_repeats = self.hook.attempt_repeats("notification")
        alert_repeats = self.hook.attempt_repeats("delivery")
        threshold = self.settings.alert_threshold
        for tid in map(str, ids):
            phase = phase_of[tid]
            missing: list[str] = []
            extra: list[str] = []
            if tid not in tiles:
                missing.append("tile row")
            else:
                uri, checksum = tiles[tid]
                try:
                    read_array(str(uri), checksum=str(checksum))
                except Exception as exc:
                    missing.append(f"pixels ({type(exc).__name__})")
            n_emb = emb.get(tid, (0, 0))
            if n_emb[0] == 0:
                missing.append("embedding")
            elif n_emb[0] > n_emb[1]:
                extra.append("embedding")
            n_det = det.get(tid, (0, 0, None, 0, 0))
            if n_det[0] == 0:
                missing.append("lens score")
            elif n_det[0] > n_det[1] or n_det[3] > n_det[4]:
                extra.append("lens score")
            n_alert = alerts.get(tid)
            if n_det[0] and float(n_det[2] or 0.0) >= threshold:
                if n_alert is None:
                    missing.append("alert")
                else:
                    n, n_deliveries, n_sent, delivery_ids = n_alert
                    if n > 1:
                        extra.append("alert")
                    if n_sent < n_deliveries or n_deliveries == 0:
                        missing.append("alert webhook delivered")
                    deliveries = [d for d in delivery_ids if d is not None]
                    _check_calls(
                        "alert", deliveries, alert_calls, alert_repeats, missing=missing, extra=extra
                    )
            elif n_alert is not None:
                extra.append("alert below the threshold")
            n_note = notes.get(tid)
            if n_note is None:
                missing.append("saved-search notification")
            else:
                n, n_sent, note_ids = n_note
                if n > 1:
                    extra.append("notification")
                if n_sent < n:
                    missing.append("notification webhook delivered")
                _check_calls("notification", note_ids, note_calls, note_repeats, missing=missing, extra=extra)
            n_match = matches.get(tid)
            if n_match is None:
                missing.append("filter match")
            else:
                n, n_published, n_sent, match_ids = n_match
                if n > 1:
                    extra.append("filter match")
                if n_published < n or on_topic.get(tid, 0) == 0:
                    missing.append("filter topic message")
                if on_topic.get(tid, 0) > 1:
                    extra.append("filter topic message")
                if n_sent < n:
                    missing.append("filter webhook delivered")
                _check_calls("filter", match_ids, match_calls, match_repeats, missing=missing, extra=extra)
            if missing:
                lost[phase] += 1
                problems.setdefault(phase, []).append(f"{tid} missing {', '.join(missing)}")
            if extra:
                dup[phase] += 1
                problems.setdefault(phase, []).append(f"{tid} duplicated {', '.join(extra)}")
        self.problems = problems
        return {"lost": lost, "dup": dup}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, repo_data: Path) -> Iterator[Pipeline]:
    """The module's own stack and all six services, with a saved search and an alert webhook."""
    from db.engine import get_engine
    from deploy import stack

    data_dir = tmp_path_factory.mktemp("faults")
    objects = data_dir / "objects"
    objects.mkdir()
    not_mounted = _mount_tmpfs(objects, STORE_SIZE)
    hook = Hook()
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=data_dir,
        kafka_bootstrap=f"localhost:{free_port_run(2)}",
        database_url=None,
        batch_size=BATCH,
        batch_timeout_ms=500,
        device="cpu",
        # every lens score alerts (an alert and a webhook call per tile), at any rate
        alert_threshold=ALERT_THRESHOLD,
        alert_webhooks=[f"{hook.url}/alerts"],
        webhook_rate_per_hour=100_000,
        watch_refresh_s=1.0,
        # the watcher's second net (a restarted watcher scores the last moments' tiles again)
        # reaches back only to the refresh: the SIGKILL-watch row tests commit-after-write itself
        watch_catch_up_s=0.0,
        metrics_port_base=free_port_run(len(SERVICE_NAMES)),
        dashboard_port=free_port_run(1),
    )
    sup: Supervisor | None = None
    stream: Stream | None = None
    engine: Engine | None = None
    try:
        stack.stack_up(settings, timeout_s=DEADLINE_S)
        engine = get_engine(settings)
        sup = Supervisor(settings, data_dir / "logs")
        sup.start_all()
        stream = Stream(settings, f"faults_{uuid.uuid4().hex[:6]}", demo_tiles(repo_data), rate=RATE)
        yield Pipeline(settings, engine, sup, stream, hook, not_mounted)
    finally:
        # each step whatever the one before did: no process of this module may outlive it
        try:
            if stream is not None:
                stream.stop()
        finally:
            try:
                if sup is not None:
                    print(f"\nservices stopped: {sup.stop_all()}")
            finally:
                try:
                    if engine is not None:
                        engine.dispose()
                    stack.stack_down(settings)
                finally:
                    hook.close()
                    if not_mounted is None:
                        subprocess.run(["umount", "-l", str(objects)], check=False, capture_output=True)
                    # the Kafka clients' sockets of connections refused while the broker was away
                    # are garbage now: collect them here, under this test's warning filter
                    gc.collect()


def _check_calls(
    what: str,
    ids: list[Any],
    calls: Counter[str],
    repeats: Counter[str],
    *,
    missing: list[str],
    extra: list[str],
) -> None:
    """Note a webhook id never called (missing) or one attempt of it posted twice (extra).

    At least once: an interrupted call is posted again as the next attempt of the same id (the
    receiver drops it); one attempt posted twice is a bug.
    """
    if any(calls.get(str(i), 0) == 0 for i in ids):
        missing.append(f"{what} webhook call")
    if any(repeats.get(str(i), 0) for i in ids):
        extra.append(f"{what} webhook call")


def _alert_filter(p: Pipeline) -> None:
    """The alert filter ``FILTER``: every scored tile matches (topic and webhook)."""
    from db.filters import add_filter

    add_filter(
        p.settings, p.engine, FILTER, "lens_score >= 0", owner="faults", webhook_url=f"{p.hook.url}/filter"
    )


def _saved_search(engine: Engine, webhook_url: str) -> int:
    """A saved search of the served LVM with threshold 0 (every new tile matches) and a webhook."""
    import numpy as np

    from db.hitl import create_session, save_search
    from db.models import HitlSessionCreate, SavedSearch
    from galsift.constants import EMBEDDING_DIM
    from hitl.learner import Learner

    version = rows(
        engine, "SELECT name FROM model_versions WHERE checkpoint_uri = :u", u=LVM_TINY.resolve().as_uri()
    )[0][0]
    axis = np.zeros(EMBEDDING_DIM, np.float32)
    axis[0] = 1.0
    session = create_session(
        engine, HitlSessionCreate(owner="faults", concept="anything", model_version=version, name="all")
    )
    search = save_search(
        engine,
        SavedSearch(
            session_id=session.id,
            owner="faults",
            name="everything new",
            concept="anything",
            model_version=version,
            threshold=0.0,
            webhook_url=webhook_url,
            learner=Learner("similarity", axis[None]).to_json(),
        ),
    )
    assert search.id is not None
    return search.id


_FAULT_LINE = re.compile(r"\bFAULT\b|database unavailable")
_RECOVERED_LINE = re.compile(r"\bRECOVERED\b")
#: what marks a line as the database's fault (the scheduler's faults are all the database's)
_DATABASE = re.compile(r"OperationalError|psycopg|database|scheduler")


@pytest.mark.timeout(3600)
# kafka-python drops the sockets of connections the restarted broker refused without closing them
@pytest.mark.filterwarnings("ignore:unclosed <socket:ResourceWarning")
def test_faults_lose_nothing_duplicate_nothing_and_heal(
    pipeline: Pipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    p = pipeline
    started = time.monotonic()
    summary = ""
    try:
        wait_until(
            p.sup.all_healthy, timeout_s=DEADLINE_S, what="every service healthy at start", interval_s=1.0
        )
        search_id = _saved_search(p.engine, f"{p.hook.url}/search")
        _alert_filter(p)
        # warm-up: the first tiles through every stage, then the steady stream runs throughout
        marks = p.begin("no fault (warm-up)")
        ids = p.stream.send(BURST)
        t0 = time.monotonic()
        wait_until(
            lambda: p.through(ids, ("detect", "watch", "notify", "filters")),
            timeout_s=DEADLINE_S,
            what="the warm-up through the pipeline",
        )
        p.rows.append(
            Row(
                "no fault (warm-up)",
                in_flight=BURST,
                recovery_s=None,
                note=f"{time.monotonic() - t0:.0f} s through",
            )
        )
        p.end("no fault (warm-up)", marks)
        p.stream.start()

        only = {k.strip() for k in os.environ.get("FAULTS_ONLY", "").split(",") if k.strip()}

        def wanted(key: str) -> bool:
            return not only or key in only

        if wanted("poison"):
            p.poison()
        for name in SERVICE_NAMES:
            if wanted(f"sigkill-{name}"):
                p.sigkill_scheduler_mid_job() if name == "scheduler" else p.sigkill(name)
        if wanted("sigkill-encode-written"):
            p.sigkill_after_write("encode")
        if wanted("broker"):
            p.broker_restart()
        if wanted("postgres"):
            p.postgres_outage()
        if wanted("store"):
            p.store_full()

        # the stream ends; everything published must come through
        p.stream.phase = "tail (after the faults)"
        p.stream.send(1)
        p.stream.stop()
        everything = p.stream.ids()
        t_end = time.monotonic()
        p.settle(
            lambda: p.through(everything, ("detect", "watch", "notify", "filters")),
            "every published tile through the pipeline",
            since=t_end,
        )
        p.settle(
            lambda: (
                scalar(
                    p.engine,
                    "SELECT count(*) FROM search_notifications WHERE webhook_state IS DISTINCT FROM 'sent' "
                    "AND saved_search_id = :s",
                    s=search_id,
                )
                == 0
                and scalar(p.engine, "SELECT count(*) FROM alert_deliveries WHERE state <> 'sent'") == 0
                and scalar(
                    p.engine,
                    "SELECT count(*) FROM filter_matches WHERE topic_state <> 'published' "
                    "OR webhook_state IS DISTINCT FROM 'sent'",
                )
                == 0
            ),
            "every webhook call made",
            since=t_end,
        )
        p.settle(p.sup.all_healthy, "every service healthy at the end", since=t_end)
        verdict = p.verdict(search_id)
        for row in p.rows:
            row.lost = verdict["lost"].get(row.fault, 0)
            row.duplicated = verdict["dup"].get(row.fault, 0)
        if p.killed_run is not None:
            # the scheduler's row counts job runs, not tiles
            jobs = next(r for r in p.rows if r.fault.startswith("SIGKILL scheduler"))
            jobs.lost += int(not p.reruns())
            jobs.duplicated += p.job_overlaps()
            if jobs.lost or jobs.duplicated:
                p.problems.setdefault(jobs.fault, []).append(
                    f"retrain run {p.killed_run} killed: reruns {p.reruns()}, {p.job_overlaps()} overlapping"
                )
        tail = "tail (after the faults)"
        p.rows.append(Row(tail, lost=verdict["lost"].get(tail, 0), duplicated=verdict["dup"].get(tail, 0)))
        for row in p.rows:
            published = len(p.stream.ids(row.fault))
            row.note = (row.note + "; " if row.note else "") + f"{published} published"
        summary = table(p.rows)
    finally:
        if not summary and p.rows:
            summary = table(p.rows) + "\n(incomplete: the suite failed before its end)"
        with capsys.disabled():
            print(
                f"\n\nfault-injection summary ({time.monotonic() - started:.0f} s, {len(p.stream.ids())} tiles):"
            )
            print(summary or "(no fault ran)")
            print()

    # -- what must hold ---------------------------------------------------------------------------
    problems = p.problems
    assert not p.unsettled, f"did not recover: {p.unsettled}; lost/duplicated: {problems}"
    assert sum(r.lost for r in p.rows) == 0, f"lost tiles: {problems}"
    assert sum(r.duplicated for r in p.rows) == 0, f"duplicated tiles: {problems}"
    assert not p.stream.errors or all("Kafka" in e or "Timeout" in e for e in p.stream.errors)
    # every bad message is in tiles.dead with its reason, and nothing else is
    letters = dead_letters(p.settings)
    got: dict[tuple[str, str], set[str]] = {}
    for d in letters:
        got.setdefault((d["stage"], (d["key"] or b"").decode()), set()).add(d["reason"])
    want = {(stage, bad.key): {reason} for bad in p.poisoned for stage, reason in bad.expect.items()}
    for _, key in [k for k in want if k[0] == ANY_STAGE]:
        # a topic whose consumer the suite does not name: whichever stage it was, with the reason
        got = {(ANY_STAGE if k == key else s, k): r for (s, k), r in got.items()}
    assert got == want, f"dead letters {got} != expected {want}"  # (none expected without poison)
    # no webhook call posted twice (also for calls the verdict could not tie to a tile): an
    # interrupted call may come again, as the next attempt of the same id, which receivers drop
    assert not p.hook.attempt_repeats("delivery")
    assert not p.hook.attempt_repeats("notification")
    assert not p.hook.attempt_repeats("match")
    # every service healed without a human: none exited on its own, all answer 200
    assert p.sup.crashed() == {}, p.sup.tails()
    assert p.sup.all_healthy(), p.sup.tails()
    # slowing down, not crashing, while the database was away: the stages and the notifier said
    # so on /healthz, and each service logged one FAULT and one RECOVERED line, no more
    outage = f"PostgreSQL stopped {PG_OUTAGE_S:.0f} s"
    if outage in p.logs:
        down = p.unhealthy.get(outage, set())
        # ingest has the stream to store and the notifier polls the outbox: both must have noticed
        assert {"ingest", "notify"} <= down, down

        def outage_lines(name: str) -> tuple[list[str], list[str]]:
            # from the outage on, to now: a loop in back-off may say RECOVERED after the phase
            # (a rebalance after the broker's restart may still be logging its own pair)
            text = p.sup.log_text(name)[p.marks[outage][name] :]
            lines = [line for line in text.splitlines() if _DATABASE.search(line)]
            return (
                [line for line in lines if _FAULT_LINE.search(line)],
                [line for line in lines if _RECOVERED_LINE.search(line)],
            )

        def balanced() -> bool:
            return all(len(f) == len(r) for f, r in map(outage_lines, SERVICE_NAMES))

        # the last loops in back-off (up to 30 s between tries) come back on their own
        with contextlib.suppress(TimeoutError):
            wait_until(balanced, timeout_s=DEADLINE_S, what="every database fault recovered", interval_s=1.0)
        for name in SERVICE_NAMES:
            faults, recovered = outage_lines(name)
            # one loop per process, but the watcher and the filters have two (stage, webhook sender)
            most = 2 if name in ("watch", "filters") else 1
            assert len(faults) == len(recovered) <= most, (name, faults, recovered)
            assert name not in down or faults, (name, "answered 503 but logged no FAULT")
    store = "object store full (ENOSPC)"
    if p.store_mount is None and store in p.logs:
        assert "ingest" in p.unhealthy[store]
        assert "Errno 28" in p.logs[store]["ingest"], p.logs[store]["ingest"][-2000:]
