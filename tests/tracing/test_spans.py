"""A span per app request (CONTRACT.md 7), through the real drivers over memory streams in
virtual time, exported to memory: the GenAI attributes, the app's traceparent as the
parent and what goes upstream, retry and key re-read events, errors, realtime sessions,
the sampler, and nothing secret in the exported bytes."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
import trio
import trio.testing
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.trace import StatusCode

from openclawd.keys.manager import fingerprint
from openclawd.tracing import NO_TRACER

from ..drivers.harness import (
    KEY,
    LIMIT_S,
    NEW_KEY,
    FakeKeys,
    call,
    open_channel,
    open_plane,
    open_ws,
)
from .spans import APP_SPAN_ID, APP_TRACE_ID, APP_TRACEPARENT, hex_ids, memory_tracer, parent_ids

PROMPT = "the-prompt-text-7f3a"
COMPLETION = "the-completion-text-91bc"
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
CHAT = "/v1/chat/completions"


async def completion(request: httpx.Request) -> httpx.Response:
    await request.aread()
    body = {
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"message": {"content": COMPLETION}}],
        "usage": USAGE,
    }
    return httpx.Response(200, json=body)


def chat_body() -> dict[str, object]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]}


async def test_a_ws_request_is_one_span_child_of_the_apps_traceparent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with memory_tracer() as kept, trio.fail_after(LIMIT_S):
        async with open_plane(completion, tracer=kept.tracer) as plane:
            async with open_channel(plane) as app:
                frames = await app.call(
                    "r1",
                    body=chat_body(),
                    headers={"TraceParent": APP_TRACEPARENT, "tracestate": "app=1"},
                )
                assert frames[-1]["type"] == "response.end"
            await trio.testing.wait_all_tasks_blocked()
            span = kept.one()
            sent = plane.upstream.requests[0].headers
    trace_id, span_id = hex_ids(span)
    assert trace_id == APP_TRACE_ID
    assert parent_ids(span) == (APP_TRACE_ID, APP_SPAN_ID)
    # Upstream, the parent is openclawd's span, in the app's trace; the app's state goes on.
    assert sent.get_list("traceparent") == [f"00-{APP_TRACE_ID}-{span_id}-01"]
    assert sent.get_list("tracestate") == ["app=1"]
    assert span.name == "chat gpt-4o-mini"
    assert span.status.status_code is StatusCode.UNSET
    assert dict(span.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
        "gen_ai.usage.input_tokens": 11,
        "gen_ai.usage.output_tokens": 7,
        "server.address": "api.openai.test",
        "http.response.status_code": 200,
        "openclawd.entry_point": "ws",
        "openclawd.client": "default",
        "openclawd.key.fingerprint": fingerprint(KEY),
        "openclawd.key.version": 1,
        "openclawd.attempts": 1,
        "openclawd.ending": "finished",
    }


async def test_an_http_request_without_traceparent_is_a_root_whose_traceparent_goes_upstream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with memory_tracer() as kept, trio.fail_after(LIMIT_S):
        async with open_plane(completion, tracer=kept.tracer) as plane:
            body = json.dumps(chat_body()).encode()
            answer = await call(
                plane,
                "POST",
                "/v1/http/openai" + CHAT,
                [("content-type", "application/json")],
                body,
            )
            assert answer.status == 200
            await trio.testing.wait_all_tasks_blocked()
            span = kept.one()
            sent = plane.upstream.requests[0].headers
    trace_id, span_id = hex_ids(span)
    assert span.parent is None
    prefix, flags = sent["traceparent"].rsplit("-", 1)
    assert prefix == f"00-{trace_id}-{span_id}"
    assert int(flags, 16) & 1  # sampled (W3C level 2 may add its "random" flag)
    attributes = dict(span.attributes or {})
    assert attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert attributes["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    assert attributes["openclawd.entry_point"] == "http"
    assert attributes["gen_ai.usage.input_tokens"] == 11
    assert attributes["gen_ai.usage.output_tokens"] == 7
    assert span.name == "chat gpt-4o-mini"


async def test_a_retry_and_a_key_reread_after_a_401_are_events_of_the_span(
    autojump_clock: trio.testing.MockClock,
) -> None:
    answers = iter([503, 401, 200])

    async def flaky(request: httpx.Request) -> httpx.Response:
        await request.aread()
        status = next(answers)
        return httpx.Response(status, json={"usage": USAGE} if status == 200 else {})

    provider = {"max_retries": 2, "retry_backoff_s": 0.5}
    with memory_tracer() as kept, trio.fail_after(LIMIT_S):
        async with open_plane(
            flaky, keys=FakeKeys(KEY, NEW_KEY), provider=provider, tracer=kept.tracer
        ) as plane:
            async with open_channel(plane) as app:
                frames = await app.call("r1", body=chat_body())
                assert frames[-1]["type"] == "response.end"
            await trio.testing.wait_all_tasks_blocked()
            span = kept.one()
            sent = [r.headers["traceparent"] for r in plane.upstream.requests]
    assert [e.name for e in span.events] == [
        "openclawd.retry",
        "openclawd.key.reread",
        "openclawd.retry",
    ]
    retry, reread, again = (dict(e.attributes or {}) for e in span.events)
    assert retry["openclawd.attempt"] == 1
    assert retry["openclawd.reason"] == "upstream 503"
    assert reread == {"http.response.status_code": 401, "openclawd.key.changed": True}
    assert again["openclawd.reason"] == f"upstream 401: retrying with key {fingerprint(NEW_KEY)}"
    attributes = dict(span.attributes or {})
    assert attributes["openclawd.attempts"] == 3
    assert attributes["openclawd.key.version"] == 2
    assert attributes["openclawd.key.fingerprint"] == fingerprint(NEW_KEY)
    # Every attempt carries the same span as its parent.
    assert len(set(sent)) == 1
    assert hex_ids(span)[1] in sent[0]


async def test_a_failed_request_ends_its_span_in_error_with_error_type(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def down(request: httpx.Request) -> httpx.Response:
        await request.aread()
        return httpx.Response(503, json={"error": "overloaded"})

    with memory_tracer() as kept, trio.fail_after(LIMIT_S):
        async with open_plane(
            down, provider={"max_retries": 0}, limits={"requests_per_minute": 1}, tracer=kept.tracer
        ) as plane:
            answer = await call(plane, "GET", "/v1/http/openai/v1/models")
            assert answer.status == 503
            async with open_channel(plane) as app:
                frames = await app.call("r1", body=chat_body())  # over the limit
                assert frames[-1]["type"] == "error"
            await trio.testing.wait_all_tasks_blocked()
            relayed, refused = kept.spans()
    assert relayed.status.status_code is StatusCode.ERROR
    assert relayed.attributes is not None
    assert relayed.attributes["error.type"] == "503"
    assert relayed.attributes["gen_ai.operation.name"] == "other"
    assert refused.status.status_code is StatusCode.ERROR
    assert refused.attributes is not None
    assert refused.attributes["error.type"] == frames[-1]["code"] == "rate_limited"


async def test_a_realtime_session_is_one_span_and_its_traceparent_goes_upstream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with memory_tracer() as kept, trio.fail_after(LIMIT_S):
        async with open_plane(tracer=kept.tracer) as plane:
            resource = "/v1/realtime/openai?model=gpt-realtime"
            async with open_ws(plane, resource, headers=[("traceparent", APP_TRACEPARENT)]) as ws:
                await ws.send_message("hello")
                assert await ws.get_message() == "hello"
            await plane.ws_upstream.ended.wait()
            await trio.testing.wait_all_tasks_blocked()
            span = kept.one()
            handshake = plane.ws_upstream.handshakes[0].headers
    _, span_id = hex_ids(span)
    assert parent_ids(span) == (APP_TRACE_ID, APP_SPAN_ID)
    sent = {bytes(k).decode(): bytes(v).decode() for k, v in handshake}
    assert sent["traceparent"] == f"00-{APP_TRACE_ID}-{span_id}-01"
    attributes = dict(span.attributes or {})
    assert span.name == "realtime gpt-realtime"
    assert attributes["gen_ai.operation.name"] == "realtime"
    assert attributes["server.address"] == "realtime.openai.test"
    assert attributes["openclawd.key.fingerprint"] == fingerprint(KEY)
    assert attributes["openclawd.close_code"] == 1000
    assert attributes["openclawd.messages_up"] == 1
    assert span.status.status_code is StatusCode.UNSET


async def test_no_key_prompt_or_completion_in_the_exported_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def streamed(request: httpx.Request) -> httpx.Response:
        await request.aread()
        chunk = {"choices": [{"delta": {"content": COMPLETION}}], "usage": USAGE}
        body = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    with memory_tracer() as kept, trio.fail_after(LIMIT_S):
        async with open_plane(streamed, tracer=kept.tracer) as plane:
            async with open_channel(plane) as app:
                await app.call("r1", body={**chat_body(), "stream": True})
            body = json.dumps(chat_body()).encode()
            await call(plane, "POST", "/v1/http/openai" + CHAT, [], body)
            await trio.testing.wait_all_tasks_blocked()
            spans = kept.spans()
    assert len(spans) == 2
    exported = encode_spans(spans).SerializeToString()
    assert fingerprint(KEY).encode() in exported  # the search does see attribute values
    for secret in (KEY, PROMPT, COMPLETION):
        assert secret.encode() not in exported, secret


async def test_ratio_zero_exports_no_root_span_but_still_sends_a_traceparent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with memory_tracer(sample_ratio=0) as kept, trio.fail_after(LIMIT_S):
        async with open_plane(completion, tracer=kept.tracer) as plane:
            await call(plane, "GET", "/v1/http/openai/v1/models")
            # Parent-based: the app's sampled parent is followed whatever the ratio.
            await call(
                plane, "GET", "/v1/http/openai/v1/models", [("traceparent", APP_TRACEPARENT)]
            )
            await trio.testing.wait_all_tasks_blocked()
            spans = kept.spans()
            unsampled, followed = (r.headers["traceparent"] for r in plane.upstream.requests)
    assert not int(unsampled.rsplit("-", 1)[1], 16) & 1  # not sampled, and said so upstream
    assert APP_TRACE_ID not in unsampled
    assert [parent_ids(s) for s in spans] == [(APP_TRACE_ID, APP_SPAN_ID)]
    assert followed == f"00-{APP_TRACE_ID}-{hex_ids(spans[0])[1]}-01"


async def test_tracing_off_passes_the_apps_traceparent_on_untouched(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with open_plane(completion) as plane:
            await call(
                plane, "GET", "/v1/http/openai/v1/models", [("traceparent", APP_TRACEPARENT)]
            )
            await call(plane, "GET", "/v1/http/openai/v1/models")
            with_parent, without = (r.headers for r in plane.upstream.requests)
    assert with_parent.get_list("traceparent") == [APP_TRACEPARENT]
    assert "traceparent" not in without


def test_a_daemon_without_tracing_never_imports_opentelemetry() -> None:
    """The SDK is loaded only for ``[tracing] otlp_endpoint``: tracing off costs no import."""
    code = (
        "import sys, openclawd.cli, openclawd.daemon\n"
        "from openclawd import config, tracing\n"
        "assert tracing.open_tracer(config.Config().tracing) is tracing.NO_TRACER\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_stopping_with_tracing_off_starts_no_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """With tracing off there is nothing to export at a stop: no thread is started (a
    thread the daemon waits on lets a virtual clock jump to any deadline: the daemon tests
    under autojump timed out from a fresh checkout)."""

    async def no_thread(*args: object, **kwargs: object) -> None:
        raise AssertionError("a thread started for nothing to export")

    monkeypatch.setattr(trio.to_thread, "run_sync", no_thread)
    await NO_TRACER.aclose()
