"""Alert filters: a user's standing WHERE clauses, as Lasair users know them (docs/filters.md).

The page manages the same filters as ``galsift filter add|list|remove|test``, through
:mod:`db.filters`: a new clause is checked by PostgreSQL's own grammar and run as the
``galsift_reader`` role with the filter time limit before anything is stored; "Test" runs a clause
over the existing tiles and stores nothing. Each user sees and removes only their own filters
(the owner is the logged-in user); the filter service (``galsift filters``) then publishes every
new match on the filter's topic ``filter.<name>`` and to its webhook.
"""

from __future__ import annotations

import streamlit as st

from dashboard import auth, data

#: clauses to start from (each runs as it is over ``galsift_api.tile_scores``)
EXAMPLES: dict[str, str] = {
    "Confident lens candidates in the south": "lens_score > 0.9 AND dec < 0",
    "Likely spirals": "(morphology ->> 'spiral')::float > 0.8",
    "Lens candidates in the COSMOS field": (
        "lens_score > 0.7 AND tile_id IN (SELECT tile_id FROM galsift_cone(150.1, 2.2, 1.5))"
    ),
}


def main() -> None:
    """Render the page."""
    from db import filters as store

    st.title("Alert filters")
    st.caption(
        "Standing conditions over `galsift_api.tile_scores` (`lens_score`, `morphology`, `ra`, `dec`, "
        "`survey`, … — see docs/filters.md). Every tile scored after a filter was added that "
        "satisfies it is published once on the topic `filter.<name>` and to the filter's webhook."
    )
    user = auth.current_user()
    if user is None:
        st.info("Type your name in the sidebar to see and manage your filters.")
        return
    engine, settings = data.engine(), data.settings()

    mine = store.list_filters(engine, owner=user)
    st.subheader(f"Your filters ({len(mine)})")
    if not mine:
        st.caption("None yet: add one below.")
    else:
        shown = (
            "name",
            "clause",
            "topic",
            "matches",
            "published",
            "webhook_sent",
            "error_count",
            "last_error",
        )
        rows = [f.as_row() for f in mine]
        st.dataframe([{k: r[k] for k in shown} for r in rows], hide_index=True, width="stretch")
        for f in mine:
            with st.expander(f"{f.name}: {f.clause}"):
                _filter_details(f.name, user)

    st.subheader("New filter")
    example = st.selectbox("Start from an example", ["", *EXAMPLES], key="filter_example")
    if example and st.session_state.get("filter_loaded") != example:
        st.session_state["filter_clause"] = EXAMPLES[example]
        st.session_state["filter_loaded"] = example
    with st.form("filter_form"):
        name = st.text_input("Name (a-z, 0-9, _ and -)", key="filter_name", max_chars=64)
        clause = st.text_area(
            "WHERE clause", key="filter_clause", height=100, max_chars=store.MAX_CLAUSE_CHARS
        )
        webhook = st.text_input("Webhook URL (optional)", key="filter_webhook")
        c1, c2 = st.columns(2)
        test = c1.form_submit_button("Test on existing tiles", icon=":material/science:", key="filter_test")
        add = c2.form_submit_button(
            "Add filter", type="primary", icon=":material/add_alert:", key="filter_add"
        )
    if test and clause.strip():
        try:
            _, result = store.dry_run(settings, engine, clause, limit=20, timeout_s=settings.filter_timeout_s)
        except store.FilterRefused as exc:
            st.error(f"Refused ({exc.reason}): {exc}")
        else:
            st.success(f"{len(result.rows)} of the newest tiles match (showing at most 20).")
            if result.rows:
                st.dataframe(
                    [dict(zip(result.columns, r, strict=True)) for r in result.rows], hide_index=True
                )
    if add:
        try:
            info = store.add_filter(
                settings, engine, name.strip(), clause, owner=user, webhook_url=webhook.strip() or None
            )
        except store.FilterRefused as exc:
            st.error(f"Not added ({exc.reason}): {exc}")
        else:
            st.toast(f"filter {info.name} added: new matches go to {info.topic}")
            st.rerun()


def _filter_details(name: str, user: str) -> None:
    from db import filters as store

    engine = data.engine()
    rows = store.matches(engine, name, limit=20)
    if rows:
        st.caption("Newest matches and their deliveries")
        st.dataframe(
            [
                {
                    "tile_id": str(r["tile_id"]),
                    "matched": r["created_at"],
                    "topic": r["topic_state"],
                    "offset": r["topic_offset"],
                    "webhook": r["webhook_state"],
                }
                for r in rows
            ],
            hide_index=True,
        )
    else:
        st.caption("No matches yet.")
    if st.button("Remove this filter", key=f"filter_rm_{name}", icon=":material/delete:"):
        if store.remove_filter(engine, name, owner=user):
            st.toast(f"filter {name} removed (its topic is kept for subscribers)")
        st.rerun()


main()
