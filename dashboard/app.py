"""The galsift dashboard's single entry point: ``streamlit run dashboard/app.py`` (``galsift dashboard``).

Sets the page up, asks for the password and user name (:mod:`dashboard.auth`) before any page can
run, then routes with ``st.navigation`` to the pages in ``dashboard/views/``.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard import auth, data

#: the pages, in menu order: (script, title, icon, url path)
PAGES = (
    ("search.py", "Search", ":material/travel_explore:", "search"),
    ("hitl.py", "HITL loop", ":material/thumbs_up_down:", "hitl"),
    ("alerts.py", "Alerts", ":material/notifications_active:", "alerts"),
    ("filters.py", "Alert filters", ":material/filter_alt:", "filters"),
    ("sql.py", "SQL", ":material/database:", "sql"),
    ("operations.py", "Operations", ":material/monitoring:", "operations"),
)
PAGES_DIR = Path(__file__).resolve().parent / "views"


def main() -> None:
    """Configure the page, gate it, route to the chosen page."""
    st.set_page_config(page_title="galsift", page_icon="🔭", layout="wide")
    # the gate runs before navigation: without the password no page script is ever executed
    auth.gate(data.settings())
    pages = [
        st.Page(PAGES_DIR / script, title=title, icon=icon, url_path=url, default=(i == 0))
        for i, (script, title, icon, url) in enumerate(PAGES)
    ]
    st.navigation(pages).run()


main()
