"""WebSocket upgrades on the data socket, with trio-websocket over an already-read head.

The front door reads each request head itself (h11) to route it and to refuse it with the
right answer; a WebSocket entry point then hands the connection to trio-websocket, which
must see the head again: ``ReplayStream`` gives it back the bytes already read. Owns the
upgrade check, accepting, refusing with a close code (CONTRACT.md 3.2's table) and closing
within a bounded time. Knows nothing of what runs over the WebSocket.
"""

from __future__ import annotations

import h11
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from openclawd.protocol.closecodes import close_reason

__all__ = [
    "Activity",
    "ConnectionClosed",
    "WebSocketConnection",
    "accept",
    "close",
    "is_upgrade",
]

# A peer that never answers our close frame is cut off after this long.
CLOSE_TIMEOUT_S = 2.0
# Messages trio-websocket holds for us before it stops reading the socket (back-pressure).
_QUEUE_SIZE = 4
_SEND_SLICE_BYTES = 64 * 1024


class Activity:
    """When the peer last showed it is alive: sent us bytes, or took some of ours."""

    def __init__(self) -> None:
        self.last = trio.current_time()

    def touch(self) -> None:
        self.last = trio.current_time()


class ReplayStream(trio.abc.Stream):
    """``stream``, with ``prefix`` (bytes already read from it) received first; every
    byte that moves either way is noted in ``activity``."""

    def __init__(self, stream: trio.SocketStream, prefix: bytes, activity: Activity) -> None:
        self._stream = stream
        self._prefix = prefix
        self.activity = activity

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            await trio.lowlevel.checkpoint()
            return data
        data = await self._stream.receive_some(max_bytes)
        self.activity.touch()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        # In slices, so a peer slowly reading a large frame still counts as alive.
        view = memoryview(data)
        for start in range(0, len(view), _SEND_SLICE_BYTES):
            await self._stream.send_all(view[start : start + _SEND_SLICE_BYTES])
            self.activity.touch()
        if not view:
            await self._stream.send_all(b"")

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


def is_upgrade(request: h11.Request) -> bool:
    """Does this request head ask for a WebSocket (RFC 6455 4.2.1)?"""
    headers = {name: value for name, value in request.headers}
    tokens = {t.strip() for t in headers.get(b"connection", b"").lower().split(b",")}
    return (
        request.method == b"GET"
        and headers.get(b"upgrade", b"").lower() == b"websocket"
        and b"upgrade" in tokens
        and headers.get(b"sec-websocket-version") == b"13"
        and bool(headers.get(b"sec-websocket-key"))
    )


async def accept(
    nursery: trio.Nursery,
    stream: trio.SocketStream,
    head: bytes,
    *,
    max_message_bytes: int,
    activity: Activity,
) -> WebSocketConnection:
    """Complete the handshake of the request whose bytes ``head`` were already read.

    ``nursery`` runs the connection's reader task; it must outlive the WebSocket.
    Raises:
        ConnectionClosed: the peer left during the handshake.
    """
    request = await wrap_server_stream(
        nursery,
        ReplayStream(stream, head, activity),
        message_queue_size=_QUEUE_SIZE,
        max_message_size=max_message_bytes,
    )
    return await request.accept()


async def close(ws: WebSocketConnection, code: int, reason: str) -> None:
    """Close with ``code`` and ``reason`` (cut to 123 bytes); never waits more than
    ``CLOSE_TIMEOUT_S`` for the peer. Safe to call from a cancelled task."""
    with trio.move_on_after(CLOSE_TIMEOUT_S) as scope:
        scope.shield = True
        await ws.aclose(code, close_reason(reason))
