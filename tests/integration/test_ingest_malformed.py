"""Malformed messages among good ones: each bad one is dead-lettered with its reason, the rest stored."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ingest_support import StageRunner, count_tiles, isolated_settings, read_topic, wait_for
from sqlalchemy import Engine, text

from galsift import messages
from galsift.settings import Settings
from galsift.stage import make_producer
from ingest.readers import SurveyTile, read_tiles
from ingest.service import IngestStage

pytestmark = pytest.mark.integration


def _bad_messages(
    survey: str, fits_tile: SurveyTile
) -> dict[str, tuple[bytes | None, list[tuple[str, bytes]], str]]:
    """key -> (value, headers, expected reason)."""
    tile_header = messages.headers("tile")
    good = fits_tile.to_record()

    def record(**over: Any) -> dict[str, Any]:
        return {**good, "survey": survey, "external_id": f"bad-{over.pop('_name')}", **over}

    nan = fits_tile.pixels.copy()
    nan[2, 100, 100] = np.nan
    body = messages.encode("tile", record(_name="template"))
    return {
        f"{survey}/truncated": (body[: len(body) // 3], tile_header, "schema"),
        f"{survey}/bands": (
            messages.encode("tile", record(_name="bands", bands=["g", "r"])),
            tile_header,
            "bands",
        ),
        f"{survey}/nan": (
            messages.encode(
                "tile", record(_name="nan", pixels=messages.pack_pixels(nan, compression="none"))
            ),
            tile_header,
            "nonfinite",
        ),
        f"{survey}/coordinates": (
            messages.encode("tile", record(_name="coordinates", dec=95.0)),
            tile_header,
            "coordinates",
        ),
        f"{survey}/garbage": (os.urandom(300), tile_header, "schema"),
        f"{survey}/wrong-schema": (body, messages.headers("accepted"), "schema"),
        f"{survey}/tombstone": (None, tile_header, "schema"),
        f"{survey}/corrupt-zlib": (
            messages.encode(
                "tile",
                record(_name="zlib", compression="zlib", pixels=b"\x78\x9c" + os.urandom(500)),
            ),
            tile_header,
            "payload",
        ),
    }


def test_malformed_messages_go_to_dead_letters_and_the_stream_goes_on(
    stack_settings: Settings, engine: Engine, repo_data: Path
) -> None:
    settings = isolated_settings(stack_settings, "malformed", batch_size=8)
    uid = uuid.uuid4().hex[:6]
    survey = f"mixed_{uid}"
    good = list(read_tiles([repo_data / "cfhtls_lens_candidates"], survey=survey, limit=6))
    good += list(read_tiles([repo_data / "legacy_dr9_fits"], survey=survey, limit=2))
    bad = _bad_messages(survey, good[-1])

    producer = make_producer(settings)
    sends = []
    bad_items = list(bad.items())
    for i, tile in enumerate(good):  # interleave: every batch holds good and bad messages
        sends.append(
            producer.send(
                settings.topics.raw, key=tile.key, value=tile.encode(), headers=messages.headers("tile")
            )
        )
        key, (value, headers, _) = bad_items[i]
        sends.append(producer.send(settings.topics.raw, key=key.encode(), value=value, headers=headers))
    producer.flush()
    for fut in sends:
        fut.get(timeout=30)

    stage = IngestStage(settings, engine, group_id=f"ingest-{uid}")
    runner = StageRunner(stage).start()
    try:
        wait_for(lambda: count_tiles(engine, [survey])[0] == len(good), timeout_s=120, what="good tiles")
        wait_for(lambda: stage.counters.consumed == len(good) + len(bad), timeout_s=60, what="all consumed")

        dead = read_topic(settings, settings.topics.dead)
        letters = {
            r.key.decode(): messages.decode("dead", r.value, header=messages.header_value(r.headers))
            for r in dead
        }
        assert len(dead) == len(bad) and set(letters) == set(bad)
        for key, (value, _, reason) in bad.items():
            letter = letters[key]
            assert letter["reason"] == reason, (key, letter["detail"])
            assert letter["stage"] == "ingest" and letter["topic"] == settings.topics.raw
            assert letter["payload"] == (value or b"") and letter["detail"]

        with engine.connect() as conn:
            errors = (
                conn.execute(
                    text('SELECT key, reason, payload, stage, "offset" FROM ingest_errors WHERE topic = :t'),
                    {"t": settings.topics.raw},
                )
                .mappings()
                .all()
            )
        assert {(bytes(e["key"]).decode(), e["reason"]) for e in errors} == {
            (k, v[2]) for k, v in bad.items()
        }
        assert {bytes(e["key"]).decode(): bytes(e["payload"]) for e in errors} == {
            k: v[0] or b"" for k, v in bad.items()
        }
        assert count_tiles(engine, [survey]) == (len(good), len(good))
        assert {r.key for r in read_topic(settings, settings.topics.accepted)} == {t.key for t in good}

        # the same consumer is still running and takes new work
        assert runner.alive
        later = list(read_tiles([repo_data / "gz_decals_examples"], survey=survey, limit=2))
        for tile in later:
            producer.send(
                settings.topics.raw, key=tile.key, value=tile.encode(), headers=messages.headers("tile")
            )
        producer.flush()
        wait_for(lambda: count_tiles(engine, [survey])[0] == len(good) + 2, timeout_s=60, what="later tiles")
    finally:
        producer.close()
        counters = runner.join(timeout_s=60, stop=True)
    assert (counters.accepted, counters.rejected) == (len(good) + 2, len(bad))
