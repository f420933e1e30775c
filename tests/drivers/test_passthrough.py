"""/v1/http through the front door and the passthrough driver, over memory streams in
virtual time (CONTRACT.md 3.3): the upstream's answer byte for byte, the headers dropped
and the key added, the daemon's own error answers, and bodies streamed both ways."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import h11
import httpx
import pytest
import trio
import trio.testing

from openclawd.local.passthrough import REPLAYABLE_BYTES

from .harness import KEY, LIMIT_S, Plane, call, open_http, open_plane

BODY = bytes(range(256)) * 4  # not UTF-8, not JSON: relayed as bytes


async def test_the_upstream_answer_is_relayed_byte_for_byte_without_hop_headers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def reply(request: httpx.Request) -> httpx.Response:
        headers = [
            ("content-type", "application/octet-stream"),
            ("x-custom", "A  b;c"),
            ("x-multi", "1"),
            ("x-multi", "2"),
            ("connection", "x-up-hop"),
            ("x-up-hop", "named by connection"),
            ("keep-alive", "timeout=5"),
        ]
        return httpx.Response(
            201, headers=headers, content=BODY, extensions={"reason_phrase": b"Made It"}
        )

    with trio.fail_after(LIMIT_S):
        async with open_plane(reply) as plane:
            answer = await call(plane, "GET", "/v1/http/openai/v1/files/f1")
            assert (answer.status, answer.reason, answer.body) == (201, b"Made It", BODY)
            assert answer.headers == [
                (b"content-type", b"application/octet-stream"),
                (b"x-custom", b"A  b;c"),
                (b"x-multi", b"1"),
                (b"x-multi", b"2"),
                (b"content-length", b"1024"),
                (b"openclawd-provider", b"openai"),  # CONTRACT.md 5.4
            ]


async def test_credential_and_hop_headers_are_dropped_and_the_key_added(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def reply(request: httpx.Request) -> httpx.Response:
        await request.aread()
        return httpx.Response(200)

    sent = [
        ("authorization", "Bearer app-secret"),
        ("proxy-authorization", "Basic YXBwOnNlY3JldA=="),
        ("cookie", "session=app"),
        ("connection", "x-app-hop"),
        ("x-app-hop", "named by connection"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("openai-beta", "assistants=v2"),
        ("x-app", "kept"),
        ("content-type", "application/json"),
    ]
    with trio.fail_after(LIMIT_S):
        async with open_plane(reply) as plane:
            answer = await call(
                plane, "POST", "/v1/http/openai/v1/files?purpose=x&b=2", sent, b'{"a":1}'
            )
            assert answer.status == 200
            [seen] = plane.upstream.requests
            assert (seen.method, str(seen.url)) == (
                "POST",
                "https://api.openai.test/v1/files?purpose=x&b=2",
            )
            assert seen.headers.get_list("authorization") == [f"Bearer {KEY}"]
            for dropped in ("proxy-authorization", "cookie", "x-app-hop", "keep-alive", "te"):
                assert dropped not in seen.headers, dropped
            assert "x-app-hop" not in seen.headers.get("connection", "")
            assert seen.headers["openai-beta"] == "assistants=v2"
            assert seen.headers["x-app"] == "kept"
            assert seen.content == b'{"a":1}'


async def test_the_key_goes_in_the_providers_own_header(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_plane(provider={"auth_header": "x-api-key", "auth_scheme": ""}) as plane:
            headers = [("x-api-key", "app-key"), ("authorization", "Bearer app-secret")]
            answer = await call(plane, "GET", "/v1/http/openai/v1/models", headers)
            assert answer.status == 200
            [seen] = plane.upstream.requests
            assert seen.headers.get_list("x-api-key") == [KEY]
            assert "authorization" not in seen.headers


async def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused")


async def hang(request: httpx.Request) -> httpx.Response:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


async def test_an_unknown_provider_is_404_unknown_provider(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_plane() as plane:
            answer = await call(plane, "GET", "/v1/http/nope/v1/models")
            assert (answer.status, answer.header("content-type")) == (404, "application/json")
            assert answer.json() == {
                "error": {"code": "unknown_provider", "message": "unknown provider"}
            }
            assert plane.upstream.requests == []


async def test_over_the_rate_limit_is_429_with_retry_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_plane(limits={"requests_per_minute": 1}) as plane:
            assert (await call(plane, "GET", "/v1/http/openai/v1/models")).status == 200
            answer = await call(plane, "GET", "/v1/http/openai/v1/models")
            assert (answer.status, answer.header("retry-after")) == (429, "60")
            assert answer.json()["error"]["code"] == "rate_limited"
            assert len(plane.upstream.requests) == 1


async def test_no_connection_upstream_is_502_upstream_unavailable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_plane(refused, provider={"max_retries": 0}) as plane:
            answer = await call(plane, "GET", "/v1/http/openai/v1/models")
            assert answer.status == 502
            assert answer.json()["error"]["code"] == "upstream_unavailable"
            assert set(answer.json()["error"]) == {"code", "message"}


async def test_no_answer_within_total_timeout_is_504_upstream_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_plane(hang, provider={"total_timeout_s": 30}) as plane:
            answer = await call(plane, "GET", "/v1/http/openai/v1/models")
            assert answer.status == 504
            assert answer.json()["error"]["code"] == "upstream_timeout"
            assert trio.current_time() == 30


@pytest.mark.parametrize(
    ("target", "status", "code"),
    [
        ("/v1/http/openai/v1/../admin", 400, "bad_request"),
        ("/v1/http/openai//evil.example/x", 400, "bad_request"),
        ("/v1/elsewhere", 404, "not_found"),
    ],
)
async def test_a_request_refused_before_the_upstream_is_a_json_error(
    autojump_clock: trio.testing.MockClock, target: str, status: int, code: str
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_plane() as plane:
            answer = await call(plane, "GET", target)
            assert (answer.status, answer.json()["error"]["code"]) == (status, code)
            assert plane.upstream.requests == []


async def test_a_response_is_streamed_as_it_comes(autojump_clock: trio.testing.MockClock) -> None:
    go_on, closed = trio.Event(), trio.Event()

    async def reply(request: httpx.Request) -> httpx.Response:
        async def body() -> AsyncIterator[bytes]:
            try:
                yield b"data: one\n\n"
                await go_on.wait()  # only once the app has the first event
                yield b"data: two\n\n"
            finally:
                closed.set()

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    with trio.fail_after(LIMIT_S):
        async with open_plane(reply) as plane, open_http(plane) as app:
            await app.send_head("POST", "/v1/http/openai/v1/chat/completions")
            await app.send(h11.EndOfMessage())
            head = await app.read_head()
            assert (head.status_code, dict(head.headers)[b"content-type"]) == (
                200,
                b"text/event-stream",
            )
            assert (await app.next_event()).data == b"data: one\n\n"
            go_on.set()
            assert await app.read_body() == b"data: two\n\n"
            await closed.wait()


async def test_a_large_request_body_is_streamed_to_the_upstream_as_it_comes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Past the part held for a retry, the body goes upstream as the app sends it: the
    upstream has the first part before the app sends the rest."""
    first, tail = b"a" * (REPLAYABLE_BYTES + 1), b"the rest"
    got_first = trio.Event()

    async def reply(request: httpx.Request) -> httpx.Response:
        seen = bytearray()
        async for chunk in request.stream:  # type: ignore[union-attr]
            seen += chunk
            if len(seen) >= len(first):
                got_first.set()
        return httpx.Response(200, json={"bytes": len(seen), "sha": _sha(bytes(seen))})

    with trio.fail_after(LIMIT_S):
        async with open_plane(reply) as plane, open_http(plane) as app:
            length = str(len(first) + len(tail))
            await app.send_head("POST", "/v1/http/openai/v1/files", [("content-length", length)])
            await app.send(h11.Data(data=first))
            await got_first.wait()
            await app.send(h11.Data(data=tail))
            await app.send(h11.EndOfMessage())
            head = await app.read_head()
            answer: dict[str, Any] = json.loads(await app.read_body())
            assert head.status_code == 200
            assert answer == {"bytes": len(first) + len(tail), "sha": _sha(first + tail)}
            assert plane.upstream.requests[0].headers["content-length"] == length


async def test_an_app_that_leaves_mid_response_abandons_it_upstream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    closed = trio.Event()

    async def reply(request: httpx.Request) -> httpx.Response:
        async def body() -> AsyncIterator[bytes]:
            try:
                yield b"data: one\n\n"
                await trio.sleep_forever()
            finally:
                closed.set()

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    with trio.fail_after(LIMIT_S):
        async with open_plane(reply) as plane:
            async with open_http(plane) as app:
                await app.send_head("GET", "/v1/http/openai/v1/stream")
                await app.send(h11.EndOfMessage())
                assert (await app.read_head()).status_code == 200
                assert (await app.next_event()).data == b"data: one\n\n"
            await closed.wait()  # the app's end closed: the upstream body is closed
            await _settled(plane)
            assert plane.passthrough.inflight == 0


async def _settled(plane: Plane) -> None:
    await trio.testing.wait_all_tasks_blocked()
    assert plane.local.clients == 0


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
