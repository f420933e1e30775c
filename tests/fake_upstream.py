"""A scriptable, OpenAI-shaped HTTP/1.1 upstream for trio tests of the relay.

``open_fake_upstream()`` serves on ``127.0.0.1`` (a free port) inside the test's own trio
run, written with trio and h11 only. Tests point the relay at ``upstream.url`` and then
check what reached the provider and how the connections were used:

* every request is recorded (:class:`SeenRequest`: method, path, query, headers, the
  whole body, and the index of the TCP connection it came on);
* connections are counted as they open and as they end, for any reason, and tests can
  wait for them to end (``wait_connections_closed``) — this is how a test proves that
  the relay closed an upstream connection when its client went away, or that it reused a
  keep-alive connection (several requests with the same ``connection`` index);
* ``script()`` queues :class:`Reply` objects that shape the next responses: status,
  headers, a plain or chunked body, delays, a stall, an abrupt drop mid-stream, a large
  SSE stream sent as fast as the reader takes it (``bytes_sent`` shows back-pressure),
  ``Connection: close``;
* with nothing scripted it answers like OpenAI's API (``/v1/chat/completions``, streaming
  or not, ``/v1/models``, 401 for a wrong key when ``expected_key`` is set, 404, 400).

A client may go away at any point: that ends the connection quietly (it is counted, never
raised into the test). Any other exception is a bug in the fake and propagates.
"""

from __future__ import annotations

import itertools
import json
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import h11
import trio

RECEIVE_BYTES = 64 * 1024
STREAM_EVENT_BYTES = 1024  # size of one generated SSE event for ``Reply.stream_bytes``
STREAM_WRITE_BYTES = 64 * 1024  # about this much per write (one chunk) for ``stream_bytes``
DONE_EVENT = b"data: [DONE]\n\n"
USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
STREAM_CONTENTS = ("Hel", "lo", "!")


@dataclass
class Reply:
    """How to answer one request.

    Content comes from ``stream_bytes``, else ``chunks``, else ``body``. With none of them
    and ``status == 200`` the default OpenAI-shaped behaviour supplies status, headers and
    content (so ``Reply(drop_after_chunks=1)`` is "the normal answer, dropped after one
    chunk"); ``headers`` are then added to the default ones. With none of them and another
    status the body is an OpenAI-shaped JSON error. Scripted content is sent as given: no
    key check. Every response carries ``x-request-id: req-<n>`` (n: the request's index in
    ``requests``) unless ``headers`` name one.

    The delivery controls count "chunks": each item of ``chunks``, each ~64 KiB write of
    ``stream_bytes``, or the whole ``body`` as one. ``drop_after_chunks`` /
    ``stall_after_chunks`` at or past the number of chunks act just before the end of the
    body (a chunked body then misses its terminating chunk). A drop closes with a FIN, so
    the client reads everything sent before it; with ``drop_with_reset`` the client's kernel
    may discard what it had not read yet (it sees a reset, httpx a ReadError).
    """

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = None  # content-length body; content-type defaults to JSON
    chunks: list[bytes] | None = None  # chunked body, one chunk per item; SSE content-type
    chunk_delay_s: float = 0.0  # trio.sleep between chunks
    drop_after_chunks: int | None = None  # then close the socket: no end of body
    drop_with_reset: bool = False  # drop with SO_LINGER 0 (TCP RST) instead of a FIN
    stall_after_chunks: int | None = None  # then wait until the client goes away; 0 = head
    head_delay_s: float = 0.0  # trio.sleep before the response head; math.inf = never answer
    stream_bytes: int | None = None  # SSE body of exactly this many bytes (~1 KiB events)
    close_connection: bool = False  # send Connection: close and close after the response


@dataclass
class SeenRequest:
    """A request as the fake received it (recorded once its whole body has arrived)."""

    method: str
    path: str  # without the query
    query: str  # raw query string, "" if none
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body: bytes
    connection: int  # index of the TCP connection it arrived on (0, 1, 2, ...)

    def json(self) -> Any:
        return json.loads(self.body)


class _Outcome(Enum):
    DONE = "done"  # the response was sent completely
    CLIENT_GONE = "client"  # the client closed or reset the connection
    DROP = "drop"  # the reply asked to drop the connection mid-response


class _ClientGone(Exception):
    """The client closed or reset the connection (EOF, reset, broken pipe)."""


@dataclass
class _Response:
    """A reply resolved for one request: what to send and how."""

    status: int
    headers: list[tuple[str, str]]
    pieces: Iterable[bytes]
    controls: Reply


@dataclass
class _Content:
    """A reply's status, own headers and content, before the headers the fake adds."""

    status: int
    extra: list[tuple[str, str]]
    pieces: Iterable[bytes]
    chunked: bool = True
    content_type: str = "text/event-stream"


def _framing_headers(
    names: set[str], chunked: bool, pieces: Iterable[bytes]
) -> list[tuple[str, str]]:
    """``transfer-encoding: chunked`` or the ``content-length`` of ``pieces``, unless the
    reply's own headers (lower-cased ``names``) already frame it."""
    if chunked:
        if "transfer-encoding" not in names:
            return [("transfer-encoding", "chunked")]
    elif "content-length" not in names:
        assert isinstance(pieces, list)
        return [("content-length", str(sum(len(piece) for piece in pieces)))]
    return []


class FakeUpstream:
    """The fake's state: what it saw, what it will answer, its connections.

    ``close_reasons`` maps each ended connection's index to why it ended: ``"client"``
    (the client closed or reset it), ``"close"`` (we closed after a response, because of
    ``Connection: close`` either way), ``"drop"`` (a ``drop_after_chunks`` reply),
    ``"bad-request"`` (the client sent something that is not HTTP/1.1), ``"shutdown"``
    (still open when the fake stopped) or ``"error"`` (the fake raised: that propagates).
    """

    def __init__(self, expected_key: str | None = None) -> None:
        self.url = ""
        self.requests: list[SeenRequest] = []
        self.expected_key = expected_key
        self.connections_opened = 0
        self.connections_closed = 0
        self.close_reasons: dict[int, str] = {}
        self.bytes_sent = 0
        # Slept after each request head before its body is read: an upstream slow to take
        # an upload (the client's writes block once the socket's buffers are full).
        self.body_read_delay_s = 0.0
        self._script: deque[Reply] = deque()
        self._changed = trio.Event()

    # --- the test's side -------------------------------------------------------------

    def script(self, *replies: Reply) -> None:
        """Queue replies for the next requests, in order (after any still queued); once
        they are used up the default behaviour applies again."""
        self._script.extend(replies)

    @property
    def scripted_left(self) -> int:
        """Scripted replies not used yet."""
        return len(self._script)

    @property
    def open_connections(self) -> int:
        return self.connections_opened - self.connections_closed

    async def wait_connections_closed(self, n: int) -> None:
        """Return once at least ``n`` connections have ended (counted since the start)."""
        await self._wait_until(lambda: self.connections_closed >= n)

    async def wait_connections_opened(self, n: int) -> None:
        """Return once at least ``n`` connections have been accepted."""
        await self._wait_until(lambda: self.connections_opened >= n)

    async def wait_requests(self, n: int) -> None:
        """Return once at least ``n`` requests have been received completely."""
        await self._wait_until(lambda: len(self.requests) >= n)

    async def _wait_until(self, done: Callable[[], bool]) -> None:
        while not done():
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # --- connections -----------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on 127.0.0.1 (free port), set ``url``, serve until cancelled.

        Not ``trio.serve_tcp``: its handler wrapper closes the stream again at a
        checkpoint, and a cancellation arriving there (the test body failing because the
        fake closed its connection) replaces the handler's exception: a bug in the fake
        would vanish. For the same reason the listener is closed without a checkpoint.
        """
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        try:
            host, port = listener.socket.getsockname()[:2]
            self.url = f"http://{host}:{port}"
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
            reason = await self._serve(stream, index)
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

    async def _serve(self, stream: trio.SocketStream, index: int) -> str:
        """Requests on one connection until it ends; returns why it ended."""
        conn = h11.Connection(h11.SERVER)
        while True:
            try:
                request = await self._receive_request(stream, conn, index)
            except _ClientGone:
                return "client"
            except h11.RemoteProtocolError as exc:
                if conn.their_state is h11.CLOSED or _eof_received(conn):
                    return "client"  # EOF in the middle of a request
                await _try_send_bad_request(stream, conn, exc.error_status_hint)
                return "bad-request"
            if request is None:
                return "client"  # EOF between requests
            outcome = await self._respond(stream, conn, request)
            if outcome is _Outcome.CLIENT_GONE:
                return "client"
            if outcome is _Outcome.DROP:
                if request.controls.drop_with_reset:
                    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return "drop"
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return "close"  # Connection: close (ours or the client's)
            conn.start_next_cycle()

    async def _receive_request(
        self, stream: trio.SocketStream, conn: h11.Connection, index: int
    ) -> _Response | None:
        """Read one whole request, record it, and resolve its reply (None: clean EOF)."""
        head = await _next_event(stream, conn)
        if isinstance(head, h11.ConnectionClosed):
            return None
        assert isinstance(head, h11.Request), head
        if self.body_read_delay_s:
            await trio.sleep(self.body_read_delay_s)
        body = bytearray()
        while True:
            if conn.they_are_waiting_for_100_continue:
                await _send_event(
                    stream, conn, h11.InformationalResponse(status_code=100, headers=[])
                )
            event = await _next_event(stream, conn)
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected h11 event in a request body: {event!r}")
        target = head.target.decode("ascii")
        path, _, query = target.partition("?")
        headers: dict[str, str] = {}
        for raw_name, raw_value in head.headers:
            name, value = raw_name.decode("ascii"), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        seen = SeenRequest(
            method=head.method.decode("ascii"),
            path=path,
            query=query,
            headers=headers,
            body=bytes(body),
            connection=index,
        )
        number = len(self.requests)
        self.requests.append(seen)
        self._notify()
        scripted = self._script.popleft() if self._script else Reply()
        return self._resolve(scripted, seen, number)

    # --- responses -------------------------------------------------------------------

    def _resolve(self, reply: Reply, seen: SeenRequest, number: int) -> _Response:
        """The status, headers and content to send for ``reply`` to ``seen``."""
        content = self._content(reply, seen)
        status, extra, pieces = content.status, content.extra, content.pieces
        names = {name.lower() for name, _ in extra}
        headers: list[tuple[str, str]] = []
        if "x-request-id" not in names:
            headers.append(("x-request-id", f"req-{number}"))
        if "content-type" not in names:
            headers.append(("content-type", content.content_type))
        headers += _framing_headers(names, content.chunked, pieces)
        if reply.close_connection and "connection" not in names:
            headers.append(("connection", "close"))
        if seen.method == "HEAD" or status in (204, 304):
            pieces = []
        return _Response(status, headers + extra, pieces, reply)

    def _content(self, reply: Reply, seen: SeenRequest) -> _Content:
        """What ``reply`` sends to ``seen``, before the headers the fake adds: the
        scripted content, an error body for a bare error status, or the default answer."""
        status = reply.status
        extra = list(reply.headers)
        if reply.stream_bytes is not None:
            return _Content(status, extra, _sse_stream(reply.stream_bytes))
        if reply.chunks is not None:
            return _Content(status, extra, list(reply.chunks))
        if reply.body is not None:
            return _Content(status, extra, [reply.body], False, "application/json")
        if status != 200:
            body = _error_body(f"fake upstream answered {status}", "server_error")
            return _Content(status, extra, [body], False, "application/json")
        default = self._default_reply(seen)
        extra = default.headers + extra
        if default.chunks is not None:
            return _Content(default.status, extra, default.chunks)
        assert default.body is not None
        return _Content(default.status, extra, [default.body], False, "application/json")

    def _default_reply(self, seen: SeenRequest) -> Reply:
        """The OpenAI-shaped answer (content and headers only)."""
        if seen.path == "/v1/chat/completions" and seen.method == "POST":
            if not self._key_ok(seen):
                return _invalid_key()
            try:
                payload = json.loads(seen.body)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                return _json_error(400, f"We could not parse the JSON body of your request. {exc}")
            if not isinstance(payload, dict):
                return _json_error(400, "The request body must be a JSON object.")
            headers = [
                ("x-ratelimit-remaining-requests", "99"),
                ("x-ratelimit-remaining-tokens", "9000"),
            ]
            if payload.get("stream") is True:
                options = payload.get("stream_options")
                usage = isinstance(options, dict) and options.get("include_usage") is True
                return Reply(headers=headers, chunks=default_stream_events(include_usage=usage))
            completion = {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Hello!"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": USAGE,
            }
            return Reply(headers=headers, body=_dumps(completion))
        if seen.path == "/v1/models" and seen.method == "GET":
            if not self._key_ok(seen):
                return _invalid_key()
            models = {"object": "list", "data": [{"id": "gpt-fake", "object": "model"}]}
            return Reply(body=_dumps(models))
        return _json_error(404, "no route")

    def _key_ok(self, seen: SeenRequest) -> bool:
        if self.expected_key is None:
            return True
        return seen.headers.get("authorization") == f"Bearer {self.expected_key}"

    async def _respond(
        self, stream: trio.SocketStream, conn: h11.Connection, response: _Response
    ) -> _Outcome:
        """Send ``response`` while watching for the client going away."""
        outcome = _Outcome.CLIENT_GONE
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_for_client_close, stream, conn, nursery.cancel_scope)
            with suppress(_ClientGone):
                outcome = await self._send_response(stream, conn, response)
            nursery.cancel_scope.cancel()
        return outcome

    async def _send_response(
        self, stream: trio.SocketStream, conn: h11.Connection, response: _Response
    ) -> _Outcome:
        controls = response.controls
        if controls.head_delay_s > 0:
            await trio.sleep(controls.head_delay_s)
        head = h11.Response(status_code=response.status, headers=response.headers)
        await _send_event(stream, conn, head)
        for sent, piece in enumerate(response.pieces):
            if controls.drop_after_chunks is not None and sent >= controls.drop_after_chunks:
                return _Outcome.DROP
            if controls.stall_after_chunks is not None and sent >= controls.stall_after_chunks:
                await trio.sleep_forever()
            if sent and controls.chunk_delay_s > 0:
                await trio.sleep(controls.chunk_delay_s)
            await _send_event(stream, conn, h11.Data(data=piece))
            self.bytes_sent += len(piece)
        if controls.drop_after_chunks is not None:
            return _Outcome.DROP
        if controls.stall_after_chunks is not None:
            await trio.sleep_forever()
        await _send_event(stream, conn, h11.EndOfMessage())
        return _Outcome.DONE


@asynccontextmanager
async def open_fake_upstream(expected_key: str | None = None) -> AsyncIterator[FakeUpstream]:
    """Serve a :class:`FakeUpstream` on 127.0.0.1 (free port) for the ``async with`` body.

    The server runs in a nursery that is cancelled on exit. An exception from the body
    or from the fake comes out as itself, not wrapped in ExceptionGroups; when both raise,
    the group holds both.
    """
    upstream = FakeUpstream(expected_key)
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


# --- content --------------------------------------------------------------------------


def default_stream_events(include_usage: bool = False) -> list[bytes]:
    """The SSE events of the default streaming answer, one per chunk: "Hel", "lo", "!",
    the usage chunk when asked for, then ``[DONE]``."""
    events = []
    for content in STREAM_CONTENTS:
        chunk = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": content}}],
        }
        events.append(b"data: " + _dumps(chunk) + b"\n\n")
    if include_usage:
        usage_chunk = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "choices": [],
            "usage": USAGE,
        }
        events.append(b"data: " + _dumps(usage_chunk) + b"\n\n")
    events.append(DONE_EVENT)
    return events


def _sse_stream(total: int) -> Iterator[bytes]:
    """``total`` bytes of SSE (exactly, unless ``total`` is tiny), in ~64 KiB writes:
    ``data: {"i":N,"pad":"xxx..."}\\n\\n`` events of 1 KiB, the last one taking up the
    remainder, then ``data: [DONE]\\n\\n``. Generated lazily: 50 MB never sit in memory."""
    remaining = total - len(DONE_EVENT)
    write: list[bytes] = []
    write_size = 0
    for i in itertools.count():
        if remaining <= 0:
            break
        size = remaining if remaining < 2 * STREAM_EVENT_BYTES else STREAM_EVENT_BYTES
        prefix = b'data: {"i":%d,"pad":"' % i
        suffix = b'"}\n\n'
        event = prefix + b"x" * max(0, size - len(prefix) - len(suffix)) + suffix
        remaining -= len(event)
        write.append(event)
        write_size += len(event)
        if write_size >= STREAM_WRITE_BYTES:
            yield b"".join(write)
            write, write_size = [], 0
    write.append(DONE_EVENT)
    yield b"".join(write)


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _error_body(message: str, error_type: str, code: str | None = None) -> bytes:
    error: dict[str, object] = {"message": message, "type": error_type}
    if code is not None:
        error["code"] = code
    return _dumps({"error": error})


def _json_error(status: int, message: str) -> Reply:
    return Reply(status=status, body=_error_body(message, "invalid_request_error"))


def _invalid_key() -> Reply:
    body = _error_body("Incorrect API key provided", "invalid_request_error", "invalid_api_key")
    return Reply(status=401, body=body)


# --- I/O ------------------------------------------------------------------------------


async def _send(stream: trio.SocketStream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise _ClientGone from exc


async def _send_event(stream: trio.SocketStream, conn: h11.Connection, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        await _send(stream, data)


async def _receive(stream: trio.SocketStream) -> bytes:
    try:
        return await stream.receive_some(RECEIVE_BYTES)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise _ClientGone from exc


async def _next_event(stream: trio.SocketStream, conn: h11.Connection) -> Any:
    """The next h11 event, reading as needed (EOF is fed to h11, which decides)."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await _receive(stream))


def _eof_received(conn: h11.Connection) -> bool:
    return bool(conn.trailing_data[1])


async def _watch_for_client_close(
    stream: trio.SocketStream, conn: h11.Connection, scope: trio.CancelScope
) -> None:
    """While a response is sent: cancel ``scope`` when the client closes or resets the
    connection. What it sends meanwhile (a pipelined request) is kept for h11."""
    while True:
        try:
            data = await _receive(stream)
        except _ClientGone:
            data = b""
        conn.receive_data(data)
        if not data:
            scope.cancel()
            return


async def _try_send_bad_request(
    stream: trio.SocketStream, conn: h11.Connection, status: int
) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    body = _error_body("malformed HTTP request", "invalid_request_error")
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    try:
        await _send_event(stream, conn, h11.Response(status_code=status, headers=headers))
        await _send_event(stream, conn, h11.Data(data=body))
        await _send_event(stream, conn, h11.EndOfMessage())
    except _ClientGone:
        pass
