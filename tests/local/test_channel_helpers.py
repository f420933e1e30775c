"""The /v1/ws relay's small helpers: which usage to report, which headers to show, and
the body relay's cleanup."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

import pytest

from openclawd.local.channel import relay, shown_headers
from openclawd.protocol.exchange import Exchange
from openclawd.protocol.messages import Request
from openclawd.protocol.sse import Event
from openclawd.protocol.usage import merge_usage, usage_of
from openclawd.upstream.http import UpstreamRequest, Upstreams

USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ('{"choices":[{"delta":{"content":"hi"}}]}', None),
        ('{"choices":[{"delta":{"content":"hi"}}],"usage":null}', None),
        (
            '{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}',
            USAGE,
        ),
        (
            '{"choices": [], "usage": {"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}',
            USAGE,
        ),
        ("[DONE]", None),
        ('not json but "usage": here', None),
        ('["usage"]', None),
    ],
)
def test_usage_of(data: str, expected: object) -> None:
    assert usage_of(data) == expected


def test_usage_nested_and_merged_across_a_stream() -> None:
    """Anthropic gives its input tokens in message_start's message, its output tokens in
    message_delta; OpenAI Responses gives its usage in response.completed's response."""
    events = [
        '{"type":"message_start","message":{"id":"m","usage":{"input_tokens":25,"output_tokens":1}}}',
        '{"type":"content_block_delta","delta":{"text":"hi"}}',
        '{"type":"message_delta","delta":{},"usage":{"output_tokens":15}}',
    ]
    usage = None
    for data in events:
        usage = merge_usage(usage, usage_of(data))
    assert usage == {"input_tokens": 25, "output_tokens": 15}
    completed = (
        '{"type":"response.completed","response":{"usage":{"input_tokens":7,"output_tokens":2}}}'
    )
    assert usage_of(completed) == {"input_tokens": 7, "output_tokens": 2}
    assert usage_of("[" * 100_000 + '"usage"') is None  # too deep to read: not an error


def test_shown_headers_keep_what_apps_need_and_nothing_else() -> None:
    headers = [
        ("content-type", "text/event-stream"),
        ("x-request-id", "req-1"),
        ("openai-processing-ms", "12"),
        ("x-ratelimit-remaining-tokens", "9000"),
        ("anthropic-ratelimit-requests-remaining", "5"),
        ("set-cookie", "session=abc"),
        ("server", "cloudflare"),
        ("x-ratelimit-remaining-tokens", "8999"),
    ]
    assert shown_headers(headers) == {
        "content-type": "text/event-stream",
        "x-request-id": "req-1",
        "openai-processing-ms": "12",
        "x-ratelimit-remaining-tokens": "9000, 8999",
        "anthropic-ratelimit-requests-remaining": "5",
    }


class _Gone(Exception):
    """The app went away while its stream was being relayed."""


async def test_a_relay_cut_short_closes_the_upstream_body_at_once() -> None:
    """The body's generator is closed before the relay's error leaves it, not left to the
    garbage collector (which runs its cleanup outside any task: an unraisable error)."""
    closed: list[bool] = []

    class Response:
        status = 200
        headers: list[tuple[str, str]] = [("content-type", "text/event-stream")]
        is_event_stream = True

        async def events(self, max_event_bytes: int) -> AsyncGenerator[list[Event], None]:
            try:
                yield [Event(event=None, data="one", id=None)]
                yield [Event(event=None, data="two", id=None)]
            finally:
                closed.append(True)

    class Pool:
        name = "p"

        @contextlib.asynccontextmanager
        async def open(self, request: UpstreamRequest, *, retry: bool) -> AsyncIterator[Response]:
            yield Response()

    class Pools(dict[str, Pool]):
        routes: dict[str, object] = {}

    sent: list[str] = []

    async def send(*frames: str) -> None:
        sent.extend(frames)
        if len(sent) == 2:  # response.start, then the first event
            raise _Gone

    async def finish(frame: str) -> None:
        raise AssertionError("a relay cut short has no last frame")

    request = Request(id="r1", provider="p", method="POST", path="/v1/chat")
    exchange = Exchange(answers_after_head=True)
    upstreams = cast(Upstreams, Pools(p=Pool()))
    with pytest.raises(_Gone) as caught:
        await relay(upstreams, request, exchange, send, finish)
    assert caught.value is not None  # the traceback, and the relay's frame, still held
    assert closed == [True]
    assert (exchange.status, exchange.ended) == (200, False)
