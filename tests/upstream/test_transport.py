"""The upstream connection pool (``upstream/transport.py``) against real loopback servers.

Every server here is written in the test, with trio, and answers raw HTTP/1.1 bytes: the
tests decide exactly what the upstream sends and when, and see what it receives. Each
accepted TCP connection is a :class:`Peer`; ``Upstream.accepted`` counts them, and
``Peer.eof`` is set when the client closed it (FIN or reset), which is how a test proves
that the pool closed a connection rather than kept it.

Timing tests run on trio's ``autojump_clock``: the clock jumps only when every task is
blocked, loopback I/O included, so a timeout is exact virtual time and costs nothing.
"""

from __future__ import annotations

import gc
import ssl
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import trio
import trio.testing

from openclawd.upstream.transport import PoolTransport

from ..conftest import server_tls

Handler = Callable[["Peer"], Awaitable[None]]
Body = AsyncGenerator[bytes, None]  # how httpx (and _Body) iterate a body

# One plain context for the http:// tests (loading the system store costs a little).
SYSTEM_TLS = ssl.create_default_context()


# --- the upstream ------------------------------------------------------------------------


@dataclass
class Received:
    """One request as the upstream read it."""

    method: bytes
    target: bytes
    headers: dict[bytes, bytes]  # lower-cased names
    body: bytes
    raw: bytes  # head and body as they were on the wire


class Peer:
    """One accepted connection, seen from the server."""

    def __init__(self, upstream: Upstream, stream: trio.abc.Stream) -> None:
        self.upstream = upstream
        self.stream = stream
        self.requests: list[Received] = []
        self.received = bytearray()  # every byte read (decrypted, for TLS)
        self.broken = False  # a read failed (reset, TLS handshake failure) rather than EOF
        self.eof = trio.Event()  # the client closed its side
        self.closed = trio.Event()  # the server closed the connection
        self._buffer = bytearray()

    async def _fill(self) -> bool:
        if self.eof.is_set():
            return False
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken = True
            data = b""
        if not data:
            self.eof.set()
            self.upstream.pulse()
            return False
        self._buffer += data
        self.received += data
        return True

    async def _read_until(self, separator: bytes) -> bytes | None:
        while (at := self._buffer.find(separator)) < 0:
            if not await self._fill():
                return None
        end = at + len(separator)
        data = bytes(self._buffer[:end])
        del self._buffer[:end]
        return data

    async def _read_exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            if not await self._fill():
                raise AssertionError("the client closed the connection mid-request")
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def read_request(self) -> Received | None:
        """The next request, whole; None if the client closed the connection first."""
        head = await self._read_until(b"\r\n\r\n")
        if head is None:
            return None
        raw = bytearray(head)
        request_line, *lines = head[:-4].split(b"\r\n")
        method, target, version = request_line.split(b" ")
        assert version == b"HTTP/1.1"
        headers: dict[bytes, bytes] = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        body = bytearray()
        if b"content-length" in headers:
            data = await self._read_exactly(int(headers[b"content-length"]))
            body += data
            raw += data
        elif headers.get(b"transfer-encoding") == b"chunked":
            while True:
                size_line = await self._read_until(b"\r\n")
                if size_line is None:
                    raise AssertionError("the client closed the connection mid-request")
                size = int(size_line.split(b";")[0], 16)
                chunk = await self._read_exactly(size + 2)
                raw += size_line + chunk
                assert chunk.endswith(b"\r\n"), chunk
                if size == 0:
                    break
                body += chunk[:-2]
        request = Received(method, target, headers, bytes(body), bytes(raw))
        self.requests.append(request)
        self.upstream.pulse()
        return request

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def wait_eof(self) -> None:
        """Read (and keep) whatever comes until the client closes."""
        while await self._fill():
            pass


class Upstream:
    """A loopback HTTP/1.1 server; ``handler`` runs once per accepted connection."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None) -> None:
        self.handler = handler
        self.tls = tls
        self.peers: list[Peer] = []
        self.port = 0
        self._changed = trio.Event()

    @property
    def accepted(self) -> int:
        return len(self.peers)

    @property
    def requests(self) -> list[Received]:
        return [request for peer in self.peers for request in peer.requests]

    def url(self, path: str = "/v1/x", host: str = "127.0.0.1") -> str:
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://{host}:{self.port}{path}"

    def pulse(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, condition: Callable[[], bool], within_s: float = 2.0) -> None:
        """Wait (up to ``within_s``) for ``condition()`` to hold, else fail the test."""
        with trio.move_on_after(within_s):
            while not condition():
                await self._changed.wait()
        assert condition(), "the upstream never got there"

    async def wait_eof(self, *indexes: int) -> None:
        """Wait for the client to close the given connections (all, when none given)."""
        peers = [self.peers[i] for i in indexes] if indexes else self.peers
        await self.wait_for(lambda: all(peer.eof.is_set() for peer in peers))

    async def serve(self, tcp: trio.SocketStream) -> None:
        stream: trio.abc.Stream = tcp
        if self.tls is not None:
            stream = trio.SSLStream(tcp, self.tls, server_side=True)
        peer = Peer(self, stream)
        self.peers.append(peer)
        self.pulse()
        try:
            await self.handler(peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            peer.broken = True
        finally:
            await trio.aclose_forcefully(tcp)
            peer.closed.set()
            self.pulse()


@asynccontextmanager
async def upstream(
    handler: Handler | None = None, tls: ssl.SSLContext | None = None
) -> AsyncIterator[Upstream]:
    up = Upstream(handler or answer_all, tls)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, up.serve, 0, host="127.0.0.1"))
        up.port = listeners[0].socket.getsockname()[1]
        yield up
        nursery.cancel_scope.cancel()


def reply(body: bytes = b"hello", status: bytes = b"200 OK", headers: bytes = b"") -> bytes:
    head = b"HTTP/1.1 " + status + b"\r\ncontent-length: %d\r\n" % len(body) + headers
    return head + b"\r\n" + body


async def answer_all(peer: Peer) -> None:
    """Every request on the connection: 200 with ``hello``; until the client closes."""
    while await peer.read_request() is not None:
        await peer.send(reply())


async def never_answer(peer: Peer) -> None:
    await peer.read_request()
    await peer.wait_eof()


# --- the client side ---------------------------------------------------------------------


def make_pool(max_connections: int = 10, **kwargs: Any) -> PoolTransport:
    kwargs.setdefault("ssl_context", SYSTEM_TLS)
    return PoolTransport(max_connections=max_connections, **kwargs)


def request(
    url: str,
    method: str = "GET",
    content: Any = None,
    *,
    connect: float | None = 5.0,
    read: float | None = 5.0,
    write: float | None = 5.0,
    pool: float | None = 5.0,
) -> httpx.Request:
    timeout = {"connect": connect, "read": read, "write": write, "pool": pool}
    return httpx.Request(method, url, content=content, extensions={"timeout": timeout})


async def fetch(transport: PoolTransport, url: str, **kwargs: Any) -> tuple[int, bytes]:
    """One whole exchange: the status and the body, read to the end; the response closed."""
    response = await transport.handle_async_request(request(url, **kwargs))
    try:
        body = await response.aread()
    finally:
        await response.aclose()
    return response.status_code, body


async def drain(response: httpx.Response, into: list[bytes]) -> None:
    async for chunk in response.aiter_raw():
        into.append(chunk)


# --- keep-alive and reuse ----------------------------------------------------------------


async def test_two_sequential_requests_share_one_kept_alive_connection() -> None:
    with trio.fail_after(10):
        async with upstream() as up, make_pool() as transport:
            assert await fetch(transport, up.url()) == (200, b"hello")
            assert transport.connections == 1
            assert await fetch(transport, up.url("/v1/y")) == (200, b"hello")
            assert up.accepted == 1
            assert transport.connections == 1
            assert [r.target for r in up.peers[0].requests] == [b"/v1/x", b"/v1/y"]
            assert not up.peers[0].eof.is_set()


async def test_a_response_closed_before_its_end_closes_its_connection() -> None:
    with trio.fail_after(10):
        async with upstream() as up, make_pool() as transport:
            response = await transport.handle_async_request(request(up.url()))
            assert response.status_code == 200
            await response.aclose()  # the 5 body bytes were never read
            await up.wait_eof(0)
            assert transport.connections == 0
            assert await fetch(transport, up.url()) == (200, b"hello")
            assert up.accepted == 2
            assert len(up.peers[0].requests) == 1
            assert transport.connections == 1


async def test_a_partly_read_body_is_not_reused() -> None:
    """Half a body read, then closed: the rest must never be read as the next answer."""

    async def half(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nfirst")
        await peer.wait_eof()

    with trio.fail_after(10):
        async with upstream(half) as up, make_pool() as transport:
            response = await transport.handle_async_request(request(up.url()))
            assert isinstance(response.stream, httpx.AsyncByteStream)
            # The body's own iterator, closed here (httpx's aiter_raw would leave it to the
            # garbage collector: see the test of that below).
            async with aclosing(cast(Body, aiter(response.stream))) as chunks:
                assert await anext(chunks) == b"first"
            await response.aclose()
            await up.wait_eof(0)
            assert transport.connections == 0


async def test_a_body_left_early_leaves_no_async_generator_of_ours_to_the_gc() -> None:
    """As ``ProviderPool``'s ``read(limit)`` does: httpx's ``aiter_raw`` closed (with
    ``aclosing``) after one chunk, then the response."""

    async def half(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nfirst")
        await peer.wait_eof()

    with trio.fail_after(10):
        async with upstream(half) as up, make_pool() as transport:
            response = await transport.handle_async_request(request(up.url()))
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                async with aclosing(cast(Body, response.aiter_raw())) as chunks:
                    assert await anext(chunks) == b"first"
                await response.aclose()
                del chunks
                for _ in range(3):  # collect, and let trio's finalizers run
                    gc.collect()
                    await trio.testing.wait_all_tasks_blocked()
            await up.wait_eof(0)
    leaked = [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)]
    assert [message for message in leaked if "'openclawd." in message] == []


async def test_a_response_with_connection_close_is_not_reused() -> None:
    async def close_after(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(reply(headers=b"connection: close\r\n"))
        await peer.wait_eof()

    with trio.fail_after(10):
        async with upstream(close_after) as up, make_pool() as transport:
            assert await fetch(transport, up.url()) == (200, b"hello")
            await up.wait_eof(0)
            assert transport.connections == 0
            assert await fetch(transport, up.url()) == (200, b"hello")
            assert up.accepted == 2


async def test_a_close_delimited_body_is_read_whole_and_the_next_request_works() -> None:
    async def until_close(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 100_000)

    with trio.fail_after(10):
        async with upstream(until_close) as up, make_pool() as transport:
            assert await fetch(transport, up.url()) == (200, b"x" * 100_000)
            assert await fetch(transport, up.url()) == (200, b"x" * 100_000)
            assert up.accepted == 2


async def test_a_connection_whose_body_ended_with_its_close_is_not_pooled() -> None:
    async def until_close(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\n\r\nall of it")

    with trio.fail_after(10):
        async with upstream(until_close) as up, make_pool() as transport:
            assert await fetch(transport, up.url()) == (200, b"all of it")
            await up.peers[0].closed.wait()
            assert transport.connections == 0


# --- the limit ---------------------------------------------------------------------------


async def test_max_connections_makes_a_third_request_wait_until_pool_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        async with upstream() as up, make_pool(max_connections=2) as transport:
            held = [await transport.handle_async_request(request(up.url())) for _ in range(2)]
            assert transport.connections == 2
            start = trio.current_time()
            with pytest.raises(httpx.PoolTimeout):
                await transport.handle_async_request(request(up.url(), pool=3.0))
            assert trio.current_time() - start == pytest.approx(3.0)
            assert up.accepted == 2
            assert transport.connections == 2
            for response in held:
                await response.aclose()


async def test_a_waiting_request_takes_the_connection_handed_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        async with upstream() as up, make_pool(max_connections=2) as transport:
            first, second = [
                await transport.handle_async_request(request(up.url())) for _ in range(2)
            ]
            results: list[tuple[int, bytes]] = []

            async def third() -> None:
                results.append(await fetch(transport, up.url("/third"), pool=None))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(third)
                await trio.sleep(5)  # however long: it waits, and opens nothing
                assert results == []
                assert up.accepted == 2
                assert await first.aread() == b"hello"
                await first.aclose()  # read to the end: back to the pool, to the waiter
            assert results == [(200, b"hello")]
            assert up.accepted == 2
            assert [r.target for r in up.peers[0].requests] == [b"/v1/x", b"/third"]
            await second.aclose()
            assert transport.connections == 1


async def test_a_waiting_request_opens_a_connection_when_one_is_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        async with upstream() as up, make_pool(max_connections=2) as transport:
            first, second = [
                await transport.handle_async_request(request(up.url())) for _ in range(2)
            ]
            results: list[tuple[int, bytes]] = []

            async def third() -> None:
                results.append(await fetch(transport, up.url(), pool=None))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(third)
                await trio.testing.wait_all_tasks_blocked()
                assert results == []
                await first.aclose()  # unread: closed, which frees a place
            assert results == [(200, b"hello")]
            assert up.accepted == 3
            await up.wait_eof(0)
            await second.aclose()
            assert transport.connections == 1


async def test_a_request_cancelled_while_waiting_for_the_pool_leaves_no_trace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        async with upstream() as up, make_pool(max_connections=1) as transport:
            held = await transport.handle_async_request(request(up.url()))
            with trio.move_on_after(1) as waited:
                await transport.handle_async_request(request(up.url(), pool=None))
            assert waited.cancelled_caught
            assert transport.connections == 1
            assert await held.aread() == b"hello"
            await held.aclose()
            assert await fetch(transport, up.url()) == (200, b"hello")
            assert up.accepted == 1


# --- idle connections --------------------------------------------------------------------


async def test_an_idle_connection_expires_after_keepalive_expiry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        async with upstream() as up, make_pool(keepalive_expiry_s=2.0) as transport:
            assert await fetch(transport, up.url()) == (200, b"hello")
            await trio.sleep(1.5)
            assert await fetch(transport, up.url()) == (200, b"hello")
            assert up.accepted == 1  # not yet expired: reused
            await trio.sleep(2.5)
            assert await fetch(transport, up.url()) == (200, b"hello")
            assert up.accepted == 2
            await up.wait_eof(0)
            assert transport.connections == 1


async def test_an_idle_connection_the_server_closed_is_replaced_without_error() -> None:
    async def one_then_close(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(reply())  # kept alive, as far as the client knows

    with trio.fail_after(10):
        async with upstream(one_then_close) as up, make_pool() as transport:
            assert await fetch(transport, up.url()) == (200, b"hello")
            await up.peers[0].closed.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert await fetch(transport, up.url()) == (200, b"hello")
            assert up.accepted == 2
            assert len(up.peers[1].requests) == 1
            assert transport.connections == 1


async def test_an_idle_connection_the_server_wrote_to_is_replaced() -> None:
    """Servers send ``408`` on an idle connection before closing it: that is not the
    answer to the next request."""
    idle, timed_out = trio.Event(), trio.Event()

    async def then_408(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(reply())
        if len(peer.upstream.peers) == 1:
            await idle.wait()  # the client has read the response (and pooled the connection)
            await peer.send(reply(b"", b"408 Request Timeout"))
            timed_out.set()
        await answer_all(peer)

    with trio.fail_after(10):
        async with upstream(then_408) as up, make_pool() as transport:
            assert await fetch(transport, up.url()) == (200, b"hello")
            idle.set()
            await timed_out.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert await fetch(transport, up.url()) == (200, b"hello")
            assert up.accepted == 2
            await up.wait_eof(0)
            assert transport.connections == 1


async def test_bytes_after_the_end_of_a_response_are_never_the_next_answer() -> None:
    """A server that sends more than its framing says (a body on a HEAD answer, a wrong
    content-length, a stray answer) in the same write as the response."""

    first = True

    async def too_much(peer: Peer) -> None:
        nonlocal first
        while await peer.read_request() is not None:
            if first:
                first = False
                await peer.send(reply(b"ok") + reply(b"stale"))
            else:
                await peer.send(reply(b"fresh"))

    with trio.fail_after(10):
        async with upstream(too_much) as up, make_pool() as transport:
            assert await fetch(transport, up.url()) == (200, b"ok")
            await trio.testing.wait_all_tasks_blocked()
            assert await fetch(transport, up.url()) == (200, b"fresh")


# --- errors ------------------------------------------------------------------------------


async def test_a_refused_connection_is_connect_error() -> None:
    with trio.fail_after(10):
        # A bound socket that does not listen: connecting to it is refused, and no other
        # process can take the port meanwhile.
        with trio.socket.socket() as sock:
            await sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            async with make_pool() as transport:
                with pytest.raises(httpx.ConnectError):
                    await transport.handle_async_request(request(f"http://127.0.0.1:{port}/"))
                assert transport.connections == 0


async def test_a_server_closing_without_a_response_is_remote_protocol_error() -> None:
    async def read_then_close(peer: Peer) -> None:
        await peer.read_request()  # read first: closing with unread bytes would be a reset

    with trio.fail_after(10):
        async with upstream(read_then_close) as up, make_pool() as transport:
            with pytest.raises(httpx.RemoteProtocolError):
                await transport.handle_async_request(request(up.url()))
            assert up.accepted == 1
            assert transport.connections == 0


async def test_a_server_that_never_answers_is_read_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        async with upstream(never_answer) as up, make_pool() as transport:
            start = trio.current_time()
            with pytest.raises(httpx.ReadTimeout):
                await transport.handle_async_request(request(up.url(), read=2.0))
            assert trio.current_time() - start == pytest.approx(2.0)
            await up.wait_eof(0)
            assert transport.connections == 0


async def test_a_body_that_stalls_is_read_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def head_then_stall(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        await peer.wait_eof()

    with trio.fail_after(10):
        async with upstream(head_then_stall) as up, make_pool() as transport:
            response = await transport.handle_async_request(request(up.url(), read=3.0))
            assert response.status_code == 200
            chunks: list[bytes] = []
            start = trio.current_time()
            with pytest.raises(httpx.ReadTimeout):
                await drain(response, chunks)
            assert trio.current_time() - start == pytest.approx(3.0)
            assert chunks == [b"abc"]
            await response.aclose()
            await up.wait_eof(0)
            assert transport.connections == 0


async def test_a_malformed_status_line_is_remote_protocol_error() -> None:
    async def garbage(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 two-hundred OK\r\ncontent-length: 0\r\n\r\n")
        await peer.wait_eof()

    with trio.fail_after(10):
        async with upstream(garbage) as up, make_pool() as transport:
            with pytest.raises(httpx.RemoteProtocolError):
                await transport.handle_async_request(request(up.url()))
            await up.wait_eof(0)
            assert transport.connections == 0


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(b"transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n", id="chunked"),
        pytest.param(b"transfer-encoding: chunked\r\n\r\na\r\nhello", id="mid-chunk"),
        pytest.param(b"content-length: 10\r\n\r\nhello", id="content-length"),
    ],
)
async def test_a_body_cut_by_the_server_is_an_error_while_reading(sent: bytes) -> None:
    async def cut(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\n" + sent)

    with trio.fail_after(10):
        async with upstream(cut) as up, make_pool() as transport:
            response = await transport.handle_async_request(request(up.url()))
            chunks: list[bytes] = []
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                await drain(response, chunks)
            assert b"".join(chunks) == b"hello"
            await response.aclose()
            assert transport.connections == 0
            assert up.accepted == 1


async def test_a_server_that_does_not_read_is_write_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    release = trio.Event()

    async def deaf(peer: Peer) -> None:
        await release.wait()

    with trio.fail_after(10):
        async with upstream(deaf) as up, make_pool() as transport:
            big = b"x" * (64 * 1024 * 1024)  # more than both sides' socket buffers
            with pytest.raises(httpx.WriteTimeout):
                await transport.handle_async_request(
                    request(up.url(), "POST", content=big, write=2.0)
                )
            assert transport.connections == 0
            release.set()


# --- TLS ---------------------------------------------------------------------------------


async def test_a_self_signed_certificate_is_refused_before_any_request(
    certificate: tuple[Path, Path],
) -> None:
    with trio.fail_after(10):
        async with (
            upstream(tls=server_tls(certificate)) as up,
            make_pool(ssl_context=ssl.create_default_context()) as transport,
        ):
            with pytest.raises(httpx.ConnectError) as caught:
                await transport.handle_async_request(request(up.url(), "POST", b"secret"))
            assert "certificate" in str(caught.value), caught.value
            assert transport.connections == 0
            await up.wait_eof(0)
            assert up.peers[0].broken  # the handshake failed on its side too
            assert up.peers[0].received == b""
            assert up.requests == []


async def test_a_hostname_the_certificate_does_not_name_is_refused(
    certificate: tuple[Path, Path],
) -> None:
    trusted = ssl.create_default_context(cafile=certificate[0])
    with trio.fail_after(10):
        async with upstream(tls=server_tls(certificate)) as up, make_pool(ssl_context=trusted) as t:
            with pytest.raises(httpx.ConnectError) as caught:
                await t.handle_async_request(request(up.url(host="localhost")))
            assert "certificate" in str(caught.value), caught.value
            assert t.connections == 0
            assert up.requests == []


async def test_a_trusted_certificate_carries_requests_over_tls_with_keep_alive(
    certificate: tuple[Path, Path],
) -> None:
    trusted = ssl.create_default_context(cafile=certificate[0])
    with trio.fail_after(10):
        async with upstream(tls=server_tls(certificate)) as up, make_pool(ssl_context=trusted) as t:
            assert await fetch(t, up.url(), method="POST", content=b"over tls") == (
                200,
                b"hello",
            )
            assert await fetch(t, up.url()) == (200, b"hello")
            assert [r.body for r in up.requests] == [b"over tls", b""]
            assert up.accepted == 1
            assert t.connections == 1
            assert up.peers[0].received.startswith(b"POST /v1/x HTTP/1.1\r\n")


# --- cancellation and closing ------------------------------------------------------------


async def test_cancelling_a_request_waiting_for_its_head_closes_the_connection() -> None:
    with trio.fail_after(10):
        async with upstream(never_answer) as up, make_pool() as transport:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(transport.handle_async_request, request(up.url()))
                    await up.wait_for(lambda: len(up.requests) == 1)
                    assert transport.connections == 1
                    scope.cancel()
            assert scope.cancelled_caught
            assert transport.connections == 0
            await up.wait_eof(0)
    gc.collect()  # an unclosed socket would warn now (and warnings are errors)


async def test_aclose_from_a_cancelled_scope_closes_every_idle_connection() -> None:
    with trio.fail_after(10):
        async with upstream() as up:
            transport = make_pool()
            held = [await transport.handle_async_request(request(up.url())) for _ in range(3)]
            for response in held:
                assert await response.aread() == b"hello"
                await response.aclose()
            assert transport.connections == 3
            assert up.accepted == 3
            with trio.CancelScope() as scope:
                scope.cancel()
                await transport.aclose()
            assert transport.connections == 0
            await up.wait_eof()
            with pytest.raises(httpx.ConnectError):
                await transport.handle_async_request(request(up.url()))
            assert up.accepted == 3
    gc.collect()


async def test_a_response_in_use_when_the_pool_closes_closes_with_it() -> None:
    with trio.fail_after(10):
        async with upstream() as up:
            transport = make_pool()
            response = await transport.handle_async_request(request(up.url()))
            await transport.aclose()
            assert not up.peers[0].eof.is_set()
            assert await response.aread() == b"hello"  # still readable to the end
            await response.aclose()
            await up.wait_eof(0)
            assert transport.connections == 0


# --- request bodies ----------------------------------------------------------------------


SIZED = b"z" * 70_000


async def test_request_bodies_are_framed_and_arrive_whole() -> None:
    async def parts() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b""  # must not end the chunked body early
        yield b"def" * 20_000

    with trio.fail_after(10):
        async with upstream() as up, make_pool() as transport:
            ok = (200, b"hello")
            assert await fetch(transport, up.url("/a?q=1&r=2"), method="POST", content=SIZED) == ok
            assert await fetch(transport, up.url("/b"), method="PUT", content=parts()) == ok
            assert await fetch(transport, up.url("/c")) == ok
            sized, streamed, empty = up.requests
            assert (sized.method, sized.target) == (b"POST", b"/a?q=1&r=2")
            assert sized.headers[b"content-length"] == b"70000"
            assert b"transfer-encoding" not in sized.headers
            assert sized.body == SIZED
            assert sized.headers[b"host"] == b"127.0.0.1:%d" % up.port
            assert (streamed.method, streamed.target) == (b"PUT", b"/b")
            assert streamed.headers[b"transfer-encoding"] == b"chunked"
            assert b"content-length" not in streamed.headers
            assert streamed.body == b"abc" + b"def" * 20_000
            assert streamed.raw.endswith(b"\r\n0\r\n\r\n")
            assert (empty.method, empty.body) == (b"GET", b"")
            assert up.accepted == 1


# --- responses ---------------------------------------------------------------------------


async def test_informational_responses_are_skipped_for_the_final_one() -> None:
    async def informational(peer: Peer) -> None:
        while await peer.read_request() is not None:
            await peer.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            await peer.send(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>\r\n\r\n")
            await peer.send(reply(b"made", b"201 Very Created", b"x-final: yes\r\n"))

    with trio.fail_after(10):
        async with upstream(informational) as up, make_pool() as transport:
            response = await transport.handle_async_request(request(up.url()))
            assert response.status_code == 201
            assert response.reason_phrase == "Very Created"
            assert response.headers["x-final"] == "yes"
            assert "link" not in response.headers
            assert await response.aread() == b"made"
            await response.aclose()
            assert await fetch(transport, up.url()) == (201, b"made")
            assert up.accepted == 1


# --- origins -----------------------------------------------------------------------------


async def test_two_origins_never_share_a_connection() -> None:
    with trio.fail_after(10):
        async with upstream() as a, upstream() as b, make_pool() as transport:
            for _ in range(2):
                assert await fetch(transport, a.url()) == (200, b"hello")
                assert await fetch(transport, b.url()) == (200, b"hello")
            assert (a.accepted, b.accepted) == (1, 1)
            assert (len(a.requests), len(b.requests)) == (2, 2)
            assert transport.connections == 2


async def test_a_full_pool_evicts_another_origins_idle_connection_rather_than_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        async with upstream() as a, upstream() as b, make_pool(max_connections=1) as transport:
            assert await fetch(transport, a.url()) == (200, b"hello")
            start = trio.current_time()
            assert await fetch(transport, b.url(), pool=1.0) == (200, b"hello")
            assert trio.current_time() == start  # no wait at all
            await a.wait_eof(0)
            assert b.accepted == 1
            assert transport.connections == 1


async def test_eviction_takes_the_longest_idle_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        async with (
            upstream() as a,
            upstream() as b,
            upstream() as c,
            make_pool(max_connections=2) as transport,
        ):
            await fetch(transport, b.url())  # b's connection opened first ...
            await trio.sleep(1)
            await fetch(transport, a.url())
            await trio.sleep(1)
            await fetch(transport, b.url())  # ... but used last: a's is the longest idle
            await trio.sleep(1)
            await fetch(transport, c.url())
            await a.wait_eof(0)
            assert not b.peers[0].eof.is_set()
            await fetch(transport, b.url())
            assert b.accepted == 1
            assert transport.connections == 2


async def test_a_full_pool_does_not_evict_a_connection_in_use(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        async with upstream() as a, upstream() as b, make_pool(max_connections=1) as transport:
            held = await transport.handle_async_request(request(a.url()))
            with pytest.raises(httpx.PoolTimeout):
                await transport.handle_async_request(request(b.url(), pool=1.0))
            assert b.accepted == 0
            assert await held.aread() == b"hello"
            await held.aclose()
            assert not a.peers[0].eof.is_set()


async def test_chunks_already_received_come_out_together_and_unchanged() -> None:
    """An SSE stream sends a chunk per event; what one read brought is one step of the
    body (the relay's per-step cost is paid once per read, not per event), and the bytes
    are exactly those sent, in order. A chunk that arrives later is a step of its own."""
    events = [b"data: %d\n\n" % i for i in range(200)]
    later = trio.Event()

    async def chunked(peer: Peer) -> None:
        await peer.read_request()
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        head += b"transfer-encoding: chunked\r\n\r\n"
        await peer.send(head + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events))
        await later.wait()
        await peer.send(b"5\r\nlast\n\r\n0\r\n\r\n")
        await peer.wait_eof()

    with trio.fail_after(10):
        async with upstream(chunked) as up, make_pool() as transport:
            response = await transport.handle_async_request(request(up.url()))
            steps: list[bytes] = []
            try:
                async for step in response.aiter_raw():
                    steps.append(step)
                    if b"".join(steps) == b"".join(events):
                        later.set()
            finally:
                await response.aclose()
    assert b"".join(steps) == b"".join(events) + b"last\n"
    assert len(steps) < len(events) // 10, len(steps)
    assert steps[-1] == b"last\n"


async def test_two_requests_racing_for_an_evicted_slot_never_exceed_max_connections() -> None:
    """One request evicts an idle connection to make room; while the close yields, a
    second request must not take that same room too: the limit holds at every moment."""
    most = 0

    async def held(peer: Peer) -> None:  # answers, then keeps the body open
        nonlocal most
        most = max(most, transport.connections)
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhel")
        await peer.wait_eof()

    with trio.fail_after(10):
        async with (
            upstream() as a,
            upstream(held) as b,
            make_pool(max_connections=1) as transport,
        ):
            assert await fetch(transport, a.url()) == (200, b"hello")  # idle, to a
            responses: list[httpx.Response] = []
            timeouts: list[str] = []

            async def one() -> None:
                try:
                    responses.append(
                        await transport.handle_async_request(request(b.url(), pool=0.5))
                    )
                except httpx.PoolTimeout as exc:
                    timeouts.append(str(exc))
                most_now = transport.connections
                assert most_now <= 1, most_now

            async with trio.open_nursery() as nursery:
                nursery.start_soon(one)
                nursery.start_soon(one)
            assert len(responses) == 1
            assert len(timeouts) == 1
            assert b.accepted == 1
            assert most <= 1
            for response in responses:
                await response.aclose()


async def test_a_header_h11_refuses_is_named_without_its_value() -> None:
    """h11 quotes an invalid header's value in its error: that value may be a key."""
    secret = "sk-secret-value\r\nx: y"
    with trio.fail_after(10):
        async with upstream() as up, make_pool() as transport:
            bad = request(up.url())
            bad.headers["authorization"] = f"Bearer {secret}"
            with pytest.raises(httpx.LocalProtocolError) as caught:
                await transport.handle_async_request(bad)
            assert "sk-secret" not in str(caught.value)
            assert caught.value.__cause__ is None
            assert caught.value.__suppress_context__
            assert transport.connections == 0
