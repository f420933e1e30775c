"""/v1/ws through the front door and the channel driver, over memory streams in virtual
time (CONTRACT.md 3.1, 3.4): the hello, requests relayed as frames, every error frame a
request can end with, and the app's cancel."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from openclawd import __version__

from .harness import KEY, LIMIT_S, NEW_KEY, FakeKeys, closed, open_channel, open_plane

USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def types(frames: list[dict[str, Any]]) -> list[str]:
    return [frame["type"] for frame in frames]


async def hang(request: httpx.Request) -> httpx.Response:
    """An upstream that never answers."""
    await trio.sleep_forever()
    raise AssertionError("unreachable")


def sse(*chunks: bytes, then: trio.Event | None = None) -> httpx.Response:
    """An SSE response of ``chunks``; with ``then``, the body stalls after them and sets
    ``then`` once the daemon has closed it."""

    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk
        if then is not None:
            try:
                await trio.sleep_forever()
            finally:
                then.set()

    headers = {"content-type": "text/event-stream", "x-request-id": "req-7", "set-cookie": "a=b"}
    return httpx.Response(200, headers=headers, content=body())


async def test_hello_names_the_protocol_providers_and_limits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with (
            open_plane(listen={"max_inflight_per_connection": 7}) as plane,
            open_channel(plane) as app,
        ):
            assert app.hello == {
                "type": "hello",
                "protocol": 1,
                "server": f"openclawd/{__version__}",
                "providers": ["openai"],
                "max_message_bytes": 1048576,
                "max_inflight": 7,
            }


async def test_a_non_streaming_response_is_one_body_frame_with_the_key_added(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def reply(request: httpx.Request) -> httpx.Response:
        await request.aread()
        body = {"choices": [{"message": {"content": "Hello!"}}], "usage": USAGE}
        headers = {"x-request-id": "req-1", "x-ratelimit-remaining-requests": "99"}
        return httpx.Response(200, headers={**headers, "server": "up"}, json=body)

    with trio.fail_after(LIMIT_S):
        async with open_plane(reply) as plane, open_channel(plane) as app:
            frames = await app.call(
                "n1", body={"model": "m"}, headers={"OpenAI-Beta": "assistants=v2"}
            )
            assert frames == [
                {
                    "type": "response.start",
                    "id": "n1",
                    "status": 200,
                    "headers": {
                        "content-type": "application/json",
                        "x-request-id": "req-1",
                        "x-ratelimit-remaining-requests": "99",
                    },
                },
                {
                    "type": "response.body",
                    "id": "n1",
                    "body": {"choices": [{"message": {"content": "Hello!"}}], "usage": USAGE},
                },
                {
                    "type": "response.end",
                    "id": "n1",
                    "key_version": 1,
                    "attempts": 1,
                    "usage": USAGE,
                    "provider": "openai",  # CONTRACT.md 5.4
                },
            ]
            [seen] = plane.upstream.requests
            assert (seen.method, str(seen.url)) == (
                "POST",
                "https://api.openai.test/v1/chat/completions",
            )
            assert seen.headers.get_list("authorization") == [f"Bearer {KEY}"]
            assert seen.headers["openai-beta"] == "assistants=v2"
            assert seen.headers["content-type"] == "application/json"
            assert json.loads(seen.content) == {"model": "m"}


async def test_an_event_stream_is_relayed_event_by_event_then_ended_with_its_usage(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def reply(request: httpx.Request) -> httpx.Response:
        return sse(
            b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n',
            b"event: note\ndata: line one\ndata: line two\n\n",
            b'data: {"choices":[],"usage":' + json.dumps(USAGE).encode() + b"}\n\n",
            b"data: [DONE]\n\n",
        )

    with trio.fail_after(LIMIT_S):
        async with open_plane(reply) as plane, open_channel(plane) as app:
            frames = await app.call("s1", body={"stream": True})
            assert types(frames) == ["response.start"] + ["response.event"] * 4 + ["response.end"]
            start, *events, end = frames
            assert start["headers"] == {
                "content-type": "text/event-stream",
                "x-request-id": "req-7",
            }
            assert [(e["id"], e["event"], e["data"]) for e in events] == [
                ("s1", None, '{"choices":[{"delta":{"content":"Hel"}}]}'),
                ("s1", "note", "line one\nline two"),
                ("s1", None, '{"choices":[],"usage":' + json.dumps(USAGE) + "}"),
                ("s1", None, "[DONE]"),
            ]
            assert end == {
                "type": "response.end",
                "id": "s1",
                "key_version": 1,
                "attempts": 1,
                "usage": USAGE,
                "provider": "openai",  # CONTRACT.md 5.4
            }


async def test_an_upstream_error_status_is_relayed_as_a_response(
    autojump_clock: trio.testing.MockClock,
) -> None:
    error = {"error": {"message": "bad model", "type": "invalid_request_error"}}

    async def reply(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json=error)

    with trio.fail_after(LIMIT_S):
        async with open_plane(reply) as plane, open_channel(plane) as app:
            start, body, end = await app.call("e1", body={})
            assert (start["status"], body["body"], end["attempts"]) == (400, error, 1)


async def test_a_request_for_an_unknown_provider_is_an_error_frame(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_plane() as plane, open_channel(plane) as app:
            await app.send({"type": "request", "id": "u1", "provider": "nope", "path": "/v1/x"})
            [frame] = await app.exchange("u1")
            assert (frame["type"], frame["code"], frame["retry_after"]) == (
                "error",
                "unknown_provider",
                None,
            )
            assert plane.upstream.requests == []


@pytest.mark.parametrize(
    ("frame", "rid"),
    [
        ("not json", None),
        ("[1, 2]", None),
        ({"type": "launch", "id": "b1"}, "b1"),
        ({"type": "request", "id": "b2", "provider": "openai"}, "b2"),  # no path
        (
            {
                "type": "request",
                "id": "b3",
                "provider": "openai",
                "path": "/v1/x",
                "headers": {"Authorization": "Bearer app-secret"},
            },
            "b3",
        ),
    ],
)
async def test_a_bad_frame_is_a_bad_request_and_the_channel_goes_on(
    autojump_clock: trio.testing.MockClock, frame: dict[str, Any] | str, rid: str | None
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_plane() as plane, open_channel(plane) as app:
            await app.send(frame)
            [error] = await app.exchange(rid) if rid else [await app.receive_for(None)]
            assert (error["type"], error["id"], error["code"]) == ("error", rid, "bad_request")
            assert "app-secret" not in error["message"]
            await app.send({"type": "ping", "id": 5})
            assert await app.receive_for(5) == {"type": "pong", "id": 5}
            assert types(await app.call("ok", body={})) == [
                "response.start",
                "response.body",
                "response.end",
            ]
            assert len(plane.upstream.requests) == 1


async def test_over_max_inflight_is_too_many_inflight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    arrived, release = trio.Event(), trio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        arrived.set()
        await release.wait()
        return httpx.Response(200, json={})

    with trio.fail_after(LIMIT_S):
        async with (
            open_plane(slow, listen={"max_inflight_per_connection": 1}) as plane,
            open_channel(plane) as app,
        ):
            await app.request("r1", body={})
            await arrived.wait()
            [refused] = await app.call("r2", body={})
            assert (refused["type"], refused["code"]) == ("error", "too_many_inflight")
            release.set()
            assert types(await app.exchange("r1"))[-1] == "response.end"
            assert len(plane.upstream.requests) == 1
            # The slot is free again.
            assert types(await app.call("r3", body={}))[-1] == "response.end"


async def test_over_the_rate_limit_is_rate_limited_with_retry_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with (
            open_plane(limits={"requests_per_minute": 1}) as plane,
            open_channel(plane) as app,
        ):
            assert types(await app.call("r1", body={}))[-1] == "response.end"
            [refused] = await app.call("r2", body={})
            assert (refused["code"], refused["retry_after"]) == ("rate_limited", 60.0)
            assert trio.current_time() == 0  # no time passed: the full minute to wait
            await trio.sleep(60)
            assert types(await app.call("r3", body={}))[-1] == "response.end"
            assert len(plane.upstream.requests) == 2


async def test_a_request_during_a_drain_is_refused_draining(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_plane() as plane, open_channel(plane) as app:
            plane.lifecycle.set_draining(trio.current_time() + 30)
            [refused] = await app.call("d1", body={})
            assert (refused["type"], refused["code"]) == ("error", "draining")
            assert plane.upstream.requests == []
            plane.lifecycle.set_draining(None)  # the operator's resume
            assert types(await app.call("d2", body={}))[-1] == "response.end"


async def test_no_connection_upstream_is_upstream_unavailable_after_the_retries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    with trio.fail_after(LIMIT_S):
        async with (
            open_plane(refused, provider={"max_retries": 2}) as plane,
            open_channel(plane) as app,
        ):
            [error] = await app.call("c1", body={})
            assert (error["type"], error["code"], error["retry_after"]) == (
                "error",
                "upstream_unavailable",
                None,
            )
            assert len(plane.upstream.requests) == 3  # the first and two retries


async def test_no_response_head_within_total_timeout_is_upstream_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with (
            open_plane(hang, provider={"total_timeout_s": 30}) as plane,
            open_channel(plane) as app,
        ):
            [error] = await app.call("t1", body={})
            assert (error["type"], error["code"]) == ("error", "upstream_timeout")
            assert trio.current_time() == 30


async def test_a_stream_that_stalls_after_the_start_ends_with_upstream_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stalled = trio.Event()

    async def reply(request: httpx.Request) -> httpx.Response:
        return sse(b"data: one\n\n", then=stalled)

    with trio.fail_after(LIMIT_S):
        async with (
            open_plane(reply, provider={"total_timeout_s": 30}) as plane,
            open_channel(plane) as app,
        ):
            frames = await app.call("t2", body={})
            assert types(frames) == ["response.start", "response.event", "error"]
            assert frames[-1]["code"] == "upstream_timeout"  # in place of response.end
            assert trio.current_time() == 30
            await stalled.wait()  # the upstream body was closed


async def test_a_stream_dropped_after_the_start_ends_with_upstream_unavailable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def reply(request: httpx.Request) -> httpx.Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"data: one\n\n"
            raise httpx.ReadError("connection reset by peer")

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    with trio.fail_after(LIMIT_S):
        async with open_plane(reply) as plane, open_channel(plane) as app:
            frames = await app.call("x1", body={})
            assert types(frames) == ["response.start", "response.event", "error"]
            assert frames[-1]["code"] == "upstream_unavailable"
            assert len(plane.upstream.requests) == 1  # never retried after a byte


async def test_cancel_aborts_the_request_upstream_and_ends_it_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    aborted = trio.Event()

    async def reply(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/stall":
            return sse(b"data: one\n\n", then=aborted)
        return sse(b"data: two\n\n")

    with trio.fail_after(LIMIT_S):
        async with open_plane(reply) as plane, open_channel(plane) as app:
            await app.request("k1", "/v1/stall", body={})
            assert (await app.receive_for("k1"))["type"] == "response.start"
            assert (await app.receive_for("k1"))["data"] == "one"
            await app.send({"type": "cancel", "id": "k1"})
            [error] = await app.exchange("k1")
            assert (error["type"], error["code"]) == ("error", "cancelled")
            await aborted.wait()  # the upstream response was closed
            # The id is free again, and the channel goes on.
            assert types(await app.call("k1", body={}))[0] == "response.start"


async def test_a_refused_key_is_retried_once_with_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def reply(request: httpx.Request) -> httpx.Response:
        if request.headers["authorization"] == f"Bearer {KEY}":
            return httpx.Response(401, json={"error": "revoked"})
        return httpx.Response(200, json={})

    keys = FakeKeys(KEY, NEW_KEY)
    with trio.fail_after(LIMIT_S):
        async with open_plane(reply, keys=keys) as plane, open_channel(plane) as app:
            start, _, end = await app.call("a1", body={})
            assert (start["status"], end["key_version"], end["attempts"]) == (200, 2, 2)
            assert [k.version for k in keys.failures] == [1]


async def test_a_message_over_max_message_bytes_closes_the_channel_1009(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with (
            open_plane(listen={"max_message_bytes": 1024}) as plane,
            open_channel(plane) as app,
        ):
            await app.send({"type": "ping", "id": "x" * 1024})
            code, _ = await closed(app.ws)
            assert code == 1009


async def test_an_app_that_stops_answering_pings_is_closed_1011(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with (
            open_plane(listen={"ping_interval_s": 20, "ping_timeout_s": 5}) as plane,
            open_channel(plane) as app,
        ):
            app.ws.silent = True
            code, _ = await closed(app.ws)
            assert code == 1011
            assert app.ws.close_at == 25  # quiet for 20 s, then 5 s without a pong
