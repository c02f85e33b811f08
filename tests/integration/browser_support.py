"""Chromium and a running ``galsift dashboard`` for the browser tests (not a test module).

Chromium and chromedriver come from Debian (``deploy/bootstrap.sh``); nothing is downloaded:
Selenium is given both paths, so its driver manager never runs. Readiness is always polled
(Streamlit's ``/_stcore/health``, elements with ``WebDriverWait``), never slept for.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from galsift.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: Streamlit reruns on 2 busy cores: generous, since every wait is a poll that returns at once
WAIT_S = 90


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthy(url: str) -> bool:
    """Whether the Streamlit server at ``url`` answers its health check."""
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@contextmanager
def running_dashboard(
    settings: Settings, log: Path, *, port: int | None = None, env: Mapping[str, str] = {}
) -> Iterator[str]:
    """``galsift dashboard`` as a subprocess on 127.0.0.1, yielded (as its URL) once healthy.

    Parameters
    ----------
    settings
        The stack the app reads (passed as ``GALSIFT_*`` variables).
    log
        Where the server's output goes (shown when it does not come up).
    port
        Port to serve on (a free one by default).
    env
        Variables set on top of the settings' (``None``-free), e.g. the login configuration.
    """
    from deploy.cli import service_command, service_env

    port = port or free_port()
    full_env = service_env(settings)
    full_env.pop("GALSIFT_DASHBOARD_PASSWORD", None)
    full_env.update(env)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            service_command(["dashboard", "--port", str(port), "--address", "127.0.0.1"]),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=ROOT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        while not healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dashboard did not come up: {log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def chromium() -> Iterator[Any]:
    """Headless Chromium from Debian through its chromedriver."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("Chromium and chromedriver are missing: run deploy/bootstrap.sh (Debian packages)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1600,1300",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: Any, selector: str, *, clickable: bool = False, by: str | None = None) -> Any:
    """The element ``selector`` (CSS unless ``by`` says otherwise) once present (or clickable)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    cond = ec.element_to_be_clickable if clickable else ec.presence_of_element_located
    return WebDriverWait(driver, WAIT_S).until(cond((by or By.CSS_SELECTOR, selector)))


def idle(driver: Any) -> None:
    """Wait until Streamlit finished the current script run (its status widget is gone)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_S).until(
        lambda d: not d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]')
    )


def type_into(driver: Any, key: str, value: str, *, enter: bool = True) -> None:
    """Type into the keyed widget's input; retried while a rerun re-renders it under the cursor."""
    from selenium.common.exceptions import ElementNotInteractableException, StaleElementReferenceException
    from selenium.webdriver.common.keys import Keys

    deadline = time.monotonic() + WAIT_S
    while True:
        idle(driver)
        try:
            field = wait(driver, f".st-key-{key} input", clickable=True)
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(value + (Keys.ENTER if enter else ""))
            return
        except (ElementNotInteractableException, StaleElementReferenceException):
            if time.monotonic() > deadline:
                raise


def click(driver: Any, key: str) -> None:
    """Click the keyed button once it can be clicked."""
    wait(driver, f".st-key-{key} button", clickable=True).click()
