"""What a provider said is left of its rate limits, and when they reset (CONTRACT.md 5.2).

Sans-IO: the pool hands each response's headers to ``Headroom.observe`` with the time
(trio's clock, and the wall clock for an absolute reset time); ``wait`` says how long a
new request must wait before it is not sent into a known 429. Read: OpenAI's
``x-ratelimit-remaining-{requests,tokens}`` and ``x-ratelimit-reset-{requests,tokens}``
(a duration: ``1s``, ``6m0s``, ``20ms``), and Anthropic's
``anthropic-ratelimit-{requests,tokens}-{remaining,reset}`` (an RFC 3339 time).

In a fleet ([shared], CONTRACT.md 5.6) the lease keeper passes each daemon's latest word on
to the engine and brings the fleet's back (``word`` / ``adopt``): one daemon's 429-to-be
holds every daemon back until the reset.
"""

from __future__ import annotations

import contextlib
import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Headroom", "Word", "parse_duration"]

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


@dataclass(frozen=True, slots=True)
class Word:
    """What an upstream last said of its limits, in relative time, so that it can travel
    between hosts whose clocks differ: said ``age_s`` ago; ``remaining`` and seconds until
    each reset (``reset_in_s``, from now) by kind (requests, tokens), None if unknown."""

    age_s: float
    remaining: dict[str, int | None]
    reset_in_s: dict[str, float | None]


class Headroom:
    """A provider's remaining requests and tokens as its last response told, and when
    each resets (trio time)."""

    def __init__(self) -> None:
        self.remaining: dict[str, int | None] = dict.fromkeys(_KINDS)
        self.reset_at: dict[str, float | None] = dict.fromkeys(_KINDS)
        self.said_at: float | None = None  # when a response last said anything of these

    def observe(self, header: Callable[[str], str | None], now: float, wall: float) -> None:
        """Take what a response's headers (``header(name)``, lower-case names) say."""
        for kind in _KINDS:
            remaining = header(f"x-ratelimit-remaining-{kind}") or header(
                f"anthropic-ratelimit-{kind}-remaining"
            )
            if remaining is not None:
                with contextlib.suppress(ValueError):
                    self.remaining[kind] = int(remaining)
                    self.said_at = now
            reset = self._reset(header, kind, now, wall)
            if reset is not None:
                self.reset_at[kind] = reset
                self.said_at = now

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

    def word(self, now: float) -> Word | None:
        """What this headroom knows, to pass on; None if nothing was ever said."""
        if self.said_at is None:
            return None
        reset_in = {k: None if r is None else r - now for k, r in self.reset_at.items()}
        return Word(now - self.said_at, dict(self.remaining), reset_in)

    def adopt(self, word: Word, now: float) -> bool:
        """Take ``word`` (the fleet's) if it was said later than what this one knows;
        returns whether it was taken."""
        said_at = now - word.age_s
        if self.said_at is not None and said_at <= self.said_at:
            return False
        self.said_at = said_at
        self.remaining = {kind: word.remaining.get(kind) for kind in _KINDS}
        self.reset_at = {
            kind: None if (r := word.reset_in_s.get(kind)) is None else now + r for kind in _KINDS
        }
        return True
