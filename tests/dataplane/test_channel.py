"""The /v1/ws channel end to end: a real unix socket, keys from a real bao, the fake
OpenAI-shaped upstream on loopback (CONTRACT.md 3.1, 3.4)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from ..bao import BaoServer
from ..fake_upstream import Reply, open_fake_upstream
from .harness import current_rss, open_app, open_dataplane, server_frames

KEY = "sk-test-0001"
STREAM = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}

Bao = BaoServer


def types(frames: list[dict[str, Any]]) -> list[str]:
    return [f["type"] for f in frames]


async def test_hello_names_the_protocol_and_limits(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(
                shared_bao, runtime_dir, up.url, listen={"max_inflight_per_connection": 7}
            ),
            open_app(str(runtime_dir / "data.sock")) as app,
        ):
            assert app.hello == {
                "type": "hello",
                "protocol": 1,
                "server": "openclawd/0.1.0",
                "providers": ["openai"],
                "max_message_bytes": 1048576,
                "max_inflight": 7,
            }


async def test_streaming_request_relays_every_event_and_injects_the_key(
    shared_bao: Bao,
    runtime_dir: Path,
) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream(expected_key=KEY) as up,
            open_dataplane(shared_bao, runtime_dir, up.url, key=KEY) as dp,
            open_app(dp.socket_path) as app,
        ):
            await app.request("s1", body=STREAM, headers={"OpenAI-Beta": "assistants=v2"})
            frames = await app.exchange("s1")

            assert types(frames) == ["response.start"] + ["response.event"] * 5 + ["response.end"]
            start, *events, end = frames
            assert start["status"] == 200
            assert start["headers"]["content-type"] == "text/event-stream"
            assert start["headers"]["x-request-id"] == "req-0"
            assert start["headers"]["x-ratelimit-remaining-requests"] == "99"
            assert [e["event"] for e in events] == [None] * 5
            assert events[-1]["data"] == "[DONE]"
            contents = [json.loads(e["data"])["choices"][0]["delta"]["content"] for e in events[:3]]
            assert contents == ["Hel", "lo", "!"]
            assert end == {
                "type": "response.end",
                "id": "s1",
                "key_version": 1,
                "attempts": 1,
                "usage": USAGE,
                "provider": "openai",  # CONTRACT.md 5.4
            }
            seen = up.requests[0]
            assert seen.headers["authorization"] == f"Bearer {KEY}"
            assert seen.headers["openai-beta"] == "assistants=v2"
            assert seen.headers["content-type"] == "application/json"
            assert json.loads(seen.body) == STREAM
            assert dp.upstreams["openai"].statistics().tokens == {"prompt": 5, "completion": 3}


async def test_non_streaming_request_gets_one_body_frame(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream(expected_key=KEY) as up,
            open_dataplane(shared_bao, runtime_dir, up.url, key=KEY) as dp,
            open_app(dp.socket_path) as app,
        ):
            await app.request("n1", body={"model": "m"})
            start, body, end = await app.exchange("n1")
            assert start["type"] == "response.start"
            assert start["status"] == 200
            assert body["type"] == "response.body"
            assert body["body"]["choices"][0]["message"]["content"] == "Hello!"
            assert end["usage"] == USAGE
            assert end["attempts"] == 1

            await app.request("m1", method="GET", path="/v1/models?limit=1")
            start, body, end = await app.exchange("m1")
            assert body["body"]["data"][0]["id"] == "gpt-fake"
            assert up.requests[1].method == "GET"
            assert up.requests[1].path == "/v1/models"
            assert up.requests[1].query == "limit=1"
            assert end["usage"] is None


async def test_upstream_400_is_relayed_as_a_response(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
            open_app(dp.socket_path) as app,
        ):
            error = {"error": {"message": "bad model", "type": "invalid_request_error"}}
            up.script(
                Reply(
                    status=400,
                    body=json.dumps(error).encode(),
                    headers=[("content-type", "application/json")],
                )
            )
            start, body, end = await app.call("e1", body={})
            assert (start["status"], body["body"], end["attempts"]) == (400, error, 1)
            assert len(up.requests) == 1


async def test_429_with_retry_after_is_retried(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
            open_app(dp.socket_path) as app,
        ):
            up.script(Reply(status=429, headers=[("retry-after", "0")]))
            frames = await app.call("r1", body={"model": "m"})
            assert frames[0]["status"] == 200
            assert frames[-1]["attempts"] == 2
            assert len(up.requests) == 2


async def test_503_until_retries_run_out_is_relayed(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(
                shared_bao,
                runtime_dir,
                up.url,
                provider={"max_retries": 2, "retry_backoff_s": 0.01},
            ) as dp,
            open_app(dp.socket_path) as app,
        ):
            up.script(*[Reply(status=503) for _ in range(3)])
            frames = await app.call("r1", body={"model": "m"})
            assert types(frames) == ["response.start", "response.body", "response.end"]
            assert frames[0]["status"] == 503
            assert frames[-1]["attempts"] == 3
            assert len(up.requests) == 3
            assert dp.upstreams["openai"].statistics().retries == 2


async def test_401_rereads_the_key_and_retries_once_with_the_new_one(
    shared_bao: Bao,
    runtime_dir: Path,
) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream(expected_key="sk-rotated-0002") as up,
            # Vault is polled rarely here: the 401 is what makes the daemon look.
            open_dataplane(shared_bao, runtime_dir, up.url, refresh_interval_s=300) as dp,
            open_app(dp.socket_path) as app,
        ):
            await trio.to_thread.run_sync(
                lambda: shared_bao.write(dp.vault_path, api_key="sk-rotated-0002")
            )
            frames = await app.call("a1", body={"model": "m"})
            assert frames[0]["status"] == 200
            assert frames[-1]["key_version"] == 2
            assert frames[-1]["attempts"] == 2
            auths = [r.headers["authorization"] for r in up.requests]
            assert auths == [f"Bearer {KEY}", "Bearer sk-rotated-0002"]
            assert dp.keys.statistics().rotations[("openai", "auth_failure")] == 1


async def test_401_with_no_newer_key_is_relayed(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream(expected_key="sk-somebody-else") as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
            open_app(dp.socket_path) as app,
        ):
            frames = await app.call("a1", body={"model": "m"})
            assert frames[0]["status"] == 401
            assert frames[1]["body"]["error"]["code"] == "invalid_api_key"
            assert frames[-1]["attempts"] == 1
            assert len(up.requests) == 1


async def test_drop_after_the_first_byte_is_not_retried(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
            open_app(dp.socket_path) as app,
        ):
            up.script(Reply(drop_after_chunks=1))
            frames = await app.call("d1", body=STREAM)
            assert types(frames) == ["response.start", "response.event", "error"]
            assert frames[-1]["code"] == "upstream_unavailable"
            assert frames[-1]["retry_after"] is None
            assert len(up.requests) == 1
            # The channel is still there, and so is the provider.
            frames = await app.call("d2", body=STREAM)
            assert frames[-1]["type"] == "response.end"


async def test_stalled_upstream_ends_with_upstream_timeout(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url, provider={"read_timeout_s": 0.3}) as dp,
            open_app(dp.socket_path) as app,
        ):
            up.script(Reply(stall_after_chunks=1))
            frames = await app.call("t1", body=STREAM)
            assert types(frames) == ["response.start", "response.event", "error"]
            assert frames[-1]["code"] == "upstream_timeout"
            await up.wait_connections_closed(1)


@pytest.mark.parametrize("how", ["cancel", "disconnect"])
async def test_cancel_or_leaving_closes_the_upstream_connection(
    shared_bao: Bao,
    runtime_dir: Path,
    how: str,
) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
        ):
            up.script(Reply(stall_after_chunks=1))
            async with open_app(dp.socket_path) as app:
                await app.request("c1", body=STREAM)
                assert (await app.receive_for("c1"))["type"] == "response.start"
                assert (await app.receive_for("c1"))["type"] == "response.event"
                assert up.open_connections == 1
                if how == "cancel":
                    await app.send({"type": "cancel", "id": "c1"})
                    frame = await app.receive_for("c1")
                    assert (frame["type"], frame["code"]) == ("error", "cancelled")
                    await up.wait_connections_closed(1)
                    # The channel goes on.
                    frames = await app.call("c2", body={"model": "m"})
                    assert frames[-1]["type"] == "response.end"
            await up.wait_connections_closed(1)
            assert dp.lifecycle.work.count == 0


async def test_bad_frames_get_errors_and_disturb_nothing(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
            open_app(dp.socket_path) as app,
        ):
            up.script(Reply(chunks=[b"data: 1\n\n", b"data: 2\n\n"], chunk_delay_s=0.3))
            await app.request("ok", body=STREAM)
            assert (await app.receive_for("ok"))["type"] == "response.start"
            bad: list[tuple[Any, str, str | None]] = [
                ("not json", "bad_request", None),
                (b"\x00binary", "bad_request", None),
                ("[1,2]", "bad_request", None),
                ({"type": "nope", "id": "x1"}, "bad_request", "x1"),
                (
                    {"type": "request", "id": "ok", "provider": "openai", "path": "/v1/x"},
                    "bad_request",
                    None,
                ),  # duplicate of an id in flight
                (
                    {"type": "request", "id": "p1", "provider": "nope", "path": "/v1/x"},
                    "unknown_provider",
                    "p1",
                ),
                (
                    {
                        "type": "request",
                        "id": "h1",
                        "provider": "openai",
                        "path": "/v1/x",
                        "headers": {"Authorization": "Bearer mine"},
                    },
                    "bad_request",
                    "h1",
                ),
                (
                    {"type": "request", "id": "h2", "provider": "openai", "path": "v1/x"},
                    "bad_request",
                    "h2",
                ),
            ]
            for frame, code, rid in bad:
                await app.send(frame)
                error = await app.receive_for(rid)
                assert (error["type"], error["code"], error["id"]) == ("error", code, rid), frame
                assert error["message"]
            await app.send({"type": "ping", "id": {"n": 1}})
            assert await app.receive_for({"n": 1}) == {"type": "pong", "id": {"n": 1}}
            rest = await app.exchange("ok")
            assert [f.get("data") for f in rest[:-1]] == ["1", "2"]
            assert rest[-1]["type"] == "response.end"
            assert len(up.requests) == 1  # nothing refused reached the provider


async def test_draining_refuses_new_requests_and_lets_running_ones_finish(
    shared_bao: Bao,
    runtime_dir: Path,
) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
            open_app(dp.socket_path) as app,
        ):
            up.script(Reply(chunks=[b"data: 1\n\n", b"data: 2\n\n"], chunk_delay_s=0.2))
            await app.request("run", body=STREAM)
            assert (await app.receive_for("run"))["type"] == "response.start"
            dp.lifecycle.set_draining(trio.current_time() + 60)
            await app.request("new", body=STREAM)
            refused = await app.receive_for("new")
            assert (refused["type"], refused["code"]) == ("error", "draining")
            assert (await app.exchange("run"))[-1]["type"] == "response.end"


async def test_local_rate_limit_per_uid(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(
                shared_bao, runtime_dir, up.url, limits={"requests_per_minute": 2}
            ) as dp,
            open_app(dp.socket_path) as app,
            open_app(dp.socket_path) as other,
        ):
            for rid in ("a", "b"):
                assert (await app.call(rid, body={}))[-1]["type"] == "response.end"
            # Same uid on another connection: the same budget.
            await other.request("c", body={})
            frame = await other.receive_for("c")
            assert (frame["type"], frame["code"]) == ("error", "rate_limited")
            assert 0 < frame["retry_after"] <= 30
            assert len(up.requests) == 2


async def test_concurrent_requests_respect_max_inflight(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(30):
        async with (
            open_fake_upstream() as up,
            open_dataplane(
                shared_bao, runtime_dir, up.url, listen={"max_inflight_per_connection": 64}
            ) as dp,
            open_app(dp.socket_path) as app,
        ):
            slow = Reply(chunks=[b"data: a\n\n", b"data: [DONE]\n\n"], chunk_delay_s=1.0)
            up.script(*[slow] * 64)
            for i in range(200):
                await app.request(f"r{i}", body=STREAM)
            ends: dict[str, str] = {}
            while len(ends) < 200:
                frame = await app.receive()
                if frame["type"] in ("response.end", "error"):
                    assert frame["id"] not in ends, "a second final frame"
                    ends[frame["id"]] = frame.get("code", "ok")
            assert list(ends.values()).count("ok") == 64
            assert list(ends.values()).count("too_many_inflight") == 136
            assert len(up.requests) == 64

            # An app that keeps its window within max_inflight gets everything through.
            window = trio.Semaphore(64)
            done = 0

            async def reader() -> None:
                nonlocal done
                while done < 200:
                    frame = await app.receive()
                    assert frame["type"] != "error", frame
                    if frame["type"] == "response.end":
                        done += 1
                        window.release()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                for i in range(200):
                    await window.acquire()
                    await app.request(f"w{i}", body={"model": "m"})
            assert done == 200


async def test_slow_reader_back_pressures_a_fast_50mb_stream(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    total = 50 * 1024 * 1024
    with trio.fail_after(60):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
            open_app(dp.socket_path) as app,
        ):
            up.script(Reply(stream_bytes=total))
            rss_before = current_rss()
            await app.request("big", body=STREAM)
            for _ in range(10):
                await app.receive_for("big")
                await trio.sleep(0.1)
            # The app has read ~10 KB in a second: the upstream was held back, not buffered.
            assert up.bytes_sent < 8 * 1024 * 1024
            peak = current_rss()
            events = 0
            while (frame := await app.receive_for("big"))["type"] == "response.event":
                events += 1
                if events % 5000 == 0:
                    peak = max(peak, current_rss())
            assert frame["type"] == "response.end"
            assert up.bytes_sent >= total
            assert events > 40_000
            grown = peak - rss_before
            assert grown < 30 * 1024 * 1024, f"RSS grew by {grown / 2**20:.1f} MiB"


async def test_oversize_message_closes_1009(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(
                shared_bao, runtime_dir, up.url, listen={"max_message_bytes": 1024}
            ) as dp,
            open_app(dp.socket_path) as app,
        ):
            await app.send(json.dumps({"type": "ping", "id": "x" * 2000}))
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await app.receive()
            assert closed.value.reason.code == 1009
            while dp.local.closes.get(1009) != 1:  # noqa: ASYNC110 - the server's bookkeeping
                await trio.sleep(0.01)


async def expect_refusal(path: str) -> trio_websocket.CloseReason:
    """Connect to /v1/ws and return the close the daemon answers with."""
    stream = await trio.open_unix_socket(path)
    async with stream, trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(nursery, stream, "openclawd", "/v1/ws")
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.get_message()
        nursery.cancel_scope.cancel()
    reason = closed.value.reason
    assert reason is not None
    return reason


async def test_peer_not_allowed_is_closed_1008(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(
                shared_bao, runtime_dir, up.url, listen={"allowed_uids": [os.getuid() + 1]}
            ) as dp,
        ):
            reason = await expect_refusal(dp.socket_path)
            assert reason.code == 1008
            assert f"uid {os.getuid()}" in (reason.reason or "")


async def test_over_max_connections_is_closed_1013(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url, listen={"max_connections": 1}) as dp,
            open_app(dp.socket_path) as app,
        ):
            reason = await expect_refusal(dp.socket_path)
            assert reason.code == 1013
            # The connection that holds the slot is untouched.
            assert (await app.call("a", body={}))[-1]["type"] == "response.end"


async def test_silent_peer_is_closed_after_ping_timeout(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(
                shared_bao,
                runtime_dir,
                up.url,
                listen={"ping_interval_s": 0.2, "ping_timeout_s": 0.3},
            ) as dp,
        ):
            # A client that completes the handshake, then never reads nor answers a ping.
            stream = await trio.open_unix_socket(dp.socket_path)
            async with stream:
                await stream.send_all(
                    b"GET /v1/ws HTTP/1.1\r\nHost: openclawd\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\n"
                )
                received = b""
                while True:
                    data = await stream.receive_some()
                    if not data:
                        break
                    received += data
                head, _, frames = received.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 101")
                opcodes, close = server_frames(frames)
                assert opcodes[0] == 0x1  # the hello
                assert 0x9 in opcodes  # pinged
                assert opcodes[-1] == 0x8
                assert int.from_bytes(close[:2], "big") == 1011
                assert close[2:] == b"no pong within 0.3s"


async def test_not_a_websocket_upgrade_gets_426(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
        ):
            stream = await trio.open_unix_socket(dp.socket_path)
            async with stream:
                await stream.send_all(b"GET /v1/ws HTTP/1.1\r\nHost: openclawd\r\n\r\n")
                received = b""
                while data := await stream.receive_some():
                    received += data
                head, _, body = received.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 426")
                assert json.loads(body)["error"]["code"] == "bad_request"


@pytest.mark.parametrize("how", ["cancel", "deadline"])
async def test_a_request_cut_while_its_frame_is_half_sent_leaves_the_channel_whole(
    shared_bao: Bao,
    runtime_dir: Path,
    how: str,
) -> None:
    """A cancel or the total deadline stops the upstream side of a request, never a frame
    half written to an app that reads slowly: the channel and its other requests go on."""
    big = b"data: " + b"x" * (4 * 1024 * 1024) + b"\n\n"
    provider = {"total_timeout_s": 1.0} if how == "deadline" else {}
    with trio.fail_after(30):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url, provider=provider) as dp,
            open_app(dp.socket_path) as app,
        ):
            up.script(Reply(chunks=[b"data: small\n\n", big, big], stall_after_chunks=3))
            await app.request("c1", body=STREAM)
            await trio.sleep(1.5)  # not reading: a 4 MiB frame is stuck half sent
            if how == "cancel":
                await app.send({"type": "cancel", "id": "c1"})
            await app.send({"type": "ping", "id": "after"})
            frames = []
            while (frame := await app.receive())["type"] != "pong":
                frames.append(frame)
            assert frame == {"type": "pong", "id": "after"}
            if frames[-1]["type"] != "error":
                frames += await app.exchange("c1")
            assert types(frames)[:3] == ["response.start", "response.event", "response.event"]
            assert len(frames[2]["data"]) == 4 * 1024 * 1024  # whole
            assert frames[-1]["type"] == "error"
            expected = "cancelled" if how == "cancel" else "upstream_timeout"
            assert frames[-1]["code"] == expected
            # Still a channel.
            assert (await app.call("c2", body={"model": "m"}))[-1]["type"] == "response.end"


async def test_a_slow_but_reading_app_is_not_taken_for_a_dead_one(
    shared_bao: Bao,
    runtime_dir: Path,
) -> None:
    """Our ping waits behind the backlog the app is still reading; its pong comes late,
    but the app is alive (it takes our frames) and must not be closed 1011."""
    with trio.fail_after(30):
        async with (
            open_fake_upstream() as up,
            open_dataplane(
                shared_bao,
                runtime_dir,
                up.url,
                listen={"ping_interval_s": 0.2, "ping_timeout_s": 0.3},
            ) as dp,
            open_app(dp.socket_path) as app,
        ):
            up.script(Reply(stream_bytes=3 * 1024 * 1024))
            await app.request("slow", body=STREAM)
            for _ in range(300):  # ~1.5 s of reading 1 KiB events, far behind the writer
                assert (await app.receive_for("slow"))["type"] != "error"
                await trio.sleep(0.005)
            while (frame := await app.receive_for("slow"))["type"] == "response.event":
                pass
            assert frame["type"] == "response.end"
            assert 1011 not in dp.local.closes
