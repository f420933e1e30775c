"""Upstream WebSocket sessions: connect to a provider's ``ws_url`` with its key.

Owns where a session goes (``ws_url`` + the app's path and query, CONTRACT.md 3.2), the
TCP connection and its TLS (verified against the system CA store, never a fallback to an
unverified connection), the key in the provider's auth header, the connect timeout, and
the translation of each way a connect fails into our errors, whose close codes are the
contract's: refused key 1008, upstream 429 1013, anything else 1014. It does not relay:
``local/realtime.py`` does, over the connection returned here.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

from openclawd import websocket
from openclawd.config import ProviderConfig
from openclawd.errors import UpstreamConnectionError, UpstreamTimeoutError
from openclawd.keys.manager import Key
from openclawd.upstream.request import add_missing, with_query
from openclawd.upstream.transport import tls_failure
from openclawd.websocket import Activity, WebSocketConnection

_DEFAULT_PORTS = {"ws": 80, "wss": 443}
NO_QUERY: Mapping[str, str] = {}


@dataclass(frozen=True, slots=True)
class Target:
    """Where an upstream session goes."""

    tls: bool
    host: str  # for the connection and TLS (no brackets)
    port: int
    host_header: str
    resource: str  # path and query

    @property
    def url(self) -> str:
        """The URL without its query (which is the app's and may be long): for logs."""
        return f"{'wss' if self.tls else 'ws'}://{self.host_header}{self.resource.split('?')[0]}"


def target(ws_url: str, path: str, query: str, defaults: Mapping[str, str] = NO_QUERY) -> Target:
    """``ws_url`` + ``path`` (empty: ``/v1/realtime``) + ``query`` (after ``ws_url``'s
    own query, if it has one), with the provider's ``query`` parameters (``defaults``)
    the app's query does not name."""
    parts = urlsplit(ws_url)
    tls = parts.scheme == "wss"
    host = parts.hostname or ""
    port = parts.port or _DEFAULT_PORTS[parts.scheme]
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == _DEFAULT_PORTS[parts.scheme] else f"{shown}:{port}"
    resource = parts.path.rstrip("/") + (path or "/v1/realtime")
    # ws_url's own query first, then the app's (with the provider's defaults).
    query = with_query(f"?{query}", defaults)[1:]
    joined = "&".join(q for q in (parts.query, query) if q)
    if joined:
        resource += f"?{joined}"
    return Target(tls, host, port, host_header, resource)


# Opens the connection under a session to a ``Target``: TCP, then TLS for wss:// by default
# (``_open_stream``); a test gives one end of a memory stream. Raises
# UpstreamConnectionError when it cannot connect; the connect timeout is the caller's.
StreamOpener = Callable[[Target], Awaitable[trio.abc.Stream]]


@dataclass(frozen=True, slots=True)
class UpstreamSession:
    """An open upstream WebSocket and the connection under it."""

    ws: WebSocketConnection
    stream: trio.abc.Stream
    wire: websocket.ActivityStream  # ``stream`` as the WebSocket reads it

    @property
    def closed(self) -> websocket.CloseReason | None:
        """How the upstream closed, with the code its close frame carried."""
        return websocket.closed_as_sent(self.ws, self.wire)

    async def aclose(
        self, code: int, reason: str, *, wait_s: float = websocket.CLOSE_TIMEOUT_S
    ) -> None:
        """Close the WebSocket (waiting at most ``wait_s`` for the peer's answer), then the
        connection: trio-websocket leaves it open when the peer closed first or dropped."""
        try:
            await websocket.close(self.ws, code, reason, wait_s=wait_s)
        finally:
            await trio.aclose_forcefully(self.stream)


@functools.cache
def _system_tls() -> ssl.SSLContext:
    # Built once: loading the CA store takes milliseconds, sessions come often.
    return ssl.create_default_context()


async def open_session(
    nursery: trio.Nursery,
    config: ProviderConfig,
    key: Key,
    to: Target,
    *,
    headers: Sequence[tuple[str, str]] = (),
    max_message_bytes: int,
    activity: Activity,
    ssl_context: ssl.SSLContext | None = None,
    open_stream: StreamOpener | None = None,
) -> UpstreamSession:
    """Connect to ``to`` and complete the WebSocket handshake, with ``key`` in the
    provider's auth header, ``headers`` and the provider's ``headers`` the app did not
    send besides, within ``connect_timeout_s``.

    ``nursery`` runs the connection's reader task: it must outlive the session, which the
    caller ends with ``aclose``. Every byte either way is noted in ``activity`` (liveness).
    ``open_stream`` opens the connection (default: TCP, and TLS for wss:// verified against
    ``ssl_context``, else the system CA store).
    Raises:
        UpstreamRejectedError: the upstream answered the handshake with an HTTP status.
        UpstreamConnectionError: no connection, a TLS failure, or a close mid-handshake.
        UpstreamTimeoutError: no handshake within ``connect_timeout_s``.
    """
    auth = (
        config.auth_header,
        f"{config.auth_scheme} {key.secret}" if config.auth_scheme else key.secret,
    )
    sent = [(k, v) for k, v in headers if k.lower() != config.auth_header.lower()]
    add_missing(sent, config.headers.items())
    stream: trio.abc.Stream | None = None
    connected = False
    try:
        with trio.move_on_after(config.connect_timeout_s):
            if open_stream is None:
                stream = await _open_stream(to, ssl_context or _system_tls())
            else:
                stream = await open_stream(to)
            wire = websocket.ActivityStream(stream, activity)
            session = UpstreamSession(
                await websocket.connect(
                    nursery,
                    wire,
                    host=to.host_header,
                    resource=to.resource,
                    headers=[*sent, auth],
                    max_message_bytes=max_message_bytes,
                ),
                stream,
                wire,
            )
            connected = True
            return session
    finally:
        if not connected and stream is not None:
            await trio.aclose_forcefully(stream)
    raise UpstreamTimeoutError(
        f"no upstream handshake within connect_timeout_s={config.connect_timeout_s:g}"
    )


async def _open_stream(to: Target, tls: ssl.SSLContext) -> trio.abc.Stream:
    try:
        tcp = await trio.open_tcp_stream(to.host, to.port)
    except OSError as exc:
        raise UpstreamConnectionError(f"cannot connect to the upstream: {exc}") from exc
    if not to.tls:
        return tcp
    secure = trio.SSLStream(tcp, tls, server_hostname=to.host, https_compatible=True)
    done = False
    try:
        await secure.do_handshake()
        done = True
    except trio.BrokenResourceError as exc:
        raise UpstreamConnectionError(f"upstream {tls_failure(exc)}") from exc
    finally:
        if not done:  # failed, or timed out: the caller never sees this connection
            await trio.aclose_forcefully(tcp)
    return secure
