"""The data socket's front door: accept, identify the peer, read the request head, route.

Owns the app-facing listener and the connections on it: each accepted connection gets an
id (``c1``, ``c2``, ...) that every log line about it carries, its peer credentials, a
deadline for sending its request head (so a client trickling bytes cannot hold a slot), a
log line when it opens and when it closes, and a place in the connection nursery that the
daemon drains. The request head is parsed with h11; the route table maps a path prefix to
the handler of an entry point (``/v1/ws``, ``/v1/realtime/``, ``/v1/http/``). Entry points
register here as they are built; any other path is answered 404. During a drain new
connections are answered 503 ``draining``. Knows nothing of upstreams or keys.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11
import trio

from openclawd import logs
from openclawd.config import ListenConfig
from openclawd.lifecycle import Lifecycle
from openclawd.local.unix import PeerCredentials, peer_credentials

log = logs.get(__name__)

_MAX_HEAD_BYTES = 16 * 1024
_RECEIVE_BYTES = 64 * 1024


@dataclass(slots=True)
class Connection:
    """One accepted app connection, as the front door hands it to an entry point."""

    id: str
    stream: trio.SocketStream
    peer: PeerCredentials
    http: h11.Connection
    request: h11.Request

    async def respond_json(self, status: int, payload: object) -> None:
        """Send a complete JSON response and end the exchange (the connection then closes)."""
        await _send_json(self.stream, self.http, status, payload)


Handler = Callable[[Connection], Awaitable[None]]


def peer_allowed(peer: PeerCredentials, config: ListenConfig) -> bool:
    """``[listen] allowed_uids`` / ``allowed_gids``: each non-empty list is a check the
    peer must pass (an empty one checks nothing). The gid is the peer's primary group as
    the kernel reports it at connect()."""
    if config.allowed_uids and peer.uid not in config.allowed_uids:
        return False
    return not config.allowed_gids or peer.gid in config.allowed_gids


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    """The data socket's HTTP error shape (CONTRACT.md 3.3)."""
    return {"error": {"code": code, "message": message}}


class LocalServer:
    """Serves the data socket. ``routes`` maps a path prefix to an entry point's handler."""

    def __init__(self, config: ListenConfig, lifecycle: Lifecycle) -> None:
        self.config = config
        self.lifecycle = lifecycle
        self.routes: dict[str, Handler] = {}
        self._ids = itertools.count(1)
        self.clients = 0

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
            await trio.serve_listeners(self._handle, [listener], handler_nursery=handler_nursery)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn_id = f"c{next(self._ids)}"
        logs.connection_id.set(conn_id)
        started = trio.current_time()
        try:
            peer = peer_credentials(stream.socket)  # type: ignore[arg-type]
        except OSError as exc:
            log.warning("connection.no_peer_credentials", error=exc.strerror)
            await stream.aclose()
            return
        self.clients += 1
        log.info("connection.open", peer_uid=peer.uid, peer_pid=peer.pid)
        outcome = "closed"
        try:
            outcome = await self._serve_connection(conn_id, stream, peer)
        finally:
            self.clients -= 1
            await stream.aclose()
            log.info(
                "connection.close",
                outcome=outcome,
                duration_s=round(trio.current_time() - started, 3),
            )

    async def _serve_connection(
        self, conn_id: str, stream: trio.SocketStream, peer: PeerCredentials
    ) -> str:
        """Serve one connection; returns how it ended, for the close log line."""
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD_BYTES)
        request: h11.Request | None = None
        with trio.move_on_after(self.config.handshake_timeout_s) as head_scope:
            try:
                request = await _receive_head(stream, http)
            except h11.RemoteProtocolError as exc:
                # h11's message may quote the request's bytes (headers included): not echoed.
                await _send_json(
                    stream,
                    http,
                    exc.error_status_hint,
                    error_body("bad_request", "malformed HTTP request"),
                )
                return "bad request"
        if head_scope.cancelled_caught:
            return "handshake timeout"
        if request is None:
            return "closed before a request"

        conn = Connection(conn_id, stream, peer, http, request)
        path = request.target.decode("ascii", "replace").split("?", 1)[0]
        if not peer_allowed(peer, self.config):
            # 403 on every entry point for now; /v1/ws and /v1/realtime close with 1008
            # once they exist (CONTRACT.md 3.4).
            message = f"peer uid {peer.uid} gid {peer.gid} is not allowed"
            await conn.respond_json(403, error_body("forbidden", message))
            return "refused: peer not allowed"
        if self.lifecycle.draining or self.lifecycle.stopping:
            await conn.respond_json(503, error_body("draining", "openclawd is draining"))
            return "refused: draining"
        handler = self._route(path)
        if handler is None:
            await conn.respond_json(404, error_body("not_found", f"no entry point at {path}"))
            return "not found"
        await handler(conn)
        return "done"

    def _route(self, path: str) -> Handler | None:
        for prefix, handler in self.routes.items():
            if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
                return handler
        return None


async def _receive_head(stream: trio.SocketStream, http: h11.Connection) -> h11.Request | None:
    """Read until h11 has a whole request head; None if the peer left first.

    Raises:
        h11.RemoteProtocolError: the bytes are not an HTTP/1.1 request (or the head is
            larger than we accept).
    """
    while True:
        event = http.next_event()
        if isinstance(event, h11.Request):
            return event
        if event is not h11.NEED_DATA:
            return None  # ConnectionClosed before a request
        try:
            data = await stream.receive_some(_RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        http.receive_data(data)


async def _send_json(
    stream: trio.SocketStream, http: h11.Connection, status: int, payload: object
) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    data = http.send(h11.Response(status_code=status, headers=headers)) or b""
    data += http.send(h11.Data(data=body)) or b""
    data += http.send(h11.EndOfMessage()) or b""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(data)  # a peer that left has nothing to be told
