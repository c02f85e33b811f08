"""End to end in a real browser: Debian's Chromium, driven by Selenium, against ``galsift dashboard``.

The demo tiles of the repository (``ingest/demo_tiles``) are published to Kafka, ingested and
embedded by the real stages, a few of them get lens alerts (rows as the detector service writes
them; the detector itself is tested elsewhere), and ``galsift dashboard`` is started as a
subprocess with the stack's settings. The browser signs in by name, starts a HITL session, marks
two rounds of candidates and submits them; the labels must then be in ``hitl_labels``. A
screenshot of every page goes to ``docs/screenshots/`` (the README shows them). The browser
and the server come from ``browser_support``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_support import (
    CHROMEDRIVER,
    CHROMIUM,
    ROOT,
    WAIT_S,
    chromium,
    click,
    idle,
    running_dashboard,
    type_into,
    wait,
)
from ingest_support import StageRunner, isolated_settings, wait_for
from sqlalchemy import Engine, text

from galsift.settings import Settings

pytestmark = pytest.mark.integration

SCREENSHOTS = ROOT / "docs" / "screenshots"
DEMO = ROOT / "ingest" / "demo_tiles"


@pytest.fixture(scope="module")
def demo(stack_settings: Settings, engine: Engine) -> dict[str, Any]:
    """Demo tiles published, ingested and embedded; three of them with lens alerts."""
    from encoder.service import SHIPPED_CHECKPOINT, Embedder, EncodeStage
    from ingest.publish import publish_paths
    from ingest.service import IngestStage

    settings = isolated_settings(stack_settings, "dashboard")
    survey = f"dashdemo-{uuid.uuid4().hex[:6]}"
    report = publish_paths(
        settings, [DEMO / "gz_decals_examples", DEMO / "cfhtls_lens_candidates"], survey=survey
    )
    assert report.published >= 60
    uid = uuid.uuid4().hex[:6]
    n = report.published
    # each stage runs until its rows are all there (polled), not until it has been idle a while:
    # on a loaded machine an idle timeout can end a stage before its input arrives
    ingest = StageRunner(IngestStage(settings, engine, group_id=f"ingest-{uid}")).start()
    wait_for(lambda: _count(engine, "tiles t", survey) >= n, timeout_s=240, what="ingested tiles")
    ingest.join(timeout_s=60, stop=True)
    embedder = Embedder(SHIPPED_CHECKPOINT, device="cpu")
    encode = StageRunner(EncodeStage(settings, engine, embedder, group_id=f"enc-{uid}")).start()  # type: ignore[arg-type]
    wait_for(
        lambda: _count(engine, "embeddings e JOIN tiles t ON t.id = e.tile_id", survey) >= n,
        timeout_s=300,
        what="embedded tiles",
    )
    encode.join(timeout_s=60, stop=True)
    with engine.begin() as c:
        rows = c.execute(
            text(
                "SELECT t.id, e.model_version FROM tiles t JOIN embeddings e ON e.tile_id = t.id "
                "WHERE t.survey = :s ORDER BY t.external_id"
            ),
            {"s": survey},
        ).all()
        assert len(rows) == report.published
        version = str(rows[0][1])
        for i, (tid, _) in enumerate(rows[-3:]):
            xm = json.dumps({"known": i == 0, "catalog": "lenscat", "match": {"name": "demo known"}})
            c.execute(
                text(
                    "INSERT INTO alerts (tile_id, model_version, kind, score, crossmatch) "
                    "VALUES (:t, :v, 'lens', :s, CAST(:x AS jsonb))"
                ),
                {"t": tid, "v": version, "s": 0.97 - 0.02 * i, "x": xm},
            )
    return {"settings": settings, "survey": survey, "version": version, "n": len(rows)}


@pytest.fixture(scope="module")
def dashboard_url(demo: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``galsift dashboard`` on a free port, ready (health endpoint answers)."""
    with running_dashboard(demo["settings"], tmp_path_factory.mktemp("dashboard") / "dashboard.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium from Debian through its chromedriver."""
    with chromium() as driver:
        yield driver


def _shot(driver: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    idle(driver)
    # the whole page, not just the viewport: Chromium renders the document's full height
    height = driver.execute_script(
        "const m = document.querySelector('[data-testid=\"stMainBlockContainer\"]') || document.body;"
        " return m.scrollHeight"
    )
    driver.set_window_size(1600, max(1000, min(int(height) + 200, 4000)))
    idle(driver)
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
    driver.set_window_size(1600, 1300)


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


def _wait_db(predicate: Any, what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {WAIT_S} s for {what}")
        time.sleep(0.2)


# -- the test ---------------------------------------------------------------------------------------
def test_two_hitl_rounds_in_a_browser_and_screenshots(
    dashboard_url: str, browser: Any, demo: dict[str, Any], engine: Engine, tmp_path: Path
) -> None:
    try:
        _drive(dashboard_url, browser, demo, engine)
    except Exception:
        # what the browser showed when a wait ran out (a Streamlit exception is only shown there)
        browser.save_screenshot(str(tmp_path / "failure.png"))
        (tmp_path / "failure.html").write_text(browser.page_source)
        raise


def _drive(dashboard_url: str, browser: Any, demo: dict[str, Any], engine: Engine) -> None:
    from selenium.webdriver.common.by import By

    user = f"eve{uuid.uuid4().hex[:4]}"
    driver = browser
    driver.get(f"{dashboard_url}/hitl")
    type_into(driver, "galsift_user_field", user)
    idle(driver)
    # the new-session form: the demo tiles' model version, no seeds (the first page is the most unusual)
    wait(driver, ".st-key-hitl_concept input")
    type_into(driver, "hitl_concept", "spiral", enter=False)
    type_into(driver, "hitl_version", demo["version"])
    click(driver, "hitl_start")
    sid = _wait_db(
        lambda: _scalar(engine, "SELECT id FROM hitl_sessions WHERE owner = :u", u=user), "the session row"
    )
    for rnd in (1, 2):
        wait(driver, f".st-key-hitl_next_{sid}_{rnd} button")
        idle(driver)
        shown = _shown(engine, sid, rnd)
        assert len(shown) == 12
        good = {rank for rank, _ in shown[:2]}  # the first two candidates of each page are "good"
        for rank in sorted(good):
            wait(
                driver,
                f"//div[contains(concat(' ', @class, ' '), ' st-key-hitl_v_{sid}_{rnd}_{rank} ')]"
                "//label[@data-testid='stRadioOption'][.//p[normalize-space(.)='good']]",
                clickable=True,
                by=By.XPATH,
            ).click()
        click(driver, f"hitl_next_{sid}_{rnd}")
        wait(driver, f".st-key-hitl_next_{sid}_{rnd + 1} button")
        with engine.connect() as c:
            labels = {
                r[0]: bool(r[1])
                for r in c.execute(
                    text(
                        "SELECT tile_id, good FROM hitl_labels WHERE session_id = :s AND round_no = :r AND author = :u"
                    ),
                    {"s": sid, "r": rnd, "u": user},
                )
            }
        # all twelve labelled (unmarked count as bad), the two clicked ones good
        assert set(labels) == {t for _, t in shown}
        assert {t for t, g in labels.items() if g} == {t for rank, t in shown if rank in good}
    _shot(driver, "hitl")

    # screenshots of the other pages, each with something on it
    driver.get(f"{dashboard_url}/")  # Search is the default page, served at the root
    type_into(driver, "galsift_user_field", user)
    type_into(driver, "search_version", demo["version"])
    wait(driver, ".st-key-search_tile input")
    type_into(driver, "search_tile", f"{demo['survey']}:{_first_lens(engine, demo['survey'])}")
    wait(driver, ".st-key-search_export_csv")
    _shot(driver, "search")

    driver.get(f"{dashboard_url}/alerts")
    type_into(driver, "galsift_user_field", user)
    wait(driver, '[data-testid="stImage"]')
    _shot(driver, "alerts")

    # an alert filter added from its page is stored for this user, with its topic
    driver.get(f"{dashboard_url}/filters")
    type_into(driver, "galsift_user_field", user)
    type_into(driver, "filter_name", f"bright-{user}".lower(), enter=False)
    area = wait(driver, ".st-key-filter_clause textarea", clickable=True)
    area.send_keys("lens_score > 0.5")
    click(driver, "filter_add")
    stored = _wait_db(
        lambda: _scalar(engine, "SELECT clause FROM alert_filters WHERE owner = :u", u=user),
        "the filter stored",
    )
    assert stored == "lens_score > 0.5"
    wait(driver, '[data-testid="stDataFrame"]')
    _shot(driver, "filters")

    driver.get(f"{dashboard_url}/sql")
    wait(driver, ".st-key-sql_query textarea")
    area = driver.find_element(By.CSS_SELECTOR, ".st-key-sql_query textarea")
    area.send_keys(
        "SELECT survey, external_id, ra, dec, lens_score FROM galsift_api.tile_scores "
        f"WHERE survey = '{demo['survey']}'"
    )
    click(driver, "sql_run")
    wait(
        driver,
        '[data-testid="stVegaLiteChart"], [data-testid="stArrowVegaLiteChart"], [data-testid="stAlert"]',
    )
    _shot(driver, "sql")

    driver.get(f"{dashboard_url}/operations")
    wait(driver, '[data-testid="stMetric"]')
    _shot(driver, "operations")
    for name in ("hitl", "search", "alerts", "filters", "sql", "operations"):
        assert (SCREENSHOTS / f"{name}.png").stat().st_size > 10_000


def _count(engine: Engine, source: str, survey: str) -> int:
    with engine.connect() as c:
        return int(
            c.execute(text(f"SELECT count(*) FROM {source} WHERE t.survey = :s"), {"s": survey}).scalar_one()
        )


def _scalar(engine: Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as c:
        return c.execute(text(sql), params).scalar()


def _first_lens(engine: Engine, survey: str) -> str:
    return str(
        _scalar(
            engine,
            "SELECT external_id FROM tiles WHERE survey = :s ORDER BY external_id DESC LIMIT 1",
            s=survey,
        )
    )


def test_chromium_is_debians() -> None:
    """The browser is the distribution's package, not one a driver manager downloaded."""
    assert shutil.which("chromium") == str(CHROMIUM) or CHROMIUM.exists()
    out = subprocess.run(
        [str(CHROMEDRIVER), "--version"], capture_output=True, text=True, timeout=30, check=True
    )
    assert "ChromeDriver" in out.stdout
    assert os.access(CHROMIUM, os.X_OK) and sys.platform.startswith("linux")
