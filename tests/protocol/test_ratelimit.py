"""The per-uid token bucket of ``[limits] requests_per_minute`` (CONTRACT.md 3.4)."""

from __future__ import annotations

import pytest

from openclawd.protocol.ratelimit import RateLimiter

T0 = 1000.0


def burst(limiter: RateLimiter, uid: int, now: float) -> int:
    """How many requests ``uid`` gets through at ``now`` before the first refusal."""
    count = 0
    while limiter.acquire(uid, now) is None:
        count += 1
        assert count < 10_000, "no limit reached"
    return count


def test_zero_is_unlimited() -> None:
    limiter = RateLimiter(0)
    assert all(limiter.acquire(uid % 3, T0) is None for uid in range(10_000))


def test_burst_of_a_minute_then_limited() -> None:
    limiter = RateLimiter(60)
    for _ in range(60):
        assert limiter.acquire(1000, T0) is None
    assert limiter.acquire(1000, T0) == pytest.approx(1.0)
    # Refusals take nothing: the wait does not grow.
    assert limiter.acquire(1000, T0) == pytest.approx(1.0)


def test_retry_after_shrinks_with_time() -> None:
    limiter = RateLimiter(60)
    burst(limiter, 1, T0)
    assert limiter.acquire(1, T0 + 0.25) == pytest.approx(0.75)
    assert limiter.acquire(1, T0 + 0.9) == pytest.approx(0.1)


def test_one_more_after_the_refill_interval() -> None:
    limiter = RateLimiter(60)
    assert burst(limiter, 1, T0) == 60
    assert limiter.acquire(1, T0 + 1.0) is None
    assert limiter.acquire(1, T0 + 1.0) == pytest.approx(1.0)
    assert limiter.acquire(1, T0 + 2.0) is None


@pytest.mark.parametrize(("rpm", "interval"), [(1, 60.0), (30, 2.0), (120, 0.5), (600, 0.1)])
def test_rate_and_burst_follow_requests_per_minute(rpm: int, interval: float) -> None:
    limiter = RateLimiter(rpm)
    assert burst(limiter, 7, T0) == rpm
    assert limiter.acquire(7, T0) == pytest.approx(interval)
    assert limiter.acquire(7, T0 + interval) is None


def test_uids_are_independent() -> None:
    limiter = RateLimiter(60)
    assert burst(limiter, 1, T0) == 60
    assert burst(limiter, 2, T0) == 60
    assert limiter.acquire(1, T0) == pytest.approx(1.0)
    assert limiter.acquire(3, T0) is None


def test_bucket_never_exceeds_capacity_after_idle() -> None:
    limiter = RateLimiter(60)
    assert burst(limiter, 1, T0) == 60
    assert burst(limiter, 1, T0 + 3600) == 60
    assert limiter.acquire(1, T0 + 3600) == pytest.approx(1.0)


def test_partial_refill() -> None:
    limiter = RateLimiter(60)
    burst(limiter, 1, T0)
    assert burst(limiter, 1, T0 + 10.5) == 10
    assert limiter.acquire(1, T0 + 10.5) == pytest.approx(0.5)


def test_sweep_keeps_uids_that_are_still_limited() -> None:
    limiter = RateLimiter(60)
    assert burst(limiter, 0, T0) == 60
    for uid in range(1, 1100):
        assert limiter.acquire(uid, T0) is None
    # Two seconds on, every other uid's bucket is full again (sweepable); uid 0's holds 2.
    assert limiter.acquire(5000, T0 + 2) is None
    assert len(limiter._buckets) < 1024  # the sweep did run
    assert burst(limiter, 0, T0 + 2) == 2
    assert limiter.acquire(0, T0 + 2) == pytest.approx(1.0)


def test_swept_uid_comes_back_with_a_full_bucket() -> None:
    limiter = RateLimiter(60)
    for uid in range(2000):
        assert limiter.acquire(uid, T0) is None
    later = T0 + 120
    assert limiter.acquire(99_999, later) is None
    assert burst(limiter, 5, later) == 60
