"""An app that leaves /v1/ws while its requests stream (issue 17).

Leaving is normal: whether the app drops the socket or sends a close frame, with frames of
its requests still on their way, the daemon logs an info line for each request it
abandons, never an error or a traceback, and the requests end as cancelled. Each app closes
as soon as a ``response.event`` of its requests has arrived (not after a sleep), so every
request is mid-stream when it goes: the upstream streams ~50 MiB of SSE events.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import trio
import trio_websocket

from ..bao import BaoServer
from ..fake_upstream import Reply, open_fake_upstream
from .harness import DataPlane, open_dataplane

CONNECTIONS = 30
REQUESTS = 2  # per connection
STREAM_BYTES = 50 * 1024 * 1024


async def leave_mid_stream(dp: DataPlane, n: int, *, close_frame: bool) -> None:
    """Open /v1/ws, start ``REQUESTS`` streams, and leave once one has sent an event."""
    stream = await trio.open_unix_socket(dp.socket_path)
    async with stream, trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(nursery, stream, "openclawd", "/v1/ws")
        assert json.loads(await ws.get_message())["type"] == "hello"
        for i in range(REQUESTS):
            request = {
                "type": "request",
                "id": f"c{n}r{i}",
                "provider": "openai",
                "path": "/v1/chat/completions",
                "body": {"model": "m", "stream": True},
            }
            await ws.send_message(json.dumps(request))
        while json.loads(await ws.get_message())["type"] != "response.event":
            pass
        if close_frame:
            with trio.move_on_after(5):
                await ws.aclose()
        nursery.cancel_scope.cancel()
        # Else dropped: the socket closes under the daemon with no close frame.


async def wait_all_gone(dp: DataPlane) -> None:
    await dp.lifecycle.work.wait_idle()
    while dp.local.clients:  # noqa: ASYNC110 - the server has no event for it
        await trio.sleep(0.01)


async def leave_all(dp: DataPlane, connections: int) -> None:
    """``connections`` apps leave mid-stream, half dropping the socket, half with a close
    frame; returns once every request and connection has ended."""
    async with trio.open_nursery() as apps:
        for n in range(connections):
            apps.start_soon(lambda n=n: leave_mid_stream(dp, n, close_frame=n % 2 == 0))
    await wait_all_gone(dp)


async def test_an_app_leaving_mid_stream_is_not_an_error(
    shared_bao: BaoServer, runtime_dir: Path, log_text: io.StringIO
) -> None:
    with trio.fail_after(120):
        async with open_fake_upstream() as up:
            up.script(*[Reply(stream_bytes=STREAM_BYTES)] * (CONNECTIONS * REQUESTS))
            async with open_dataplane(shared_bao, runtime_dir, up.url) as dp:
                await leave_all(dp, CONNECTIONS)
                assert dp.channels.inflight == 0
    text = log_text.getvalue()
    errors = [line for line in text.splitlines() if "level=error" in line]
    assert errors == []
    assert "traceback" not in text.lower()
    # Each request the app left behind gets one info line.
    cancelled = [line for line in text.splitlines() if "event=request.cancelled" in line]
    assert len(cancelled) == CONNECTIONS * REQUESTS
    assert all("level=info" in line and 'reason="app gone"' in line for line in cancelled)


async def test_requests_an_app_left_count_as_cancelled(
    shared_bao: BaoServer, runtime_dir: Path
) -> None:
    with trio.fail_after(60):
        async with open_fake_upstream() as up:
            up.script(*[Reply(stream_bytes=STREAM_BYTES)] * (2 * REQUESTS))
            async with open_dataplane(shared_bao, runtime_dir, up.url) as dp:
                await leave_all(dp, 2)
                requests = dp.upstreams.statistics()["openai"].requests
    assert requests == {"cancelled": 2 * REQUESTS}
