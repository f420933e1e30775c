"""The app's side of a /v1/http request once its head is read: its body, and its leaving.

``AppBody`` reads the request body from the app's connection as the upstream takes it,
under the bound of ``message_timeout_s`` for the whole wait; ``watch_for_leaving`` notices
the app going once its request is all read. Used by ``local/passthrough.py`` only; knows
nothing of upstreams.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import h11
import trio

from openclawd.errors import ClientError, UnfinishedMessageError
from openclawd.local.http11 import Connection

_RECEIVE_BYTES = 64 * 1024


class AppBody:
    """The app's request body, read from its connection as the upstream takes it. The
    daemon may wait for its bytes ``timeout_s`` in all (a body trickled in, a byte just
    inside every gap the connection allows, holds an upstream connection too). Only that
    wait counts: not the time the upstream takes to take what was read."""

    def __init__(self, conn: Connection, on_complete: Callable[[], None], timeout_s: float) -> None:
        self._conn = conn
        self._on_complete = on_complete
        self._timeout_s = timeout_s
        self._waited_s = 0.0  # for the app's bytes, so far
        self.complete = False

    async def hold(self, limit: int) -> bytes:
        """Read up to ``limit`` bytes (more if a chunk crosses it); ``complete`` tells if
        that was the whole body."""
        parts: list[bytes] = []
        size = 0
        while size <= limit:
            data = await self._next()
            if data is None:
                break
            parts.append(data)
            size += len(data)
        return b"".join(parts)

    def stream(self, held: bytes) -> AsyncIterator[bytes]:
        """``held``, then the rest as it comes. An iterator, not a generator: when the
        upstream stops taking it midway there is nothing left open to close."""
        return BodyRest(self, held)

    async def _next(self) -> bytes | None:
        """The next piece of the body, or None at its end.

        Raises:
            ClientError: the body is malformed, stops coming for the connection's timeout,
                or the app closed the connection before its end.
            UnfinishedMessageError: ``timeout_s`` spent waiting for the body in all.
        """
        http = self._conn.http
        while not self.complete:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError:
                # Not h11's text: it quotes what it could not read (the app's bytes).
                raise ClientError("malformed request body") from None
            if isinstance(event, h11.Data):
                return bytes(event.data)
            if isinstance(event, h11.EndOfMessage):
                self.complete = True
                self._on_complete()
                break
            if event is not h11.NEED_DATA:
                raise ClientError("the app closed the connection before the end of its body")
            left_s = self._timeout_s - self._waited_s
            started = trio.current_time()
            with trio.move_on_after(min(self._conn.timeout_s, left_s)) as waited:
                data = await self._conn.stream.receive_some(_RECEIVE_BYTES)
            self._waited_s += trio.current_time() - started
            if waited.cancelled_caught:
                if self._waited_s >= self._timeout_s:
                    raise UnfinishedMessageError.of("request body", self._timeout_s)
                raise ClientError(f"no request body bytes for {self._conn.timeout_s:g}s")
            http.receive_data(data)
        return None


class BodyRest:
    """``AppBody.stream``'s iterator."""

    def __init__(self, body: AppBody, held: bytes) -> None:
        self._body = body
        self._held: bytes | None = held

    def __aiter__(self) -> BodyRest:
        return self

    async def __anext__(self) -> bytes:
        if self._held is not None:
            held, self._held = self._held, None
            return held
        data = await self._body._next()
        if data is None:
            raise StopAsyncIteration
        return data


async def watch_for_leaving(conn: Connection, gone: trio.CancelScope) -> None:
    """Once the app's request is all read, its side of the connection is quiet until the
    answer is out: an end of stream there means it left, and what it asked for is
    abandoned upstream at once (not after a read timeout). Bytes that do come (the next
    request, pipelined) are kept for h11, up to a bound, then left in the socket."""
    kept = 0
    while kept < _RECEIVE_BYTES:
        try:
            data = await conn.stream.receive_some(_RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            gone.cancel()  # the request's log line says "app gone" if it was still running
            return
        conn.http.receive_data(data)
        kept += len(data)
