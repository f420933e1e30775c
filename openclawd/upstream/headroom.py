"""What a provider said is left of its rate limits, and when they reset (CONTRACT.md 5.2).

Sans-IO: the pool hands each response's headers to ``Headroom.observe`` with the time
(trio's clock, and the wall clock for an absolute reset time); ``wait`` says how long a
new request must wait before it is not sent into a known 429. Read: OpenAI's
``x-ratelimit-remaining-{requests,tokens}`` and ``x-ratelimit-reset-{requests,tokens}``
(a duration: ``1s``, ``6m0s``, ``20ms``), and Anthropic's
``anthropic-ratelimit-{requests,tokens}-{remaining,reset}`` (an RFC 3339 time).
"""

from __future__ import annotations

import contextlib
import datetime
import re
from collections.abc import Callable

__all__ = ["Headroom", "parse_duration"]

_KINDS = ("requests", "tokens")
_DURATION = re.compile(
    r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?"
)


def parse_duration(text: str) -> float | None:
    """``1h2m3.5s``, ``6m0s``, ``20ms``, ``1s`` (OpenAI's reset headers) in seconds; a bare
    number is seconds; None if unreadable."""
    text = text.strip()
    with contextlib.suppress(ValueError):
        return max(0.0, float(text))
    match = _DURATION.fullmatch(text)
    if match is None or not any(match.groups()):
        return None
    hours, minutes, seconds, millis = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds + millis / 1000


def _parse_time(text: str) -> float | None:
    """An RFC 3339 time as seconds since the epoch; None if unreadable."""
    try:
        when = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return when.timestamp()


class Headroom:
    """A provider's remaining requests and tokens as its last response told, and when
    each resets (trio time)."""

    def __init__(self) -> None:
        self.remaining: dict[str, int | None] = dict.fromkeys(_KINDS)
        self.reset_at: dict[str, float | None] = dict.fromkeys(_KINDS)

    def observe(self, header: Callable[[str], str | None], now: float, wall: float) -> None:
        """Take what a response's headers (``header(name)``, lower-case names) say."""
        for kind in _KINDS:
            remaining = header(f"x-ratelimit-remaining-{kind}") or header(
                f"anthropic-ratelimit-{kind}-remaining"
            )
            if remaining is not None:
                with contextlib.suppress(ValueError):
                    self.remaining[kind] = int(remaining)
            reset = self._reset(header, kind, now, wall)
            if reset is not None:
                self.reset_at[kind] = reset

    @staticmethod
    def _reset(
        header: Callable[[str], str | None], kind: str, now: float, wall: float
    ) -> float | None:
        relative = header(f"x-ratelimit-reset-{kind}")
        if relative is not None:
            seconds = parse_duration(relative)
            return None if seconds is None else now + seconds
        absolute = header(f"anthropic-ratelimit-{kind}-reset")
        if absolute is not None:
            when = _parse_time(absolute)
            return None if when is None else now + max(0.0, when - wall)
        return None

    def wait(self, now: float) -> float:
        """Seconds until a new request is not sent into a known 429: 0 while there is
        headroom (or nothing is known), else until the exhausted limit resets."""
        waits = [
            reset - now
            for kind in _KINDS
            if self.remaining[kind] == 0 and (reset := self.reset_at[kind]) is not None
        ]
        return max([0.0, *waits])

    def reset_s(self, now: float) -> float | None:
        """Seconds until the later of the known resets (None: none known, or past)."""
        future = [r - now for r in self.reset_at.values() if r is not None and r > now]
        return round(max(future), 3) if future else None
