"""The data plane in the test's own trio run, with no process, no bao and no socket file.

The pieces are the daemon's own (``Admission``, ``Upstreams``, ``Channels``,
``Passthrough``, ``Realtime``, ``LocalServer``), wired as ``daemon.py`` wires them. What
is faked is what lies outside the daemon: the key source (``FakeKeys``, a fixed list of
keys), the HTTP upstream (``HttpUpstream``, an httpx transport that calls the test's
handler) and the WebSocket upstream (``WsUpstream``, a trio-websocket server on the
other end of a memory stream, opened through ``Realtime``'s ``open_stream``). Apps connect
through ``LocalServer.serve_stream`` over ``trio.testing.memory_stream_pair()`` (after
hypercorn's ``tests/trio/test_sanity.py``): ``HttpApp`` speaks h11, ``open_ws`` gives a
WebSocket client (``websockets``' sans-IO one, not the daemon's own library), ``WsApp``
reads /v1/ws frames by request id. Everything is causal, so tests run under
``autojump_clock`` and time is virtual: ``LIMIT_S`` bounds each test in virtual seconds,
so one that hangs fails at once.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import h11
import httpx
import trio
import trio.testing
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from openclawd import config
from openclawd.keys.manager import Key, fingerprint
from openclawd.lifecycle import Lifecycle
from openclawd.local import passthrough, realtime
from openclawd.local.channel import Channels
from openclawd.local.passthrough import Passthrough
from openclawd.local.realtime import Realtime
from openclawd.local.server import LocalServer
from openclawd.local.unix import PeerCredentials
from openclawd.protocol.exchange import Admission
from openclawd.protocol.limits import Limits
from openclawd.protocol.ratelimit import RateLimiter
from openclawd.tracing import NO_TRACER, Tracer
from openclawd.upstream.http import Upstreams
from openclawd.upstream.ws import Target

KEY = "sk-drv-0001"
NEW_KEY = "sk-drv-0002"
BASE_URL = "https://api.openai.test"
WS_URL = "wss://realtime.openai.test"
APP = PeerCredentials(pid=4242, uid=1000, gid=1000)
LIMIT_S = 600

HttpHandler = Callable[[httpx.Request], Awaitable[httpx.Response]]
WsScript = Callable[[WebSocketRequest, "WsUpstream"], Awaitable[None]]


class FakeKeys:
    """The key source: provider ``openai`` has ``secrets[0]`` (KV version 1); an
    upstream's refusal moves it on to the next secret, as a rotation found in Vault."""

    def __init__(self, *secrets: str) -> None:
        self.keys = [
            Key(
                provider="openai",
                version=version,
                index=0,
                fingerprint=fingerprint(secret),
                fetched_at=0.0,
                secret=secret,
            )
            for version, secret in enumerate(secrets or (KEY,), 1)
        ]
        self.at = 0
        self.failures: list[Key] = []  # the keys an upstream refused, in order
        self.providers = {"openai"}  # those that have a key (open_plane: every one)

    def current(self, provider: str) -> Key | None:
        return self.keys[self.at] if provider in self.providers else None

    async def auth_failure(self, provider: str, failed: Key) -> Key | None:
        await trio.lowlevel.checkpoint()
        self.failures.append(failed)
        self.at = min(self.at + 1, len(self.keys) - 1)
        return self.current(provider)


async def ok_json(request: httpx.Request) -> httpx.Response:
    """The default HTTP upstream: 200 with a small JSON body."""
    await request.aread()
    return httpx.Response(200, json={"ok": True})


class HttpUpstream(httpx.AsyncBaseTransport):
    """The HTTP upstream: each request is recorded and answered by ``handler``. Unlike
    ``httpx.MockTransport`` the request body is not read first: the handler reads it (or
    not) as it likes, so a test can see a body arrive as the app sends it."""

    def __init__(self, handler: HttpHandler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        response = await self.handler(request)
        if isinstance(response.stream, httpx.ByteStream):
            # httpx reads a Response(content=bytes) at once; a real transport's body is
            # a stream not read yet (the /v1/http relay reads it raw, as it comes).
            response = httpx.Response(
                response.status_code,
                headers=response.headers,
                stream=httpx.ByteStream(response.content),
                extensions=response.extensions,
            )
        return response


async def echo(request: WebSocketRequest, upstream: WsUpstream) -> None:
    """The default WebSocket upstream: accept, then echo every message until closed."""
    ws = await request.accept()
    await upstream.echo(ws)


@dataclass
class WsUpstream:
    """The WebSocket upstream: every session the daemon opens gets a memory stream whose
    other end is served here, by trio-websocket's ``wrap_server_stream`` and ``script``."""

    nursery: trio.Nursery
    script: WsScript = echo
    targets: list[Target] = field(default_factory=list)  # where each session went
    handshakes: list[WebSocketRequest] = field(default_factory=list)
    received: list[str | bytes] = field(default_factory=list)
    closes: list[tuple[int, str | None]] = field(default_factory=list)  # as seen here
    ended: trio.Event = field(default_factory=trio.Event)  # a session's script returned

    async def open_stream(self, to: Target) -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()
        self.targets.append(to)
        self.nursery.start_soon(self._serve, theirs)
        return ours

    async def _serve(self, stream: trio.abc.Stream) -> None:
        async with stream, trio.open_nursery() as reader:
            request = await trio_websocket.wrap_server_stream(reader, stream)
            self.handshakes.append(request)
            await self.script(request, self)
            reader.cancel_scope.cancel()
        self.ended.set()

    async def echo(self, ws: WebSocketConnection) -> None:
        """Echo every message until the connection closes; note how it closed."""
        try:
            while True:
                message = await ws.get_message()
                self.received.append(message)
                await ws.send_message(message)
        except ConnectionClosed:
            assert ws.closed is not None
            self.closes.append((ws.closed.code, ws.closed.reason))


@dataclass
class Plane:
    config: config.Config
    keys: FakeKeys
    lifecycle: Lifecycle
    limiter: RateLimiter
    upstream: HttpUpstream
    ws_upstream: WsUpstream
    upstreams: Upstreams
    channels: Channels
    passthrough: Passthrough
    realtime: Realtime
    local: LocalServer
    nursery: trio.Nursery  # the connections and the fake upstream's sessions

    def connect(self, peer: PeerCredentials = APP) -> trio.abc.Stream:
        """A new app connection, served as an accepted one; returns the app's end."""
        app, daemon = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.local.serve_stream, daemon, peer)
        return app


def make_config(
    listen: dict[str, Any] | None = None,
    provider: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    clients: dict[str, Any] | None = None,
    more_providers: dict[str, Any] | None = None,
    routes: dict[str, Any] | None = None,
) -> config.Config:
    tables: dict[str, Any] = {
        "listen": listen or {},
        "providers": {
            "openai": {
                "base_url": BASE_URL,
                "ws_url": WS_URL,
                "vault_path": "openclawd/openai",
                **(provider or {}),
            },
            **{
                name: {"vault_path": f"openclawd/{name}", **table}
                for name, table in (more_providers or {}).items()
            },
        },
        "limits": limits or {},
        "clients": clients or {},
        "routes": routes or {},
    }
    # Vault is never asked (the keys are FakeKeys'); the config only has to be valid.
    return config.parse(tables, environ={"VAULT_ADDR": "http://127.0.0.1:8200", "VAULT_TOKEN": "-"})


@asynccontextmanager
async def open_plane(
    http: HttpHandler = ok_json,
    ws: WsScript = echo,
    *,
    keys: FakeKeys | None = None,
    listen: dict[str, Any] | None = None,
    provider: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    clients: dict[str, Any] | None = None,
    more_providers: dict[str, Any] | None = None,
    routes: dict[str, Any] | None = None,
    tracer: Tracer = NO_TRACER,
) -> AsyncIterator[Plane]:
    """The data plane with provider ``openai`` (``provider`` adds to its table), its HTTP
    upstream answered by ``http``, its WebSocket upstream sessions run by ``ws``; each
    request's span made by ``tracer``."""
    cfg = make_config(listen, provider, limits, clients, more_providers, routes)
    keys = keys or FakeKeys()
    keys.providers = set(cfg.providers)
    lifecycle = Lifecycle()
    limiter = RateLimiter(cfg.limits.requests_per_minute)
    admission = Admission(lifecycle, [limiter], Limits.of(cfg, now=trio.current_time()))
    upstream = HttpUpstream(http)
    upstreams = Upstreams(cfg, keys, transport=upstream)
    async with trio.open_nursery() as nursery:
        ws_upstream = WsUpstream(nursery, ws)
        channels = Channels(cfg, upstreams, lifecycle, admission, tracer)
        passthrough_ = Passthrough(cfg, upstreams, lifecycle, admission, tracer)
        realtime_ = Realtime(
            cfg, keys, lifecycle, admission, open_stream=ws_upstream.open_stream, tracer=tracer
        )
        local = LocalServer(cfg.listen, lifecycle)
        local.websocket_routes["/v1/ws"] = channels.serve
        local.websocket_routes[realtime.PREFIX] = realtime_.serve
        local.routes[passthrough.PREFIX] = passthrough_.serve
        lifecycle.set_listening()
        try:
            yield Plane(
                cfg,
                keys,
                lifecycle,
                limiter,
                upstream,
                ws_upstream,
                upstreams,
                channels,
                passthrough_,
                realtime_,
                local,
                nursery,
            )
        finally:
            nursery.cancel_scope.cancel()
            await upstreams.aclose()


# --- apps ----------------------------------------------------------------------------------


class Closed(Exception):
    """The daemon closed the app's WebSocket with ``code`` (1006: without a close frame)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code, self.reason = code, reason


class WsClient:
    """An app's WebSocket, spoken with the ``websockets`` library's sans-IO client: not
    the daemon's own trio-websocket and wsproto, and it takes every close code the
    contract uses (wsproto 1.3 takes 1014 for a protocol error). ``read`` runs in a task
    of its own and answers pings as they come, as a real client does."""

    def __init__(self, stream: trio.abc.Stream, protocol: ClientProtocol) -> None:
        self.stream = stream
        self.protocol = protocol
        self._inbox, self._messages = trio.open_memory_channel[str | bytes](math.inf)
        self._parts: list[Frame] = []
        self.done = trio.Event()  # the connection has ended
        self.silent = False  # True: nothing more is sent (no pong, no close answered)
        self.close_at: float | None = None  # when the daemon's close frame came

    async def flush(self) -> None:
        for data in self.protocol.data_to_send():
            if (
                data and not self.silent
            ):  # (b"": the end of our side; the daemon closes the stream anyway)
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.stream.send_all(data)

    async def handshake(self) -> None:
        while True:
            await self._receive()
            for event in self.protocol.events_received():
                assert isinstance(event, Response), event
                if self.protocol.handshake_exc is not None:
                    raise self.protocol.handshake_exc
                return

    async def read(self) -> None:
        try:
            while self.protocol.state is not State.CLOSED:
                await self._receive()
                for event in self.protocol.events_received():
                    self._take(cast(Frame, event))
                await self.flush()
        finally:
            self._inbox.close()
            self.done.set()

    async def _receive(self) -> None:
        try:
            data = bytes(await self.stream.receive_some())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()

    def _take(self, frame: Frame) -> None:
        if frame.opcode is Opcode.CLOSE:
            self.close_at = trio.current_time()
        if frame.opcode not in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
            return  # pings are answered by the protocol, closes end the read
        self._parts.append(frame)
        if frame.fin:
            first, data = self._parts[0], b"".join(part.data for part in self._parts)
            self._parts.clear()
            self._inbox.send_nowait(data.decode() if first.opcode is Opcode.TEXT else data)

    async def get_message(self) -> str | bytes:
        """The next message.

        Raises:
            Closed: the connection ended first.
        """
        try:
            return await self._messages.receive()
        except trio.EndOfChannel:
            await self.done.wait()
            code, reason = self.protocol.close_code, self.protocol.close_reason
            raise Closed(code or 1006, reason or "") from None

    async def send_message(self, message: str | bytes) -> None:
        if isinstance(message, str):
            self.protocol.send_text(message.encode())
        else:
            self.protocol.send_binary(message)
        await self.flush()

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close (if the daemon has not), and wait for the connection's end."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason)
            await self.flush()
        await self.done.wait()


@asynccontextmanager
async def open_ws(
    plane: Plane,
    resource: str = "/v1/ws",
    *,
    peer: PeerCredentials = APP,
    headers: Iterable[tuple[str, str]] = (),
) -> AsyncIterator[WsClient]:
    """An app's WebSocket to ``resource``, through the front door."""
    protocol = ClientProtocol(parse_uri(f"ws://openclawd{resource}"), max_size=None)
    request = protocol.connect()
    for name, value in headers:
        request.headers[name] = value
    protocol.send_request(request)
    async with plane.connect(peer) as stream, trio.open_nursery() as nursery:
        ws = WsClient(stream, protocol)
        await ws.flush()
        await ws.handshake()
        nursery.start_soon(ws.read)
        yield ws
        await ws.aclose()


async def closed(ws: WsClient) -> tuple[int, str]:
    """Read until the daemon closes ``ws``: the close code and reason it sent (a message
    that comes first fails the test)."""
    try:
        message = await ws.get_message()
    except Closed as exc:
        return exc.code, exc.reason
    raise AssertionError(f"a message, not the close: {message!r}")


class WsApp:
    """An app on /v1/ws: send frames, read them back by request id."""

    def __init__(self, ws: WsClient, hello: dict[str, Any]) -> None:
        self.ws = ws
        self.hello = hello
        self._pending: list[dict[str, Any]] = []

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send_message(frame if isinstance(frame, str) else json.dumps(frame))

    async def request(self, rid: str, path: str = "/v1/chat/completions", **fields: Any) -> None:
        await self.send(
            {"type": "request", "id": rid, "provider": "openai", "path": path, **fields}
        )

    async def receive_for(self, rid: Any) -> dict[str, Any]:
        """The next frame about ``rid``; frames about other ids are kept for later."""
        for i, frame in enumerate(self._pending):
            if frame.get("id") == rid:
                return self._pending.pop(i)
        while True:
            received: dict[str, Any] = json.loads(await self.ws.get_message())
            if received.get("id") == rid:
                return received
            self._pending.append(received)

    async def exchange(self, rid: str) -> list[dict[str, Any]]:
        """Every frame of request ``rid`` up to its last (``response.end`` or ``error``)."""
        frames = [await self.receive_for(rid)]
        while frames[-1]["type"] not in ("response.end", "error"):
            frames.append(await self.receive_for(rid))
        return frames

    async def call(self, rid: str, **fields: Any) -> list[dict[str, Any]]:
        await self.request(rid, **fields)
        return await self.exchange(rid)


@asynccontextmanager
async def open_channel(plane: Plane, *, peer: PeerCredentials = APP) -> AsyncIterator[WsApp]:
    """An app on /v1/ws that has read its hello."""
    async with open_ws(plane, "/v1/ws", peer=peer) as ws:
        hello = json.loads(await ws.get_message())
        assert hello["type"] == "hello", hello
        yield WsApp(ws, hello)


@dataclass
class Answer:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]  # as received, in order
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v.decode("latin-1") for k, v in self.headers if k == name.encode()]
        return ", ".join(values) if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class HttpApp:
    """An app's HTTP/1.1 connection to the data socket, spoken with h11 event by event."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.http = h11.Connection(h11.CLIENT)

    async def send(self, event: h11.Event) -> None:
        data = self.http.send(event)
        if data:
            await self.stream.send_all(data)

    async def next_event(self) -> Any:
        while True:
            event = self.http.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.http.receive_data(bytes(await self.stream.receive_some()))

    async def send_head(
        self, method: str, target: str, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        await self.send(
            h11.Request(method=method, target=target, headers=[("host", "x"), *headers])
        )

    async def read_head(self) -> h11.Response:
        event = await self.next_event()
        assert isinstance(event, h11.Response), event
        return event

    async def read_body(self) -> bytes:
        body = bytearray()
        while not isinstance(event := await self.next_event(), h11.EndOfMessage):
            assert isinstance(event, h11.Data), event
            body += event.data
        return bytes(body)

    async def request(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> Answer:
        framing = [("content-length", str(len(body)))] if body else []
        await self.send_head(method, target, [*headers, *framing])
        if body:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())
        head = await self.read_head()
        return Answer(head.status_code, head.reason, list(head.headers), await self.read_body())


@asynccontextmanager
async def open_http(plane: Plane, *, peer: PeerCredentials = APP) -> AsyncIterator[HttpApp]:
    async with plane.connect(peer) as stream:
        yield HttpApp(stream)


async def call(
    plane: Plane,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    peer: PeerCredentials = APP,
) -> Answer:
    """One request on a connection of its own."""
    async with open_http(plane, peer=peer) as app:
        return await app.request(method, target, headers, body)
