"""Alert filters: standing WHERE clauses over ``galsift_api.tile_scores``, their matches and outbox.

A filter (``galsift filter add NAME "WHERE clause"``, or the dashboard) is a user's condition on
the documented view ``galsift_api.tile_scores`` (docs/sql.md); the filter service
(``galsift filters``) runs it over each batch of newly detected tiles and publishes every new
match on the filter's own topic ``filter.<name>`` (and its webhook). This module holds what the
command line, the dashboard and the service share: validation, the table queries and the
outbox.

How a clause is kept harmless (docs/filters.md), all of it decided by PostgreSQL, none of it a
list of forbidden words:

1. **Grammar.** The clause must be exactly one SQL expression: PostgreSQL's own parser
   (libpg_query, through ``pglast``) reads ``SELECT 1 WHERE <clause>`` and it must give one plain
   SELECT whose only part is that WHERE clause. ``1=1) UNION SELECT …``, ``true; DROP …``,
   ``true ORDER BY …`` or an unbalanced parenthesis are therefore refused before anything runs,
   and the clause can be put between parentheses into the service's query without changing its
   meaning.
2. **Privileges, read-only, time.** The query runs through :func:`db.sql.run_readonly`: logged
   in as ``galsift_reader`` (SELECT on the ``galsift_api`` views and nothing else), in a
   read-only transaction that is rolled back, with a statement timeout
   (``settings.filter_timeout_s``).
3. **Scope.** The clause sees only the batch's rows (a subquery fenced with ``OFFSET 0``, so the
   planner cannot evaluate the clause on other tiles first), and every tile the query returns
   must be one of the batch's: anything else is an error, never a match.

Adding a filter runs the same query over the newest tiles plus one row of NULLs (so the clause
is evaluated at least once even on an empty database): a clause that fails or runs out of time
there is refused and nothing is stored.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError

from db.alerts import webhook_target
from db.sql import API_SCHEMA, QueryRefused, Result, run_readonly
from galsift.settings import Settings

#: filter names: they become Kafka topic names (``filter.<name>``) and must be easy to type
NAME_PATTERN = re.compile(r"[a-z0-9_-]{1,64}")
#: prefix of every filter's topic
TOPIC_PREFIX = "filter."
#: longest clause accepted (a filter is a condition, not a program)
MAX_CLAUSE_CHARS = 4000
#: newest tiles the clause is tried on when a filter is added
VALIDATION_SAMPLE = 100
#: longest error text kept on a filter
_MAX_ERROR = 2000


class FilterRefused(Exception):  # noqa: N818 - named like db.sql.QueryRefused, its sibling
    """A filter (or its clause) was refused; ``str()`` is one line fit for a terminal.

    Attributes
    ----------
    reason
        ``name``, ``exists``, ``webhook``, ``syntax``, ``scope``, ``missing``, ``topic`` or one
        of :class:`db.sql.QueryRefused`'s reasons (``permission``, ``read-only``, ``timeout``,
        ``connection``, ...).
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class FilterInfo:
    """A stored filter as users list it (the webhook shown as its name, never its URL)."""

    id: int
    name: str
    owner: str
    clause: str
    topic: str
    webhook: str | None
    active: bool
    error_count: int
    last_error: str | None
    last_error_at: datetime | None
    created_at: datetime
    matches: int = 0
    published: int = 0
    webhook_sent: int = 0
    webhook_failed: int = 0

    def as_row(self) -> dict[str, Any]:
        """A JSON-safe row (``galsift filter list --json``, the dashboard's table)."""
        return {
            "name": self.name,
            "owner": self.owner,
            "clause": self.clause,
            "topic": self.topic,
            "webhook": self.webhook,
            "active": self.active,
            "matches": self.matches,
            "published": self.published,
            "webhook_sent": self.webhook_sent,
            "webhook_failed": self.webhook_failed,
            "error_count": self.error_count,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at.isoformat(timespec="seconds") if self.last_error_at else None,
            "created_at": self.created_at.isoformat(timespec="seconds"),
        }


@dataclass(frozen=True)
class ActiveFilter:
    """What the filter service needs of a filter."""

    id: int
    name: str
    clause: str
    topic: str
    created_at: datetime


# -- validation ----------------------------------------------------------------------------------------
def topic_for(name: str) -> str:
    """The Kafka topic of filter ``name`` (``filter.<name>``), after checking the name.

    Raises
    ------
    FilterRefused
        When the name is not 1-64 characters of ``[a-z0-9_-]``.
    """
    if not NAME_PATTERN.fullmatch(name):
        raise FilterRefused(
            f"invalid filter name {name[:80]!r}: use 1-64 characters of a-z, 0-9, '_' and '-'",
            reason="name",
        )
    return TOPIC_PREFIX + name


def check_clause(clause: str) -> None:
    """Refuse a clause that is not exactly one SQL expression, by PostgreSQL's own grammar.

    The clause is parsed as ``SELECT 1 WHERE <clause>`` by libpg_query (PostgreSQL's parser, via
    ``pglast``); the result must be one plain SELECT whose only part is its WHERE clause. No word
    is looked at: what the expression may *do* is decided by the reader role's privileges, the
    read-only transaction and the timeout when it runs.

    Raises
    ------
    FilterRefused
        ``syntax``: empty, too long, not parseable, several statements, or more than a WHERE
        clause (a set operation, ORDER BY, LIMIT, GROUP BY, locking, ...).
    """
    from pglast import ast, enums, parse_sql
    from pglast.parser import ParseError

    if not clause.strip():
        raise FilterRefused("empty clause: give a condition such as 'lens_score > 0.9'", reason="syntax")
    if len(clause) > MAX_CLAUSE_CHARS:
        raise FilterRefused(f"clause longer than {MAX_CLAUSE_CHARS} characters", reason="syntax")
    if "\x00" in clause:
        raise FilterRefused("clause contains a NUL character", reason="syntax")
    # newlines around the clause: a trailing -- comment cannot swallow what follows it
    try:
        statements = parse_sql(f"SELECT 1 WHERE\n{clause}\n")
    except ParseError as exc:
        # pglast's offsets count from the wrapper; its message names the token, which is clearer
        message = re.sub(r", at index \d+$", "", str(exc))
        raise FilterRefused(f"not a WHERE clause: {' '.join(message.split())}", reason="syntax") from None
    if len(statements) != 1:
        raise FilterRefused("a filter is one condition, not several statements", reason="syntax")
    stmt = statements[0].stmt
    extra = []
    if not isinstance(stmt, ast.SelectStmt):  # pragma: no cover - the wrapper is a SELECT
        extra.append(type(stmt).__name__)
    else:
        if stmt.op != enums.SetOperation.SETOP_NONE:
            extra.append("a set operation (UNION, INTERSECT, EXCEPT)")
        parts = {
            "withClause": "WITH",
            "distinctClause": "DISTINCT",
            "intoClause": "INTO",
            "fromClause": "FROM",
            "groupClause": "GROUP BY",
            "havingClause": "HAVING",
            "windowClause": "WINDOW",
            "valuesLists": "VALUES",
            "sortClause": "ORDER BY",
            "limitOffset": "OFFSET",
            "limitCount": "LIMIT",
            "lockingClause": "FOR UPDATE/SHARE",
        }
        extra += [label for attr, label in parts.items() if getattr(stmt, attr, None)]
        if stmt.whereClause is None:  # pragma: no cover - an empty clause does not parse
            extra.append("no condition")
    if extra:
        raise FilterRefused(
            "a filter is one condition over tile_scores, not a query: found " + ", ".join(extra),
            reason="syntax",
        )


def _ids_literal(tile_ids: Sequence[str]) -> str:
    # UUIDs only, each parsed here: nothing but hex digits and dashes reaches the statement
    return "ARRAY[" + ",".join(f"'{uuid.UUID(str(t))}'" for t in tile_ids) + "]::uuid[]"


def match_query(clause: str, tile_ids: Sequence[str], *, null_row: bool = False) -> str:
    """The statement that runs ``clause`` over the given tiles' rows of ``tile_scores``.

    The batch's rows are a subquery fenced with ``OFFSET 0``, so the planner cannot push the
    clause down and evaluate it on other tiles first (costing time, or failing on their values);
    the subquery is named ``tile_scores``, so ``tile_scores.<column>`` works in the clause as
    in the view. ``null_row`` adds one row of NULLs (validation: the clause runs at least once).
    """
    rows = f"SELECT * FROM {API_SCHEMA}.tile_scores WHERE tile_id = ANY({_ids_literal(tile_ids)}) OFFSET 0"
    if null_row:
        rows = (
            f"({rows}) UNION ALL (SELECT s.* FROM (VALUES (1)) AS v(x) "
            f"LEFT JOIN {API_SCHEMA}.tile_scores s ON false)"
        )
    # the clause on lines of its own, between parentheses: check_clause proved it one expression
    return f"SELECT tile_scores.tile_id FROM ({rows}) AS tile_scores WHERE (\n{clause}\n)"


def run_clause(settings: Settings, clause: str, tile_ids: Sequence[str], *, timeout_s: float) -> list[str]:
    """The tiles among ``tile_ids`` whose ``tile_scores`` row satisfies ``clause``, run as the reader.

    Parameters
    ----------
    settings
        Where the database is.
    clause
        The filter's WHERE clause (checked again here: a row may have been written by hand).
    tile_ids
        The batch's tiles.
    timeout_s
        Statement timeout of the query.

    Returns
    -------
    list of str
        Matching tile ids, each once, in the order given.

    Raises
    ------
    FilterRefused
        The clause is not one expression, the server refused it (privileges, read-only, syntax,
        types), it ran out of time, or it returned rows that are not the batch's (``scope``).
        ``reason == "connection"`` means the database could not be reached: not the clause's
        fault.
    """
    check_clause(clause)
    if not tile_ids:
        return []
    try:
        result = run_readonly(
            settings, match_query(clause, tile_ids), max_rows=len(tile_ids) + 1, timeout_s=timeout_s
        )
    except QueryRefused as exc:
        raise FilterRefused(str(exc), reason=exc.reason) from None
    return _within(result, [str(uuid.UUID(str(t))) for t in tile_ids], allow_null=False)


def _within(result: Result, tile_ids: Sequence[str], *, allow_null: bool) -> list[str]:
    """Check that a match query returned only the given tiles (and at most once each)."""
    wanted = set(tile_ids)
    got: list[str] = []
    for row in result.rows:
        if row[0] is None and allow_null:
            continue
        tile = str(row[0]) if row else ""
        if tile not in wanted:
            raise FilterRefused(
                "the clause returned a tile outside the rows it was given: a filter is a condition on "
                "each tile_scores row",
                reason="scope",
            )
        got.append(tile)
    if result.truncated or len(got) != len(set(got)):
        raise FilterRefused("the clause returned a tile more than once", reason="scope")
    order = {t: i for i, t in enumerate(tile_ids)}
    return sorted(got, key=order.__getitem__)


def validate_clause(
    settings: Settings, engine: Engine, clause: str, *, timeout_s: float | None = None
) -> int:
    """Check a clause as :func:`add_filter` does: grammar, then a run as the reader.

    The run covers the ``VALIDATION_SAMPLE`` newest tiles and one row of NULLs, so the clause is
    evaluated at least once even on an empty database, within the same time limit the service
    gives it per batch.

    Returns
    -------
    int
        How many of the sampled tiles match (a hint for the user).

    Raises
    ------
    FilterRefused
        As :func:`run_clause`.
    """
    check_clause(clause)
    timeout = timeout_s if timeout_s is not None else settings.filter_timeout_s
    with engine.connect() as conn:
        sample = [
            str(r[0])
            for r in conn.execute(
                text("SELECT id FROM tiles ORDER BY ingested_at DESC LIMIT :n"), {"n": VALIDATION_SAMPLE}
            )
        ]
    try:
        result = run_readonly(
            settings,
            match_query(clause, sample, null_row=True),
            max_rows=len(sample) + 2,
            timeout_s=timeout,
        )
    except QueryRefused as exc:
        raise FilterRefused(str(exc), reason=exc.reason) from None
    return len(_within(result, sample, allow_null=True))


# -- managing filters ----------------------------------------------------------------------------------
def add_filter(
    settings: Settings,
    engine: Engine,
    name: str,
    clause: str,
    *,
    owner: str,
    webhook_url: str | None = None,
    create_topic: bool = True,
) -> FilterInfo:
    """Validate a filter, create its topic and store it; nothing is stored when it is refused.

    Parameters
    ----------
    settings
        Database and Kafka settings; ``filter_timeout_s`` bounds the check.
    engine
        The galsift database (as its owner).
    name
        ``[a-z0-9_-]{1,64}``; the topic is ``filter.<name>``.
    clause
        A WHERE clause over ``galsift_api.tile_scores`` (docs/filters.md).
    owner
        The user the filter belongs to.
    webhook_url
        Optional http(s) URL that receives each match as JSON.
    create_topic
        Create the topic now (the service also creates missing topics when it starts a filter).

    Returns
    -------
    FilterInfo
        The stored filter.

    Raises
    ------
    FilterRefused
        The name, webhook or clause is refused, a filter of that name exists, or the topic could
        not be created.
    """
    topic = topic_for(name)
    if not owner or len(owner) > 128:
        raise FilterRefused("owner must be 1-128 characters", reason="name")
    if webhook_url is not None and not webhook_url.startswith(("http://", "https://")):
        raise FilterRefused("the webhook must be an http(s) URL", reason="webhook")
    if get_filter(engine, name) is not None:
        raise FilterRefused(f"a filter named {name!r} exists already", reason="exists")
    validate_clause(settings, engine, clause)
    if create_topic:
        ensure_filter_topics(settings, [topic])
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO alert_filters (name, owner, clause, topic, webhook_url, active, error_count) "
                    "VALUES (:n, :o, :c, :t, :w, true, 0)"
                ),
                {"n": name, "o": owner, "c": clause, "t": topic, "w": webhook_url},
            )
    except IntegrityError:
        raise FilterRefused(f"a filter named {name!r} exists already", reason="exists") from None
    info = get_filter(engine, name)
    assert info is not None
    return info


def ensure_filter_topics(settings: Settings, topics: Sequence[str]) -> None:
    """Create the filters' topics that are missing (with ``kafka_partitions`` partitions).

    Raises
    ------
    FilterRefused
        ``topic``: the broker could not be reached or refused.
    """
    from kafka.errors import KafkaError

    from galsift.kafka import ensure_topics

    try:
        ensure_topics(settings, extra=tuple(topics), timeout_s=30.0)
    except KafkaError as exc:
        raise FilterRefused(f"cannot create topics {', '.join(topics)}: {exc}", reason="topic") from None


_LIST = (
    "SELECT f.id, f.name, f.owner, f.clause, f.topic, f.webhook_url, f.active, f.error_count, "
    "f.last_error, f.last_error_at, f.created_at, "
    "count(m.id) AS matches, count(m.id) FILTER (WHERE m.topic_state = 'published') AS published, "
    "count(m.id) FILTER (WHERE m.webhook_state = 'sent') AS webhook_sent, "
    "count(m.id) FILTER (WHERE m.webhook_state = 'failed') AS webhook_failed "
    "FROM alert_filters f LEFT JOIN filter_matches m ON m.filter_id = f.id "
)


def _info(r: Any) -> FilterInfo:
    return FilterInfo(
        id=int(r["id"]),
        name=r["name"],
        owner=r["owner"],
        clause=r["clause"],
        topic=r["topic"],
        webhook=webhook_target(r["webhook_url"]) if r["webhook_url"] else None,
        active=bool(r["active"]),
        error_count=int(r["error_count"]),
        last_error=r["last_error"],
        last_error_at=r["last_error_at"],
        created_at=r["created_at"],
        matches=int(r["matches"]),
        published=int(r["published"]),
        webhook_sent=int(r["webhook_sent"]),
        webhook_failed=int(r["webhook_failed"]),
    )


def list_filters(engine: Engine, *, owner: str | None = None) -> list[FilterInfo]:
    """The stored filters (only ``owner``'s when given), by name, with their match counts."""
    where = "WHERE f.owner = :o " if owner is not None else ""
    with engine.connect() as conn:
        rows = conn.execute(text(_LIST + where + "GROUP BY f.id ORDER BY f.name"), {"o": owner}).mappings()
        return [_info(r) for r in rows]


def get_filter(engine: Engine, name: str) -> FilterInfo | None:
    """One filter by name, or None."""
    with engine.connect() as conn:
        row = conn.execute(text(_LIST + "WHERE f.name = :n GROUP BY f.id"), {"n": name}).mappings().first()
    return _info(row) if row is not None else None


def remove_filter(engine: Engine, name: str, *, owner: str | None = None) -> bool:
    """Delete a filter and its matches (its topic is kept for subscribers); False if none was found.

    With ``owner``, only that user's filter of that name is removed (the dashboard passes the
    logged-in user, so nobody removes another's filter).
    """
    sql = "DELETE FROM alert_filters WHERE name = :n" + (" AND owner = :o" if owner is not None else "")
    with engine.begin() as conn:
        return conn.execute(text(sql + " RETURNING id"), {"n": name, "o": owner}).first() is not None


def dry_run(
    settings: Settings,
    engine: Engine,
    name_or_clause: str,
    *,
    limit: int = 20,
    timeout_s: float = 30.0,
) -> tuple[str, Result]:
    """Run a stored filter (by name) or a clause over the existing tiles, newest first; stores nothing.

    Returns
    -------
    tuple of (str, Result)
        The clause that ran, and the matching rows (``tile_id``, ``survey``, ``external_id``,
        ``ra``, ``dec``, ``lens_score``, ``lens_model_version``), at most ``limit``.

    Raises
    ------
    FilterRefused
        As :func:`run_clause` (the reader role, read-only, ``timeout_s``).
    """
    stored = get_filter(engine, name_or_clause) if NAME_PATTERN.fullmatch(name_or_clause) else None
    clause = stored.clause if stored is not None else name_or_clause
    check_clause(clause)
    query = (
        "SELECT tile_id, survey, external_id, ra, dec, lens_score, lens_model_version "
        f"FROM {API_SCHEMA}.tile_scores WHERE (\n{clause}\n)\nORDER BY ingested_at DESC, tile_id"
    )
    try:
        return clause, run_readonly(settings, query, max_rows=limit, timeout_s=timeout_s)
    except QueryRefused as exc:
        raise FilterRefused(str(exc), reason=exc.reason) from None


# -- the filter service's side -------------------------------------------------------------------------
def filters_stamp(engine: Engine) -> tuple[int, datetime | None]:
    """(count, newest change) of the filters: the service reloads them when it moves."""
    with engine.connect() as conn:
        row = conn.execute(text("SELECT count(*), max(updated_at) FROM alert_filters")).one()
    return int(row[0]), row[1]


def active_filters(engine: Engine) -> list[ActiveFilter]:
    """The active filters, oldest first."""
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT id, name, clause, topic, created_at FROM alert_filters WHERE active ORDER BY id")
        ).mappings()
        return [ActiveFilter(int(r["id"]), r["name"], r["clause"], r["topic"], r["created_at"]) for r in rows]


def record_filter_error(engine: Engine, filter_id: int, error: str) -> None:
    """Count a batch on which a filter failed and keep the error (its owner sees it in the list)."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE alert_filters SET error_count = error_count + 1, last_error = :e, "
                "last_error_at = now() WHERE id = :i"
            ),
            {"i": filter_id, "e": error[:_MAX_ERROR]},
        )


@dataclass(frozen=True)
class NewMatch:
    """A match this call stored (a replayed batch stores none)."""

    id: int
    filter_id: int
    tile_id: str
    webhook: bool


def store_matches(
    engine: Engine, matches: Iterable[tuple[int, str, Sequence[str]]], *, now: datetime | None = None
) -> list[NewMatch]:
    """Store (filter, tile, model versions) matches with their outbox states, once per (filter, tile).

    The message body is taken from ``galsift_api.tile_scores`` now, in the same transaction, so the
    topic and the webhook carry the scores the clause saw. ``ON CONFLICT DO NOTHING`` on
    (filter, tile) makes a replayed batch store, and so publish, nothing.

    Returns
    -------
    list of NewMatch
        The rows created.
    """
    rows = list(dict.fromkeys((int(f), str(uuid.UUID(str(t))), tuple(v)) for f, t, v in matches))
    if not rows:
        return []
    stamp = now or datetime.now(UTC)
    with engine.begin() as conn:
        scores = {
            str(r["tile_id"]): r
            for r in conn.execute(
                text(
                    "SELECT tile_id, survey, external_id, ra, dec, lens_score, lens_model_version, "
                    f"morphology, morphology_model_version FROM {API_SCHEMA}.tile_scores "
                    "WHERE tile_id = ANY(:ids)"
                ),
                {"ids": [uuid.UUID(t) for _, t, _ in rows]},
            ).mappings()
        }
        hooks = {
            int(r[0]): bool(r[1])
            for r in conn.execute(
                text("SELECT id, webhook_url IS NOT NULL FROM alert_filters WHERE id = ANY(:f)"),
                {"f": sorted({f for f, _, _ in rows})},
            )
        }
        values = []
        for f, t, versions in rows:
            s = scores.get(t)
            if s is None or f not in hooks:  # tile or filter deleted since the batch was read
                continue
            values.append(
                {
                    "f": f,
                    "t": uuid.UUID(t),
                    "payload": {
                        "tile_id": t,
                        "survey": s["survey"],
                        "external_id": s["external_id"],
                        "ra": s["ra"],
                        "dec": s["dec"],
                        "lens_score": s["lens_score"],
                        "lens_model_version": s["lens_model_version"],
                        "morphology": {k: float(v) for k, v in (s["morphology"] or {}).items()},
                        "morphology_model_version": s["morphology_model_version"],
                        "model_versions": list(versions),
                        "matched_at_ms": int(stamp.timestamp() * 1000),
                    },
                    "ws": "pending" if hooks[f] else None,
                    "due": stamp if hooks[f] else None,
                }
            )
        if not values:
            return []
        from sqlalchemy.dialects.postgresql import insert

        from db.models import FilterMatch

        table = FilterMatch.__table__  # type: ignore[attr-defined]
        stmt = (
            insert(table)
            .values(
                [
                    {
                        "filter_id": v["f"],
                        "tile_id": v["t"],
                        "payload": v["payload"],
                        "topic_state": "pending",
                        "webhook_state": v["ws"],
                        "webhook_attempts": 0,
                        "webhook_next_at": v["due"],
                    }
                    for v in values
                ]
            )
            .on_conflict_do_nothing(constraint="uq_filter_matches_filter_tile")
            .returning(table.c.id, table.c.filter_id, table.c.tile_id, table.c.webhook_state)
        )
        created = conn.execute(stmt).all()
    return [NewMatch(int(r[0]), int(r[1]), str(r[2]), r[3] is not None) for r in created]


# -- the topic outbox ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TopicClaim:
    """A match the publisher holds (state ``sending``): publish ``value`` on ``topic``."""

    id: int
    filter_name: str
    topic: str
    tile_id: str
    value: dict[str, Any]


def _message(row: Any) -> dict[str, Any]:
    """The ``filter_match.v1`` record of a match row."""
    p = dict(row["payload"])
    return {
        "match_id": int(row["id"]),
        "filter": row["name"],
        "tile_id": p["tile_id"],
        "survey": p["survey"],
        "external_id": p["external_id"],
        "ra": p["ra"],
        "dec": p["dec"],
        "lens_score": p["lens_score"],
        "lens_model_version": p["lens_model_version"],
        "morphology": p["morphology"],
        "morphology_model_version": p["morphology_model_version"],
        "model_versions": p["model_versions"],
        "matched_at": datetime.fromtimestamp(p["matched_at_ms"] / 1000, UTC),
    }


def topics_with_unpublished(engine: Engine) -> list[tuple[int, str]]:
    """(filter id, topic) of the filters that have pending matches."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT f.id, f.topic FROM alert_filters f WHERE EXISTS (SELECT 1 FROM filter_matches m "
                "WHERE m.filter_id = f.id AND m.topic_state = 'pending') ORDER BY f.id"
            )
        )
        return [(int(r[0]), str(r[1])) for r in rows]


def claim_unpublished(
    engine: Engine, filter_id: int, *, scan_from: dict[int, int], limit: int
) -> list[TopicClaim]:
    """Take a filter's oldest pending matches (``FOR UPDATE SKIP LOCKED``) and mark them ``sending``.

    ``scan_from`` (partition -> end offset of the topic now) is stored with them: should the
    publisher stop before it marks them published, the next one reads the topic from there to
    find out which of them made it (:func:`in_doubt`).
    """
    with engine.begin() as conn:
        rows = conn.execute(
            text(
                "WITH due AS (SELECT id FROM filter_matches WHERE filter_id = :f AND topic_state = 'pending' "
                "ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED) "
                "UPDATE filter_matches m SET topic_state = 'sending', topic_scan_from = CAST(:scan AS jsonb) "
                "FROM due, alert_filters f WHERE m.id = due.id AND f.id = m.filter_id "
                "RETURNING m.id, m.payload, m.tile_id, f.name, f.topic"
            ),
            {"f": filter_id, "n": limit, "scan": _json({str(k): int(v) for k, v in scan_from.items()})},
        ).mappings()
        claims = [
            TopicClaim(int(r["id"]), r["name"], r["topic"], str(r["tile_id"]), _message(r)) for r in rows
        ]
    return sorted(claims, key=lambda c: c.id)


def _json(value: Any) -> str:
    return json.dumps(value)


@dataclass(frozen=True)
class InDoubt:
    """Matches of one topic left ``sending`` by a publisher that stopped, and where to look for them."""

    topic: str
    ids: list[int]
    #: partition -> the smallest offset any of them could have been written at
    scan_from: dict[int, int]


def in_doubt(engine: Engine) -> list[InDoubt]:
    """The matches left ``sending``, grouped by topic (a publisher stopped between send and mark)."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT m.id, m.topic_scan_from, f.topic FROM filter_matches m "
                "JOIN alert_filters f ON f.id = m.filter_id WHERE m.topic_state = 'sending' ORDER BY m.id"
            )
        ).all()
    out: dict[str, InDoubt] = {}
    for match_id, scan, topic in rows:
        entry = out.setdefault(topic, InDoubt(topic, [], {}))
        entry.ids.append(int(match_id))
        for p, offset in (scan or {}).items():
            part = int(p)
            entry.scan_from[part] = min(int(offset), entry.scan_from.get(part, int(offset)))
    return list(out.values())


def mark_published(engine: Engine, placed: Sequence[tuple[int, int, int]]) -> int:
    """Mark matches published at (match id, partition, offset); returns how many were ``sending``."""
    if not placed:
        return 0
    with engine.begin() as conn:
        result = conn.execute(
            text(
                "UPDATE filter_matches m SET topic_state = 'published', published_at = now(), "
                "topic_partition = p.part, topic_offset = p.off, topic_scan_from = NULL "
                "FROM unnest(CAST(:i AS bigint[]), CAST(:p AS int[]), CAST(:o AS bigint[])) AS p(id, part, off) "
                "WHERE m.id = p.id AND m.topic_state = 'sending'"
            ),
            {"i": [p[0] for p in placed], "p": [p[1] for p in placed], "o": [p[2] for p in placed]},
        )
        return int(result.rowcount or 0)


def release_unpublished(engine: Engine, ids: Sequence[int]) -> int:
    """Put ``sending`` matches back to ``pending`` (they are not on their topic)."""
    if not ids:
        return 0
    with engine.begin() as conn:
        result = conn.execute(
            text(
                "UPDATE filter_matches SET topic_state = 'pending', topic_scan_from = NULL "
                "WHERE id = ANY(:i) AND topic_state = 'sending'"
            ),
            {"i": list(ids)},
        )
        return int(result.rowcount or 0)


# -- the webhook outbox ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WebhookClaim:
    """A webhook call the sender holds until its lease ends."""

    id: int
    filter_name: str
    url: str | None
    attempts: int
    body: dict[str, Any]


def claim_webhooks(
    engine: Engine, *, limit: int, lease: timedelta = timedelta(minutes=5), now: datetime | None = None
) -> list[WebhookClaim]:
    """Take up to ``limit`` due webhook calls (``FOR UPDATE SKIP LOCKED``) and lease them.

    The lease moves ``webhook_next_at`` past the call's end, so two senders never hold one call and
    a sender that died gives it back when the lease runs out (the call may then be made twice:
    receivers deduplicate on the ``X-Galsift-Match`` header).
    """
    stamp = now or datetime.now(UTC)
    with engine.begin() as conn:
        rows = conn.execute(
            text(
                "WITH due AS (SELECT id FROM filter_matches WHERE webhook_state = 'pending' "
                "AND webhook_next_at <= :now ORDER BY webhook_next_at, id LIMIT :n FOR UPDATE SKIP LOCKED) "
                "UPDATE filter_matches m SET webhook_attempts = m.webhook_attempts + 1, webhook_next_at = :until "
                "FROM due, alert_filters f WHERE m.id = due.id AND f.id = m.filter_id "
                "RETURNING m.id, m.payload, m.webhook_attempts, f.name, f.webhook_url"
            ),
            {"now": stamp, "until": stamp + lease, "n": limit},
        ).mappings()
        claims = []
        for r in rows:
            message = _message(r)
            body = {
                **{k: v for k, v in message.items() if k != "matched_at"},
                "matched_at": message["matched_at"].isoformat(timespec="milliseconds"),
                # Slack-compatible incoming webhooks show "text"
                "text": (
                    f"galsift filter {r['name']}: {message['survey']}/{message['external_id']} "
                    f"(lens score {message['lens_score'] if message['lens_score'] is not None else 'n/a'})"
                ),
            }
            claims.append(
                WebhookClaim(int(r["id"]), r["name"], r["webhook_url"], int(r["webhook_attempts"]), body)
            )
    return sorted(claims, key=lambda c: c.id)


def record_webhook(
    engine: Engine,
    claim: WebhookClaim,
    *,
    ok: bool,
    status: int | None = None,
    error: str | None = None,
    retry_at: datetime | None = None,
) -> str | None:
    """Store a call's outcome: ``sent``, ``pending`` again until ``retry_at``, or ``failed`` (no ``retry_at``).

    Returns the new state, or None when the call was no longer this claim's (its lease ran out and
    another sender took it).
    """
    state = "sent" if ok else ("pending" if retry_at is not None else "failed")
    with engine.begin() as conn:
        row = conn.execute(
            text(
                "UPDATE filter_matches SET webhook_state = CAST(:s AS varchar), webhook_status = :st, "
                "webhook_error = :e, webhook_next_at = coalesce(CAST(:r AS timestamptz), webhook_next_at), "
                "webhook_sent_at = CASE WHEN CAST(:s AS varchar) = 'sent' THEN now() ELSE webhook_sent_at END "
                "WHERE id = :i AND webhook_state = 'pending' AND webhook_attempts = :a RETURNING id"
            ),
            {
                "s": state,
                "st": status,
                "e": error[:_MAX_ERROR] if error else None,
                "r": retry_at,
                "i": claim.id,
                "a": claim.attempts,
            },
        ).first()
    return state if row is not None else None


def release_webhook_claims(
    engine: Engine, claims: Sequence[WebhookClaim], *, now: datetime | None = None
) -> int:
    """Make claimed calls due at ``now`` again, unless their outcome was recorded; returns how many.

    For a sender whose round the database left before the outcomes were stored: without this
    the calls would wait for their lease (a whole round's calls long). A call that was made
    comes again as its next attempt, which the receiver drops by its ``X-Galsift-Match`` id.
    ``now`` is the sender's clock, as :func:`claim_webhooks` compares with it (the database's
    clock may run ahead of it).
    """
    if not claims:
        return 0
    with engine.begin() as conn:
        result = conn.execute(
            text(
                "UPDATE filter_matches m SET webhook_next_at = :now "
                "FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS integer[])) AS c(id, attempts) "
                "WHERE m.id = c.id AND m.webhook_attempts = c.attempts AND m.webhook_state = 'pending'"
            ),
            {
                "ids": [c.id for c in claims],
                "attempts": [c.attempts for c in claims],
                "now": now or datetime.now(UTC),
            },
        )
        return int(result.rowcount)


def matches(engine: Engine, name: str, *, limit: int = 100) -> list[dict[str, Any]]:
    """A filter's newest matches with their delivery states (dashboard, ``galsift filter list``)."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT m.id, m.tile_id, m.payload, m.topic_state, m.topic_partition, m.topic_offset, "
                "m.webhook_state, m.webhook_attempts, m.webhook_error, m.created_at FROM filter_matches m "
                "JOIN alert_filters f ON f.id = m.filter_id WHERE f.name = :n ORDER BY m.id DESC LIMIT :l"
            ),
            {"n": name, "l": limit},
        ).mappings()
        return [dict(r) for r in rows]


__all__ = [
    "MAX_CLAUSE_CHARS",
    "NAME_PATTERN",
    "TOPIC_PREFIX",
    "ActiveFilter",
    "FilterInfo",
    "FilterRefused",
    "InDoubt",
    "NewMatch",
    "TopicClaim",
    "WebhookClaim",
    "active_filters",
    "add_filter",
    "check_clause",
    "claim_unpublished",
    "claim_webhooks",
    "dry_run",
    "ensure_filter_topics",
    "filters_stamp",
    "get_filter",
    "in_doubt",
    "list_filters",
    "mark_published",
    "match_query",
    "matches",
    "record_filter_error",
    "record_webhook",
    "release_unpublished",
    "remove_filter",
    "run_clause",
    "store_matches",
    "topic_for",
    "validate_clause",
]
