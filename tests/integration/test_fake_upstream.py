"""The fake upstream does what it says, so relay tests built on it can be trusted.

A real HTTP client (httpx, under trio) against ``tests/fake_upstream.py``: the default
OpenAI-shaped answers, the key check, scripted replies, what is recorded, and above all the
connection behaviour (keep-alive, drops, stalls, client closes, back-pressure).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import cast

import httpx
import pytest
import trio
import trio.testing

from ..fake_upstream import FakeUpstream, Reply, SeenRequest, open_fake_upstream

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


@asynccontextmanager
async def client_for(upstream: FakeUpstream) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=upstream.url, trust_env=False, timeout=5.0) as client:
        yield client


def sse_data(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def raw_stream(response: httpx.Response) -> AsyncGenerator[bytes, None]:
    """``aiter_raw()`` typed as the generator it is, for ``aclosing``."""
    return cast(AsyncGenerator[bytes, None], response.aiter_raw())


async def read_into(response: httpx.Response, received: list[bytes]) -> None:
    async for chunk in response.aiter_raw():
        received.append(chunk)


async def test_default_chat_completion() -> None:
    with trio.fail_after(10):
        async with open_fake_upstream() as upstream, client_for(upstream) as client:
            response = await client.post(CHAT, json={"model": "gpt-fake", "messages": MESSAGES})
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.headers["x-request-id"] == "req-0"
        assert response.headers["x-ratelimit-remaining-requests"] == "99"
        assert response.headers["x-ratelimit-remaining-tokens"] == "9000"
        body = response.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello!"}
        assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        assert upstream.requests[0].json()["messages"] == MESSAGES


@pytest.mark.parametrize("include_usage", [False, True])
async def test_default_stream(include_usage: bool) -> None:
    request = {"model": "gpt-fake", "messages": MESSAGES, "stream": True}
    if include_usage:
        request["stream_options"] = {"include_usage": True}
    with trio.fail_after(10):
        async with (
            open_fake_upstream() as upstream,
            client_for(upstream) as client,
            client.stream("POST", CHAT, json=request) as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            assert response.headers["transfer-encoding"] == "chunked"
            assert response.headers["x-request-id"] == "req-0"
            assert response.headers["x-ratelimit-remaining-requests"] == "99"
            raw_chunks = [chunk async for chunk in response.aiter_raw()]
            text = b"".join(raw_chunks).decode()
        events = sse_data(text)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        contents = [c["choices"][0]["delta"]["content"] for c in chunks if c["choices"]]
        assert contents == ["Hel", "lo", "!"]
        usage = [c["usage"] for c in chunks if "usage" in c]
        if include_usage:
            assert len(chunks) == 4
            assert chunks[-1]["choices"] == []
            assert usage == [{"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}]
        else:
            assert len(chunks) == 3
            assert usage == []
        assert upstream.bytes_sent == len(text.encode())


async def test_key_check() -> None:
    with trio.fail_after(10):
        async with (
            open_fake_upstream(expected_key="sk-right") as upstream,
            client_for(upstream) as client,
        ):
            wrong = await client.post(
                CHAT, json={"messages": MESSAGES}, headers={"authorization": "Bearer sk-no"}
            )
            missing = await client.get("/v1/models")
            right = await client.post(
                CHAT, json={"messages": MESSAGES}, headers={"authorization": "Bearer sk-right"}
            )
            models = await client.get("/v1/models", headers={"authorization": "Bearer sk-right"})
        for response in (wrong, missing):
            assert response.status_code == 401
            assert response.json() == {
                "error": {
                    "message": "Incorrect API key provided",
                    "type": "invalid_request_error",
                    "code": "invalid_api_key",
                }
            }
        assert right.status_code == 200
        assert right.json()["choices"][0]["message"]["content"] == "Hello!"
        assert models.status_code == 200
        assert models.json() == {"object": "list", "data": [{"id": "gpt-fake", "object": "model"}]}


async def test_unknown_route_and_malformed_json() -> None:
    with trio.fail_after(10):
        async with open_fake_upstream() as upstream, client_for(upstream) as client:
            missing = await client.get("/v1/nothing")
            get_chat = await client.get(CHAT)
            malformed = await client.post(
                CHAT, content=b"{not json", headers={"content-type": "application/json"}
            )
            not_object = await client.post(CHAT, json=[1, 2])
        assert missing.status_code == 404
        assert missing.json() == {"error": {"message": "no route", "type": "invalid_request_error"}}
        assert get_chat.status_code == 404
        for response in (malformed, not_object):
            assert response.status_code == 400
            assert response.json()["error"]["type"] == "invalid_request_error"


async def test_scripted_replies_in_order_then_default() -> None:
    with trio.fail_after(10):
        async with open_fake_upstream() as upstream, client_for(upstream) as client:
            upstream.script(
                Reply(status=503, body=b'{"error":"busy"}', headers=[("retry-after", "2")]),
                Reply(chunks=[b"data: a\n\n", b"data: b\n\n"]),
            )
            upstream.script(Reply(status=429), Reply(headers=[("x-extra", "1")]))
            assert upstream.scripted_left == 4
            first = await client.post(CHAT, json={"messages": MESSAGES})
            second = await client.post(CHAT, json={"messages": MESSAGES})
            third = await client.post(CHAT, json={"messages": MESSAGES})
            fourth = await client.post(CHAT, json={"messages": MESSAGES})
            fifth = await client.post(CHAT, json={"messages": MESSAGES})
            assert upstream.scripted_left == 0
        assert first.status_code == 503
        assert first.content == b'{"error":"busy"}'
        assert first.headers["retry-after"] == "2"
        assert first.headers["content-type"] == "application/json"
        assert first.headers["content-length"] == str(len(first.content))
        assert second.status_code == 200
        assert second.headers["content-type"] == "text/event-stream"
        assert second.headers["transfer-encoding"] == "chunked"
        assert second.content == b"data: a\n\ndata: b\n\n"
        assert third.status_code == 429
        assert third.json()["error"]["message"] == "fake upstream answered 429"
        # An empty Reply is the default answer; its headers are added to the default ones.
        assert fourth.status_code == 200
        assert fourth.headers["x-extra"] == "1"
        assert fourth.headers["x-ratelimit-remaining-requests"] == "99"
        assert fourth.json()["choices"][0]["message"]["content"] == "Hello!"
        assert fifth.status_code == 200
        assert "x-extra" not in fifth.headers
        assert [r.headers["x-request-id"] for r in (first, second, fifth)] == [
            "req-0",
            "req-1",
            "req-4",
        ]


async def test_request_recorded_with_headers_and_query() -> None:
    with trio.fail_after(10):
        async with open_fake_upstream() as upstream, client_for(upstream) as client:
            response = await client.get(
                "/v1/models?limit=2&after=x%20y",
                headers=[("X-Custom", "one"), ("x-custom", "two"), ("Authorization", "Bearer k")],
            )
            await client.post(CHAT + "?api-version=1", content=b'{"messages":[]}')
            await upstream.wait_requests(2)
        assert response.status_code == 200
        first, second = upstream.requests
        assert first.method == "GET"
        assert first.path == "/v1/models"
        assert first.query == "limit=2&after=x%20y"
        assert first.headers["x-custom"] == "one, two"
        assert first.headers["authorization"] == "Bearer k"
        assert first.headers["host"] == upstream.url.removeprefix("http://")
        assert first.body == b""
        assert second.method == "POST"
        assert second.path == CHAT
        assert second.query == "api-version=1"
        assert second.body == b'{"messages":[]}'
        assert second.headers["content-length"] == "15"


async def test_keep_alive_reuses_one_connection() -> None:
    with trio.fail_after(10):
        async with open_fake_upstream() as upstream:
            async with client_for(upstream) as client:
                for _ in range(3):
                    response = await client.post(CHAT, json={"messages": MESSAGES})
                    assert response.status_code == 200
                stream = {"messages": MESSAGES, "stream": True}
                async with client.stream("POST", CHAT, json=stream) as response:
                    await response.aread()
                assert [r.connection for r in upstream.requests] == [0, 0, 0, 0]
                assert upstream.connections_opened == 1
                assert upstream.open_connections == 1
                assert upstream.connections_closed == 0
            await upstream.wait_connections_closed(1)
            assert upstream.close_reasons == {0: "client"}
            assert upstream.open_connections == 0


async def test_close_connection_closes_after_the_response() -> None:
    with trio.fail_after(10):
        async with open_fake_upstream() as upstream, client_for(upstream) as client:
            upstream.script(Reply(close_connection=True))
            first = await client.post(CHAT, json={"messages": MESSAGES})
            assert first.headers["connection"] == "close"
            assert first.json()["choices"][0]["message"]["content"] == "Hello!"
            await upstream.wait_connections_closed(1)
            assert upstream.close_reasons == {0: "close"}
            second = await client.post(CHAT, json={"messages": MESSAGES})
            assert second.status_code == 200
            assert [r.connection for r in upstream.requests] == [0, 1]
            assert upstream.connections_opened == 2


async def test_client_connection_close_header_closes_after_the_response() -> None:
    with trio.fail_after(10):
        async with open_fake_upstream() as upstream, client_for(upstream) as client:
            response = await client.get("/v1/models", headers={"connection": "close"})
            assert response.status_code == 200
            await upstream.wait_connections_closed(1)
            assert upstream.close_reasons == {0: "close"}


async def test_drop_after_chunks_breaks_the_body() -> None:
    stream = {"messages": MESSAGES, "stream": True}
    received: list[bytes] = []
    with trio.fail_after(10):
        async with open_fake_upstream() as upstream, client_for(upstream) as client:
            upstream.script(Reply(drop_after_chunks=2))
            async with client.stream("POST", CHAT, json=stream) as response:
                assert response.status_code == 200
                with pytest.raises(httpx.RemoteProtocolError):
                    await read_into(response, received)
            await upstream.wait_connections_closed(1)
            assert upstream.close_reasons == {0: "drop"}
            # The next request works, on a new connection.
            again = await client.post(CHAT, json={"messages": MESSAGES})
            assert again.status_code == 200
            assert [r.connection for r in upstream.requests] == [0, 1]
    # A FIN drop is deterministic: everything sent before it arrives.
    contents = [
        json.loads(e)["choices"][0]["delta"]["content"]
        for e in sse_data(b"".join(received).decode())
    ]
    assert contents == ["Hel", "lo"]


async def test_drop_with_reset_breaks_the_body() -> None:
    with trio.fail_after(10):
        async with open_fake_upstream() as upstream, client_for(upstream) as client:
            upstream.script(
                Reply(
                    chunks=[b"data: 1\n\n"] * 5,
                    drop_after_chunks=1,
                    drop_with_reset=True,
                    chunk_delay_s=0.01,
                )
            )
            async with client.stream("GET", "/anything") as response:
                with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                    await response.aread()
            await upstream.wait_connections_closed(1)
            assert upstream.close_reasons == {0: "drop"}


async def test_drop_of_a_plain_body_before_its_end() -> None:
    with trio.fail_after(10):
        async with open_fake_upstream() as upstream, client_for(upstream) as client:
            upstream.script(Reply(body=b"0123456789", drop_after_chunks=0))
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/anything")
            await upstream.wait_connections_closed(1)


@pytest.mark.parametrize("stall_after", [0, 1])
async def test_stall_ends_when_the_client_goes_away(stall_after: int) -> None:
    stream = {"messages": MESSAGES, "stream": True}
    with trio.fail_after(10):
        async with open_fake_upstream() as upstream, client_for(upstream) as client:
            upstream.script(Reply(stall_after_chunks=stall_after))
            async with (
                client.stream("POST", CHAT, json=stream) as response,
                aclosing(raw_stream(response)) as chunks,
            ):
                assert response.status_code == 200
                if stall_after:
                    first = await anext(chunks)
                    assert first.startswith(b"data: ")
                # Nothing more comes while the fake stalls.
                with trio.move_on_after(0.2) as waited:
                    await anext(chunks)
                assert waited.cancelled_caught
                assert upstream.open_connections == 1
            # Leaving the response unread closes the connection: the fake notices.
            await upstream.wait_connections_closed(1)
            assert upstream.close_reasons == {0: "client"}
            assert upstream.open_connections == 0


async def test_head_delay_and_client_giving_up() -> None:
    with trio.fail_after(10):
        async with open_fake_upstream() as upstream, client_for(upstream) as client:
            upstream.script(Reply(head_delay_s=float("inf")))
            with trio.move_on_after(0.2):
                await client.get("/v1/models")
            await upstream.wait_requests(1)
            await upstream.wait_connections_closed(1)
            assert upstream.close_reasons == {0: "client"}


async def test_chunk_delay(io_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(10):
        async with open_fake_upstream() as upstream, client_for(upstream) as client:
            upstream.script(Reply(chunks=[b"a", b"b", b"c"], chunk_delay_s=0.1))
            start = trio.current_time()
            response = await client.get("/x")
            assert response.content == b"abc"
            assert trio.current_time() - start >= 0.2 - 1e-9  # virtual: two delays, 3 chunks


async def test_stream_bytes_read_fully() -> None:
    size = 5_000_000
    with trio.fail_after(10):
        async with open_fake_upstream() as upstream, client_for(upstream) as client:
            upstream.script(Reply(stream_bytes=size))
            received = 0
            tail = b""
            async with client.stream("GET", "/big") as response:
                assert response.headers["content-type"] == "text/event-stream"
                async for chunk in response.aiter_raw():
                    received += len(chunk)
                    tail = (tail + chunk)[-4096:]
            await upstream.wait_requests(1)
    assert received == size
    assert upstream.bytes_sent == size
    assert tail.endswith(b"data: [DONE]\n\n")
    last_event = tail.split(b"\n\n")[-3]
    assert isinstance(json.loads(last_event.removeprefix(b"data: "))["i"], int)


async def test_stream_bytes_slow_reader_keeps_bytes_sent_small() -> None:
    size = 50_000_000
    with trio.fail_after(10):
        async with open_fake_upstream() as upstream, client_for(upstream) as client:
            upstream.script(Reply(stream_bytes=size))
            async with client.stream("GET", "/big") as response:
                assert response.status_code == 200
                # The reader reads nothing. Once every task has run until it must wait,
                # the fake's writer is blocked on full socket buffers (or, had it ignored
                # back-pressure, done with all 50 MB): a causal wait, not a time.
                await trio.testing.wait_all_tasks_blocked()
                assert upstream.bytes_sent < size // 5
            await upstream.wait_connections_closed(1)
            assert upstream.close_reasons == {0: "client"}
            assert upstream.bytes_sent < size // 5


async def test_large_request_body_recorded_completely() -> None:
    content = "x" * 5_000_000
    request = {"model": "gpt-fake", "messages": [{"role": "user", "content": content}]}
    payload = json.dumps(request).encode()
    with trio.fail_after(10):
        async with open_fake_upstream() as upstream, client_for(upstream) as client:
            response = await client.post(
                CHAT, content=payload, headers={"content-type": "application/json"}
            )
    assert response.status_code == 200
    assert len(upstream.requests) == 1
    assert upstream.requests[0].body == payload
    assert upstream.requests[0].headers["content-length"] == str(len(payload))


async def test_chunked_request_body_recorded_completely() -> None:
    pieces = [b"a" * 100_000, b"b" * 100_000, b"c"]

    async def body() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    with trio.fail_after(10):
        async with open_fake_upstream() as upstream, client_for(upstream) as client:
            response = await client.post("/upload", content=body())
    assert response.status_code == 404
    assert upstream.requests[0].headers["transfer-encoding"] == "chunked"
    assert upstream.requests[0].body == b"".join(pieces)


async def test_garbage_request_gets_400_and_close() -> None:
    with trio.fail_after(10):
        async with open_fake_upstream() as upstream:
            host, port = upstream.url.removeprefix("http://").split(":")
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
                received = b""
                while chunk := await stream.receive_some(65536):
                    received += chunk
            assert received.startswith(b"HTTP/1.1 400 ")
            await upstream.wait_connections_closed(1)
            assert upstream.close_reasons == {0: "bad-request"}
            assert upstream.requests == []


async def test_client_closing_mid_request_is_counted() -> None:
    with trio.fail_after(10):
        async with open_fake_upstream() as upstream:
            host, port = upstream.url.removeprefix("http://").split(":")
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
                await stream.send_all(b"content-length: 100\r\n\r\n{")
            await upstream.wait_connections_closed(1)
            assert upstream.close_reasons == {0: "client"}
            assert upstream.requests == []


def leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]


async def test_a_bug_in_the_fake_is_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake closing its connection makes the client fail at the same moment as the
    fake's own error: the fake's error must still come out (trio can lose an exception
    when a cancellation lands on a checkpoint during its unwinding)."""

    def broken(self: FakeUpstream, seen: SeenRequest) -> Reply:
        raise KeyError("bug in the fake")

    monkeypatch.setattr(FakeUpstream, "_default_reply", broken)
    for _ in range(5):
        caught: BaseException | None = None
        with trio.fail_after(10):
            try:
                async with open_fake_upstream() as upstream, client_for(upstream) as client:
                    await client.get("/v1/models")
            except BaseException as error:
                caught = error
        assert caught is not None
        assert any(isinstance(leaf, KeyError) for leaf in leaves(caught)), repr(caught)
