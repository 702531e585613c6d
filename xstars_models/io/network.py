"""Bounded network waits. Every read over HTTP(S) the package makes — GDAL's ``/vsicurl/`` range
requests for COG URLs and STAC assets, STAC Item documents, STAC API searches (pystac-client, each
page), the Hugging Face Hub — gives up after
a stated time instead of waiting on a stalled server forever, and the error names the URL, the
limit and how to raise it.

Limits (environment variables, read at each use; seconds unless said otherwise):

- ``XSTARS_HTTP_TIMEOUT`` (default 30): the longest wait for one request: to connect, for the
  headers, and (GDAL, STAC) with no bytes arriving (GDAL's ``GDAL_HTTP_LOW_SPEED_TIME`` with a
  limit of 1 byte/s).
- ``XSTARS_HTTP_RETRIES`` (default 2): further attempts after a failed or timed-out request
  (GDAL ``GDAL_HTTP_MAX_RETRY``, STAC documents); the Hub's own retry policy applies there.
- ``XSTARS_HTTP_RETRY_DELAY`` (default 1): seconds before the first retry (GDAL doubles it).

So a stalled server ends a run after at most about ``timeout x (1 + retries)`` plus the delays:
92 s with the defaults. GDAL's own variables (``GDAL_HTTP_TIMEOUT``, ``GDAL_HTTP_MAX_RETRY``,
...) win for GDAL when set, and ``HF_HUB_DOWNLOAD_TIMEOUT`` / ``HF_HUB_ETAG_TIMEOUT`` for the Hub.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import InvalidOptionError, NetworkTimeoutError

__all__ = [
    "RETRIES_ENV",
    "RETRY_DELAY_ENV",
    "TIMEOUT_ENV",
    "NetworkLimits",
    "gdal_http_options",
    "network_limits",
    "read_url",
]

TIMEOUT_ENV = "XSTARS_HTTP_TIMEOUT"
RETRIES_ENV = "XSTARS_HTTP_RETRIES"
RETRY_DELAY_ENV = "XSTARS_HTTP_RETRY_DELAY"
# name: (default, smallest allowed, whole numbers only, what it is)
_SETTINGS = {
    TIMEOUT_ENV: (30.0, 0.001, False, "a number of seconds > 0"),
    RETRIES_ENV: (2, 0, True, "a whole number >= 0"),
    RETRY_DELAY_ENV: (1.0, 0, False, "a number of seconds >= 0"),
}


@dataclass(frozen=True)
class NetworkLimits:
    """How long one request may wait and how often it is tried again.

    Attributes:
        timeout_s: seconds to wait for a connection, the headers, or the next bytes.
        retries: further attempts after a failed or timed-out request.
        retry_delay_s: seconds before the first retry.
    """

    timeout_s: float
    retries: int
    retry_delay_s: float

    def attempts(self) -> Iterator[int]:
        """The attempts of one request, numbered from 0: the first at once, then ``retries``
        more, waiting ``retry_delay_s`` before the second and twice as long before each later
        one (exponential backoff). The caller breaks out when an attempt succeeds or must not
        be repeated."""
        delay = self.retry_delay_s
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(delay)
                delay *= 2
            yield attempt

    def describe(self) -> str:
        """The limits and how to change them, for error messages."""
        return (
            f"{self.timeout_s:g} s per request, {self.retries} retries; raise {TIMEOUT_ENV} (seconds) or "
            f"{RETRIES_ENV} for a slow server"
        )


def network_limits() -> NetworkLimits:
    """The limits in force now (environment variables, else the defaults).

    Raises:
        InvalidOptionError: a variable that is not a number in range (``field`` names it).
    """
    values: dict[str, float] = {}
    for name, (default, least, whole, kind) in _SETTINGS.items():
        raw = os.environ.get(name, "").strip()
        try:
            value = float(raw) if raw else float(default)
        except ValueError:
            value = float("nan")
        if not least <= value < float("inf") or (whole and value != int(value)):
            raise InvalidOptionError(f"{name}={raw!r}: expected {kind} (default {default:g}).", field=name)
        values[name] = value
    return NetworkLimits(values[TIMEOUT_ENV], int(values[RETRIES_ENV]), values[RETRY_DELAY_ENV])


def gdal_http_options(limits: NetworkLimits | None = None) -> dict[str, str]:
    """GDAL configuration options that bound its HTTP waits (``/vsicurl/``), except those the user
    set in the environment, which GDAL then reads itself."""
    limits = limits or network_limits()
    options = {
        "GDAL_HTTP_CONNECTTIMEOUT": f"{limits.timeout_s:g}",
        "GDAL_HTTP_TIMEOUT": f"{limits.timeout_s:g}",
        # A server that sent headers and then stalls: GDAL_HTTP_TIMEOUT alone is the whole
        # transfer's limit, so a stall in a long body is caught by "under 1 byte/s for this long".
        "GDAL_HTTP_LOW_SPEED_TIME": f"{max(1, round(limits.timeout_s))}",
        "GDAL_HTTP_LOW_SPEED_LIMIT": "1",
        "GDAL_HTTP_MAX_RETRY": str(limits.retries),
        "GDAL_HTTP_RETRY_DELAY": f"{limits.retry_delay_s:g}",
    }
    return {key: value for key, value in options.items() if key not in os.environ}


def read_url(url: str, what: str, field: str = "source", limits: NetworkLimits | None = None) -> bytes:
    """The body of ``url`` (GET), each attempt bounded by the limits, retried on timeouts,
    connection errors and 5xx answers.

    Why urllib and not pystac's reader: pystac's ``StacIO`` opens URLs with no timeout, so a
    stalled server would hang the run; this is the one place a document is fetched.

    Raises:
        NetworkTimeoutError: every attempt timed out (names the URL and the limits).
        FileNotFoundError: the server answered 4xx, or could not be reached after the retries.
    """
    limits = limits or network_limits()
    failure = ""
    timed_out = False
    for _ in limits.attempts():
        try:
            with urllib.request.urlopen(url, timeout=limits.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            if err.code < 500:
                raise FileNotFoundError(f"{what}: {url} answered HTTP {err.code} ({err.reason}).") from None
            failure, timed_out = f"HTTP {err.code} ({err.reason})", False
        except TimeoutError:
            failure, timed_out = "timed out", True
        except urllib.error.URLError as err:
            timed_out = isinstance(err.reason, TimeoutError)
            failure = "timed out" if timed_out else str(err.reason)
        except OSError as err:  # connection reset mid-body and the like
            failure, timed_out = str(err), False
    attempts = f"{limits.retries + 1} attempt" + ("s" if limits.retries else "")
    if timed_out:
        raise NetworkTimeoutError(
            f"{what}: {url} did not answer in time ({attempts}; {limits.describe()}).", field=field
        )
    raise FileNotFoundError(f"{what}: cannot read {url}: {failure} ({attempts}; {limits.describe()}).")
