"""``galsift ingest`` killed with SIGKILL mid-stream and restarted: nothing lost, nothing doubled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from ingest_support import count_tiles, isolated_settings, read_topic, tile_rows, wait_for
from sqlalchemy import Engine

from galsift import messages
from galsift.objectstore import read_array
from galsift.settings import Settings
from ingest.publish import publish_paths

pytestmark = pytest.mark.integration


def _ingest(settings: Settings, group: str, *, idle_exit: float, log: Path) -> subprocess.Popen[bytes]:
    from deploy.cli import service_env

    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "galsift.cli", "ingest", "--group", group, "--idle-exit", str(idle_exit)],
            env=service_env(settings),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _committed(settings: Settings, group: str) -> int:
    """Offsets the group committed on the raw topic, summed over partitions."""
    from deploy.stack import kafka_admin

    with kafka_admin(settings) as admin:
        offsets = admin.list_group_offsets(group).get(group, {})
    return sum(
        meta.offset for tp, meta in offsets.items() if tp.topic == settings.topics.raw and meta.offset > 0
    )


def test_sigkill_mid_batch_loses_and_duplicates_nothing(
    stack_settings: Settings, engine: Engine, repo_data: Path, tmp_path: Path
) -> None:
    # small batches, so the stream is many batches long and the kill lands inside it
    settings = isolated_settings(stack_settings, "sigkill", batch_size=3)
    uid = uuid.uuid4().hex[:6]
    surveys = [f"kill_dr9_{uid}", f"kill_cfhtls_{uid}"]
    published = publish_paths(settings, [repo_data / "legacy_dr9_fits"], survey=surveys[0]).published
    published += publish_paths(
        settings, [repo_data / "cfhtls_lens_candidates"], survey=surveys[1], limit=57
    ).published
    assert published == 60  # 3 FITS + 57 JPEG
    group = f"ingest-kill-{uid}"
    log = tmp_path / "ingest.log"

    proc = _ingest(settings, group, idle_exit=60, log=log)
    rows_at_kill = 0
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            rows_at_kill, _ = count_tiles(engine, surveys)
            if rows_at_kill > 0:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert 0 < rows_at_kill < published, f"kill did not land mid-stream ({rows_at_kill} rows)"
    committed_at_kill = _committed(settings, group)
    print(f"\nkilled with {rows_at_kill} rows stored and {committed_at_kill} offsets committed")

    # the restarted member gets the partitions once the killed one's session expires (45 s by
    # default), so wait for the work rather than exiting on idleness; then stop it the polite way
    proc = _ingest(settings, group, idle_exit=600, log=log)
    try:
        wait_for(
            lambda: _committed(settings, group) == published or proc.poll() is not None,
            timeout_s=300,
            interval_s=1.0,
            what="all offsets committed after the restart",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)

    assert count_tiles(engine, surveys) == (published, published)
    for row in tile_rows(engine, surveys):
        assert str(row["id"]) == messages.tile_id(row["survey"], row["external_id"])
        read_array(row["pixels_uri"], checksum=row["checksum"])  # stored whole, checksum matches
    assert _committed(settings, group) == published
    # the accepted topic may repeat tiles of the batch that was replayed, but misses none
    accepted = read_topic(settings, settings.topics.accepted)
    ids = [messages.decode("accepted", r.value)["tile_id"] for r in accepted]
    assert set(ids) == {str(r["id"]) for r in tile_rows(engine, surveys)}
    assert len(ids) >= published
    assert read_topic(settings, settings.topics.dead) == []
