"""Posting JSON to webhooks: one call, its outcome, and what a retry can change.

Shared by the two senders of galsift: the lens-alert notifier (:mod:`detectors.notify`) and the
saved-search watcher (:mod:`hitl.service`). Each keeps its own delivery state in the database and
decides when to retry; this module only makes the call and classifies the answer, and never
raises for HTTP or network errors, so a sender's loop cannot be taken down by one webhook.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

#: HTTP answers that a retry can change (timeouts, too early, rate limited); other 4xx are final
RETRYABLE_4XX = frozenset({408, 425, 429})


@dataclass(frozen=True)
class PostResult:
    """What one webhook call gave: an HTTP status (None when no answer came) and an error."""

    status: int | None
    error: str | None = None
    #: seconds the server asked to wait (``Retry-After``), if it did
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        """The webhook accepted the message (2xx)."""
        return self.status is not None and 200 <= self.status < 300

    @property
    def final(self) -> bool:
        """A failure that no retry can fix (a client error other than a timeout or rate limit)."""
        return self.status is not None and 400 <= self.status < 500 and self.status not in RETRYABLE_4XX


#: posts one JSON body: (url, payload, headers, timeout in seconds) -> result
Poster = Callable[[str, Mapping[str, Any], Mapping[str, str], float], PostResult]


def post_json(
    url: str, payload: Mapping[str, Any], headers: Mapping[str, str], timeout_s: float
) -> PostResult:
    """POST ``payload`` as JSON with the standard library; never raises for HTTP or network errors.

    Parameters
    ----------
    url
        The webhook (http or https).
    payload
        The JSON body.
    headers
        Extra request headers (``Content-Type: application/json`` is always sent).
    timeout_s
        Connect and read timeout of the call.

    Returns
    -------
    PostResult
        The status and, for a failure, an error text and the server's ``Retry-After``.
    """
    body = json.dumps(payload).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read(65536)
            return PostResult(status=int(response.status))
    except urllib.error.HTTPError as exc:
        detail = exc.read(500).decode("utf-8", "replace").strip()
        return PostResult(
            status=exc.code,
            error=f"HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else ""),
            retry_after_s=_retry_after(exc.headers.get("Retry-After")),
        )
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
        # connection refused, DNS, TLS, timeout: no answer at all
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return PostResult(status=None, error=f"{type(exc).__name__}: {reason}")


def _retry_after(value: str | None) -> float | None:
    # Slack sends seconds; an HTTP date (the other allowed form) is ignored for the plain back-off
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def backoff_s(attempts: int, *, base_s: float, cap_s: float, retry_after_s: float | None = None) -> float:
    """Seconds to wait after ``attempts`` failed attempts: ``base_s * 2**(attempts - 1)``, capped.

    A server's ``Retry-After`` lengthens the wait (never beyond ``cap_s``), never shortens it.
    """
    delay = min(base_s * 2 ** max(attempts - 1, 0), cap_s)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, cap_s))
    return float(delay)


__all__ = ["RETRYABLE_4XX", "PostResult", "Poster", "backoff_s", "post_json"]
