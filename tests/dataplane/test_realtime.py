"""/v1/realtime end to end: a real app-side client (the ``websockets`` library's unix
client), the daemon's data plane on a real unix socket, keys from a real bao, the fake
WebSocket upstream on loopback (CONTRACT.md 3.2). Every close-code row of the contract's
table is produced here and observed by the app."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import trio
import wsproto
import wsproto.events

from openclawd.daemon import DRAIN_DEADLINE_CLOSE, SHUTDOWN_CLOSE
from openclawd.local import realtime
from openclawd.upstream import ws as upstream_ws

from ..bao import BaoServer
from ..fake_ws_upstream import Session, open_fake_ws_upstream
from .harness import FAST_PINGS, close_of, closed_port, open_realtime, realtime_plane

KEY = "sk-rt-0001"
NEW_KEY = "sk-rt-0002"

Bao = BaoServer


async def test_text_and_binary_are_echoed_with_the_key_path_and_query(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_ws_upstream(expected_key=KEY) as up,
            realtime_plane(shared_bao, runtime_dir, up.url) as dp,
        ):
            headers = {
                "Authorization": "Bearer app-secret",
                "Cookie": "session=app",
                "X-App-Secret": "app",
                "OpenAI-Beta": "realtime=v1",
            }
            resource = "/v1/realtime/openai?model=gpt-realtime&voice=a%20b"
            async with open_realtime(dp.socket_path, resource, headers) as app:
                await app.send("hello")
                assert await app.recv() == "hello"
                await app.send(b"\x00\x01binary\xff")
                assert await app.recv() == b"\x00\x01binary\xff"
                assert dp.realtime.sessions == 1
                assert dp.lifecycle.work.count == 1  # a drain waits for it
                await app.close(1000, "done")
            await up.wait_connections_closed(1)

            [seen] = up.handshakes
            assert seen.path == "/v1/realtime"
            assert seen.query == "model=gpt-realtime&voice=a%20b"
            assert seen.key == KEY
            assert [v for k, v in seen.headers if k == "authorization"] == [f"Bearer {KEY}"]
            assert seen.header("cookie") is None
            assert seen.header("x-app-secret") is None
            assert seen.header("openai-beta") == "realtime=v1"
            assert up.received == ["hello", b"\x00\x01binary\xff"]
            assert up.close_codes == [(1000, "done")]  # the app's close, passed on
            await dp.lifecycle.work.wait_idle()
            assert dp.realtime.sessions == 0


async def test_the_providers_headers_and_query_join_the_handshake_unless_the_app_sent_them(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    provider = {
        "headers": {"OpenAI-Beta": "realtime=v1", "x-org": "org-1", "x-none": ""},
        "query": {"api-version": "2024-10-01-preview", "model": "fallback"},
    }
    with trio.fail_after(20):
        async with (
            open_fake_ws_upstream() as up,
            realtime_plane(shared_bao, runtime_dir, up.url, provider=provider) as dp,
        ):
            resource = "/v1/realtime/openai?model=gpt-realtime"
            async with open_realtime(dp.socket_path, resource, {"OpenAI-Beta": "app"}) as app:
                await app.close(1000, "done")
            await up.wait_connections_closed(1)
    [seen] = up.handshakes
    assert seen.query == "model=gpt-realtime&api-version=2024-10-01-preview"
    assert [v for k, v in seen.headers if k == "openai-beta"] == ["app"]
    assert seen.header("x-org") == "org-1"
    assert seen.header("x-none") is None
    assert seen.key == KEY


async def test_the_path_after_the_provider_is_forwarded(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_ws_upstream() as up,
            realtime_plane(shared_bao, runtime_dir, up.url + "/base/") as dp,
        ):
            async with open_realtime(
                dp.socket_path, "/v1/realtime/openai/v1/realtime/calls?x=1"
            ) as app:
                await app.send("ping")
                assert await app.recv() == "ping"
            assert (up.handshakes[0].path, up.handshakes[0].query) == (
                "/base/v1/realtime/calls",
                "x=1",
            )


async def test_upstream_close_code_and_reason_are_passed_on(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_ws_upstream() as up,
            realtime_plane(shared_bao, runtime_dir, up.url) as dp,
        ):
            created = json.dumps({"type": "session.created"})
            up.script(
                Session(greeting=[created], close_after=1, close_code=4001, close_reason="expired"),
                Session(close_after=0, close_code=1000, close_reason="done"),
            )
            async with open_realtime(dp.socket_path) as app:
                assert await app.recv() == created
                await app.send("last words")
                # What the upstream sent before its close still arrives, then the close.
                assert await app.recv() == "last words"
                assert await app.closed() == (4001, "expired")
            assert await close_of(dp.socket_path) == (1000, "done")


@pytest.mark.parametrize(
    ("status", "headers", "code", "reason"),
    [
        (401, [], 1008, "upstream 401"),
        (403, [], 1008, "upstream 403"),
        (429, [("retry-after", "7")], 1013, "upstream 429, retry after 7s"),
        (500, [], 1014, "upstream 500"),
        (503, [], 1014, "upstream 503"),
        (404, [], 1014, "upstream 404"),
    ],
)
async def test_a_refused_upstream_handshake_closes_with_the_contracts_code(
    shared_bao: Bao,
    runtime_dir: Path,
    status: int,
    headers: list[tuple[str, str]],
    code: int,
    reason: str,
) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_ws_upstream() as up,
            realtime_plane(shared_bao, runtime_dir, up.url) as dp,
        ):
            up.script(Session(reject_status=status, reject_headers=headers))
            assert await close_of(dp.socket_path) == (code, reason)
            assert dp.realtime.sessions == 0


async def test_an_unreachable_upstream_is_1014(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with realtime_plane(shared_bao, runtime_dir, f"ws://127.0.0.1:{closed_port()}") as dp:
            code, reason = await close_of(dp.socket_path)
            assert code == 1014
            assert reason.startswith("cannot connect to the upstream")


async def test_an_upstream_that_never_answers_the_handshake_is_1014(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_ws_upstream() as up,
            realtime_plane(
                shared_bao, runtime_dir, up.url, provider={"connect_timeout_s": 0.3}
            ) as dp,
        ):
            up.script(Session(accept_delay_s=math.inf))
            assert await close_of(dp.socket_path) == (
                1014,
                "no upstream handshake within connect_timeout_s=0.3",
            )
            await up.wait_connections_closed(1)  # and the attempt is not left open


async def test_an_upstream_drop_without_a_close_frame_is_1014(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_ws_upstream() as up,
            realtime_plane(shared_bao, runtime_dir, up.url) as dp,
        ):
            up.script(Session(drop_after=1))
            async with open_realtime(dp.socket_path) as app:
                await app.send("one")
                assert await app.recv() == "one"
                assert await app.closed() == (1014, "upstream dropped the connection")


async def test_an_oversize_message_is_1009_either_way(shared_bao: Bao, runtime_dir: Path) -> None:
    limit = 64 * 1024
    with trio.fail_after(20):
        async with (
            open_fake_ws_upstream() as up,
            realtime_plane(
                shared_bao, runtime_dir, up.url, listen={"max_message_bytes": limit}
            ) as dp,
        ):
            up.script(Session(send_bytes_of=limit + 1))
            assert await close_of(dp.socket_path) == (
                1009,
                f"upstream message over max_message_bytes ({limit})",
            )
            async with open_realtime(dp.socket_path) as app:
                await app.send(b"x" * (limit + 1))
                code, _ = await app.closed()
                assert code == 1009
            await up.wait_connections_closed(2)
            assert up.received == []  # the oversize message never went upstream


async def test_an_upstreams_own_1009_is_passed_on(shared_bao: Bao, runtime_dir: Path) -> None:
    # In the words trio-websocket uses for our own limit, but for another limit: the
    # upstream's close, not an oversize message of its own.
    reason = "Exceeded maximum message size: 65536 bytes"
    with trio.fail_after(20):
        async with (
            open_fake_ws_upstream() as up,
            realtime_plane(shared_bao, runtime_dir, up.url) as dp,
        ):
            up.script(Session(close_after=0, close_code=1009, close_reason=reason))
            assert await close_of(dp.socket_path) == (1009, reason)


async def test_an_internal_error_is_1011(
    shared_bao: Bao, runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug")

    with trio.fail_after(20):
        async with (
            open_fake_ws_upstream() as up,
            realtime_plane(shared_bao, runtime_dir, up.url) as dp,
        ):
            monkeypatch.setattr(upstream_ws, "open_session", broken)
            assert await close_of(dp.socket_path) == (1011, "internal error")
            assert dp.realtime.sessions == 0
            assert dp.lifecycle.work.count == 0


async def test_a_silent_upstream_is_1014(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_ws_upstream() as up,
            realtime_plane(
                shared_bao,
                runtime_dir,
                up.url,
                listen=FAST_PINGS,
            ) as dp,
        ):
            up.script(Session(go_silent_after=0))
            assert await close_of(dp.socket_path) == (1014, "upstream stopped answering pings")
            await up.wait_connections_closed(1)


async def test_a_silent_app_is_1011_and_the_upstream_is_told(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_ws_upstream() as up,
            realtime_plane(
                shared_bao,
                runtime_dir,
                up.url,
                listen=FAST_PINGS,
            ) as dp,
        ):
            # A raw client that completes the handshake and then reads nothing: it cannot
            # answer pings. What it finds on the wire afterwards is the daemon's close.
            client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
            stream = await trio.open_unix_socket(dp.socket_path)
            async with stream:
                request = wsproto.events.Request(host="openclawd", target="/v1/realtime/openai")
                await stream.send_all(client.send(request))
                events: list[wsproto.events.Event] = []
                while not any(isinstance(e, wsproto.events.AcceptConnection) for e in events):
                    client.receive_data(await stream.receive_some())
                    events.extend(client.events())
                await up.wait_handshakes(1)
                await up.wait_connections_closed(1)  # the daemon gave up on the app
                while not any(isinstance(e, wsproto.events.CloseConnection) for e in events):
                    data = await stream.receive_some()
                    client.receive_data(data or None)
                    events.extend(client.events())
                close = next(e for e in events if isinstance(e, wsproto.events.CloseConnection))
                assert (close.code, close.reason) == (1011, "no pong within 0.3s")
            assert up.close_codes == [(1001, "the app stopped answering pings")]


async def test_shutdown_is_1012_and_a_drain_deadline_1001(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    for mark, code, reason in (
        ("stopping", 1012, "openclawd is shutting down"),
        ("draining", 1001, "drain deadline reached"),
    ):
        with trio.fail_after(20):
            async with (
                open_fake_ws_upstream() as up,
                realtime_plane(shared_bao, runtime_dir, up.url) as dp,
                open_realtime(dp.socket_path) as app,
            ):
                await app.send("working")
                assert await app.recv() == "working"
                # What the daemon does at the deadline: its cut, with the close it chose.
                why = SHUTDOWN_CLOSE if mark == "stopping" else DRAIN_DEADLINE_CLOSE
                dp.local.cutter.cut_at(trio.current_time(), why)
                assert await app.closed() == (code, reason)
                await up.wait_connections_closed(1)
                assert up.close_codes == [(1001, "openclawd ended the session")]


async def test_refusals_before_the_upstream_is_opened(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(30):
        async with (
            open_fake_ws_upstream() as up,
            realtime_plane(
                shared_bao, runtime_dir, up.url, listen={"allowed_uids": [os.getuid() + 1]}
            ) as dp,
        ):
            code, reason = await close_of(dp.socket_path)
            assert code == 1008
            assert "not allowed" in reason
        async with (
            open_fake_ws_upstream() as up,
            realtime_plane(
                shared_bao, runtime_dir, up.url, limits={"requests_per_minute": 1}
            ) as dp,
        ):
            async with open_realtime(dp.socket_path) as app:
                await app.send("first")
                assert await app.recv() == "first"
                code, reason = await close_of(dp.socket_path)  # a second within the minute
                assert code == 1013
                assert reason.startswith("rate limited: over 1 requests per minute")
            assert await close_of(dp.socket_path, "/v1/realtime/nope") == (
                1008,
                "unknown provider",
            )
            dp.lifecycle.set_draining(trio.current_time() + 60)
            assert await close_of(dp.socket_path) == (1013, "openclawd is draining")
            assert len(up.handshakes) == 1  # only the one session that was let through
        async with (
            open_fake_ws_upstream() as up,
            realtime_plane(shared_bao, runtime_dir, up.url, listen={"max_connections": 1}) as dp,
            open_realtime(dp.socket_path) as app,
        ):
            await app.send("holding the only slot")
            assert await app.recv() == "holding the only slot"
            code, reason = await close_of(dp.socket_path)
            assert code == 1013
            assert "connection limit" in reason


async def test_a_provider_without_ws_url_is_refused(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with realtime_plane(shared_bao, runtime_dir, "") as dp:
            assert await close_of(dp.socket_path) == (1008, "provider 'openai' has no ws_url")


async def test_a_rotation_keeps_the_open_session_and_the_next_uses_the_new_key(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    with trio.fail_after(30):
        async with (
            open_fake_ws_upstream() as up,
            realtime_plane(shared_bao, runtime_dir, up.url, refresh_interval_s=0.1) as dp,
            open_realtime(dp.socket_path) as app,
        ):
            await app.send("before")
            assert await app.recv() == "before"
            await trio.to_thread.run_sync(lambda: shared_bao.write(dp.vault_path, api_key=NEW_KEY))
            while dp.keys.current("openai").version != 2:  # noqa: ASYNC110 - no event
                await trio.sleep(0.02)
            await app.send("after")
            assert await app.recv() == "after"  # the live session was not cut
            async with open_realtime(dp.socket_path) as second:
                await second.send("new")
                assert await second.recv() == "new"
            assert [h.key for h in up.handshakes] == [KEY, NEW_KEY]


async def test_an_upstream_401_rereads_the_key_so_a_reconnect_gets_the_new_one(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    with trio.fail_after(30):
        async with (
            open_fake_ws_upstream(expected_key=NEW_KEY) as up,
            # Polling too slow to notice the rotation: only the 401 can.
            realtime_plane(shared_bao, runtime_dir, up.url, refresh_interval_s=60) as dp,
        ):
            await trio.to_thread.run_sync(lambda: shared_bao.write(dp.vault_path, api_key=NEW_KEY))
            assert await close_of(dp.socket_path) == (1008, "upstream 401")
            # Re-read before the app was closed: its reconnect uses the new key.
            assert dp.keys.current("openai").version == 2
            async with open_realtime(dp.socket_path) as app:
                await app.send("hi")
                assert await app.recv() == "hi"
            assert [h.key for h in up.handshakes] == [KEY, NEW_KEY]


async def test_a_slow_app_holds_back_the_upstream(shared_bao: Bao, runtime_dir: Path) -> None:
    total, size = 2000, 64 * 1024
    with trio.fail_after(60):
        async with (
            open_fake_ws_upstream() as up,
            realtime_plane(shared_bao, runtime_dir, up.url) as dp,
        ):
            up.script(Session(stream_messages=total, stream_message_bytes=size, echo=False))
            # The app's own client holds little: its reader stops when its queue is full.
            async with open_realtime(dp.socket_path, max_queue=4) as app:
                await up.wait_messages_sent(10)
                await trio.sleep(1.0)  # the app reads nothing meanwhile
                held_back = up.messages_sent
                # Socket buffers on both legs hold some; a relay without back-pressure would
                # have taken all 2000 (125 MiB) by now.
                assert held_back < total // 4, held_back
                for _ in range(total):
                    message = await app.recv()
                    assert isinstance(message, bytes)
                    assert len(message) == size
                assert up.messages_sent == total


async def test_a_close_reason_never_carries_the_key(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_ws_upstream() as up,
            realtime_plane(shared_bao, runtime_dir, up.url) as dp,
        ):
            up.script(Session(close_after=0, close_code=4000, close_reason=f"bad key {KEY}"))
            code, reason = await close_of(dp.socket_path)
            assert code == 4000
            assert KEY not in reason
            fingerprint = dp.keys.current("openai").fingerprint
            assert reason == f"(the upstream's reason quoted key {fingerprint}: withheld)"


async def test_the_prefix_constant_is_the_contracts_path() -> None:
    assert realtime.PREFIX == "/v1/realtime/"
