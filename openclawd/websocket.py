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
``UpstreamRejectedError``), liveness (``Activity``, ``watch``) and closing within a bounded
time. Knows nothing of what runs over the WebSockets.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import math
import re
import struct
import termios
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal

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

from openclawd._trio_websocket import answer_invalid_frames
from openclawd.errors import UpstreamConnectionError, UpstreamRejectedError
from openclawd.protocol.closecodes import close_reason, handshake_refusal

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
# How often, per ping timeout, a peer that owes a pong has its backlog looked at. While a
# writer is blocked on it, the backlog is a sawtooth: it falls as the peer reads, and jumps
# back when the writer refills it (after half the buffer is free, for a unix socket). Two
# looks a timeout apart can see the same height; looks closer together see it fall.
_BACKLOG_SAMPLES = 8
_RECEIVE_BYTES = 64 * 1024


class Activity:
    """When the peer last showed it is alive: sent us bytes, or took some of ours; and,
    for an app's connection, since when it has left a message unfinished.

    A peer that sends a message a byte at a time (slowloris) is alive by every byte, so
    liveness alone never cuts it off: a message must also be finished within
    ``message_timeout_s`` of its first byte (``watch`` enforces both). An
    ``ActivityStream`` over an activity whose ``message_timeout_s`` is finite reads where
    the peer's messages begin and end off the bytes, and reports them (``message_part``);
    ``received`` and ``control_frame`` serve a reporter that sees only bytes, or frames.
    """

    def __init__(self, *, message_timeout_s: float = math.inf) -> None:
        self.last = trio.current_time()
        self.message_timeout_s = message_timeout_s
        self.unfinished_since = math.inf  # the first byte of what is not finished yet
        self._in_message = False  # a data message has begun (a frame of it was parsed)
        self._alarm: trio.CancelScope | None = None  # the waiting watch's, if it waits
        self._backlog: Callable[[], int | None] | None = None
        self._last_backlog: int | None = None

    def touch(self) -> None:
        self.last = trio.current_time()

    def received(self) -> None:
        """Bytes came: a sign of life, and the start of a message if none was under way
        (they may be a whole message: ``message_part`` then ends it at once)."""
        self.last = trio.current_time()
        self._begin()

    def message_part(self, *, finished: bool) -> None:
        """A data frame, or part of one, was parsed; ``finished``: its message is whole."""
        self._in_message = not finished
        if finished:
            self.unfinished_since = math.inf
        else:
            self._begin()

    def control_frame(self) -> None:
        """A ping, pong or close was parsed: finished, unless it came inside a message."""
        if not self._in_message:
            self.unfinished_since = math.inf

    @property
    def message_deadline(self) -> float:
        """When what the peer began must be finished by (inf: nothing under way)."""
        return self.unfinished_since + self.message_timeout_s

    @contextlib.contextmanager
    def waiting_until(self, deadline: float) -> Iterator[trio.CancelScope]:
        """``trio.move_on_at(deadline)``, moved earlier to ``message_deadline`` as soon as
        it comes first, even if the message begins during the wait."""
        with trio.move_on_at(min(deadline, self.message_deadline)) as scope:
            self._alarm = scope
            try:
                yield scope
            finally:
                self._alarm = None

    def _begin(self) -> None:
        if self.unfinished_since == math.inf:
            self.unfinished_since = trio.current_time()
            if self._alarm is not None:
                self._alarm.deadline = min(self._alarm.deadline, self.message_deadline)

    def observe(self, backlog: Callable[[], int | None]) -> None:
        """``backlog()``: the bytes sent that the peer has not taken yet (None: unknown).
        A send may wait long behind a slow reader; the backlog shrinking in the meantime
        shows that reader alive all the same."""
        self._backlog = backlog

    def check(self) -> None:
        """Touch if the peer has taken some of its backlog since the last check."""
        if self._backlog is None:
            return
        backlog = self._backlog()
        if backlog is not None and self._last_backlog is not None and backlog < self._last_backlog:
            self.touch()
        self._last_backlog = backlog


class _PeerBytes:
    """Where a peer's messages begin and end, read off the bytes it sends: its HTTP head,
    kept (a refused handshake's status is in it), then, if ``frames``, WebSocket frames
    (RFC 6455 5.2), of which only the headers are read: payloads are counted past.

    trio-websocket's public API hands over whole messages only; it never says that one
    has begun, so the stream below it reads the framing itself. Validating is wsproto's:
    bytes that are not valid frames end the connection there, whatever is read here.
    """

    def __init__(self, *, frames: bool) -> None:
        self.head = bytearray()
        self.in_head = True
        self._frames = frames
        self._header = bytearray()  # a frame header begun, not whole yet
        self._left = 0  # payload bytes of the current frame still to come
        self._fragmented = False  # a data frame without FIN came: its message goes on

    @property
    def between_messages(self) -> bool:
        """Nothing begun is unfinished: no message, frame or frame header under way."""
        return not (self._left or self._header or self._fragmented)

    def feed(self, data: bytes | bytearray) -> None:
        if self.in_head:
            data = self._feed_head(data)
        if self._frames:
            self._feed_frames(data)

    def _feed_head(self, data: bytes | bytearray) -> bytes:
        """Keeps the head; returns what follows it in ``data``."""
        start = max(0, len(self.head) - 2)  # the blank line may straddle two reads
        self.head += data
        blank = _BLANK_LINE.search(self.head, start)
        if blank is None:
            if len(self.head) > _MAX_HEAD_BYTES:  # no handshake takes it: stop keeping it
                self.head.clear()
                self.in_head = self._frames = False
            return b""
        rest = bytes(self.head[blank.end() :])
        del self.head[blank.end() :]
        self.in_head = False
        return rest

    def _feed_frames(self, data: bytes | bytearray) -> None:
        at, end, header = 0, len(data), self._header
        while at < end:
            if self._left:
                step = min(self._left, end - at)
                self._left -= step
                at += step
                continue
            if len(header) < 2:  # the first two bytes tell the header's size
                at = self._take(data, at, 2)
                if len(header) < 2:
                    return
            size = _header_size(header)
            if len(header) < size:
                at = self._take(data, at, size)
                if len(header) < size:
                    return
            self._left = _payload_size(header)
            if not header[0] & 0x08:  # a data frame; a control frame may sit inside one
                self._fragmented = not header[0] & 0x80  # FIN
            header.clear()

    def _take(self, data: bytes | bytearray, at: int, size: int) -> int:
        """Add to the header from ``data[at:]`` up to ``size`` bytes; returns the new ``at``."""
        taken = data[at : at + size - len(self._header)]
        self._header += taken
        return at + len(taken)


# Where an HTTP head ends (h11, which wsproto uses, takes a bare LF too).
_BLANK_LINE = re.compile(b"\n\r?\n")
_MAX_HEAD_BYTES = 64 * 1024  # h11 refuses a head past 16 KiB


def _header_size(header: bytearray) -> int:
    """The size of the frame header whose first two bytes begin ``header``."""
    length = header[1] & 0x7F
    extended = 2 if length == 126 else 8 if length == 127 else 0
    return 2 + extended + (4 if header[1] & 0x80 else 0)  # and the mask key, if masked


def _payload_size(header: bytearray) -> int:
    length = header[1] & 0x7F
    if length == 126:
        return int.from_bytes(header[2:4], "big")
    if length == 127:
        return int.from_bytes(header[2:10], "big")
    return length


class ActivityStream(trio.abc.Stream):
    """``stream``, with ``prefix`` (bytes already read from it) received first; every
    byte that moves either way is noted in ``activity``.

    If ``activity.message_timeout_s`` is finite, the peer's frames are read as they pass
    (``_PeerBytes``): once whoever reads (trio-websocket's reader) has part of a message
    and asks for more, the message is unfinished (``Activity.message_part``) until bytes
    that finish it come. Not before that ask: the time a reader spends queueing the
    messages that came before it is ours, not the peer's.

    Between ``hold()`` and ``release()`` what is sent is gathered (up to
    ``_SEND_SLICE_BYTES``, past which it goes out at once) and goes out with the first
    send after ``release()``: a burst of small messages costs one system call, not one
    each (``Sender.send_batch``)."""

    def __init__(self, stream: trio.abc.Stream, activity: Activity, prefix: bytes = b"") -> None:
        self._stream = stream
        self._prefix = prefix
        self.activity = activity
        self._peer = _PeerBytes(frames=activity.message_timeout_s < math.inf)
        self._ended = trio.Event()
        self._held = bytearray()
        self._holding = False
        socket_ = _socket_of(stream)
        if socket_ is not None:
            activity.observe(functools.partial(_unsent_bytes, socket_))

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
        if not self._peer.between_messages:
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
        if self._peer.between_messages:
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


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return stream.socket if isinstance(stream, trio.SocketStream) else None


def _unsent_bytes(sock: trio.socket.SocketType) -> int | None:
    """What the socket holds that the peer has not read yet (SIOCOUTQ), if it can tell."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):  # closed, or not a kind that says
        return None
    value: int = struct.unpack("i", raw)[0]
    return value


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


Verdict = Literal["closed", "silent", "unfinished"]


async def watch(
    ws: WebSocketConnection,
    activity: Activity,
    *,
    interval_s: float,
    timeout_s: float,
    excused: Callable[[], bool] = lambda: False,
) -> Verdict:
    """Ping ``ws`` whenever it has been quiet for ``interval_s``. Runs until it returns:
    ``"silent"`` once the peer has not answered for ``timeout_s``, ``"unfinished"`` once
    it has left a message unfinished for ``activity.message_timeout_s``, ``"closed"`` if
    it closed while a ping waited.

    Any sign of life counts, both ways (``activity``): a peer slowly reading a backlog is
    alive. While ``excused()`` is true a missing pong is not held against the peer: its
    pong may sit unread behind messages we hold back (our queue for it is full because
    the other side of a relay is slow).

    Cancellation: safe; a ping is never cut off half sent (it is sent in its own task).
    """
    async with trio.open_nursery() as nursery:
        verdict = await _watch(nursery, ws, activity, interval_s, timeout_s, excused)
        nursery.cancel_scope.cancel()
        return verdict


async def _watch(
    nursery: trio.Nursery,
    ws: WebSocketConnection,
    activity: Activity,
    interval_s: float,
    timeout_s: float,
    excused: Callable[[], bool],
) -> Verdict:
    while True:
        with activity.waiting_until(activity.last + interval_s):
            await trio.sleep_forever()
        if _overdue(activity):
            return "unfinished"
        if trio.current_time() - activity.last < interval_s:
            continue
        answered = trio.Event()
        activity.check()  # the backlog now, to compare with from here on
        nursery.start_soon(_ping, ws, answered)
        verdict = await _wait_for_pong(ws, activity, answered, timeout_s, excused)
        if verdict is not None:
            return verdict
        activity.touch()


async def _wait_for_pong(
    ws: WebSocketConnection,
    activity: Activity,
    answered: trio.Event,
    timeout_s: float,
    excused: Callable[[], bool],
) -> Verdict | None:
    """Until the ping is ``answered`` (None), or a verdict comes first."""
    deadline = trio.current_time() + timeout_s
    step = timeout_s / _BACKLOG_SAMPLES
    while not answered.is_set() and ws.closed is None:
        with activity.waiting_until(min(deadline, trio.current_time() + step)):
            await answered.wait()
        if _overdue(activity):
            return "unfinished"
        if answered.is_set():
            break
        activity.check()
        deadline = max(deadline, activity.last + timeout_s)
        now = trio.current_time()
        if now < deadline:
            continue
        if not excused():
            return "silent"
        deadline = now + timeout_s
    return "closed" if ws.closed is not None else None


def _overdue(activity: Activity) -> bool:
    return trio.current_time() >= activity.message_deadline


async def _ping(ws: WebSocketConnection, answered: trio.Event) -> None:
    try:
        await ws.ping()
    except ConnectionClosed:
        return
    answered.set()


async def close(
    ws: WebSocketConnection, code: int, reason: str, *, wait_s: float = CLOSE_TIMEOUT_S
) -> None:
    """Close with ``code`` and ``reason`` (cut to 123 bytes); never waits more than
    ``wait_s`` for the peer. Safe to call from a cancelled task."""
    with trio.move_on_after(wait_s) as scope:
        scope.shield = True
        await ws.aclose(code, close_reason(reason))
