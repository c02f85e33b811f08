"""The one consumer lifecycle every service stage shares.

A stage is a Kafka consumer-group member that loops over

    consume a batch -> decode each record -> prepare each item -> write the batch durably
    -> publish outputs and dead letters -> record errors and counters -> commit offsets

Subclasses implement :meth:`Stage.prepare` (per item; raising :class:`Rejected` sends that item
to the dead-letter topic) and :meth:`Stage.write` (per batch; must be an idempotent upsert).
Offsets are committed only after ``write`` returned and the producer flushed, so a crash
anywhere replays the batch and never loses it; idempotent writes make the replay harmless.
This follows ALeRCE's ``apf`` step (manual commits after output) and AMPEL's workers (an
exception for one item is recorded with context and the rest carry on; ``raise_exc`` makes tests
strict).

Faults of the things a stage depends on never kill it: a broker restart, a rebalance that makes
the commit fail (``CommitFailedError``), or a database that stops answering raise
:class:`Unavailable` out of :meth:`Stage.run_once`; :meth:`Stage.run` logs one line, drops the
consumer without committing, waits with back-off and joins the group again, which replays the
uncommitted batch (harmless: writes are upserts). One line is logged again on recovery.

A stage with ``overlap = True`` (ingest) runs the same lifecycle two batches deep: while a
writer thread writes and publishes batch N, the consumer thread polls and prepares batch N+1;
batch N's offsets are committed (explicitly, only N's) once its write and publish returned, so
the commit still follows durable output. Kafka's consumer is single-threaded: polls and commits
stay on the loop's thread, and only ``write``/``publish``/recording run on the writer.

The stage knows no table: rejections and counters go to a :class:`Recorder` (the database's,
``db.repo.DbRecorder``, in the services) as plain rows.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.errors import CommitFailedError, KafkaError

from galsift import messages, metrics
from galsift.kafka import check_accelerations, make_consumer, make_producer
from galsift.settings import Settings

log = logging.getLogger(__name__)

P = TypeVar("P")

#: errno values that mean the object store cannot take writes (replay later, never dead-letter)
_STORE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})


class Rejected(Exception):  # noqa: N818 - it names an outcome, like StopIteration
    """Raised by a stage for one item that can never succeed (bad input), with a reason class."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Envelope:
    """One consumed Kafka record and its decoded body."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    payload: bytes
    value: dict[str, Any]


class Unavailable(Exception):  # noqa: N818 - it names a state, like TimeoutError
    """A dependency (broker, database, object store) failed: the batch was not committed.

    The stage rejoins its group and replays the batch; nothing about the items is recorded.
    """


@dataclass(frozen=True)
class Rejection:
    """A rejected input, kept whole so nothing is lost."""

    stage: str
    reason: str
    detail: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    payload: bytes

    def as_row(self) -> dict[str, Any]:
        """The rejection as a plain row (the columns of the database's error table)."""
        return asdict(self)

    def as_message(self) -> dict[str, Any]:
        """The ``dead.v1`` record for the dead-letter topic."""
        return {
            "stage": self.stage,
            "reason": self.reason,
            "detail": self.detail[:4000],
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "key": self.key,
            "payload": self.payload,
        }


@dataclass(frozen=True)
class Output:
    """A message to publish downstream once the batch is durable.

    ``topic`` and ``schema`` default to the stage's :attr:`Stage.output_topic` and
    :attr:`Stage.output_schema`; a stage that feeds several topics (the detector: alerts and
    ``tiles.detected``) names them per message.
    """

    key: bytes | None
    value: dict[str, Any]
    topic: str | None = None
    schema: str | None = None


@dataclass
class Batch(Generic[P]):
    """One polled batch on its way through the lifecycle."""

    records: list[Any]
    prepared: list[tuple[Envelope, P]]
    rejections: list[Rejection]
    started: float
    #: items whose write failed alone (after isolation); part of ``rejections`` once written
    write_rejections: list[Rejection] = field(default_factory=list)

    def offsets(self) -> dict[TopicPartition, OffsetAndMetadata]:
        """The offsets that commit exactly this batch (the next offset of each partition)."""
        last: dict[TopicPartition, int] = {}
        for rec in self.records:
            tp = TopicPartition(rec.topic, rec.partition)
            last[tp] = max(last.get(tp, -1), rec.offset)
        return {tp: OffsetAndMetadata(offset + 1, "", -1) for tp, offset in last.items()}


@dataclass
class Counters:
    """Running totals a stage reports to the log and the ``stage_stats`` table."""

    consumed: int = 0
    accepted: int = 0
    rejected: int = 0
    batches: int = 0
    write_retries: int = 0
    lag: int = 0
    started_at: float = field(default_factory=time.time)

    def as_row(self, *, stage: str, worker: str) -> dict[str, Any]:
        """The counters as a plain row (the columns of the database's stage-stats table)."""
        return {
            "stage": stage,
            "worker": worker,
            "consumed": self.consumed,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "batches": self.batches,
            "lag": self.lag,
            "started_at": datetime.fromtimestamp(self.started_at, UTC),
            "updated_at": datetime.now(UTC),
        }


class Recorder(Protocol):
    """Where a stage records rejected items and its counters (the database, in the services)."""

    def record_errors(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Store rejections (rows from :meth:`Rejection.as_row`); replays must be harmless."""

    def record_stats(self, row: Mapping[str, Any]) -> None:
        """Store one worker's counters (a row from :meth:`Counters.as_row`)."""


class NullRecorder:
    """A recorder that keeps nothing (benchmarks and tests of the loop alone)."""

    def record_errors(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Drop the rows."""

    def record_stats(self, row: Mapping[str, Any]) -> None:
        """Drop the row."""


class Stage(ABC, Generic[P]):
    """Base class of ingest, encoder and detector services.

    Parameters
    ----------
    settings
        The process settings.
    recorder
        Where rejected items and counters are recorded (``db.repo.DbRecorder`` in the services).
    group_id
        Kafka consumer group; defaults to the stage name, so workers of one stage share the work.
    raise_exc
        Re-raise per-item exceptions instead of recording them (for tests).
    """

    #: stage name, used as consumer group, in logs and in error rows
    name: ClassVar[str]
    #: schema of the input topic's messages (a key of :mod:`galsift.messages`)
    input_schema: ClassVar[str]
    #: schema of the output topic's messages, or None for a stage without output topic
    output_schema: ClassVar[str | None] = None
    #: retries of a failing batch write before items are written one by one
    max_write_retries: ClassVar[int] = 3
    #: longest wait between attempts while a dependency is down
    max_backoff_s: ClassVar[float] = 30.0
    #: poll and prepare the next batch while this one is written (see the module docstring)
    overlap: ClassVar[bool] = False

    def __init__(
        self,
        settings: Settings,
        recorder: Recorder,
        *,
        group_id: str | None = None,
        raise_exc: bool = False,
    ) -> None:
        self.settings = settings
        self.recorder = recorder
        self.group_id = group_id or self.name
        self.raise_exc = raise_exc
        self.counters = Counters()
        self._stop = False
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None
        self._last_stats = self._last_lag = self._last_log = 0.0
        #: the fault being ridden out, if any (logged once when it starts and once when it ends)
        self._fault: str | None = None
        #: the fault was seen by recording stats while idle (a record that succeeds clears it)
        self._fault_from_stats = False
        self._fault_since = 0.0
        #: overlap mode: the batch being written on the writer thread
        self._inflight: tuple[Batch[P], Future[None]] | None = None
        self._writer: ThreadPoolExecutor | None = None

    # -- what a stage implements -------------------------------------------------------------
    @property
    @abstractmethod
    def input_topic(self) -> str:
        """Topic this stage consumes."""

    @property
    def output_topic(self) -> str | None:
        """Topic this stage publishes its outputs to, if any."""
        return None

    @abstractmethod
    def prepare(self, item: Envelope) -> P:
        """Validate and transform one item; raise :class:`Rejected` for bad input."""

    @abstractmethod
    def write(self, prepared: Sequence[tuple[Envelope, P]]) -> list[Output]:
        """Durably store a batch (idempotent upsert) and return the messages to publish."""

    def write_items(self, prepared: Sequence[tuple[Envelope, P]]) -> list[Output]:
        """Write a batch; the default hands it to :meth:`write`.

        Stages may override this to micro-batch (the encoder groups images for the device).
        """
        return self.write(prepared)

    def record_rejections(self, rejections: Sequence[Rejection]) -> None:
        """Record rejected items with the recorder."""
        self.recorder.record_errors([r.as_row() for r in rejections])

    def record_stats(self) -> None:
        """Publish counters for operators and the dashboard."""
        self.recorder.record_stats(self.counters.as_row(stage=self.name, worker=self.worker_id))

    # -- Kafka plumbing ------------------------------------------------------------------------
    @property
    def worker_id(self) -> str:
        """A name for this process within its consumer group."""
        return f"{socket.gethostname()}:{os.getpid()}"

    def consumer(self) -> KafkaConsumer:
        """The consumer-group member; auto-commit is off, offsets are committed by :meth:`run_once`."""
        if self._consumer is None:
            self._consumer = make_consumer(
                self.settings, self.input_topic, group_id=self.group_id, client_id=f"galsift-{self.name}"
            )
        return self._consumer

    def producer(self) -> KafkaProducer:
        """An idempotent, fully acknowledged producer for outputs and dead letters."""
        if self._producer is None:
            self._producer = make_producer(self.settings)
        return self._producer

    # -- the lifecycle -------------------------------------------------------------------------
    def run(self, *, max_batches: int | None = None, idle_exit_s: float | None = None) -> Counters:
        """Loop until stopped (SIGINT/SIGTERM), ``max_batches`` or ``idle_exit_s`` without input."""
        self._install_signal_handlers()
        check_accelerations()
        if self.settings.metrics_port is not None:
            port = metrics.serve(self.settings.metrics_port, host=self.settings.metrics_host)
            log.info(
                "%s metrics on http://%s:%d/metrics (health: /healthz)",
                self.name,
                self.settings.metrics_host,
                port,
            )
        metrics.HEALTH.ok(self.name)
        idle_since = time.monotonic()
        batches = 0
        backoff = 1.0
        log.info(
            "%s starting: %s -> %s (group %s)", self.name, self.input_topic, self.output_topic, self.group_id
        )
        try:
            while not self._stop:
                try:
                    n = self.step()
                except Unavailable as exc:
                    self._on_fault(exc)
                    self._sleep(backoff)
                    backoff = min(2 * backoff, self.max_backoff_s)
                    idle_since = time.monotonic()
                    continue
                if self._fault is not None and n:
                    self._recovered()
                    backoff = 1.0
                if n:
                    batches += 1
                    idle_since = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                    break
                if max_batches is not None and batches >= max_batches:
                    break
        finally:
            if self._inflight is not None:
                try:
                    self.settle()
                except Exception as exc:  # not committed: the group replays the batch
                    log.warning("%s: last batch not committed on exit: %s", self.name, exc)
            self.close()
        return self.counters

    def step(self) -> int:
        """One turn of the loop: :meth:`run_once`, or its overlapped form; records committed."""
        return self._step_overlapped() if self.overlap else self.run_once()

    def run_once(self) -> int:
        """Consume, process, write, publish and commit one batch; return the records consumed.

        Raises
        ------
        Unavailable
            When the broker, the database or the object store failed; nothing was committed.
        """
        batch = self._take(self.settings.batch_timeout_ms)
        if batch is None:
            self._maybe_stats(force=False)
            return 0
        self._finish(batch)
        return self._commit(batch, self.consumer().commit)

    def settle(self) -> int:
        """Wait for the batch on the writer thread (overlap mode) and commit it; records committed.

        Raises
        ------
        Unavailable
            When its write or publish failed; nothing was committed.
        """
        if self._inflight is None:
            return 0
        batch, done = self._inflight
        self._inflight = None
        done.result()  # the writer's Unavailable (or a bug) surfaces here, before any commit
        consumer = self.consumer()
        return self._commit(batch, lambda: consumer.commit(batch.offsets()))

    def _step_overlapped(self) -> int:
        # a short poll while a batch is in flight, so the last batch of a burst is committed at once
        timeout = (
            self.settings.batch_timeout_ms
            if self._inflight is None
            else min(100, self.settings.batch_timeout_ms)
        )
        batch = self._take(timeout)
        committed = self.settle()
        if batch is not None:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-writer")
            self._inflight = (batch, self._writer.submit(self._finish, batch))
        elif not committed:
            self._maybe_stats(force=False)
        return committed

    def _take(self, timeout_ms: int) -> Batch[P] | None:
        """Poll one batch and prepare its items (the consumer's thread)."""
        started = time.perf_counter()
        try:
            polled = self.consumer().poll(timeout_ms=timeout_ms, max_records=self.settings.batch_size)
        except KafkaError as exc:
            raise Unavailable(f"kafka poll: {type(exc).__name__}: {exc}") from exc
        records = [r for batch in polled.values() for r in batch]
        if not records:
            return None
        prepared, rejections = self._prepare_all(records)
        return Batch(records, prepared, rejections, started)

    def _finish(self, batch: Batch[P]) -> None:
        """Write the batch durably, publish its outputs and dead letters, record rejections."""
        outputs, batch.write_rejections = self._write_with_retries(batch.prepared, batch.records)
        batch.rejections.extend(batch.write_rejections)
        try:
            self._publish(outputs, batch.rejections)
        except KafkaError as exc:
            raise Unavailable(f"kafka produce: {type(exc).__name__}: {exc}") from exc
        if batch.rejections:
            try:
                self.record_rejections(batch.rejections)
            except Exception as exc:
                if self.raise_exc or not self._store_down(exc):
                    raise
                raise Unavailable(f"recording rejections: {type(exc).__name__}: {exc}") from exc

    def _commit(self, batch: Batch[P], commit: Callable[[], object]) -> int:
        """Move the offsets past a durable batch, then count it."""
        # everything this batch produced is durable: now, and only now, move the offsets
        try:
            commit()
        except CommitFailedError as exc:
            if not self.overlap:
                # the group forgot this member (rebalance, broker restart): rejoin and replay
                raise Unavailable(f"kafka commit: {type(exc).__name__}: {exc}") from exc
            # overlap mode polls between a batch's write and its commit, so a rebalance can come
            # in between; the batch is durable, the partitions' owner now replays it (upserts),
            # and this consumer is already in the new generation and goes on
            log.info("%s: a rebalance came before the commit; the partitions' owner replays it", self.name)
        except KafkaError as exc:
            raise Unavailable(f"kafka commit: {type(exc).__name__}: {exc}") from exc
        n, rejected, failed = len(batch.records), batch.rejections, batch.write_rejections
        accepted = len(batch.prepared) - len(failed)
        self.counters.consumed += n
        self.counters.batches += 1
        self.counters.accepted += accepted
        self.counters.rejected += len(rejected)
        self._count(n, accepted, rejected, time.perf_counter() - batch.started)
        self._maybe_stats(force=True)
        return n

    def _count(self, consumed: int, accepted: int, rejections: Sequence[Rejection], seconds: float) -> None:
        """Move the Prometheus counters of one committed batch."""
        metrics.CONSUMED.labels(self.name).inc(consumed)
        metrics.ACCEPTED.labels(self.name).inc(accepted)
        metrics.BATCHES.labels(self.name).inc()
        metrics.BATCH_SECONDS.labels(self.name).observe(seconds)
        for rej in rejections:
            metrics.REJECTED.labels(self.name, rej.reason).inc()

    def _prepare_all(self, records: Iterable[Any]) -> tuple[list[tuple[Envelope, P]], list[Rejection]]:
        prepared: list[tuple[Envelope, P]] = []
        rejections: list[Rejection] = []
        for rec in records:
            payload = rec.value if rec.value is not None else b""
            try:
                value = messages.decode(self.input_schema, payload, header=messages.header_value(rec.headers))
                env = Envelope(rec.topic, rec.partition, rec.offset, rec.key, payload, value)
                prepared.append((env, self.prepare(env)))
            except (Rejected, messages.MessageError) as exc:
                rejections.append(self._rejection(rec, exc.reason, exc.detail))
            except Exception as exc:
                if self.raise_exc:
                    raise
                log.exception(
                    "%s: unexpected error on %s[%d]@%d", self.name, rec.topic, rec.partition, rec.offset
                )
                rejections.append(self._rejection(rec, "error", f"{type(exc).__name__}: {exc}"))
        return prepared, rejections

    def _write_with_retries(
        self, prepared: list[tuple[Envelope, P]], records: list[Any]
    ) -> tuple[list[Output], list[Rejection]]:
        if not prepared:
            return [], []
        delay = 0.5
        for attempt in range(self.max_write_retries):
            try:
                return self.write_items(prepared), []
            except Rejected as exc:  # the whole batch is bad for one reason: isolate below
                log.warning("%s: batch write rejected (%s); isolating items", self.name, exc)
                break
            except Exception as exc:
                if self.raise_exc:
                    raise
                self.counters.write_retries += 1
                metrics.WRITE_RETRIES.labels(self.name).inc()
                # while a fault is being ridden out its FAULT line said it all: the replays of
                # every back-off round stay out of the log (one line per fault, not per attempt)
                (log.warning if self._fault is None else log.debug)(
                    "%s: batch write failed (attempt %d): %s: %s",
                    self.name,
                    attempt + 1,
                    type(exc).__name__,
                    str(exc).splitlines()[0][:300] if str(exc) else "",
                )
                if self._store_down(exc) and attempt == self.max_write_retries - 1:
                    # not the items' fault: replay the whole batch once the store is back
                    raise Unavailable(f"store: {type(exc).__name__}: {exc}") from exc
                time.sleep(delay)
                delay *= 2
        # AMPEL-style isolation: one poisonous item must not block its neighbours forever
        outputs: list[Output] = []
        rejections: list[Rejection] = []
        for env, item in prepared:
            try:
                outputs.extend(self.write_items([(env, item)]))
            except Rejected as exc:
                rejections.append(self._rejection_env(env, exc.reason, exc.detail))
            except Exception as exc:
                # a store that keeps failing is not bad input: stop without committing, replay later
                if self._store_down(exc):
                    raise Unavailable(f"store: {type(exc).__name__}: {exc}") from exc
                rejections.append(self._rejection_env(env, "write", f"{type(exc).__name__}: {exc}"))
        return outputs, rejections

    def _store_down(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the database or object store is unreachable (not the item's fault)."""
        from sqlalchemy.exc import InterfaceError, OperationalError

        if isinstance(exc, OperationalError | InterfaceError | ConnectionError | TimeoutError):
            return True
        # a full, read-only or failing disk is the store's fault, not the item's
        return isinstance(exc, OSError) and exc.errno in _STORE_ERRNOS

    def _on_fault(self, exc: Unavailable) -> None:
        """Log the fault once, drop the consumer without committing so the batch replays."""
        text = str(exc).splitlines()[0][:300]
        if self._fault is None:
            self._fault, self._fault_since = text, time.monotonic()
            metrics.HEALTH.fault(self.name, text)
            log.warning("%s FAULT, will retry and replay the uncommitted batch: %s", self.name, text)
        else:
            log.debug("%s still failing: %s", self.name, text)
        self._fault_from_stats = False  # the stream fails too: only a batch that goes through clears it
        self._drop_clients()

    def _recovered(self) -> None:
        """Leave the fault state: one RECOVERED line, healthy again."""
        since = time.monotonic() - self._fault_since
        log.warning("%s RECOVERED after %.1f s (%s)", self.name, since, self._fault)
        self._fault, self._fault_from_stats = None, False
        metrics.HEALTH.ok(self.name)

    def _drop_clients(self) -> None:
        """Close the Kafka clients without committing; the next batch makes new ones."""
        self._abandon_inflight()
        consumer, self._consumer = self._consumer, None
        producer, self._producer = self._producer, None
        if consumer is not None:
            with suppress(Exception):
                consumer.close(autocommit=False)
        if producer is not None:
            with suppress(Exception):
                producer.close(timeout=5)

    def _abandon_inflight(self) -> None:
        """Let the writer finish (or fail) before its clients go, without committing: it replays."""
        if self._inflight is not None:
            _, done = self._inflight
            self._inflight = None
            with suppress(Exception):
                done.result()

    def _sleep(self, seconds: float) -> None:
        """Wait, waking early when asked to stop."""
        deadline = time.monotonic() + seconds
        while not self._stop and time.monotonic() < deadline:
            time.sleep(min(0.2, seconds))

    def _publish(self, outputs: list[Output], rejections: list[Rejection]) -> None:
        if not outputs and not rejections:
            return
        producer = self.producer()
        futures = []
        for out in outputs:
            topic = out.topic or self.output_topic
            schema = out.schema or self.output_schema
            if topic is None or schema is None:
                raise RuntimeError(f"{self.name} produced an output without a topic or schema")
            futures.append(
                producer.send(
                    topic,
                    key=out.key,
                    value=messages.encode(schema, out.value),
                    headers=messages.headers(schema),
                )
            )
        for rej in rejections:
            futures.append(
                producer.send(
                    self.settings.topics.dead,
                    key=rej.key,
                    value=messages.encode("dead", rej.as_message()),
                    headers=messages.headers("dead"),
                )
            )
        producer.flush()
        for fut in futures:
            fut.get(timeout=120)  # raise if the broker refused anything: then no commit happens

    def _rejection(self, rec: Any, reason: str, detail: str) -> Rejection:
        payload = rec.value if rec.value is not None else b""
        return Rejection(self.name, reason, detail, rec.topic, rec.partition, rec.offset, rec.key, payload)

    def _rejection_env(self, env: Envelope, reason: str, detail: str) -> Rejection:
        return Rejection(
            self.name, reason, detail, env.topic, env.partition, env.offset, env.key, env.payload
        )

    def _maybe_stats(self, *, force: bool) -> None:
        """Record counters at most once a second while busy (``force``), every 10 s when idle.

        Recording after every batch cost a database round trip per batch; once a second keeps
        the operators' view fresh at any rate.
        """
        now = time.time()
        if now - self._last_stats < (1.0 if force else 10.0):
            return
        if now - self._last_lag >= 5:
            self.counters.lag = self._lag()
            metrics.LAG.labels(self.name).set(self.counters.lag)
            self._last_lag = now
        self._last_stats = now
        try:
            self.record_stats()
        except Exception as exc:  # counters are for operators; never stop the stream for them
            text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            if self._store_down(exc) and self._fault is None:
                # an idle stage touches the database only here: without this its /healthz would
                # say ok through an outage that its next batch will run into. It is the stream's
                # fault state (one FAULT line, one RECOVERED line), cleared by the next record
                # that succeeds or, if the stream fails too meanwhile, by its next batch
                self._fault, self._fault_since = f"database: {type(exc).__name__}: {text}", time.monotonic()
                self._fault_from_stats = True
                metrics.HEALTH.fault(self.name, self._fault)
                log.warning("%s FAULT while idle, recording its stats: %s", self.name, text)
            else:
                log.warning("%s: could not record stats: %s", self.name, text)
        else:
            if self._fault is not None and self._fault_from_stats:
                self._recovered()
        if now - self._last_log >= 10:
            self._last_log = now
            log.info(
                "%s stats consumed=%d accepted=%d rejected=%d lag=%d batches=%d",
                self.name,
                self.counters.consumed,
                self.counters.accepted,
                self.counters.rejected,
                self.counters.lag,
                self.counters.batches,
            )

    def _lag(self) -> int:
        consumer = self.consumer()
        assigned: set[TopicPartition] = consumer.assignment()
        if not assigned:
            return 0
        try:
            ends = consumer.end_offsets(list(assigned))
            return int(sum(max(0, ends[tp] - consumer.position(tp)) for tp in assigned))
        except KafkaError:  # a broker away for a moment: keep the last figure
            return self.counters.lag

    def stop(self, *_: Any) -> None:
        """Ask the loop to finish its current batch and exit."""
        self._stop = True

    def _install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("%s: signal %d, finishing the current batch", self.name, signum)
            self.stop()

        try:
            signal.signal(signal.SIGTERM, handler)
            signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread (tests run stages in threads)
            pass

    def close(self) -> None:
        """Flush and close the Kafka clients (an uncommitted in-flight batch is replayed later)."""
        self._abandon_inflight()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        if self._producer is not None:
            self._producer.flush()
            self._producer.close()
            self._producer = None
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
            self._consumer = None


__all__ = [
    "Batch",
    "Counters",
    "Envelope",
    "NullRecorder",
    "Output",
    "Recorder",
    "Rejected",
    "Rejection",
    "Stage",
    "Unavailable",
    "make_producer",
]
