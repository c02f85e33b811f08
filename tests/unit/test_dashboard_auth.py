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
