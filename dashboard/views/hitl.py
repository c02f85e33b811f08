"""HITL loop: the search engine of :mod:`hitl.engine` driven by clicks.

A session starts from seeds (tiles, sky positions, uploaded images) or from none (the first page
is the most unusual tiles). Each round the engine fits its learner on the user's labels and shows
K candidates; the user marks each good or bad (optionally with a 0-5 interest), saves, and asks
for the next round. Labels are the user's (``hitl_labels.author``), carried over to their next
session of the same concept; undo retracts the newest one; a session can be saved as a standing
search that keeps scoring new tiles, whose notifications are listed at the bottom.
"""

from __future__ import annotations

import math
import tempfile
import uuid
from pathlib import Path
from typing import Any

import streamlit as st

from dashboard import data, widgets

#: session-state key through which a session is asked for (a new one, a link); the picker's key
SESSION_KEY = "hitl_session_id"
PICK_KEY = "hitl_session_pick"
#: what a candidate can be marked
VERDICTS = ("–", "good", "bad")
#: interest grades (optional)
INTEREST = ("–", "0", "1", "2", "3", "4", "5")


def main() -> None:
    """Render the page."""
    st.title("HITL loop")
    user = widgets.require_user("search with the HITL loop")
    hitl = data.search_engine()
    mine = data.sessions(user)
    sid = _pick_session(user, mine)
    if sid is None:
        _new_session_form(user)
        _notifications(user)
        return
    from hitl.engine import HitlError

    try:
        session = hitl.session(sid)
    except HitlError:
        st.error(f"Session {sid} is gone.")
        return
    if session.owner != user:  # never reached (the picker lists the user's own), kept as a guard
        st.error("Not your session.")
        return
    _session_view(session)
    _notifications(user)


def _pick_session(user: str, mine: list[Any]) -> int | None:
    """The session picker; a session asked for through :data:`SESSION_KEY` is selected in it.

    The picker's own state is the selection (Streamlit keeps a keyed widget's value across reruns
    and ignores a changed default), so a new session is selected by setting that state before the
    widget is drawn. An id that is not one of the user's sessions selects nothing.
    """
    ids = [int(s.id) for s in mine]
    options: list[int | None] = [None, *ids]
    asked = st.session_state.pop(SESSION_KEY, None)
    if asked is not None:
        st.session_state[PICK_KEY] = int(asked) if int(asked) in ids else None
    if st.session_state.get(PICK_KEY) not in options:
        st.session_state[PICK_KEY] = None
    # labels must not change from run to run (no round count): Streamlit resets a keyed selectbox
    # whose displayed options change, which would drop the session being worked on
    names = {int(s.id): f"#{s.id} {s.name} ({s.concept}, {s.model_version})" for s in mine}
    choice = st.selectbox(
        "Session",
        options,
        format_func=lambda i: "➕ new session" if i is None else names.get(i, str(i)),
        key=PICK_KEY,
    )
    return None if choice is None else int(choice)


def _new_session_form(user: str) -> None:
    versions = data.embedding_versions()
    if not versions:
        st.warning("No embeddings yet: start the services (`galsift up`) and publish some tiles.")
        return
    with st.form("hitl_new"):
        st.subheader("New session")
        c1, c2, c3 = st.columns(3)
        concept = c1.text_input(
            "Concept", value="lens", help="what you look for; labels are keyed by it", key="hitl_concept"
        )
        name = c2.text_input("Name (optional)", key="hitl_name")
        version = c3.selectbox("Model version", versions, key="hitl_version")
        tiles = st.text_area(
            "Seed tiles", help="one per line: a tile id or survey:external_id", key="hitl_seed_tiles"
        )
        coords = st.text_area(
            "Seed positions", help="one per line, any format astropy reads", key="hitl_seed_pos"
        )
        uploads = st.file_uploader(
            "Seed images (FITS/PNG/JPEG)",
            type=["fits", "fit", "fz", "png", "jpg", "jpeg"],
            accept_multiple_files=True,
            key="hitl_seed_images",
        )
        k = st.slider("Candidates per round (K)", 4, 48, 12, 2, key="hitl_k_new")
        submitted = st.form_submit_button("Start", type="primary", key="hitl_start")
    if not submitted:
        return
    st.session_state["hitl_k"] = k
    try:
        sid = _start(user, concept.strip(), name.strip() or None, version, tiles, coords, uploads or [], k)
    except ValueError as exc:  # HitlError, a bad position or tile reference, an image that cannot be read
        st.error(str(exc))
        return
    st.session_state[SESSION_KEY] = sid
    st.rerun()


def _start(
    user: str,
    concept: str,
    name: str | None,
    version: str,
    tiles: str,
    coords: str,
    uploads: list[Any],
    k: int,
) -> int:
    """Create the session from the form's seeds and show its first round; returns its id."""
    from hitl.cli import parse_position

    if not concept:
        raise ValueError("a concept is needed (e.g. lens, ring, merger)")
    tile_ids = []
    for ref in filter(None, (line.strip() for line in tiles.splitlines())):
        tid = data.find_tile(ref)
        if tid is None:
            raise ValueError(f"no tile {ref!r}")
        tile_ids.append(tid)
    positions = [parse_position(line) for line in filter(None, (x.strip() for x in coords.splitlines()))]
    images = [(u.name, _embed(u.name, u.getvalue(), version)) for u in uploads]
    hitl = data.search_engine()
    with st.spinner("starting the session and ranking its first page…"):
        session = hitl.new_session(
            owner=user,
            concept=concept,
            model_version=version,
            name=name,
            tile_ids=tile_ids,
            coords=positions,
            images=images,
        )
        hitl.next_round(session.id, k=k)
    return int(session.id)


def _embed(name: str, content: bytes, version: str) -> Any:
    from db import hitl as store
    from hitl.embed import embed_file

    uri = store.checkpoint_of(data.engine(), version)
    if uri is None:
        raise ValueError(f"model version {version} is not registered")
    from urllib.parse import unquote, urlparse

    checkpoint = Path(unquote(urlparse(uri).path)) if uri.startswith("file:") else Path(uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"seed{''.join(Path(name).suffixes[-2:]) or '.png'}"
        path.write_bytes(content)
        return embed_file(path, checkpoint=checkpoint)


def _session_view(session: Any) -> None:
    history = data.round_history(int(session.id))
    found = history[-1]["found"] if history else 0
    last = next((h for h in reversed(history) if h["labelled"]), None)
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Round", session.rounds)
    c2.metric("Found (good)", found)
    c3.metric("Precision, last labelled round", "–" if last is None else f"{last['precision']:.0%}")
    c4.metric("Concept", session.concept)
    st.caption(f"{session.name} · {session.model_version} · owner {session.owner}")
    if len(history) > 1:
        _charts(history)

    k = int(st.session_state.get("hitl_k", 12))
    if session.rounds == 0:
        if st.button("Show the first round", type="primary", key="hitl_first"):
            _next(session.id, k)
        return
    from db import hitl as store

    shown = store.shown_tiles(data.engine(), int(session.id), round_no=int(session.rounds))
    if not shown:
        st.info("Nothing left to show: every embedded tile of this version is shown or labelled.")
    else:
        _round_form(session, shown, k)
    _tools(session)


def _charts(history: list[dict[str, Any]]) -> None:
    import pandas as pd

    frame = pd.DataFrame(history).set_index("round")
    frame["precision"] = frame["precision"].map(lambda p: None if math.isnan(p) else p)
    c1, c2 = st.columns(2)
    with c1:
        st.caption("Precision of each round's labelled tiles")
        st.line_chart(frame[["precision"]], height=160)
    with c2:
        st.caption("Good tiles found so far")
        st.line_chart(frame[["found"]], height=160)


def _round_form(session: Any, shown: list[dict[str, Any]], k: int) -> None:
    names = data.tiles(data.sample_ids(r["tile_id"] for r in shown))
    rnd = int(session.rounds)
    with st.form(f"hitl_round_{session.id}_{rnd}"):
        st.subheader(f"Round {rnd}: mark each candidate")
        default_bad = st.radio(
            "Unmarked tiles",
            ("count as bad", "stay unlabelled"),
            horizontal=True,
            key=f"hitl_default_{session.id}_{rnd}",
            help="the paper's loop: a scientist picks the good ones, the rest are bad",
        )

        def below(i: int, row: dict[str, Any]) -> None:
            r = shown[i]
            current = "–" if r["good"] is None else ("good" if r["good"] else "bad")
            st.radio(
                "verdict",
                VERDICTS,
                index=VERDICTS.index(current),
                horizontal=True,
                label_visibility="collapsed",
                key=f"hitl_v_{session.id}_{rnd}_{r['rank']}",
            )
            grade = "–" if r["interest"] is None else str(r["interest"])
            st.select_slider(
                "interest",
                INTEREST,
                value=grade,
                label_visibility="collapsed",
                key=f"hitl_i_{session.id}_{rnd}_{r['rank']}",
            )

        rows = [
            names.get(str(r["tile_id"]), {"survey": "?", "external_id": str(r["tile_id"])}) | r for r in shown
        ]
        for row in rows:
            row.setdefault("pixels_uri", "")
        widgets.grid(
            rows,
            columns=6,
            caption=lambda r: f"{r['strategy']} {r['score']:.2f} · {r.get('survey')}:{r.get('external_id')}",
            below=below,
        )
        c1, c2 = st.columns(2)
        save = c1.form_submit_button("Save labels", key=f"hitl_save_{session.id}_{rnd}")
        go = c2.form_submit_button("Save and next round", type="primary", key=f"hitl_next_{session.id}_{rnd}")
    if not (save or go):
        return
    labels: list[tuple[uuid.UUID, bool]] = []
    interest: list[int | None] = []
    for r in shown:
        verdict = st.session_state.get(f"hitl_v_{session.id}_{rnd}_{r['rank']}", "–")
        grade = st.session_state.get(f"hitl_i_{session.id}_{rnd}_{r['rank']}", "–")
        if verdict == "–" and default_bad == "count as bad":
            verdict = "bad"
        if verdict == "–":
            continue
        good = verdict == "good"
        value = None if grade == "–" else int(grade)
        if r["good"] is not None and bool(r["good"]) == good and r["interest"] == value:
            continue  # unchanged: the history needs no second copy
        labels.append((r["tile_id"], good))
        interest.append(value)
    hitl = data.search_engine()
    if labels:
        hitl.label(int(session.id), labels, interest=interest, round_no=rnd)
    if go:
        _next(int(session.id), k)
    else:
        st.toast(f"saved {len(labels)} label(s)")
        st.rerun()


def _next(session_id: int, k: int) -> None:
    with st.spinner("fitting the learner and ranking the next page…"):
        rnd = data.search_engine().next_round(session_id, k=k)
    st.toast(f"round {rnd.round_no}: {rnd.learner} learner on {rnd.n_pos} good / {rnd.n_neg} bad")
    st.rerun()


def _tools(session: Any) -> None:
    hitl = data.search_engine()
    c1, c2, c3 = st.columns([1, 1, 2])
    if c1.button("Undo last label", key="hitl_undo"):
        row = hitl.undo(int(session.id))
        st.toast(
            "nothing to undo"
            if row is None
            else f"retracted: {row['tile_id']} {'good' if row['good'] else 'bad'}"
        )
        st.rerun()
    st.session_state["hitl_k"] = c2.number_input(
        "K next round", 4, 96, int(st.session_state.get("hitl_k", 12)), key="hitl_k_field"
    )
    with c3.expander("Save as a standing search"):
        threshold = st.slider("Notify at score ≥", 0.0, 1.0, 0.8, 0.01, key="hitl_threshold")
        hook = st.text_input("Webhook URL (optional)", key="hitl_webhook")
        if st.button("Save search", key="hitl_save_search"):
            from hitl.engine import HitlError

            try:
                saved = hitl.save(int(session.id), threshold=threshold, webhook_url=hook.strip() or None)
            except (HitlError, ValueError) as exc:
                st.error(str(exc))
            else:
                st.success(
                    f"Saved search #{saved.id} (learner v{saved.learner_version}): new tiles scoring "
                    f"≥ {saved.threshold:g} will notify you."
                )


def _notifications(user: str) -> None:
    st.divider()
    st.subheader("Your saved searches")
    saved = data.saved_searches(user)
    if not saved:
        st.caption("None yet: save a session to have new tiles scored as they arrive.")
        return
    st.dataframe(
        [
            {
                "id": s.id,
                "name": s.name,
                "concept": s.concept,
                "threshold": s.threshold,
                "learner": f"v{s.learner_version}",
                "active": s.active,
                "model_version": s.model_version,
            }
            for s in saved
        ],
        hide_index=True,
    )
    notes = data.notifications(user)
    st.subheader("Notifications")
    if not notes:
        st.caption("No new tile has scored above a saved search's threshold yet.")
        return
    widgets.grid(
        [data.tiles((str(n["tile_id"]),)).get(str(n["tile_id"]), {}) | n for n in notes[:12]],
        columns=6,
        caption=lambda r: f"{r['search_name']}: {r['score']:.2f} · {r['survey']}:{r['external_id']}",
    )
    st.dataframe(
        [
            {
                k: n.get(k)
                for k in ("created_at", "search_name", "score", "survey", "external_id", "ra", "dec")
            }
            for n in notes
        ],
        hide_index=True,
    )


main()
