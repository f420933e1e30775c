"""A circuit breaker per provider: fail fast while the provider is down, probe to recover.

Sans-IO: ``now`` is passed in. Closed, it lets everything through and counts consecutive
failures (connect errors, timeouts, 5xx); at ``failure_threshold`` it opens. Open, it refuses
everything for ``reset_s``; then it half-opens and lets exactly one request through as a
probe: its success closes the circuit, its failure opens it again for another ``reset_s``.
Knows nothing of HTTP; the caller decides what a failure is.
"""

from __future__ import annotations

import enum


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Ticket(enum.Enum):
    """What ``allow`` let through: a request while closed, or the one half-open probe.
    Handed back with the verdict, so only the probe can free the probe's slot."""

    NORMAL = "normal"
    PROBE = "probe"


class CircuitBreaker:
    def __init__(self, failure_threshold: int, reset_s: float) -> None:
        self.failure_threshold = failure_threshold
        self.reset_s = reset_s
        self.state = CircuitState.CLOSED
        self.failures = 0
        self._opened_at = 0.0
        self._probing = False

    def allow(self, now: float) -> Ticket | None:
        """May a request go upstream now? None if not; in half-open state, one request
        gets ``Ticket.PROBE`` and the others None until its verdict."""
        if self.state is CircuitState.OPEN:
            if now < self._opened_at + self.reset_s:
                return None
            self.state = CircuitState.HALF_OPEN
        if self.state is CircuitState.HALF_OPEN:
            if self._probing:
                return None
            self._probing = True
            return Ticket.PROBE
        return Ticket.NORMAL

    def retry_after(self, now: float) -> float:
        """Seconds until the next probe may go (0 when not open)."""
        if self.state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.reset_s - now)

    def success(self, ticket: Ticket | None = None) -> None:
        """The upstream answered (any status below 500): the circuit closes."""
        self.state = CircuitState.CLOSED
        self.failures = 0
        if ticket is Ticket.PROBE:
            self._probing = False

    def failure(self, now: float, ticket: Ticket | None = None) -> None:
        """A connection failure, a timeout or a 5xx."""
        self.failures += 1
        if self.state is CircuitState.HALF_OPEN or self.failures >= self.failure_threshold:
            self.state = CircuitState.OPEN
            self._opened_at = now
        if ticket is Ticket.PROBE:
            self._probing = False

    def abandon(self, ticket: Ticket | None = None) -> None:
        """A request let through ended with no verdict (cancelled): if it was the probe,
        another request may probe."""
        if ticket is Ticket.PROBE:
            self._probing = False
