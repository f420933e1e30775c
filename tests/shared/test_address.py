"""``[shared] url`` parsed (openclawd/shared/address.py): pure, no engine."""

from __future__ import annotations

import pytest

from openclawd.shared.address import EngineAddress, parse_url


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("valkey://127.0.0.1:6380", EngineAddress("127.0.0.1", 6380, tls=False)),
        ("redis://cache.internal", EngineAddress("cache.internal", 6379, tls=False)),
        ("rediss://cache.internal:6390/", EngineAddress("cache.internal", 6390, tls=True)),
        ("valkeys://[::1]:7000", EngineAddress("::1", 7000, tls=True)),
        ("VALKEY://Cache:1", EngineAddress("cache", 1, tls=False)),
    ],
)
def test_a_url_names_one_node(url: str, address: EngineAddress) -> None:
    assert parse_url(url) == address


def test_an_address_prints_as_host_and_port() -> None:
    assert str(parse_url("valkey://[::1]:7000")) == "[::1]:7000"
    assert str(parse_url("redis://h")) == "h:6379"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://h:1", "scheme"),
        ("h:6379", "scheme"),
        ("valkey://user:Secr3t@h:1", "credentials"),
        ("redis://:Secr3t@h:1", "credentials"),
        ("redis://Secr3t@h:1", "credentials"),
        ("redis://h:1/0", "HOST:PORT only"),
        ("redis://h:1?password=Secr3t", "HOST:PORT only"),
        ("redis://h:99999", "port"),
        ("redis://h:Secr3t", "port"),
        ("redis://h:0", "port"),
        ("redis://:1", "no host"),
    ],
)
def test_anything_else_is_refused_without_repeating_the_url(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as caught:
        parse_url(url)
    assert "Secr3t" not in str(caught.value)
    assert url not in str(caught.value)
