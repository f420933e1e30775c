"""``openclawd/_trio_websocket.py``, the one reach below trio-websocket's public API: an app
whose frame wsproto finds invalid is sent a close frame with the code and reason before the
connection is closed (trio-websocket alone drops it: 1006 to the app).

The private names it relies on are checked first, so that a trio-websocket release that
moves or changes them fails here by name; then the behaviour, over in-memory streams with
a raw client that writes frames by hand.
"""

from __future__ import annotations

import inspect
import os
import struct
from collections.abc import Callable

import pytest
import trio
import trio.testing
from trio_websocket import WebSocketConnection, wrap_server_stream
from wsproto import WSConnection
from wsproto.connection import ConnectionState

from openclawd import _trio_websocket, websocket
from openclawd.websocket import Activity, ActivityStream

UPGRADE = (
    b"GET / HTTP/1.1\r\nhost: openclawd\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
    b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
)


def frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> bytes:
    """One frame as a client writes it (masked, unless told), any payload size."""
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if masked else 0
    if len(payload) < 126:
        head = struct.pack("!BB", first, mask_bit | len(payload))
    elif len(payload) < 1 << 16:
        head = struct.pack("!BBH", first, mask_bit | 126, len(payload))
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, len(payload))
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The (unmasked, short) frames a server sent: (opcode, payload) each."""
    frames = []
    while data:
        length = data[1] & 0x7F
        assert length < 126, "a long frame: not expected here"
        frames.append((data[0] & 0x0F, data[2 : 2 + length]))
        data = data[2 + length :]
    return frames


async def upgrade(peer: trio.abc.Stream) -> None:
    """Send the upgrade request and read the 101, byte by byte (nothing past it)."""
    await peer.send_all(UPGRADE)
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += await peer.receive_some(1)
    assert head.startswith(b"HTTP/1.1 101 ")


async def read_to_end(peer: trio.abc.Stream) -> bytes:
    received = b""
    while data := await peer.receive_some():
        received += data
    return received


async def served(
    nursery: trio.Nursery, *, answered: bool = True
) -> tuple[WebSocketConnection, ActivityStream, trio.abc.Stream]:
    """Our WebSocket (``websocket.accept``; or, not ``answered``, trio-websocket's own
    ``wrap_server_stream``) over one end of an in-memory pair; the raw peer on the other,
    past the handshake."""
    ours, peer = trio.testing.memory_stream_pair()
    wire = ActivityStream(ours, Activity())
    accepted: list[WebSocketConnection] = []

    async def serve() -> None:
        if answered:
            accepted.append(await websocket.accept(nursery, wire, max_message_bytes=1 << 20))
        else:
            request = await wrap_server_stream(nursery, wire)
            accepted.append(await request.accept())

    async with trio.open_nursery() as handshake:
        handshake.start_soon(serve)
        await upgrade(peer)
    return accepted[0], wire, peer


# -- the private names ------------------------------------------------------------------


def parameters(function: Callable[..., object]) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_the_handler_it_wraps_is_where_it_was_and_takes_the_same_arguments() -> None:
    handler = _trio_websocket._library_handler
    assert handler is not None, "WebSocketConnection._handle_close_connection_event is gone"
    assert inspect.iscoroutinefunction(handler)
    assert parameters(handler) == ["self", "event"]
    assert (
        WebSocketConnection._handle_close_connection_event
        is _trio_websocket._handle_close_connection_event
    ), "not installed"


def test_the_send_it_calls_takes_one_wsproto_event() -> None:
    send = getattr(WebSocketConnection, "_send", None)
    assert send is not None, "WebSocketConnection._send is gone"
    assert inspect.iscoroutinefunction(send)
    assert parameters(send) == ["self", "event"]


async def test_a_connection_keeps_its_stream_and_wsproto_where_it_reads_them() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ws, wire, _ = await served(nursery)
            assert getattr(ws, "_stream", None) is wire
            wsproto = getattr(ws, "_wsproto", None)
            assert isinstance(wsproto, WSConnection)
            assert wsproto.state is ConnectionState.OPEN
            nursery.cancel_scope.cancel()


# -- the behaviour ----------------------------------------------------------------------

INVALID = {
    "text-not-utf8": (frame(0x1, b'{"type":"\xff\xfe"}'), 1007),
    "text-not-utf8-across-fragments": (
        frame(0x1, b"caf\xc3", fin=False) + frame(0x0, b"\x28"),
        1007,
    ),
    "unmasked": (frame(0x1, b"hello", masked=False), 1002),
    "reserved-opcode": (frame(0x3, b"?"), 1002),
    "continuation-without-a-start": (frame(0x0, b"more"), 1002),
    "fragmented-ping": (frame(0x9, b"p", fin=False), 1002),
    "close-code-1005": (frame(0x8, close_payload(1005)), 1002),
}


@pytest.mark.parametrize(("data", "code"), INVALID.values(), ids=INVALID.keys())
async def test_an_invalid_frame_is_answered_with_a_close_frame_then_the_end(
    data: bytes, code: int
) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ws, _, peer = await served(nursery)
            await peer.send_all(data)
            frames = server_frames(await read_to_end(peer))
            assert [opcode for opcode, _ in frames] == [0x8]  # one close frame, then the end
            payload = frames[0][1]
            assert int.from_bytes(payload[:2], "big") == code
            assert payload[2:], "no reason"
            assert ws.closed is not None
            assert ws.closed.code == code
            nursery.cancel_scope.cancel()


async def test_a_close_the_app_sends_is_answered_once() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ws, _, peer = await served(nursery)
            await peer.send_all(frame(0x8, close_payload(1000, b"bye")))
            frames = server_frames(await read_to_end(peer))
            assert frames == [(0x8, close_payload(1000, b"bye"))]  # the echo, once
            assert ws.closed is not None
            assert ws.closed.code == 1000
            nursery.cancel_scope.cancel()


async def test_after_our_close_an_invalid_frame_gets_no_second_close_frame() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ws, _, peer = await served(nursery)
            nursery.start_soon(websocket.close, ws, 1001, "going away")
            received = b""
            while len(received) < 2 or len(received) < 2 + (received[1] & 0x7F):
                received += await peer.receive_some()
            assert server_frames(received) == [(0x8, close_payload(1001, b"going away"))]
            await peer.send_all(frame(0x1, b"\xff"))  # not an answer, and not UTF-8
            assert await read_to_end(peer) == b""  # no second close frame
            nursery.cancel_scope.cancel()


async def test_a_connection_not_answered_keeps_trio_websockets_behaviour() -> None:
    """Only the streams given to ``answer_invalid_frames`` are answered. Also the reason
    the adapter exists: should this fail, trio-websocket sends the close frame itself,
    and the adapter can go."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ws, _, peer = await served(nursery, answered=False)
            await peer.send_all(frame(0x1, b"\xff"))
            assert await read_to_end(peer) == b""  # dropped, no close frame
            assert ws.closed is not None
            assert ws.closed.code == 1007
            nursery.cancel_scope.cancel()
