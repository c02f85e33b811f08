"""Run one read-only query as the reader role (``galsift sql``, the dashboard's SQL console).

The query runs in a session *logged in* as ``galsift_reader`` (or as a user's own role that is a
member of it), never in an owner session that switched role: ``SET ROLE`` is undone by ``RESET
ROLE``, and ``SET SESSION AUTHORIZATION`` by ``RESET SESSION AUTHORIZATION``, so a query could
climb back to the owner. A login cannot be undone from inside the session.

What keeps a query harmless, in order of importance (migration 0008 sets up the first two):

1. privileges: the role may read the documented ``galsift_api`` views and call its functions, and
   nothing else (no table, no CREATE anywhere, no temporary tables, no large objects);
2. a read-only transaction (``BEGIN READ ONLY``, also the role's default) that is always rolled
   back, never committed;
3. time: ``statement_timeout`` (and ``transaction_timeout``) on the server, plus a client-side
   cancel shortly after, in case the server does not answer;
4. size: the rows are streamed in chunks over the extended query protocol and at most
   ``max_rows`` are kept; the rest of the query is cancelled;
5. one statement: the extended protocol's Parse message accepts exactly one statement, so
   ``SELECT 1; DROP TABLE tiles`` is refused by the server before anything runs.

No statement is inspected for words: a refusal is always the server's (or the clock's) verdict.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Sequence
from contextlib import closing, suppress
from dataclasses import dataclass, field
from typing import Any, cast

import psycopg
from psycopg import errors as pgerrors
from sqlalchemy.engine import make_url

from db.engine import database_url, embedded_running
from galsift.settings import Settings

#: the role migration 0008 creates; ``galsift sql`` logs in as it
READER_ROLE = "galsift_reader"
#: the schema of the documented views and functions (docs/sql.md)
API_SCHEMA = "galsift_api"
#: defaults of ``galsift sql``; the role's own statement_timeout (30 s) is the default of other clients
DEFAULT_MAX_ROWS = 1000
DEFAULT_TIMEOUT_S = 30.0
#: hard ceilings a caller cannot exceed
MAX_ROWS_LIMIT = 1_000_000
MAX_TIMEOUT_S = 600.0
#: the client cancels this long after the server's statement timeout should have fired
CLIENT_GRACE_S = 2.0
#: rows per chunk of the streamed result (libpq >= 17 chunked mode; single rows before)
CHUNK_ROWS = 500


class QueryRefused(Exception):  # noqa: N818 - the name callers (dashboard, filters) import
    """The query was refused or failed; ``str()`` is one line fit for a terminal.

    Attributes
    ----------
    reason
        ``permission``, ``read-only``, ``timeout``, ``syntax``, ``not-a-query``, ``limit``,
        ``connection``, ``invalid`` or ``error``.
    sqlstate
        The server's SQLSTATE, when the server refused.
    """

    def __init__(self, message: str, *, reason: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.sqlstate = sqlstate


@dataclass(frozen=True)
class Result:
    """What a query returned.

    Attributes
    ----------
    columns
        Column names, in order.
    rows
        At most ``max_rows`` rows (tuples of Python values: vectors arrive as their text form).
    truncated
        Whether the query had more rows than were kept.
    elapsed_s
        Wall time from connecting to the last row.
    type_names
        The PostgreSQL type name of each column.
    """

    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool
    elapsed_s: float = 0.0
    type_names: list[str] = field(default_factory=list)


def reader_conninfo(settings: Settings, *, login: str = READER_ROLE) -> str:
    """The libpq URL of the galsift database for ``login``: the owner's URL with user and password replaced.

    The URL carries no password: on the embedded server (Unix socket, ``trust``) none is needed;
    on any other server libpq takes it from its password file (``~/.pgpass`` or ``PGPASSFILE``),
    so no reader secret passes through galsift's settings or the command line.
    """
    if settings.database_url is None and not embedded_running(settings):
        # a read-only query must not start a database server as a side effect
        raise QueryRefused(
            f"the embedded PostgreSQL in {settings.embedded_db_dir} is not running (galsift stack up)",
            reason="connection",
        )
    url = make_url(database_url(settings)).set(drivername="postgresql", username=login, password=None)
    return url.render_as_string(hide_password=False)


def _options(timeout_s: float) -> str:
    """Session settings sent with the startup packet (they hold before the first statement)."""
    ms = max(1, int(timeout_s * 1000))
    settings = {
        "default_transaction_read_only": "on",
        "statement_timeout": f"{ms}",
        "idle_in_transaction_session_timeout": f"{ms + 1000}",
        "lock_timeout": f"{min(ms, 5000)}",
        "search_path": f"{API_SCHEMA},public",
        "hnsw.ef_search": "40",
        "hnsw.iterative_scan": "strict_order",
    }
    return " ".join(f"-c {name}={value}" for name, value in settings.items())


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _refusal(exc: psycopg.Error, *, timeout_s: float, cancelled: bool) -> QueryRefused:
    """Turn a server error into a clear one-line refusal."""
    state = exc.sqlstate
    diag = exc.diag
    primary = _one_line(diag.message_primary or str(exc) or type(exc).__name__)
    detail = f" ({_one_line(diag.message_hint)})" if diag.message_hint else ""
    if isinstance(exc, pgerrors.QueryCanceled) or state in ("25P04", "57P05") or cancelled:
        return QueryRefused(f"timed out after {timeout_s:g} s: {primary}", reason="timeout", sqlstate=state)
    if isinstance(exc, pgerrors.InsufficientPrivilege):
        return QueryRefused(f"permission denied: {primary}{detail}", reason="permission", sqlstate=state)
    if isinstance(exc, pgerrors.ReadOnlySqlTransaction):
        return QueryRefused(f"read-only: {primary}", reason="read-only", sqlstate=state)
    if state == "42601" and "multiple commands" in primary:
        return QueryRefused(
            "only one statement may be run at a time: " + primary, reason="syntax", sqlstate=state
        )
    if state is None and isinstance(exc, psycopg.ProgrammingError):
        # psycopg's own verdicts on the result: a COPY, or a command that returned no rows
        if "COPY" in primary:
            return QueryRefused(
                "COPY is not available: galsift sql runs one query (use --csv for CSV output)",
                reason="not-a-query",
            )
        return QueryRefused(
            "not a query: the statement returns no rows (galsift sql runs one SELECT-like query)",
            reason="not-a-query",
        )
    if state is not None and state.startswith("42"):
        return QueryRefused(f"invalid query: {primary}{detail}", reason="syntax", sqlstate=state)
    if state is not None and state.startswith("53"):
        return QueryRefused(f"resource limit: {primary}", reason="limit", sqlstate=state)
    if (state is not None and state.startswith("08")) or (
        isinstance(exc, psycopg.OperationalError) and not state
    ):
        return QueryRefused(f"connection lost: {primary}", reason="connection", sqlstate=state)
    return QueryRefused(f"refused: {primary}{detail}", reason="error", sqlstate=state)


def run_readonly(
    settings: Settings,
    query: str,
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    login: str = READER_ROLE,
) -> Result:
    """Run one query as the reader role in a read-only transaction that is rolled back.

    Parameters
    ----------
    settings
        Where the database is (the owner's URL; see :func:`reader_conninfo`).
    query
        One SQL statement that returns rows (SELECT, VALUES, TABLE, WITH, EXPLAIN, SHOW).
    max_rows
        Rows kept; a longer result is cut there and ``truncated`` is set.
    timeout_s
        Server-side statement timeout; the client cancels ``CLIENT_GRACE_S`` later if the server
        has not stopped by then.
    login
        The role to log in as: ``galsift_reader`` or a user's own role that is a member of it
        (the ``my_*`` views show that user's rows). Any other role is refused.

    Returns
    -------
    Result
        Columns, at most ``max_rows`` rows, and whether more were left.

    Raises
    ------
    QueryRefused
        When the database is not reachable (the embedded server is never started here), when
        the server refuses the statement (privileges, read-only transaction, syntax, more
        than one statement), when it runs out of time, when it returns no rows description, or
        when the login is not a reader.
    """
    if not 1 <= max_rows <= MAX_ROWS_LIMIT:
        raise QueryRefused(f"max_rows must be within 1..{MAX_ROWS_LIMIT}", reason="invalid")
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise QueryRefused(f"timeout must be within (0, {MAX_TIMEOUT_S:g}] s", reason="invalid")
    if not query.strip():
        raise QueryRefused("empty query", reason="invalid")
    started = time.monotonic()
    conninfo = reader_conninfo(settings, login=login)
    try:
        conn = psycopg.connect(
            conninfo,
            options=_options(timeout_s),
            connect_timeout=10,
            application_name="galsift sql",
        )
    except psycopg.OperationalError as exc:
        raise QueryRefused(
            f"cannot log in as {login}: {_one_line(str(exc))} (is migration 0008 applied?)",
            reason="connection",
        ) from None
    with closing(conn):
        _check_reader(conn, login, timeout_s)
        # read-only on three levels: the role's default, the startup options, and this flag,
        # which makes psycopg open the transaction with BEGIN READ ONLY
        conn.read_only = True
        cancelled = threading.Event()

        def _cancel() -> None:
            cancelled.set()
            conn.cancel_safe(timeout=5.0)

        watchdog = threading.Timer(timeout_s + CLIENT_GRACE_S, _cancel)
        watchdog.daemon = True
        watchdog.start()
        try:
            columns, types, rows, truncated = _stream(conn, query, max_rows)
        except psycopg.Error as exc:
            raise _refusal(exc, timeout_s=timeout_s, cancelled=cancelled.is_set()) from None
        finally:
            watchdog.cancel()
            # never commit: whatever the statement did inside its transaction is undone
            with suppress(psycopg.Error):
                conn.rollback()
    if cancelled.is_set():
        raise QueryRefused(f"timed out after {timeout_s:g} s (cancelled by the client)", reason="timeout")
    return Result(
        columns=columns,
        rows=rows,
        truncated=truncated,
        elapsed_s=time.monotonic() - started,
        type_names=types,
    )


def _check_reader(conn: psycopg.Connection[Any], login: str, timeout_s: float) -> None:
    """Refuse a login that is not ``galsift_reader`` or a plain member of it; set the transaction timeout.

    One round trip: the check and, from PostgreSQL 17 on, ``transaction_timeout`` (which cannot
    go in the startup options, older servers would refuse the unknown setting).
    """
    tx_timeout = ""
    params: tuple[Any, ...] = (READER_ROLE,)
    if conn.info.server_version >= 170000:
        # the whole transaction (BEGIN, the query, a cancelled tail) gets a little more
        tx_timeout = ", set_config('transaction_timeout', %s, false)"
        params += (f"{int(timeout_s * 1000) + 1000}",)
    row = conn.execute(
        "SELECT r.rolsuper OR r.rolbypassrls, pg_has_role(session_user, %s, 'MEMBER')"
        + tx_timeout
        + " FROM pg_catalog.pg_roles r WHERE r.rolname = session_user",
        params,
    ).fetchone()
    # committed, not rolled back: a rollback would undo the session setting too (this
    # transaction ran only the statement above)
    conn.commit()
    if row is None or row[0] or not row[1]:
        raise QueryRefused(f"{login} is not a reader role (a member of {READER_ROLE})", reason="permission")


def _stream(
    conn: psycopg.Connection[Any], query: str, max_rows: int
) -> tuple[list[str], list[str], list[tuple[Any, ...]], bool]:
    """Stream at most ``max_rows`` + 1 rows of one statement (extended protocol: one statement only)."""
    rows: list[tuple[Any, ...]] = []
    truncated = False
    with conn.cursor() as cur:
        # stream() always uses the extended query protocol (Parse/Bind/Execute), even without
        # parameters; leaving the generator early cancels the rest of the query
        stream = cast("Generator[Any, None, None]", cur.stream(query, size=CHUNK_ROWS))
        with closing(stream):
            for row in stream:
                if len(rows) == max_rows:
                    truncated = True
                    break
                rows.append(tuple(row))
        description = cur.description
    if description is not None:
        columns = [d.name for d in description]
        types = [_type_name(conn, d.type_code) for d in description]
    else:
        # a query that returned no rows at all leaves psycopg without a description
        columns, types = _describe(conn, query)
    return columns, types, rows, truncated


def _describe(conn: psycopg.Connection[Any], query: str) -> tuple[list[str], list[str]]:
    """Column names and types of a statement, from Parse + Describe (the statement is not executed again)."""
    pgconn = conn.pgconn
    encoding = conn.info.encoding
    parsed = pgconn.prepare(b"", query.encode(encoding))
    if parsed.status != psycopg.pq.ExecStatus.COMMAND_OK:
        return [], []
    described = pgconn.describe_prepared(b"")
    columns = [(described.fname(i) or b"").decode(encoding) for i in range(described.nfields)]
    return columns, [_type_name(conn, described.ftype(i)) for i in range(described.nfields)]


def _type_name(conn: psycopg.Connection[Any], oid: int) -> str:
    info = conn.adapters.types.get(oid)
    return info.name if info is not None else str(oid)


def format_table(result: Result, *, max_width: int = 60) -> str:
    """The result as an aligned text table (long cells, such as vectors, shortened)."""

    def cell(value: Any) -> str:
        text = "" if value is None else str(value)
        text = " ".join(text.split("\n"))
        return text if len(text) <= max_width else text[: max_width - 1] + "…"

    body = [[cell(v) for v in row] for row in result.rows]
    widths = [len(c) for c in result.columns]
    for row in body:
        widths = [max(w, len(v)) for w, v in zip(widths, row, strict=True)]
    lines = [
        " | ".join(c.ljust(w) for c, w in zip(result.columns, widths, strict=True)),
        "-+-".join("-" * w for w in widths),
    ]
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(lines)


def jsonable(value: Any) -> Any:
    """A value as JSON can hold it (UUIDs, times, decimals as strings; jsonb stays structured)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)
