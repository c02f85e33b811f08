"""Publisher and demo feed with the Kafka producer replaced by an in-memory stand-in."""

from __future__ import annotations

import csv
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from galsift import messages
from galsift.settings import Settings
from ingest import demo
from ingest.publish import TilePublisher, publish_paths, publish_sources
from ingest.readers import iter_sources
from ingest.validate import validate_tile


class Future:
    def get(self, timeout: float) -> None:
        return None


class Producer:
    def __init__(self, on_send: Any = None) -> None:
        self.sent: list[dict[str, Any]] = []
        self.flushes = 0
        self.closed = False
        self.on_send = on_send

    def send(self, topic: str, *, key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> Future:
        self.sent.append(
            {"topic": topic, "key": key, "value": value, "headers": headers, "t": time.monotonic()}
        )
        if self.on_send is not None:
            self.on_send(len(self.sent))
        return Future()

    def flush(self, timeout: float | None = None) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path / "var")  # type: ignore[call-arg]


def test_publish_keys_headers_and_failures(tmp_path: Path, settings: Settings) -> None:
    folder = tmp_path / "My Survey"
    folder.mkdir()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(folder / "a.png")
    Image.new("RGB", (32, 32), (4, 5, 6)).save(folder / "b.png")
    (folder / "c.jpg").write_bytes(b"broken")
    producer = Producer()
    pub = TilePublisher(settings, producer=producer)
    report = publish_sources(settings, iter_sources([folder]), publisher=pub)
    assert (report.published, report.failed, report.by_reference) == (2, 1, 0)
    assert report.errors[0][0].endswith("c.jpg")
    assert [m["key"] for m in producer.sent] == [b"my_survey/a", b"my_survey/b"]
    assert all(m["topic"] == settings.topics.raw for m in producer.sent)
    assert all(m["headers"] == [("schema", b"galsift.tile.v1")] for m in producer.sent)
    record = messages.decode("tile", producer.sent[1]["value"], header=b"galsift.tile.v1")
    assert validate_tile(record)[:, 0, 0].tolist() == [4, 5, 6]
    assert report.bytes == sum(len(m["value"]) for m in producer.sent)
    assert producer.flushes >= 1 and not producer.closed  # a shared producer is left open


def test_large_tiles_travel_by_reference(repo_data: Path, settings: Settings) -> None:
    producer = Producer()
    pub = TilePublisher(settings, producer=producer, max_inline_bytes=100_000)
    report = publish_sources(settings, iter_sources([repo_data / "legacy_dr9_fits"], limit=2), publisher=pub)
    assert report.published == 2 and report.by_reference == 2
    for sent in producer.sent:
        record = messages.decode("tile", sent["value"])
        assert record["pixels"] is None and record["pixels_uri"].startswith("file://")
        assert len(sent["value"]) < 10_000
        pixels = validate_tile(record)
        assert pixels.shape == (3, 256, 256) and pixels.dtype == np.float32


def test_publish_paths_limit(repo_data: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    producer = Producer()
    monkeypatch.setattr("ingest.publish.make_producer", lambda s: producer)
    report = publish_paths(settings, [repo_data / "cfhtls_lens_candidates"], survey="cfhtls", limit=7)
    assert report.published == 7 and producer.closed
    assert all(m["key"].startswith(b"cfhtls/CFHTLSJ") for m in producer.sent)


# -- the demo bundle ----------------------------------------------------------------------------
def test_demo_bundle_is_small_complete_and_attributed() -> None:
    root = demo.demo_dir()
    files = [p for p in root.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 6 * 1024 * 1024
    attribution = (root / "ATTRIBUTION.md").read_text()
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert folders == ["cfhtls_lens_candidates", "gz_decals_examples", "legacy_dr9_fits"]
    assert "gz_decals_rings" not in folders  # GPL-3.0: never bundled
    for name in folders:
        assert f"`{name}/`" in attribution
    for name in ("cfhtls_lens_candidates", "gz_decals_examples"):
        with (root / name / "labels.csv").open(newline="") as fh:
            listed = {r["file"] for r in csv.DictReader(fh)}
        present = {str(p.relative_to(root / name)) for p in (root / name / "images").iterdir()}
        assert listed == present and len(listed) == 60
    assert len(list((root / "legacy_dr9_fits").glob("*.fits"))) == 3


def test_demo_tiles_are_interleaved_and_named() -> None:
    tiles = demo.load_demo_tiles()
    assert len(tiles) == 123
    assert {t.survey for t in tiles} == {
        "demo_cfhtls_lens_candidates",
        "demo_gz_decals_examples",
        "demo_legacy_dr9_fits",
    }
    assert len({t.survey for t in tiles[:3]}) == 3
    assert len({t.key for t in tiles}) == 123
    fits_tiles = [t for t in tiles if t.survey == "demo_legacy_dr9_fits"]
    assert all(t.pixels.dtype == np.float32 and t.ra is not None for t in fits_tiles)
    cfhtls = [t for t in tiles if t.survey == "demo_cfhtls_lens_candidates"]
    assert all(t.pixel_scale == pytest.approx(30 / 256) for t in cfhtls)


def test_feed_one_pass_at_a_steady_rate(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    producer = Producer()
    monkeypatch.setattr(demo, "make_producer", lambda s: producer)
    start = time.monotonic()
    sent = demo.run_feed(settings, rate=400.0, loop=False)
    elapsed = time.monotonic() - start
    assert sent == 123 == len(producer.sent) and producer.closed
    gaps = np.diff([m["t"] for m in producer.sent])
    assert elapsed >= 122 / 400.0
    assert float(np.median(gaps)) == pytest.approx(1 / 400.0, rel=0.5)
    assert len({m["key"] for m in producer.sent}) == 123


@pytest.mark.parametrize("unique", [False, True])
def test_feed_loops_until_stopped(settings: Settings, monkeypatch: pytest.MonkeyPatch, unique: bool) -> None:
    stop = threading.Event()

    def on_send(n: int) -> None:
        if n == 130:
            stop.set()

    producer = Producer(on_send)
    monkeypatch.setattr(demo, "make_producer", lambda s: producer)
    sent = demo.run_feed(settings, rate=2000.0, loop=True, stop=stop, unique_per_pass=unique)
    assert sent == 130 == len(producer.sent)
    keys = [m["key"] for m in producer.sent]
    if unique:
        assert len(set(keys)) == 130 and keys[123].endswith(b"~1")
        assert messages.decode("tile", producer.sent[123]["value"])["external_id"].endswith("~1")
    else:
        assert keys[123:130] == keys[:7]  # the second pass re-publishes the same objects


def test_feed_rejects_a_bad_rate(settings: Settings) -> None:
    with pytest.raises(ValueError, match="rate"):
        demo.run_feed(settings, rate=0.0)
