"""The dashboard's gate: with a password set no page runs before sign-in (no database needed)."""

from __future__ import annotations

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
