"""SQL: a console over the documented read-only views, always as the reader role.

Queries go through :func:`db.sql.run_readonly` (the ``galsift_reader`` role: SELECT on the
``galsift_api`` views and functions only, read-only transactions, a statement timeout and a row
limit), the same path as ``galsift sql``. A refused or timed-out statement shows its error and the
app keeps serving. Results show as a table and, where the columns allow, a sky plot (``ra``,
``dec``) or a histogram of a numeric column.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from dashboard import data, widgets

#: example queries (they run as they are; edit them in the box)
EXAMPLES: dict[str, str] = {
    "Lens candidates in a region above 0.9": (
        "SELECT c.tile_id, c.survey, c.external_id, c.ra, c.dec, s.lens_score\n"
        "FROM galsift_api.galsift_cone(150.1, 2.2, 2.0) c\n"
        "JOIN galsift_api.tile_scores s ON s.tile_id = c.tile_id\n"
        "WHERE s.lens_score > 0.9\nORDER BY s.lens_score DESC\nLIMIT 100"
    ),
    "Nearest neighbours of a tile": (
        "SELECT n.rank, n.distance, t.survey, t.external_id, t.ra, t.dec\n"
        "FROM galsift_api.galsift_similar(\n"
        "  (SELECT id FROM galsift_api.tiles ORDER BY ingested_at DESC LIMIT 1), 20) n\n"
        "JOIN galsift_api.tiles t ON t.id = n.tile_id\nORDER BY n.rank"
    ),
    "Embeddings of tiles users call good for a concept": (
        "SELECT c.concept, c.tile_id, c.n_good, e.model_version, e.embedding\n"
        "FROM galsift_api.hitl_label_counts c\n"
        "JOIN galsift_api.embeddings e ON e.tile_id = c.tile_id\n"
        "WHERE c.concept = 'lens' AND c.n_good > 0\nLIMIT 50"
    ),
    "Lens score distribution": (
        "SELECT lens_score FROM galsift_api.tile_scores\nWHERE lens_score IS NOT NULL\nLIMIT 5000"
    ),
    "Newest alerts": (
        "SELECT id, tile_id, ra, dec, score, crossmatch ->> 'known' AS known, model_version, created_at\n"
        "FROM galsift_api.alerts\nORDER BY created_at DESC\nLIMIT 50"
    ),
    "Model versions": "SELECT name, variant, created_at FROM galsift_api.model_versions ORDER BY created_at DESC",
}


def main() -> None:
    """Render the page."""
    st.title("SQL")
    st.caption(
        "Read-only SQL over the documented `galsift_api` views and functions, run as the "
        "`galsift_reader` role with a time limit and a row limit."
    )
    example = st.selectbox("Examples", ["", *EXAMPLES], key="sql_example")
    if example and st.session_state.get("sql_loaded") != example:
        st.session_state["sql_query"] = EXAMPLES[example]
        st.session_state["sql_loaded"] = example
    with st.form("sql_form"):
        query = st.text_area("Query", height=180, key="sql_query")
        run = st.form_submit_button("Run", type="primary", key="sql_run")
    if run and query.strip():
        st.session_state["sql_result"] = _run(query)
    result = st.session_state.get("sql_result")
    if result is None:
        return
    if result.get("error"):
        st.error(result["error"])
        return
    rows: list[dict[str, Any]] = result["rows"]
    st.caption(
        f"{len(rows)} row(s) in {result['ms']:.0f} ms"
        + (" (truncated at the row limit)" if result.get("truncated") else "")
    )
    if not rows:
        return
    _plot(rows)
    st.dataframe(widgets.to_table(rows).to_pandas(), hide_index=True)
    widgets.table_download(rows, name="query", key="sql_export")


def _run(query: str) -> dict[str, Any]:
    import time

    start = time.perf_counter()
    try:
        out = data.run_sql(query)
    except data.SqlRefusedError as exc:
        return {"error": str(exc)}
    return {**out, "ms": 1e3 * (time.perf_counter() - start)}


def _plot(rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    frame = pd.DataFrame(
        [{k: v for k, v in r.items() if isinstance(v, int | float) and not isinstance(v, bool)} for r in rows]
    )
    if {"ra", "dec"} <= set(frame.columns):
        import altair as alt

        sky = frame.dropna(subset=["ra", "dec"])
        colour = next(
            (c for c in ("lens_score", "score", "similarity", "distance") if c in sky.columns), None
        )
        chart = (
            alt.Chart(sky)
            .mark_circle(size=18)
            .encode(
                x=alt.X("ra:Q", title="RA (deg)", scale=alt.Scale(reverse=True, zero=False)),
                y=alt.Y("dec:Q", title="Dec (deg)", scale=alt.Scale(zero=False)),
                **({"color": alt.Color(f"{colour}:Q")} if colour else {}),
            )
            .properties(height=320)
        )
        st.altair_chart(chart, use_container_width=True)
        return
    numeric = [c for c in frame.columns if frame[c].notna().any()]
    if numeric and len(rows) > 1:
        import altair as alt

        col = st.selectbox("Histogram of", numeric, key="sql_hist_col")
        chart = (
            alt.Chart(frame.dropna(subset=[col]))
            .mark_bar()
            .encode(x=alt.X(f"{col}:Q", bin=alt.Bin(maxbins=40)), y=alt.Y("count():Q", title="rows"))
            .properties(height=240)
        )
        st.altair_chart(chart, use_container_width=True)


main()
