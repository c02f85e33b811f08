"""The galsift dashboard: a Streamlit app over the HITL engine and the database.

``dashboard/app.py`` is the single entry point (``galsift dashboard`` runs it; ``galsift up``
starts it with the other services). Pages live in ``dashboard/views/``; cached connections and
queries in :mod:`dashboard.data`; cutouts with an astronomical stretch in :mod:`dashboard.images`;
the login gate in :mod:`dashboard.auth`. Nothing else in galsift imports this package.
"""
