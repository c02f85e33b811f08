"""The grammar check of alert-filter clauses (PostgreSQL's own parser, through pglast) and names.

What a clause may *do* is the reader role's business (tests/integration/test_alert_filters.py);
here only its shape: exactly one expression, so that it can be put between parentheses in the
filter service's query without changing what that query is.
"""

from __future__ import annotations

import pytest

from db.filters import FilterRefused, check_clause, match_query, topic_for


@pytest.mark.parametrize(
    "clause",
    [
        "lens_score > 0.9",
        "lens_score > 0.9 AND dec < 0",
        "(morphology ->> 'spiral')::float > 0.8 OR lens_score IS NULL",
        "EXISTS (SELECT 1 FROM detections d WHERE d.tile_id = tile_scores.tile_id AND d.score > 0.5)",
        "tile_id IN (SELECT tile_id FROM galsift_cone(150.1, 2.2, 1.5))",
        "survey = 'legacy' -- a trailing comment",
        "ra BETWEEN 10 AND 20 /* a closed comment */ AND true",
        "lens_score > 0.5 AND 'a;b' <> ')'",
    ],
)
def test_one_expression_is_accepted(clause: str) -> None:
    check_clause(clause)
    # between parentheses, on lines of their own: a trailing comment swallows nothing after it
    assert match_query(clause, ["6f1c0d3e-0000-4000-8000-000000000000"]).endswith(f"(\n{clause}\n)")


@pytest.mark.parametrize(
    ("clause", "why"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("1=1) UNION SELECT id FROM tiles --", "syntax error"),
        ("true) OR (true", "syntax error"),
        ("true; DROP TABLE tiles", "several statements"),
        ("true UNION SELECT 1", "set operation"),
        ("true ORDER BY 1", "ORDER BY"),
        ("true LIMIT 1", "LIMIT"),
        ("true OFFSET 1", "OFFSET"),
        ("true FOR UPDATE", "FOR UPDATE"),
        ("true GROUP BY 1 HAVING true", "GROUP BY"),
        ("true WINDOW w AS ()", "WINDOW"),
        ("x = 1 /*", "unterminated"),
        ("x = 'open", "unterminated"),
        ("x = $$open", "unterminated"),
        ("x" * 5000, "longer than"),
        ("a\x00b", "NUL"),
    ],
)
def test_anything_but_one_expression_is_refused(clause: str, why: str) -> None:
    with pytest.raises(FilterRefused, match=why) as info:
        check_clause(clause)
    assert info.value.reason == "syntax"
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["lenses", "ring_2", "a-b", "x" * 64])
def test_names_become_topics(name: str) -> None:
    assert topic_for(name) == f"filter.{name}"


@pytest.mark.parametrize("name", ["", "Lenses", "a.b", "a b", "../x", "x" * 65, "é"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(FilterRefused, match="invalid filter name"):
        topic_for(name)


def test_tile_ids_reach_the_query_only_as_uuids() -> None:
    with pytest.raises(ValueError):
        match_query("true", ["'); DROP TABLE tiles; --"])
