"""/v1/realtime through the front door and the realtime driver, the upstream a
trio-websocket server on the other end of a memory stream, in virtual time (CONTRACT.md
3.2): a session relayed both ways, each close passed on, a refused or failed upstream
handshake, and the daemon's cut."""

from __future__ import annotations

import contextlib

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketRequest

from openclawd.daemon import SHUTDOWN_CLOSE
from openclawd.errors import UpstreamConnectionError
from openclawd.upstream.ws import Target

from .harness import KEY, LIMIT_S, NEW_KEY, FakeKeys, WsUpstream, closed, open_plane, open_ws

RESOURCE = "/v1/realtime/openai"


async def test_a_session_is_relayed_both_ways_with_the_key_path_and_query(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def greet_then_echo(request: WebSocketRequest, up: WsUpstream) -> None:
        ws = await request.accept()
        await ws.send_message('{"type":"session.created"}')
        await up.echo(ws)

    headers = [
        ("Authorization", "Bearer app-secret"),
        ("Cookie", "session=app"),
        ("X-App-Secret", "app"),
        ("OpenAI-Beta", "realtime=v1"),
    ]
    with trio.fail_after(LIMIT_S):
        async with open_plane(ws=greet_then_echo) as plane:
            resource = f"{RESOURCE}/v1/realtime?model=gpt-realtime&voice=a%20b"
            async with open_ws(plane, resource, headers=headers) as app:
                assert await app.get_message() == '{"type":"session.created"}'
                await app.send_message("hello")
                assert await app.get_message() == "hello"
                await app.send_message(b"\x00\x01binary\xff")
                assert await app.get_message() == b"\x00\x01binary\xff"
                assert plane.realtime.sessions == 1
                assert plane.lifecycle.work.count == 1  # a drain waits for it
            await plane.ws_upstream.ended.wait()

            [to] = plane.ws_upstream.targets
            assert (to.tls, to.host, to.port) == (True, "realtime.openai.test", 443)
            [seen] = plane.ws_upstream.handshakes
            assert seen.path == "/v1/realtime?model=gpt-realtime&voice=a%20b"
            sent = [(k.decode().lower(), v.decode()) for k, v in seen.headers]
            assert [v for k, v in sent if k == "authorization"] == [f"Bearer {KEY}"]
            assert [k for k, _ in sent if k in ("cookie", "x-app-secret")] == []
            assert ("openai-beta", "realtime=v1") in sent
            assert plane.ws_upstream.received == ["hello", b"\x00\x01binary\xff"]
            await plane.lifecycle.work.wait_idle()
            assert plane.realtime.sessions == 0


async def test_the_apps_close_is_passed_on(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_plane() as plane:
            async with open_ws(plane, RESOURCE) as app:
                await app.send_message("hi")
                assert await app.get_message() == "hi"
                await app.aclose(4000, "app done")
            await plane.ws_upstream.ended.wait()
            assert plane.ws_upstream.closes == [(4000, "app done")]


async def test_the_upstreams_close_is_passed_on_after_what_it_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def last_words(request: WebSocketRequest, up: WsUpstream) -> None:
        ws = await request.accept()
        await ws.send_message("last words")
        await ws.aclose(4001, "expired")

    with trio.fail_after(LIMIT_S):
        async with open_plane(ws=last_words) as plane, open_ws(plane, RESOURCE) as app:
            assert await app.get_message() == "last words"
            assert await closed(app) == (4001, "expired")


@pytest.mark.parametrize("code", [1012, 1013, 1014, 3000, 4999])
async def test_an_upstream_close_code_wsproto_does_not_know_is_passed_on_too(
    code: int, autojump_clock: trio.testing.MockClock
) -> None:
    """CONTRACT.md 3.2: the upstream's close code and reason are passed on. wsproto (under
    trio-websocket) refuses 1014, registered after its table, and reports 1002 "CLOSE with
    unknown reserved code"; the code the upstream's frame carried is read off the bytes."""

    async def bad_gateway(request: WebSocketRequest, up: WsUpstream) -> None:
        ws = await request.accept()
        await ws.aclose(code, "its own upstream failed")

    with trio.fail_after(LIMIT_S):
        async with open_plane(ws=bad_gateway) as plane, open_ws(plane, RESOURCE) as app:
            assert await closed(app) == (code, "its own upstream failed")


@pytest.mark.parametrize(
    ("status", "headers", "close", "refused_keys"),
    [
        (401, [], (1008, "upstream 401"), [1]),
        (403, [], (1008, "upstream 403"), [1]),
        (429, [(b"retry-after", b"7")], (1013, "upstream 429, retry after 7s"), []),
        (500, [], (1014, "upstream 500"), []),
        (404, [], (1014, "upstream 404"), []),
    ],
)
async def test_a_refused_upstream_handshake_closes_the_app_with_the_contracts_code(
    autojump_clock: trio.testing.MockClock,
    status: int,
    headers: list[tuple[bytes, bytes]],
    close: tuple[int, str],
    refused_keys: list[int],
) -> None:
    async def refuse(request: WebSocketRequest, up: WsUpstream) -> None:
        await request.reject(status, extra_headers=headers, body=b'{"error":"no"}')

    keys = FakeKeys(KEY, NEW_KEY)
    with trio.fail_after(LIMIT_S):
        async with (
            open_plane(ws=refuse, keys=keys) as plane,
            open_ws(plane, RESOURCE) as app,
        ):
            assert await closed(app) == close
            # A refused key is reported before the app hears of it: its reconnect gets
            # the next key.
            assert [k.version for k in keys.failures] == refused_keys


async def test_an_unreachable_upstream_closes_the_app_1014(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def unreachable(to: Target) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        raise UpstreamConnectionError("cannot connect to the upstream: refused")

    with trio.fail_after(LIMIT_S):
        async with open_plane() as plane:
            plane.realtime.open_stream = unreachable
            async with open_ws(plane, RESOURCE) as app:
                assert await closed(app) == (1014, "cannot connect to the upstream: refused")


async def test_no_upstream_handshake_within_connect_timeout_closes_the_app_1014(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def never_answer(request: WebSocketRequest, up: WsUpstream) -> None:
        await trio.sleep_forever()

    with trio.fail_after(LIMIT_S):
        async with (
            open_plane(ws=never_answer, provider={"connect_timeout_s": 7}) as plane,
            open_ws(plane, RESOURCE) as app,
        ):
            assert await closed(app) == (1014, "no upstream handshake within connect_timeout_s=7")
            assert trio.current_time() == 7


async def test_the_daemons_cut_closes_the_app_1012_and_the_upstream_1001(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_plane() as plane, open_ws(plane, RESOURCE) as app:
            await app.send_message("hi")
            assert await app.get_message() == "hi"
            plane.local.cutter.cut_at(trio.current_time(), SHUTDOWN_CLOSE)
            assert await closed(app) == (1012, "openclawd is shutting down")
            await plane.ws_upstream.ended.wait()
            assert [code for code, _ in plane.ws_upstream.closes] == [1001]


async def test_a_session_over_the_rate_limit_is_closed_1013(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_plane(limits={"requests_per_minute": 1}) as plane:
            async with open_ws(plane, RESOURCE) as app:
                await app.send_message("hi")
                assert await app.get_message() == "hi"
            async with open_ws(plane, RESOURCE) as app:
                code, _ = await closed(app)
                assert code == 1013
            assert len(plane.ws_upstream.targets) == 1  # never went upstream


async def test_an_upstream_that_drops_the_connection_closes_the_app_1014(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def drop(request: WebSocketRequest, up: WsUpstream) -> None:
        ws = await request.accept()
        with contextlib.suppress(ConnectionClosed):
            await ws.get_message()
        # Returning closes the stream under the WebSocket: no close frame.

    with trio.fail_after(LIMIT_S):
        async with open_plane(ws=drop) as plane, open_ws(plane, RESOURCE) as app:
            await app.send_message("hi")
            assert await closed(app) == (1014, "upstream dropped the connection")


async def test_an_app_message_over_max_message_bytes_closes_both_sides_1009(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with (
            open_plane(listen={"max_message_bytes": 1024}) as plane,
            open_ws(plane, RESOURCE) as app,
        ):
            await app.send_message(b"x" * 1024)
            assert await app.get_message() == b"x" * 1024  # at the limit: relayed
            await app.send_message(b"x" * 1025)
            code, _ = await closed(app)
            assert code == 1009
            await plane.ws_upstream.ended.wait()
            assert [code for code, _ in plane.ws_upstream.closes] == [1009]
            assert plane.ws_upstream.received == [b"x" * 1024]


async def test_an_app_that_stops_answering_pings_is_closed_1011_and_the_upstream_1001(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with (
            open_plane(listen={"ping_interval_s": 20, "ping_timeout_s": 5}) as plane,
            open_ws(plane, RESOURCE) as app,
        ):
            app.silent = True
            assert await closed(app) == (1011, "no pong within 5s")
            assert app.close_at == 25  # quiet for 20 s, then 5 s without a pong
            await plane.ws_upstream.ended.wait()
            assert plane.ws_upstream.closes == [(1001, "the app stopped answering pings")]
