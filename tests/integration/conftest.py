"""The real local stack for integration tests: one Kafka broker and one PostgreSQL per session.

Both run out of a pytest temporary directory, the broker on a free port (never 9092, so a
``galsift up`` demo on the same machine does not clash), and are stopped when the session ends.

Every test collected under tests/integration/ is marked ``integration`` here, whether or not its
module says so, so that ``-m "not integration"`` always leaves out the tests that start processes.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from galsift.settings import Settings

INTEGRATION_DIR = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration/ ``integration``."""
    for item in items:
        if INTEGRATION_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


def _free_port_pair() -> int:
    """A port whose successor is also free (the broker's listener and its controller)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port == 9092 or port + 1 > 65535:
            continue
        try:
            with socket.socket() as s1, socket.socket() as s2:
                s1.bind(("127.0.0.1", port))
                s2.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no two consecutive free TCP ports found")


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings of a fresh local stack (Kafka + embedded PostgreSQL, migrated), up for the session."""
    from deploy import stack

    data_dir = tmp_path_factory.mktemp("stack")
    port = _free_port_pair()
    # no .env and an explicit embedded database: a developer's environment must not leak in
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=data_dir,
        kafka_bootstrap=f"localhost:{port}",
        database_url=None,
    )
    started = time.monotonic()
    try:
        stack.stack_up(settings)
        print(f"\nlocal stack up in {time.monotonic() - started:.1f} s ({data_dir})")
        yield settings
    finally:
        stack.stack_down(settings)


@pytest.fixture(scope="session")
def engine(stack_settings: Settings) -> Iterator[Engine]:
    """A SQLAlchemy engine on the session's migrated database."""
    from db.engine import get_engine

    eng = get_engine(stack_settings)
    yield eng
    eng.dispose()


@pytest.fixture
def free_port() -> int:
    """A free port whose successor is free too, for a second local broker."""
    return _free_port_pair()


@pytest.fixture
def own_db(stack_settings: Settings, engine: Engine, tmp_path: Path) -> Iterator[tuple[Settings, Engine]]:
    """Settings and an engine on a fresh, migrated database of this test, with topics and a data
    directory (object store, candidate checkpoints) of its own: for tests whose rows would change
    what other tests see (a promotion changes the model every encoder serves)."""
    import uuid

    from ingest_support import isolated_settings
    from sqlalchemy import text

    from db.engine import get_engine, upgrade

    name = f"it_own_{uuid.uuid4().hex[:8]}"
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = engine.url.set(database=name).render_as_string(hide_password=False)
    settings = isolated_settings(stack_settings, "own").model_copy(
        update={"database_url": url, "data_dir": tmp_path / "data"}
    )
    upgrade(settings)
    eng = get_engine(settings)
    try:
        yield settings, eng
    finally:
        eng.dispose()
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
