"""The dashboard's pages: each module is a script that ``st.navigation`` runs (never imported).

The folder is deliberately not called ``pages/``: Streamlit would find a ``pages/`` folder next to
the entry point and serve each script at its own URL *without running app.py*, that is, around
the password gate.
"""
