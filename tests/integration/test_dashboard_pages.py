"""Every dashboard page with Streamlit's AppTest against the real PostgreSQL (and Kafka) of the stack.

Each test drives a page the way a user would (widgets set, buttons clicked) and checks what the
database holds afterwards: labels, sessions, saved searches; and that another user sees none of it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from dashboard_support import Sky, env_of
from sqlalchemy import Engine, text
from streamlit.testing.v1 import AppTest

from dashboard import data
from dashboard.auth import USER_KEY
from galsift.settings import Settings

pytestmark = [pytest.mark.apptest, pytest.mark.integration]

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")

# These tests used to crash the interpreter (SIGSEGV/abort in the garbage collector or in ast.parse
# of the next script run). Not threads nor the C extensions of the HITL stack: the search page's
# VOTable export went through astropy's C TABLEDATA writer, which writes one byte past its buffer
# (see dashboard.widgets.votable_bytes and its test in tests/unit/test_dashboard_tables.py).


@pytest.fixture(scope="module")
def sky(engine: Engine, stack_settings: Settings) -> Sky:
    return Sky(engine, stack_settings, name="dash")


@pytest.fixture
def app_env(stack_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The app reads the stack's settings from the environment, with fresh caches."""
    for key, value in env_of(stack_settings).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("GALSIFT_DASHBOARD_PASSWORD", raising=False)
    st.cache_data.clear()
    st.cache_resource.clear()
    yield
    st.cache_resource.clear()


def _vec(sky: Sky, i: int) -> np.ndarray:
    vec = data.embedding(sky.ids[i], sky.version)
    assert vec is not None
    return vec


def _app(page: str, user: str | None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    if user is not None:
        at.session_state[USER_KEY] = user
        at.session_state["galsift_user_field"] = user
    at.switch_page(f"views/{page}.py")
    return at


def _ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.mark.usefixtures("app_env")
def test_search_page_neighbours_filters_and_export(sky: Sky) -> None:
    at = _ok(_app("search", "ana").run())
    assert [t.value for t in at.title] == ["Search"]
    at.selectbox(key="search_version").select(sky.version)
    at.radio(key="search_start").set_value("Tile id")
    at.text_input(key="search_tile").input(f"{sky.survey}:t0")
    _ok(at.run())
    assert not at.error
    images = at.image
    assert len(images) >= 24, "the query tile and a page of 24 neighbours"
    assert any("similarity" in c.value for c in at.caption)
    assert len(at.get("download_button")) == 2  # CSV and VOTable
    # neighbours of a lens are lenses (one cluster), the query tile itself is left out
    rows = data.neighbours(_vec(sky, 0), sky.version, k=10, exclude=(str(sky.ids[0]),))
    assert len(rows) == 10 and all(sky.good_of[r["id"]] for r in rows)
    assert str(sky.ids[0]) not in {str(r["id"]) for r in rows}
    # filters: a lens score, a survey, a cone
    query = _vec(sky, 50)
    lensy = data.neighbours(query, sky.version, k=12, filters=data.Filters(lens_min=0.8))
    assert lensy and all(r["lens_score"] >= 0.8 for r in lensy)
    cone = data.Filters(surveys=(sky.survey,), cone=(float(sky.ra[5]), float(sky.dec[5]), 0.05))
    near = data.neighbours(query, sky.version, k=50, filters=cone)
    from astropy.coordinates import SkyCoord

    centre = SkyCoord(sky.ra[5], sky.dec[5], unit="deg")
    assert near and all(centre.separation(SkyCoord(r["ra"], r["dec"], unit="deg")).deg <= 0.05 for r in near)
    # the page with the lens filter on
    at.toggle(key="search_lens_on").set_value(True)
    _ok(at.run())
    assert not at.error


@pytest.mark.usefixtures("app_env")
def test_lens_score_is_the_lens_heads_where_a_tile_has_one(sky: Sky, engine: Engine) -> None:
    tid = next(t for t in sky.ids if not sky.good_of[t])  # a finder score of 0.0-0.3
    vec = data.embedding(tid, sky.version)
    assert vec is not None
    with engine.begin() as c:
        c.execute(
            text(
                "INSERT INTO detections (tile_id, model_version, detector, label, score, extra) "
                "VALUES (:t, :v, 'lens_head', 'lens', 0.95, '{}')"
            ),
            {"t": tid, "v": sky.version},
        )
    try:
        assert data.tiles((str(tid),))[str(tid)]["lens_score"] == pytest.approx(0.95)
        # the search filter reads the same score: the tile passes a cut its finder score fails
        (row,) = data.neighbours(vec, sky.version, k=1, filters=data.Filters(lens_min=0.9))
        assert str(row["id"]) == str(tid) and row["lens_score"] == pytest.approx(0.95)
    finally:
        with engine.begin() as c:
            c.execute(
                text("DELETE FROM detections WHERE tile_id = :t AND detector = 'lens_head'"), {"t": tid}
            )


@pytest.mark.usefixtures("app_env")
def test_search_page_from_coordinates_and_random(sky: Sky) -> None:
    at = _ok(_app("search", "ana").run())
    at.selectbox(key="search_version").select(sky.version)
    at.radio(key="search_start").set_value("Coordinates")
    _ok(at.run())
    at.text_input(key="search_pos").input(f"{sky.ra[7]:.6f} {sky.dec[7]:+.6f}")
    _ok(at.run())
    assert not at.error and any("nearest embedded tile" in c.value for c in at.caption)
    at.text_input(key="search_pos").input("not a position")
    _ok(at.run())
    assert at.error and "cannot read position" in at.error[0].value
    at.radio(key="search_start").set_value("Random tile")
    _ok(at.run())
    assert len(at.image) > 1


@pytest.mark.usefixtures("app_env")
def test_hitl_page_two_rounds_undo_save_and_privacy(sky: Sky, engine: Engine) -> None:
    user = f"ana{uuid.uuid4().hex[:4]}"
    at = _ok(_app("hitl", user).run())
    at.text_input(key="hitl_concept").input("lens")
    at.selectbox(key="hitl_version").select(sky.version)
    at.text_area(key="hitl_seed_tiles").input("\n".join(f"{sky.survey}:t{i}" for i in range(3)))
    at.slider(key="hitl_k_new").set_value(12)
    at.button(key="hitl_start").click()
    _ok(at.run())
    assert not at.error, [e.value for e in at.error]
    sid = int(at.session_state["hitl_session_pick"])
    for rnd in (1, 2):
        shown = _shown(engine, sid, rnd)
        assert len(shown) == 12
        for rank, tid in shown:
            if sky.good_of[tid]:
                at.radio(key=f"hitl_v_{sid}_{rnd}_{rank}").set_value("good")
        at.select_slider(key=f"hitl_i_{sid}_{rnd}_0").set_value("4")
        at.button(key=f"hitl_next_{sid}_{rnd}").click()
        _ok(at.run())
        labels = _labels(engine, sid, rnd)
        # every tile of the round labelled (unmarked ones count as bad), as the user saw them
        assert {t for t, _ in labels} == {t for _, t in shown}
        assert all(good == sky.good_of[t] for t, good in labels)
    assert any(m.value == 3 or str(m.value) == "3" for m in at.metric if m.label == "Round")
    # undo retracts the newest label, which stays in the history
    at.button(key="hitl_undo").click()
    _ok(at.run())
    with engine.connect() as c:
        assert (
            c.execute(
                text("SELECT count(*) FROM hitl_labels WHERE session_id = :s AND retracted_at IS NOT NULL"),
                {"s": sid},
            ).scalar_one()
            == 1
        )
    # saved as a standing search
    at.button(key="hitl_save_search").click()
    _ok(at.run())
    assert at.success and "Saved search" in at.success[0].value
    with engine.connect() as c:
        assert (
            c.execute(text("SELECT owner FROM saved_searches WHERE session_id = :s"), {"s": sid}).scalar()
            == user
        )
    # another user sees neither the session nor the saved search
    other = _ok(_app("hitl", f"ben{uuid.uuid4().hex[:4]}").run())
    options = other.selectbox(key="hitl_session_pick").options
    assert all(f"#{sid} " not in o for o in options)
    other.session_state["hitl_session_id"] = sid  # even with the id forced into its state
    _ok(other.run())
    assert not any(m.label == "Round" for m in other.metric)


def _shown(engine: Engine, sid: int, rnd: int) -> list[tuple[int, uuid.UUID]]:
    with engine.connect() as c:
        return [
            (int(r[0]), r[1])
            for r in c.execute(
                text(
                    "SELECT rank, tile_id FROM hitl_shown WHERE session_id = :s AND round_no = :r ORDER BY rank"
                ),
                {"s": sid, "r": rnd},
            )
        ]


def _labels(engine: Engine, sid: int, rnd: int) -> list[tuple[uuid.UUID, bool]]:
    with engine.connect() as c:
        return [
            (r[0], bool(r[1]))
            for r in c.execute(
                text("SELECT tile_id, good FROM hitl_labels WHERE session_id = :s AND round_no = :r"),
                {"s": sid, "r": rnd},
            )
        ]


@pytest.mark.usefixtures("app_env")
def test_alerts_page_feed_and_label(sky: Sky, engine: Engine) -> None:
    user = f"cy{uuid.uuid4().hex[:4]}"
    at = _ok(_app("alerts", user).run())
    assert [t.value for t in at.title] == ["Alerts"]
    text_all = " ".join(m.value for m in at.markdown)
    assert "known: KNOWN J3" in text_all and ":green-badge[new]" in text_all
    at.radio(key="alerts_known").set_value("known")
    _ok(at.run())
    alert_id = _alert_id(engine, sky.ids[3])
    at.button(key=f"alert_{alert_id}_bad").click()
    _ok(at.run())
    with engine.connect() as c:
        row = c.execute(
            text("SELECT concept, good FROM hitl_labels WHERE author = :u AND tile_id = :t"),
            {"u": user, "t": sky.ids[3]},
        ).one()
    assert row == ("lens", False)
    assert any("you said: not a lens" in c.value for c in at.caption)


def _alert_id(engine: Engine, tile: uuid.UUID) -> int:
    with engine.connect() as c:
        return int(c.execute(text("SELECT id FROM alerts WHERE tile_id = :t"), {"t": tile}).scalar_one())


@pytest.mark.usefixtures("app_env")
def test_filters_page_test_add_refuse_privacy_and_remove(sky: Sky, engine: Engine) -> None:
    user, other = f"fa{uuid.uuid4().hex[:4]}", f"fb{uuid.uuid4().hex[:4]}"
    name = f"bright-{user}"

    def stored(n: str) -> list[tuple[str, str, str]]:
        with engine.connect() as c:
            return [
                tuple(r)
                for r in c.execute(
                    text("SELECT owner, clause, topic FROM alert_filters WHERE name = :n"), {"n": n}
                )
            ]

    at = _ok(_app("filters", user).run())
    assert [t.value for t in at.title] == ["Alert filters"]
    assert any("None yet" in c.value for c in at.caption)
    at.text_input(key="filter_name").input(name)
    at.text_area(key="filter_clause").input(f"lens_score > 0.5 AND survey = '{sky.survey}'")
    at.button(key="filter_test").click()
    _ok(at.run())
    assert not at.error, [e.value for e in at.error]
    assert at.success and "match" in at.success[0].value
    assert stored(name) == []  # a test stores nothing
    at.button(key="filter_add").click()
    _ok(at.run())
    assert stored(name) == [(user, f"lens_score > 0.5 AND survey = '{sky.survey}'", f"filter.{name}")]
    assert name in at.dataframe[0].value["name"].tolist()

    # a clause that is not one expression is refused with its reason, and nothing is stored
    at.text_input(key="filter_name").input(f"evil-{user}")
    at.text_area(key="filter_clause").input("1=1) UNION SELECT id FROM tiles --")
    at.button(key="filter_add").click()
    _ok(at.run())
    assert at.error and "Not added (syntax)" in at.error[0].value
    assert stored(f"evil-{user}") == []

    # another user sees none of it and cannot remove it
    at2 = _ok(_app("filters", other).run())
    assert any("None yet" in c.value for c in at2.caption)
    assert not at2.dataframe

    at.button(key=f"filter_rm_{name}").click()
    _ok(at.run())
    assert stored(name) == []


@pytest.mark.usefixtures("app_env")
def test_sql_page_reads_as_reader_and_refuses_writes(sky: Sky, engine: Engine) -> None:
    at = _ok(_app("sql", None).run())
    at.text_area(key="sql_query").input(
        f"SELECT tile_id, ra, dec, lens_score FROM galsift_api.tile_scores WHERE survey = '{sky.survey}'"
    )
    at.button(key="sql_run").click()
    _ok(at.run())
    assert not at.error, [e.value for e in at.error]
    assert any("120 row(s)" in c.value for c in at.caption)
    assert at.get("arrow_vega_lite_chart") or at.get("vega_lite_chart"), "ra/dec columns give a sky plot"
    for hostile in (f"DELETE FROM tiles WHERE survey = '{sky.survey}'", "SELECT * FROM public.tiles"):
        at.text_area(key="sql_query").input(hostile)
        at.button(key="sql_run").click()
        _ok(at.run())
        assert at.error and "refused" in at.error[0].value
    with engine.connect() as c:
        assert (
            c.execute(text("SELECT count(*) FROM tiles WHERE survey = :s"), {"s": sky.survey}).scalar_one()
            == 120
        )
    at.selectbox(key="sql_example").select("Lens score distribution")
    _ok(at.run())
    at.button(key="sql_run").click()
    _ok(at.run())
    assert not at.error


@pytest.mark.usefixtures("app_env")
def test_operations_page(sky: Sky, stack_settings: Settings) -> None:
    from kafka import KafkaConsumer, TopicPartition

    # a consumer group with a committed offset on the raw topic: the page must show its lag
    group = f"dash-{uuid.uuid4().hex[:6]}"
    consumer = KafkaConsumer(
        bootstrap_servers=stack_settings.bootstrap_servers, group_id=group, enable_auto_commit=False
    )
    try:
        from kafka.structs import OffsetAndMetadata

        tp = TopicPartition(stack_settings.topics.raw, 0)
        consumer.assign([tp])
        consumer.commit({tp: OffsetAndMetadata(0, "", -1)})
    finally:
        consumer.close()
    at = _ok(_app("operations", None).run())
    assert [t.value for t in at.title] == ["Operations"]
    assert not at.warning, [w.value for w in at.warning]
    assert {m.label for m in at.metric} >= {"tiles", "embeddings", "alerts"}
    lag = data.consumer_lag()
    assert not isinstance(lag, str), lag
    assert any(r["group"] == group and r["topic"] == stack_settings.topics.raw for r in lag)
    dead, _ = data.dead_letters()
    assert any(r["reason"].startswith("bad_") for r in dead)


@pytest.mark.usefixtures("app_env")
def test_password_gate_lets_the_right_user_in(sky: Sky, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GALSIFT_DASHBOARD_PASSWORD", "correct horse")
    st.cache_resource.clear()
    at = _ok(AppTest.from_file(APP, default_timeout=120).run())
    assert [t.value for t in at.title] == ["galsift"]
    at.text_input(key="galsift_login_user").input("dana")
    at.text_input(key="galsift_login_password").input("correct horse")
    at.button[0].click()
    _ok(at.run())
    assert at.session_state[USER_KEY] == "dana"
    assert "Search" in [t.value for t in at.title]
