"""The fake WebSocket upstream does what it says, so passthrough tests built on it can be trusted.

trio-websocket's client against ``tests/fake_ws_upstream.py``: echo, the recorded
handshakes, the key check, scripted rejections, greetings, closes, drops, silence, a message
over the client's size limit, a slow handshake, back-pressure, and clients that vanish.

Most tests use :func:`ws_client` rather than ``open_websocket_url``, because of two defects
of trio-websocket 0.12.2's client that its docstring describes.
"""

from __future__ import annotations

import json
import math
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    DisconnectionTimeout,
    WebSocketConnection,
    open_websocket_url,
    wrap_client_stream,
)
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Ping, Pong, TextMessage

from ..fake_ws_upstream import FakeWsUpstream, Session, open_fake_ws_upstream

REALTIME = "/v1/realtime"
KEY_HEADER = (b"Authorization", b"Bearer sk-right")
CREATED = json.dumps({"type": "session.created", "session": {"id": "sess_1"}})


@asynccontextmanager
async def ws_client(
    url: str,
    *,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    max_message_size: int = 2**20,
    connect_timeout: float = 5.0,
) -> AsyncIterator[WebSocketConnection]:
    """trio-websocket's client over a TCP stream that this helper owns, and always closes.

    ``open_websocket_url`` (trio-websocket 0.12.2) leaves its TCP socket open, for the GC to
    find (a ResourceWarning, an error here), whenever the connection ends otherwise than by
    its own ``aclose()``: a server close, a drop, its own 1009, a rejected handshake. And
    its ``connect_timeout`` cancels the handshake but not the task reading the socket, so
    it neither returns nor raises ConnectionTimeout until the server closes the connection.
    Here the reading task runs in our nursery, which is cancelled on exit, and the stream
    is ours to close.
    """
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    try:
        async with trio.open_nursery() as nursery:
            ws: WebSocketConnection | None = None
            with trio.move_on_after(connect_timeout):
                ws = await wrap_client_stream(
                    nursery,
                    stream,
                    f"{parts.hostname}:{parts.port}",
                    resource,
                    extra_headers=extra_headers,
                    max_message_size=max_message_size,
                )
            if ws is None:
                raise ConnectionTimeout
            try:
                yield ws
            finally:
                with trio.move_on_after(5):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        raise error from None
    finally:
        await stream.aclose()


async def raw_upgrade(
    upstream: FakeWsUpstream, along: bytes = b""
) -> tuple[trio.SocketStream, bytes]:
    """A TCP connection that has done the opening handshake by hand, sending ``along``
    in the same write as the request: the stream, and what came after the 101 head."""
    parts = urlsplit(upstream.url)
    assert parts.hostname is not None
    assert parts.port is not None
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    await stream.send_all(
        b"GET /raw HTTP/1.1\r\nHost: fake\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n" + along
    )
    received = b""
    while b"\r\n\r\n" not in received:
        data = await stream.receive_some(4096)
        assert data, received
        received += data
    head, _, rest = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    return stream, rest


def reset_on_close(stream: trio.SocketStream) -> None:
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# --- echo, handshakes, keys, scripts --------------------------------------------------


async def test_echo_text_and_binary_then_client_close_code() -> None:
    with trio.fail_after(10):
        async with open_fake_ws_upstream() as upstream:
            async with open_websocket_url(upstream.url + REALTIME) as ws:
                await ws.send_message("hello")
                await ws.send_message(b"\x00\x01\xff")
                first = await ws.get_message()
                second = await ws.get_message()
                await ws.aclose(code=4000, reason="app done")
            await upstream.wait_connections_closed(1)
        assert first == "hello"
        assert second == b"\x00\x01\xff"
        assert upstream.received == ["hello", b"\x00\x01\xff"]
        assert upstream.messages_sent == 2
        assert upstream.close_codes == [(4000, "app done")]
        assert upstream.close_reasons == {0: "client-close"}


async def test_plain_client_exit_records_1000() -> None:
    with trio.fail_after(10):
        async with open_fake_ws_upstream() as upstream:
            async with ws_client(upstream.url) as ws:
                await ws.send_message("x" * 100_000)  # several frames' worth
                assert await ws.get_message() == "x" * 100_000
            await upstream.wait_connections_closed(1)
        assert upstream.close_codes == [(1000, None)]
        assert upstream.close_reasons == {0: "client-close"}


async def test_handshakes_recorded() -> None:
    with trio.fail_after(10):
        async with open_fake_ws_upstream() as upstream:
            headers = [KEY_HEADER, (b"OpenAI-Beta", b"realtime=v1"), (b"x-dup", b"1")]
            headers.append((b"x-dup", b"2"))
            async with ws_client(
                f"{upstream.url}{REALTIME}?model=gpt-fake&x=a%20b", extra_headers=headers
            ):
                pass
            async with ws_client(upstream.url):
                pass
            await upstream.wait_handshakes(2)
        first, second = upstream.handshakes
        assert first.path == REALTIME
        assert first.query == "model=gpt-fake&x=a%20b"
        assert first.key == "sk-right"
        assert first.connection == 0
        assert ("authorization", "Bearer sk-right") in first.headers
        assert ("openai-beta", "realtime=v1") in first.headers
        assert [v for name, v in first.headers if name == "x-dup"] == ["1", "2"]
        assert first.header("Host") == upstream.url.removeprefix("ws://")
        assert first.header("upgrade") == "websocket"
        assert first.header("sec-websocket-version") == "13"
        assert second.path == "/"
        assert second.query == ""
        assert second.key is None
        assert second.connection == 1


async def test_wrong_or_missing_key_rejected_with_401() -> None:
    with trio.fail_after(10):
        async with open_fake_ws_upstream(expected_key="sk-right") as upstream:
            rejections = []
            for headers in (
                [(b"Authorization", b"Bearer sk-wrong")],
                [],
                [(b"Authorization", b"sk-right")],
            ):
                with pytest.raises(ConnectionRejected) as info:
                    async with ws_client(upstream.url, extra_headers=headers):
                        pass
                rejections.append(info.value)
            async with ws_client(upstream.url, extra_headers=[KEY_HEADER]) as ws:
                await ws.send_message("in")
                assert await ws.get_message() == "in"
            await upstream.wait_connections_closed(4)
        for rejected in rejections:
            assert rejected.status_code == 401
            assert (b"content-type", b"application/json") in rejected.headers
            assert rejected.body is not None
            assert json.loads(rejected.body) == {
                "error": {
                    "message": "Incorrect API key provided",
                    "type": "invalid_request_error",
                    "code": "invalid_api_key",
                }
            }
        assert [seen.key for seen in upstream.handshakes] == ["sk-wrong", None, None, "sk-right"]
        assert upstream.close_reasons == {
            0: "rejected",
            1: "rejected",
            2: "rejected",
            3: "client-close",
        }


async def test_key_from_another_header_without_scheme() -> None:
    with trio.fail_after(10):
        async with open_fake_ws_upstream(
            "azure-key", auth_header="api-key", auth_scheme=None
        ) as upstream:
            async with ws_client(upstream.url, extra_headers=[(b"api-key", b"azure-key")]):
                pass
            await upstream.wait_handshakes(1)
        assert upstream.handshakes[0].key == "azure-key"


async def test_reject_status_with_headers() -> None:
    with trio.fail_after(10):
        async with open_fake_ws_upstream() as upstream:
            upstream.script(Session(reject_status=429, reject_headers=[("retry-after", "7")]))
            with pytest.raises(ConnectionRejected) as info:
                async with ws_client(upstream.url):
                    pass
            await upstream.wait_connections_closed(1)
        assert info.value.status_code == 429
        assert (b"retry-after", b"7") in info.value.headers
        assert info.value.body is not None
        assert json.loads(info.value.body)["error"]["type"] == "server_error"
        assert upstream.close_reasons == {0: "rejected"}


async def test_scripted_sessions_in_order_then_default() -> None:
    with trio.fail_after(10):
        async with open_fake_ws_upstream() as upstream:
            upstream.script(Session(reject_status=503, reject_body=b"busy"))
            upstream.script(Session(greeting=["hi"], echo=False))
            assert upstream.scripted_left == 2
            with pytest.raises(ConnectionRejected) as info:
                async with ws_client(upstream.url):
                    pass
            async with ws_client(upstream.url) as ws:
                assert await ws.get_message() == "hi"
                await ws.send_message("not echoed")
                await upstream.wait_received(1)
                with trio.move_on_after(0.1) as quiet:
                    await ws.get_message()
                assert quiet.cancelled_caught
            async with ws_client(upstream.url) as ws:
                await ws.send_message("echoed")
                assert await ws.get_message() == "echoed"
            assert upstream.scripted_left == 0
        assert info.value.status_code == 503
        assert info.value.body == b"busy"
        assert upstream.received == ["not echoed", "echoed"]


async def test_greeting_then_echo() -> None:
    with trio.fail_after(10):
        async with open_fake_ws_upstream() as upstream:
            upstream.script(Session(greeting=[CREATED, b"\x01\x02"]))
            async with ws_client(upstream.url + REALTIME) as ws:
                assert await ws.get_message() == CREATED
                assert await ws.get_message() == b"\x01\x02"
                await ws.send_message("after")
                assert await ws.get_message() == "after"
        assert upstream.messages_sent == 3


# --- how connections end ---------------------------------------------------------------


@pytest.mark.parametrize("after", [0, 1])
async def test_close_after_with_code_and_reason(after: int) -> None:
    with trio.fail_after(10):
        async with open_fake_ws_upstream() as upstream:
            upstream.script(
                Session(greeting=["hi"], close_after=after, close_code=4001, close_reason="bye")
            )
            async with ws_client(upstream.url) as ws:
                assert await ws.get_message() == "hi"
                if after:
                    await ws.send_message("one")
                    assert await ws.get_message() == "one"
                with pytest.raises(ConnectionClosed) as info:
                    await ws.get_message()
            await upstream.wait_connections_closed(1)
        assert info.value.reason is not None
        assert info.value.reason.code == 4001
        assert info.value.reason.reason == "bye"
        assert upstream.close_reasons == {0: "server-close"}
        assert upstream.close_codes == []  # the client's answer to our close is not recorded


async def test_drop_after_is_an_abnormal_closure() -> None:
    with trio.fail_after(10):
        async with open_fake_ws_upstream() as upstream:
            upstream.script(Session(drop_after=1))
            async with ws_client(upstream.url) as ws:
                await ws.send_message(b"one")
                assert await ws.get_message() == b"one"
                with pytest.raises(ConnectionClosed) as info:
                    await ws.get_message()
            await upstream.wait_connections_closed(1)
        assert info.value.reason is not None
        assert info.value.reason.code == 1006
        assert upstream.close_reasons == {0: "drop"}
        assert upstream.close_codes == []


async def talk_then_fall_silent(url: str, seen: dict[str, object]) -> None:
    """Echo one message, ping into the silence, leave (``open_websocket_url`` here: its
    close times out, and then it does close its socket)."""
    async with open_websocket_url(url, disconnect_timeout=0.2) as ws:
        await ws.ping(b"before")  # answered: not silent yet
        await ws.send_message("one")
        seen["echo"] = await ws.get_message()
        with trio.move_on_after(0.5) as unanswered:
            await ws.ping(b"after")
        seen["pong"] = not unanswered.cancelled_caught
        await ws.send_message("unread")


async def test_go_silent_after_leaves_pings_unanswered() -> None:
    seen: dict[str, object] = {}
    with trio.fail_after(10):
        async with open_fake_ws_upstream() as upstream:
            upstream.script(Session(go_silent_after=1))
            # The DisconnectionTimeout would also hide a failure inside: hence ``seen``.
            with pytest.raises(DisconnectionTimeout):
                await talk_then_fall_silent(upstream.url, seen)
            await upstream.wait_connections_closed(1)
        assert seen == {"echo": "one", "pong": False}
        assert upstream.received == ["one"]
        assert upstream.close_reasons == {0: "client-gone"}
        assert upstream.close_codes == []  # its close frame was never read


async def test_message_over_client_limit_is_closed_with_1009() -> None:
    with trio.fail_after(10):
        async with open_fake_ws_upstream() as upstream:
            upstream.script(Session(send_bytes_of=4000))
            async with ws_client(upstream.url, max_message_size=1000) as ws:
                with pytest.raises(ConnectionClosed) as info:
                    await ws.get_message()
            await upstream.wait_connections_closed(1)
        assert info.value.reason is not None
        assert info.value.reason.code == 1009
        assert upstream.close_codes == [(1009, "Exceeded maximum message size: 1000 bytes")]
        assert upstream.close_reasons == {0: "client-close"}


async def test_send_bytes_of_within_the_limit() -> None:
    with trio.fail_after(10):
        async with open_fake_ws_upstream() as upstream:
            upstream.script(Session(send_bytes_of=300_000))
            async with ws_client(upstream.url) as ws:
                message = await ws.get_message()
        assert isinstance(message, bytes)
        assert len(message) == 300_000


async def test_accept_delay() -> None:
    with trio.fail_after(10):
        async with open_fake_ws_upstream() as upstream:
            upstream.script(Session(accept_delay_s=math.inf), Session(accept_delay_s=0.05))
            with pytest.raises(ConnectionTimeout):
                async with ws_client(upstream.url, connect_timeout=0.2):
                    pass
            await upstream.wait_connections_closed(1)
            assert len(upstream.handshakes) == 1  # recorded, never answered
            async with ws_client(upstream.url) as ws:
                await ws.send_message("late")
                assert await ws.get_message() == "late"
        assert upstream.close_reasons == {0: "client-gone", 1: "client-close"}


# --- back-pressure and vanishing clients ---------------------------------------------


async def test_stream_messages_follow_the_reader() -> None:
    total, size = 2000, 64 * 1024
    with trio.fail_after(10):
        async with open_fake_ws_upstream() as upstream:
            upstream.script(Session(stream_messages=total, stream_message_bytes=size))
            async with ws_client(upstream.url) as ws:
                first = await ws.get_message()
                assert isinstance(first, bytes)
                assert len(first) == size
                # The client now reads no more: socket buffers fill, then the fake waits.
                await trio.sleep(0.3)
                stalled = upstream.messages_sent
                assert stalled < total
                read = 1
                while upstream.messages_sent == stalled:  # reading lets it go on
                    await ws.get_message()
                    read += 1
                assert read < total
            await upstream.wait_connections_closed(1)
        assert upstream.messages_sent < total
        assert upstream.close_reasons == {0: "client-close"}


async def test_ping_message_and_close_in_one_write() -> None:
    client = Connection(ConnectionType.CLIENT)
    frames = client.send(Ping(payload=b"p")) + client.send(TextMessage(data="m"))
    frames += client.send(CloseConnection(code=4002, reason="all at once"))
    with trio.fail_after(10):
        async with open_fake_ws_upstream() as upstream:
            stream, rest = await raw_upgrade(upstream)
            client.receive_data(rest)
            async with stream:
                await stream.send_all(frames)
                while data := await stream.receive_some(4096):
                    client.receive_data(data)
            await upstream.wait_connections_closed(1)
    events = list(client.events())
    assert events == [
        Pong(payload=b"p"),
        TextMessage(data="m"),
        CloseConnection(code=4002, reason="all at once"),
    ]
    assert upstream.close_codes == [(4002, "all at once")]
    assert upstream.close_reasons == {0: "client-close"}


async def test_frames_sent_along_with_the_handshake_are_read() -> None:
    client = Connection(ConnectionType.CLIENT)
    frames = client.send(TextMessage(data="eager")) + client.send(CloseConnection(code=1000))
    with trio.fail_after(10):
        async with open_fake_ws_upstream() as upstream:
            stream, rest = await raw_upgrade(upstream, along=frames)
            client.receive_data(rest)
            async with stream:
                while data := await stream.receive_some(4096):
                    client.receive_data(data)
            await upstream.wait_connections_closed(1)
    assert list(client.events()) == [TextMessage(data="eager"), CloseConnection(1000, "")]
    assert upstream.received == ["eager"]
    assert upstream.close_reasons == {0: "client-close"}


async def test_client_reset_mid_stream_is_quiet() -> None:
    with trio.fail_after(10):
        async with open_fake_ws_upstream() as upstream:
            upstream.script(Session(stream_messages=1000, stream_message_bytes=64 * 1024))
            stream, _ = await raw_upgrade(upstream)
            await upstream.wait_messages_sent(1)
            reset_on_close(stream)
            await stream.aclose()
            await upstream.wait_connections_closed(1)
        assert upstream.close_reasons == {0: "client-gone"}


async def test_client_gone_mid_conversation_is_quiet() -> None:
    with trio.fail_after(10):
        async with open_fake_ws_upstream() as upstream:
            stream, _ = await raw_upgrade(upstream)
            await stream.aclose()  # a FIN, no close frame
            await upstream.wait_connections_closed(1)
        assert upstream.handshakes[0].path == "/raw"
        assert upstream.close_reasons == {0: "client-gone"}
        assert upstream.close_codes == []


async def test_client_gone_mid_handshake_is_quiet() -> None:
    with trio.fail_after(10):
        async with open_fake_ws_upstream() as upstream:
            host, port = upstream.url.removeprefix("ws://").split(":")
            stream = await trio.open_tcp_stream(host, int(port))
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: fa")
            await stream.aclose()
            await upstream.wait_connections_closed(1)
        assert upstream.handshakes == []
        assert upstream.close_reasons == {0: "client-gone"}


async def test_plain_http_request_gets_400() -> None:
    with trio.fail_after(10):
        async with open_fake_ws_upstream() as upstream:
            host, port = upstream.url.removeprefix("ws://").split(":")
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: fake\r\n\r\n")
                answer = b""
                while data := await stream.receive_some(4096):
                    answer += data
            await upstream.wait_connections_closed(1)
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert upstream.handshakes == []
        assert upstream.close_reasons == {0: "bad-request"}
