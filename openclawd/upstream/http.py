"""Upstream HTTP: one connection pool per provider, retries, the circuit breaker.

Requests are httpx's, sent on a transport (``upstream/transport.py``, our pool; tests
give ``httpx.MockTransport``) without ``httpx.AsyncClient`` around it. This is the one
place that translates httpx's exceptions into ours (``UpstreamError``,
``UpstreamTimeoutError``). Owns, per provider: the pool (HTTP/1.1, keep-alive), the
connect / read-gap / total timeouts, the key in the provider's auth header, retries before
the first byte is relayed (429, 502, 503, 504, connection failures; ``Retry-After`` or
backoff with full jitter), one retry with a fresh key after 401/403, the circuit breaker,
and the figures the status and metrics show (rate-limit headers, token usage). It never
sees an app: callers get an ``UpstreamResponse`` and relay it their own way.
"""

from __future__ import annotations

import bisect
import contextlib
import email.utils
import math
import random
import ssl
import time
from collections import Counter
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import httpx
import trio

from openclawd import logs
from openclawd.config import Config, ProviderConfig
from openclawd.errors import (
    CircuitOpenError,
    NoKeyError,
    OpenclawdError,
    PoolBusyError,
    UnknownProviderError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)
from openclawd.keys.manager import Key
from openclawd.protocol.sse import Event, SSEDecoder
from openclawd.protocol.usage import UsageReader, body_kind, merge_usage, token_counts, usage_of
from openclawd.upstream.circuit import CircuitBreaker, CircuitState, Ticket
from openclawd.upstream.transport import PoolTransport

log = logs.get(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})
AUTH_STATUSES = frozenset({401, 403})
# Retry-After beyond this is not waited for: the response is relayed and the app decides.
_MAX_RETRY_AFTER_S = 60.0
# How long closing an abandoned response may take (it runs shielded from cancellation).
_CLOSE_TIMEOUT_S = 2.0
# What httpx.AsyncClient would have added to every request, unless the app sent its own.
_DEFAULT_HEADERS = (
    ("accept", "*/*"),
    ("accept-encoding", "gzip, deflate"),
    ("user-agent", f"python-httpx/{httpx.__version__}"),
)
_RATELIMIT_HEADERS = {
    "remaining_requests": (
        "x-ratelimit-remaining-requests",
        "anthropic-ratelimit-requests-remaining",
    ),
    "remaining_tokens": ("x-ratelimit-remaining-tokens", "anthropic-ratelimit-tokens-remaining"),
}
# Upper bounds of the upstream latency histogram's buckets: from a fast local model to a
# provider thinking for minutes before its first byte.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class KeySource(Protocol):
    """What the upstream needs of the key manager."""

    def current(self, provider: str) -> Key | None: ...
    async def auth_failure(self, provider: str, failed: Key) -> Key | None: ...


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """What to send: ``target`` is the path (and query) under the provider's ``base_url``.
    ``headers`` come from the app, already cleared of credential and hop-by-hop headers."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()
    content: bytes | AsyncIterable[bytes] | None = None

    @property
    def replayable(self) -> bool:
        """Can it be sent again? A streamed body is read once: never retried."""
        return self.content is None or isinstance(self.content, bytes)


@dataclass(frozen=True, slots=True)
class LatencySnapshot:
    """The upstream latency histogram: ``counts[i]`` requests took at most
    ``buckets[i]`` seconds and more than the bound before it; ``counts[-1]`` took longer
    than every bound. Not cumulative."""

    buckets: tuple[float, ...]
    counts: tuple[int, ...]
    sum_s: float


@dataclass(frozen=True, slots=True)
class UpstreamStatistics:
    """A frozen snapshot of one provider's upstream, for status and metrics."""

    circuit: str
    last_error: str | None
    remaining_requests: int | None
    remaining_tokens: int | None
    # Final status ("200", "429", ...) or, with no response, the error code ("no_key",
    # "upstream_unavailable", "upstream_timeout", "cancelled", ...) -> requests.
    requests: Mapping[str, int]
    retries: int
    tokens: Mapping[str, int]  # "prompt" / "completion" -> count
    latency: LatencySnapshot  # from sending to the response head, retries included


@dataclass(slots=True)
class _Figures:
    """What a provider's pool counts; handed on to the pool that replaces it on reload,
    so the counters of a provider never go back."""

    requests: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    tokens: Counter[str] = field(default_factory=Counter)
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    latency_sum_s: float = 0.0

    def observe_latency(self, seconds: float) -> None:
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.latency_sum_s += seconds


class UpstreamResponse:
    """An upstream response whose head has arrived; its body is read once, by one of
    ``aiter_raw``, ``events`` or ``read``.

    The response observes itself for its pool: a failure while its body is read (a drop,
    a stall, malformed SSE) counts against the provider's circuit and is its last error,
    and the token usage the body reports is counted once it is known (``usage``). The
    caller only relays."""

    def __init__(
        self, response: httpx.Response, key: Key, attempts: int, pool: ProviderPool
    ) -> None:
        self._response = response
        self._pool = pool
        self.status = response.status_code
        self.reason = response.reason_phrase
        self.headers: list[tuple[str, str]] = [
            (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in response.headers.raw
        ]
        self.key = key
        self.attempts = attempts
        self.usage: Any = None  # the body's token usage, once read (None: none reported)
        self._counted = False

    def header(self, name: str) -> str | None:
        value: str | None = self._response.headers.get(name)
        return value

    @property
    def is_event_stream(self) -> bool:
        return (self.header("content-type") or "").lower().startswith("text/event-stream")

    async def aiter_raw(self) -> AsyncGenerator[bytes, None]:
        """The body exactly as sent (content-encoding kept), as it arrives. The usage is
        read on the side; a JSON body's is counted as soon as its last byte is here,
        before the caller relays it.

        Raises:
            UpstreamTimeoutError: no byte came for ``read_timeout_s``.
            UpstreamError: the connection dropped or the body is malformed.
        """
        length = self.header("content-length")
        reader = UsageReader(
            body_kind(self.header("content-type"), self.header("content-encoding")),
            int(length) if length and length.isdigit() else None,
        )
        async with contextlib.aclosing(self._chunks(raw=True)) as chunks:
            async for chunk in chunks:
                reader.feed(chunk)
                if reader.done:
                    self._count(reader.usage)
                yield chunk
        reader.close()
        self._count(reader.usage)

    def aiter_bytes(self) -> AsyncGenerator[bytes, None]:
        """The body, content-decoded, as it arrives (no usage is read from it).

        Raises: as ``aiter_raw``.
        """
        return self._chunks(raw=False)

    async def events(self, max_event_bytes: int) -> AsyncGenerator[Event, None]:
        """The body's SSE events (content-decoded), as they arrive; the usage they report
        is merged and counted at the end.

        Raises:
            UpstreamProtocolError: malformed SSE, or an event over ``max_event_bytes``.
            UpstreamTimeoutError, UpstreamError: as ``aiter_raw``.
        """
        decoder = SSEDecoder(max_event_bytes=max_event_bytes)
        try:
            async with contextlib.aclosing(self._chunks(raw=False)) as chunks:
                async for chunk in chunks:
                    for event in decoder.feed(chunk):
                        self.usage = merge_usage(self.usage, usage_of(event.data))
                        yield event
            for event in decoder.close():
                self.usage = merge_usage(self.usage, usage_of(event.data))
                yield event
        except UpstreamProtocolError as exc:
            self._pool._body_failed(exc)
            raise
        self._count(self.usage)

    async def read(self, limit: int) -> bytes:
        """The whole body (content-decoded), at most ``limit`` bytes; a JSON body's usage
        is counted.

        Raises:
            UpstreamError: the body is larger than ``limit``, or reading it failed.
        """
        parts: list[bytes] = []
        size = 0
        async with contextlib.aclosing(self._chunks(raw=False)) as chunks:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    exc = UpstreamError(f"upstream response body larger than {limit} bytes")
                    self._pool._body_failed(exc)
                    raise exc
                parts.append(chunk)
        body = b"".join(parts)
        reader = UsageReader(body_kind(self.header("content-type"), None))
        reader.feed(body)
        reader.close()
        self._count(reader.usage)
        return body

    async def _chunks(self, *, raw: bool) -> AsyncGenerator[bytes, None]:
        """The body's bytes, httpx's errors translated; a failure is the provider's."""
        try:
            with _translated("reading the body", before_response=False):
                stream = self._response.aiter_raw() if raw else self._response.aiter_bytes()
                body = cast(AsyncGenerator[bytes, None], stream)
                async with contextlib.aclosing(body) as chunks:
                    async for chunk in chunks:
                        yield chunk
        except UpstreamError as exc:
            self._pool._body_failed(exc)
            raise

    def _count(self, usage: Any) -> None:
        if not self._counted and usage is not None:
            self._counted = True
            self.usage = usage
            self._pool._count_tokens(usage)


class ProviderPool:
    """The upstream of one provider: its client, breaker and figures."""

    def __init__(
        self,
        name: str,
        config: ProviderConfig,
        keys: KeySource,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        jitter: Callable[[float], float] | None = None,
        figures: _Figures | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.keys = keys
        self._jitter = jitter or (lambda high: random.uniform(0.0, high))
        self.breaker = CircuitBreaker(config.circuit_failure_threshold, config.circuit_reset_s)
        # Our own pool (upstream/transport.py), without httpx.AsyncClient around it: the
        # client's layers (auth, redirects, cookies, event hooks, URL merging) cost more
        # than a pool on every request (bench/, docs/performance.md), and its cookie jar
        # would carry one app's upstream cookies into another app's requests.
        self._transport = transport or PoolTransport(
            max_connections=config.max_connections,
            # The system's CA store, verified; never the environment's proxies or netrc.
            ssl_context=ssl.create_default_context(),
        )
        self._base = _UrlBase(config.base_url)
        self._timeout = _timeouts(config)
        self._last_error: str | None = None
        self._ratelimit: dict[str, int | None] = dict.fromkeys(_RATELIMIT_HEADERS)
        self.figures = figures or _Figures()
        self._active = 0
        self._idle = trio.Event()
        self._idle.set()

    def configure(self, config: ProviderConfig) -> None:
        """Take a reloaded config: timeouts, retries, the breaker and the pool's size
        follow at once (``Upstreams.reload`` builds a new pool when ``base_url`` changes)."""
        self.config = config
        self.breaker.failure_threshold = config.circuit_failure_threshold
        self.breaker.reset_s = config.circuit_reset_s
        self._timeout = _timeouts(config)
        if isinstance(self._transport, PoolTransport):  # tests may give a MockTransport
            self._transport.resize(config.max_connections)

    @contextlib.asynccontextmanager
    async def open(self, request: UpstreamRequest) -> AsyncIterator[UpstreamResponse]:
        """Send ``request`` (with retries) and yield the response whose head came back.

        The ``total_timeout_s`` deadline covers the retries and the body read inside the
        ``async with``. Leaving the block before the body is read closes that upstream
        connection, so abandoned work does not go on upstream.

        Raises:
            NoKeyError: the provider has no key.
            CircuitOpenError: the breaker is open.
            UpstreamError: connection failures after the retries, or a body read failure.
            UpstreamTimeoutError: a read gap over ``read_timeout_s`` or the total deadline.

        Cancellation: safe at any point; the upstream response is closed.
        """
        cfg = self.config
        started = trio.current_time()
        if not self._active:
            self._idle = trio.Event()
        self._active += 1
        status = "cancelled"  # unless something else is known when it ends
        attempts = 0
        latency_s: float | None = None
        key: Key | None = None
        with trio.move_on_after(cfg.total_timeout_s) as deadline:
            try:
                response, key, attempts = await self._send(request, deadline.deadline)
                latency_s = trio.current_time() - started
                self.figures.observe_latency(latency_s)
                # Until the caller is done with the body, an end is the app's cancel (or
                # its leaving); an upstream failure mid-body (OpenclawdError) keeps status.
                status = "cancelled"
                try:
                    yield UpstreamResponse(response, key, attempts, self)
                    status = str(response.status_code)
                finally:
                    with trio.move_on_after(_CLOSE_TIMEOUT_S) as cleanup:
                        cleanup.shield = True
                        await response.aclose()
            except OpenclawdError as exc:
                status = exc.code if latency_s is None else str(response.status_code)
                if isinstance(exc, UpstreamError):
                    self._last_error = str(exc)
                raise
            finally:
                self._active -= 1
                if not self._active:
                    self._idle.set()
                if deadline.cancel_called and status == "cancelled":
                    status = UpstreamTimeoutError.code
                self.figures.requests[status] += 1
                log.info(
                    "upstream.request",
                    provider=self.name,
                    method=request.method,
                    target=request.target.split("?", 1)[0],
                    status=status,
                    attempts=attempts,
                    latency_s=None if latency_s is None else round(latency_s, 4),
                    duration_s=round(trio.current_time() - started, 4),
                    key=key.fingerprint if key else None,
                    key_version=key.version if key else None,
                )
        if deadline.cancelled_caught:
            if latency_s is None:  # not even a response head in all that time
                self.breaker.failure(trio.current_time())
            self._last_error = f"no complete answer within total_timeout_s={cfg.total_timeout_s}"
            raise UpstreamTimeoutError(self._last_error)

    async def _send(
        self, request: UpstreamRequest, deadline: float
    ) -> tuple[httpx.Response, Key, int]:
        """The retry loop: returns the response to relay, the key it was sent with and the
        number of attempts."""
        cfg = self.config
        key = self.keys.current(self.name)
        if key is None:
            raise NoKeyError(f"no key for {self.name}: Vault has not answered for it yet")
        refreshed_key = False
        max_retries = cfg.max_retries if request.replayable else 0
        attempt = 0
        ticket: Ticket | None = None
        while True:
            now = trio.current_time()
            # The breaker gates new requests; a request's own retries run their course
            # (else a 503 it should relay after them would turn into an error).
            if not attempt:
                ticket = self.breaker.allow(now)
            if ticket is None:
                retry_in = math.ceil(self.breaker.retry_after(now))
                raise CircuitOpenError(
                    f"circuit open for {self.name} after repeated failures; next probe in "
                    f"{retry_in}s"
                )
            attempt += 1
            try:
                response = await self._attempt(request, key)
            except PoolBusyError:
                self.breaker.abandon(ticket)
                raise
            except UpstreamError as exc:
                self.breaker.failure(trio.current_time(), ticket)
                if not _retryable(exc) or attempt > max_retries:
                    raise
                delay = self._backoff(attempt)
                if trio.current_time() + delay >= deadline:
                    raise
                log.info("upstream.retry", provider=self.name, attempt=attempt, reason=str(exc))
            except BaseException:
                self.breaker.abandon(ticket)
                raise
            else:
                self._record_headers(response)
                status = response.status_code
                if status >= 500:
                    self.breaker.failure(trio.current_time(), ticket)
                else:
                    self.breaker.success(ticket)
                if status in AUTH_STATUSES and not refreshed_key:
                    refreshed_key = True
                    try:
                        fresh = await self.keys.auth_failure(self.name, key)
                    except BaseException:
                        await _close(response)
                        raise
                    if fresh is not None and fresh.secret != key.secret and request.replayable:
                        await _close(response)
                        log.info(
                            "upstream.retry",
                            provider=self.name,
                            attempt=attempt,
                            reason=f"upstream {status}: retrying with key {fresh.fingerprint}",
                        )
                        key = fresh
                        self.figures.retries += 1
                        continue
                if status not in RETRY_STATUSES or attempt > max_retries:
                    return response, key, attempt
                retry_after = self._retry_after(response)
                delay = self._backoff(attempt) if retry_after is None else retry_after
                if delay > _MAX_RETRY_AFTER_S or trio.current_time() + delay >= deadline:
                    return response, key, attempt
                await _close(response)
                log.info(
                    "upstream.retry",
                    provider=self.name,
                    attempt=attempt,
                    reason=f"upstream {status}",
                    delay_s=round(delay, 3),
                )
            self.figures.retries += 1
            await trio.sleep(delay)

    async def _attempt(self, request: UpstreamRequest, key: Key) -> httpx.Response:
        cfg = self.config
        auth = cfg.auth_header.lower()
        # Refused earlier; dropped here too, whatever a reload changed in between.
        headers = [(k, v) for k, v in request.headers if k.lower() != auth]
        headers.append(
            (cfg.auth_header, f"{cfg.auth_scheme} {key.secret}" if cfg.auth_scheme else key.secret)
        )
        for name, value in _DEFAULT_HEADERS:
            if not any(k.lower() == name for k, _ in headers):
                headers.append((name, value))
        built = httpx.Request(
            request.method,
            self._base.join(request.target),
            headers=headers,
            content=request.content,
            extensions={"timeout": self._timeout},
        )
        with _translated("waiting for the response", before_response=True):
            return await self._transport.handle_async_request(built)

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2^(attempt-1))]."""
        cfg = self.config
        return self._jitter(min(cfg.retry_backoff_max_s, cfg.retry_backoff_s * 2 ** (attempt - 1)))

    def _retry_after(self, response: httpx.Response) -> float | None:
        return parse_retry_after(response.headers.get("retry-after"), now=time.time())

    def _record_headers(self, response: httpx.Response) -> None:
        for figure, names in _RATELIMIT_HEADERS.items():
            for name in names:
                value = response.headers.get(name)
                if value is not None:
                    with contextlib.suppress(ValueError):
                        self._ratelimit[figure] = int(value)
                    break

    def _count_tokens(self, usage: Any) -> None:
        """A response's body reported ``usage`` (its own observation, once)."""
        self.figures.tokens.update(token_counts(usage))

    def _body_failed(self, exc: UpstreamError) -> None:
        """A response's body failed after its head arrived (a drop or a stall mid-body):
        the provider's failure, for the circuit and the status."""
        self._last_error = str(exc)
        self.breaker.failure(trio.current_time())

    def statistics(self) -> UpstreamStatistics:
        state = self.breaker.state
        if state is CircuitState.OPEN and self.breaker.retry_after(trio.current_time()) == 0:
            state = CircuitState.HALF_OPEN
        return UpstreamStatistics(
            circuit=state.value,
            last_error=self._last_error,
            remaining_requests=self._ratelimit["remaining_requests"],
            remaining_tokens=self._ratelimit["remaining_tokens"],
            requests=dict(self.figures.requests),
            retries=self.figures.retries,
            tokens=dict(self.figures.tokens),
            latency=LatencySnapshot(
                LATENCY_BUCKETS_S,
                tuple(self.figures.latency_counts),
                self.figures.latency_sum_s,
            ),
        )

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def aclose_when_idle(self) -> None:
        """Close once no request uses the pool (a provider removed by a reload)."""
        await self._idle.wait()
        await self._transport.aclose()


class Upstreams:
    """Every provider's pool, built from the config."""

    def __init__(
        self,
        config: Config,
        keys: KeySource,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.keys = keys
        self._transport = transport
        self.pools = {
            name: ProviderPool(name, provider, keys, transport=transport)
            for name, provider in config.providers.items()
        }

    def __getitem__(self, name: str) -> ProviderPool:
        try:
            return self.pools[name]
        except KeyError:
            raise UnknownProviderError(f"unknown provider {name!r}") from None

    def reload(self, config: Config) -> list[ProviderPool]:
        """Follow a reloaded config; returns the pools of removed providers, to close."""
        removed = [self.pools.pop(n) for n in list(self.pools) if n not in config.providers]
        for name, provider in config.providers.items():
            pool = self.pools.get(name)
            if pool is None or pool.config.base_url != provider.base_url:
                if pool is not None:
                    removed.append(pool)
                self.pools[name] = ProviderPool(
                    name,
                    provider,
                    self.keys,
                    transport=self._transport,
                    figures=pool.figures if pool is not None else None,
                )
            else:
                pool.configure(provider)
        return removed

    def statistics(self) -> dict[str, UpstreamStatistics]:
        return {name: pool.statistics() for name, pool in self.pools.items()}

    async def aclose(self) -> None:
        for pool in self.pools.values():
            await pool.aclose()


def _timeouts(config: ProviderConfig) -> dict[str, float | None]:
    """connect, read gap (and write), and the wait for a pooled connection, as the
    transport takes them (a request's ``timeout`` extension)."""
    return httpx.Timeout(
        connect=config.connect_timeout_s,
        read=config.read_timeout_s,
        write=config.read_timeout_s,
        pool=config.connect_timeout_s,
    ).as_dict()


class _UrlBase:
    """``base_url`` joined with request targets as httpx.AsyncClient joins them (the
    target's path appended to the base's), with the parsed URLs of recent targets kept:
    parsing one costs more than the rest of building a request."""

    _CACHED = 256

    def __init__(self, base_url: str) -> None:
        base = httpx.URL(base_url)
        self._base = base.copy_with(raw_path=base.raw_path.rstrip(b"/") + b"/")
        self._cache: dict[str, httpx.URL] = {}

    def join(self, target: str) -> httpx.URL:
        url = self._cache.get(target)
        if url is None:
            relative = httpx.URL(target)
            url = self._base.copy_with(
                raw_path=self._base.raw_path + relative.raw_path.lstrip(b"/")
            )
            if len(self._cache) >= self._CACHED:
                self._cache.clear()
            self._cache[target] = url
        return url


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """``Retry-After`` as seconds from ``now`` (delta-seconds or an HTTP date); None if
    absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - now
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _retryable(exc: UpstreamError) -> bool:
    """Connection failures before any response byte; never timeouts (the provider may be
    working on the request)."""
    return isinstance(exc, UpstreamConnectionError)


async def _close(response: httpx.Response) -> None:
    with trio.move_on_after(_CLOSE_TIMEOUT_S) as scope:
        scope.shield = True
        await response.aclose()


@contextlib.contextmanager
def _translated(during: str, *, before_response: bool) -> Iterator[None]:
    """httpx's exceptions as ours, with messages that name the failure, not the request.

    A connection that fails before any response byte is an ``UpstreamConnectionError``
    (safe to retry); after the head it is an ``UpstreamError`` (bytes were relayed).
    """
    try:
        yield
    except httpx.PoolTimeout as exc:
        raise PoolBusyError(
            "every upstream connection of this provider is busy (max_connections)"
        ) from exc
    except httpx.ConnectTimeout as exc:
        raise UpstreamConnectionError("upstream connect timeout") from exc
    except httpx.TimeoutException as exc:
        what = "write" if isinstance(exc, httpx.WriteTimeout) else "read"
        raise UpstreamTimeoutError(f"upstream {what} timeout while {during}") from exc
    except httpx.ConnectError as exc:
        raise UpstreamConnectionError(f"cannot connect to the upstream: {_reason(exc)}") from exc
    except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as exc:
        message = f"upstream connection failed while {during}: {_reason(exc)}"
        if before_response:
            raise UpstreamConnectionError(message) from exc
        raise UpstreamError(message) from exc
    except httpx.HTTPError as exc:
        raise UpstreamError(f"upstream failure while {during}: {type(exc).__name__}") from exc


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]
