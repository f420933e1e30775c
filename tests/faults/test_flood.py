"""A flood of app connections against the real daemon process: the limit holds with 1013,
the apps already served are served on, and the daemon takes new ones once the flood ends.
10,000 connections over the default ``max_connections`` (1,024): about 8 s on two cores.
"""

from __future__ import annotations

import logging
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from openclawd.listeners import raise_file_limit
from openclawd.local.server import REFUSING_AT_ONCE

from ..bao import BaoServer
from ..conftest import DaemonProcess
from ..dataplane.daemon_process import curl_json, running_daemon
from ..dataplane.harness import open_app, open_dataplane, open_http
from ..fake_upstream import open_fake_upstream
from .test_app_side import complete_opcodes, handshake, server_frames

KEY = "sk-flood-0001"
CHAT = "/v1/http/openai/v1/chat/completions"
CONNECTING_AT_ONCE = 512  # under the listen backlog (4,096 at least): no connect fails


class Flood:
    """``n`` raw /v1/ws connections, opened as fast as the daemon takes them; those it
    admits (the hello came) are held open until ``release``."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.outcomes: Counter[str] = Counter()
        self.refusals: Counter[bytes] = Counter()  # the close frames' payloads
        self.release = trio.Event()

    async def run(self, n: int) -> None:
        limiter = trio.CapacityLimiter(CONNECTING_AT_ONCE)
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(self._one, limiter)

    async def _one(self, limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            stream = await trio.open_unix_socket(self.socket_path)
            first = await first_frame(stream)
        async with stream:
            if first is None:  # the hello: admitted, and held
                self.outcomes["admitted"] += 1
                await self.release.wait()
            else:
                self.outcomes["refused"] += 1
                self.refusals[first] += 1


async def first_frame(stream: trio.SocketStream) -> bytes | None:
    """Open /v1/ws on ``stream`` and read the daemon's first frame: None for the hello, the
    close frame's payload for a close."""
    head, _, frames = (await handshake(stream)).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    while not complete_opcodes(frames):
        data = await stream.receive_some()
        assert data, "closed without a frame"
        frames += data
    if complete_opcodes(frames)[0] == 0x1:
        return None
    while complete_opcodes(frames) != [0x8]:
        frames += await stream.receive_some()
    return server_frames(frames)[1]


async def open_clients(control: Path) -> int:
    status, body = await curl_json(control, "/v1/status")
    assert status == 200
    clients: int = body["connections"]["clients"]
    return clients


async def flood_the_daemon(
    bao: BaoServer,
    runtime: Path,
    start_daemon: Callable[..., DaemonProcess],
    *,
    n: int,
    max_connections: int,
) -> None:
    control = runtime / "control.sock"
    async with running_daemon(
        bao,
        runtime,
        start_daemon,
        KEY,
        # The flood's raw sockets never answer a ping: none is sent while it lasts.
        listen={
            "max_connections": max_connections,
            "handshake_timeout_s": 120.0,
            "ping_interval_s": 600.0,
        },
    ) as (daemon, _, _):
        socket_path = str(runtime / "data.sock")
        async with open_app(socket_path) as app, open_http(socket_path) as http:
            # Two apps served before the flood: a channel and a kept-alive HTTP connection.
            assert (await app.call("before", body={}))[-1]["type"] == "response.end"
            assert (await http.request("POST", CHAT, body=b"{}")).status == 200
            flood = Flood(socket_path)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood.run, n)
                with trio.fail_after(n / 10):
                    while sum(flood.outcomes.values()) < n:  # noqa: ASYNC110 - counters
                        await trio.sleep(0.05)
                # The flood is held: the limit is full, the apps already in are served.
                assert flood.outcomes == {
                    "admitted": max_connections - 2,
                    "refused": n - max_connections + 2,
                }
                refusal = (1013).to_bytes(2, "big") + (
                    f"over the connection limit ({max_connections})".encode()
                )
                assert flood.refusals == {refusal: n - max_connections + 2}
                with trio.fail_after(30):  # the last refused ones may still be closing
                    while await open_clients(control) != max_connections:  # noqa: ASYNC110 - the daemon's count
                        await trio.sleep(0.05)
                assert (await app.call("during", body={}))[-1]["type"] == "response.end"
                assert (await http.request("POST", CHAT, body=b"{}")).status == 200
                late = await trio.open_unix_socket(socket_path)
                async with late:
                    assert (await first_frame(late)) == refusal
                flood.release.set()
            with trio.fail_after(30):
                while await open_clients(control) != 2:  # noqa: ASYNC110 - the daemon's count
                    await trio.sleep(0.1)
            async with open_app(socket_path) as again:  # room again
                assert (await again.call("after", body={}))[-1]["type"] == "response.end"
        assert daemon.proc.poll() is None, "the daemon died"
        assert "Traceback" not in daemon.stderr
        daemon.signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(daemon.wait) == 0


async def test_a_flood_of_10000_connections_over_the_default_limit(
    shared_bao: BaoServer, runtime_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    # This process holds ~1,600 files at the peak (the daemon, raising its own, ~1,100).
    raise_file_limit(4096)
    await flood_the_daemon(shared_bao, runtime_dir, start_daemon, n=10_000, max_connections=1024)


async def test_a_silent_flood_over_the_limit_is_refused_a_batch_at_a_time(
    shared_bao: BaoServer, runtime_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``max_connections = 1``, one app in, then 150 connections that never send a byte:
    at most ``REFUSING_AT_ONCE`` of them are open in the daemon at once, each is held until
    its head times out after ``_REFUSED_WAIT_S`` (not ``handshake_timeout_s``, an hour
    here: the test's deadline would pass first), and the app is served on."""
    silent = 150
    with trio.fail_after(60), caplog.at_level(logging.INFO, logger="openclawd.local.server"):
        async with (
            open_fake_upstream() as up,
            open_dataplane(
                shared_bao,
                runtime_dir,
                up.url,
                listen={"max_connections": 1, "handshake_timeout_s": 3600.0},
            ) as dp,
            open_app(dp.socket_path) as app,
        ):
            caplog.clear()  # from here on, only the silent connections come and go
            socks = [await trio.open_unix_socket(dp.socket_path) for _ in range(silent)]

            async def wait_closed(stream: trio.SocketStream) -> None:
                assert await stream.receive_some() == b""  # closed, nothing said

            async with trio.open_nursery() as nursery:
                for stream in socks:
                    nursery.start_soon(wait_closed, stream)
            for stream in socks:
                await stream.aclose()
            # The daemon's own account, in the order it happened: each silent connection
            # was held until its head timed out, and no more than REFUSING_AT_ONCE were
            # open at once, so the 65th was taken only once one of the first 64 had gone.
            lines = [
                (r.getMessage(), r.fields)  # type: ignore[attr-defined]
                for r in caplog.records
                if r.getMessage() in ("connection.open", "connection.close")
            ]
            closes = [fields for event, fields in lines if event == "connection.close"]
            assert len(closes) == silent
            assert {c["outcome"] for c in closes} == {"handshake timeout"}
            open_now, most = 0, 0
            for event, _ in lines:
                open_now += 1 if event == "connection.open" else -1
                most = max(most, open_now)
            assert most == REFUSING_AT_ONCE
            assert dp.local.clients == 1  # the app
            assert (await app.call("after", body={}))[-1]["type"] == "response.end"
