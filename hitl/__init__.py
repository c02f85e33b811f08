"""Human-in-the-loop search over the vector table.

Sessions of labelled rounds, saved searches that keep watching the stream, and the scheduled
jobs that retrain from the saved labels.

The engine (:mod:`hitl.engine`) works without any UI; the dashboard and ``galsift hitl`` drive it.
"""
