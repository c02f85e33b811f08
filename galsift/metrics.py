"""Prometheus metrics and a health endpoint for every galsift service.

Each service process serves, on ``settings.metrics_port`` (``galsift up`` gives each service its
own port from ``settings.metrics_port_base``):

``/metrics``
    the Prometheus text format (``prometheus-client``): items consumed, accepted and rejected (by
    reason), batches, write retries, faults, consumer lag, batch duration, and ``galsift_healthy``;
``/healthz``
    ``200 ok`` while the service is healthy, ``503`` with the fault while it rides one out (the
    broker or the database is away), so an orchestrator or ``galsift stack status`` can tell
    "slow" from "stuck" without reading logs.

Metrics are defined once per process with a ``service`` label, so several stages in one process
(tests) share them without clashing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

#: the registry galsift's services publish (not the global one: no process/platform collectors
#: from other libraries leak in, and tests can read it directly)
REGISTRY = CollectorRegistry(auto_describe=True)

CONSUMED = Counter("galsift_consumed", "Kafka records consumed and committed", ["service"], registry=REGISTRY)
ACCEPTED = Counter("galsift_accepted", "items written durably", ["service"], registry=REGISTRY)
REJECTED = Counter(
    "galsift_rejected", "items sent to the dead-letter topic", ["service", "reason"], registry=REGISTRY
)
BATCHES = Counter("galsift_batches", "batches committed", ["service"], registry=REGISTRY)
WRITE_RETRIES = Counter("galsift_write_retries", "batch writes retried", ["service"], registry=REGISTRY)
FAULTS = Counter(
    "galsift_faults", "faults of a dependency (broker, database, store)", ["service"], registry=REGISTRY
)
LAG = Gauge(
    "galsift_consumer_lag",
    "records behind the end of the assigned partitions",
    ["service"],
    registry=REGISTRY,
)
HEALTHY = Gauge(
    "galsift_healthy", "1 while healthy, 0 while riding out a fault", ["service"], registry=REGISTRY
)
BATCH_SECONDS = Histogram(
    "galsift_batch_seconds",
    "time from poll to commit of one batch",
    ["service"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)


class Health:
    """What ``/healthz`` answers: healthy, or the fault being ridden out."""

    def __init__(self) -> None:
        self._faults: dict[str, str] = {}
        self._lock = threading.Lock()

    def fault(self, service: str, text: str) -> None:
        """Mark ``service`` unhealthy with the fault's one-line description."""
        with self._lock:
            self._faults[service] = text
        HEALTHY.labels(service).set(0)
        FAULTS.labels(service).inc()

    def ok(self, service: str) -> None:
        """Mark ``service`` healthy."""
        with self._lock:
            self._faults.pop(service, None)
        HEALTHY.labels(service).set(1)

    def report(self) -> tuple[bool, str]:
        """(healthy, text) over every service of this process."""
        with self._lock:
            if not self._faults:
                return True, "ok\n"
            return False, "".join(f"{s}: {t}\n" for s, t in sorted(self._faults.items()))


HEALTH = Health()
_metrics_app = make_wsgi_app(REGISTRY)
_server: WSGIServer | None = None


def _app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("PATH_INFO") == "/healthz":
        healthy, text = HEALTH.report()
        start_response("200 OK" if healthy else "503 Service Unavailable", [("Content-Type", "text/plain")])
        return [text.encode()]
    return _metrics_app(environ, start_response)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would drown the service's log: say nothing."""


def serve(port: int, *, host: str = "127.0.0.1") -> int:
    """Serve ``/metrics`` and ``/healthz`` from a daemon thread (once per process); returns the port.

    ``port`` 0 picks a free port (tests).
    """
    global _server
    if _server is None:
        _server = make_server(host, port, _app, handler_class=_QuietHandler)
        threading.Thread(target=_server.serve_forever, name="metrics", daemon=True).start()
    return int(_server.server_port)
