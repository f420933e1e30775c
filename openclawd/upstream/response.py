"""An upstream response being relayed, and httpx's errors as ours.

This is the one place that translates httpx's exceptions into openclawd's
(``UpstreamError``, ``UpstreamTimeoutError``, ...): for the request's send and for its
body. A response observes itself for its pool (``Observer``): a failure mid-body is the
provider's, and the token usage its body reports is counted once known.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Iterator
from typing import Any, Protocol, cast

import httpx
import trio

from openclawd.errors import (
    PoolBusyError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)
from openclawd.keys.manager import Key
from openclawd.protocol.sse import Event, SSEDecoder
from openclawd.protocol.usage import UsageReader, body_kind, merge_usage, model_of, usage_of

# How long closing an abandoned response may take (it runs shielded from cancellation).
CLOSE_TIMEOUT_S = 2.0


class Observer(Protocol):
    """What a response tells its pool about itself."""

    def body_failed(self, exc: UpstreamError) -> None: ...

    def count_tokens(self, usage: Any) -> None: ...


class UpstreamResponse:
    """An upstream response whose head has arrived; its body is read once, by one of
    ``aiter_raw``, ``events`` or ``read``.

    The response observes itself for its pool: a failure while its body is read (a drop,
    a stall, malformed SSE) counts against the provider's circuit and is its last error,
    and the token usage the body reports is counted once it is known (``usage``). The
    caller only relays."""

    def __init__(self, response: httpx.Response, key: Key, attempts: int, pool: Observer) -> None:
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
        self.model: str | None = None  # the model the body names, once read (if any)
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
                self.model = reader.model
                if reader.done:
                    self._count(reader.usage)
                yield chunk
        reader.close()
        self.model = reader.model
        self._count(reader.usage)

    def aiter_bytes(self) -> AsyncGenerator[bytes, None]:
        """The body, content-decoded, as it arrives (no usage is read from it).

        Raises: as ``aiter_raw``.
        """
        return self._chunks(raw=False)

    async def events(self, max_event_bytes: int) -> AsyncGenerator[list[Event], None]:
        """The body's SSE events (content-decoded) as they arrive: those each read
        completed, together (never an empty list); the usage they report is merged and
        counted at the end.

        Raises:
            UpstreamProtocolError: malformed SSE, or an event over ``max_event_bytes``.
            UpstreamTimeoutError, UpstreamError: as ``aiter_raw``.
        """
        decoder = SSEDecoder(max_event_bytes=max_event_bytes)
        try:
            async with contextlib.aclosing(self._chunks(raw=False)) as chunks:
                async for chunk in chunks:
                    events = decoder.feed(chunk)
                    if events:
                        self._merge_usage(events)
                        yield events
            events = decoder.close()
            if events:
                self._merge_usage(events)
                yield events
        except UpstreamProtocolError as exc:
            self._pool.body_failed(exc)
            raise
        self._count(self.usage)

    def _merge_usage(self, events: list[Event]) -> None:
        for event in events:
            self.usage = merge_usage(self.usage, usage_of(event.data))
            if self.model is None:
                self.model = model_of(event.data)

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
                    self._pool.body_failed(exc)
                    raise exc
                parts.append(chunk)
        body = b"".join(parts)
        reader = UsageReader(body_kind(self.header("content-type"), None))
        reader.feed(body)
        reader.close()
        self.model = reader.model
        self._count(reader.usage)
        return body

    async def _chunks(self, *, raw: bool) -> AsyncGenerator[bytes, None]:
        """The body's bytes, httpx's errors translated; a failure is the provider's."""
        try:
            with translated("reading the body", before_response=False):
                stream = self._response.aiter_raw() if raw else self._response.aiter_bytes()
                body = cast(AsyncGenerator[bytes, None], stream)
                async with contextlib.aclosing(body) as chunks:
                    async for chunk in chunks:
                        yield chunk
        except UpstreamError as exc:
            self._pool.body_failed(exc)
            raise

    def _count(self, usage: Any) -> None:
        if not self._counted and usage is not None:
            self._counted = True
            self.usage = usage
            self._pool.count_tokens(usage)


async def close_response(response: httpx.Response) -> None:
    with trio.move_on_after(CLOSE_TIMEOUT_S) as scope:
        scope.shield = True
        await response.aclose()


@contextlib.contextmanager
def translated(during: str, *, before_response: bool) -> Iterator[None]:
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
