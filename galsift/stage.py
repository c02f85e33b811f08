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
"""

from __future__ import annotations

import logging
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, ClassVar, Generic, TypeVar

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from sqlalchemy import Engine

from galsift import messages
from galsift.settings import Settings

log = logging.getLogger(__name__)

P = TypeVar("P")


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
    """A message to publish downstream once the batch is durable."""

    key: bytes | None
    value: dict[str, Any]


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


class Stage(ABC, Generic[P]):
    """Base class of ingest, encoder and detector services.

    Parameters
    ----------
    settings
        The process settings.
    engine
        SQLAlchemy engine of the galsift database (errors and counters are recorded there).
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

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        group_id: str | None = None,
        raise_exc: bool = False,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.group_id = group_id or self.name
        self.raise_exc = raise_exc
        self.counters = Counters()
        self._stop = False
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None
        self._last_stats = 0.0

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
        """Record rejected items in the database (the ``ingest_errors`` table)."""
        from db.repo import record_errors

        record_errors(self.engine, rejections)

    def record_stats(self) -> None:
        """Publish counters for operators and the dashboard (the ``stage_stats`` table)."""
        from db.repo import upsert_stage_stats

        upsert_stage_stats(self.engine, stage=self.name, worker=self.worker_id, counters=self.counters)

    # -- Kafka plumbing ------------------------------------------------------------------------
    @property
    def worker_id(self) -> str:
        """A name for this process within its consumer group."""
        import os
        import socket

        return f"{socket.gethostname()}:{os.getpid()}"

    def consumer(self) -> KafkaConsumer:
        """The consumer-group member; auto-commit is off, offsets are committed by :meth:`run_once`."""
        if self._consumer is None:
            self._consumer = KafkaConsumer(
                self.input_topic,
                bootstrap_servers=self.settings.bootstrap_servers,
                group_id=self.group_id,
                client_id=f"galsift-{self.name}",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_poll_records=self.settings.batch_size,
                # a batch on a slow CPU encoder can take minutes: stay in the group meanwhile
                max_poll_interval_ms=600_000,
                # but notice a crashed member within seconds, so its partitions move on quickly
                session_timeout_ms=10_000,
                heartbeat_interval_ms=3_000,
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
        idle_since = time.monotonic()
        batches = 0
        log.info(
            "%s starting: %s -> %s (group %s)", self.name, self.input_topic, self.output_topic, self.group_id
        )
        try:
            while not self._stop:
                n = self.run_once()
                if n:
                    batches += 1
                    idle_since = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                    break
                if max_batches is not None and batches >= max_batches:
                    break
        finally:
            self.close()
        return self.counters

    def run_once(self) -> int:
        """Consume, process, write, publish and commit one batch; return the records consumed."""
        consumer = self.consumer()
        polled = consumer.poll(
            timeout_ms=self.settings.batch_timeout_ms, max_records=self.settings.batch_size
        )
        records = [r for batch in polled.values() for r in batch]
        if not records:
            self._maybe_stats(force=False)
            return 0
        self.counters.consumed += len(records)
        prepared, rejections = self._prepare_all(records)
        outputs, write_rejections = self._write_with_retries(prepared, records)
        rejections.extend(write_rejections)
        self._publish(outputs, rejections)
        if rejections:
            self.record_rejections(rejections)
        # everything this batch produced is durable: now, and only now, move the offsets
        consumer.commit()
        self.counters.batches += 1
        self.counters.accepted += len(prepared) - len(write_rejections)
        self.counters.rejected += len(rejections)
        self._maybe_stats(force=True)
        return len(records)

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
            except Exception:
                if self.raise_exc:
                    raise
                self.counters.write_retries += 1
                log.exception("%s: batch write failed (attempt %d)", self.name, attempt + 1)
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
                    raise
                rejections.append(self._rejection_env(env, "write", f"{type(exc).__name__}: {exc}"))
        return outputs, rejections

    def _store_down(self, exc: Exception) -> bool:
        """Whether ``exc`` means the database or object store is unreachable (not the item's fault)."""
        from sqlalchemy.exc import InterfaceError, OperationalError

        return isinstance(exc, OperationalError | InterfaceError | ConnectionError | TimeoutError)

    def _publish(self, outputs: list[Output], rejections: list[Rejection]) -> None:
        if not outputs and not rejections:
            return
        producer = self.producer()
        futures = []
        if outputs:
            if self.output_topic is None or self.output_schema is None:
                raise RuntimeError(f"{self.name} produced outputs but has no output topic")
            for out in outputs:
                futures.append(
                    producer.send(
                        self.output_topic,
                        key=out.key,
                        value=messages.encode(self.output_schema, out.value),
                        headers=messages.headers(self.output_schema),
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
            fut.get(timeout=30)  # raise if the broker refused anything: then no commit happens

    def _rejection(self, rec: Any, reason: str, detail: str) -> Rejection:
        payload = rec.value if rec.value is not None else b""
        return Rejection(self.name, reason, detail, rec.topic, rec.partition, rec.offset, rec.key, payload)

    def _rejection_env(self, env: Envelope, reason: str, detail: str) -> Rejection:
        return Rejection(
            self.name, reason, detail, env.topic, env.partition, env.offset, env.key, env.payload
        )

    def _maybe_stats(self, *, force: bool) -> None:
        now = time.time()
        if not force and now - self._last_stats < 10:
            return
        if now - self._last_stats >= 5:
            self.counters.lag = self._lag()
        self._last_stats = now
        try:
            self.record_stats()
        except Exception:  # counters are for operators; never stop the stream for them
            log.warning("%s: could not record stats", self.name, exc_info=True)
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
        ends = consumer.end_offsets(list(assigned))
        return int(sum(max(0, ends[tp] - consumer.position(tp)) for tp in assigned))

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
        """Flush and close the Kafka clients."""
        if self._producer is not None:
            self._producer.flush()
            self._producer.close()
            self._producer = None
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
            self._consumer = None


def make_producer(settings: Settings) -> KafkaProducer:
    """A producer that waits for all in-sync replicas and retries without reordering."""
    return KafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        acks="all",
        linger_ms=20,
        retries=10,
        max_in_flight_requests_per_connection=1,
        max_request_size=16 * 1024 * 1024,
        compression_type=None,
    )
