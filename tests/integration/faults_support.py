"""Helpers of the fault-injection suite (``test_faults.py``; not a test module).

Everything here drives real processes: the ``galsift`` services as subprocesses (a tiny
supervisor that restarts what it kills), a local webhook receiver, a publisher of real tiles, the
poison messages of every consumed topic, and the database and Kafka read-outs the suite checks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaConsumer, TopicPartition
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from deploy.cli import SERVICES
from galsift import messages
from galsift.kafka import make_producer
from galsift.settings import Settings
from ingest.readers import SurveyTile, read_tiles

#: the services of ``galsift up``, in its order (their metrics ports are ``base + index``)
SERVICE_NAMES = tuple(argv[0] for argv in SERVICES)
#: extra arguments the suite gives a service (a notifier polling faster than the default 2 s)
#: and claiming two deliveries a round, so that a killed notifier's claims come back after a
#: 42 s lease (2 x (5 + 1) + 30 s) instead of 150 s
SERVICE_ARGS: dict[str, list[str]] = {"notify": ["--poll", "0.5", "--timeout", "5", "--batch", "2"]}


# -- a local webhook ----------------------------------------------------------------------------
class Hook:
    """A local HTTP server recording every webhook call (alerts and saved-search notifications).

    Alerts are posted to ``<url>/alerts`` with ``X-Galsift-Delivery``; saved-search notifications
    to ``<url>/search`` with ``X-Galsift-Notification``; alert-filter matches to ``<url>/filter``
    with ``X-Galsift-Match``.
    """

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        #: path whose next call is held open (see :meth:`hold_next`)
        self._hold: str | None = None
        #: set when the held call has arrived (and is being held)
        self.held = threading.Event()
        self._release = threading.Event()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with hook._lock:
                    hook.calls.append(
                        {
                            "path": self.path,
                            "delivery": self.headers.get("X-Galsift-Delivery"),
                            "alert": self.headers.get("X-Galsift-Alert"),
                            "notification": self.headers.get("X-Galsift-Notification"),
                            "match": self.headers.get("X-Galsift-Match"),
                            "attempt": self.headers.get("X-Galsift-Attempt"),
                            "body": json.loads(body or b"{}"),
                        }
                    )
                    hold = (
                        hook._hold is not None and self.path.startswith(hook._hold) and not hook.held.is_set()
                    )
                    if hold:
                        hook.held.set()
                if hold:
                    # the call has arrived; its sender waits for the answer until released
                    hook._release.wait(timeout=600)
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the sender of a held call was killed while it waited

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="hook", daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def hold_next(self, path: str) -> None:
        """Hold the next call to ``path`` open (received, not answered) until :meth:`release`."""
        self._release.clear()
        self.held.clear()
        self._hold = path

    def release(self) -> None:
        """Answer the held call (if its sender is still there) and hold nothing more."""
        self._hold = None
        self._release.set()

    def counts(self, header: str) -> Counter[str]:
        """Calls per value of ``header`` (``delivery``, ``notification`` or ``match``)."""
        with self._lock:
            return Counter(str(c[header]) for c in self.calls if c[header] is not None)

    def attempt_repeats(self, header: str) -> Counter[str]:
        """Ids (``delivery`` or ``notification``) one of whose attempts (``X-Galsift-Attempt``)
        was posted more than once: what two senders or a replay would do. A new attempt of an
        interrupted call (the same id, the next attempt number) is at-least-once delivery, which
        the receiver drops by id, not a repeat."""
        with self._lock:
            per_attempt = Counter((c[header], c["attempt"]) for c in self.calls if c[header] is not None)
        return Counter(str(n) for (n, _), k in per_attempt.items() if k > 1)

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()


# -- the services and their supervisor ------------------------------------------------------------
def free_port_run(n: int) -> int:
    """The first of ``n`` consecutive free TCP ports, below the ephemeral range.

    Listeners chosen among ephemeral ports can be taken, between the choice and the bind, by any
    outgoing connection of this machine (Kafka and database clients make many).
    """
    import random

    for _ in range(200):
        base = random.randrange(20000, 32000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", p))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return base
    raise RuntimeError(f"no {n} consecutive free ports")


@dataclass
class Service:
    """One running service process and what the supervisor knows about it."""

    name: str
    port: int
    log: Path
    proc: subprocess.Popen[bytes]
    #: exits the supervisor did not cause (a service that crashed on its own)
    crashes: list[int] = field(default_factory=list)


class Supervisor:
    """Starts the ``galsift up`` services as subprocesses, kills and restarts them (as systemd would).

    Each service logs to ``<logs>/<name>.log`` (appended across restarts) and serves ``/healthz``
    on ``settings.metrics_port_base + index``, as under ``galsift up``.
    """

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.settings = settings
        self.logs = logs
        self.services: dict[str, Service] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def port(self, name: str) -> int:
        """The metrics port of ``name``."""
        return self.settings.metrics_port_base + SERVICE_NAMES.index(name)

    def start(self, name: str, **over: Any) -> Service:
        """Start (or restart) one service, with settings ``over`` changed for it."""
        from deploy.cli import service_command, service_env

        own = self.settings.model_copy(update={**over, "metrics_port": self.port(name)})
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                service_command([name, *SERVICE_ARGS.get(name, [])]),
                env=service_env(own),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        old = self.services.get(name)
        svc = Service(name, self.port(name), log, proc, crashes=old.crashes if old else [])
        self.services[name] = svc
        return svc

    def start_all(self) -> None:
        """Start every service."""
        for name in SERVICE_NAMES:
            self.start(name)

    def kill(self, name: str) -> None:
        """SIGKILL one service (its process group: a job it runs dies with it) and reap it."""
        proc = self.services[name].proc
        self.check()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)

    def check(self) -> None:
        """Record services that exited on their own and restart them (a supervisor's job)."""
        for name, svc in list(self.services.items()):
            code = svc.proc.poll()
            if code is not None:
                svc.crashes.append(code)
                self.start(name)

    def crashed(self) -> dict[str, list[int]]:
        """Services that exited without being killed, with their exit codes."""
        self.check()
        return {n: s.crashes for n, s in self.services.items() if s.crashes}

    def health(self, name: str, *, timeout_s: float = 2.0) -> int | None:
        """Health status of one service (200, 503), or None when it does not answer.

        ``/healthz`` on the service's metrics port, or Streamlit's own health endpoint for the
        dashboard (as ``galsift stack status`` asks them).
        """
        url = f"http://127.0.0.1:{self.port(name)}/healthz"
        if name == "dashboard":
            url = f"http://127.0.0.1:{self.settings.dashboard_port}/_stcore/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as err:
            return int(err.code)
        except (OSError, urllib.error.URLError):
            return None

    def all_healthy(self) -> bool:
        """Whether every service answers ``/healthz`` with 200 (restarting any that exited)."""
        self.check()
        return all(self.health(n) == 200 for n in SERVICE_NAMES)

    def log_text(self, name: str) -> str:
        """The whole log of one service (all its runs)."""
        try:
            return self.services[name].log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tails(self, lines: int = 25) -> str:
        """The last lines of every service's log (for failure messages)."""
        out = []
        for name in SERVICE_NAMES:
            out.append(f"--- {name}\n" + "\n".join(self.log_text(name).splitlines()[-lines:]))
        return "\n".join(out)

    def stop_all(self, *, grace_s: float = 60.0) -> dict[str, int | None]:
        """SIGTERM every service, SIGKILL what is left after ``grace_s``; their exit codes."""
        for svc in self.services.values():
            if svc.proc.poll() is None:
                with _suppress_lookup():
                    os.killpg(svc.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        codes: dict[str, int | None] = {}
        for name, svc in self.services.items():
            try:
                codes[name] = svc.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with _suppress_lookup():
                    os.killpg(svc.proc.pid, signal.SIGKILL)
                svc.proc.wait(timeout=30)
                codes[name] = None
        return codes


class _suppress_lookup:  # noqa: N801 - used like contextlib.suppress
    """``contextlib.suppress(ProcessLookupError)`` (a process group that is already gone)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], ProcessLookupError)  # type: ignore[arg-type]


# -- the stream of real tiles --------------------------------------------------------------------
def demo_tiles(repo_data: Path) -> list[SurveyTile]:
    """A few real tiles of each bundled set (JPEG composites and FITS flux), read once."""
    tiles = list(read_tiles([repo_data / "cfhtls_lens_candidates"], limit=6))
    tiles += list(read_tiles([repo_data / "gz_decals_examples"], limit=4))
    tiles += list(read_tiles([repo_data / "legacy_dr9_fits"], limit=2))
    return tiles


class Stream:
    """Publishes real tiles under fresh external ids: a steady trickle and bursts on demand.

    Every tile is tagged with the phase (fault) running when it was published, in its external id.
    """

    def __init__(
        self, settings: Settings, survey: str, sources: Sequence[SurveyTile], *, rate: float
    ) -> None:
        self.settings = settings
        self.survey = survey
        self.sources = list(sources)
        self.rate = rate
        self.phase = "warmup"
        #: tile id -> phase, of every tile whose publication the broker acknowledged
        self.published: dict[str, str] = {}
        self._seq = 0
        self._lock = threading.Lock()
        #: held while a send runs, so that :meth:`pause` can wait for it
        self._sending = threading.Lock()
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream", daemon=True)
        self._producer = make_producer(settings)
        self.errors: list[str] = []

    def _next(self) -> SurveyTile:
        with self._lock:
            self._seq += 1
            src = self.sources[self._seq % len(self.sources)]
            return replace(src, survey=self.survey, external_id=f"{self.phase}-{self._seq:04d}")

    def send(self, n: int = 1) -> list[str]:
        """Publish ``n`` tiles now (a burst) and wait for the broker's acknowledgement; their ids.

        While the broker is away the send is retried (the producer's own retries and a loop
        here): a survey's publisher keeps its tiles until they are acknowledged.
        """
        with self._sending:
            return self._send(n)

    def _send(self, n: int) -> list[str]:
        tiles = [self._next() for _ in range(n)]
        deadline = time.monotonic() + 240
        while True:
            try:
                futures = [
                    self._producer.send(
                        self.settings.topics.raw,
                        key=t.key,
                        value=t.encode(),
                        headers=messages.headers("tile"),
                    )
                    for t in tiles
                ]
                self._producer.flush(timeout=120)
                for fut in futures:
                    fut.get(timeout=120)
                break
            except Exception as exc:  # the broker restarting: publish again (same keys, same ids)
                if time.monotonic() > deadline:
                    raise
                self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(1.0)
        with self._lock:
            for t in tiles:
                self.published[t.tile_id] = self.phase
        return [t.tile_id for t in tiles]

    def _run(self) -> None:
        while not self._stop.wait(1.0 / self.rate):
            if not self._paused.is_set():
                try:
                    self.send(1)
                except Exception as exc:  # reported by the test; the stream goes on
                    self.errors.append(f"{type(exc).__name__}: {exc}")

    def pause(self) -> None:
        """Hold the trickle and disconnect (while the broker is taken away).

        kafka-python leaks the socket of every connection the broker refuses (closed only by the
        garbage collector, after the test); a publisher that waits instead of retrying leaks none.
        """
        self._paused.set()
        with self._sending:
            self._producer.close(timeout=30)

    def resume(self) -> None:
        """Reconnect and go on publishing."""
        with self._sending:
            self._producer = make_producer(self.settings)
        self._paused.clear()

    def start(self) -> Stream:
        """Start the steady trickle."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the trickle (if it runs) and close the producer."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=300)
        if not self._paused.is_set():
            self._producer.close(timeout=30)

    def ids(self, phase: str | None = None) -> list[str]:
        """Tile ids published (in ``phase`` when given)."""
        with self._lock:
            return [t for t, p in self.published.items() if phase is None or p == phase]


# -- poison ---------------------------------------------------------------------------------------
#: the stage of a dead letter the suite does not name (a topic whose consumer it does not know)
ANY_STAGE = "*"


@dataclass(frozen=True)
class Poison:
    """One bad message: where it goes, and the dead letter(s) it must produce."""

    topic: str
    key: str
    value: bytes | None
    headers: list[tuple[str, bytes]]
    #: consumer stage -> expected reason (a topic read by two groups gives two dead letters)
    expect: dict[str, str]


def poison_messages(settings: Settings, survey: str, good: SurveyTile, stored_uri: str) -> list[Poison]:
    """Bad messages for every topic a galsift stage consumes.

    ``alerts.lens`` has no consumer in galsift (the notifier works from the outbox), so nothing
    there can be dead-lettered; ``tiles.dead`` itself is never consumed.
    """
    t = settings.topics
    tile_h, acc_h, emb_h = (
        messages.headers("tile"),
        messages.headers("accepted"),
        messages.headers("embedded"),
    )
    rec = {**good.to_record(), "survey": survey}

    def tile(name: str, **over: Any) -> bytes:
        return messages.encode("tile", {**rec, "external_id": f"poison-{name}", **over})

    nan = good.pixels.astype(np.float32, copy=True)
    nan[0, 5, 5] = np.nan
    body = tile("template")
    accepted = {
        "tile_id": str(uuid.uuid4()),
        "survey": survey,
        "external_id": "poison-accepted",
        "ra": None,
        "dec": None,
        "healpix": None,
        "bands": list(good.bands),
        "shape": [int(n) for n in good.pixels.shape],
        "dtype": str(good.pixels.dtype),
        "pixels_uri": stored_uri,
        "checksum": "0" * 64,
    }
    both = {"detector": "identity", "watch": "identity"}
    # topics other stages consume (the suite knows no schema of theirs): plain garbage, which any
    # consumer must dead-letter as ``schema`` (its stage is checked as "any")
    known = {t.raw, t.accepted, t.embedded, t.dead, t.alerts}
    others = [
        Poison(topic, f"p/{name}-garbage", os.urandom(128), [], {ANY_STAGE: "schema"})
        for name, topic in t.model_dump().items()
        if topic not in known
    ]
    bad = [
        Poison(t.raw, "p/raw-truncated", body[: len(body) // 3], tile_h, {"ingest": "schema"}),
        Poison(t.raw, "p/raw-garbage", os.urandom(256), tile_h, {"ingest": "schema"}),
        Poison(t.raw, "p/raw-tombstone", None, tile_h, {"ingest": "schema"}),
        Poison(t.raw, "p/raw-wrong-schema", body, acc_h, {"ingest": "schema"}),
        Poison(t.raw, "p/raw-bands", tile("bands", bands=["g", "r"]), tile_h, {"ingest": "bands"}),
        Poison(t.raw, "p/raw-dec", tile("dec", dec=95.0), tile_h, {"ingest": "coordinates"}),
        Poison(
            t.raw,
            "p/raw-nan",
            tile(
                "nan",
                dtype="float32",
                pixels=messages.pack_pixels(nan, compression="none"),
            ),
            tile_h,
            {"ingest": "nonfinite"},
        ),
        Poison(t.accepted, "p/acc-garbage", os.urandom(200), acc_h, {"encoder": "schema"}),
        Poison(
            t.accepted,
            "p/acc-missing",
            messages.encode("accepted", {**accepted, "pixels_uri": stored_uri + ".missing"}),
            acc_h,
            {"encoder": "pixels"},
        ),
        Poison(
            t.accepted,
            "p/acc-checksum",
            messages.encode("accepted", accepted),
            acc_h,
            {"encoder": "pixels"},
        ),
        Poison(
            t.embedded,
            "p/emb-not-a-uuid",
            messages.encode("embedded", {"tile_id": "not-a-uuid", "model_version": "x", "dim": 256}),
            emb_h,
            both,
        ),
        Poison(t.embedded, "p/emb-garbage", os.urandom(64), emb_h, {"detector": "schema", "watch": "schema"}),
    ]
    return [*others, *bad]


def send_poison(settings: Settings, poison: Iterable[Poison]) -> None:
    """Publish the bad messages and wait for the broker's acknowledgement."""
    producer = make_producer(settings)
    try:
        futures = [
            producer.send(p.topic, key=p.key.encode(), value=p.value, headers=p.headers) for p in poison
        ]
        producer.flush(timeout=60)
        for fut in futures:
            fut.get(timeout=60)
    finally:
        producer.close(timeout=30)


def filter_messages(settings: Settings, topic: str) -> Counter[str]:
    """Messages per tile id on an alert filter's topic."""
    return Counter(
        str(messages.decode("filter_match", r.value, header=messages.header_value(r.headers))["tile_id"])
        for r in read_topic(settings, topic)
    )


def dead_letters(settings: Settings) -> list[dict[str, Any]]:
    """Every record of ``tiles.dead``, decoded."""
    out = []
    for r in read_topic(settings, settings.topics.dead):
        out.append(messages.decode("dead", r.value, header=messages.header_value(r.headers)))
    return out


# -- Kafka read-outs --------------------------------------------------------------------------------
def read_topic(settings: Settings, topic: str, *, timeout_s: float = 120.0) -> list[Any]:
    """Every record currently in ``topic``, from the beginning (no consumer group)."""
    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
    )
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(parts)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(parts)
        records: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in parts):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} to its end in {timeout_s} s")
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def group_lag(settings: Settings, group: str, topic: str) -> int:
    """Records of ``topic`` that consumer group ``group`` has not committed (its work in flight)."""
    from galsift.kafka import kafka_admin

    with kafka_admin(settings) as admin:
        committed = admin.list_group_offsets(group).get(group, {})
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=None)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        ends = consumer.end_offsets(parts)
    finally:
        consumer.close()
    done = {tp: meta.offset for tp, meta in committed.items() if tp.topic == topic and meta.offset >= 0}
    return int(sum(max(0, end - done.get(tp, 0)) for tp, end in ends.items()))


# -- database read-outs ----------------------------------------------------------------------------
def rows(engine: Engine, sql: str, **params: Any) -> list[Any]:
    """Rows of a query."""
    with engine.connect() as conn:
        return list(conn.execute(text(sql), params).all())


def scalar(engine: Engine, sql: str, **params: Any) -> int:
    """An integer from a query (0 while the database does not answer)."""
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(sql), params).scalar_one() or 0)
    except SQLAlchemyError:
        return 0


#: per stage, the SQL counting the given tiles that passed it (``:ids`` is a uuid[])
PASSED = {
    "ingest": "SELECT count(*) FROM tiles WHERE id = ANY(:ids)",
    "encode": "SELECT count(DISTINCT tile_id) FROM embeddings WHERE tile_id = ANY(:ids)",
    "detect": "SELECT count(DISTINCT tile_id) FROM detections WHERE detector = 'lens_finder' "
    "AND tile_id = ANY(:ids)",
    "watch": "SELECT count(DISTINCT tile_id) FROM search_notifications WHERE tile_id = ANY(:ids)",
    "filters": "SELECT count(DISTINCT tile_id) FROM filter_matches WHERE tile_id = ANY(:ids)",
    # scored, and either its lens score (the lens head's where it has one, as the detector's
    # alerts) below the alert threshold or its alert delivered
    "notify": "SELECT count(*) FROM (SELECT DISTINCT ON (d.tile_id) d.tile_id, d.score FROM detections d "
    "WHERE d.tile_id = ANY(:ids) AND d.detector IN ('lens_head', 'lens_finder') "
    "ORDER BY d.tile_id, d.detector = 'lens_head' DESC) d WHERE d.score < :thr OR EXISTS "
    "(SELECT 1 FROM alerts a JOIN alert_deliveries ad ON ad.alert_id = a.id "
    "WHERE a.tile_id = d.tile_id AND ad.state = 'sent')",
}
#: the alert threshold the suite runs with: every lens score above it alerts
ALERT_THRESHOLD = 1e-9


def passed(engine: Engine, stage: str, ids: Sequence[str]) -> int:
    """How many of ``ids`` have passed ``stage`` (0 while the database is away)."""
    return scalar(engine, PASSED[stage], ids=[uuid.UUID(i) for i in ids], thr=ALERT_THRESHOLD)


def wait_until(
    predicate: Callable[[], bool], *, timeout_s: float, what: str, interval_s: float = 0.2
) -> float:
    """Poll ``predicate`` until it holds; the seconds it took. Fails with ``what`` on the deadline."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)
    return time.monotonic() - started


# -- the summary -----------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the summary table."""

    fault: str
    in_flight: int = 0
    lost: int = 0
    duplicated: int = 0
    recovery_s: float | None = None
    note: str = ""


def table(rows_: Sequence[Row]) -> str:
    """The summary table printed at the end of the suite."""
    head = f"{'fault':<34} {'tiles in flight':>15} {'lost':>5} {'duplicated':>10} {'recovery (s)':>12}  note"
    lines = [head, "-" * len(head)]
    for r in rows_:
        rec = "-" if r.recovery_s is None else f"{r.recovery_s:.1f}"
        if r.recovery_s is None and r.fault.startswith(("SIGKILL", "Kafka", "PostgreSQL", "object")):
            rec = "-" if "NOT RUN" in r.note else "never"
        lines.append(f"{r.fault:<34} {r.in_flight:>15} {r.lost:>5} {r.duplicated:>10} {rec:>12}  {r.note}")
    return "\n".join(lines)
