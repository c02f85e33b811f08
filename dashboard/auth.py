"""Who is using the dashboard: an OpenID Connect login or a password gate (when configured).

``app.py`` calls :func:`gate` before ``st.navigation`` runs a page, so no page can be reached
around it. The user name scopes HITL sessions, labels, saved searches, alert filters and
notifications: each user sees their own.

- **OpenID Connect** (``settings.dashboard_oidc_url``): Streamlit's own ``st.login`` sends the
  browser to the provider and keeps the provider's signed identity in a signed cookie; the user
  is the ID token's ``settings.dashboard_oidc_user_claim`` (``email`` by default, refused when
  the provider says the address is unverified). Nobody can choose another user's name.
  ``galsift dashboard`` hands the client credentials to Streamlit in a private secrets file
  (:func:`streamlit_secrets`).
- **Password** (``settings.dashboard_password``): every page asks for it with a user name. The
  password is compared in constant time and never stored in the session, logged or echoed;
  whoever knows it may type any name, so a shared password separates users only by agreement.
- **Neither**: the name is still asked for (in the sidebar), since HITL labels need an owner;
  anyone may type any name, which is what an unprotected dashboard on a trusted network means.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
from collections.abc import Mapping
from typing import Any

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
    if settings.dashboard_oidc_url is not None:
        return _oidc_gate(settings)
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


def oidc_user(claims: Mapping[str, Any], claim: str) -> str | None:
    """The user name an ID token's ``claims`` give, or None when they give no usable one.

    Parameters
    ----------
    claims
        The provider's identity claims (``st.user``).
    claim
        Which claim names the user (``email``, ``preferred_username``, ``sub``, ...).
    """
    value = claims.get(claim)
    if not isinstance(value, str) or not valid_user(value):
        return None
    # an address the provider has not verified is anyone's to type
    if claim == "email" and claims.get("email_verified") is False:
        return None
    return value


def _oidc_gate(settings: Settings) -> str:
    claim = settings.dashboard_oidc_user_claim
    if not st.user.is_logged_in:
        st.session_state.pop(USER_KEY, None)
        st.title("galsift")
        st.write("This dashboard is protected. Sign in with your organisation's account to continue.")
        if st.button("Sign in", key="galsift_oidc_login", type="primary"):
            st.login()
        st.stop()
    user = oidc_user(st.user.to_dict(), claim)
    if user is None:
        st.session_state.pop(USER_KEY, None)
        st.error(
            f"Your account's `{claim}` is missing, unverified or not a usable user name "
            "(letters, digits and _.@- only, at most 64): ask the operator to map another claim."
        )
        if st.button("Sign out", key="galsift_sign_out"):
            st.logout()
        st.stop()
    st.session_state[USER_KEY] = user
    with st.sidebar:
        st.caption(f"signed in as **{user}**")
        if st.button("Sign out", key="galsift_sign_out"):
            st.session_state.pop(USER_KEY, None)
            st.logout()
    return str(user)


def streamlit_secrets(settings: Settings, *, port: int) -> str:
    """The ``secrets.toml`` text that configures Streamlit's OIDC login from ``settings``.

    Parameters
    ----------
    settings
        Settings with ``dashboard_oidc_url`` and the client credentials.
    port
        The port the dashboard serves on (for the default redirect address).

    Returns
    -------
    str
        An ``[auth]`` section: redirect URI, cookie secret (random when none is configured),
        client id and secret, the provider's discovery URL.
    """
    if settings.dashboard_oidc_url is None or settings.dashboard_oidc_client_secret is None:
        raise ValueError("no OpenID Connect provider is configured (dashboard_oidc_url)")
    base = settings.dashboard_public_url or f"http://localhost:{port}"
    cookie = settings.dashboard_cookie_secret
    values = {
        "redirect_uri": f"{base}/oauth2callback",
        "cookie_secret": cookie.get_secret_value() if cookie is not None else secrets.token_urlsafe(32),
        "client_id": settings.dashboard_oidc_client_id,
        "client_secret": settings.dashboard_oidc_client_secret.get_secret_value(),
        "server_metadata_url": settings.dashboard_oidc_metadata_url,
    }
    # JSON string literals are valid TOML basic strings (same quoting and escapes)
    return "[auth]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


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
