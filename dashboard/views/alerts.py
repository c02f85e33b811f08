"""Alerts: the live feed of lens candidates, newest first, labelled from the feed.

Each alert shows its cutout, score, whether it matched a known lens (the cross-match the detector
stored) and the model version that scored it. Marking a candidate "lens" or "not a lens" stores
the user's HITL label of the concept ``lens`` for that tile (so it trains their next lens search
too) and acknowledges the alert for them; the feed can hide what they already labelled.
"""

from __future__ import annotations

import uuid
from typing import Any

import streamlit as st

from dashboard import auth, data

PER_PAGE = 12


def main() -> None:
    """Render the page."""
    st.title("Alerts")
    st.caption("Lens candidates from the detector service, cross-matched against known lenses.")
    user = auth.current_user()
    c1, c2, c3, c4 = st.columns(4)
    which = c1.radio("Show", ("all", "new", "known"), horizontal=True, key="alerts_known")
    min_score = c2.slider("Score ≥", 0.0, 1.0, 0.0, 0.01, key="alerts_min_score")
    hide_done = c3.toggle("Hide what I labelled", value=False, key="alerts_hide_done", disabled=user is None)
    page = int(c4.number_input("Page", 1, 1000, 1, key="alerts_page"))
    if c4.button("Refresh", key="alerts_refresh"):
        data.alerts.clear()
    known = None if which == "all" else which == "known"
    rows = data.alerts(
        limit=PER_PAGE, offset=(page - 1) * PER_PAGE, known=known, min_score=min_score, user=user
    )
    if hide_done:
        rows = [r for r in rows if r["my_label"] is None]
    if not rows:
        st.info("No alerts on this page." if page > 1 else "No lens candidates yet.")
        return
    if user is None:
        st.caption("Type your name in the sidebar to label candidates from the feed.")
    for start in range(0, len(rows), 4):
        cols = st.columns(4)
        for col, row in zip(cols, rows[start : start + 4], strict=False):
            with col, st.container(border=True):
                _card(row, user)


def _card(row: dict[str, Any], user: str | None) -> None:
    xm = row.get("crossmatch") or {}
    known = bool(xm.get("known"))
    match = xm.get("match") or {}
    st.image(data.tile_cutout(row), width="stretch")
    badge = f":orange-badge[known: {match.get('name', '?')}]" if known else ":green-badge[new]"
    st.markdown(
        f"**{row['survey']}:{row['external_id']}** {badge}  \n"
        f"score **{float(row['score']):.3f}** · {row['model_version']}  \n"
        + (f"RA {row['ra']:.4f}° Dec {row['dec']:.4f}°  \n" if row.get("ra") is not None else "")
        + f"{row['created_at']:%Y-%m-%d %H:%M:%S} UTC"
    )
    mine = row.get("my_label")
    if mine is not None:
        st.caption(f"you said: {'lens' if mine else 'not a lens'}")
    if user is None:
        return
    c1, c2 = st.columns(2)
    key = f"alert_{row['id']}"
    if c1.button("Lens", key=f"{key}_good", icon=":material/check:"):
        _label(row, user, True)
    if c2.button("Not a lens", key=f"{key}_bad", icon=":material/close:"):
        _label(row, user, False)


def _label(row: dict[str, Any], user: str, good: bool) -> None:
    """Store the user's label of the alert's tile (concept = the alert's kind) and acknowledge it."""
    from db import hitl as store
    from db.models import HitlLabelCreate

    store.add_labels(
        data.engine(),
        [
            HitlLabelCreate(
                tile_id=uuid.UUID(str(row["tile_id"])), concept=str(row["kind"]), author=user, good=good
            )
        ],
    )
    data.alerts.clear()
    st.toast(f"{row['external_id']}: {'lens' if good else 'not a lens'}")
    st.rerun()


main()
