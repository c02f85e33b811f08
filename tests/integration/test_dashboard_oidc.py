"""OpenID Connect sign-in end to end: Debian's Chromium, ``galsift dashboard``, a real provider.

The provider is ``oidc-provider-mock`` (a Flask app on Authlib made for testing relying
parties), serving the whole authorization-code flow over HTTP: discovery, client registration,
the login form, PKCE, nonces, RS256-signed ID tokens and their JWKS. The dashboard is started as
a service with the stack's settings plus ``GALSIFT_DASHBOARD_OIDC_*``, exactly as an operator
would configure it. In the browser: no page opens before sign-in (nor with a forged login
cookie); a user signed in at the provider owns what they create; a user whose address the
provider has not verified gets no page; sign-out closes the pages again.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from browser_support import chromium, click, free_port, idle, running_dashboard, type_into, wait
from ingest_support import isolated_settings, wait_for
from sqlalchemy import Engine, text

from galsift.settings import Settings

pytestmark = [
    pytest.mark.integration,
    # the provider (oidc-provider-mock 0.3) still calls Authlib's older JWT configuration API
    pytest.mark.filterwarnings("ignore:get_jwt_config:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:authlib.jose module is deprecated"),
]


@pytest.fixture(scope="module")
def provider() -> Iterator[str]:
    """The OpenID provider on a free local port; clients must register, nonces are required."""
    import oidc_provider_mock

    with oidc_provider_mock.run_server_in_thread(
        require_client_registration=True, require_nonce=True
    ) as server:
        yield f"http://127.0.0.1:{server.server_port}"


@pytest.fixture(scope="module")
def users(provider: str) -> dict[str, str]:
    """Two accounts at the provider: one verified address, one not."""
    tag = uuid.uuid4().hex[:6]
    accounts = {
        "alice": (f"alice-{tag}@example.org", True),
        "mallory": (f"mallory-{tag}@example.org", False),
    }
    for name, (email, verified) in accounts.items():
        r = httpx.put(
            f"{provider}/users/{quote(email)}",
            json={"email": email, "email_verified": verified, "name": name.title()},
        )
        assert r.status_code == 204, r.text
    return {name: email for name, (email, _) in accounts.items()}


@pytest.fixture(scope="module")
def dashboard(
    provider: str, stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """``galsift dashboard`` configured for the provider, with the client it registered there."""
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    client = httpx.post(f"{provider}/oauth2/clients", json={"redirect_uris": [f"{public}/oauth2callback"]})
    assert client.status_code == 201, client.text
    creds = client.json()
    settings = isolated_settings(stack_settings, "oidc")
    env = {
        "GALSIFT_DASHBOARD_OIDC_URL": provider,
        "GALSIFT_DASHBOARD_OIDC_CLIENT_ID": creds["client_id"],
        "GALSIFT_DASHBOARD_OIDC_CLIENT_SECRET": creds["client_secret"],
        "GALSIFT_DASHBOARD_PUBLIC_URL": public,
    }
    log = tmp_path_factory.mktemp("dashboard-oidc") / "dashboard.log"
    with running_dashboard(settings, log, port=port, env=env) as url:
        assert url == public
        yield {"url": url, "settings": settings, "log": log}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver


def _signed_out(driver: Any) -> None:
    """The sign-in page: its button, and neither the page menu nor a page's widgets."""
    from selenium.webdriver.common.by import By

    wait(driver, ".st-key-galsift_oidc_login button")
    idle(driver)
    assert not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebarNav"]')
    assert not driver.find_elements(By.CSS_SELECTOR, ".st-key-filter_name")


def _sign_in(driver: Any, url: str, email: str) -> None:
    """Sign-in button, then the provider's form: who signs in."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    _signed_out(driver)
    click(driver, "galsift_oidc_login")
    form = wait(driver, "input[name='sub']", clickable=True)  # the provider's page now
    form.send_keys(email)
    driver.find_element(By.CSS_SELECTOR, "form button[type='submit']").click()


def _sign_out(driver: Any) -> None:
    """Sign-out button; the provider's end-session page (RP-initiated logout) sends the browser back."""
    click(driver, "galsift_sign_out")
    wait(driver, "form[action*='end_session/confirm'] button", clickable=True).click()
    _signed_out(driver)


def test_oidc_sign_in_owns_what_the_user_makes_and_sign_out_closes_the_pages(
    dashboard: dict[str, Any], users: dict[str, str], browser: Any, engine: Engine
) -> None:
    from selenium.webdriver.common.by import By

    url, driver = dashboard["url"], browser
    # before sign-in no page opens, at any address, with or without a forged login cookie
    for path in ("/", "/filters", "/sql"):
        driver.get(url + path)
        _signed_out(driver)
    driver.add_cookie(
        {"name": "_streamlit_user", "value": json.dumps({"email": users["alice"], "is_logged_in": True})}
    )
    driver.get(url + "/filters")
    _signed_out(driver)
    driver.delete_all_cookies()

    _sign_in(driver, url, users["alice"])
    caption = wait(driver, f"//*[contains(normalize-space(.), 'signed in as {users['alice']}')]", by=By.XPATH)
    assert caption.is_displayed()
    assert not driver.find_elements(By.CSS_SELECTOR, ".st-key-galsift_user_field")  # no typed name

    # what she makes is hers: an alert filter added from its page is stored under her address
    driver.get(url + "/filters")
    name = f"oidc-{uuid.uuid4().hex[:6]}"
    type_into(driver, "filter_name", name, enter=False)
    wait(driver, ".st-key-filter_clause textarea", clickable=True).send_keys("lens_score > 0.8")
    click(driver, "filter_add")
    owner_sql = "SELECT owner FROM alert_filters WHERE name = :n"
    wait_for(lambda: _scalar(engine, owner_sql, n=name) is not None, timeout_s=90, what="the filter row")
    owner = _scalar(engine, owner_sql, n=name)
    assert owner == users["alice"]

    _sign_out(driver)
    driver.get(url + "/filters")
    _signed_out(driver)


def test_an_unverified_address_gets_no_page(
    dashboard: dict[str, Any], users: dict[str, str], browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    driver.delete_all_cookies()
    _sign_in(driver, dashboard["url"], users["mallory"])
    error = wait(driver, '[data-testid="stAlertContentError"]')
    assert "unverified" in error.text
    assert not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebarNav"]')
    _sign_out(driver)


def _scalar(engine: Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as c:
        return c.execute(text(sql), params).scalar()
