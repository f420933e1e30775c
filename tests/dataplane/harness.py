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
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from openclawd.protocol.ratelimit import RateLimiter
from openclawd.upstream.http import Upstreams

from ..bao import BaoServer

_paths = itertools.count()


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
    channels = Channels(cfg, upstreams, lifecycle, limiter=limiter)
    realtime_ = Realtime(cfg, keys, lifecycle, limiter)
    passthrough_ = Passthrough(cfg, upstreams, lifecycle, limiter)
    local = LocalServer(cfg.listen, lifecycle)
    local.websocket_routes["/v1/ws"] = channels.serve
    local.websocket_routes[realtime.PREFIX] = realtime_.serve
    local.routes[passthrough.PREFIX] = passthrough_.serve
    with UnixListenSocket(cfg.listen.socket, mode=0o600, gid=None, backlog=128, key="listen") as s:
        async with trio.open_nursery() as nursery:
            await nursery.start(keys.serve)
            async with trio.open_nursery() as connections:
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
