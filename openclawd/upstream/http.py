"""Upstream HTTP: one connection pool per provider, its attempts, the circuit breaker.

Requests are httpx's, sent on a transport (``upstream/transport.py``, our pool; tests
give ``httpx.MockTransport``) without ``httpx.AsyncClient`` around it. Owns, per provider:
the pool (HTTP/1.1, keep-alive), the connect / read-gap / total timeouts, the attempts of
each request (when to retry, and with a fresh key, is ``upstream/attempts.py``'s sans-IO
decision), the circuit breaker, and the figures the status and metrics show (rate-limit
headers, requests, latency; a response counts its own token usage and mid-body failures,
``upstream/response.py``, which is also where httpx's errors become ours). It never sees
an app: callers get an ``UpstreamResponse`` and relay it their own way.
"""

from __future__ import annotations

import contextlib
import math
import random
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

import httpx
import trio

from openclawd import logs
from openclawd.config import Config, ProviderConfig, RouteConfig
from openclawd.errors import (
    CircuitOpenError,
    NoKeyError,
    OpenclawdError,
    PoolBusyError,
    RateLimitedError,
    UnknownProviderError,
    UpstreamError,
    UpstreamTimeoutError,
)
from openclawd.keys.manager import Key
from openclawd.protocol.usage import token_counts
from openclawd.tracing import Value
from openclawd.upstream.attempts import Attempts, full_jitter, parse_retry_after
from openclawd.upstream.circuit import CircuitBreaker, CircuitState, Ticket
from openclawd.upstream.figures import (
    LATENCY_BUCKETS_S,
    Figures,
    LatencySnapshot,
    UpstreamStatistics,
)
from openclawd.upstream.headroom import Headroom
from openclawd.upstream.request import UpstreamRequest, UrlBase, timeouts
from openclawd.upstream.response import (
    CLOSE_TIMEOUT_S,
    UpstreamResponse,
    close_response,
    translated,
)
from openclawd.upstream.transport import PoolTransport

__all__ = [
    "LATENCY_BUCKETS_S",
    "KeySource",
    "LatencySnapshot",
    "ProviderPool",
    "UpstreamRequest",
    "UpstreamResponse",
    "UpstreamStatistics",
    "Upstreams",
]

log = logs.get(__name__)


class KeySource(Protocol):
    """What the upstream needs of the key manager."""

    def current(self, provider: str) -> Key | None: ...
    async def auth_failure(self, provider: str, failed: Key) -> Key | None: ...


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
        figures: Figures | None = None,
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
        self._base = UrlBase(config.base_url, config.query)
        self._timeout = timeouts(config)
        self._last_error: str | None = None
        # What the upstream's rate-limit headers said is left (CONTRACT.md 5.2).
        self.headroom = Headroom()
        self.figures = figures or Figures()
        self._active = 0
        self._idle = trio.Event()
        self._idle.set()

    def configure(self, config: ProviderConfig) -> None:
        """Take a reloaded config: the query, timeouts, retries, the breaker and the pool's
        size follow at once (``Upstreams.reload`` builds a new pool when ``base_url`` changes)."""
        self.config = config
        self._base = UrlBase(config.base_url, config.query)
        self.breaker.failure_threshold = config.circuit_failure_threshold
        self.breaker.reset_s = config.circuit_reset_s
        self._timeout = timeouts(config)
        if isinstance(self._transport, PoolTransport):  # tests may give a MockTransport
            self._transport.resize(config.max_connections)

    @contextlib.asynccontextmanager
    async def open(
        self, request: UpstreamRequest, *, retry: bool = True
    ) -> AsyncIterator[UpstreamResponse]:
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
                response, key, attempts = await self._send(request, deadline.deadline, retry)
                latency_s = trio.current_time() - started
                self.figures.observe_latency(latency_s)
                # Until the caller is done with the body, an end is the app's cancel (or
                # its leaving); an upstream failure mid-body (OpenclawdError) keeps status.
                status = "cancelled"
                try:
                    yield UpstreamResponse(response, key, attempts, self)
                    status = str(response.status_code)
                finally:
                    with trio.move_on_after(CLOSE_TIMEOUT_S) as cleanup:
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
                request.trace.upstream(self.name, self._base.host, attempts, key)
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
        self, request: UpstreamRequest, deadline: float, retry: bool = True
    ) -> tuple[httpx.Response, Key, int]:
        """The retry loop: returns the response to relay, the key it was sent with and the
        number of attempts."""
        cfg = self.config
        key = self.keys.current(self.name)
        if key is None:
            raise NoKeyError(f"no key for {self.name}: Vault has not answered for it yet")
        await self._wait_for_headroom(deadline)
        backoff = full_jitter(cfg.retry_backoff_s, cfg.retry_backoff_max_s, self._jitter)
        retries = cfg.max_retries if request.replayable and retry else 0
        attempts = Attempts(retries, backoff, deadline)
        while True:
            ticket = self._ticket(attempts)
            attempts.start()
            try:
                response = await self._attempt(request, key)
            except PoolBusyError:
                self.breaker.abandon(ticket)
                raise
            except UpstreamError as exc:
                self.breaker.failure(trio.current_time(), ticket)
                delay = attempts.after_error(exc, trio.current_time())
                if delay is None:
                    raise
                self._retrying(request, attempts.count, str(exc))
            except BaseException:
                self.breaker.abandon(ticket)
                raise
            else:
                self._judge(response, ticket)
                fresh = await self._fresh_key(request, response, key, attempts)
                if fresh is not None:
                    key = fresh
                    self.figures.retries += 1
                    continue
                delay = attempts.after_status(
                    response.status_code, self._retry_after(response), trio.current_time()
                )
                if delay is None:
                    return response, key, attempts.count
                await close_response(response)
                self._retrying(request, attempts.count, f"upstream {response.status_code}", delay)
            self.figures.retries += 1
            await trio.sleep(delay)

    def _ticket(self, attempts: Attempts) -> Ticket | None:
        """The breaker gates new requests; a request's own retries run their course (else
        a 503 it should relay after them would turn into an error).

        Raises:
            CircuitOpenError: the breaker is open.
        """
        if not attempts.first:
            return None
        now = trio.current_time()
        ticket = self.breaker.allow(now)
        if ticket is None:
            retry_in = math.ceil(self.breaker.retry_after(now))
            raise CircuitOpenError(
                f"circuit open for {self.name} after repeated failures; next probe in {retry_in}s"
            )
        return ticket

    def _judge(self, response: httpx.Response, ticket: Ticket | None) -> None:
        """A response came: its rate-limit headers, and a 5xx for the breaker."""
        self._record_headers(response)
        if response.status_code >= 500:
            self.breaker.failure(trio.current_time(), ticket)
        else:
            self.breaker.success(ticket)

    async def _fresh_key(
        self, request: UpstreamRequest, response: httpx.Response, key: Key, attempts: Attempts
    ) -> Key | None:
        """After a 401/403, once: a fresh key to try again with (the response is closed),
        or None to go on with this response."""
        status = response.status_code
        if not attempts.wants_fresh_key(status):
            return None
        try:
            fresh = await self.keys.auth_failure(self.name, key)
        except BaseException:
            await close_response(response)
            raise
        new = fresh is not None and fresh.secret != key.secret
        request.trace.event(
            "openclawd.key.reread",
            {"http.response.status_code": status, "openclawd.key.changed": new},
        )
        if fresh is None or not new or not request.replayable:
            return None
        await close_response(response)
        self._retrying(
            request, attempts.count, f"upstream {status}: retrying with key {fresh.fingerprint}"
        )
        return fresh

    def _retrying(
        self, request: UpstreamRequest, attempt: int, reason: str, delay: float | None = None
    ) -> None:
        """Attempt ``attempt`` failed for ``reason``; another follows (after ``delay``):
        logged, and an event of the request's span."""
        fields: dict[str, Value] = {"attempt": attempt, "reason": reason}
        if delay is not None:
            fields["delay_s"] = round(delay, 3)
        log.info("upstream.retry", provider=self.name, **fields)
        request.trace.event("openclawd.retry", {f"openclawd.{k}": v for k, v in fields.items()})

    async def _attempt(self, request: UpstreamRequest, key: Key) -> httpx.Response:
        built = request.build(self.config, key, self._base, self._timeout)
        with translated("waiting for the response", before_response=True):
            return await self._transport.handle_async_request(built)

    def _retry_after(self, response: httpx.Response) -> float | None:
        return parse_retry_after(response.headers.get("retry-after"), now=time.time())

    def has_room(self, now: float) -> bool:
        """Would a request be sent now? Not while the circuit is open (before its probe)
        or the upstream said its limit is spent (before the reset)."""
        if self.breaker.state is CircuitState.OPEN and self.breaker.retry_after(now) > 0:
            return False
        return self.headroom.wait(now) <= 0

    def _record_headers(self, response: httpx.Response) -> None:
        self.headroom.observe(response.headers.get, trio.current_time(), time.time())

    async def _wait_for_headroom(self, deadline: float) -> None:
        """Wait until the upstream's spent limit resets, rather than send into a known
        429 (CONTRACT.md 5.2).

        Raises:
            RateLimitedError: it resets only after the request's deadline.
        """
        wait = self.headroom.wait(trio.current_time())
        if wait <= 0:
            return
        if trio.current_time() + wait >= deadline:
            raise RateLimitedError(
                f"provider {self.name}: the upstream's limit is spent until its reset",
                retry_after_s=math.ceil(wait * 1000) / 1000,
            )
        log.info("upstream.headroom_wait", provider=self.name, wait_s=round(wait, 3))
        await trio.sleep(wait)

    def count_tokens(self, usage: Any) -> None:
        """A response's body reported ``usage`` (its own observation, once)."""
        self.figures.tokens.update(token_counts(usage))

    def body_failed(self, exc: UpstreamError) -> None:
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
            remaining_requests=self.headroom.remaining["requests"],
            remaining_tokens=self.headroom.remaining["tokens"],
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
        self.routes: Mapping[str, RouteConfig] = config.routes
        # (route, from, to, reason) -> requests a route sent on to its next provider.
        self.fallbacks: Counter[tuple[str, str, str, str]] = Counter()
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
        self.routes = config.routes
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
