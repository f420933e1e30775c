"""``Retry-After`` parsing: delta-seconds or an HTTP date, relative to ``now``."""

from __future__ import annotations

import email.utils

import pytest

from openclawd.upstream.attempts import parse_retry_after

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def http_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)


@pytest.mark.parametrize("value", [None, "", "   "])
def test_absent(value: str | None) -> None:
    assert parse_retry_after(value, now=NOW) is None


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("5", 5.0), ("0", 0.0), ("1.5", 1.5), (" 7 ", 7.0), ("120", 120.0), ("-3", 0.0)],
)
def test_delta_seconds(value: str, seconds: float) -> None:
    result = parse_retry_after(value, now=NOW)
    assert result == seconds
    assert isinstance(result, float)


@pytest.mark.parametrize(
    "value", ["abc", "5s", "1,5", "inf", "-inf", "nan", "NaN", "1e999", "Infinity"]
)
def test_unreadable_or_not_finite(value: str) -> None:
    assert parse_retry_after(value, now=NOW) is None


def test_http_date_in_the_future() -> None:
    assert parse_retry_after(http_date(NOW + 10), now=NOW) == pytest.approx(10)


def test_http_date_fixed_text() -> None:
    assert parse_retry_after("Tue, 14 Nov 2023 22:14:20 GMT", now=NOW) == pytest.approx(60)


def test_http_date_with_numeric_offset() -> None:
    assert parse_retry_after("Tue, 14 Nov 2023 23:13:50 +0100", now=NOW) == pytest.approx(30)


@pytest.mark.parametrize("ago", [1, 3600, 10 * 365 * 86400])
def test_http_date_in_the_past(ago: float) -> None:
    assert parse_retry_after(http_date(NOW - ago), now=NOW) == 0.0


@pytest.mark.parametrize(
    "value",
    [
        "Tue, 14 Nov 2023 22:14:20",  # no timezone: ambiguous
        "Tue, 14 Nov 2023 22:14:20 -0000",  # RFC 5322's "unknown zone"
        "Tue, 99 Nov 2023 22:14:20 GMT",
        "Tue, 14 Foo 2023 22:14:20 GMT",
        "2023-11-14T22:14:20Z",
        "tomorrow",
    ],
    ids=["no-tz", "minus-zero", "bad-day", "bad-month", "iso", "word"],
)
def test_unreadable_dates(value: str) -> None:
    assert parse_retry_after(value, now=NOW) is None
