"""The upstream's rate-limit headroom (upstream/headroom.py, CONTRACT.md 5.2): read from
OpenAI's and Anthropic's headers; a provider whose limit the upstream said is spent is not
sent a new request before the reset (virtual time)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from openclawd.errors import RateLimitedError
from openclawd.upstream.headroom import Headroom, parse_duration

from .test_http import Upstream, fetch, open_pool, status


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("2.5", 2.5),
     ("6m", 360.0), ("soon", None), ("", None)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


def headers(**values: str) -> dict[str, str]:
    return {name.replace("_", "-"): value for name, value in values.items()}


def test_openai_headers_spent_requests_wait_for_the_reset() -> None:
    room = Headroom()
    given = headers(
        x_ratelimit_remaining_requests="0",
        x_ratelimit_reset_requests="1.5s",
        x_ratelimit_remaining_tokens="900",
        x_ratelimit_reset_tokens="20ms",
    )
    room.observe(given.get, now=10.0, wall=1_000_000.0)
    assert room.remaining == {"requests": 0, "tokens": 900}
    assert room.wait(10.0) == pytest.approx(1.5)
    assert room.wait(11.0) == pytest.approx(0.5)
    assert room.wait(11.5) == 0.0
    assert room.reset_s(10.0) == 1.5


def test_anthropic_headers_reset_at_a_time() -> None:
    room = Headroom()
    given = headers(anthropic_ratelimit_tokens_remaining="0",
                    anthropic_ratelimit_tokens_reset="2026-12-07T00:00:30Z")  # fmt: skip
    wall = 1_796_601_600.0  # 2026-12-07T00:00:00Z
    room.observe(given.get, now=5.0, wall=wall)
    assert room.wait(5.0) == pytest.approx(30.0)


def test_headroom_left_or_unknown_waits_for_nothing() -> None:
    room = Headroom()
    assert room.wait(0.0) == 0.0
    room.observe(headers(x_ratelimit_remaining_requests="3", x_ratelimit_reset_requests="9s").get,
                 now=0.0, wall=0.0)  # fmt: skip
    assert room.wait(0.0) == 0.0
    room.observe(headers(x_ratelimit_remaining_requests="junk").get, now=0.0, wall=0.0)
    assert room.remaining["requests"] == 3


async def test_a_spent_provider_is_sent_its_next_request_after_the_reset(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = Upstream(
        status(200, x_ratelimit_remaining_requests="0", x_ratelimit_reset_requests="2s"),
        status(200, x_ratelimit_remaining_requests="10"),
    )
    with trio.fail_after(60):
        async with open_pool(upstream) as pool:
            await fetch(pool)
            await fetch(pool)
    first, second = upstream.times
    assert second - first == pytest.approx(2.0)  # virtual: waited the reset, not a 429


async def test_a_reset_past_the_requests_deadline_is_rate_limited_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = Upstream(
        status(200, x_ratelimit_remaining_requests="0", x_ratelimit_reset_requests="10m0s")
    )
    with trio.fail_after(60):
        async with open_pool(upstream, total_timeout_s=30.0) as pool:
            await fetch(pool)
            started = trio.current_time()
            with pytest.raises(RateLimitedError) as caught:
                await fetch(pool)
            assert trio.current_time() == started
    assert caught.value.retry_after_s == pytest.approx(600.0)
    assert "provider openai" in str(caught.value)
    assert len(upstream.requests) == 1


def test_a_word_travels_in_relative_time_and_the_later_one_wins() -> None:
    """What one daemon's upstream said reaches another whose clock differs (CONTRACT.md
    5.6): the word carries ages and seconds-to-reset, never times; only a later word is
    taken."""
    seen = Headroom()
    assert seen.word(5.0) is None  # nothing said yet: nothing to pass on
    seen.observe(
        headers(x_ratelimit_remaining_requests="0", x_ratelimit_reset_requests="30s").get,
        now=100.0,
        wall=1_000_000.0,
    )
    word = seen.word(102.0)
    assert word is not None
    assert word.age_s == pytest.approx(2.0)
    assert word.remaining == {"requests": 0, "tokens": None}
    assert word.reset_in_s == {"requests": pytest.approx(28.0), "tokens": None}

    other = Headroom()  # another host: its clock reads 7,000 when the word arrives
    assert other.adopt(word, now=7000.0)
    assert other.wait(7000.0) == pytest.approx(28.0)
    assert other.said_at == pytest.approx(6998.0)

    stale = Headroom()
    stale.observe(headers(x_ratelimit_remaining_requests="50").get, now=6999.0, wall=0.0)
    assert not stale.adopt(word, now=7000.0)  # said at 6998, before this one's own word
    assert stale.remaining["requests"] == 50
    fresh = Headroom()
    fresh.observe(headers(x_ratelimit_remaining_requests="50").get, now=6997.0, wall=0.0)
    assert fresh.adopt(word, now=7000.0)
    assert fresh.remaining["requests"] == 0
