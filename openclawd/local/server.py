"""The data socket's front door: accept, identify the peer, read the request head, route.

Owns the app-facing listener and the connections on it (accepted, or handed over in
process by ``serve_stream``): each connection gets an id (``c1``, ``c2``, ...) that every
log line about it carries, its peer credentials, a deadline for sending its request head
(so a client trickling bytes cannot hold a slot), a log line when it opens and when it
closes, and a place in the connection nursery that the daemon drains. The request head is
parsed with h11 and routed by path prefix: WebSocket entry points (``/v1/ws``,
``/v1/realtime/``) and plain HTTP ones (``/v1/http/``); any other path is answered 404.
The refusals every entry point shares are made here, each in its own kind (CONTRACT.md
3.4): a peer not allowed gets close 1008 or HTTP 403, a connection over
``max_connections`` close 1013 or 503, a new connection during a drain close 1013 or 503.
Whether a connection is within ``max_connections`` is decided once, when it is accepted: a
flood of new ones never turns an app already served away. While a flood is being refused,
at most ``REFUSING_AT_ONCE`` connections over the limit are open; the rest wait in the
listen backlog, so a flood cannot take the file descriptors upstream connections need. The
daemon cuts connections through ``Cutter`` (``local/cutter.py``): a deadline on every
connection's cancel scope, and the close a cut WebSocket gets (1012 at shutdown, 1001 at
the end of an operator's drain), chosen by the one who cuts. Knows nothing of upstreams
or keys.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import h11
import trio

from openclawd import logs, websocket
from openclawd.config import ListenConfig
from openclawd.errors import (
    BusyError,
    DrainingError,
    ForbiddenError,
    NotFoundError,
    OpenclawdError,
    UpgradeRequiredError,
)
from openclawd.lifecycle import Lifecycle
from openclawd.local.cutter import Close, Cutter
from openclawd.local.http11 import (
    MAX_HEAD_BYTES,
    AppStream,
    Connection,
    HandedStream,
    next_request,
)
from openclawd.local.unix import PeerCredentials, peer_credentials
from openclawd.protocol.closecodes import CloseCode
from openclawd.websocket import WebSocketConnection

log = logs.get(__name__)

_H = TypeVar("_H")
# Connections over max_connections open at once (each being told 1013 or 503); past this,
# accepting pauses until one closes.
REFUSING_AT_ONCE = 64
# A connection over max_connections has this long to send its request head, and to answer
# the close frame: a flood of silent ones must not hold the accept loop up for long.
_REFUSED_WAIT_S = 1.0
# accept() failing for want of resources (as trio.serve_listeners): wait, and try again.
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_RETRY_S = 0.1


@dataclass(frozen=True, slots=True)
class LocalStatistics:
    """A frozen snapshot of the data socket, for status and metrics."""

    clients: int  # open app connections, whatever they are doing
    connections: Mapping[str, int]  # kind ("ws", "realtime", "http", "pending") -> open
    closes: Mapping[int, int]  # close code -> WebSockets closed with it


Handler = Callable[[Connection], Awaitable[None]]
WebSocketHandler = Callable[[Connection, WebSocketConnection], Awaitable[Close | None]]


def peer_allowed(peer: PeerCredentials, config: ListenConfig) -> bool:
    """``[listen] allowed_uids`` / ``allowed_gids``: each non-empty list is a check the
    peer must pass (an empty one checks nothing). The gid is the peer's primary group as
    the kernel reports it at connect()."""
    if config.allowed_uids and peer.uid not in config.allowed_uids:
        return False
    return not config.allowed_gids or peer.gid in config.allowed_gids


class LocalServer:
    """Serves the data socket.

    ``routes`` and ``websocket_routes`` map a path prefix to an entry point's handler; a
    prefix ending in "/" matches every path under it, any other only itself. A WebSocket
    connection's kind (in statistics) is its route's last path segment (``/v1/ws`` ->
    ``ws``); a plain HTTP one is ``http``; one that has not sent a request yet ``pending``.
    """

    def __init__(self, config: ListenConfig, lifecycle: Lifecycle) -> None:
        self.config = config
        self.lifecycle = lifecycle
        self.routes: dict[str, Handler] = {}
        self.websocket_routes: dict[str, WebSocketHandler] = {}
        self._ids = itertools.count(1)
        self.clients = 0  # open connections, refused ones included
        self._admitted = 0  # of which within max_connections
        self._room = trio.lowlevel.ParkingLot()  # the accept loop, waiting for a close
        self._kinds: Counter[str] = Counter()
        self.closes: Counter[int] = Counter()  # close code -> WebSockets closed with it
        self.cutter = Cutter()

    def statistics(self) -> LocalStatistics:
        kinds = Counter(dict.fromkeys(self._kinds_served(), 0))
        kinds.update(self._kinds)
        return LocalStatistics(self.clients, dict(kinds), dict(self.closes))

    def _kinds_served(self) -> list[str]:
        return ["pending", "http", *(_kind(prefix) for prefix in self.websocket_routes)]

    async def serve(
        self,
        sock: socket.socket,
        handler_nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on ``sock`` until cancelled; connections live in ``handler_nursery``.

        Cancellation: cancelling this stops accepting only; connections already accepted
        run on in ``handler_nursery``, which the daemon drains and cancels.
        """
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        async with listener:
            task_status.started()
            await self.accept_loop(listener, handler_nursery)

    async def accept_loop(
        self, listener: trio.abc.Listener[trio.SocketStream], handler_nursery: trio.Nursery
    ) -> None:
        """Accept on ``listener`` until cancelled, admitting or refusing each connection
        as it comes. Out of files (or memory), ``accept`` is retried every
        ``_ACCEPT_RETRY_S``; logged once per shortage, not once per retry."""
        short = False
        while True:
            while self.clients - self._admitted >= REFUSING_AT_ONCE:
                await self._room.park()
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                if not short:
                    log.error("connection.accept_failed", error=exc.strerror, clients=self.clients)
                short = True
                await trio.sleep(_ACCEPT_RETRY_S)
                continue
            if short:
                log.info("connection.accept_recovered", clients=self.clients)
            short = False
            seen = self._count()
            handler_nursery.start_soon(self._handle, stream, seen, _peer_of(stream))

    async def serve_stream(self, stream: trio.abc.Stream, peer: PeerCredentials) -> None:
        """Serve one connection already open to a peer known to be ``peer``, as an
        accepted one is served (counted against ``max_connections``, refused, cut, logged)
        until it ends; the caller's task runs it. For a caller in the same process, such
        as a test over ``trio.testing.memory_stream_pair()``: no socket, no file.

        Cancellation: the connection is closed at once, as when the daemon cuts it.
        """
        await self._handle(HandedStream(stream), self._count(), lambda: peer)

    def _count(self) -> _Seen:
        """A new connection: within ``max_connections`` or not is decided now, once."""
        seen = _Seen(admitted=self._admitted < self.config.max_connections)
        self._admitted += seen.admitted
        self.clients += 1
        return seen

    async def _handle(
        self, stream: AppStream, seen: _Seen, identify: Callable[[], PeerCredentials]
    ) -> None:
        try:
            await self._handle_counted(stream, seen, identify)
        finally:
            self.clients -= 1
            self._admitted -= seen.admitted
            self._room.unpark_all()

    async def _handle_counted(
        self, stream: AppStream, seen: _Seen, identify: Callable[[], PeerCredentials]
    ) -> None:
        conn_id = f"c{next(self._ids)}"
        logs.connection_id.set(conn_id)
        started = trio.current_time()
        try:
            peer = identify()
        except OSError as exc:
            log.warning("connection.no_peer_credentials", error=exc.strerror)
            await stream.aclose()
            return
        self._kinds["pending"] += 1
        log.info("connection.open", peer_uid=peer.uid, peer_pid=peer.pid)
        outcome = "closed"
        try:
            with self.cutter.guard() as cut:
                outcome = await self._serve_connection(conn_id, stream, peer, seen)
            if cut.cancelled_caught:
                outcome = "cut"
        finally:
            self._kinds[seen.kind] -= 1
            with trio.CancelScope(shield=True):  # a cut connection still gets its line
                await stream.aclose()
            log.info(
                "connection.close",
                kind=seen.kind,
                peer_uid=peer.uid,
                peer_pid=peer.pid,
                outcome=outcome,
                code=seen.code,
                reason=seen.reason,
                duration_s=round(trio.current_time() - started, 3),
            )

    def _is(self, seen: _Seen, kind: str) -> None:
        """The connection turns out to be of ``kind``."""
        self._kinds[seen.kind] -= 1
        self._kinds[kind] += 1
        seen.kind = kind

    async def _serve_connection(
        self, conn_id: str, stream: AppStream, peer: PeerCredentials, seen: _Seen
    ) -> str:
        """Serve one connection, request after request while the app keeps it alive (plain
        HTTP); returns how it ended, for the close log line."""
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        served = 0
        while True:
            # The first head must come within handshake_timeout_s; so must the next one on
            # a kept-alive connection, or it is closed as idle.
            timeout_s = self.config.handshake_timeout_s
            if not seen.admitted:
                timeout_s = min(timeout_s, _REFUSED_WAIT_S)
            received = await next_request(stream, http, timeout_s, served)
            if isinstance(received, str):
                return received
            request, head = received
            conn = Connection(conn_id, stream, peer, http, request, head, timeout_s, self.cutter)
            ended = await self._route(conn, seen)
            if ended is not None:
                return ended
            served += 1
            if http.our_state is not h11.DONE or http.their_state is not h11.DONE:
                return f"served {served} requests"
            http.start_next_cycle()

    async def _route(self, conn: Connection, seen: _Seen) -> str | None:
        """Serve one request by its path; returns how the connection ended, or None when
        a plain HTTP handler answered it (the connection may carry another)."""
        path = conn.request.target.decode("latin-1").split("?", 1)[0]
        ws_prefix, ws_handler = _match(self.websocket_routes, path)
        if ws_handler is not None and websocket.is_upgrade(conn.request):
            self._is(seen, _kind(ws_prefix))
            return await self._serve_websocket(conn, ws_handler, seen)
        if seen.kind != "http":
            self._is(seen, "http")
        # Refused before routing: a peer that is not allowed learns nothing of the routes.
        refusal = self._refusal(conn.peer, seen)
        if refusal is not None:
            await conn.respond_error(refusal)
            return f"refused: {refusal}"
        if ws_handler is not None:
            # The route, not the path: what follows the prefix is the app's, maybe a key.
            # 426 names the protocol to upgrade to (RFC 9110 15.5.22).
            await conn.respond_error(
                UpgradeRequiredError(f"{ws_prefix} is a WebSocket endpoint"),
                [("upgrade", "websocket")],
            )
            return "bad request: not a WebSocket upgrade"
        _, handler = _match(self.routes, path)
        if handler is None:
            # Not the path: an app may have put a key where a name goes.
            await conn.respond_error(NotFoundError("no such route"))
            return "not found"
        try:
            await handler(conn)
        except Exception:
            # A bug ends this request alone, never the daemon.
            log.exception("connection.internal_error")
            if conn.http.our_state is h11.SEND_RESPONSE:
                await conn.respond_error(OpenclawdError("internal error"))
            return "internal error"
        return None

    def _refusal(self, peer: PeerCredentials, seen: _Seen) -> OpenclawdError | None:
        """Why a connection's request is refused (its code, HTTP status and close code
        are the error's), or None."""
        if not peer_allowed(peer, self.config):
            return ForbiddenError(f"peer uid {peer.uid} gid {peer.gid} is not allowed")
        if self.lifecycle.draining or self.lifecycle.stopping:
            return DrainingError("openclawd is draining")
        if not seen.admitted:
            return BusyError(f"over the connection limit ({self.config.max_connections})")
        return None

    async def _serve_websocket(
        self, conn: Connection, handler: WebSocketHandler, seen: _Seen
    ) -> str:
        async with trio.open_nursery() as nursery:
            try:
                return await self._run_websocket(nursery, conn, handler, seen)
            finally:
                # trio-websocket's reader may still wait on a peer that went quiet after the
                # close: it must not hold the connection (and its slot) open.
                nursery.cancel_scope.cancel()

    async def _run_websocket(
        self, nursery: trio.Nursery, conn: Connection, handler: WebSocketHandler, seen: _Seen
    ) -> str:
        ws: WebSocketConnection | None = None
        with trio.move_on_after(conn.timeout_s):
            conn.activity = websocket.Activity(message_timeout_s=self.config.message_timeout_s)
            conn.wire = websocket.ActivityStream(conn.stream, conn.activity, conn.head)
            with contextlib.suppress(websocket.ConnectionClosed):
                ws = await websocket.accept(
                    nursery, conn.wire, max_message_bytes=self.config.max_message_bytes
                )
        if ws is None:
            return "websocket handshake failed"
        refusal = self._refusal(conn.peer, seen)
        if refusal is not None:
            wait_s = websocket.CLOSE_TIMEOUT_S if seen.admitted else _REFUSED_WAIT_S
            return await self._close(ws, refusal.close_code, str(refusal), seen, wait_s=wait_s)
        outcome: tuple[int, str] | None = None
        try:
            try:
                close = await handler(conn, ws)
                outcome = (close.code, close.reason) if close else (CloseCode.NORMAL, "bye")
            except websocket.ConnectionClosed:
                outcome = (CloseCode.NORMAL, "bye")
            except OpenclawdError as exc:
                outcome = (exc.close_code, str(exc))
            except Exception:
                log.exception("connection.internal_error")
                outcome = (CloseCode.INTERNAL, "internal error")
        finally:
            if outcome is None:
                # Cut by the daemon (at shutdown, at the end of an operator's drain), with
                # the close it chose. The reader is cancelled too, so the peer's answer to
                # our close cannot be read: the close frame goes out and the connection is
                # closed behind it.
                cut = self.cutter.why or Close(CloseCode.INTERNAL, "connection cancelled")
                await self._close(ws, cut.code, cut.reason, seen, wait_s=websocket.CUT_CLOSE_WAIT_S)
        return await self._close(ws, *outcome, seen)

    async def _close(
        self,
        ws: WebSocketConnection,
        code: int,
        reason: str,
        seen: _Seen,
        *,
        wait_s: float = websocket.CLOSE_TIMEOUT_S,
    ) -> str:
        """Close ``ws`` (unless the peer or the library already did); returns the outcome
        for the connection's log line."""
        await websocket.close(ws, code, reason, wait_s=wait_s)
        closed = ws.closed
        if closed is not None and closed.code != code and closed.code != 1000:
            code, reason = closed.code, closed.reason or ""
        if seen.code is None:
            seen.code, seen.reason = int(code), reason
            self.closes[seen.code] += 1
        return f"closed {code} {reason}".rstrip()


@dataclass(slots=True)
class _Seen:
    """What one connection turned out to be, and how it was closed (a WebSocket)."""

    admitted: bool  # within max_connections when accepted
    kind: str = "pending"
    code: int | None = None
    reason: str | None = None


def _peer_of(stream: trio.SocketStream) -> Callable[[], PeerCredentials]:
    """Who is on the other end of an accepted connection, read (SO_PEERCRED) when its
    task starts."""
    return functools.partial(peer_credentials, stream.socket)  # type: ignore[arg-type]


def _kind(prefix: str) -> str:
    return prefix.strip("/").rsplit("/", 1)[-1]


def _match(routes: Mapping[str, _H], path: str) -> tuple[str, _H | None]:
    for prefix, handler in routes.items():
        if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
            return prefix, handler
    return "", None
