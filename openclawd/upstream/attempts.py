"""When a request to a provider is tried again, and after how long (sans-IO).

One ``Attempts`` per request: the pool tells it how each attempt went and it answers
whether to try again and after what delay, or to stop (raise the failure, or relay the
response). Retried, before any byte is relayed: connection failures (never timeouts: the
provider may be working on the request), and 429, 502, 503, 504 (after ``Retry-After``,
or backoff with full jitter), within ``max_retries`` and the total deadline; once, with a
fresh key, after 401/403. A streamed body is read once: never retried. No I/O, no clock:
``now`` is passed in.
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Callable

from openclawd.errors import UpstreamConnectionError, UpstreamError

RETRY_STATUSES = frozenset({429, 502, 503, 504})
AUTH_STATUSES = frozenset({401, 403})
# Retry-After beyond this is not waited for: the response is relayed and the app decides.
MAX_RETRY_AFTER_S = 60.0


class Attempts:
    """The attempts of one request.

    Args:
        max_retries: retries after the first attempt (0 for a body that cannot be sent
            again).
        backoff: the delay before retry number ``n`` (1, 2, ...) when the upstream named
            none.
        deadline: the request's total deadline; a retry that would start after it is not
            made.
    """

    def __init__(self, max_retries: int, backoff: Callable[[int], float], deadline: float) -> None:
        self.max_retries = max_retries
        self._backoff = backoff
        self.deadline = deadline
        self.count = 0  # attempts started
        self._key_refreshed = False

    @property
    def first(self) -> bool:
        """Is the attempt about to start the request's first?"""
        return self.count == 0

    def start(self) -> None:
        self.count += 1

    def after_error(self, error: UpstreamError, now: float) -> float | None:
        """An attempt failed before any response: the delay before the next, or None to
        give up (raise ``error``)."""
        if not isinstance(error, UpstreamConnectionError) or self.count > self.max_retries:
            return None
        return self._within_deadline(self._backoff(self.count), now)

    def wants_fresh_key(self, status: int) -> bool:
        """Ask the key source for a fresh key after this status? (Once per request.)"""
        if status in AUTH_STATUSES and not self._key_refreshed:
            self._key_refreshed = True
            return True
        return False

    def after_status(self, status: int, retry_after_s: float | None, now: float) -> float | None:
        """A response came with ``status``: the delay before trying again, or None to
        relay it. A ``Retry-After`` over ``MAX_RETRY_AFTER_S`` is the app's to honour."""
        if status not in RETRY_STATUSES or self.count > self.max_retries:
            return None
        delay = self._backoff(self.count) if retry_after_s is None else retry_after_s
        if delay > MAX_RETRY_AFTER_S:
            return None
        return self._within_deadline(delay, now)

    def _within_deadline(self, delay: float, now: float) -> float | None:
        return None if now + delay >= self.deadline else delay


def full_jitter(
    base_s: float, max_s: float, uniform: Callable[[float], float]
) -> Callable[[int], float]:
    """Backoff with full jitter: retry ``n`` waits uniform in [0, min(max, base * 2^(n-1))]."""
    return lambda n: uniform(min(max_s, base_s * 2 ** (n - 1)))


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """``Retry-After`` as seconds from ``now`` (delta-seconds or an HTTP date); None if
    absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - now
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
