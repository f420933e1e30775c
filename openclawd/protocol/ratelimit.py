"""The optional local request rate per peer uid (``[limits] requests_per_minute``).

Sans-IO: a token bucket per uid, with ``now`` passed in. A uid may burst up to a minute's
worth of requests, then gets one every ``60 / requests_per_minute`` seconds. Shared by all
connections of the data socket; knows nothing of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from openclawd.errors import RateLimitedError

# Buckets that are full again carry no state worth keeping: swept past this many uids.
_SWEEP_AT = 1024


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """``requests_per_minute`` per uid; 0 means unlimited."""

    def __init__(self, requests_per_minute: int) -> None:
        self.requests_per_minute = requests_per_minute
        self._buckets: dict[int, _Bucket] = {}

    def acquire(self, uid: int, now: float) -> float | None:
        """Take one request for ``uid``: None if allowed, else seconds until it would be."""
        capacity = float(self.requests_per_minute)
        if not capacity:
            return None
        rate = capacity / 60.0
        bucket = self._buckets.get(uid)
        if bucket is None:
            if len(self._buckets) >= _SWEEP_AT:
                self._sweep(now, capacity, rate)
            bucket = self._buckets[uid] = _Bucket(capacity, now)
        bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return (1.0 - bucket.tokens) / rate

    def check(self, uid: int, now: float) -> RateLimitedError | None:
        """Take one request for ``uid``: None if allowed, else the error that refuses it
        (the same on every entry point: an error frame, a close 1013, an HTTP 429)."""
        retry_after = self.acquire(uid, now)
        if retry_after is None:
            return None
        return RateLimitedError(
            f"rate limited: over {self.requests_per_minute} requests per minute for uid {uid}",
            retry_after_s=math.ceil(retry_after * 1000) / 1000,
        )

    def _sweep(self, now: float, capacity: float, rate: float) -> None:
        self._buckets = {
            uid: b
            for uid, b in self._buckets.items()
            if b.tokens + (now - b.updated) * rate < capacity
        }
