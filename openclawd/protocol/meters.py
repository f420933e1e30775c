"""One limit's arithmetic (sans-IO): a per-minute bucket, a UTC day's budget, and a
shared limit's local allowance (CONTRACT.md 5.1, 5.6). ``now`` (trio's clock) and ``day``
(the UTC day's number) are passed in.
"""

from __future__ import annotations

import math

__all__ = ["Allowance", "Bucket", "DayBudget"]

_SECONDS_PER_DAY = 86_400.0


class Bucket:
    """A per-minute limit of ``limit``: holds at most ``limit``, refilled ``limit``/60 a
    second. Corrections may take it below zero (a request that used more than charged);
    it then has no room until refilled past the next amount."""

    def __init__(self, limit: int, now: float) -> None:
        self.limit = limit
        self._level = float(limit)
        self._at = now

    def _refill(self, now: float) -> float:
        if now > self._at:
            self._level = min(float(self.limit), self._level + (now - self._at) * self.limit / 60)
            self._at = now
        return self._level

    def used(self, now: float) -> int:
        """What it has spent and not yet refilled."""
        return max(0, math.ceil(self.limit - self._refill(now)))

    def wait_for(self, amount: int, now: float) -> float | None:
        """None if ``amount`` fits now, else the seconds until it will. An amount over
        the whole limit never fits (at most N at once): it is told a full minute."""
        level = self._refill(now)
        if amount > self.limit:
            return 60.0
        if level >= amount:
            return None
        return (amount - level) * 60 / self.limit

    def take(self, amount: int, now: float) -> None:
        self._level = self._refill(now) - amount

    def give(self, amount: int, now: float) -> None:
        self._level = min(float(self.limit), self._refill(now) + amount)


class DayBudget:
    """A daily budget of ``limit`` tokens; the day is UTC, given as its number (days since
    the epoch), so a new day starts from nothing."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._day = -1
        self._spent = 0

    def _on(self, day: int) -> None:
        if day != self._day:
            self._day, self._spent = day, 0

    def used(self, day: int) -> int:
        self._on(day)
        return self._spent

    def wait_for(self, amount: int, day: int, seconds_into_day: float) -> float | None:
        """None if ``amount`` fits in what is left today, else the seconds until the next
        UTC day."""
        self._on(day)
        if self._spent + amount <= self.limit:
            return None
        return max(0.0, _SECONDS_PER_DAY - seconds_into_day)

    def take(self, amount: int, day: int) -> None:
        self._on(day)
        self._spent += amount

    def give(self, amount: int, day: int) -> None:
        self._on(day)
        self._spent = max(0, self._spent - amount)


class Allowance:
    """A shared limit's local share (CONTRACT.md 5.6): what this daemon leased from the
    fleet's engine and may spend without asking it. It never refills by itself: a lease
    keeper (``shared/leases.py``) tops it up from the engine and gives back what it holds
    over its reserve. ``want`` is the largest amount refused for want of room since the
    last top-up (the keeper leases at least that much, and keeps it until such a request
    takes it, or a while); ``rate`` what this daemon spends of it in a tick, lately (the
    keeper's reserve follows it); ``fleet_used`` is what the whole fleet has used, as the
    engine last said; ``retry_s`` is when the engine said there would be room. The tick
    is ``retry_s`` as first given."""

    # How much of a tick's spending counts in ``rate`` (a moving average over time).
    RATE_WEIGHT = 0.25

    def __init__(self, limit: int, retry_s: float) -> None:
        self.limit = limit
        self.level = 0.0
        self.want = 0
        self.wanted_at = 0.0  # when ``want`` was last refused
        self.fleet_used = 0.0
        self.retry_s = retry_s
        self._tick_s = retry_s
        self._spent = 0.0  # since the rate was last taken
        self._rate = 0.0
        self._rated_at: float | None = None

    def rate(self, now: float) -> float:
        """What is spent in a tick, on average lately: taken at most once a tick (rounds
        of leases out of turn do not cut it short)."""
        if self._rated_at is None:
            self._rated_at = now
        elif now - self._rated_at >= self._tick_s:
            per_tick = self._spent * self._tick_s / (now - self._rated_at)
            self._rate += (per_tick - self._rate) * self.RATE_WEIGHT
            self._spent, self._rated_at = 0.0, now
        return self._rate

    def used(self, now: float) -> int:
        return math.ceil(self.fleet_used)

    def wait_for(self, amount: int, now: float) -> float | None:
        if amount > self.limit:  # never fits, whatever is leased
            return 60.0
        if self.level >= amount:
            return None
        self.want = max(self.want, amount)
        self.wanted_at = now
        return max(self._tick_s, self.retry_s)

    def take(self, amount: int, now: float) -> None:
        self.level -= amount
        self._spent += amount
        if amount >= self.want:
            self.want = 0  # (a request as large as the one refused came back for it)

    def give(self, amount: int, now: float) -> None:
        self.level += amount
