"""The upstream HTTP/1.1 connection pool: an httpx transport on h11 and trio.

httpx's own transport (httpcore's pool) scans every pooled connection, with a ``poll``
system call for each idle one, on every request: its cost grows with the pool, and at 64
concurrent requests it was the largest item of the daemon's profile
(docs/performance.md). This pool does the same job in constant time per request: idle
connections wait on a stack per origin, the most recently used is taken first, and only
that one is checked (expired after ``keepalive_expiry_s``, or readable: the server closed
it or sent what it should not have). h11 does the protocol; this module only moves bytes
and keeps count.

It speaks httpx's language at its edges, so ``upstream/http.py`` (and tests, with
``httpx.MockTransport``) are unchanged by which transport runs: it takes an
``httpx.Request`` with the ``timeout`` extension (connect, read, write, pool), answers an
``httpx.Response`` whose body streams from the connection, and raises httpx's exceptions
(``ConnectError``, ``ConnectTimeout``, ``PoolTimeout``, ``ReadTimeout``, ``WriteTimeout``,
``ReadError``, ``WriteError``, ``RemoteProtocolError``, ``LocalProtocolError``).

A connection goes back to the pool only when its response was read to the end and both
sides of h11 agree the exchange is over; a response closed early, an error, or a
cancellation closes the connection instead, so nothing half-read is ever reused.
"""

from __future__ import annotations

import contextlib
import math
import ssl
from collections.abc import AsyncIterator, Iterator
from typing import Any

import h11
import httpx
import trio

__all__ = ["PoolTransport", "tls_failure"]

KEEPALIVE_EXPIRY_S = 5.0  # as httpcore: servers close idle connections, often soon
MAX_HEAD_BYTES = 100 * 1024  # a response head larger than this is refused
_RECEIVE_BYTES = 64 * 1024
_DEFAULT_PORTS = {b"http": 80, b"https": 443}

Origin = tuple[bytes, str, int]


class _Connection:
    """One upstream connection and its h11 state."""

    def __init__(self, origin: Origin, stream: trio.abc.Stream) -> None:
        self.origin = origin
        self.stream = stream
        self.http = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.idle_since = 0.0

    @property
    def reusable(self) -> bool:
        """Is the exchange over, cleanly? Both sides done, and nothing read past the end
        of the response: bytes the server sent beyond it (a body on a HEAD answer, a
        wrong Content-Length, an early 408) would be taken for the next answer, and a
        body that ended with the connection leaves nothing to reuse."""
        http = self.http
        return (
            http.our_state is h11.DONE
            and http.their_state is h11.DONE
            and http.trailing_data == (b"", False)
        )

    def readable(self) -> bool:
        """Has the server sent something (or closed) while the connection sat idle?"""
        stream = self.stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        assert isinstance(stream, trio.SocketStream)
        return stream.socket.is_readable()

    def encode(self, event: h11.Event) -> bytes:
        with _refused_by_h11():
            return self.http.send(event) or b""

    async def send(self, event: h11.Event, gap_s: float) -> None:
        await self.write(self.encode(event), gap_s)

    async def write(self, data: bytes, gap_s: float) -> None:
        if not data:
            return
        with trio.move_on_after(gap_s) as waited:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise httpx.WriteError(_reason(exc)) from exc
        if waited.cancelled_caught:
            raise httpx.WriteTimeout(f"no progress writing to the upstream for {gap_s:g}s")

    def buffered_event(self) -> Any:
        """The next h11 event if the bytes already read make one, else None."""
        try:
            event = self.http.next_event()
        except h11.RemoteProtocolError as exc:
            raise httpx.RemoteProtocolError(str(exc)) from exc
        return None if event is h11.NEED_DATA else event

    async def next_event(self, gap_s: float) -> Any:
        """The next h11 event from the server, reading as needed; no byte for ``gap_s``
        is a ReadTimeout."""
        while True:
            try:
                event = self.http.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc)) from exc
            if event is not h11.NEED_DATA:
                return event
            with trio.move_on_after(gap_s) as waited:
                try:
                    data = await self.stream.receive_some(_RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise httpx.ReadError(_reason(exc)) from exc
            if waited.cancelled_caught:
                raise httpx.ReadTimeout(f"no byte from the upstream for {gap_s:g}s")
            self.http.receive_data(bytes(data))


class _Body(httpx.AsyncByteStream):
    """A response body, read from its connection as it is iterated; closing it hands the
    connection back to the pool (read to the end) or closes it (anything else).

    Its own iterator, not an async generator: httpx never closes the iterator of a body
    left early, and a generator would be left for the garbage collector to finalize.
    Each step returns every body byte that has arrived, not one HTTP chunk: an SSE stream
    sends a chunk per event, and thousands of tiny steps cost more than the relay."""

    def __init__(self, pool: PoolTransport, conn: _Connection, read_timeout: float) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self._read_timeout = read_timeout
        self._ended = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise httpx.StreamClosed()
        if self._ended:
            raise StopAsyncIteration
        parts: list[bytes] = []
        event = await conn.next_event(self._read_timeout)
        while True:
            if isinstance(event, h11.Data):
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._ended = True
                break
            else:  # ConnectionClosed before the end: h11 raised for a framed body
                raise httpx.RemoteProtocolError("the upstream closed the connection mid-body")
            event = conn.buffered_event()
            if event is None:
                break
        if not parts:
            raise StopAsyncIteration
        return b"".join(parts) if len(parts) > 1 else parts[0]

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._pool.release(conn)


class PoolTransport(httpx.AsyncBaseTransport):
    """At most ``max_connections`` connections (idle ones included); TLS with
    ``ssl_context`` for ``https``. A request that finds them all busy waits up to the
    ``pool`` timeout for one."""

    def __init__(
        self,
        *,
        max_connections: int,
        ssl_context: ssl.SSLContext,
        keepalive_expiry_s: float = KEEPALIVE_EXPIRY_S,
    ) -> None:
        self._max = max_connections
        self._tls = ssl_context
        self._expiry_s = keepalive_expiry_s
        self._idle: dict[Origin, list[_Connection]] = {}
        self._open = 0  # connections, idle or in use
        self._freed = trio.Event()  # set when a connection is handed back or closed
        self._closed = False

    @property
    def connections(self) -> int:
        return self._open

    @property
    def max_connections(self) -> int:
        return self._max

    def resize(self, max_connections: int) -> None:
        """A new limit (a reload), at once: requests waiting for a connection take the
        room a raise makes; after a cut, connections over the limit are closed as their
        responses end instead of going back to the pool."""
        self._max = max_connections
        self._wake()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        connect_s = _seconds(timeouts.get("connect"))
        read_s = _seconds(timeouts.get("read"))
        write_s = _seconds(timeouts.get("write"))
        conn = await self._checkout(request.url, _seconds(timeouts.get("pool")), connect_s)
        try:
            with _refused_by_h11():
                head = h11.Request(
                    method=request.method, target=request.url.raw_path, headers=request.headers.raw
                )
            body = request.stream
            if isinstance(body, httpx.ByteStream):  # all there: one write, one system call
                data = conn.encode(head)
                for chunk in body:
                    data += conn.encode(h11.Data(data=chunk))
                await conn.write(data + conn.encode(h11.EndOfMessage()), write_s)
            else:  # streamed from the app: each piece goes on as it comes
                assert isinstance(body, httpx.AsyncByteStream)
                await conn.send(head, write_s)
                async for chunk in body:
                    await conn.send(h11.Data(data=chunk), write_s)
                await conn.send(h11.EndOfMessage(), write_s)
            while True:
                event = await conn.next_event(read_s)
                if isinstance(event, h11.Response):
                    break
                if not isinstance(event, h11.InformationalResponse):  # ConnectionClosed
                    raise httpx.RemoteProtocolError(
                        "the upstream closed the connection without sending a response"
                    )
        except BaseException:
            await self._close(conn)
            raise
        return httpx.Response(
            event.status_code,
            headers=event.headers.raw_items(),
            stream=_Body(self, conn, read_s),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": event.reason},
        )

    async def _checkout(self, url: httpx.URL, pool_s: float, connect_s: float) -> _Connection:
        scheme = url.raw_scheme
        origin = (scheme, url.host, url.port or _DEFAULT_PORTS.get(scheme, 80))
        with trio.move_on_after(pool_s) as waited:
            while True:
                if self._closed:
                    raise httpx.ConnectError("the upstream pool is closed")
                if self._open > self._max and await self._evict_idle():
                    continue  # a reload cut the limit: idle connections over it go first
                conn = await self._take_idle(origin)
                if conn is not None:
                    return conn
                if self._open < self._max:
                    break  # no await between this check and taking the slot
                if not await self._evict_idle():
                    await self._freed.wait()
        if waited.cancelled_caught:
            raise httpx.PoolTimeout(f"no upstream connection free within {pool_s:g}s")
        self._open += 1
        try:
            stream = await self._connect(origin, connect_s)
        except BaseException:
            self._open -= 1
            self._wake()
            raise
        return _Connection(origin, stream)

    async def _take_idle(self, origin: Origin) -> _Connection | None:
        """The most recently used idle connection to ``origin`` that is still good."""
        stack = self._idle.get(origin)
        now = trio.current_time()
        while stack:
            conn = stack.pop()
            if now - conn.idle_since < self._expiry_s and not conn.readable():
                return conn
            await self._close(conn)
        return None

    async def _evict_idle(self) -> bool:
        """Close the longest idle connection (to any origin) to make room; False if every
        connection is in use."""
        stacks = [stack for stack in self._idle.values() if stack]
        if not stacks:
            return False
        oldest = min(stacks, key=lambda stack: stack[0].idle_since)
        await self._close(oldest.pop(0))
        return True

    async def _connect(self, origin: Origin, within_s: float) -> trio.abc.Stream:
        scheme, host, port = origin
        with trio.move_on_after(within_s) as waited:
            try:
                tcp = await trio.open_tcp_stream(host, port)
            except OSError as exc:
                raise httpx.ConnectError(_reason(exc)) from exc
            if scheme != b"https":
                return tcp
            secure = trio.SSLStream(tcp, self._tls, server_hostname=host, https_compatible=True)
            done = False
            try:
                await secure.do_handshake()
                done = True
                return secure
            except trio.BrokenResourceError as exc:
                raise httpx.ConnectError(tls_failure(exc)) from exc
            finally:
                if not done:  # failed, or timed out: never used, never pooled
                    await trio.aclose_forcefully(tcp)
        assert waited.cancelled_caught
        raise httpx.ConnectTimeout(f"no connection within {within_s:g}s")

    async def release(self, conn: _Connection) -> None:
        """A response is closed: keep its connection for the next request if the exchange
        is complete, else close it."""
        if conn.reusable and not self._closed and self._open <= self._max:
            conn.http.start_next_cycle()
            conn.idle_since = trio.current_time()
            self._idle.setdefault(conn.origin, []).append(conn)
            self._wake()
        else:
            await self._close(conn)

    async def _close(self, conn: _Connection) -> None:
        """Close ``conn`` at once (no TLS goodbye); never interrupted by a cancellation,
        so a pool closed from a cancelled scope still closes every connection."""
        self._open -= 1
        self._wake()
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(conn.stream)

    def _wake(self) -> None:
        self._freed.set()
        self._freed = trio.Event()

    async def aclose(self) -> None:
        """Close the idle connections; those in use close with their responses."""
        self._closed = True
        for stack in self._idle.values():
            while stack:
                await self._close(stack.pop())
        self._idle.clear()


@contextlib.contextmanager
def _refused_by_h11() -> Iterator[None]:
    """h11 refusing what we would send (an invalid header, a framing it cannot do) as
    httpx's error; its own text quotes the offending header's value, which may be the
    key's, so it is dropped (``from None``) and never reaches a log or an app."""
    try:
        yield
    except h11.LocalProtocolError:
        raise httpx.LocalProtocolError(
            "the request cannot be sent as HTTP/1.1 (an invalid header or framing)"
        ) from None


def tls_failure(exc: trio.BrokenResourceError) -> str:
    """What a failed TLS handshake says, named by its cause (``certificate verify failed:
    self-signed certificate``), never a fallback to an unverified connection."""
    cause = exc.__cause__
    detail = getattr(cause, "verify_message", None) or getattr(cause, "reason", None)
    return f"TLS handshake failed: {detail or type(cause).__name__}"


def _seconds(value: float | None) -> float:
    return math.inf if value is None else value


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause or exc) or type(cause or exc).__name__
