"""``galsift sql "QUERY"``: one read-only query as the reader role, printed as a table, JSON or CSV.

The command only parses arguments and prints; :func:`db.sql.run_readonly` logs in as
``galsift_reader`` and lets the server's privileges, a read-only transaction and timeouts decide
what runs (docs/sql.md). A refusal is one line on stderr and exit status 2; a connection failure
exits 3.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import TYPE_CHECKING

from galsift.settings import Settings

if TYPE_CHECKING:
    from galsift.cli import CommandGroups

#: exit status of a refused query (privileges, read-only, timeout, syntax, not a query)
EXIT_REFUSED = 2
#: exit status when the database cannot be reached as the reader
EXIT_CONNECTION = 3


def register(groups: CommandGroups) -> None:
    """Add ``galsift sql`` to the command line."""
    from db.sql import DEFAULT_MAX_ROWS, DEFAULT_TIMEOUT_S, READER_ROLE

    p = groups.top.add_parser(
        "sql",
        help="one read-only query over the documented views (docs/sql.md) as the reader role",
        description=(
            "Run one read-only query as the galsift_reader role over the galsift_api views and "
            "functions (docs/sql.md). Exits 2 with one line on stderr when the query is refused "
            "or times out."
        ),
    )
    p.add_argument("query", help='one SQL statement returning rows, e.g. "SELECT * FROM tiles LIMIT 5"')
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print one JSON object (columns, rows, truncated)")
    fmt.add_argument("--csv", action="store_true", help="print CSV with a header row")
    p.add_argument(
        "--max-rows",
        type=int,
        default=DEFAULT_MAX_ROWS,
        metavar="N",
        help=f"keep at most N rows; more are cut and reported (default: {DEFAULT_MAX_ROWS})",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"statement timeout in seconds (default: {DEFAULT_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--user",
        default=READER_ROLE,
        metavar="ROLE",
        help=f"log in as this member of {READER_ROLE} (its my_* views show that user's rows)",
    )
    p.set_defaults(func=_sql)


def _sql(args: argparse.Namespace, settings: Settings) -> int:
    from db.sql import QueryRefused, format_table, jsonable, run_readonly

    try:
        result = run_readonly(
            settings, args.query, max_rows=args.max_rows, timeout_s=args.timeout, login=args.user
        )
    except QueryRefused as exc:
        print(f"galsift sql: {exc}", file=sys.stderr)
        return EXIT_CONNECTION if exc.reason == "connection" else EXIT_REFUSED
    out = sys.stdout
    if args.json:
        json.dump(
            {
                "command": "sql",
                "columns": result.columns,
                "types": result.type_names,
                "rows": [[jsonable(v) for v in row] for row in result.rows],
                "truncated": result.truncated,
                "elapsed_s": round(result.elapsed_s, 4),
            },
            out,
        )
        out.write("\n")
    elif args.csv:
        writer = csv.writer(out)
        writer.writerow(result.columns)
        for row in result.rows:
            writer.writerow(
                [
                    "" if v is None else json.dumps(jsonable(v)) if isinstance(v, dict | list) else v
                    for v in row
                ]
            )
    else:
        out.write(format_table(result) + "\n")
        out.write(
            f"({len(result.rows)} row{'s' if len(result.rows) != 1 else ''}, {result.elapsed_s:.2f} s)\n"
        )
    if result.truncated:
        # on stderr, so JSON and CSV on stdout stay machine-readable
        print(
            f"galsift sql: result cut at {args.max_rows} rows (--max-rows); add LIMIT/ORDER BY or raise it",
            file=sys.stderr,
        )
    return 0
