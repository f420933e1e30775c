"""The close-code and error-code table against CONTRACT.md 3.1 and 3.2."""

from __future__ import annotations

import pytest

from openclawd.protocol.closecodes import ERROR_CODES, MAX_REASON_BYTES, CloseCode, close_reason


@pytest.mark.parametrize(
    ("code", "value"),
    [
        (CloseCode.NORMAL, 1000),
        (CloseCode.DRAIN_DEADLINE, 1001),
        (CloseCode.POLICY, 1008),
        (CloseCode.TOO_BIG, 1009),
        (CloseCode.INTERNAL, 1011),
        (CloseCode.SHUTDOWN, 1012),
        (CloseCode.TRY_AGAIN, 1013),
        (CloseCode.BAD_GATEWAY, 1014),
    ],
)
def test_close_code_values(code: CloseCode, value: int) -> None:
    assert code == value
    assert int(code) == value


def test_close_codes_are_exactly_the_contract_table() -> None:
    assert sorted(int(c) for c in CloseCode) == [1000, 1001, 1008, 1009, 1011, 1012, 1013, 1014]


def test_error_codes_are_exactly_the_contract_list() -> None:
    assert {
        "bad_request",
        "unknown_provider",
        "too_many_inflight",
        "rate_limited",
        "no_key",
        "upstream_unavailable",
        "upstream_timeout",
        "cancelled",
        "draining",
        "internal",
        "forbidden",  # 5.1: a provider, route or model outside the client's lists
        "budget_exhausted",  # 5.5: tokens_per_day spent
    } == ERROR_CODES


def test_max_reason_bytes() -> None:
    assert MAX_REASON_BYTES == 123


@pytest.mark.parametrize(
    "text", ["", "upstream 401", "a" * 123, "é" * 61, "upstream unreachable: connect refused"]
)
def test_short_reason_kept(text: str) -> None:
    assert close_reason(text) == text


@pytest.mark.parametrize("length", [124, 200, 10_000])
def test_long_ascii_reason_cut_to_123_bytes(length: int) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(length))
    reason = close_reason(text)
    assert len(reason.encode()) == 123
    assert reason == text[:123]


@pytest.mark.parametrize(
    ("char", "max_chars"),
    [("é", 61), ("€", 41), ("😀", 30), ("日", 41)],
    ids=["2-byte", "3-byte-euro", "4-byte", "3-byte-cjk"],
)
def test_long_reason_never_split_mid_character(char: str, max_chars: int) -> None:
    reason = close_reason(char * 100)
    data = reason.encode("utf-8")
    assert len(data) <= 123
    assert data.decode("utf-8") == reason
    assert reason == char * max_chars


def test_mixed_reason_cut_at_a_character_boundary() -> None:
    text = "x" * 122 + "é" + "tail"  # the é straddles byte 123
    assert close_reason(text) == "x" * 122
