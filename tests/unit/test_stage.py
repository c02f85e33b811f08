"""The stage lifecycle in isolation: commit only after durable output, per-item failure isolation.

Kafka is replaced by a narrow in-memory stand-in here (the integration tests use the real broker).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest

from galsift import messages
from galsift.settings import Settings
from galsift.stage import Envelope, NullRecorder, Output, Rejected, Rejection, Stage, Unavailable


@dataclass
class Rec:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


class FakeConsumer:
    def __init__(self, records: list[Rec]) -> None:
        self.records = records
        self.commits = 0
        self.refuse_commits = 0
        self.events: list[str] = []

    def poll(self, timeout_ms: int, max_records: int) -> dict[str, list[Rec]]:
        batch, self.records = self.records[:max_records], self.records[max_records:]
        if batch:
            self.events.append(f"poll {batch[0].offset}-{batch[-1].offset}")
        return {"tp": batch} if batch else {}

    def commit(self, offsets: dict[Any, Any] | None = None) -> None:
        if self.refuse_commits:
            self.refuse_commits -= 1
            # what kafka-python raises when the group forgot this member (rebalance, broker restart)
            from kafka.errors import CommitFailedError

            raise CommitFailedError("UnknownMemberIdError")
        self.commits += 1
        if offsets is None:
            self.events.append("commit")
        else:
            self.events.append(
                "commit " + ",".join(f"{tp.partition}:{o.offset}" for tp, o in offsets.items())
            )

    def assignment(self) -> set[Any]:
        return set()

    def close(self, autocommit: bool = True) -> None:
        self.events.append("close")


class FakeFuture:
    def get(self, timeout: float) -> None:
        return None


class FakeProducer:
    def __init__(self, events: list[str]) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.events = events

    def send(
        self, topic: str, *, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]
    ) -> FakeFuture:
        self.sent.append((topic, value))
        return FakeFuture()

    def flush(self) -> None:
        self.events.append("flush")

    def close(self, timeout: float | None = None) -> None:
        self.events.append("producer-close")


class Doubler(Stage[int]):
    """A toy stage over ``embedded`` messages: rejects dim < 0, fails writes on request."""

    name: ClassVar[str] = "doubler"
    input_schema: ClassVar[str] = "embedded"
    output_schema: ClassVar[str | None] = "embedded"
    max_write_retries: ClassVar[int] = 2

    def __init__(
        self, consumer: FakeConsumer, *, fail_writes: int = 0, poison: int | None = None, batch_size: int = 10
    ) -> None:
        super().__init__(Settings(batch_size=batch_size), NullRecorder())
        self._consumer = consumer  # type: ignore[assignment]
        self._producer = FakeProducer(consumer.events)  # type: ignore[assignment]
        self.events = consumer.events
        self.fail_writes = fail_writes
        self.poison = poison
        self.written: list[int] = []
        self.recorded: list[Rejection] = []

    @property
    def input_topic(self) -> str:
        return "in"

    @property
    def output_topic(self) -> str:
        return "out"

    def prepare(self, item: Envelope) -> int:
        dim = int(item.value["dim"])
        if dim < 0:
            raise Rejected("negative", f"dim {dim}")
        return dim

    def write(self, prepared: Sequence[tuple[Envelope, int]]) -> list[Output]:
        if self.fail_writes:
            self.fail_writes -= 1
            raise RuntimeError("database hiccup")
        if self.poison is not None and any(v == self.poison for _, v in prepared):
            raise ValueError("poisonous item")
        self.events.append("write")
        self.written.extend(v for _, v in prepared)
        return [
            Output(key=None, value={"tile_id": "t", "model_version": "m", "dim": 2 * v}) for _, v in prepared
        ]

    def record_rejections(self, rejections: Sequence[Rejection]) -> None:
        self.recorded.extend(rejections)

    def record_stats(self) -> None:
        pass


def _records(dims: list[int]) -> list[Rec]:
    return [
        Rec(
            "in",
            0,
            i,
            None,
            messages.encode("embedded", {"tile_id": "t", "model_version": "m", "dim": d}),
            messages.headers("embedded"),
        )
        for i, d in enumerate(dims)
    ]


@pytest.fixture(autouse=True)
def _no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("galsift.stage.time.sleep", lambda s: None)


def test_commit_comes_after_write_and_flush() -> None:
    consumer = FakeConsumer(_records([1, 2, 3]))
    stage = Doubler(consumer)
    assert stage.run_once() == 3
    assert consumer.events == ["poll 0-2", "write", "flush", "commit"]
    assert stage.written == [1, 2, 3]
    outs = [messages.decode("embedded", v)["dim"] for t, v in stage._producer.sent if t == "out"]  # type: ignore[union-attr]
    assert outs == [2, 4, 6]


def test_bad_items_are_rejected_and_the_rest_go_through() -> None:
    recs = _records([1, -1, 2])
    recs.append(Rec("in", 0, 3, b"k", b"\x00garbage", messages.headers("embedded")))
    recs.append(Rec("in", 0, 4, None, recs[0].value, [("schema", b"galsift.tile.v1")]))
    consumer = FakeConsumer(recs)
    stage = Doubler(consumer)
    stage.run_once()
    assert stage.written == [1, 2]
    reasons = sorted((r.offset, r.reason) for r in stage.recorded)
    assert reasons == [(1, "negative"), (3, "schema"), (4, "schema")]
    dead = [messages.decode("dead", v) for t, v in stage._producer.sent if t == stage.settings.topics.dead]  # type: ignore[union-attr]
    assert sorted(d["offset"] for d in dead) == [1, 3, 4]
    assert dead[0]["payload"]  # the raw bytes are kept for the operator
    assert consumer.commits == 1
    assert stage.counters.accepted == 2 and stage.counters.rejected == 3


def test_transient_write_failure_is_retried_before_commit() -> None:
    consumer = FakeConsumer(_records([5, 6]))
    stage = Doubler(consumer, fail_writes=1)
    stage.run_once()
    assert stage.written == [5, 6]
    assert stage.counters.write_retries == 1
    assert consumer.events[-1] == "commit"


def test_poisonous_item_is_isolated_after_retries() -> None:
    consumer = FakeConsumer(_records([1, 7, 2]))
    stage = Doubler(consumer, poison=7)
    stage.run_once()
    assert stage.written == [1, 2]
    assert [(r.offset, r.reason) for r in stage.recorded] == [(1, "write")]
    assert consumer.commits == 1


def test_store_outage_stops_without_commit() -> None:
    from sqlalchemy.exc import OperationalError

    consumer = FakeConsumer(_records([1, 2]))
    stage = Doubler(consumer)

    def down(prepared: Sequence[tuple[Envelope, int]]) -> list[Output]:
        raise OperationalError("INSERT", {}, ConnectionError("connection refused"))

    stage.write = down  # type: ignore[method-assign]
    with pytest.raises(Unavailable):
        stage.run_once()
    assert consumer.commits == 0
    assert stage.recorded == []  # the store's fault, not the items': nothing dead-lettered


def test_a_full_disk_is_an_outage_not_bad_input() -> None:
    import errno

    consumer = FakeConsumer(_records([1, 2]))
    stage = Doubler(consumer)

    def full(prepared: Sequence[tuple[Envelope, int]]) -> list[Output]:
        raise OSError(errno.ENOSPC, "No space left on device")

    stage.write = full  # type: ignore[method-assign]
    with pytest.raises(Unavailable):
        stage.run_once()
    assert consumer.commits == 0 and stage.recorded == []


def test_a_refused_commit_is_an_outage_and_the_batch_is_not_counted() -> None:
    consumer = FakeConsumer(_records([1, 2]))
    consumer.refuse_commits = 1
    stage = Doubler(consumer)
    with pytest.raises(Unavailable, match="commit"):
        stage.run_once()
    assert consumer.commits == 0
    assert stage.counters.batches == 0 and stage.counters.consumed == 0


def test_run_survives_a_refused_commit_rejoins_and_replays(caplog: pytest.LogCaptureFixture) -> None:
    """After a failed commit the consumer is dropped (no commit) and a new one replays the batch."""
    first = FakeConsumer(_records([1, 2]))
    first.refuse_commits = 1
    stage = Doubler(first)
    # the member that rejoins the group is handed the uncommitted batch again
    second = FakeConsumer(_records([1, 2]))
    stage.consumer = lambda: stage._consumer or second  # type: ignore[method-assign]
    producer = stage._producer
    stage.producer = lambda: producer  # type: ignore[method-assign,assignment,return-value]
    with caplog.at_level("WARNING", logger="galsift.stage"):
        stage.run(max_batches=1, idle_exit_s=5)
    assert "close" in first.events and first.commits == 0
    assert second.commits == 1
    assert stage.written == [1, 2, 1, 2]  # written twice: the replay (upserts make it harmless)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("FAULT" in m for m in lines) == 1 and sum("RECOVERED" in m for m in lines) == 1


def test_raise_exc_makes_unexpected_errors_loud() -> None:
    consumer = FakeConsumer(_records([1]))
    stage = Doubler(consumer)
    stage.raise_exc = True

    def boom(item: Envelope) -> int:
        raise KeyError("bug")

    stage.prepare = boom  # type: ignore[method-assign]
    with pytest.raises(KeyError):
        stage.run_once()
    assert consumer.commits == 0


def test_metrics_endpoint_counts_batches_and_reports_faults() -> None:
    """/metrics shows consumed/accepted/rejected and lag; /healthz is 503 during a fault, 200 after."""
    import urllib.error
    import urllib.request

    from galsift import metrics

    port = metrics.serve(0)

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def value(text: str, name: str, **labels: str) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith(f"{name}{{{want}}} "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    _, before = get("/metrics")
    stage = Doubler(FakeConsumer(_records([1, -2, 3])))
    assert stage.run_once() == 3
    _, after = get("/metrics")
    for name, delta, labels in [
        ("galsift_consumed_total", 3, {"service": "doubler"}),
        ("galsift_accepted_total", 2, {"service": "doubler"}),
        ("galsift_rejected_total", 1, {"service": "doubler", "reason": "negative"}),
        ("galsift_batches_total", 1, {"service": "doubler"}),
    ]:
        assert value(after, name, **labels) - value(before, name, **labels) == delta, name
    assert "galsift_consumer_lag" in after and "galsift_batch_seconds_bucket" in after

    # a refused commit is a fault: unhealthy until a batch goes through again
    first = FakeConsumer(_records([1]))
    first.refuse_commits = 1
    stage = Doubler(first)
    with pytest.raises(Unavailable):
        stage.run_once()
    stage._on_fault(Unavailable("kafka commit: CommitFailedError"))
    status, body = get("/healthz")
    assert status == 503 and "doubler: kafka commit" in body
    metrics.HEALTH.ok("doubler")
    assert get("/healthz") == (200, "ok\n")


class OverlappedDoubler(Doubler):
    overlap: ClassVar[bool] = True


def test_overlap_polls_the_next_batch_before_committing_exactly_the_written_one() -> None:
    consumer = FakeConsumer(_records(list(range(7))))
    stage = OverlappedDoubler(consumer, batch_size=3)
    committed = [stage.step() for _ in range(5)]
    # nothing is committed before its batch was written and flushed; each commit names only the
    # written batch's next offset, although the consumer has already polled the following one
    assert committed == [0, 3, 3, 1, 0]
    # the consumer's thread: each poll comes before the previous batch's commit
    main = [e for e in consumer.events if e.startswith(("poll", "commit"))]
    assert main == ["poll 0-2", "poll 3-5", "commit 0:3", "poll 6-6", "commit 0:6", "commit 0:7"]
    # the writer's thread: the n-th commit follows the n-th write and flush
    for n, i in enumerate((i for i, e in enumerate(consumer.events) if e.startswith("commit")), start=1):
        assert consumer.events[:i].count("write") >= n and consumer.events[:i].count("flush") >= n
    assert stage.written == list(range(7))
    assert stage.counters.consumed == 7 and stage.counters.batches == 3


def test_overlap_a_failed_write_commits_nothing_and_the_next_batch_is_dropped_too() -> None:
    from sqlalchemy.exc import OperationalError

    consumer = FakeConsumer(_records(list(range(6))))
    stage = OverlappedDoubler(consumer, batch_size=3)

    def down(prepared: Sequence[tuple[Envelope, int]]) -> list[Output]:
        raise OperationalError("INSERT", {}, ConnectionError("connection refused"))

    stage.write = down  # type: ignore[method-assign]
    assert stage.step() == 0  # batch 0-2 handed to the writer
    with pytest.raises(Unavailable):
        stage.step()  # polls 3-5, then finds 0-2 failed: neither is committed
    assert consumer.commits == 0
    stage._on_fault(Unavailable("store"))
    assert stage._inflight is None and "close" in consumer.events


def test_overlap_a_commit_lost_to_a_rebalance_is_not_a_fault() -> None:
    """The batch is durable; the partitions' new owner replays it and this member goes on."""
    consumer = FakeConsumer(_records(list(range(6))))
    consumer.refuse_commits = 1
    stage = OverlappedDoubler(consumer, batch_size=3)
    assert [stage.step() for _ in range(3)] == [0, 3, 3]
    assert consumer.commits == 1 and consumer.events[-1] == "commit 0:6"
    assert "close" not in consumer.events


def test_overlap_run_commits_the_last_batch_on_exit() -> None:
    consumer = FakeConsumer(_records(list(range(4))))
    stage = OverlappedDoubler(consumer, batch_size=3)
    stage.run(max_batches=1)
    # it stopped after one committed batch, with the next in flight: that one is settled first
    assert [e for e in consumer.events if e.startswith(("commit", "close"))] == [
        "commit 0:3",
        "commit 0:4",
        "close",
    ]
    assert stage.counters.consumed == 4


class StatsOnAFlakyDatabase(Doubler):
    """Its stats go to a database that is down until ``up`` is set."""

    up = False

    def record_stats(self) -> None:
        if not self.up:
            from sqlalchemy.exc import OperationalError

            raise OperationalError(
                "INSERT INTO stage_stats", {}, ConnectionRefusedError("connection refused")
            )


def test_an_idle_stage_reports_a_database_outage_on_its_health(caplog: pytest.LogCaptureFixture) -> None:
    from galsift import metrics

    stage = StatsOnAFlakyDatabase(FakeConsumer([]))
    metrics.HEALTH.ok("doubler")
    assert stage.run_once() == 0  # idle: nothing polled, so the stats are its only database call
    healthy, text = metrics.HEALTH.report()
    assert not healthy and "doubler: database: OperationalError" in text
    stage._last_stats = 0.0
    assert stage.run_once() == 0  # still down: no second FAULT line
    stage.up = True
    stage._last_stats = 0.0  # the next idle round records again
    assert stage.run_once() == 0
    assert metrics.HEALTH.report()[0]
    # one FAULT and one RECOVERED line for the outage, as a failing stream logs them
    lines = [r.getMessage() for r in caplog.records]
    assert sum("doubler FAULT" in line for line in lines) == 1
    assert sum("doubler RECOVERED" in line for line in lines) == 1
