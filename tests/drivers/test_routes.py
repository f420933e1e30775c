"""Routes (CONTRACT.md 5.4) through the drivers, over memory streams in virtual time: a
route's providers tried in order, the next one at once on a 429, a 5xx or no connection
before any byte was relayed, the body's model rewritten per provider, and the provider that
answered named in response.end and the openclawd-provider header."""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio
import trio.testing
from trio_websocket import WebSocketRequest

from .harness import LIMIT_S, WsUpstream, call, open_channel, open_plane, open_ws

EU = {"openai_eu": {"base_url": "https://eu.openai.test"}}
CHAT = {"chat": {"providers": ["openai", "openai_eu"], "models": {"openai_eu": {"m": "m-eu"}}}}


def by_host(first: int) -> Any:
    """The upstream: api.openai.test answers ``first``; eu.openai.test 200 with the model
    it was sent."""

    async def reply(request: httpx.Request) -> httpx.Response:
        body = json.loads(await request.aread() or b"{}")
        if request.url.host == "api.openai.test":
            if first < 0:
                raise httpx.ConnectError("refused")
            return httpx.Response(first, json={"error": "busy"})
        return httpx.Response(200, json={"model": body.get("model"), "host": "eu"})

    return reply


async def test_a_429_sends_the_request_to_the_routes_next_provider_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with (
            open_plane(by_host(429), more_providers=EU, routes=CHAT) as plane,
            open_channel(plane) as app,
        ):
            assert "chat" in app.hello["providers"]
            frames = await app.call("r1", body={"model": "m"}, provider="chat")
            assert frames[0]["status"] == 200
            assert frames[1]["body"] == {"model": "m-eu", "host": "eu"}  # rewritten for eu
            assert frames[-1]["provider"] == "openai_eu"
            assert trio.current_time() == 0  # at once: no retry, no backoff
            hosts = [r.url.host for r in plane.upstream.requests]
            assert hosts == ["api.openai.test", "eu.openai.test"]
            assert plane.upstreams.fallbacks == {("chat", "openai", "openai_eu", "429"): 1}


async def test_a_5xx_or_no_connection_moves_on_too_and_http_names_the_provider(
    autojump_clock: trio.testing.MockClock,
) -> None:
    for first, reason in ((503, "503"), (-1, "upstream_unavailable")):
        with trio.fail_after(LIMIT_S):
            async with open_plane(by_host(first), more_providers=EU, routes=CHAT) as plane:
                body = json.dumps({"model": "m"}).encode()
                answer = await call(plane, "POST", "/v1/http/chat/v1/chat/completions", body=body)
                assert answer.status == 200
                assert answer.header("openclawd-provider") == "openai_eu"
                assert answer.json() == {"model": "m-eu", "host": "eu"}
                assert plane.upstreams.fallbacks == {("chat", "openai", "openai_eu", reason): 1}


async def test_the_last_provider_of_a_route_answers_whatever_it_says(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def both_busy(request: httpx.Request) -> httpx.Response:
        await request.aread()
        return httpx.Response(429, json={"error": request.url.host})

    with trio.fail_after(LIMIT_S):
        async with (
            open_plane(
                both_busy, more_providers=EU, routes=CHAT, provider={"max_retries": 0}
            ) as plane,
            open_channel(plane) as app,
        ):
            frames = await app.call("r1", body={"model": "m"}, provider="chat")
            assert frames[0]["status"] == 429
            assert frames[-1]["provider"] == "openai_eu"


async def test_a_provider_with_an_open_circuit_is_passed_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with (
            open_plane(by_host(200), more_providers=EU, routes=CHAT) as plane,
            open_channel(plane) as app,
        ):
            breaker = plane.upstreams.pools["openai"].breaker
            for _ in range(breaker.failure_threshold):
                breaker.failure(trio.current_time())
            frames = await app.call("r1", body={"model": "m"}, provider="chat")
            assert frames[-1]["provider"] == "openai_eu"
            assert [r.url.host for r in plane.upstream.requests] == ["eu.openai.test"]
            assert plane.upstreams.fallbacks == {("chat", "openai", "openai_eu", "no room"): 1}


async def test_a_routes_provider_over_its_own_limit_is_passed_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """CONTRACT.md 5.4: the first provider 'whose limits have room'; its limit is charged
    only when it is the one tried, and given back when the route moves on."""
    limited = {"limits": {"requests_per_minute": 1}}
    with trio.fail_after(LIMIT_S):
        async with (
            open_plane(by_host(200), provider=limited, more_providers=EU, routes=CHAT) as plane,
            open_channel(plane) as app,
        ):
            first = await app.call("r1", body={"model": "m"}, provider="chat")
            assert first[-1]["provider"] == "openai"
            second = await app.call("r2", body={"model": "m"}, provider="chat")
            assert second[-1]["provider"] == "openai_eu"
            assert plane.upstreams.fallbacks == {("chat", "openai", "openai_eu", "rate_limited"): 1}
            # A 5xx from openai would give its request back: here it answered, so it is spent.
            [refused] = await app.call("r3", body={"model": "m"})  # openai itself
            assert refused["code"] == "rate_limited"
            assert refused["message"] == "provider openai: requests_per_minute 1 reached"


async def test_a_realtime_session_to_a_route_opens_on_the_next_provider_after_a_429(
    autojump_clock: trio.testing.MockClock,
) -> None:
    eu = {"openai_eu": {"base_url": "https://eu.openai.test", "ws_url": "wss://rt.eu.test"}}

    async def busy_then_echo(request: WebSocketRequest, up: WsUpstream) -> None:
        if up.targets[-1].host == "realtime.openai.test":
            await request.reject(429, body=b"busy")
            return
        await up.echo(await request.accept())

    with trio.fail_after(LIMIT_S):
        async with (
            open_plane(ws=busy_then_echo, more_providers=eu, routes=CHAT) as plane,
            open_ws(plane, "/v1/realtime/chat") as app,
        ):
            await app.send_message("hello")
            assert await app.get_message() == "hello"
            assert [t.host for t in plane.ws_upstream.targets] == [
                "realtime.openai.test",
                "rt.eu.test",
            ]
