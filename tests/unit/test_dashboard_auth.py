"""The dashboard's gate: with a password set no page runs before sign-in (no database needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import streamlit as st
from pydantic import SecretStr
from streamlit.testing.v1 import AppTest

from dashboard import auth, cli
from galsift.settings import Settings

pytestmark = pytest.mark.apptest

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")


@pytest.fixture
def protected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GALSIFT_DASHBOARD_PASSWORD", "s3cret-phrase")
    monkeypatch.setenv("GALSIFT_DATA_DIR", str(tmp_path))
    # an unreachable database: a page that ran would fail loudly
    monkeypatch.setenv("GALSIFT_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    st.cache_resource.clear()
    st.cache_data.clear()


def _titles(at: AppTest) -> list[str]:
    return [t.value for t in at.title]


@pytest.mark.usefixtures("protected")
def test_no_page_before_sign_in() -> None:
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.exception
    assert _titles(at) == ["galsift"]
    assert "Search" not in _titles(at)
    assert auth.USER_KEY not in at.session_state


@pytest.mark.usefixtures("protected")
def test_wrong_password_is_refused_and_not_echoed() -> None:
    at = AppTest.from_file(APP, default_timeout=30).run()
    at.text_input(key="galsift_login_user").input("ana")
    at.text_input(key="galsift_login_password").input("guess")
    at.button[0].click().run()
    assert [e.value for e in at.error] == ["Wrong password."]
    assert auth.USER_KEY not in at.session_state
    assert "s3cret-phrase" not in str([e.value for e in at.markdown])


@pytest.mark.usefixtures("protected")
def test_bad_user_name_is_refused() -> None:
    at = AppTest.from_file(APP, default_timeout=30).run()
    at.text_input(key="galsift_login_user").input("ana; DROP")
    at.text_input(key="galsift_login_password").input("s3cret-phrase")
    at.button[0].click().run()
    assert at.error and "User name" in at.error[0].value
    assert auth.USER_KEY not in at.session_state


def test_password_and_names() -> None:
    s = Settings(_env_file=None, dashboard_password=SecretStr("pw"))  # type: ignore[call-arg]
    assert auth.password_ok(s, "pw") and not auth.password_ok(s, "pw ") and not auth.password_ok(s, "")
    assert auth.password_ok(Settings(_env_file=None), "anything")  # type: ignore[call-arg]
    assert auth.valid_user("ana.b-1@obs") and not auth.valid_user("") and not auth.valid_user("a b")
    assert not auth.valid_user("x" * 65)


def test_streamlit_command_uses_the_configured_port() -> None:
    s = Settings(_env_file=None, dashboard_port=8777)  # type: ignore[call-arg]
    argv = cli.streamlit_command(s)
    assert argv[1:4] == ["-m", "streamlit", "run"] and argv[4].endswith("dashboard/app.py")
    assert argv[argv.index("--server.port") + 1] == "8777"
    assert argv[argv.index("--server.headless") + 1] == "true"
    assert cli.streamlit_command(s, port=9000)[argv.index("--server.port") + 1] == "9000"


# run in a child Python so that nothing imported by other tests hides a missing warm-up
_LAUNCH = """
import sys
from streamlit.web import cli as streamlit_cli
from dashboard import data
from galsift.cli import main

def server(*args, **kwargs):
    print("argv", " ".join(sys.argv))
    print("warm", all(name in sys.modules for name in data.WARM_MODULES))
    return 0

streamlit_cli.main = server
sys.exit(main(["dashboard", "--port", "8799"]))
"""


def test_dashboard_warms_up_before_the_server_starts_even_without_a_database(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {
        **os.environ,
        # nothing listens on port 9: the warm-up must log this and let the server start
        "GALSIFT_DATABASE_URL": "postgresql+psycopg://galsift@127.0.0.1:9/galsift",
    }
    done = subprocess.run(
        [sys.executable, "-c", _LAUNCH], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "warm True" in out
    assert "argv streamlit run " in out and "--server.port 8799" in out
    assert "no database connection yet" in done.stderr + out


# -- OpenID Connect ---------------------------------------------------------------------------------
def _oidc(**extra: object) -> Settings:
    return Settings(  # type: ignore[call-arg]
        _env_file=None,
        dashboard_oidc_url="https://login.example.org/realms/survey/",
        dashboard_oidc_client_id="galsift",
        dashboard_oidc_client_secret=SecretStr("client-s3cret"),
        **extra,
    )


@pytest.fixture
def oidc_protected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GALSIFT_DASHBOARD_OIDC_URL", "https://login.example.org")
    monkeypatch.setenv("GALSIFT_DASHBOARD_OIDC_CLIENT_ID", "galsift")
    monkeypatch.setenv("GALSIFT_DASHBOARD_OIDC_CLIENT_SECRET", "client-s3cret")
    monkeypatch.setenv("GALSIFT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("GALSIFT_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    st.cache_resource.clear()
    st.cache_data.clear()


@pytest.mark.usefixtures("oidc_protected")
def test_with_oidc_no_page_and_no_name_field_before_sign_in() -> None:
    at = AppTest.from_file(APP, default_timeout=30)
    at.user = {"is_logged_in": False}
    at.run()
    assert not at.exception
    assert _titles(at) == ["galsift"]
    assert [b.key for b in at.button] == ["galsift_oidc_login"]
    # no typed name, no password: the provider says who the user is
    assert not at.text_input
    assert auth.USER_KEY not in at.session_state


@pytest.mark.usefixtures("oidc_protected")
def test_with_oidc_an_unverified_address_opens_no_page() -> None:
    at = AppTest.from_file(APP, default_timeout=30)
    at.user = {"is_logged_in": True, "email": "mallory@example.org", "email_verified": False}
    at.run()
    assert not at.exception
    assert at.error and "unverified" in at.error[0].value
    assert [b.key for b in at.button] == ["galsift_sign_out"]
    assert auth.USER_KEY not in at.session_state


def test_the_user_is_the_verified_claim() -> None:
    alice = {
        "sub": "u-17",
        "email": "alice@example.org",
        "email_verified": True,
        "preferred_username": "alice",
    }
    assert auth.oidc_user(alice, "email") == "alice@example.org"
    assert auth.oidc_user(alice, "preferred_username") == "alice"
    assert auth.oidc_user(alice, "sub") == "u-17"
    # an unverified address is anyone's to type; a missing or unusable claim names nobody
    assert auth.oidc_user({**alice, "email_verified": False}, "email") is None
    assert auth.oidc_user(alice, "nickname") is None
    assert auth.oidc_user({**alice, "email": "a b@example.org"}, "email") is None
    assert auth.oidc_user({**alice, "sub": 17}, "sub") is None


def test_oidc_settings_are_complete_and_exclusive() -> None:
    s = _oidc()
    assert (
        s.dashboard_oidc_metadata_url
        == "https://login.example.org/realms/survey/.well-known/openid-configuration"
    )
    with pytest.raises(ValueError, match="client_id and dashboard_oidc_client_secret"):
        Settings(_env_file=None, dashboard_oidc_url="https://login.example.org")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="not both"):
        _oidc(dashboard_password=SecretStr("pw"))
    with pytest.raises(ValueError, match="not an http"):
        _oidc(dashboard_public_url="login.example.org")


def test_streamlit_gets_the_provider_in_a_private_secrets_file(tmp_path: Path) -> None:
    import stat
    import tomllib

    s = _oidc(data_dir=tmp_path, dashboard_public_url="https://galsift.example.org/")
    path = cli.write_secrets(s, port=8501)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = tomllib.loads(path.read_text())["auth"]
    assert doc["redirect_uri"] == "https://galsift.example.org/oauth2callback"
    assert doc["client_id"] == "galsift" and doc["client_secret"] == "client-s3cret"
    assert doc["server_metadata_url"].endswith("/realms/survey/.well-known/openid-configuration")
    # without a configured cookie secret each start signs with a fresh random one
    again = tomllib.loads(auth.streamlit_secrets(s, port=8501))["auth"]
    assert len(doc["cookie_secret"]) >= 32 and again["cookie_secret"] != doc["cookie_secret"]
    fixed = _oidc(dashboard_cookie_secret=SecretStr('k"e\\y' * 8))
    assert tomllib.loads(auth.streamlit_secrets(fixed, port=9000))["auth"]["cookie_secret"] == 'k"e\\y' * 8
    assert tomllib.loads(auth.streamlit_secrets(fixed, port=9000))["auth"]["redirect_uri"] == (
        "http://localhost:9000/oauth2callback"
    )
