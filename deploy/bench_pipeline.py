"""``galsift bench pipeline``: a burst (or a steady stream) of real-sized tiles through every stage.

What it does, on the running local stack (started when it is not running):

1. publishes N real 256×256×3 float32 Legacy Surveys tiles (the bundled ``legacy_dr9_fits`` by
   default, read by ``galsift publish`` once and republished under fresh ids, so every tile is
   new) to throw-away topics ``bench.<run>.*``, all at once (``--burst``) or at ``--rate`` per
   second, recording each tile's publish time;
2. runs every stage as ``galsift <command>`` subprocesses in consumer groups of their own
   (``ingest`` → ``encode`` → ``detect``, and the saved-search watcher ``watch`` when this
   installation has it), each with a Prometheus endpoint, and waits until their groups hold every
   partition before the first tile is published (model loading is not billed);
3. polls the database until every tile has its detection rows, sampling the groups' committed
   offsets meanwhile (the queue in front of each stage);
4. measures, in the same run after the stages stopped, the do-nothing consumer rate of each
   stage's input topic (kafka-python fetching the same messages with the stage's client settings
   and committing: the ceiling Kafka sets for that stage);
5. deletes its tiles (``db.repo.delete_surveys`` with the ``bench_<run>_`` prefix), their pixels and
   masks, its topics, groups and the workers' ``stage_stats`` rows (``--keep`` keeps them).

Per stage it reports the observed throughput (tiles over the time from its first input to its
last output), its capacity while busy (items over the batch time its Prometheus histogram
summed), the share of the drain it was busy, the deepest queue in front of it, and the latency of
its hop (p50/p95 from the upstream row's timestamp to its own); end to end, the latency from
publish to the first detection row (p50/p95/max) and the time the backlog took to drain. The
stage with the lowest capacity is where the pipeline bends first; the ceiling says whether Kafka
or the stage's own work is what bounds it.

``deploy`` imports no stage (import-linter): the stages are only started as commands and observed
through Kafka (offsets, topics) and the database (rows, timestamps), like an operator would.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import Engine, text

from galsift import messages
from galsift.kafka import ensure_topics, kafka_admin, make_consumer, make_producer
from galsift.settings import Settings, Topics

if TYPE_CHECKING:
    from kafka import KafkaConsumer

    from galsift.cli import CommandGroups

log = logging.getLogger(__name__)

#: the bundled real-sized tiles (3 Legacy Surveys DR9 grz cutouts, 256×256 float32); a data path,
#: not an import of the ingest package
DEFAULT_DATA = Path(__file__).resolve().parent.parent / "ingest" / "demo_tiles" / "legacy_dr9_fits"
#: longest wait for a stage's consumer group to hold every partition (model loading on a busy CPU)
READY_TIMEOUT_S = 300.0
#: how often the queue in front of each stage is sampled
SAMPLE_INTERVAL_S = 0.5
#: how long a worker gets to finish its batch after SIGTERM before it is killed
STOP_GRACE_S = 60.0


@dataclass(frozen=True)
class StageSpec:
    """One stage as the bench runs and observes it.

    Attributes
    ----------
    name : str
        The stage's name in its metrics and ``stage_stats`` rows (``Stage.name``).
    argv : tuple of str
        The ``galsift`` command that runs one worker.
    topic : str
        Field of :class:`galsift.settings.Topics` the stage consumes.
    table : str or None
        Table whose ``created_at``/``ingested_at`` marks the stage's output per tile; None for a
        stage that writes no row per tile (the watcher writes only matches).
    """

    name: str
    argv: tuple[str, ...]
    topic: str
    table: str | None


#: the stages in data-flow order; ``watch`` joins when the installation has it
STAGES: tuple[StageSpec, ...] = (
    StageSpec("ingest", ("ingest",), "raw", "tiles"),
    StageSpec("encoder", ("encode",), "accepted", "embeddings"),
    StageSpec("detector", ("detect",), "embedded", "detections"),
    StageSpec("watch", ("watch",), "embedded", None),
)


# -- command line ---------------------------------------------------------------------------------
def register(groups: CommandGroups) -> None:
    """Add ``galsift bench pipeline`` to the command line."""
    p = groups.bench.add_parser(
        "pipeline",
        help="a burst (or steady stream) of real-sized tiles through every stage: per-stage "
        "throughput, end-to-end latency, drain time, Kafka ceilings",
        description="Publish N real 256x256x3 float32 tiles under fresh ids to throw-away topics, run "
        "ingest, encode, detect (and watch) as subprocesses, and report per-stage throughput and "
        "capacity, the queue in front of each stage, end-to-end latency from publish to detection "
        "row, the drain time, and each input topic's do-nothing consumer rate measured in the same "
        "run. Starts the local stack if it is not running; cleans up after itself.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--burst", action="store_true", help="publish every tile at once (the default)")
    mode.add_argument(
        "--rate", type=_positive_float, metavar="PER_S", help="publish at a steady rate instead"
    )
    p.add_argument(
        "--tiles", type=_positive_int, default=300, metavar="N", help="tiles to publish (default: 300)"
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="dataset folder to take tiles from (default: the bundled legacy_dr9_fits, 256x256 grz)",
    )
    p.add_argument(
        "--workers", type=_positive_int, default=1, metavar="K", help="workers per stage (default: 1)"
    )
    p.add_argument("--no-watch", action="store_true", help="leave the saved-search watcher out")
    p.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        metavar="S",
        help="longest wait for the drain (default: 1800)",
    )
    p.add_argument("--keep", action="store_true", help="keep the bench tiles, topics and logs")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=_cmd)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _cmd(args: argparse.Namespace, settings: Settings) -> int:
    from deploy import stack

    try:
        stack.stack_up(settings)
    except stack.StackError as exc:
        print(f"galsift bench pipeline: {exc}", file=sys.stderr)
        return 1
    try:
        doc = bench_pipeline(
            settings,
            n=args.tiles,
            rate=args.rate,
            data=args.data or DEFAULT_DATA,
            workers=args.workers,
            watch=not args.no_watch,
            keep=args.keep,
            timeout_s=args.timeout,
        )
    except BenchError as exc:
        print(f"galsift bench pipeline: {exc}", file=sys.stderr)
        return 1
    print(format_table(doc))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


class BenchError(RuntimeError):
    """The benchmark could not run (a stage died, the drain timed out); the message says why."""


# -- consumer groups --------------------------------------------------------------------------------
def group_assignment(settings: Settings, group: str) -> dict[str, set[int]]:
    """Partitions held by each member of ``group`` (member id -> partitions), while it is Stable.

    Returns an empty dict while the group is rebalancing or empty, so a caller polling for a
    membership never mistakes a group in mid-rebalance for a settled one.
    """
    from kafka.errors import KafkaError

    try:
        with kafka_admin(settings) as admin:
            info = admin.describe_groups([group]).get(group) or {}
    except KafkaError as exc:
        # a fresh broker has no group coordinator until its offsets topic exists; a group that
        # cannot be described yet is simply not settled yet
        log.debug("describing group %s: %s", group, exc)
        return {}
    if info.get("group_state") != "Stable":
        return {}
    held: dict[str, set[int]] = {}
    for member in info.get("members") or []:
        parts: set[int] = set()
        for assigned in (member.get("member_assignment") or {}).get("assigned_partitions") or []:
            parts.update(int(p) for p in assigned.get("partitions") or [])
        held[str(member.get("member_id"))] = parts
    return held


def wait_for_group(
    settings: Settings,
    group: str,
    *,
    members: int,
    partitions: int,
    timeout_s: float = READY_TIMEOUT_S,
    alive: Sequence[subprocess.Popen[bytes]] = (),
    what: str = "",
) -> None:
    """Poll until ``group`` is Stable with ``members`` members holding all ``partitions``.

    Raises
    ------
    BenchError
        After ``timeout_s``, or as soon as one of the ``alive`` processes has exited.
    """
    deadline = time.monotonic() + timeout_s
    held: dict[str, set[int]] = {}
    while True:
        held = group_assignment(settings, group)
        covered = set().union(*held.values()) if held else set()
        if len(held) == members and covered == set(range(partitions)):
            return
        dead = [p for p in alive if p.poll() is not None]
        if dead:
            raise BenchError(f"{what or group}: a worker exited with status {dead[0].returncode}")
        if time.monotonic() > deadline:
            raise BenchError(
                f"{what or group}: group {group} did not settle with {members} member(s) on "
                f"{partitions} partitions in {timeout_s:.0f} s (has {len(held)}: {held})"
            )
        time.sleep(0.5)


def committed(settings: Settings, groups: Sequence[str], topics: Mapping[str, str]) -> dict[str, int]:
    """Offsets each group committed on its topic, summed over partitions (``topics``: group -> topic)."""
    out: dict[str, int] = {}
    with kafka_admin(settings) as admin:
        for group in groups:
            offsets = admin.list_group_offsets({group: None}).get(group, {})
            out[group] = sum(
                meta.offset for tp, meta in offsets.items() if tp.topic == topics[group] and meta.offset > 0
            )
    return out


# -- workers ----------------------------------------------------------------------------------------
@dataclass
class Worker:
    """One ``galsift`` stage process started by the bench."""

    spec: StageSpec
    group: str
    proc: subprocess.Popen[bytes]
    log_file: Path
    metrics_port: int

    @property
    def worker_id(self) -> str:
        """The worker's name in ``stage_stats`` (``Stage.worker_id``: host and pid)."""
        return f"{socket.gethostname()}:{self.proc.pid}"

    def tail(self, lines: int = 25) -> str:
        """The last lines of the worker's log."""
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def free_port() -> int:
    """A TCP port nothing listens on right now (for a worker's metrics endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_worker(settings: Settings, spec: StageSpec, *, group: str, log_file: Path) -> Worker:
    """Start one worker of ``spec`` in ``group`` as a ``galsift`` subprocess with these settings."""
    from deploy.cli import service_command, service_env

    port = free_port()
    env = service_env(settings.model_copy(update={"metrics_port": port, "metrics_host": "127.0.0.1"}))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        proc = subprocess.Popen(
            service_command([*spec.argv, "--group", group]),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # its own session: a Ctrl-C at the terminal reaches the bench, which stops it in order
            start_new_session=True,
        )
    log.info("started %s worker (pid %d) in group %s; log %s", spec.name, proc.pid, group, log_file)
    return Worker(spec=spec, group=group, proc=proc, log_file=log_file, metrics_port=port)


def stop_workers(workers: Sequence[Worker], *, grace_s: float = STOP_GRACE_S) -> dict[int, int | None]:
    """SIGTERM every worker, wait up to ``grace_s`` for them to commit and exit, then SIGKILL.

    Returns
    -------
    dict
        pid -> exit status.
    """
    for w in workers:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for w in workers:
        try:
            w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s worker %d did not stop in %.0f s; killing it", w.spec.name, w.proc.pid, grace_s)
            w.proc.kill()
            w.proc.wait()
    return {w.proc.pid: w.proc.returncode for w in workers}


def scrape(port: int, *, timeout_s: float = 5.0) -> dict[str, float]:
    """A worker's ``/metrics`` as ``{"<sample name>": value}`` summed over label sets.

    The bench reads ``galsift_consumed_total``, ``galsift_batches_total`` and
    ``galsift_batch_seconds_sum``; each worker runs one stage, so the labels add nothing.
    """
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as resp:
        body = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
    return out


def command_available(settings: Settings, argv: Sequence[str]) -> bool:
    """Whether ``galsift <argv…> --help`` works in this installation (``watch`` is optional)."""
    from deploy.cli import service_command, service_env

    proc = subprocess.run(
        service_command([*argv, "--help"]),
        env=service_env(settings),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
        timeout=120,
    )
    return proc.returncode == 0


# -- tiles ------------------------------------------------------------------------------------------
def seed_records(settings: Settings, data: Path, *, run: str) -> list[dict[str, Any]]:
    """The ``tile.v1`` records of the tiles in ``data``, read by ``galsift publish`` itself.

    ``deploy`` may not import the readers: ``galsift publish`` publishes ``data`` once to a seed
    topic of this run, and the records are read back from there, so the bench republishes
    exactly what a survey adapter would send.

    Raises
    ------
    BenchError
        If publishing fails or publishes nothing.
    """
    from deploy.cli import service_command, service_env

    seed_topic = f"bench.{run}.seed"
    seed_settings = settings.model_copy(
        update={"topics": settings.topics.model_copy(update={"raw": seed_topic})}
    )
    ensure_topics(seed_settings)
    proc = subprocess.run(
        service_command(["publish", "--survey", f"bench_{run}_seed", str(data)]),
        env=service_env(seed_settings),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if proc.returncode != 0:
        raise BenchError(
            f"galsift publish {data} failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}"
        )
    consumer = _reader(settings)
    try:
        records = [
            messages.decode("tile", r.value, header=messages.header_value(r.headers))
            for r in _read_all(consumer, seed_topic)
        ]
    finally:
        consumer.close()
    if not records:
        raise BenchError(f"no tiles under {data}")
    # the same order on every run (the seed topic has several partitions)
    return sorted(records, key=lambda r: str(r["external_id"]))


def _reader(settings: Settings) -> KafkaConsumer:
    """A consumer outside any group, for reading whole topics."""
    from kafka import KafkaConsumer

    return KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
    )


def _read_all(consumer: KafkaConsumer, topic: str, *, timeout_s: float = 120.0) -> list[Any]:
    """Every record now in ``topic``."""
    from kafka import TopicPartition

    parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
    consumer.assign(parts)
    consumer.seek_to_beginning()
    ends = consumer.end_offsets(parts)
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while any(consumer.position(tp) < ends[tp] for tp in parts):
        if time.monotonic() > deadline:
            raise BenchError(f"could not read {topic} to its end in {timeout_s:.0f} s")
        for batch in consumer.poll(timeout_ms=500).values():
            out.extend(batch)
    return out


@dataclass
class Published:
    """What the publisher sent: per tile id, the wall-clock time its message was handed to Kafka."""

    at: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    megabytes: float = 0.0

    @property
    def first(self) -> float:
        """When the first tile was published (epoch seconds)."""
        return min(self.at.values())


def publish(
    settings: Settings, seeds: Sequence[Mapping[str, Any]], *, n: int, survey: str, rate: float | None
) -> Published:
    """Publish ``n`` tiles cycling over ``seeds`` under fresh ids (``<id>~<k>`` in ``survey``).

    With ``rate`` None every tile is sent at once (the producer batches them); otherwise one
    every ``1/rate`` seconds on a fixed schedule, so a slow send does not lower the rate.
    """
    producer = make_producer(settings)
    out = Published()
    futures = []
    start = time.monotonic()
    try:
        for k in range(n):
            record = dict(seeds[k % len(seeds)])
            record["survey"] = survey
            record["external_id"] = f"{record['external_id']}~{k}"
            value = messages.encode("tile", record)
            if rate is not None:
                delay = start + k / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            out.at[messages.tile_id(survey, record["external_id"])] = time.time()
            futures.append(
                producer.send(
                    settings.topics.raw,
                    key=f"{survey}/{record['external_id']}".encode(),
                    value=value,
                    headers=messages.headers("tile"),
                )
            )
            out.megabytes += len(value) / 1e6
        producer.flush(timeout=300)
        for fut in futures:
            fut.get(timeout=300)  # a refused message is an error, never a silently short run
    finally:
        producer.close()
    out.seconds = time.monotonic() - start
    return out


# -- observation --------------------------------------------------------------------------------------
class QueueSampler:
    """Samples, in a thread, each group's committed offset and its topic's end offset.

    ``queue`` = end − committed is the backlog in front of a stage: where it grows, the
    pipeline bends. ``done`` is when a group had committed every one of ``n`` records.
    """

    def __init__(self, settings: Settings, topics: Mapping[str, str], *, n: int) -> None:
        self.settings = settings
        self.topics = dict(topics)
        self.n = n
        self.max_queue: dict[str, int] = dict.fromkeys(topics, 0)
        self.done: dict[str, float] = {}
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="queue-sampler", daemon=True)

    def start(self) -> QueueSampler:
        """Start sampling."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling and wait for the thread; raise what it raised."""
        self._stop.set()
        self._thread.join(30)
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        from kafka import TopicPartition
        from kafka.errors import KafkaError

        consumer = _reader(self.settings)
        try:
            parts = {
                topic: [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
                for topic in set(self.topics.values())
            }
            while not self._stop.is_set():
                now = time.time()
                try:
                    ends = consumer.end_offsets([tp for tps in parts.values() for tp in tps])
                    done = committed(self.settings, list(self.topics), self.topics)
                except KafkaError as exc:  # a coordinator moving: skip this sample
                    log.debug("queue sample skipped: %s", exc)
                    self._stop.wait(SAMPLE_INTERVAL_S)
                    continue
                end = {topic: sum(ends[tp] for tp in tps) for topic, tps in parts.items()}
                for group, topic in self.topics.items():
                    self.max_queue[group] = max(self.max_queue[group], end[topic] - done[group])
                    if done[group] >= self.n and group not in self.done:
                        self.done[group] = now
                self._stop.wait(SAMPLE_INTERVAL_S)
        except BaseException as exc:  # handed to the caller by stop()
            self.error = exc
        finally:
            consumer.close()


def tile_times(engine: Engine, survey: str) -> dict[str, tuple[float | None, float | None, float | None]]:
    """Per tile id: when its row was stored, its first embedding and its first detection (epoch s)."""
    sql = text(
        """
        SELECT t.id::text,
               extract(epoch FROM t.ingested_at),
               (SELECT extract(epoch FROM min(e.created_at)) FROM embeddings e WHERE e.tile_id = t.id),
               (SELECT extract(epoch FROM min(d.created_at)) FROM detections d WHERE d.tile_id = t.id)
        FROM tiles t WHERE t.survey = :s
        """
    )
    with engine.connect() as conn:
        rows = conn.execute(sql, {"s": survey}).all()

    def f(v: Any) -> float | None:
        return None if v is None else float(v)

    return {r[0]: (f(r[1]), f(r[2]), f(r[3])) for r in rows}


def detected(engine: Engine, survey: str) -> int:
    """Tiles of ``survey`` that have at least one detection row."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(DISTINCT d.tile_id) FROM detections d JOIN tiles t ON t.id = d.tile_id "
                    "WHERE t.survey = :s"
                ),
                {"s": survey},
            ).scalar_one()
        )


def ceiling(
    settings: Settings, topic: str, *, n: int, group: str, timeout_s: float = 600.0
) -> dict[str, Any]:
    """The do-nothing consumer rate of ``topic``: fetch ``n`` records in stage-sized batches and commit.

    The same client settings as every stage (:func:`galsift.kafka.make_consumer`), no decoding, no
    producing, no database: the rate Kafka and kafka-python allow a stage on this topic.
    """
    consumer = make_consumer(settings, topic, group_id=group)
    try:
        deadline = time.monotonic() + 60
        # join the group and rewind first, so group set-up is not billed to the first batch
        while not consumer.assignment():
            if time.monotonic() > deadline:
                raise BenchError(f"ceiling consumer on {topic} got no partitions within 60 s")
            consumer.poll(timeout_ms=200, max_records=1)
        consumer.seek_to_beginning()
        lat: list[float] = []
        got = 0
        nbytes = 0
        deadline = time.monotonic() + timeout_s
        while got < n:
            if time.monotonic() > deadline:
                raise BenchError(f"ceiling consumer read only {got} of {n} records of {topic}")
            t0 = time.perf_counter()
            polled = consumer.poll(timeout_ms=settings.batch_timeout_ms, max_records=settings.batch_size)
            records = [r for batch in polled.values() for r in batch]
            if records:
                consumer.commit()
                lat.append(time.perf_counter() - t0)
                got += len(records)
                nbytes += sum(len(r.value or b"") for r in records)
    finally:
        consumer.close(autocommit=False)
    total = float(sum(lat))
    ms = np.asarray(lat) * 1000.0
    return {
        "n": got,
        "rows_per_call": round(got / len(lat), 1),
        "calls": len(lat),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "per_s": round(got / total, 1) if total > 0 else None,
        "mb_per_s": round(nbytes / 1e6 / total, 1) if total > 0 else None,
    }


def _pct(values_s: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values_s) * 1000.0, q)), 1) if len(values_s) else None


# -- the benchmark ----------------------------------------------------------------------------------
def bench_settings(settings: Settings, run: str) -> Settings:
    """Settings of one bench run: topics of its own and no webhooks (no bench alert leaves the host)."""
    prefix = f"bench.{run}"
    topics = Topics(
        raw=f"{prefix}.raw",
        accepted=f"{prefix}.accepted",
        dead=f"{prefix}.dead",
        embedded=f"{prefix}.embedded",
        alerts=f"{prefix}.alerts",
    )
    return settings.model_copy(update={"topics": topics, "alert_webhooks": [], "metrics_port": None})


def bench_pipeline(
    settings: Settings,
    *,
    n: int = 300,
    rate: float | None = None,
    data: Path = DEFAULT_DATA,
    workers: int = 1,
    watch: bool = True,
    keep: bool = False,
    timeout_s: float = 1800.0,
) -> dict[str, Any]:
    """Run the pipeline benchmark on a running stack and return the ``--json`` document.

    Parameters
    ----------
    settings
        Settings of a running stack (``galsift stack up``).
    n
        Tiles to publish.
    rate
        Tiles per second of a steady stream; None publishes all ``n`` at once (a burst).
    data
        Dataset folder the tiles are taken from (cycled, under fresh ids).
    workers
        Workers per stage, each a consumer-group member.
    watch
        Also run the saved-search watcher (when ``galsift watch`` exists).
    keep
        Keep the tiles, topics and groups for inspection.
    timeout_s
        Longest wait for every tile to reach the detections table.

    Raises
    ------
    BenchError
        When a stage dies, a group does not settle, or the drain times out.
    """
    from db.engine import get_engine

    run = uuid.uuid4().hex[:8]
    bset = bench_settings(settings, run)
    survey = f"bench_{run}_tiles"
    engine = get_engine(settings)
    load_start = os.getloadavg()
    specs = [s for s in STAGES if s.name != "watch" or (watch and command_available(bset, s.argv))]
    groups = {s.name: f"bench-{run}-{s.name}" for s in specs}
    topic_of = {s.name: getattr(bset.topics, s.topic) for s in specs}
    logs_dir = settings.data_dir / "logs" / f"bench-{run}"
    running: list[Worker] = []
    try:
        ensure_topics(bset)
        partitions = bset.kafka_partitions
        seeds = seed_records(bset, data, run=run)
        for spec in specs:
            for i in range(workers):
                running.append(
                    start_worker(
                        bset, spec, group=groups[spec.name], log_file=logs_dir / f"{spec.name}-{i}.log"
                    )
                )
        for spec in specs:
            wait_for_group(
                bset,
                groups[spec.name],
                members=workers,
                partitions=partitions,
                alive=[w.proc for w in running],
                what=f"{spec.name} workers",
            )
        log.info("all %d workers in their groups; publishing %d tiles", len(running), n)
        sampler = QueueSampler(bset, {groups[s.name]: topic_of[s.name] for s in specs}, n=n).start()
        try:
            pub = publish(bset, seeds, n=n, survey=survey, rate=rate)
            _wait_drained(engine, survey, n=n, running=running, timeout_s=timeout_s)
            # the watcher has no row per tile: its committed offsets say when it is through
            if "watch" in groups:
                _wait_until(lambda: groups["watch"] in sampler.done, timeout_s=timeout_s, running=running)
        finally:
            sampler.stop()
        metrics = _settled_metrics(running, specs, n=n, timeout_s=120)
        stop_workers(running)
        times = tile_times(engine, survey)
        model_versions = _model_versions(engine, survey)
        alerts = _alert_count(engine, survey)
        ceilings = {
            topic: ceiling(bset, topic, n=n, group=f"bench-{run}-ceiling-{i}")
            for i, topic in enumerate(dict.fromkeys(topic_of.values()))
        }
    finally:
        stop_workers(running)
        if not keep:
            _clean(settings, engine, run=run, workers=running)
        engine.dispose()
    results = _results(
        specs=specs,
        workers=workers,
        pub=pub,
        times=times,
        done={s.name: sampler.done.get(groups[s.name]) for s in specs},
        max_queue={s.name: sampler.max_queue[groups[s.name]] for s in specs},
        metrics={s.name: [metrics[w.proc.pid] for w in running if w.spec.name == s.name] for s in specs},
        ceilings={s.name: ceilings[topic_of[s.name]] for s in specs},
        topics={s.name: s.topic for s in specs},
        n=n,
    )
    if not keep:  # a failed run keeps its workers' logs: the error names them
        shutil.rmtree(logs_dir, ignore_errors=True)
    return {
        "command": "bench pipeline",
        "data": str(data),
        "model_version": ", ".join(model_versions) or None,
        "mode": "burst" if rate is None else f"steady {rate:g}/s",
        "machine": _machine(settings, load_start),
        "settings": {
            "batch_size": settings.batch_size,
            "encode_batch": settings.encode_batch,
            "kafka_partitions": settings.kafka_partitions,
            "workers_per_stage": workers,
            "device": settings.device,
        },
        "alerts": alerts,
        "verdict": verdict(results),
        "results": results,
    }


def _wait_until(
    pred: Callable[[], bool], *, timeout_s: float, running: Sequence[Worker], what: str = "the watcher"
) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        _check_alive(running)
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


def _wait_drained(
    engine: Engine, survey: str, *, n: int, running: Sequence[Worker], timeout_s: float
) -> None:
    """Poll the database until every tile has a detection row."""
    deadline = time.monotonic() + timeout_s
    next_log = time.monotonic() + 10
    while True:
        got = detected(engine, survey)
        if got >= n:
            return
        _check_alive(running)
        if time.monotonic() > deadline:
            raise BenchError(f"only {got} of {n} tiles reached the detections table in {timeout_s:.0f} s")
        if time.monotonic() > next_log:
            log.info("%d of %d tiles detected", got, n)
            next_log += 10
        time.sleep(0.5)


def _settled_metrics(
    running: Sequence[Worker], specs: Sequence[StageSpec], *, n: int, timeout_s: float
) -> dict[int, dict[str, float]]:
    """Every worker's metrics once each stage counted all ``n`` items.

    A stage writes its rows, then publishes, commits and only then counts the batch: scraped the
    moment the last detection row appears, the detector's last batch (possibly most of a burst)
    would be missing from its batch time and its capacity.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = {w.proc.pid: scrape(w.metrics_port) for w in running}
        short = [
            s.name
            for s in specs
            if sum(metrics[w.proc.pid].get("galsift_consumed_total", 0.0) for w in running if w.spec is s) < n
        ]
        if not short:
            return metrics
        _check_alive(running)
        if time.monotonic() > deadline:
            raise BenchError(f"{', '.join(short)} did not count all {n} items in {timeout_s:.0f} s")
        time.sleep(0.2)


def _check_alive(running: Sequence[Worker]) -> None:
    for w in running:
        if w.proc.poll() is not None:
            raise BenchError(
                f"{w.spec.name} worker (pid {w.proc.pid}) exited with status {w.proc.returncode}; "
                f"last lines of {w.log_file}:\n{w.tail()}"
            )


def _results(
    *,
    specs: Sequence[StageSpec],
    workers: int,
    pub: Published,
    times: Mapping[str, tuple[float | None, float | None, float | None]],
    done: Mapping[str, float | None],
    max_queue: Mapping[str, int],
    metrics: Mapping[str, Sequence[Mapping[str, float]]],
    ceilings: Mapping[str, Mapping[str, Any]],
    topics: Mapping[str, str],
    n: int,
) -> list[dict[str, Any]]:
    """Flat rows: publish, one per stage, one ceiling per stage, end to end."""
    t0 = pub.first
    rows: list[dict[str, Any]] = [
        {
            "model": "publish",
            "stage": "publish",
            "n": n,
            "seconds": round(pub.seconds, 2),
            "per_s": round(n / pub.seconds, 1) if pub.seconds > 0 else None,
            "mb_per_s": round(pub.megabytes / pub.seconds, 1) if pub.seconds > 0 else None,
        }
    ]
    # per tile: (input available, output) of each stage with a row per tile
    hop: dict[str, list[tuple[float | None, float | None]]] = {
        "ingest": [(pub.at[tid], t[0]) for tid, t in times.items() if tid in pub.at],
        "encoder": [(t[0], t[1]) for t in times.values()],
        "detector": [(t[1], t[2]) for t in times.values()],
    }
    firsts = {
        "ingest": t0,
        "encoder": min((t[0] for t in times.values() if t[0] is not None), default=None),
        "detector": min((t[1] for t in times.values() if t[1] is not None), default=None),
        "watch": min((t[1] for t in times.values() if t[1] is not None), default=None),
    }
    for spec in specs:
        pairs = [(a, b) for a, b in hop.get(spec.name, []) if a is not None and b is not None]
        last_out = max((b for _, b in pairs), default=None) if pairs else done.get(spec.name)
        first_in = firsts[spec.name]
        span = (last_out - first_in) if last_out is not None and first_in is not None else None
        consumed = sum(m.get("galsift_consumed_total", 0.0) for m in metrics[spec.name])
        batch_s = sum(m.get("galsift_batch_seconds_sum", 0.0) for m in metrics[spec.name]) / max(1, workers)
        lat = [max(0.0, b - a) for a, b in pairs]
        rows.append(
            {
                "model": f"{spec.name}_stage",
                "stage": spec.name,
                "topic": topics[spec.name],
                "workers": workers,
                "n": n,
                "first_s": round(first_in - t0, 2) if first_in is not None else None,
                "done_s": round(last_out - t0, 2) if last_out is not None else None,
                "per_s": round(n / span, 1) if span and span > 0 else None,
                "busy_per_s": round(consumed / batch_s, 1) if batch_s > 0 else None,
                # the first batch's poll starts before its input exists, so the sum can exceed
                # the span by a poll timeout: busy is at most all of it
                "busy_fraction": round(min(1.0, batch_s / span), 2) if span and span > 0 else None,
                "batches": int(sum(m.get("galsift_batches_total", 0.0) for m in metrics[spec.name])),
                "max_queue": max_queue[spec.name],
                "p50_ms": _pct(lat, 50),
                "p95_ms": _pct(lat, 95),
            }
        )
    for spec in specs:
        rows.append(
            {
                "model": "kafka_raw_consume",
                "stage": spec.name,
                "topic": topics[spec.name],
                **ceilings[spec.name],
            }
        )
    e2e = [t[2] - pub.at[tid] for tid, t in times.items() if tid in pub.at and t[2] is not None]
    last = max(
        [t[2] for t in times.values() if t[2] is not None] + [d for d in done.values() if d is not None],
        default=t0,
    )
    drain = last - t0
    rows.append(
        {
            "model": "end_to_end",
            "stage": "publish_to_detection",
            "n": len(e2e),
            "p50_ms": _pct(e2e, 50),
            "p95_ms": _pct(e2e, 95),
            "max_ms": round(max(e2e) * 1000.0, 1) if e2e else None,
            "drain_s": round(drain, 2),
            "per_s": round(n / drain, 1) if drain > 0 else None,
        }
    )
    return rows


def verdict(results: Sequence[Mapping[str, Any]]) -> str:
    """Which stage bends first, and whether Kafka or the stage's own work bounds it."""
    stages = [r for r in results if str(r["model"]).endswith("_stage") and r.get("busy_per_s")]
    if not stages:
        return "no stage reported its batch times"
    worst = min(stages, key=lambda r: float(r["busy_per_s"]))
    ceil = next(
        (r for r in results if r["model"] == "kafka_raw_consume" and r["stage"] == worst["stage"]), None
    )
    others = ", ".join(f"{r['stage']} {r['busy_per_s']:g}/s" for r in stages if r is not worst)
    text_ = (
        f"{worst['stage']} bends first: {worst['busy_per_s']:g} tiles/s while busy "
        f"(busy {worst['busy_fraction']:.0%} of its span, queue up to {worst['max_queue']} tiles; "
        f"others while busy: {others})"
    )
    if ceil is not None and ceil.get("per_s"):
        ratio = float(ceil["per_s"]) / float(worst["busy_per_s"])
        bound = "its own work (not Kafka)" if ratio >= 2 else "Kafka fetching as much as its own work"
        text_ += (
            f"; the do-nothing consumer of its topic reads {ceil['per_s']:g}/s ({ratio:.1f}x), so it is "
            f"bound by {bound}"
        )
    return text_


def _model_versions(engine: Engine, survey: str) -> list[str]:
    with engine.connect() as conn:
        return [
            str(v)
            for v in conn.execute(
                text(
                    "SELECT DISTINCT e.model_version FROM embeddings e JOIN tiles t ON t.id = e.tile_id "
                    "WHERE t.survey = :s ORDER BY 1"
                ),
                {"s": survey},
            ).scalars()
        ]


def _alert_count(engine: Engine, survey: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM alerts a JOIN tiles t ON t.id = a.tile_id WHERE t.survey = :s"),
                {"s": survey},
            ).scalar_one()
        )


def _machine(settings: Settings, load_start: tuple[float, float, float]) -> dict[str, Any]:
    """What ran the benchmark, and how busy the machine was (other work skews timings)."""
    model = platform.processor() or platform.machine()
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "load_avg_1m_start": round(load_start[0], 2),
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
        "device": settings.device,
    }


def _clean(settings: Settings, engine: Engine, *, run: str, workers: Sequence[Worker]) -> None:
    """Remove everything the run made: rows, pixels, masks, topics, groups, worker stats."""
    from db.repo import delete_stage_stats, delete_surveys
    from galsift.objectstore import ObjectStore

    try:
        delete_surveys(engine, prefix=f"bench_{run}_")
        for w in workers:
            delete_stage_stats(engine, stage=w.spec.name, worker=w.worker_id)
    except Exception as exc:  # clean-up must not hide the benchmark's own error
        log.warning("bench clean-up (database) failed: %s", exc)
    try:
        store = ObjectStore(settings.pixel_store_url)
        for top in ("tiles", "masks", "incoming"):
            for path in store.fs.glob(f"{store.root}/{top}/bench_{run}_*"):
                store.fs.rm(path, recursive=True)
    except Exception as exc:
        log.warning("bench clean-up (object store) failed: %s", exc)
    try:
        with kafka_admin(settings) as admin:
            prefix = f"bench.{run}."
            admin.delete_topics([t for t in admin.list_topics() if t.startswith(prefix)])
            names = [g["group_id"] if isinstance(g, Mapping) else g[0] for g in admin.list_groups()]
            mine = [g for g in names if str(g).startswith(f"bench-{run}-")]
            if mine:
                admin.delete_groups(mine)
    except Exception as exc:
        log.warning("bench clean-up (kafka) failed: %s", exc)


# -- output -----------------------------------------------------------------------------------------
def format_table(doc: Mapping[str, Any]) -> str:
    """The results as fixed-width tables, the verdict and the machine."""

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    rows = doc["results"]
    head = (
        f"{'stage':<10} {'topic':<9} {'wk':>3} {'n':>5} {'tiles/s':>8} {'busy/s':>8} {'busy':>5} "
        f"{'queue':>6} {'first s':>8} {'done s':>7} {'p50 ms':>8} {'p95 ms':>8} {'ceiling/s':>10}"
    )
    lines = [f"galsift bench pipeline ({doc['mode']}, model {doc['model_version']})", head, "-" * len(head)]
    ceilings = {r["stage"]: r for r in rows if r["model"] == "kafka_raw_consume"}
    for r in rows:
        if r["model"] == "publish":
            lines.append(
                f"{'publish':<10} {'raw':<9} {'-':>3} {r['n']:>5} {fmt(r['per_s']):>8} {'-':>8} {'-':>5} "
                f"{'-':>6} {'0.0':>8} {fmt(r['seconds']):>7} {'-':>8} {'-':>8} {'-':>10}"
            )
        elif str(r["model"]).endswith("_stage"):
            busy = f"{r['busy_fraction']:.0%}" if r.get("busy_fraction") is not None else "-"
            ceil = ceilings.get(r["stage"], {}).get("per_s")
            lines.append(
                f"{r['stage']:<10} {r['topic']:<9} {r['workers']:>3} {r['n']:>5} {fmt(r['per_s']):>8} "
                f"{fmt(r['busy_per_s']):>8} {busy:>5} {r['max_queue']:>6} {fmt(r['first_s']):>8} "
                f"{fmt(r['done_s']):>7} {fmt(r['p50_ms']):>8} {fmt(r['p95_ms']):>8} {fmt(ceil):>10}"
            )
    for r in rows:
        if r["model"] == "end_to_end":
            lines.append(
                f"\nend to end (publish -> first detection row), {r['n']} tiles: p50 {fmt(r['p50_ms'])} ms, "
                f"p95 {fmt(r['p95_ms'])} ms, max {fmt(r['max_ms'])} ms; backlog drained in "
                f"{fmt(r['drain_s'])} s ({fmt(r['per_s'])} tiles/s)"
            )
    lines.append("\nceilings (do-nothing consumer of each stage's input topic, same run):")
    seen: set[str] = set()
    for r in rows:
        if r["model"] == "kafka_raw_consume" and r["topic"] not in seen:
            seen.add(r["topic"])
            lines.append(
                f"  {r['topic']:<9} {fmt(r['per_s']):>8} records/s, {fmt(r.get('mb_per_s'))} MB/s, "
                f"{r['rows_per_call']} per batch, p50 {fmt(r['p50_ms'])} ms/batch"
            )
    m = doc["machine"]
    lines.append(f"\n{doc['verdict']}")
    lines.append(
        f"machine: {m['cpus']} CPUs ({m['cpu']}), device {m['device']}, load average "
        f"{m['load_avg_1m_start']} at start, {m['load_avg_1m_end']} at end; {doc['alerts']} alerts raised"
    )
    return "\n".join(lines)


__all__ = [
    "STAGES",
    "BenchError",
    "QueueSampler",
    "StageSpec",
    "Worker",
    "bench_pipeline",
    "bench_settings",
    "committed",
    "format_table",
    "group_assignment",
    "register",
    "scrape",
    "start_worker",
    "stop_workers",
    "verdict",
    "wait_for_group",
]
