"""Operations: what an operator asks of a running survey monitor.

Ingest rate (tiles per minute, from the ``ingested_at`` index), consumer lag per stage (the
broker's end offsets minus each consumer group's committed offsets), dead letters by reason,
per-worker stage throughput (``stage_stats``), table sizes (PostgreSQL's statistics), model
versions with the serving ones, and the scheduler's job history.
"""

from __future__ import annotations

import streamlit as st

from dashboard import data


def main() -> None:
    """Render the page."""
    st.title("Operations")
    if st.button("Refresh", key="ops_refresh"):
        data.clear_caches()
    sizes = data.table_sizes()
    cols = st.columns(6)
    for col, table in zip(
        cols, ("tiles", "embeddings", "detections", "alerts", "hitl_labels", "ingest_errors"), strict=True
    ):
        col.metric(table.replace("_", " "), f"{sizes.get(table, 0):,}")
    st.caption("Row counts are PostgreSQL's live-tuple statistics (no full count per refresh).")

    left, right = st.columns(2)
    with left:
        st.subheader("Ingest rate")
        per_minute = data.ingest_per_minute(60)
        if per_minute:
            import pandas as pd

            frame = pd.DataFrame(per_minute).set_index("minute")
            st.bar_chart(frame, height=200)
            st.caption(f"{int(frame['tiles'].sum()):,} tiles in the last hour")
        else:
            st.caption("No tile ingested in the last hour.")
    with right:
        st.subheader("Consumer lag")
        lag = data.consumer_lag()
        if isinstance(lag, str):  # the broker away: the page still shows the database's side
            st.warning(f"Kafka did not answer: {lag}")
        else:
            if lag:
                st.dataframe(lag, hide_index=True)
            else:
                st.caption("No consumer group has committed offsets yet.")

    st.subheader("Stages")
    stats = data.stage_stats()
    if stats:
        st.dataframe(
            stats,
            hide_index=True,
            column_config={
                "accepted_per_s": st.column_config.NumberColumn("accepted/s", format="%.1f"),
                "stale": st.column_config.CheckboxColumn("stale (>60 s)"),
            },
        )
        st.caption("Per worker since it started: the encoder's and the detector's rows are their throughput.")
    else:
        st.caption("No stage has reported yet (galsift up starts them).")

    st.subheader("Dead letters")
    by_reason, newest = data.dead_letters()
    if by_reason:
        c1, c2 = st.columns([1, 2])
        c1.dataframe(by_reason, hide_index=True)
        c2.dataframe(newest, hide_index=True)
    else:
        st.caption("No rejected message.")

    c1, c2 = st.columns(2)
    with c1:
        st.subheader("Model versions")
        versions = data.model_versions()
        st.dataframe(
            [
                {
                    "name": v["name"],
                    "variant": v["variant"],
                    "serving": v["serving"],
                    "embeddings (est.)": v["est_rows"],
                    "created_at": v["created_at"],
                }
                for v in versions
            ],
            hide_index=True,
        )
    with c2:
        st.subheader("Scheduled jobs")
        runs = data.job_runs(50)
        if runs:
            st.dataframe(
                [
                    {k: r.get(k) for k in ("job", "outcome", "started_at", "ended_at", "host", "detail")}
                    for r in runs
                ],
                hide_index=True,
            )
        else:
            st.caption("No scheduled job has run yet (galsift scheduler).")


main()
