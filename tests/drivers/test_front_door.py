"""The front door over memory streams (CONTRACT.md 3.4): who may connect, how many, during
a drain, and the daemon's cut; each refusal in the kind of its entry point (an HTTP
status, or a close code after the WebSocket handshake)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from openclawd import websocket
from openclawd.daemon import DRAIN_DEADLINE_CLOSE, SHUTDOWN_CLOSE
from openclawd.local.cutter import Close
from openclawd.local.unix import PeerCredentials

from .harness import APP, LIMIT_S, Plane, call, closed, open_channel, open_plane, open_ws

STRANGER = PeerCredentials(pid=99, uid=2000, gid=2000)
WS_RESOURCES = ["/v1/ws", "/v1/realtime/openai"]


async def _settled(plane: Plane) -> None:
    """Until every task waits: a connection that ended has been counted out."""
    await trio.testing.wait_all_tasks_blocked()


@pytest.mark.parametrize(
    "listen",
    [{"allowed_uids": [APP.uid]}, {"allowed_gids": [APP.gid]}],
    ids=["uid", "gid"],
)
async def test_a_peer_not_allowed_is_answered_403(
    autojump_clock: trio.testing.MockClock, listen: dict[str, list[int]]
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_plane(listen=listen) as plane:
            answer = await call(plane, "GET", "/v1/http/openai/v1/models", peer=STRANGER)
            assert answer.status == 403
            assert answer.json()["error"]["code"] == "forbidden"
            # Refused before routing: an unknown path is refused the same way.
            assert (await call(plane, "GET", "/v1/nowhere", peer=STRANGER)).status == 403
            assert (await call(plane, "GET", "/v1/http/openai/v1/models")).status == 200
            assert len(plane.upstream.requests) == 1


@pytest.mark.parametrize("resource", WS_RESOURCES)
async def test_a_peer_not_allowed_is_closed_1008(
    autojump_clock: trio.testing.MockClock, resource: str
) -> None:
    with trio.fail_after(LIMIT_S):
        async with (
            open_plane(listen={"allowed_uids": [0, APP.uid]}) as plane,
            open_ws(plane, resource, peer=STRANGER) as app,
        ):
            code, _ = await closed(app)
            assert code == 1008
            assert plane.ws_upstream.targets == []  # no upstream session opened


async def test_over_max_connections_http_is_503_busy_until_one_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_plane(listen={"max_connections": 1}) as plane:
            async with open_channel(plane):
                answer = await call(plane, "GET", "/v1/http/openai/v1/models")
                assert (answer.status, answer.json()["error"]["code"]) == (503, "busy")
                assert plane.upstream.requests == []
            await _settled(plane)
            assert plane.local.clients == 0
            assert (await call(plane, "GET", "/v1/http/openai/v1/models")).status == 200


@pytest.mark.parametrize("resource", WS_RESOURCES)
async def test_over_max_connections_a_websocket_is_closed_1013(
    autojump_clock: trio.testing.MockClock, resource: str
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_plane(listen={"max_connections": 1}) as plane, open_channel(plane):
            async with open_ws(plane, resource) as app:
                code, _ = await closed(app)
                assert code == 1013
            assert plane.ws_upstream.targets == []


async def test_a_new_connection_during_a_drain_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_plane() as plane, open_channel(plane) as first:
            plane.lifecycle.set_draining(trio.current_time() + 30)
            answer = await call(plane, "GET", "/v1/http/openai/v1/models")
            assert (answer.status, answer.json()["error"]["code"]) == (503, "draining")
            for resource in WS_RESOURCES:
                async with open_ws(plane, resource) as app:
                    assert await closed(app) == (1013, "openclawd is draining")
            # The channel that was open before stays open.
            await first.send({"type": "ping", "id": 1})
            assert await first.receive_for(1) == {"type": "pong", "id": 1}


@pytest.mark.parametrize(
    "why", [SHUTDOWN_CLOSE, DRAIN_DEADLINE_CLOSE], ids=["shutdown", "drain deadline"]
)
async def test_the_cut_closes_a_channel_with_the_cutters_close(
    autojump_clock: trio.testing.MockClock, why: Close
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_plane() as plane, open_channel(plane) as app:
            plane.local.cutter.cut_at(trio.current_time() + 5, why)
            assert await closed(app.ws) == (why.code, why.reason)
            # Cut at 5; the close frame is not answered (the reader is cut too), so the
            # connection closes behind it at most CUT_CLOSE_WAIT_S later.
            assert trio.current_time() == 5 + websocket.CUT_CLOSE_WAIT_S
            await _settled(plane)
            assert plane.local.clients == 0
            assert plane.local.statistics().closes == {why.code: 1}


async def test_a_websocket_endpoint_without_an_upgrade_is_426(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_plane() as plane:
            answer = await call(plane, "GET", "/v1/ws")
            assert (answer.status, answer.header("upgrade")) == (426, "websocket")


async def test_connections_are_counted_in_and_out(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_plane() as plane:
            async with open_channel(plane), open_ws(plane, "/v1/realtime/openai"):
                await _settled(plane)
                stats = plane.local.statistics()
                assert (stats.clients, stats.connections["ws"]) == (2, 1)
                assert stats.connections["realtime"] == 1
            await _settled(plane)
            stats = plane.local.statistics()
            assert (stats.clients, stats.connections["ws"], stats.connections["realtime"]) == (
                0,
                0,
                0,
            )
