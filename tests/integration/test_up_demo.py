"""The main job: ``galsift up --demo`` from an empty data directory, with no configuration.

It starts its own Kafka broker and PostgreSQL (not the session stack's), the services and the
demo feed; tiles must reach the database within a minute, embedded by the shipped model, and
Ctrl-C (SIGINT) must stop everything cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from galsift.settings import Settings

pytestmark = pytest.mark.integration


def test_up_demo_puts_tiles_in_the_database_within_a_minute(tmp_path: Path, free_port: int) -> None:
    from db.engine import embedded_running, get_engine
    from deploy import stack

    port = free_port
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALSIFT_")}
    # only where to keep data and which port: everything else is the embedded default
    env.update(GALSIFT_DATA_DIR=str(tmp_path / "var"), GALSIFT_KAFKA_BOOTSTRAP=f"localhost:{port}")
    settings = Settings(_env_file=None, data_dir=tmp_path / "var", kafka_bootstrap=f"localhost:{port}")  # type: ignore[call-arg]
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "galsift.cli", "up", "--demo", "--rate", "20"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        started = time.monotonic()
        while not embedded_running(settings):  # the stack comes up first
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() - started < 180, "stack did not start"
            time.sleep(1)
        engine = get_engine(settings)
        ready = time.monotonic()
        tiles = embedded = 0
        while time.monotonic() - ready < 60 and not (tiles and embedded):
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(2)
            try:
                with engine.connect() as conn:
                    tiles = conn.execute(text("SELECT count(*) FROM tiles")).scalar_one()
                    embedded = conn.execute(text("SELECT count(*) FROM embeddings")).scalar_one()
            except Exception:  # migrations may still be running
                continue
        assert tiles > 0, (
            "no tile in the database a minute after the stack was up\n" + log.read_text()[-3000:]
        )
        assert embedded > 0, "tiles were not embedded within a minute\n" + log.read_text()[-3000:]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0, log.read_text()[-3000:]
        engine.dispose()
    finally:
        if proc.poll() is None:
            proc.kill()
        stack.stack_down(settings)
