"""A scriptable, OpenAI-realtime-shaped WebSocket upstream for trio tests of the passthrough.

``open_fake_ws_upstream()`` serves WebSocket on ``127.0.0.1`` (a free port) inside the
test's own trio run, written with trio, h11 and wsproto only (no trio-websocket on this
side: it reads the socket and answers pings in a task of its own, so it could neither go
silent nor drop a connection without a close frame). Tests point the daemon (or a
trio-websocket client) at ``upstream.url`` and then check what reached the provider and how
the connections ended:

* every opening handshake is recorded (:class:`SeenHandshake`: path, query, all headers as
  received, the API key taken from the auth header, the index of the TCP connection);
* every message received is recorded (``received``; text stays ``str``, binary ``bytes``),
  and so is the close code and reason of every close the *client* started
  (``close_codes``); each connection's end is classified in ``close_reasons``;
* connections are counted as they open and as they end, for any reason, and tests can wait
  for them (``wait_connections_closed`` and friends);
* ``script()`` queues :class:`Session` objects, one per incoming handshake: reject with a
  status, delay or never answer the handshake, greet, send one big message, stream many
  messages as fast as the client reads them (``messages_sent`` shows back-pressure), echo
  or not, close with a code, drop the TCP connection without a close frame, or stop
  reading the socket altogether;
* with nothing scripted it checks the key when ``expected_key`` is set (401 with an
  OpenAI-shaped JSON body when it does not match) and echoes every message until the
  client closes.

A client may go away at any point: that ends the connection quietly (it is counted, never
raised into the test). Any other exception is a bug in the fake and propagates.

Linux only: ``go_silent_after`` notices the client leaving with ``EPOLLRDHUP``, without
reading anything from the socket.
"""

from __future__ import annotations

import http
import json
import select
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import h11
import trio
import wsproto.utilities
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

RECEIVE_BYTES = 64 * 1024
CLOSE_TIMEOUT_S = 5.0  # after our close frame: how long to wait for the client's answer

__all__ = [
    "CLOSE_TIMEOUT_S",
    "FakeWsUpstream",
    "SeenHandshake",
    "Session",
    "open_fake_ws_upstream",
]


@dataclass
class Session:
    """How to handle one incoming connection (from its handshake to its end).

    The handshake: after ``accept_delay_s`` (``math.inf``: never answer; the connection then
    lasts until the client goes away), ``reject_status`` rejects it (with
    ``reject_headers`` and ``reject_body``, by default a small OpenAI-shaped JSON error);
    otherwise a wrong key is rejected with 401 when the fake has an ``expected_key`` (the key
    check applies to scripted sessions too); otherwise the handshake is accepted.

    Once accepted, in this order: the ``greeting`` messages, one binary message of
    ``send_bytes_of`` bytes, then ``stream_messages`` binary messages of
    ``stream_message_bytes`` bytes sent by a task of their own, as fast as the client takes
    them, while received messages are handled: each one is recorded and, with ``echo``,
    sent back unchanged (text as text, binary as binary). Pings are answered.

    The ``*_after`` thresholds count messages received on this connection and act once
    that many have been received (and echoed); 0 means right after the greeting and the
    big message. When several are due at once, ``drop_after`` wins, then ``close_after``,
    then ``go_silent_after``:

    * ``close_after``: send a close frame with ``close_code`` and ``close_reason``, wait
      (at most :data:`CLOSE_TIMEOUT_S`) for the client's close frame, close the TCP
      connection;
    * ``drop_after``: close the TCP connection at once, without a close frame (the client
      sees an abnormal closure, 1006);
    * ``go_silent_after``: never read the socket again (no pongs, no echoes, no close
      answer), keep the TCP connection open until the client closes or resets it. A
      ``stream_messages`` task still running keeps sending.
    """

    reject_status: int | None = None
    reject_headers: list[tuple[str, str]] = field(default_factory=list)
    reject_body: bytes | None = None  # None: an OpenAI-shaped JSON error
    accept_delay_s: float = 0.0  # math.inf: never answer the handshake
    greeting: list[str | bytes] = field(default_factory=list)
    send_bytes_of: int | None = None
    stream_messages: int | None = None
    stream_message_bytes: int = 1024
    echo: bool = True
    close_after: int | None = None
    close_code: int = 1000
    close_reason: str = ""
    drop_after: int | None = None
    go_silent_after: int | None = None


@dataclass
class SeenHandshake:
    """An opening handshake as the fake received it (recorded before it is answered)."""

    path: str  # without the query
    query: str  # raw query string, "" if none
    headers: list[tuple[str, str]]  # in order, names lower-cased, repeats kept
    key: str | None  # the auth header's value without the scheme; None if absent/other scheme
    connection: int  # index of the TCP connection it arrived on (0, 1, 2, ...)

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)


class _ClientGone(Exception):
    """The client closed or reset the connection (EOF, reset, broken pipe)."""


class _BadHandshake(Exception):
    """The client sent something that is not a WebSocket opening handshake."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class FakeWsUpstream:
    """The fake's state: what it saw, what it will do next, its connections.

    ``close_reasons`` maps each ended connection's index to why it ended:

    * ``"client-close"``: the client sent a close frame first (it is in ``close_codes``)
      and we answered it;
    * ``"client-gone"``: the client's TCP connection went away (EOF or reset) without a
      close handshake: during the handshake or its delay, mid-conversation, or while the
      fake was silent (whatever it sent then was never read);
    * ``"server-close"``: a ``close_after`` close (whatever the client answered);
    * ``"drop"``: a ``drop_after`` drop;
    * ``"rejected"``: the handshake was answered with an HTTP error;
    * ``"bad-request"``: not a WebSocket handshake (answered with 400 or 426);
    * ``"protocol-error"``: the client sent an invalid frame (we closed with 1002/1007/...);
    * ``"shutdown"``: still open when the fake stopped;
    * ``"error"``: the fake raised (that propagates).

    ``messages_sent`` counts every message the fake has handed to the socket completely:
    greetings, echoes, the big one and the streamed ones.
    """

    def __init__(
        self,
        expected_key: str | None = None,
        *,
        auth_header: str = "authorization",
        auth_scheme: str | None = "Bearer",
    ) -> None:
        self.url = ""
        self.expected_key = expected_key
        self.auth_header = auth_header.lower()
        self.auth_scheme = auth_scheme
        self.handshakes: list[SeenHandshake] = []
        self.received: list[str | bytes] = []
        self.close_codes: list[tuple[int, str | None]] = []
        self.close_reasons: dict[int, str] = {}
        self.connections_opened = 0
        self.connections_closed = 0
        self.messages_sent = 0
        self._script: deque[Session] = deque()
        self._changed = trio.Event()

    # --- the test's side -------------------------------------------------------------

    def script(self, *sessions: Session) -> None:
        """Queue sessions for the next handshakes, in order (after any still queued); once
        they are used up the default behaviour applies again. Every handshake takes one,
        even one then rejected for its key."""
        self._script.extend(sessions)

    @property
    def scripted_left(self) -> int:
        """Scripted sessions not used yet."""
        return len(self._script)

    @property
    def open_connections(self) -> int:
        return self.connections_opened - self.connections_closed

    async def wait_connections_opened(self, n: int) -> None:
        """Return once at least ``n`` TCP connections have been accepted."""
        await self._wait_until(lambda: self.connections_opened >= n)

    async def wait_connections_closed(self, n: int) -> None:
        """Return once at least ``n`` connections have ended, for any reason."""
        await self._wait_until(lambda: self.connections_closed >= n)

    async def wait_handshakes(self, n: int) -> None:
        """Return once at least ``n`` handshakes have been received (answered or not)."""
        await self._wait_until(lambda: len(self.handshakes) >= n)

    async def wait_received(self, n: int) -> None:
        """Return once at least ``n`` messages have been received (on all connections)."""
        await self._wait_until(lambda: len(self.received) >= n)

    async def wait_messages_sent(self, n: int) -> None:
        """Return once at least ``n`` messages have been sent (on all connections)."""
        await self._wait_until(lambda: self.messages_sent >= n)

    async def _wait_until(self, done: Callable[[], bool]) -> None:
        while not done():
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # --- connections -----------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on 127.0.0.1 (free port), set ``url``, serve until cancelled.

        Not ``trio.serve_tcp``, for the reason given in ``tests/fake_upstream.py``: a
        cancellation at its closing checkpoint would hide a bug in a handler.
        """
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        try:
            host, port = listener.socket.getsockname()[:2]
            self.url = f"ws://{host}:{port}"
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(self.handle, stream)
        finally:
            listener.socket.close()

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one accepted TCP connection until it ends; count it and close it."""
        index = self.connections_opened
        self.connections_opened += 1
        self._notify()
        reason = "shutdown"
        try:
            reason = await self._serve(_Conn(stream, self), index)
        except BaseException as exc:
            if not _is_cancellation(exc):
                reason = "error"  # a bug in the fake (or the script): it propagates
            raise
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            self.close_reasons[index] = reason
            self.connections_closed += 1
            self._notify()

    async def _serve(self, conn: _Conn, index: int) -> str:
        """One connection from its handshake to its end; returns why it ended."""
        try:
            path, query, headers = await conn.read_handshake()
        except _ClientGone:
            return "client-gone"
        except _BadHandshake as exc:
            await conn.send_bad_request(exc.status, str(exc))
            return "bad-request"
        seen = SeenHandshake(path, query, headers, self._key_of(headers), index)
        self.handshakes.append(seen)
        self._notify()
        session = self._script.popleft() if self._script else Session()
        try:
            if session.accept_delay_s > 0 and not await conn.sleep_watching(session.accept_delay_s):
                return "client-gone"
            if session.reject_status is not None:
                body = session.reject_body
                if body is None:
                    message = f"fake upstream rejected the handshake with {session.reject_status}"
                    body = _error_body(message, "server_error")
                await conn.reject(session.reject_status, session.reject_headers, body)
                return "rejected"
            if self.expected_key is not None and seen.key != self.expected_key:
                body = _error_body(
                    "Incorrect API key provided", "invalid_request_error", "invalid_api_key"
                )
                await conn.reject(401, [], body)
                return "rejected"
            await conn.send(AcceptConnection())
        except _ClientGone:
            return "client-gone"
        return await self._run_session(conn, session)

    def _key_of(self, headers: list[tuple[str, str]]) -> str | None:
        value = next((v for name, v in headers if name == self.auth_header), None)
        if value is None or not self.auth_scheme:
            return value
        scheme, _, key = value.partition(" ")
        if scheme.lower() != self.auth_scheme.lower():
            return None
        return key.strip()

    async def _run_session(self, conn: _Conn, session: Session) -> str:
        """An accepted connection: the session's sends, its stream task, and the reading."""
        outcome = "client-gone"
        async with trio.open_nursery() as nursery:
            try:
                for message in session.greeting:
                    await conn.send_message(message)
                if session.send_bytes_of is not None:
                    await conn.send_message(_payload(session.send_bytes_of))
                if session.stream_messages:
                    nursery.start_soon(self._stream_out, conn, session)
                outcome = await self._converse(conn, session)
            except _ClientGone:
                outcome = "client-gone"
            nursery.cancel_scope.cancel()  # the stream task, if it still runs
        return outcome

    async def _stream_out(self, conn: _Conn, session: Session) -> None:
        assert session.stream_messages is not None
        payload = _payload(session.stream_message_bytes)
        try:
            for _ in range(session.stream_messages):
                if not await conn.send_message(payload):
                    return  # closing: no more messages
        except _ClientGone:
            return  # the reading side notices too, and ends the connection

    async def _converse(self, conn: _Conn, session: Session) -> str:
        """Handle what the client sends until the connection is to end; returns why."""
        count = 0
        parts: list[str | bytes] = []
        while True:
            scheduled = await self._scheduled_end(conn, session, count)
            if scheduled is not None:
                return scheduled
            event = await conn.next_event()
            if isinstance(event, TextMessage | BytesMessage):
                message = self._message_part(event, parts)
                if message is not None:
                    count += 1
                    if session.echo:
                        await conn.send_message(message)
            elif isinstance(event, Ping):
                await conn.send_pong(event)
            elif isinstance(event, CloseConnection):
                if conn.state is ConnectionState.OPEN:
                    # Not from the client: wsproto could not parse its frames.
                    await conn.send(CloseConnection(code=event.code, reason=event.reason))
                    return "protocol-error"
                self.close_codes.append((event.code, event.reason or None))
                self._notify()
                await conn.send(event.response())
                return "client-close"
            # Pong: nothing to do (the fake never pings)

    async def _scheduled_end(self, conn: _Conn, session: Session, count: int) -> str | None:
        """End the connection as ``session`` scripts it once ``count`` messages came in
        (drop it, close it, or wait for the client to go); returns why, or None to go on."""
        if count == session.drop_after:
            return "drop"
        if count == session.close_after:
            reason = session.close_reason or None
            await conn.send(CloseConnection(code=session.close_code, reason=reason))
            await self._finish_close(conn)
            return "server-close"
        if count == session.go_silent_after:
            await conn.wait_peer_gone()
            return "client-gone"
        return None

    async def _finish_close(self, conn: _Conn) -> None:
        """After our close frame: read (recording messages) until the client's close frame,
        its EOF, or CLOSE_TIMEOUT_S."""
        parts: list[str | bytes] = []
        with trio.move_on_after(CLOSE_TIMEOUT_S), suppress(_ClientGone):
            while conn.state is not ConnectionState.CLOSED:
                event = await conn.next_event()
                if isinstance(event, TextMessage | BytesMessage):
                    self._message_part(event, parts)

    def _message_part(
        self, event: TextMessage | BytesMessage, parts: list[str | bytes]
    ) -> str | bytes | None:
        """Collect one frame; return (and record) the message it completes, if any."""
        data = event.data if isinstance(event, TextMessage) else bytes(event.data)
        parts.append(data)
        if not event.message_finished:
            return None
        if isinstance(event, TextMessage):
            message: str | bytes = "".join(p for p in parts if isinstance(p, str))
        else:
            message = b"".join(p for p in parts if isinstance(p, bytes))
        parts.clear()
        self.received.append(message)
        self._notify()
        return message


class _Conn:
    """One TCP connection speaking WebSocket through wsproto, with a send lock (the stream
    task and the reading side both send)."""

    def __init__(self, stream: trio.SocketStream, upstream: FakeWsUpstream) -> None:
        self.stream = stream
        self.upstream = upstream
        self.ws = WSConnection(ConnectionType.SERVER)
        # wsproto's event generator, read lazily: it moves the connection's state when it
        # yields a close frame, not when the bytes arrive, so a ping that came just before
        # the close is still answered (and echoes too).
        self.pending: Iterator[Event] = iter(())
        self.early = b""  # bytes that came after the handshake, before our answer
        self.lock = trio.StrictFIFOLock()

    @property
    def state(self) -> ConnectionState:
        return self.ws.state

    async def receive(self) -> bytes:
        try:
            data = await self.stream.receive_some(RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _ClientGone from exc
        if not data:
            raise _ClientGone
        return data

    async def send_all(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _ClientGone from exc

    async def read_handshake(self) -> tuple[str, str, list[tuple[str, str]]]:
        """Read the opening handshake: (path, query, headers as received).

        wsproto validates it but keeps only some of its headers, so a plain h11 parser
        reads the same bytes for the record."""
        parser = h11.Connection(h11.SERVER)
        head: h11.Request | None = None
        while True:
            for event in self.ws.events():
                if isinstance(event, Request):
                    assert head is not None  # h11 parsed the same bytes
                    target = head.target.decode("ascii")
                    path, _, query = target.partition("?")
                    headers = [
                        (name.decode("ascii"), value.decode("latin-1"))
                        for name, value in head.headers
                    ]
                    return path, query, headers
            data = await self.receive()
            if head is None:
                parser.receive_data(data)
                try:
                    parsed = parser.next_event()
                except h11.RemoteProtocolError:
                    parsed = None  # wsproto fails on it too, just below
                if isinstance(parsed, h11.Request):
                    head = parsed
                    # Frames sent along with the handshake: wsproto's handshake would keep
                    # them for itself, so they are fed to the connection after our 101.
                    with suppress(h11.RemoteProtocolError):
                        if isinstance(parser.next_event(), h11.EndOfMessage):
                            self.early = bytes(parser.trailing_data[0])
            try:
                self.ws.receive_data(data)
            except wsproto.utilities.RemoteProtocolError as exc:
                hint = exc.event_hint
                status = hint.status_code if isinstance(hint, RejectConnection) else 400
                raise _BadHandshake(status, str(exc)) from exc

    async def send_bad_request(self, status: int, message: str) -> None:
        """Answer a broken handshake (written by hand: wsproto's h11 may be in error)."""
        body = _error_body(f"not a WebSocket handshake: {message}", "invalid_request_error")
        head = (
            f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n"
            "sec-websocket-version: 13\r\n"
            "connection: close\r\n\r\n"
        )
        with suppress(_ClientGone):
            await self.send_all(head.encode("ascii") + body)

    async def sleep_watching(self, seconds: float) -> bool:
        """Sleep, but return False as soon as the client goes away (else True)."""
        gone = False

        async def watch(scope: trio.CancelScope) -> None:
            nonlocal gone
            while True:
                try:
                    self.early += await self.receive()
                except _ClientGone:
                    gone = True
                    scope.cancel()
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, nursery.cancel_scope)
            await trio.sleep(seconds)
            nursery.cancel_scope.cancel()
        return not gone

    async def reject(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        raw = [(name.encode("ascii"), value.encode("latin-1")) for name, value in headers]
        names = {name.lower() for name, _ in headers}
        if "content-type" not in names:
            raw.append((b"content-type", b"application/json"))
        raw.append((b"content-length", str(len(body)).encode("ascii")))
        raw.append((b"connection", b"close"))
        data = self.ws.send(RejectConnection(status_code=status, headers=raw, has_body=True))
        data += self.ws.send(RejectData(data=body, body_finished=True))
        await self.send_all(data)

    async def send(self, event: Event) -> None:
        """Send an event (in turn with the other sender)."""
        async with self.lock:
            await self.send_all(self.ws.send(event))
            if isinstance(event, AcceptConnection) and self.early:
                self.ws.receive_data(self.early)
                self.pending = self.ws.events()
                self.early = b""

    async def send_pong(self, ping: Ping) -> None:
        """Answer a ping, unless the connection is closing."""
        async with self.lock:
            if self.ws.state is ConnectionState.OPEN:
                await self.send_all(self.ws.send(ping.response()))

    async def send_message(self, message: str | bytes) -> bool:
        """Send one whole message and count it; False (nothing sent) once closing."""
        async with self.lock:
            if self.ws.state is not ConnectionState.OPEN:
                return False
            event = TextMessage(data=message) if isinstance(message, str) else BytesMessage(message)
            await self.send_all(self.ws.send(event))
        self.upstream.messages_sent += 1
        self.upstream._notify()
        return True

    async def next_event(self) -> Event:
        """The next WebSocket event, reading as needed (EOF or reset: _ClientGone)."""
        while (event := next(self.pending, None)) is None:
            self.ws.receive_data(await self.receive())
            self.pending = self.ws.events()
        return event

    async def wait_peer_gone(self) -> None:
        """Return once the client has closed or reset the TCP connection, without reading
        from the socket: a private epoll set waits for EPOLLRDHUP (HUP and ERR are always
        reported), and trio waits for that epoll fd to become readable."""
        epoll = select.epoll()
        try:
            epoll.register(self.stream.socket.fileno(), select.EPOLLRDHUP)
            while not epoll.poll(0):
                await trio.lowlevel.wait_readable(epoll.fileno())
        finally:
            trio.lowlevel.notify_closing(epoll.fileno())
            epoll.close()


@asynccontextmanager
async def open_fake_ws_upstream(
    expected_key: str | None = None,
    *,
    auth_header: str = "authorization",
    auth_scheme: str | None = "Bearer",
) -> AsyncIterator[FakeWsUpstream]:
    """Serve a :class:`FakeWsUpstream` on 127.0.0.1 (free port) for the ``async with`` body.

    The key is read from header ``auth_header``, after ``auth_scheme`` and a space (an
    empty or None scheme: the whole value, e.g. ``auth_header="api-key"``).

    The server runs in a nursery that is cancelled on exit. An exception from the body
    or from the fake comes out as itself, not wrapped in ExceptionGroups; when both raise,
    the group holds both.
    """
    upstream = FakeWsUpstream(expected_key, auth_header=auth_header, auth_scheme=auth_scheme)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(upstream.serve)
            try:
                yield upstream
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _collapse(group) from None


def _is_cancellation(error: BaseException) -> bool:
    if isinstance(error, BaseExceptionGroup):
        return all(_is_cancellation(inner) for inner in error.exceptions)
    return isinstance(error, trio.Cancelled)


def _collapse(error: BaseException) -> BaseException:
    """The one exception inside nested single-exception groups (else the group itself)."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _payload(size: int) -> bytes:
    """``size`` bytes of a recognisable pattern."""
    pattern = b"0123456789abcdef"
    return (pattern * (size // len(pattern) + 1))[:size]


def _error_body(message: str, error_type: str, code: str | None = None) -> bytes:
    error: dict[str, object] = {"message": message, "type": error_type}
    if code is not None:
        error["code"] = code
    return json.dumps({"error": error}, separators=(",", ":")).encode()
