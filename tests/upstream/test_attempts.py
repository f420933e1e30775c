"""When a request is tried again (upstream/attempts.py), sans-IO."""

from __future__ import annotations

import pytest

from openclawd.errors import UpstreamConnectionError, UpstreamError, UpstreamTimeoutError
from openclawd.upstream.attempts import MAX_RETRY_AFTER_S, Attempts, full_jitter


def plan(max_retries: int = 2, deadline: float = 100.0) -> Attempts:
    return Attempts(max_retries, lambda n: float(n), deadline)


def test_connection_failures_are_retried_up_to_max_retries_with_backoff() -> None:
    attempts = plan(max_retries=2)
    delays = []
    while True:
        attempts.start()
        delay = attempts.after_error(UpstreamConnectionError("refused"), now=0.0)
        if delay is None:
            break
        delays.append(delay)
    assert (delays, attempts.count) == ([1.0, 2.0], 3)


@pytest.mark.parametrize(
    "error", [UpstreamTimeoutError("read timeout"), UpstreamError("dropped mid-body")]
)
def test_other_failures_are_never_retried(error: UpstreamError) -> None:
    attempts = plan()
    attempts.start()
    assert attempts.after_error(error, now=0.0) is None


def test_a_retry_that_would_start_after_the_deadline_is_not_made() -> None:
    attempts = plan(deadline=10.0)
    attempts.start()
    assert attempts.after_error(UpstreamConnectionError("x"), now=8.9) == 1.0
    attempts.start()
    assert attempts.after_error(UpstreamConnectionError("x"), now=8.0) is None  # 8 + 2 >= 10


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_retry_statuses_wait_retry_after_else_backoff(status: int) -> None:
    attempts = plan()
    attempts.start()
    assert attempts.after_status(status, 0.25, now=0.0) == 0.25
    attempts.start()
    assert attempts.after_status(status, None, now=0.0) == 2.0
    attempts.start()
    assert attempts.after_status(status, None, now=0.0) is None  # max_retries spent


@pytest.mark.parametrize("status", [200, 400, 401, 404, 500, 501])
def test_other_statuses_are_relayed(status: int) -> None:
    attempts = plan()
    attempts.start()
    assert attempts.after_status(status, 0.0, now=0.0) is None


def test_a_long_retry_after_is_left_to_the_app() -> None:
    attempts = plan(deadline=1000.0)
    attempts.start()
    assert attempts.after_status(429, MAX_RETRY_AFTER_S, now=0.0) == MAX_RETRY_AFTER_S
    assert attempts.after_status(429, MAX_RETRY_AFTER_S + 1, now=0.0) is None


def test_a_body_sent_once_is_never_retried() -> None:
    attempts = plan(max_retries=0)
    attempts.start()
    assert attempts.after_status(503, 0.0, now=0.0) is None
    assert attempts.after_error(UpstreamConnectionError("x"), now=0.0) is None


@pytest.mark.parametrize("status", [401, 403])
def test_a_fresh_key_is_asked_for_once_per_request(status: int) -> None:
    attempts = plan()
    assert [attempts.wants_fresh_key(status) for _ in range(3)] == [True, False, False]
    assert not plan().wants_fresh_key(429)


def test_the_first_attempt_is_known() -> None:
    attempts = plan()
    assert attempts.first
    attempts.start()
    assert not attempts.first


def test_full_jitter_is_uniform_below_the_capped_exponential() -> None:
    highs: list[float] = []
    backoff = full_jitter(0.5, 3.0, lambda high: highs.append(high) or high)
    assert [backoff(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert highs == [0.5, 1.0, 2.0, 3.0, 3.0]
