"""WebSockets, both ends, with trio-websocket: only this module and its adapter import it.

trio-websocket is used through its public API: the data socket's front door reads each
request head itself (h11) to route it and to refuse it with the right answer; a WebSocket
entry point then hands the connection to ``wrap_server_stream``, which must see the head
again: ``ActivityStream`` gives it back the bytes already read. Upstream sessions
(``/v1/realtime``) are opened with ``wrap_client_stream`` over a stream the caller
connected itself (TCP, TLS), so a refused certificate is reported as what it is. Where a
peer's messages begin and end (for ``message_timeout_s``) is read off the bytes it sends,
below trio-websocket. The one behaviour its public API cannot express, an app told why its
frame was invalid, is fenced in ``openclawd._trio_websocket`` (imported here alone).

Owns: the upgrade check, accepting, connecting (and turning a refused handshake into
``UpstreamRejectedError``), watching a WebSocket (``liveness.py`` decides) and closing
within a bounded time. Knows nothing of what runs over the WebSockets.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence

import h11
import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
    wrap_server_stream,
)
from wsproto.utilities import ProtocolError

from openclawd import liveness
from openclawd._trio_websocket import answer_invalid_frames
from openclawd.errors import UpstreamConnectionError, UpstreamRejectedError
from openclawd.liveness import Activity, Verdict, socket_of, unsent_bytes
from openclawd.protocol.closecodes import close_reason, handshake_refusal, sendable
from openclawd.protocol.wsframes import PeerBytes

__all__ = [
    "Activity",
    "ActivityStream",
    "Sender",
    "Verdict",
    "CloseReason",
    "ConnectionClosed",
    "WebSocketConnection",
    "accept",
    "close",
    "closed_as_sent",
    "connect",
    "is_upgrade",
    "over_limit",
    "watch",
]

# A peer that never answers our close frame is cut off after this long.
CLOSE_TIMEOUT_S = 2.0
# When the daemon cuts a connection its reader is gone: the close frame is sent, and the
# connection closed right behind it.
CUT_CLOSE_WAIT_S = 0.2
# Messages trio-websocket holds for us before it stops reading the socket (back-pressure).
QUEUE_SIZE = 4
_SEND_SLICE_BYTES = 64 * 1024
_RECEIVE_BYTES = 64 * 1024


class ActivityStream(trio.abc.Stream):
    """``stream``, with ``prefix`` (bytes already read from it) received first; every
    byte that moves either way is noted in ``activity``.

    If ``activity.message_timeout_s`` is finite, the peer's frames are read as they pass
    (``protocol.wsframes.PeerBytes``): once whoever reads (trio-websocket's reader) has
    part of a message and asks for more, the message is unfinished
    (``Activity.message_part``) until bytes that finish it come. Not before that ask:
    the time a reader spends queueing the messages that came before it is ours, not the
    peer's.

    Between ``hold()`` and ``release()`` what is sent is gathered (up to
    ``_SEND_SLICE_BYTES``, past which it goes out at once) and goes out with the first
    send after ``release()``: a burst of small messages costs one system call, not one
    each (``Sender.send_batch``)."""

    def __init__(self, stream: trio.abc.Stream, activity: Activity, prefix: bytes = b"") -> None:
        self._stream = stream
        self._prefix = prefix
        self.activity = activity
        # Frames are read for the message deadline (an app's) and for the close frame
        # as the peer sent it (``closed_as_sent``).
        self._timed = activity.message_timeout_s < math.inf
        self._peer = PeerBytes(frames=True)
        self._ended = trio.Event()
        self._held = bytearray()
        self._holding = False
        socket_ = socket_of(stream)
        if socket_ is not None:
            activity.observe(functools.partial(unsent_bytes, socket_))

    @property
    def close_frame(self) -> tuple[int, str] | None:
        """The code and reason of the close frame the peer sent, as sent (a server's)."""
        return self._peer.close_frame

    @property
    def head(self) -> bytes:
        """The HTTP head the peer sent (a request, or an answer to ours), once whole."""
        return b"" if self._peer.in_head else bytes(self._peer.head)

    async def wait_ended(self) -> None:
        """Until the stream ends: the peer closed it, it broke, or it was closed here."""
        await self._ended.wait()

    def hold(self) -> None:
        self._holding = True

    def release(self) -> None:
        """Stop gathering; what was gathered goes out with the next send."""
        self._holding = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            head, self._prefix = self._prefix, b""
            self._peer.feed(head)
            await trio.lowlevel.checkpoint()
            return head
        if self._timed and not self._peer.between_messages:
            self.activity.message_part(finished=False)
        try:
            data = await self._stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._ended.set()
            raise
        self.activity.touch()
        if not data:
            self._ended.set()
        self._peer.feed(data)
        if self._timed and self._peer.between_messages:
            self.activity.message_part(finished=True)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._holding and len(self._held) + len(data) <= _SEND_SLICE_BYTES:
            self._held += data
            return
        if self._held:
            data = bytes(self._held) + data
            self._held.clear()
        # In slices, so a peer slowly reading a large frame still counts as alive.
        view = memoryview(data)
        try:
            for start in range(0, len(view), _SEND_SLICE_BYTES):
                await self._stream.send_all(view[start : start + _SEND_SLICE_BYTES])
                self.activity.touch()
            if not view:
                await self._stream.send_all(b"")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._ended.set()
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self._ended.set()
        await self._stream.aclose()


class Sender:
    """Sends whole messages on ``ws``: a cancel never cuts one in half on the wire (the
    frames after it, the close frame included, would be garbage to the peer). Once
    ``stop()`` is called, a send under way has ``CLOSE_TIMEOUT_S`` left to finish; a peer
    that takes longer than that is not reading, and its frame is cut after all."""

    def __init__(self, ws: WebSocketConnection, wire: ActivityStream | None = None) -> None:
        """``wire`` is the stream under ``ws``: given, ``send_batch`` gathers its
        messages into one write."""
        self.ws = ws
        self._wire = wire
        self._sending: trio.CancelScope | None = None
        self._stop_at = math.inf

    async def send(self, message: str | bytes) -> None:
        """Raises:
        ConnectionClosed: the WebSocket is closed.

        Cancellation: deferred until the message is out (bounded once ``stop()`` is
        called), then raised.
        """
        await self.send_batch((message,))

    async def send_batch(self, messages: Sequence[str | bytes]) -> None:
        """``send`` each of ``messages``, in order, in as few writes as they fit in.

        Raises and cancellation: as ``send``.
        """
        with trio.CancelScope(shield=True, deadline=self._stop_at) as scope:
            self._sending = scope
            wire = self._wire if len(messages) > 1 else None
            try:
                if wire is not None:
                    wire.hold()
                for index, message in enumerate(messages):
                    if wire is not None and index == len(messages) - 1:
                        wire.release()  # the last one takes the others with it
                    await self.ws.send_message(message)
            finally:
                if wire is not None:
                    wire.release()
                self._sending = None
        await trio.lowlevel.checkpoint_if_cancelled()

    def stop(self) -> None:
        """The session is ending: bound the send under way, and any after it."""
        self._stop_at = min(self._stop_at, trio.current_time() + CLOSE_TIMEOUT_S)
        if self._sending is not None:
            self._sending.deadline = self._stop_at


def over_limit(message: str | bytes, limit: int) -> bool:
    """Is ``message`` over ``limit`` bytes? trio-websocket's own check counts ``len()``,
    characters for a text message: up to four times the bytes on the wire."""
    return isinstance(message, str) and len(message) * 4 > limit and len(message.encode()) > limit


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
    nursery: trio.Nursery, wire: ActivityStream, *, max_message_bytes: int
) -> WebSocketConnection:
    """Complete the handshake over ``wire``, whose prefix is the request already read.

    ``nursery`` runs the connection's reader task; it must outlive the WebSocket. An app
    whose frame is invalid is told why in a close frame (``answer_invalid_frames``).
    Raises:
        ConnectionClosed: the peer left during the handshake.
    """
    answer_invalid_frames(wire)
    request = await wrap_server_stream(
        nursery,
        wire,
        message_queue_size=QUEUE_SIZE,
        max_message_size=max_message_bytes,
        receive_buffer_size=_RECEIVE_BYTES,
    )
    return await request.accept()


async def connect(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    *,
    host: str,
    resource: str,
    headers: Sequence[tuple[str, str]],
    max_message_bytes: int,
) -> WebSocketConnection:
    """The client handshake over ``stream`` (already connected, TLS done): ``host`` is the
    Host header, ``resource`` the path and query.

    ``nursery`` runs the connection's reader task; it must outlive the WebSocket. The caller
    bounds the time this takes.
    Raises:
        UpstreamRejectedError: the server answered with an HTTP status instead of 101; the
            message names the status (and a Retry-After), never the body.
        UpstreamConnectionError: the connection closed during the handshake.
    """
    wire = stream if isinstance(stream, ActivityStream) else ActivityStream(stream, Activity())
    extra_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    try:
        ws: WebSocketConnection | None = await nursery.start(
            _run_client, wire, host, resource, extra_headers, max_message_bytes
        )
    except* ConnectionRejected as group:
        rejected = _first(group)
        raise _rejected(rejected.status_code, rejected.headers) from None
    except* (h11.ProtocolError, ProtocolError):
        # A 101 that is not a valid handshake, or no HTTP at all: trio-websocket's reader
        # fails on it (h11 or wsproto's error), before the connection is handed over.
        raise UpstreamConnectionError("upstream's answer is not a WebSocket handshake") from None
    if ws is not None:
        return ws  # maybe closed already: what it sent, and its close, are still to be read
    # A refusal whose body ends with the connection (no length, not chunked) never raises
    # ConnectionRejected: trio-websocket's reader stops at the end of the stream, the body
    # unfinished. The status is in the head all the same.
    answer = _answer(wire.head)
    if answer is not None:
        raise _rejected(answer.status_code, answer.headers)
    raise UpstreamConnectionError("upstream closed the connection during the handshake")


async def _run_client(
    wire: ActivityStream,
    host: str,
    resource: str,
    extra_headers: list[tuple[bytes, bytes]],
    max_message_bytes: int,
    *,
    task_status: trio.TaskStatus[WebSocketConnection | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a client connection's reader task, in a nursery of its own, until it ends: a
    refusal it raises reaches ``connect`` (through ``nursery.start``), not the caller's
    nursery. Started with the connection, or None if the stream ended first."""
    async with trio.open_nursery() as reader:
        ws: WebSocketConnection | None = None
        async with trio.open_nursery() as handshake:

            async def give_up_when_the_wire_ends() -> None:
                await wire.wait_ended()
                handshake.cancel_scope.cancel()

            handshake.start_soon(give_up_when_the_wire_ends)
            # ``stream`` is annotated SocketStream | SSLStream; documented (and working) as any
            # trio Stream.
            ws = await wrap_client_stream(
                reader,
                wire,  # type: ignore[arg-type]
                host,
                resource,
                extra_headers=extra_headers,
                message_queue_size=QUEUE_SIZE,
                max_message_size=max_message_bytes,
                receive_buffer_size=_RECEIVE_BYTES,
            )
            handshake.cancel_scope.cancel()
        task_status.started(ws)


def _first(group: BaseExceptionGroup[ConnectionRejected]) -> ConnectionRejected:
    first = group.exceptions[0]
    return first if isinstance(first, ConnectionRejected) else _first(first)


def _answer(head: bytes) -> h11.Response | None:
    """The final HTTP answer (not a 101) whose head is ``head``, to a GET; None if none."""
    if not head:
        return None
    http = h11.Connection(h11.CLIENT)
    http.send(h11.Request(method="GET", target="/", headers=[("host", "upstream")]))
    http.receive_data(head)
    try:
        event = http.next_event()
    except h11.RemoteProtocolError:
        return None
    return event if isinstance(event, h11.Response) else None


def _rejected(status: int, headers: Iterable[tuple[bytes, bytes]]) -> UpstreamRejectedError:
    message = f"upstream {status}"
    retry_after = dict(headers).get(b"retry-after")
    if status == 429 and retry_after and retry_after.strip().isdigit():
        message += f", retry after {int(retry_after)}s"
    return UpstreamRejectedError(message, status=status, close_code=handshake_refusal(status))


def closed_as_sent(ws: WebSocketConnection, wire: ActivityStream) -> CloseReason | None:
    """How ``ws`` (a client's, over ``wire``) was closed: ``ws.closed``, except where
    wsproto refused the peer's close code because it does not know it (1014 "Bad
    Gateway", registered after wsproto's table) and reports 1002 instead: then the code
    and reason the peer's close frame carried, read off the bytes."""
    closed = ws.closed
    sent = wire.close_frame
    if closed is not None and closed.code == 1002 and sent is not None and sendable(sent[0]):
        return CloseReason(sent[0], sent[1])
    return closed


class _Peer:
    """A WebSocket as ``liveness.watch`` looks after it."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws

    @property
    def closed(self) -> bool:
        return self._ws.closed is not None

    async def ping(self) -> bool:
        try:
            await self._ws.ping()
        except ConnectionClosed:
            return False
        return True


async def watch(
    ws: WebSocketConnection,
    activity: Activity,
    *,
    interval_s: float,
    timeout_s: float,
    excused: Callable[[], bool] = lambda: False,
) -> Verdict:
    """``liveness.watch`` over ``ws``: ping it whenever it has been quiet for
    ``interval_s``; returns ``"silent"``, ``"unfinished"`` or ``"closed"`` (see there)."""
    return await liveness.watch(
        _Peer(ws), activity, interval_s=interval_s, timeout_s=timeout_s, excused=excused
    )


async def close(
    ws: WebSocketConnection, code: int, reason: str, *, wait_s: float = CLOSE_TIMEOUT_S
) -> None:
    """Close with ``code`` and ``reason`` (cut to 123 bytes); never waits more than
    ``wait_s`` for the peer. Safe to call from a cancelled task."""
    with trio.move_on_after(wait_s) as scope:
        scope.shield = True
        await ws.aclose(code, close_reason(reason))
