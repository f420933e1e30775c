"""Token control through the drivers (CONTRACT.md 5.1, 5.3, 5.5), over memory streams in
virtual time: a connection's client from its peer, its allow-lists, its token limits
charged before a request and corrected to the usage reported, its daily budget."""

from __future__ import annotations

import io
import json
from typing import Any

import httpx
import trio
import trio.testing

from openclawd.local.unix import PeerCredentials

from .harness import APP, LIMIT_S, call, open_channel, open_plane

BILLING = PeerCredentials(pid=4242, uid=1001, gid=1001)


def usage_reply(prompt: int, completion: int) -> Any:
    async def reply(request: httpx.Request) -> httpx.Response:
        await request.aread()
        usage = {"prompt_tokens": prompt, "completion_tokens": completion}
        return httpx.Response(200, json={"ok": True, "usage": usage})

    return reply


async def test_a_provider_or_model_outside_the_clients_lists_is_forbidden_before_upstream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clients = {"billing": {"uids": [1001], "providers": ["openai"], "models": ["gpt-4o-mini"]}}
    with trio.fail_after(LIMIT_S):
        async with open_plane(clients=clients) as plane:
            async with open_channel(plane, peer=BILLING) as app:
                [refused] = await app.call("m1", body={"model": "gpt-5-secret"})
                assert (refused["type"], refused["code"]) == ("error", "forbidden")
                assert "gpt-5-secret" not in refused["message"]
                frames = await app.call("m2", body={"model": "gpt-4o-mini"})
                assert frames[-1]["type"] == "response.end"
            body = json.dumps({"model": "gpt-5-secret"}).encode()
            answer = await call(plane, "POST", "/v1/http/openai/v1/x", body=body, peer=BILLING)
            assert answer.status == 403
            assert answer.json()["error"]["code"] == "forbidden"
            # Another peer is client "default", with no lists.
            answer = await call(plane, "POST", "/v1/http/openai/v1/x", body=body, peer=APP)
            assert answer.status == 200
            assert len(plane.upstream.requests) == 2


async def test_tokens_are_charged_before_and_corrected_to_the_usage_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A limit of 1,000 tokens a minute: a request asking for up to 900 completion tokens
    is charged ~900 first; once its usage (30 + 20) is read, it is charged 50, and the
    next such request fits at once."""
    clients = {"billing": {"uids": [1001], "tokens_per_minute": 1000}}
    body = {"model": "m", "max_tokens": 900}
    with trio.fail_after(LIMIT_S):
        async with (
            open_plane(usage_reply(30, 20), clients=clients) as plane,
            open_channel(plane, peer=BILLING) as app,
        ):
            gate = trio.Event()
            replies: list[trio.Event] = []

            async def held(request: httpx.Request) -> httpx.Response:
                await request.aread()
                replies.append(trio.Event())
                await gate.wait()
                usage = {"prompt_tokens": 30, "completion_tokens": 20}
                return httpx.Response(200, json={"usage": usage})

            plane.upstream.handler = held
            await app.request("t1", body=body)
            await trio.testing.wait_all_tasks_blocked()
            assert len(replies) == 1  # t1 is at the upstream, charged its estimate
            await app.request("t2", body=body)
            refused = await app.receive_for("t2")
            assert (refused["type"], refused["code"]) == ("error", "rate_limited")
            assert refused["retry_after"] > 0
            assert refused["message"] == "client billing: tokens_per_minute 1000 reached"
            gate.set()
            frames = await app.exchange("t1")
            assert frames[-1]["type"] == "response.end"
            assert trio.current_time() == 0  # no refill: the correction made the room
            frames = await app.call("t3", body=body)
            assert frames[-1]["type"] == "response.end"


async def test_a_request_that_fails_before_the_upstream_answers_is_refunded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clients = {"billing": {"uids": [1001], "requests_per_minute": 1}}

    async def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    with trio.fail_after(LIMIT_S):
        async with (
            open_plane(down, provider={"max_retries": 0}, clients=clients) as plane,
            open_channel(plane, peer=BILLING) as app,
        ):
            [failed] = await app.call("f1", body={})
            assert failed["code"] == "upstream_unavailable"
            [failed] = await app.call("f2", body={})  # refunded: not rate_limited
            assert failed["code"] == "upstream_unavailable"


async def test_a_spent_daily_budget_is_budget_exhausted_on_ws_and_429_on_http(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clients = {"billing": {"uids": [1001], "tokens_per_day": 100}}
    with trio.fail_after(LIMIT_S):
        async with open_plane(usage_reply(60, 60), clients=clients) as plane:
            async with open_channel(plane, peer=BILLING) as app:
                frames = await app.call("b1", body={"max_tokens": 10})
                assert frames[-1]["type"] == "response.end"  # charged 120 at the end
                [refused] = await app.call("b2", body={"max_tokens": 10})
                assert refused["code"] == "budget_exhausted"
                assert refused["retry_after"] > 0
            answer = await call(
                plane, "POST", "/v1/http/openai/v1/x", body=b'{"max_tokens":1}', peer=BILLING
            )
            assert answer.status == 429
            assert answer.json()["error"]["code"] == "budget_exhausted"
            assert int(answer.header("retry-after") or 0) >= 1


async def test_request_log_lines_name_the_client(
    autojump_clock: trio.testing.MockClock, log_text: io.StringIO
) -> None:
    clients = {"billing": {"uids": [1001]}}
    with trio.fail_after(LIMIT_S):
        async with open_plane(clients=clients) as plane:
            await call(plane, "GET", "/v1/http/openai/v1/models", peer=BILLING)
            async with open_channel(plane, peer=BILLING) as app:
                await app.call("c1", body={})
            await call(plane, "GET", "/v1/http/openai/v1/models", peer=APP)
    lines = log_text.getvalue().splitlines()
    requests = [
        line for line in lines if "event=http.request" in line or "event=upstream.request" in line
    ]
    assert len(requests) == 5  # 2 http.request, 3 upstream.request
    assert sum("client=billing" in line for line in requests) == 3
    assert sum("client=default" in line for line in requests) == 2
