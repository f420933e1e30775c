"""The data socket's HTTP/1.1 pieces: one app connection as an entry point gets it, and
the answers the front door and the entry points write on it.

``Connection`` carries the parsed request head (h11), the peer and the stream;
``respond_json`` / ``respond_error`` write a whole JSON answer in the contract's error
shape (CONTRACT.md 3.3), then read and drop what is left of the request body, up to a
bound. ``next_request`` reads the next request head within a deadline. Status lines
always carry a reason phrase.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus

import h11
import trio

from openclawd import websocket
from openclawd.config import ClientConfig
from openclawd.errors import OpenclawdError, RateLimitedError
from openclawd.local.cutter import Cutter
from openclawd.local.unix import PeerCredentials

MAX_HEAD_BYTES = 16 * 1024  # a request head larger than this is refused
_RECEIVE_BYTES = 64 * 1024
# What is read (and dropped) of a request body the daemon answered without reading it.
_DISCARD_BYTES = 1024 * 1024
_DISCARD_TIMEOUT_S = 1.0


class HandedStream(trio.abc.Stream):
    """A stream handed to ``serve_stream``, read as a socket is: in ``bytes`` (h11 takes
    bytes; a memory stream gives bytearrays)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self._stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


# An app's connection: accepted on the data socket, or handed to serve_stream.
AppStream = trio.SocketStream | HandedStream


@dataclass(slots=True)
class Connection:
    """One accepted app connection, as the front door hands it to an entry point."""

    id: str
    stream: AppStream
    peer: PeerCredentials
    http: h11.Connection
    request: h11.Request
    head: bytes  # every byte read so far (the head, maybe more), for a WebSocket handshake
    timeout_s: float  # longest wait for the app's next bytes (head, body)
    cutter: Cutter  # why the connection was cut, if the daemon cut it
    activity: websocket.Activity | None = None  # a WebSocket's last sign of life
    wire: websocket.ActivityStream | None = None  # the stream under a WebSocket
    client: ClientConfig | None = None  # who is calling (CONTRACT.md 5.1), once known

    async def respond_json(
        self, status: int, payload: object, headers: Sequence[tuple[str, str]] = ()
    ) -> int | None:
        """Send a complete JSON response and end the exchange: the connection then closes,
        after what is left of the request body (up to a bound) has been read, so the app
        is not cut off mid-upload before it can read the answer. Returns the body bytes
        written, or None if the app had left."""
        written = await _send_json(self.stream, self.http, status, payload, headers)
        await _discard_body(self.stream, self.http)
        return written

    async def respond_error(
        self, error: OpenclawdError, headers: Sequence[tuple[str, str]] = ()
    ) -> int | None:
        """``respond_json`` with the contract's error shape, status and code of ``error``
        (a rate limit also says when to try again)."""
        if isinstance(error, RateLimitedError):
            headers = [*headers, ("retry-after", str(max(1, math.ceil(error.retry_after_s))))]
        body = error_body(error.code, str(error))
        return await self.respond_json(error.http_status, body, headers)


def reason_phrase(status: int, given: str = "") -> bytes:
    """The reason phrase of a status line: ``given`` (an upstream's own), else the
    standard one (``404`` -> ``Not Found``); empty only for a code with no standard
    phrase. h11 would send ``HTTP/1.1 404 `` for an empty one, which some clients show."""
    if given:
        return given.encode("latin-1", "replace")
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    """The data socket's HTTP error shape (CONTRACT.md 3.3)."""
    return {"error": {"code": code, "message": message}}


async def next_request(
    stream: AppStream, http: h11.Connection, timeout_s: float, served: int
) -> tuple[h11.Request, bytes] | str:
    """The next request's head (and every byte read), or how the connection ended
    before one came (``served`` requests after the first), for the close log line."""
    received: tuple[h11.Request | None, bytes] = (None, b"")
    with trio.move_on_after(timeout_s) as head_scope:
        try:
            received = await _receive_head(stream, http)
        except h11.RemoteProtocolError as exc:
            # h11's message may quote the request's bytes (headers included): not echoed.
            body = error_body("bad_request", "malformed HTTP request")
            await _send_json(stream, http, exc.error_status_hint, body)
            return "bad request"
    if head_scope.cancelled_caught:
        return "idle" if served else "handshake timeout"
    request, head = received
    if request is None:
        return f"closed after {served} requests" if served else "closed before a request"
    return request, head


async def _receive_head(
    stream: AppStream, http: h11.Connection
) -> tuple[h11.Request | None, bytes]:
    """Read until h11 has a whole request head; None if the peer left first. Also returns
    every byte read, for a WebSocket handshake to read again.

    Raises:
        h11.RemoteProtocolError: the bytes are not an HTTP/1.1 request (or the head is
            larger than we accept).
    """
    # What the previous request on this connection left unread starts this one.
    received = bytearray(http.trailing_data[0])
    while True:
        event = http.next_event()
        if isinstance(event, h11.Request):
            return event, bytes(received)
        if event is not h11.NEED_DATA:
            return None, b""  # ConnectionClosed before a request
        try:
            data = await stream.receive_some(_RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None, b""
        received += data
        http.receive_data(data)


async def _send_json(
    stream: AppStream,
    http: h11.Connection,
    status: int,
    payload: object,
    extra_headers: Sequence[tuple[str, str]] = (),
) -> int | None:
    """Send a whole JSON response, then close; returns the body bytes written, or None
    if the peer had left. An ``upgrade`` header is named in ``Connection`` too."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    upgrade = any(name == "upgrade" for name, _ in extra_headers)
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        *extra_headers,
        ("connection", "Upgrade, close" if upgrade else "close"),
    ]
    head = h11.Response(status_code=status, headers=headers, reason=reason_phrase(status))
    data = http.send(head) or b""
    data += http.send(h11.Data(data=body)) or b""
    data += http.send(h11.EndOfMessage()) or b""
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return None  # a peer that left has nothing to be told
    return len(body)


async def _discard_body(stream: AppStream, http: h11.Connection) -> None:
    """Read and drop what the app still sends of its request body, up to a bound."""
    if http.they_are_waiting_for_100_continue:
        return  # it sends nothing until told to go on; it is told to stop
    dropped = 0
    with trio.move_on_after(_DISCARD_TIMEOUT_S):
        while http.their_state is h11.SEND_BODY and dropped <= _DISCARD_BYTES:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError:
                return
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(_RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                http.receive_data(data)
                if not data:
                    return
            elif isinstance(event, h11.Data):
                dropped += len(event.data)
