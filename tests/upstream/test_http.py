"""One provider's upstream (``ProviderPool``) against ``httpx.MockTransport``, on trio's
fake clock.

Times are exact virtual times: every test starts at ``t0 = trio.current_time()``, and with
``jitter=lambda high: high`` the backoff is its upper bound (0.5, 1.0, 2.0, ... s). The
scripted upstream records the virtual time of each request it gets.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import gc
import inspect
import types
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import trio
import trio.lowlevel
import trio.testing

from openclawd import config
from openclawd.config import ProviderConfig
from openclawd.errors import (
    CircuitOpenError,
    NoKeyError,
    PoolBusyError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamTimeoutError,
)
from openclawd.keys.manager import Key, fingerprint
from openclawd.upstream import http as upstream_http
from openclawd.upstream.http import ProviderPool, UpstreamRequest

SECRET = "sk-test-first-0123456789abcdef0123456789"
ROTATED = "sk-test-rotated-fedcba9876543210fedcba98"
REQUEST = UpstreamRequest("POST", "/v1/chat/completions", content=b"{}")
WALL_NOW = 1_700_000_000.0

Reply = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]


def make_key(secret: str = SECRET, version: int = 1) -> Key:
    return Key(
        provider="openai",
        version=version,
        index=0,
        fingerprint=fingerprint(secret),
        fetched_at=WALL_NOW,
        secret=secret,
    )


class FakeKeys:
    """The key manager as the upstream sees it; records its calls.

    ``auth_failure`` returns ``refreshed`` (and makes it current); with ``block_refresh`` it
    never returns.
    """

    def __init__(self, key: Key | None, refreshed: Key | None = None) -> None:
        self.key = key
        self.refreshed = refreshed
        self.block_refresh = False
        self.current_calls: list[str] = []
        self.auth_failures: list[tuple[str, Key]] = []

    def current(self, provider: str) -> Key | None:
        self.current_calls.append(provider)
        return self.key

    async def auth_failure(self, provider: str, failed: Key) -> Key | None:
        await trio.lowlevel.checkpoint()
        self.auth_failures.append((provider, failed))
        if self.block_refresh:
            await trio.sleep_forever()
        if self.refreshed is not None:
            self.key = self.refreshed
        return self.refreshed


class Body(httpx.AsyncByteStream):
    """A response body: ``chunks``, then a stall (``stall_s``, or forever with ``hang``),
    then ``error`` if set. Records whether it was closed."""

    def __init__(
        self,
        *chunks: bytes,
        stall_s: float = 0.0,
        hang: bool = False,
        error: Exception | None = None,
    ) -> None:
        self.chunks = chunks
        self.stall_s = stall_s
        self.hang = hang
        self.error = error
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.stall_s:
            await trio.sleep(self.stall_s)
        if self.hang:
            await trio.sleep_forever()
        if self.error is not None:
            raise self.error

    async def aclose(self) -> None:
        self.closed = True


class Upstream:
    """A scripted upstream: one reply per request, the last one repeating."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.times.append(trio.current_time())
        self.requests.append(request)
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        response = reply(request)
        if inspect.isawaitable(response):
            response = await response
        return response

    def secrets(self, header: str = "authorization") -> list[str | None]:
        return [r.headers.get(header) for r in self.requests]


def status(code: int, content: bytes = b"", **headers: str) -> Reply:
    """A reply with ``code``; header names are given with ``_`` for ``-``."""
    fields = {name.replace("_", "-"): value for name, value in headers.items()}
    return lambda request: httpx.Response(code, headers=fields, content=content)


def streamed(body: Body, code: int = 200) -> Reply:
    return lambda request: httpx.Response(code, stream=body)


def raises(exc_type: type[httpx.TransportError], message: str) -> Reply:
    def reply(request: httpx.Request) -> httpx.Response:
        raise exc_type(message)

    return reply


def provider_config(**overrides: Any) -> ProviderConfig:
    provider = {
        "base_url": "https://up.test/openai",
        "vault_path": "openclawd/openai",
        **overrides,
    }
    parsed = config.parse(
        {
            "vault": {"addr": "https://vault.test:8200", "token_file": "/run/vault-token"},
            "providers": {"openai": provider},
        },
        environ={},
    )
    return parsed.providers["openai"]


@contextlib.asynccontextmanager
async def open_pool(
    upstream: Upstream, keys: FakeKeys | None = None, **overrides: Any
) -> AsyncIterator[ProviderPool]:
    pool = ProviderPool(
        "openai",
        provider_config(**overrides),
        keys if keys is not None else FakeKeys(make_key()),
        transport=httpx.MockTransport(upstream),
        jitter=lambda high: high,
    )
    try:
        yield pool
    finally:
        await pool.aclose()


def assert_keyless(exc: BaseException) -> None:
    """No key in the exception, its message or what it was raised from."""
    seen: BaseException | None = exc
    while seen is not None:
        for secret in (SECRET, ROTATED):
            assert secret not in str(seen)
            assert secret not in repr(seen)
        seen = seen.__cause__ or seen.__context__


async def fetch(pool: ProviderPool, request: UpstreamRequest = REQUEST) -> tuple[int, int, bytes]:
    """(status, attempts, body) of one request."""
    async with pool.open(request) as response:
        return response.status, response.attempts, await response.read(1 << 20)


async def stream_body(pool: ProviderPool, chunks: list[bytes]) -> None:
    """Open ``REQUEST`` and read its body chunk by chunk into ``chunks``."""
    async with pool.open(REQUEST) as response:
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)


# --- what goes upstream ----------------------------------------------------------------


async def test_key_goes_in_the_auth_header_with_the_scheme_and_app_headers_pass(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = Upstream(status(200, b'{"ok":true}', content_type="application/json"))
    request = UpstreamRequest(
        "POST",
        "/v1/chat/completions",
        headers=(("content-type", "application/json"), ("x-app-trace", "abc")),
        content=b'{"model":"m"}',
    )
    with trio.fail_after(10):
        async with open_pool(upstream) as pool, pool.open(request) as response:
            assert response.status == 200
            assert response.key.secret == SECRET
            assert response.header("content-type") == "application/json"
            assert ("content-type", "application/json") in response.headers
            assert await response.read(100) == b'{"ok":true}'
    [sent] = upstream.requests
    assert sent.method == "POST"
    assert str(sent.url) == "https://up.test/openai/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {SECRET}"
    assert sent.headers.get_list("authorization") == [f"Bearer {SECRET}"]
    assert sent.headers["x-app-trace"] == "abc"
    assert sent.headers["content-type"] == "application/json"
    assert sent.content == b'{"model":"m"}'


async def test_bare_key_in_a_custom_auth_header(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Upstream(status(200))
    with trio.fail_after(10):
        async with open_pool(upstream, auth_header="x-api-key", auth_scheme="") as pool:
            assert (await fetch(pool))[0] == 200
    [sent] = upstream.requests
    assert sent.headers["x-api-key"] == SECRET
    assert "authorization" not in sent.headers


async def test_url_is_base_url_plus_target_and_query(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = Upstream(status(200))
    request = UpstreamRequest("GET", "/v1/models?limit=2&after=m%201")
    with trio.fail_after(10):
        async with open_pool(upstream) as pool:
            assert (await fetch(pool, request))[0] == 200
    [sent] = upstream.requests
    assert sent.method == "GET"
    assert str(sent.url) == "https://up.test/openai/v1/models?limit=2&after=m%201"
    assert sent.content == b""


async def test_the_providers_headers_and_query_are_added_unless_the_app_sent_its_own(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = Upstream(status(200), status(200))
    plain = UpstreamRequest("GET", "/v1/models")
    own = UpstreamRequest(
        "GET",
        "/v1/models?api-version=app&x=1",
        headers=(("Anthropic-Version", "app"), ("user-agent", "app/1")),
    )
    with trio.fail_after(10):
        async with open_pool(
            upstream,
            preset="anthropic",
            base_url="https://up.test/anthropic",
            headers={"anthropic-beta": "b1", "x-dropped": ""},
            query={"api-version": "2024-10-21", "empty": ""},
        ) as pool:
            assert (await fetch(pool, plain))[0] == 200
            assert (await fetch(pool, own))[0] == 200
    first, second = upstream.requests
    assert str(first.url) == "https://up.test/anthropic/v1/models?api-version=2024-10-21"
    assert first.headers["anthropic-version"] == "2023-06-01"  # the preset's
    assert first.headers["anthropic-beta"] == "b1"
    assert first.headers["x-api-key"] == SECRET
    assert "x-dropped" not in first.headers
    assert str(second.url) == "https://up.test/anthropic/v1/models?api-version=app&x=1"
    assert second.headers.get_list("anthropic-version") == ["app"]
    assert second.headers["anthropic-beta"] == "b1"
    assert second.headers.get_list("user-agent") == ["app/1"]


# --- answers relayed without a retry ---------------------------------------------------


async def test_200_takes_one_attempt(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Upstream(status(200, b"hello"))
    with trio.fail_after(10):
        async with open_pool(upstream) as pool:
            assert await fetch(pool) == (200, 1, b"hello")
            stats = pool.statistics()
    assert stats.requests == {"200": 1}
    assert stats.retries == 0
    assert stats.circuit == "closed"


@pytest.mark.parametrize("code", [400, 404, 422])
async def test_client_errors_are_relayed_at_once(
    autojump_clock: trio.testing.MockClock, code: int
) -> None:
    body = b'{"error":{"message":"bad"}}'
    upstream = Upstream(status(code, body), status(200))
    with trio.fail_after(10):
        async with open_pool(upstream) as pool:
            assert await fetch(pool) == (code, 1, body)
            assert pool.statistics().requests == {str(code): 1}
    assert len(upstream.requests) == 1


async def test_500_is_not_retried(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Upstream(status(500, b"oops"), status(200))
    with trio.fail_after(10):
        async with open_pool(upstream) as pool:
            assert await fetch(pool) == (500, 1, b"oops")
            assert pool.statistics().retries == 0
    assert len(upstream.requests) == 1


# --- retries ---------------------------------------------------------------------------


async def test_429_waits_retry_after_seconds(autojump_clock: trio.testing.MockClock) -> None:
    t0 = trio.current_time()
    upstream = Upstream(status(429, retry_after="3"), status(200, b"ok"))
    with trio.fail_after(100):
        async with open_pool(upstream) as pool:
            assert await fetch(pool) == (200, 2, b"ok")
            stats = pool.statistics()
    assert upstream.times == [t0, t0 + 3]
    assert stats.retries == 1
    assert stats.requests == {"200": 1}


async def test_retry_after_0_retries_at_once(autojump_clock: trio.testing.MockClock) -> None:
    t0 = trio.current_time()
    upstream = Upstream(status(429, retry_after="0"), status(200))
    with trio.fail_after(100):
        async with open_pool(upstream) as pool:
            assert (await fetch(pool))[:2] == (200, 2)
    assert upstream.times == [t0, t0]


async def test_429_waits_for_an_http_date_retry_after(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream_http, "time", types.SimpleNamespace(time=lambda: WALL_NOW))
    when = datetime.datetime.fromtimestamp(WALL_NOW + 5, tz=datetime.UTC)
    t0 = trio.current_time()
    upstream = Upstream(
        status(429, retry_after=email.utils.format_datetime(when, usegmt=True)), status(200)
    )
    with trio.fail_after(100):
        async with open_pool(upstream) as pool:
            assert (await fetch(pool))[:2] == (200, 2)
    assert upstream.times == [t0, t0 + 5]


async def test_503_always_is_relayed_after_the_retries_with_doubling_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    t0 = trio.current_time()
    upstream = Upstream(status(503, b"down"))
    with trio.fail_after(100):
        async with open_pool(upstream, max_retries=2, retry_backoff_s=0.5) as pool:
            assert await fetch(pool) == (503, 3, b"down")
            stats = pool.statistics()
    assert upstream.times == [t0, t0 + 0.5, t0 + 1.5]
    assert stats.retries == 2
    assert stats.requests == {"503": 1}


async def test_backoff_is_capped_at_retry_backoff_max_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    t0 = trio.current_time()
    upstream = Upstream(status(503))
    with trio.fail_after(100):
        async with open_pool(
            upstream, max_retries=4, retry_backoff_s=1.0, retry_backoff_max_s=3.0
        ) as pool:
            assert (await fetch(pool))[:2] == (503, 5)
    assert upstream.times == [t0, t0 + 1, t0 + 3, t0 + 6, t0 + 9]


@pytest.mark.parametrize("code", [502, 504])
async def test_502_and_504_are_retried(autojump_clock: trio.testing.MockClock, code: int) -> None:
    t0 = trio.current_time()
    upstream = Upstream(status(code), status(200, b"ok"))
    with trio.fail_after(100):
        async with open_pool(upstream) as pool:
            assert await fetch(pool) == (200, 2, b"ok")
    assert upstream.times == [t0, t0 + 0.5]


async def test_no_retry_with_max_retries_0(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Upstream(status(429, retry_after="1"), status(200))
    with trio.fail_after(100):
        async with open_pool(upstream, max_retries=0) as pool:
            assert (await fetch(pool))[:2] == (429, 1)
    assert len(upstream.requests) == 1


async def test_retry_after_over_60_s_is_relayed_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    t0 = trio.current_time()
    upstream = Upstream(status(429, b"slow down", retry_after="61"), status(200))
    with trio.fail_after(100):
        async with open_pool(upstream) as pool:
            async with pool.open(REQUEST) as response:
                assert response.status == 429
                assert response.attempts == 1
                assert response.header("retry-after") == "61"
                assert await response.read(100) == b"slow down"
            assert trio.current_time() == t0
    assert len(upstream.requests) == 1


async def test_retry_after_of_60_s_is_waited_for(autojump_clock: trio.testing.MockClock) -> None:
    t0 = trio.current_time()
    upstream = Upstream(status(429, retry_after="60"), status(200))
    with trio.fail_after(100):
        async with open_pool(upstream) as pool:
            assert (await fetch(pool))[:2] == (200, 2)
    assert upstream.times == [t0, t0 + 60]


async def test_a_retry_after_past_the_total_timeout_is_not_waited_for(
    autojump_clock: trio.testing.MockClock,
) -> None:
    t0 = trio.current_time()
    upstream = Upstream(status(429, b"later", retry_after="20"), status(200))
    with trio.fail_after(100):
        async with open_pool(upstream, total_timeout_s=10) as pool:
            assert await fetch(pool) == (429, 1, b"later")
            assert trio.current_time() == t0
    assert len(upstream.requests) == 1


async def test_a_backoff_past_the_total_timeout_relays_the_last_response(
    autojump_clock: trio.testing.MockClock,
) -> None:
    t0 = trio.current_time()
    upstream = Upstream(status(503, b"down"))
    with trio.fail_after(100):
        async with open_pool(upstream, total_timeout_s=1.0, max_retries=5) as pool:
            # waits 0.5 (ends at 0.5 < 1.0), then a 1.0 wait would end at 1.5: not waited
            assert await fetch(pool) == (503, 2, b"down")
            assert trio.current_time() == t0 + 0.5
    assert upstream.times == [t0, t0 + 0.5]


async def test_connect_errors_are_retried(autojump_clock: trio.testing.MockClock) -> None:
    t0 = trio.current_time()
    upstream = Upstream(
        raises(httpx.ConnectError, "connection refused"),
        raises(httpx.ConnectError, "connection refused"),
        status(200, b"ok"),
    )
    with trio.fail_after(100):
        async with open_pool(upstream) as pool:
            assert await fetch(pool) == (200, 3, b"ok")
            stats = pool.statistics()
    assert upstream.times == [t0, t0 + 0.5, t0 + 1.5]
    assert stats.retries == 2
    assert stats.requests == {"200": 1}


async def test_connect_errors_after_the_retries_raise_upstream_unavailable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    t0 = trio.current_time()
    upstream = Upstream(raises(httpx.ConnectError, "connection refused"))
    with trio.fail_after(100):
        async with open_pool(upstream, max_retries=2) as pool:
            with pytest.raises(UpstreamConnectionError) as caught:
                await fetch(pool)
            stats = pool.statistics()
    assert isinstance(caught.value, UpstreamError)
    assert caught.value.code == "upstream_unavailable"
    assert "connection refused" in str(caught.value)
    assert_keyless(caught.value)
    assert upstream.times == [t0, t0 + 0.5, t0 + 1.5]
    assert stats.requests == {"upstream_unavailable": 1}
    assert stats.last_error == str(caught.value)


async def test_an_auth_header_from_the_app_never_reaches_the_provider(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Frames are refused with it; should one get here (a reload changed the provider's
    auth_header under an open channel), it is dropped, not sent beside the key."""
    upstream = Upstream(status(200))
    request = UpstreamRequest("POST", "/v1/x", headers=(("x-api-key", "sk-the-apps-own"),))
    with trio.fail_after(10):
        async with open_pool(upstream, auth_header="x-api-key", auth_scheme="") as pool:
            await fetch(pool, request)
    assert upstream.requests[0].headers.get_list("x-api-key") == [SECRET]


async def test_a_full_local_pool_is_not_retried_and_does_not_open_the_circuit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """All of our own max_connections busy says nothing about the provider."""
    upstream = Upstream(raises(httpx.PoolTimeout, "pool timeout"))
    with trio.fail_after(100):
        async with open_pool(upstream, max_retries=2, circuit_failure_threshold=2) as pool:
            for _ in range(5):
                with pytest.raises(PoolBusyError) as caught:
                    await fetch(pool)
            assert pool.statistics().circuit == "closed"
    assert caught.value.code == "upstream_unavailable"
    assert "max_connections" in str(caught.value)
    assert len(upstream.requests) == 5  # one attempt each


async def test_a_read_timeout_before_the_head_is_not_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = Upstream(raises(httpx.ReadTimeout, "timed out"), status(200))
    with trio.fail_after(100):
        async with open_pool(upstream) as pool:
            with pytest.raises(UpstreamTimeoutError) as caught:
                await fetch(pool)
            stats = pool.statistics()
    assert caught.value.code == "upstream_timeout"
    assert_keyless(caught.value)
    assert len(upstream.requests) == 1
    assert stats.requests == {"upstream_timeout": 1}
    assert stats.retries == 0


# --- 401/403 and keys ------------------------------------------------------------------


@pytest.mark.parametrize("code", [401, 403])
async def test_an_auth_failure_retries_once_with_the_fresh_key(
    autojump_clock: trio.testing.MockClock, code: int
) -> None:
    t0 = trio.current_time()
    old, new = make_key(SECRET, 1), make_key(ROTATED, 2)
    keys = FakeKeys(old, refreshed=new)
    upstream = Upstream(status(code), status(200, b"ok"))
    with trio.fail_after(100):
        async with open_pool(upstream, keys, max_retries=0) as pool:
            async with pool.open(REQUEST) as response:
                assert response.status == 200
                assert response.attempts == 2
                assert response.key is new
                assert await response.read(100) == b"ok"
            stats = pool.statistics()
    assert keys.auth_failures == [("openai", old)]
    assert upstream.secrets() == [f"Bearer {SECRET}", f"Bearer {ROTATED}"]
    assert upstream.times == [t0, t0]
    assert stats.requests == {"200": 1}
    assert stats.retries == 1


@pytest.mark.parametrize("same", [True, False], ids=["same-key", "no-key"])
async def test_an_auth_failure_without_a_new_key_is_relayed(
    autojump_clock: trio.testing.MockClock, same: bool
) -> None:
    old = make_key()
    keys = FakeKeys(old, refreshed=make_key() if same else None)
    upstream = Upstream(status(401, b"bad key"), status(200))
    with trio.fail_after(100):
        async with open_pool(upstream, keys) as pool:
            assert await fetch(pool) == (401, 1, b"bad key")
    assert keys.auth_failures == [("openai", old)]
    assert len(upstream.requests) == 1


async def test_a_second_auth_failure_after_the_refresh_is_relayed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    old, new = make_key(SECRET, 1), make_key(ROTATED, 2)
    keys = FakeKeys(old, refreshed=new)
    upstream = Upstream(status(401, b"still bad"))
    with trio.fail_after(100):
        async with open_pool(upstream, keys) as pool, pool.open(REQUEST) as response:
            assert (response.status, response.attempts) == (401, 2)
            assert response.key is new
            assert await response.read(100) == b"still bad"
    assert keys.auth_failures == [("openai", old)]
    assert upstream.secrets() == [f"Bearer {SECRET}", f"Bearer {ROTATED}"]


async def test_no_key_raises_no_key_without_going_upstream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = Upstream(status(200))
    with trio.fail_after(10):
        async with open_pool(upstream, FakeKeys(None)) as pool:
            with pytest.raises(NoKeyError) as caught:
                await fetch(pool)
            assert pool.statistics().requests == {"no_key": 1}
    assert caught.value.code == "no_key"
    assert upstream.requests == []


async def test_work_keeps_the_key_it_started_with(autojump_clock: trio.testing.MockClock) -> None:
    old, new = make_key(SECRET, 1), make_key(ROTATED, 2)
    keys = FakeKeys(old)

    def rotate(request: httpx.Request) -> httpx.Response:
        keys.key = new  # a rotation while the first attempt is upstream
        return httpx.Response(503)

    upstream = Upstream(rotate, status(200))
    with trio.fail_after(100):
        async with open_pool(upstream, keys) as pool:
            async with pool.open(REQUEST) as response:
                assert response.key is old
            assert (await fetch(pool))[0] == 200
    assert upstream.secrets() == [f"Bearer {SECRET}", f"Bearer {SECRET}", f"Bearer {ROTATED}"]


# --- circuit breaker -------------------------------------------------------------------


async def open_the_circuit(pool: ProviderPool, upstream: Upstream) -> None:
    """Three 503 requests (threshold 3, no retries) open the circuit."""
    for _ in range(3):
        assert (await fetch(pool))[0] == 503
    assert pool.statistics().circuit == "open"
    assert len(upstream.requests) == 3


async def test_the_circuit_opens_and_a_successful_probe_closes_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    t0 = trio.current_time()
    upstream = Upstream(status(503), status(503), status(503), status(200, b"ok"))
    with trio.fail_after(100):
        async with open_pool(
            upstream, max_retries=0, circuit_failure_threshold=3, circuit_reset_s=30
        ) as pool:
            await open_the_circuit(pool, upstream)
            with pytest.raises(CircuitOpenError) as caught:
                await fetch(pool)
            assert caught.value.code == "upstream_unavailable"
            assert "30s" in str(caught.value)
            assert_keyless(caught.value)
            assert len(upstream.requests) == 3
            await trio.sleep(29)
            with pytest.raises(CircuitOpenError):
                await fetch(pool)
            assert pool.statistics().circuit == "open"
            assert len(upstream.requests) == 3
            await trio.sleep(1)
            assert pool.statistics().circuit == "half_open"
            assert await fetch(pool) == (200, 1, b"ok")
            assert pool.statistics().circuit == "closed"
            assert (await fetch(pool))[0] == 200
            stats = pool.statistics()
    assert upstream.times == [t0, t0, t0, t0 + 30, t0 + 30]
    assert stats.requests == {"503": 3, "upstream_unavailable": 2, "200": 2}


async def test_a_failing_probe_opens_the_circuit_for_another_reset_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    t0 = trio.current_time()
    upstream = Upstream(*[status(503)] * 4, status(200))
    with trio.fail_after(200):
        async with open_pool(
            upstream, max_retries=0, circuit_failure_threshold=3, circuit_reset_s=30
        ) as pool:
            await open_the_circuit(pool, upstream)
            await trio.sleep(30)
            assert (await fetch(pool))[0] == 503  # the probe
            assert pool.statistics().circuit == "open"
            await trio.sleep(29)
            with pytest.raises(CircuitOpenError):
                await fetch(pool)
            await trio.sleep(1)
            assert (await fetch(pool))[0] == 200
            assert pool.statistics().circuit == "closed"
    assert upstream.times == [t0, t0, t0, t0 + 30, t0 + 60]


async def test_connect_errors_count_towards_the_circuit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = Upstream(raises(httpx.ConnectError, "refused"))
    with trio.fail_after(100):
        async with open_pool(
            upstream, max_retries=0, circuit_failure_threshold=2, circuit_reset_s=30
        ) as pool:
            for _ in range(2):
                with pytest.raises(UpstreamConnectionError):
                    await fetch(pool)
            with pytest.raises(CircuitOpenError):
                await fetch(pool)
    assert len(upstream.requests) == 2


async def test_a_success_resets_the_failure_count(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Upstream(status(503), status(503), status(200), status(503), status(503))
    with trio.fail_after(100):
        async with open_pool(
            upstream, max_retries=0, circuit_failure_threshold=3, circuit_reset_s=30
        ) as pool:
            codes = [(await fetch(pool))[0] for _ in range(5)]
            assert pool.statistics().circuit == "closed"
    assert codes == [503, 503, 200, 503, 503]


async def test_only_one_probe_goes_while_half_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow_ok(request: httpx.Request) -> httpx.Response:
        await trio.sleep(5)
        return httpx.Response(200)

    upstream = Upstream(status(503), status(503), status(503), slow_ok)
    with trio.fail_after(100):
        async with open_pool(
            upstream, max_retries=0, circuit_failure_threshold=3, circuit_reset_s=30
        ) as pool:
            await open_the_circuit(pool, upstream)
            await trio.sleep(30)
            results: list[int] = []

            async def probe() -> None:
                results.append((await fetch(pool))[0])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(probe)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(CircuitOpenError):
                    await fetch(pool)
            assert results == [200]
            assert pool.statistics().circuit == "closed"
    assert len(upstream.requests) == 4


async def test_a_cancelled_probe_frees_the_probe_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    upstream = Upstream(status(503), status(503), status(503), hang, status(200))
    with trio.fail_after(100):
        async with open_pool(
            upstream, max_retries=0, circuit_failure_threshold=3, circuit_reset_s=30
        ) as pool:
            await open_the_circuit(pool, upstream)
            await trio.sleep(30)
            with trio.move_on_after(1):
                await fetch(pool)
            assert (await fetch(pool))[0] == 200
            assert pool.statistics().circuit == "closed"
    assert len(upstream.requests) == 5


# --- the body --------------------------------------------------------------------------


async def test_a_drop_mid_body_raises_upstream_error_from_aiter_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    body = Body(b"data: one\n\n", error=httpx.ReadError("connection reset by peer"))
    upstream = Upstream(streamed(body))
    chunks: list[bytes] = []
    with trio.fail_after(10):
        async with open_pool(upstream) as pool:
            with pytest.raises(UpstreamError) as caught:
                await stream_body(pool, chunks)
            stats = pool.statistics()
    assert type(caught.value) is UpstreamError
    assert caught.value.code == "upstream_unavailable"
    assert "connection reset by peer" in str(caught.value)
    assert_keyless(caught.value)
    assert chunks == [b"data: one\n\n"]
    assert body.closed
    assert len(upstream.requests) == 1  # never retried after a byte arrived
    assert stats.last_error == str(caught.value)


async def read_over_the_limit(
    pool: ProviderPool,
) -> tuple[UpstreamError, list[warnings.WarningMessage]]:
    """``read(9)`` of a 10-byte body: the error, and the ResourceWarnings it left behind."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(UpstreamError) as caught:
            async with pool.open(REQUEST) as response:
                await response.read(9)
        error = caught.value
        del caught  # its traceback would keep the frames, and their generators, alive
        error.__traceback__ = error.__context__ = error.__cause__ = None
        for _ in range(3):  # collect, and let trio's finalizers run, down the chain
            gc.collect()
            await trio.testing.wait_all_tasks_blocked()
    return error, [w for w in seen if issubclass(w.category, ResourceWarning)]


async def test_read_over_the_limit_raises_upstream_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    body = Body(b"12345", b"67890")
    upstream = Upstream(streamed(body), streamed(Body(b"12345", b"67890")))
    with trio.fail_after(10):
        async with open_pool(upstream) as pool:
            error, _ = await read_over_the_limit(pool)
            async with pool.open(REQUEST) as response:
                assert await response.read(10) == b"1234567890"  # exactly at the limit
    assert type(error) is UpstreamError
    assert error.code == "upstream_unavailable"
    assert "9 bytes" in str(error)
    assert_keyless(error)
    assert body.closed


async def test_read_over_the_limit_closes_its_body_iterator(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``read`` leaves no half-read async generator for the garbage collector (trio warns
    about those, and this project turns warnings into errors)."""
    upstream = Upstream(streamed(Body(b"12345", b"67890")))
    with trio.fail_after(10):
        async with open_pool(upstream) as pool:
            _, leaked = await read_over_the_limit(pool)
    # Only ours: httpx iterates its streams (and the mock's) through generators it never
    # closes itself (see pyproject's filterwarnings).
    assert [str(w.message) for w in leaked if "'openclawd." in str(w.message)] == []


async def test_the_total_timeout_covers_the_body(
    autojump_clock: trio.testing.MockClock,
) -> None:
    t0 = trio.current_time()
    body = Body(b"first", stall_s=100)
    upstream = Upstream(streamed(body))
    chunks: list[bytes] = []
    with trio.fail_after(1000):
        async with open_pool(upstream, total_timeout_s=5) as pool:
            with pytest.raises(UpstreamTimeoutError) as caught:
                await stream_body(pool, chunks)
            assert trio.current_time() == t0 + 5
            stats = pool.statistics()
    assert caught.value.code == "upstream_timeout"
    assert "total_timeout_s" in str(caught.value)
    assert_keyless(caught.value)
    assert chunks == [b"first"]
    assert body.closed
    assert stats.last_error == str(caught.value)


async def test_the_total_timeout_covers_waiting_for_the_head(
    autojump_clock: trio.testing.MockClock,
) -> None:
    t0 = trio.current_time()

    async def slow(request: httpx.Request) -> httpx.Response:
        await trio.sleep(100)
        return httpx.Response(200)

    upstream = Upstream(slow)
    with trio.fail_after(1000):
        async with open_pool(upstream, total_timeout_s=5) as pool:
            with pytest.raises(UpstreamTimeoutError) as caught:
                await fetch(pool)
            assert trio.current_time() == t0 + 5
    assert_keyless(caught.value)
    assert len(upstream.requests) == 1


# --- cancellation ----------------------------------------------------------------------


async def test_cancelling_while_the_body_is_read_closes_the_response(
    autojump_clock: trio.testing.MockClock,
) -> None:
    t0 = trio.current_time()
    body = Body(b"first", hang=True)
    upstream = Upstream(streamed(body))
    chunks: list[bytes] = []
    with trio.fail_after(100):
        async with open_pool(upstream) as pool:
            with trio.move_on_after(3) as scope:
                await stream_body(pool, chunks)
            assert scope.cancelled_caught
            assert trio.current_time() == t0 + 3
            assert body.closed
            # Cancelled mid-body (the app cancelled or left): counted as cancelled.
            assert pool.statistics().requests == {"cancelled": 1}
    assert chunks == [b"first"]


async def test_cancelling_during_a_retry_wait_sends_nothing_more(
    autojump_clock: trio.testing.MockClock,
) -> None:
    body = Body(b"busy")
    upstream = Upstream(streamed(body, 503), status(200))
    with trio.fail_after(100):
        async with open_pool(upstream) as pool:
            with trio.move_on_after(0.25):
                await fetch(pool)
            await trio.sleep(10)
            assert pool.statistics().requests == {"cancelled": 1}
    assert body.closed
    assert len(upstream.requests) == 1


async def test_cancelling_during_the_key_refresh_closes_the_401_response(
    autojump_clock: trio.testing.MockClock,
) -> None:
    keys = FakeKeys(make_key(), refreshed=make_key(ROTATED, 2))
    keys.block_refresh = True
    body = Body(b'{"error":"invalid key"}')
    upstream = Upstream(streamed(body, 401))
    with trio.fail_after(100):
        async with open_pool(upstream, keys) as pool:
            with trio.move_on_after(1) as scope:
                await fetch(pool)
            assert scope.cancelled_caught
    assert len(keys.auth_failures) == 1
    # "Cancellation: safe at any point; the upstream response is closed."
    assert body.closed


# --- statistics ------------------------------------------------------------------------


async def test_statistics_count_final_statuses(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Upstream(
        status(200),
        status(503),
        status(503),
        status(503),
        raises(httpx.ConnectError, "refused"),
        raises(httpx.ConnectError, "refused"),
        raises(httpx.ConnectError, "refused"),
        status(200),
    )
    with trio.fail_after(100):
        async with open_pool(upstream, max_retries=2, circuit_failure_threshold=100) as pool:
            assert (await fetch(pool))[:2] == (200, 1)
            assert (await fetch(pool))[:2] == (503, 3)
            with pytest.raises(UpstreamConnectionError):
                await fetch(pool)
            assert (await fetch(pool))[:2] == (200, 1)
            stats = pool.statistics()
    assert stats.requests == {"200": 2, "503": 1, "upstream_unavailable": 1}
    assert stats.retries == 4
    assert stats.last_error is not None
    assert "refused" in stats.last_error
    assert SECRET not in stats.last_error


@pytest.mark.parametrize(
    ("headers", "requests", "tokens"),
    [
        (
            {"x-ratelimit-remaining-requests": "499", "x-ratelimit-remaining-tokens": "149000"},
            499,
            149000,
        ),
        (
            {
                "anthropic-ratelimit-requests-remaining": "49",
                "anthropic-ratelimit-tokens-remaining": "39000",
            },
            49,
            39000,
        ),
    ],
    ids=["openai", "anthropic"],
)
async def test_statistics_read_the_rate_limit_headers(
    autojump_clock: trio.testing.MockClock,
    headers: dict[str, str],
    requests: int,
    tokens: int,
) -> None:
    upstream = Upstream(lambda request: httpx.Response(200, headers=headers))
    with trio.fail_after(10):
        async with open_pool(upstream) as pool:
            before = pool.statistics()
            await fetch(pool)
            after = pool.statistics()
    assert (before.remaining_requests, before.remaining_tokens) == (None, None)
    assert (after.remaining_requests, after.remaining_tokens) == (requests, tokens)


async def test_rate_limit_headers_are_read_from_retried_responses_and_junk_ignored(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = Upstream(
        status(429, retry_after="1", x_ratelimit_remaining_requests="0"),
        status(200, x_ratelimit_remaining_requests="lots", x_ratelimit_remaining_tokens="7"),
    )
    with trio.fail_after(10):
        async with open_pool(upstream) as pool:
            await fetch(pool)
            stats = pool.statistics()
    assert (stats.remaining_requests, stats.remaining_tokens) == (0, 7)


# --- figures ------------------------------------------------------------------------------


async def test_latency_to_the_head_is_bucketed_with_inclusive_bounds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def after(delay: float) -> httpx.Response:
        await trio.sleep(delay)
        return httpx.Response(200, content=b"ok")

    upstream = Upstream(lambda _: after(0.05), lambda _: after(0.051), lambda _: after(61.0))
    async with open_pool(upstream) as pool:
        for _ in range(3):
            assert (await fetch(pool))[0] == 200
        latency = pool.statistics().latency
    assert latency.buckets == upstream_http.LATENCY_BUCKETS_S
    at = latency.buckets.index
    expected = [0] * (len(latency.buckets) + 1)
    expected[at(0.05)] = 1  # exactly on a bound: within it (Prometheus' le)
    expected[at(0.1)] = 1
    expected[-1] = 1  # past every bound: +Inf only
    assert list(latency.counts) == expected
    assert latency.sum_s == pytest.approx(0.05 + 0.051 + 61.0)


async def test_a_pool_rebuilt_by_a_reload_keeps_its_providers_figures(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def parse(base_url: str) -> config.Config:
        return config.parse(
            {
                "vault": {"addr": "https://vault.test:8200", "token_file": "/run/vault-token"},
                "providers": {"openai": {"base_url": base_url, "vault_path": "openclawd/openai"}},
            },
            environ={},
        )

    transport = httpx.MockTransport(Upstream(status(200, b"ok")))
    upstreams = upstream_http.Upstreams(
        parse("https://up.test/a"), FakeKeys(make_key()), transport=transport
    )
    before = upstreams["openai"]
    assert (await fetch(before))[0] == 200
    removed = upstreams.reload(parse("https://up.test/b"))
    assert removed == [before]
    assert upstreams["openai"] is not before
    assert upstreams.statistics()["openai"].requests == {"200": 1}
    assert (await fetch(upstreams["openai"]))[0] == 200
    assert upstreams.statistics()["openai"].requests == {"200": 2}
    assert upstreams.statistics()["openai"].latency.counts[0] == 2
    await upstreams.aclose()
