"""Who is using the dashboard: a password gate (when configured) and the user name.

When ``settings.dashboard_password`` is set, every page asks for it (with a user name) before it
renders anything: ``app.py`` calls :func:`gate` before ``st.navigation`` runs a page, so no page
can be reached around it. The user name typed at login scopes HITL sessions, labels, saved
searches and notifications: each user sees their own. Without a password the name is still asked
for (in the sidebar), since HITL labels need an owner; anyone may then type any name, which is
what an unprotected dashboard on a trusted network means.

The password is compared in constant time and never stored in the session, logged or echoed.
"""

from __future__ import annotations

import hmac
import re

import streamlit as st

from galsift.settings import Settings

#: session-state key of the logged-in user name
USER_KEY = "galsift_user"
#: what a user name may look like (it becomes ``hitl_sessions.owner`` and ``hitl_labels.author``)
USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


def valid_user(name: str) -> bool:
    """Whether ``name`` is an acceptable user name (1-64 of letters, digits, ``_.@-``)."""
    return bool(USER_RE.match(name))


def password_ok(settings: Settings, given: str) -> bool:
    """Whether ``given`` is the configured dashboard password (constant-time comparison)."""
    secret = settings.dashboard_password
    if secret is None:
        return True
    return hmac.compare_digest(given.encode(), secret.get_secret_value().encode())


def current_user() -> str | None:
    """The user name of this browser session, or None before login."""
    user = st.session_state.get(USER_KEY)
    return str(user) if user else None


def gate(settings: Settings) -> str | None:
    """Ask for the password (when one is configured) and the user name; stop the page until given.

    Returns
    -------
    str or None
        The user name. Without a password it may be None (the sidebar field is empty); pages that
        write (HITL, labels from alerts) ask for it themselves.
    """
    if settings.dashboard_password is None:
        with st.sidebar:
            name = st.text_input(
                "Your name",
                value=st.session_state.get(USER_KEY, ""),
                key="galsift_user_field",
                help="sessions, labels and notifications are kept under this name",
            ).strip()
        if name and valid_user(name):
            st.session_state[USER_KEY] = name
        elif name:
            st.sidebar.error("letters, digits and _.@- only (at most 64)")
            st.session_state.pop(USER_KEY, None)
        else:
            st.session_state.pop(USER_KEY, None)
        return current_user()
    user = current_user()
    if user is not None:
        with st.sidebar:
            st.caption(f"signed in as **{user}**")
            if st.button("Sign out", key="galsift_sign_out"):
                st.session_state.pop(USER_KEY, None)
                st.rerun()
        return user
    _login_form(settings)
    st.stop()
    return None  # not reached: st.stop() ends the run


def _login_form(settings: Settings) -> None:
    st.title("galsift")
    st.write("This dashboard is protected. Sign in to continue.")
    with st.form("galsift_login"):
        name = st.text_input("User name", key="galsift_login_user")
        password = st.text_input("Password", type="password", key="galsift_login_password")
        submitted = st.form_submit_button("Sign in")
    if not submitted:
        return
    name = name.strip()
    if not valid_user(name):
        st.error("User name: letters, digits and _.@- only (1-64 characters).")
    elif not password_ok(settings, password):
        st.error("Wrong password.")
    else:
        st.session_state[USER_KEY] = name
        # the rerun renders no login form, so Streamlit drops the password field's state with it
        st.rerun()
