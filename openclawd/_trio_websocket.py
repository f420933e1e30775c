"""The one reach below trio-websocket's public API; imported by ``websocket.py`` alone.

When wsproto finds an app's frame invalid (text that is not UTF-8: 1007; any other protocol
error: 1002) it hands trio-websocket a close event the app never sent, and trio-websocket
(0.12) then drops the TCP connection without a close frame: the app sees 1006 and no
reason, where RFC 6455 7.1.7 has a close frame with the code sent first. The public API
cannot express this: it all happens inside the connection's reader task, before
``get_message`` raises, and ``aclose`` cannot send from there (it waits on that very task
for the close handshake).

So, for the streams given to ``answer_invalid_frames`` only, trio-websocket's
``WebSocketConnection._handle_close_connection_event`` is wrapped: while ``_wsproto.state``
is still OPEN (no close frame has crossed either way; one the app sent leaves wsproto in
REMOTE_CLOSING, ours in LOCAL_CLOSING) our close frame, with wsproto's code and reason,
goes out first, through ``_send`` (wsproto's framing, behind the connection's write lock,
so it never lands inside a frame a writer is sending). ``_stream`` tells which connections
those are. These four names are all. pyproject.toml bounds trio-websocket to 0.12.x, and
tests/local/test_trio_websocket_adapter.py fails should any of them move or change (an app
would then be dropped without a close frame, as trio-websocket does; nothing else breaks).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection

from openclawd.protocol.closecodes import close_reason

__all__ = ["answer_invalid_frames"]

_answering: weakref.WeakSet[trio.abc.Stream] = weakref.WeakSet()
_library_handler = getattr(WebSocketConnection, "_handle_close_connection_event", None)


def answer_invalid_frames(stream: trio.abc.Stream) -> None:
    """The WebSocket about to be served over ``stream`` sends a close frame, with the code
    and reason, to a peer whose frame wsproto finds invalid (instead of dropping it)."""
    _answering.add(stream)


async def _handle_close_connection_event(self: Any, event: CloseConnection) -> None:
    """``WebSocketConnection._handle_close_connection_event``, first sending our close
    frame if the event is wsproto's verdict on an invalid frame from an answered peer."""
    if self._stream in _answering and self._wsproto.state is ConnectionState.OPEN:
        with contextlib.suppress(ConnectionClosed):
            await self._send(CloseConnection(event.code, close_reason(event.reason or "")))
    assert _library_handler is not None
    await _library_handler(self, event)


if _library_handler is not None:
    WebSocketConnection._handle_close_connection_event = _handle_close_connection_event  # type: ignore[method-assign]
