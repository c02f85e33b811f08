"""Scale-out under a steady stream: workers join and leave consumer groups, nothing is lost or doubled.

Two workers of each stage (``galsift ingest``, ``encode``, ``detect``, each a subprocess) share
the 4 partitions of their input topic in one consumer group each, and a notifier delivers the
alerts to a local webhook. While simulated lenses and galaxies stream in at a steady rate:

1. a third detector joins (the slowest stage on a CPU, so the one an operator scales out: the
   group rebalances to 3 members, and the newcomer takes work);
2. one encoder is stopped with SIGTERM (it finishes and commits its batch, exits 0, and the group
   rebalances at once to the other);
3. one detector and one ingest worker are SIGKILLed while the stream runs (the group notices after
   its session timeout, and another member replays whatever batch they had not committed: the
   summary prints how many messages came out twice).

Afterwards every published tile is in ``tiles`` once, has exactly one embedding of the model
version, the same set of detection rows as every other tile, at most one alert and exactly one
webhook call per alert; the output topics carry exactly the published ids (replays may repeat a
message, never add an id), and nothing was dead-lettered. Progress is polled from the database
and the groups' state with deadlines; nothing sleeps for readiness.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ingest_support import isolated_settings, read_topic, wait_for
from sqlalchemy import Engine, text

from deploy.bench_pipeline import STAGES, Worker, scrape, start_worker, stop_workers, wait_for_group
from galsift import messages
from galsift.settings import Settings

pytestmark = pytest.mark.integration

#: tiles per second of the steady stream
RATE = 1.0
#: tiles published after the last membership change, so the survivors carry the stream on
TAIL = 8
#: records per batch: small, so a stream of ~100 tiles is many batches and the kills land inside one
BATCH = 6
PARTITIONS = 4
SPECS = {s.name: s for s in STAGES}


class Webhook:
    """A local webhook counting calls per tile (the id is in the Slack body's context line)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                tiles = set(re.findall(r"tile ([0-9a-f-]{36})", json.dumps(json.loads(body))))
                with hook._lock:
                    for tile in tiles or {"?"}:
                        hook.calls[tile] += 1
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture
def reaper() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes the test started; any still running at teardown (a failed or timed-out test) are killed."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


class Stream:
    """Publishes simulated lenses and galaxies at a steady rate, in a thread, until finished."""

    def __init__(self, settings: Settings, survey: str) -> None:
        from encoder.sim import simulate_galaxy, simulate_lens

        rng = np.random.default_rng(11)
        # a small pool of pixels, reused under distinct ids: the pipeline sees new tiles, the test
        # does not spend its time simulating
        self.pool = [simulate_lens(rng).flux.astype(np.float32) for _ in range(3)]
        self.pool += [simulate_galaxy(rng).flux.astype(np.float32) for _ in range(3)]
        self.settings = settings
        self.survey = survey
        self.ids: list[str] = []
        self.error: BaseException | None = None
        self._tail_from: int | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="stream", daemon=True)

    @property
    def published(self) -> int:
        with self._lock:
            return len(self.ids)

    def start(self) -> Stream:
        self._thread.start()
        return self

    def finish(self, *, tail: int, timeout_s: float = 120.0) -> list[str]:
        """Publish ``tail`` more tiles, stop, and return every published tile id."""
        with self._lock:
            self._tail_from = len(self.ids) + tail
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError("the stream did not finish")
        if self.error is not None:
            raise self.error
        return list(self.ids)

    def stop(self) -> None:
        """Stop publishing (after a failure elsewhere), without raising."""
        with self._lock:
            self._tail_from = 0
        self._thread.join(60)

    def _run(self) -> None:
        from ingest.publish import TilePublisher
        from ingest.readers import SurveyTile

        start = time.monotonic()
        try:
            with TilePublisher(self.settings) as pub:
                k = 0
                while True:
                    with self._lock:
                        if self._tail_from is not None and k >= self._tail_from:
                            return
                    delay = start + k / RATE - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)  # the stream's own schedule, not a readiness wait
                    tile = SurveyTile(
                        survey=self.survey,
                        external_id=f"t{k:04d}",
                        pixels=self.pool[k % len(self.pool)],
                        bands=("g", "r", "z"),
                        pixel_scale=0.262,
                        ra=(17.0 + 7.3 * k) % 360.0,
                        dec=-40.0 + (k % 70),
                    )
                    pub.send(tile)
                    pub.flush()  # acknowledged before it counts as published
                    with self._lock:
                        self.ids.append(tile.tile_id)
                    k += 1
        except BaseException as exc:  # handed to the test by finish()
            self.error = exc


def _scalar(engine: Engine, sql: str, **params: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql), params).scalar_one())


def _detected(engine: Engine, survey: str) -> int:
    return _scalar(
        engine,
        "SELECT count(DISTINCT d.tile_id) FROM detections d JOIN tiles t ON t.id = d.tile_id "
        "WHERE t.survey = :s",
        s=survey,
    )


def _undelivered(engine: Engine, survey: str) -> int:
    """Alerts of the survey without a sent delivery (deliveries are created with the alert)."""
    return _scalar(
        engine,
        "SELECT count(*) FROM alerts a JOIN tiles t ON t.id = a.tile_id WHERE t.survey = :s AND NOT EXISTS "
        "(SELECT 1 FROM alert_deliveries d WHERE d.alert_id = a.id AND d.state = 'sent')",
        s=survey,
    )


def _by_id(records: list[Any], schema: str, key: str) -> Counter[Any]:
    """Messages per id on a topic (``key`` names the id field, or a tuple of fields)."""
    counts: Counter[Any] = Counter()
    for r in records:
        value = messages.decode(schema, r.value, header=messages.header_value(r.headers))
        counts[tuple(str(value[k]) for k in key.split(",")) if "," in key else str(value[key])] += 1
    return counts


# ~3 minutes on two idle cores (seven stage processes and a notifier start, each loading its
# models); on a CI runner shared with other work the starts alone can take minutes
@pytest.mark.slow  # 6 worker processes and a 1 tile/s stream: minutes on 2 cores (make test-all)
@pytest.mark.timeout(1200)
def test_workers_join_and_leave_mid_stream_nothing_lost_or_doubled(
    stack_settings: Settings,
    engine: Engine,
    webhook: Webhook,
    reaper: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    from deploy.cli import service_command, service_env
    from encoder.service import SHIPPED_CHECKPOINT

    started = time.monotonic()
    settings = isolated_settings(
        stack_settings,
        "scale",
        batch_size=BATCH,
        kafka_partitions=PARTITIONS,
        # a low bar, so the simulated lenses raise alerts and the webhook path is exercised
        alert_threshold=0.5,
        alert_webhooks=[webhook.url],
        webhook_rate_per_hour=100_000,
        model_checkpoint=SHIPPED_CHECKPOINT,
    )
    uid = uuid.uuid4().hex[:6]
    survey = f"scale_{uid}"
    groups = {name: f"scale-{uid}-{name}" for name in ("ingest", "encoder", "detector")}
    workers: dict[str, list[Worker]] = {name: [] for name in groups}
    consumed: dict[str, dict[int, float]] = {name: {} for name in groups}
    events: list[tuple[str, int]] = []

    def add(name: str) -> Worker:
        w = start_worker(
            settings,
            SPECS[name],
            group=groups[name],
            log_file=tmp_path / f"{name}-{len(workers[name])}.log",
        )
        workers[name].append(w)
        reaper.append(w.proc)
        return w

    def everyone() -> list[Worker]:
        return [w for ws in workers.values() for w in ws]

    def alive() -> list[subprocess.Popen[bytes]]:
        return [w.proc for w in everyone() if w.proc.returncode is None]

    def logs() -> str:
        return "\n".join(f"--- {w.spec.name} {w.proc.pid}\n{w.tail(15)}" for w in everyone())

    def settle(name: str, members: int) -> None:
        wait_for_group(
            settings,
            groups[name],
            members=members,
            partitions=PARTITIONS,
            timeout_s=180,
            alive=alive(),
            what=f"{name} group with {members} members",
        )

    def remember(w: Worker) -> None:
        consumed[w.spec.name][w.proc.pid] = scrape(w.metrics_port).get("galsift_consumed_total", 0.0)

    notify_log = tmp_path / "notify.log"
    with notify_log.open("ab") as out:
        notifier = subprocess.Popen(
            service_command(["notify", "--poll", "0.5"]),
            env=service_env(settings),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    reaper.append(notifier)
    stream: Stream | None = None
    try:
        for name in groups:
            add(name)
            add(name)
        for name in groups:
            settle(name, 2)
        ready_s = time.monotonic() - started

        stream = Stream(settings, survey).start()
        wait_for(lambda: _detected(engine, survey) >= 8, timeout_s=180, what="the first tiles detected")

        # 1. a third detector joins mid-stream
        events.append(("detector joins (3 members)", stream.published))
        add("detector")
        settle("detector", 3)

        # 2. an encoder leaves gracefully: it commits its batch and exits 0
        leaving = workers["encoder"][0]
        remember(leaving)
        events.append(("encoder SIGTERM (1 member)", stream.published))
        leaving.proc.send_signal(signal.SIGTERM)
        assert leaving.proc.wait(timeout=120) == 0, logs()
        settle("encoder", 1)

        # 3. a detector and an ingest worker die mid-batch
        for name, left in (("detector", 2), ("ingest", 1)):
            victim = workers[name][0]
            remember(victim)
            events.append((f"{name} SIGKILL ({left} member{'s' if left > 1 else ''})", stream.published))
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(timeout=30)
        settle("detector", 2)
        settle("ingest", 1)

        ids = stream.finish(tail=TAIL)
        total = len(ids)
        for what, at in events:
            assert at < total, f"{what} happened after the stream ended"
        wait_for(
            lambda: _detected(engine, survey) >= total or not all(p.poll() is None for p in alive()),
            timeout_s=240,
            interval_s=0.5,
            what=f"all {total} tiles detected",
        )
        assert all(p.poll() is None for p in alive()), logs()
        wait_for(
            lambda: _undelivered(engine, survey) == 0 or notifier.poll() is not None,
            timeout_s=120,
            interval_s=0.5,
            what="every alert delivered",
        )
        for w in everyone():
            if w.proc.returncode is None:
                remember(w)
    finally:
        if stream is not None:
            stream.stop()
        notifier.send_signal(signal.SIGTERM)
        codes = stop_workers(everyone())
        notifier.wait(timeout=60)

    # every survivor stopped cleanly on SIGTERM
    killed = {workers["detector"][0].proc.pid, workers["ingest"][0].proc.pid}
    survivors = [w for w in everyone() if w.proc.pid not in killed]
    assert {w.proc.pid: codes[w.proc.pid] for w in survivors} == {w.proc.pid: 0 for w in survivors}, logs()
    # the partitions really were shared: both first workers of every stage took work, and so did
    # the detector that joined mid-stream
    for name in groups:
        assert sum(1 for w in workers[name][:2] if consumed[name].get(w.proc.pid, 0) > 0) == 2, consumed
    assert consumed["detector"][workers["detector"][2].proc.pid] > 0, consumed

    published = set(ids)
    with engine.connect() as conn:
        tiles = (
            conn.execute(text("SELECT id::text FROM tiles WHERE survey = :s"), {"s": survey}).scalars().all()
        )
        embeddings = conn.execute(
            text(
                "SELECT e.tile_id::text, e.model_version FROM embeddings e JOIN tiles t ON t.id = e.tile_id "
                "WHERE t.survey = :s"
            ),
            {"s": survey},
        ).all()
        detections = conn.execute(
            text(
                "SELECT d.tile_id::text, count(*) FROM detections d JOIN tiles t ON t.id = d.tile_id "
                "WHERE t.survey = :s GROUP BY 1"
            ),
            {"s": survey},
        ).all()
        alerts = conn.execute(
            text(
                "SELECT a.id, a.tile_id::text FROM alerts a JOIN tiles t ON t.id = a.tile_id WHERE t.survey = :s"
            ),
            {"s": survey},
        ).all()
        errors = conn.execute(
            text("SELECT count(*) FROM ingest_errors WHERE topic = ANY(:t)"),
            {"t": [settings.topics.raw, settings.topics.accepted, settings.topics.embedded]},
        ).scalar_one()

    # tiles: each published one exactly once, nothing else
    assert sorted(tiles) == sorted(published), "tiles lost or unexpected"
    # embeddings: exactly one per (tile, model version), one version for all
    versions = {v for _, v in embeddings}
    assert len(versions) == 1, versions
    assert Counter(t for t, _ in embeddings) == Counter(published), "embeddings lost or doubled"
    # detections: every tile has the same set of rows (lens finder + morphology labels)
    rows_per_tile = {t: int(n) for t, n in detections}
    assert set(rows_per_tile) == published, "tiles without detections"
    assert len(set(rows_per_tile.values())) == 1, Counter(rows_per_tile.values())
    # alerts: at most one per tile, and at least one, so the alert path was exercised
    alert_tiles = Counter(t for _, t in alerts)
    assert alerts and max(alert_tiles.values()) == 1, alert_tiles
    # webhooks: exactly one call per alert, none for anything else
    assert dict(webhook.calls) == dict.fromkeys(alert_tiles, 1), webhook.calls
    assert errors == 0

    # Kafka: replays may repeat a message, never add or lose an id
    accepted = _by_id(read_topic(settings, settings.topics.accepted), "accepted", "tile_id")
    embedded = _by_id(read_topic(settings, settings.topics.embedded), "embedded", "tile_id,model_version")
    alerted = _by_id(read_topic(settings, settings.topics.alerts), "alert", "alert_id")
    assert set(accepted) == published
    assert set(embedded) == {(t, next(iter(versions))) for t in published}
    assert set(alerted) == {str(a) for a, _ in alerts}
    assert read_topic(settings, settings.topics.dead) == []

    replays = {
        "accepted": sum(accepted.values()) - len(accepted),
        "embedded": sum(embedded.values()) - len(embedded),
        "alerts": sum(alerted.values()) - len(alerted),
    }
    print(
        f"\nscale-out: {total} tiles at {RATE:g}/s, workers ready in {ready_s:.0f} s, {time.monotonic() - started:.0f} s in all"
    )
    for what, at in events:
        print(f"  {what:<28} after {at:>4} tiles published")
    print(
        f"  rows: tiles {len(tiles)}, embeddings {len(embeddings)} ({next(iter(versions))}), detection rows "
        f"{sum(rows_per_tile.values())}, alerts {len(alerts)}, webhook calls {sum(webhook.calls.values())}"
    )
    print(f"  lost 0, duplicated 0; replayed messages (same id again): {replays}")
    print(f"  consumed per worker: {consumed}")


def test_compose_matches_the_sizing() -> None:
    """deploy/docker-compose.yml parses and carries deploy/SIZING.md's replicas and partitions."""
    import yaml

    deploy = Path(__file__).resolve().parents[2] / "deploy"
    compose = yaml.safe_load((deploy / "docker-compose.yml").read_text())
    sizing = (deploy / "SIZING.md").read_text()
    services = compose["services"]

    def default(value: object) -> int:
        """The default of a ``${VAR:-N}`` setting (or the number itself)."""
        match = re.fullmatch(r"\$\{\w+:-(\d+)\}", str(value))
        return int(match.group(1) if match else value)  # type: ignore[arg-type]

    partitions = default(compose["x-galsift-env"]["GALSIFT_KAFKA_PARTITIONS"])
    assert f"**Partitions: {partitions} per topic**" in sizing
    commands = {name: svc.get("command", [None])[0] for name, svc in services.items()}
    for stage, command in {
        "ingest": "ingest",
        "encoder": "encode",
        "detector": "detect",
        "watch": "watch",
    }.items():
        assert commands[stage] == command
        replicas = default(services[stage]["deploy"]["replicas"])
        # every worker of a stage gets a partition, with room to scale
        assert 1 <= replicas <= partitions
        assert f"**{replicas}** (`{stage.upper()}_REPLICAS`" in sizing, stage
    for gpu in ("encoder", "detector"):
        assert services[gpu]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        assert services[gpu]["environment"]["GALSIFT_DEVICE"] == "cuda"
    assert {"notify", "postgres-replica"} <= set(services)
    # PostgreSQL 18 images refuse a volume at the pre-18 path /var/lib/postgresql/data
    for db in ("postgres", "postgres-replica"):
        assert all(v.endswith(":/var/lib/postgresql") for v in services[db]["volumes"]), services[db][
            "volumes"
        ]
