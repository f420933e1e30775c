"""``websocket.connect``: the client handshake through trio-websocket's public API
(``wrap_client_stream``), every outcome turned into ours: the connection; a refusal
(``UpstreamRejectedError``, whether trio-websocket raised ``ConnectionRejected`` or its
reader stopped at the end of a body that ends with the connection); a peer gone or an
answer that is no handshake (``UpstreamConnectionError``). The caller's nursery, which runs
the reader, never sees a refusal. In memory, against a server written with wsproto.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from openclawd import websocket
from openclawd.errors import UpstreamConnectionError, UpstreamRejectedError
from openclawd.protocol.closecodes import CloseCode
from openclawd.websocket import Activity, ActivityStream, ConnectionClosed


async def request_head(server: trio.abc.Stream) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        data = await server.receive_some()
        assert data, "closed before a whole request"
        head += data
    return head


async def answer(server: trio.abc.Stream, data: bytes, *, then_close: bool) -> None:
    """Read the upgrade request, answer ``data``, and close or stay."""
    await request_head(server)
    await server.send_all(data)
    if then_close:
        await server.aclose()
    else:
        await trio.sleep_forever()


async def connect(nursery: trio.Nursery, stream: trio.abc.Stream) -> websocket.WebSocketConnection:
    return await websocket.connect(
        nursery,
        ActivityStream(stream, Activity()),
        host="upstream.test",
        resource="/v1/realtime?model=m",
        headers=[("authorization", "Bearer k")],
        max_message_bytes=1 << 20,
    )


REFUSALS = {
    "401-body-ends-with-the-connection": (
        b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n"
        b"connection: close\r\n\r\n"
        b'{"error":{"message":"Incorrect API key provided"}}',
        True,
        "upstream 401",
        CloseCode.POLICY,
    ),
    "429-with-a-length": (
        b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\ncontent-length: 4\r\n\r\nslow",
        False,
        "upstream 429, retry after 7s",
        CloseCode.TRY_AGAIN,
    ),
    "429-body-ends-with-the-connection": (
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\n\r\nslow",
        True,
        "upstream 429, retry after 3s",
        CloseCode.TRY_AGAIN,
    ),
    "503-no-body": (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n",
        False,
        "upstream 503",
        CloseCode.BAD_GATEWAY,
    ),
    "403-chunked": (
        b"HTTP/1.1 403 Forbidden\r\ntransfer-encoding: chunked\r\n\r\n3\r\nno!\r\n0\r\n\r\n",
        False,
        "upstream 403",
        CloseCode.POLICY,
    ),
}


@pytest.mark.parametrize(
    ("data", "then_close", "message", "close_code"), REFUSALS.values(), ids=REFUSALS.keys()
)
async def test_a_refusal_is_an_upstream_rejected_error_and_the_callers_nursery_lives_on(
    data: bytes, then_close: bool, message: str, close_code: CloseCode
) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ours, server = trio.testing.memory_stream_pair()
            nursery.start_soon(lambda: answer(server, data, then_close=then_close))
            with pytest.raises(UpstreamRejectedError) as caught:
                await connect(nursery, ours)
            assert str(caught.value) == message
            assert caught.value.status == int(data.split()[1])
            assert caught.value.close_code == close_code
            assert not nursery.cancel_scope.cancel_called
            nursery.cancel_scope.cancel()


NOT_A_HANDSHAKE = {
    "gone-without-an-answer": b"",
    "101-without-its-headers": b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    "not-http": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
}


@pytest.mark.parametrize("data", NOT_A_HANDSHAKE.values(), ids=NOT_A_HANDSHAKE.keys())
async def test_no_handshake_is_an_upstream_connection_error(data: bytes) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ours, server = trio.testing.memory_stream_pair()
            nursery.start_soon(lambda: answer(server, data, then_close=True))
            with pytest.raises(UpstreamConnectionError):
                await connect(nursery, ours)
            assert not nursery.cancel_scope.cancel_called
            nursery.cancel_scope.cancel()


async def accept(server: trio.abc.Stream, *then: TextMessage | CloseConnection) -> WSConnection:
    """Accept the upgrade with wsproto, then send ``then``; returns the connection."""
    ws = WSConnection(ConnectionType.SERVER)
    ws.receive_data(await request_head(server))
    events = list(ws.events())
    assert isinstance(events[0], Request)
    assert events[0].target == "/v1/realtime?model=m"
    assert (b"authorization", b"Bearer k") in events[0].extra_headers
    data = ws.send(AcceptConnection())
    for event in then:
        data += ws.send(event)
    await server.send_all(data)
    return ws


async def test_an_accepted_handshake_is_a_connection_whose_reader_runs_in_the_nursery() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ours, server = trio.testing.memory_stream_pair()
            accepted: list[WSConnection] = []

            async def serve() -> None:
                accepted.append(await accept(server, TextMessage("hello")))

            nursery.start_soon(serve)
            ws = await connect(nursery, ours)
            assert await ws.get_message() == "hello"
            await ws.send_message("hi")
            accepted[0].receive_data(bytes(await server.receive_some()))
            assert [e.data for e in accepted[0].events() if isinstance(e, TextMessage)] == ["hi"]
            nursery.cancel_scope.cancel()


async def test_an_upstream_that_accepts_and_closes_at_once_is_still_a_connection() -> None:
    """What it sent, and its close, are the caller's to read."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ours, server = trio.testing.memory_stream_pair()

            async def serve() -> None:
                await accept(server, TextMessage("last"), CloseConnection(4001, "expired"))
                await server.aclose()

            nursery.start_soon(serve)
            ws = await connect(nursery, ours)
            assert await ws.get_message() == "last"
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason is not None
            assert (closed.value.reason.code, closed.value.reason.reason) == (4001, "expired")
            nursery.cancel_scope.cancel()
