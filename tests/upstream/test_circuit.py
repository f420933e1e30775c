"""The per-provider circuit breaker: closed, open for reset_s, one half-open probe."""

from __future__ import annotations

import pytest

from openclawd.upstream.circuit import CircuitBreaker, CircuitState, Ticket

T0 = 500.0


def opened_breaker(at: float = T0) -> CircuitBreaker:
    breaker = CircuitBreaker(failure_threshold=3, reset_s=30)
    for _ in range(3):
        assert breaker.allow(at)
        breaker.failure(at)
    assert breaker.state is CircuitState.OPEN
    return breaker


def test_closed_allows_everything() -> None:
    breaker = CircuitBreaker(failure_threshold=3, reset_s=30)
    assert breaker.state is CircuitState.CLOSED
    assert all(breaker.allow(T0 + i) for i in range(100))
    assert breaker.retry_after(T0) == 0.0


def test_two_failures_stay_closed() -> None:
    breaker = CircuitBreaker(failure_threshold=3, reset_s=30)
    breaker.failure(T0)
    breaker.failure(T0 + 1)
    assert breaker.state is CircuitState.CLOSED
    assert breaker.allow(T0 + 2)
    assert breaker.retry_after(T0 + 2) == 0.0


def test_success_resets_the_count() -> None:
    breaker = CircuitBreaker(failure_threshold=3, reset_s=30)
    breaker.failure(T0)
    breaker.failure(T0)
    breaker.success()
    assert breaker.failures == 0
    breaker.failure(T0)
    breaker.failure(T0)
    assert breaker.state is CircuitState.CLOSED
    assert breaker.allow(T0)
    breaker.failure(T0)
    assert breaker.state is CircuitState.OPEN


def test_three_consecutive_failures_open() -> None:
    breaker = opened_breaker()
    assert not breaker.allow(T0)
    assert not breaker.allow(T0 + 29.999)


@pytest.mark.parametrize(("elapsed", "left"), [(0, 30), (0.5, 29.5), (10, 20), (29, 1), (30, 0)])
def test_retry_after_decreases_while_open(elapsed: float, left: float) -> None:
    breaker = opened_breaker()
    assert breaker.retry_after(T0 + elapsed) == pytest.approx(left)


def test_retry_after_never_negative() -> None:
    assert opened_breaker().retry_after(T0 + 1000) == 0.0


def test_half_open_lets_exactly_one_probe() -> None:
    breaker = opened_breaker()
    assert breaker.allow(T0 + 30)
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.retry_after(T0 + 30) == 0.0
    assert not breaker.allow(T0 + 30)
    assert not breaker.allow(T0 + 100)


def test_probe_success_closes() -> None:
    breaker = opened_breaker()
    assert breaker.allow(T0 + 30)
    breaker.success()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.failures == 0
    assert all(breaker.allow(T0 + 31) for _ in range(5))
    # A fresh count: it takes three new failures to open again.
    breaker.failure(T0 + 32)
    breaker.failure(T0 + 32)
    assert breaker.state is CircuitState.CLOSED


def test_probe_failure_reopens_with_a_new_window() -> None:
    breaker = opened_breaker()
    ticket = breaker.allow(T0 + 40)
    assert ticket is Ticket.PROBE
    breaker.failure(T0 + 45, ticket)
    assert breaker.state is CircuitState.OPEN
    assert not breaker.allow(T0 + 45)
    assert breaker.retry_after(T0 + 45) == pytest.approx(30)
    assert not breaker.allow(T0 + 74.9)
    assert breaker.allow(T0 + 75)
    assert breaker.state is CircuitState.HALF_OPEN
    assert not breaker.allow(T0 + 75)


def test_abandon_frees_the_probe_slot() -> None:
    breaker = opened_breaker()
    probe = breaker.allow(T0 + 30)
    assert probe is Ticket.PROBE
    assert not breaker.allow(T0 + 31)
    breaker.abandon(probe)
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.allow(T0 + 32) is Ticket.PROBE
    assert not breaker.allow(T0 + 32)


def test_only_the_probe_frees_the_probe_slot() -> None:
    """A request let through while closed and cancelled after the circuit opened must
    not let a second probe go while the first is out."""
    breaker = CircuitBreaker(failure_threshold=1, reset_s=30)
    early = breaker.allow(T0)
    assert early is Ticket.NORMAL
    breaker.failure(T0)  # another request's failure opens the circuit
    assert breaker.allow(T0 + 30) is Ticket.PROBE
    breaker.abandon(early)
    breaker.failure(T0 + 31, early)  # a late verdict of a non-probe
    assert breaker.state is CircuitState.OPEN
    assert breaker.allow(T0 + 61) is None  # the probe is still out


def test_abandon_when_closed_changes_nothing() -> None:
    breaker = CircuitBreaker(failure_threshold=3, reset_s=30)
    breaker.failure(T0)
    breaker.abandon()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.failures == 1
    assert breaker.allow(T0)


@pytest.mark.parametrize("threshold", [1, 2, 5])
def test_threshold_is_configurable(threshold: int) -> None:
    breaker = CircuitBreaker(failure_threshold=threshold, reset_s=10)
    for _ in range(threshold - 1):
        breaker.failure(T0)
    assert breaker.state is CircuitState.CLOSED
    breaker.failure(T0)
    assert breaker.state is CircuitState.OPEN
    assert breaker.retry_after(T0) == pytest.approx(10)
