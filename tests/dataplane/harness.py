"""The data plane assembled in the test's own trio run: keys from a real bao, the upstream
pools, the /v1/ws channel on a real unix socket, and an app-side WebSocket client.

The pieces are the daemon's own (KeyManager, Upstreams, Channels, LocalServer); only the
process, signals and control API are left out, so each test starts in a fraction of a
second and can look inside (the lifecycle, the pools' statistics).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import trio
import trio_websocket
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, unix_connect

from openclawd import config
from openclawd.keys.manager import KeyManager
from openclawd.keys.vault import Vault
from openclawd.lifecycle import Lifecycle
from openclawd.local import passthrough, realtime
from openclawd.local.channel import Channels
from openclawd.local.passthrough import Passthrough
from openclawd.local.realtime import Realtime
from openclawd.local.server import LocalServer
from openclawd.local.unix import UnixListenSocket
from openclawd.protocol.exchange import Admission
from openclawd.protocol.limits import Limits
from openclawd.protocol.ratelimit import RateLimiter
from openclawd.upstream.http import Upstreams

from ..bao import BaoServer
from ..fake_upstream import open_fake_upstream

_paths = itertools.count()
# [listen] settings under which a silent peer is noticed within half a second.
FAST_PINGS = {"ping_interval_s": 0.2, "ping_timeout_s": 0.3}


@dataclass
class DataPlane:
    socket_path: str
    config: config.Config
    lifecycle: Lifecycle
    keys: KeyManager
    upstreams: Upstreams
    channels: Channels
    local: LocalServer
    vault_path: str
    realtime: Realtime
    passthrough: Passthrough
    connections: trio.Nursery  # every app connection runs here: cancel it to cut them


def current_rss() -> int:
    """This process's resident set now (not its peak, which an earlier test may hold)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def unique_vault_path() -> str:
    return f"openclawd/test{next(_paths)}"


@asynccontextmanager
async def open_dataplane(
    bao: BaoServer,
    runtime: Path,
    upstream_url: str,
    *,
    key: str | list[str] = "sk-test-0001",
    listen: dict[str, Any] | None = None,
    provider: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    refresh_interval_s: float = 0.2,
) -> AsyncIterator[DataPlane]:
    """Serve the data socket (/v1/ws, /v1/realtime, /v1/http) on ``runtime/data.sock``
    with provider ``openai`` at ``upstream_url`` (``provider`` may add a ``ws_url``) and
    ``key`` written to a fresh path of ``bao``; returns once the key is loaded."""
    vault_path = unique_vault_path()
    await trio.to_thread.run_sync(lambda: bao.write(vault_path, api_key=key))
    token_file = runtime / "vault-token"
    token_file.write_text(bao.root_token + "\n")
    tables: dict[str, Any] = {
        "listen": {"socket": str(runtime / "data.sock"), **(listen or {})},
        "vault": {
            "addr": bao.addr,
            "auth": "token",
            "token_file": str(token_file),
            "refresh_interval_s": refresh_interval_s,
            "request_timeout_s": 2.0,
        },
        "providers": {
            "openai": {"base_url": upstream_url, "vault_path": vault_path, **(provider or {})}
        },
        "limits": limits or {},
    }
    cfg = config.parse(tables, source=str(runtime / "openclawd.toml"), environ={})
    lifecycle = Lifecycle()
    keys = KeyManager(cfg, Vault(cfg.vault), lifecycle)
    upstreams = Upstreams(cfg, keys)
    limiter = RateLimiter(cfg.limits.requests_per_minute)
    admission = Admission(lifecycle, [limiter], Limits.of(cfg, now=trio.current_time()))
    channels = Channels(cfg, upstreams, lifecycle, admission)
    realtime_ = Realtime(cfg, keys, lifecycle, admission)
    passthrough_ = Passthrough(cfg, upstreams, lifecycle, admission)
    local = LocalServer(cfg.listen, lifecycle)
    local.websocket_routes["/v1/ws"] = channels.serve
    local.websocket_routes[realtime.PREFIX] = realtime_.serve
    local.routes[passthrough.PREFIX] = passthrough_.serve
    with UnixListenSocket(cfg.listen.socket, mode=0o600, gid=None, backlog=128, key="listen") as s:
        async with trio.open_nursery() as nursery:
            await nursery.start(keys.serve)
            # In a task of its own, not around the test's body: a test that cuts the
            # connections (as the daemon does at shutdown) must not cut itself.
            connections: trio.Nursery = await nursery.start(_hold_nursery)
            await nursery.start(local.serve, s.sock, connections)
            lifecycle.set_listening()
            while keys.current("openai") is None:  # noqa: ASYNC110 - no change event
                await trio.sleep(0.01)
            try:
                yield DataPlane(
                    cfg.listen.socket,
                    cfg,
                    lifecycle,
                    keys,
                    upstreams,
                    channels,
                    local,
                    vault_path,
                    realtime_,
                    passthrough_,
                    connections,
                )
            finally:
                connections.cancel_scope.cancel()
                nursery.cancel_scope.cancel()
                await upstreams.aclose()


async def _hold_nursery(*, task_status: trio.TaskStatus[trio.Nursery]) -> None:
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()


class AppClient:
    """An app on the /v1/ws channel: send frames, read them back by request id."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, hello: dict[str, Any]) -> None:
        self.ws = ws
        self.hello = hello
        self._pending: list[dict[str, Any]] = []

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        if isinstance(frame, dict):
            frame = json.dumps(frame)
        await self.ws.send_message(frame)

    async def request(self, rid: str, path: str = "/v1/chat/completions", **fields: Any) -> None:
        frame = {"type": "request", "id": rid, "provider": "openai", "path": path}
        frame.update(fields)
        await self.send(frame)

    async def call(
        self, rid: str, path: str = "/v1/chat/completions", **fields: Any
    ) -> list[dict[str, Any]]:
        """Send a request and return its frames, up to its last."""
        await self.request(rid, path, **fields)
        return await self.exchange(rid)

    async def receive(self) -> dict[str, Any]:
        if self._pending:
            return self._pending.pop(0)
        message = await self.ws.get_message()
        assert isinstance(message, str)
        frame: dict[str, Any] = json.loads(message)
        return frame

    async def receive_for(self, rid: Any) -> dict[str, Any]:
        """The next frame about ``rid``; frames about other ids are kept for later."""
        for i, frame in enumerate(self._pending):
            if frame.get("id") == rid:
                return self._pending.pop(i)
        while True:
            message = await self.ws.get_message()
            assert isinstance(message, str)
            frame = json.loads(message)
            if frame.get("id") == rid:
                return frame
            self._pending.append(frame)

    async def exchange(self, rid: str) -> list[dict[str, Any]]:
        """Every frame of request ``rid`` up to its last (``response.end`` or ``error``)."""
        frames = []
        while True:
            frame = await self.receive_for(rid)
            frames.append(frame)
            if frame["type"] in ("response.end", "error"):
                return frames


@asynccontextmanager
async def open_app(
    path: str, *, max_message_size: int = 64 * 1024 * 1024
) -> AsyncIterator[AppClient]:
    """A WebSocket client on /v1/ws over the unix socket at ``path``; reads the hello."""
    stream = await trio.open_unix_socket(path)
    # trio-websocket's client leaves the stream open when the server closed first.
    async with stream, trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(
            nursery, stream, "openclawd", "/v1/ws", max_message_size=max_message_size
        )
        try:
            hello = json.loads(await ws.get_message())
            assert hello["type"] == "hello"
            yield AppClient(ws, hello)
        finally:
            with trio.move_on_after(2) as scope:
                scope.shield = True
                await ws.aclose()
            nursery.cancel_scope.cancel()


class RealtimeApp:
    """An app's realtime session through the daemon, with the ``websockets`` sync client
    driven from worker threads (every call has a timeout: a thread cannot be cancelled)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send(self, message: str | bytes) -> None:
        await trio.to_thread.run_sync(self.ws.send, message)

    async def recv(self, timeout_s: float = 5.0) -> str | bytes:
        return await trio.to_thread.run_sync(self.ws.recv, timeout_s)

    async def closed(self, timeout_s: float = 10.0) -> tuple[int, str]:
        """Read until the daemon closes; the close code and reason it sent (1006: none)."""

        def wait() -> tuple[int, str]:
            try:
                while True:
                    self.ws.recv(timeout_s)
            except ConnectionClosed as exc:
                if exc.rcvd is None:
                    return 1006, ""
                return exc.rcvd.code, exc.rcvd.reason

        return await trio.to_thread.run_sync(wait)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await trio.to_thread.run_sync(self.ws.close, code, reason)


@asynccontextmanager
async def open_realtime(
    socket_path: str,
    resource: str = "/v1/realtime/openai",
    headers: dict[str, str] | None = None,
    **options: Any,
) -> AsyncIterator[RealtimeApp]:
    stack = ExitStack()

    def connect() -> ClientConnection:
        client = unix_connect(
            socket_path,
            f"ws://openclawd{resource}",
            additional_headers=headers,
            open_timeout=5,
            close_timeout=2,
            **options,
        )
        ws: ClientConnection = stack.enter_context(client)
        return ws

    ws = await trio.to_thread.run_sync(connect)
    try:
        yield RealtimeApp(ws)
    finally:
        await trio.to_thread.run_sync(stack.close)


async def close_of(socket_path: str, resource: str = "/v1/realtime/openai") -> tuple[int, str]:
    """Open a session and return how the daemon closes it, the app sending nothing."""
    async with open_realtime(socket_path, resource) as app:
        return await app.closed()


@asynccontextmanager
async def realtime_plane(
    bao: BaoServer,
    runtime: Path,
    ws_url: str,
    *,
    key: str = "sk-rt-0001",  # test_realtime.KEY
    provider: dict[str, Any] | None = None,
    **options: Any,
) -> AsyncIterator[DataPlane]:
    async with (
        open_fake_upstream() as http_up,
        open_dataplane(
            bao,
            runtime,
            http_up.url,
            key=key,
            provider={"ws_url": ws_url, **(provider or {})},
            **options,
        ) as dp,
    ):
        yield dp


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-cased names; repeated ones joined with ", "
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class AppConnection:
    """One app connection to the data socket, spoken with h11 so each byte is controlled."""

    def __init__(self, stream: trio.SocketStream) -> None:
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
            self.http.receive_data(await self.stream.receive_some(64 * 1024))

    async def send_head(
        self, method: str, target: str, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        head = [("host", "openclawd"), *headers]
        await self.send(h11.Request(method=method, target=target, headers=head))

    async def read_response(self) -> Answer:
        event = await self.next_event()
        assert isinstance(event, h11.Response), event
        headers: dict[str, str] = {}
        for raw_name, raw_value in event.headers:
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        body = bytearray()
        while True:
            part = await self.next_event()
            if isinstance(part, h11.EndOfMessage):
                break
            assert isinstance(part, h11.Data), part
            body += part.data
        answer = Answer(event.status_code, headers, bytes(body))
        if self.http.our_state is h11.DONE and self.http.their_state is h11.DONE:
            self.http.start_next_cycle()  # kept alive: ready for the next request
        return answer

    async def request(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | None = None,
    ) -> Answer:
        head = list(headers)
        if body is not None:
            head.append(("content-length", str(len(body))))
        await self.send_head(method, target, head)
        if body:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())
        return await self.read_response()

    @property
    def kept_alive(self) -> bool:
        """Both sides are ready for another request on this connection."""
        return self.http.our_state is h11.IDLE and self.http.their_state is h11.IDLE


@asynccontextmanager
async def open_http(socket_path: str) -> AsyncIterator[AppConnection]:
    stream = await trio.open_unix_socket(socket_path)
    async with stream:
        yield AppConnection(stream)


async def call(
    socket_path: str,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | None = None,
) -> Answer:
    """One request on a connection of its own."""
    async with open_http(socket_path) as app:
        return await app.request(method, target, headers, body)


def client_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One masked client frame, payload under 126 bytes (``fin``: its message's last)."""
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", (0x80 if fin else 0) | opcode, 0x80 | len(payload)) + mask + masked


def server_frames(data: bytes) -> tuple[list[int], bytes]:
    """Opcodes of the (unmasked, short) frames a server sent, and the last payload."""
    opcodes, payload = [], b""
    while data:
        length = data[1] & 0x7F
        assert length < 126
        opcodes.append(data[0] & 0x0F)
        payload, data = data[2 : 2 + length], data[2 + length :]
    return opcodes, payload
