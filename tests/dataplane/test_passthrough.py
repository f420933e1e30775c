"""/v1/http/{provider}/{path} end to end: curl, the official openai SDK and a raw HTTP/1.1
client on the real unix socket, keys from a real bao, the fake upstream on loopback
(CONTRACT.md 3.3, 3.4)."""

from __future__ import annotations

import gc
import gzip
import hashlib
import json
import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import httpx2
import openai
import pytest
import trio

from ..bao import BaoServer
from ..fake_upstream import USAGE, Reply, default_stream_events, open_fake_upstream
from .harness import (
    Answer,
    call,
    closed_port,
    current_rss,
    open_dataplane,
    open_http,
)

KEY = "sk-test-0001"
ROTATED = "sk-rotated-0002"
CHAT = "/v1/http/openai/v1/chat/completions"
MODELS = "/v1/http/openai/v1/models"
MODELS_BODY = b'{"object":"list","data":[{"id":"gpt-fake","object":"model"}]}'
COMPLETION = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
CURL = "/usr/bin/curl"
MiB = 1024 * 1024
STREAM_BODY = json.dumps({**COMPLETION, "stream": True})

Bao = BaoServer


# --- curl ---------------------------------------------------------------------------------


@dataclass
class CurlResult:
    rc: int
    status: int | None  # the final (non-1xx) status, None if no head came
    headers: dict[str, str]  # lower-cased names of the final head
    body: bytes
    stderr: str

    def json(self) -> Any:
        return json.loads(self.body)


async def curl(socket_path: str, target: str, *args: str) -> CurlResult:
    """curl ``http://openclawd{target}`` over the unix socket; the final head and the body
    parsed from ``-i`` output (a ``100 Continue`` head before it is skipped)."""
    done = await trio.run_process(
        [CURL, "-sS", "-i", "--unix-socket", socket_path, *args, f"http://openclawd{target}"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    data: bytes = done.stdout
    status: int | None = None
    headers: dict[str, str] = {}
    while data.startswith(b"HTTP/"):
        head, _, data = data.partition(b"\r\n\r\n")
        status_line, *lines = head.split(b"\r\n")
        status = int(status_line.split()[1])
        if 100 <= status < 200:
            continue
        for line in lines:
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        break
    return CurlResult(done.returncode, status, headers, data, done.stderr.decode())


def assert_error(result: CurlResult | Answer, status: int, code: str) -> dict[str, str]:
    """The contract's JSON error: ``{"error":{"code":CODE,"message":TEXT}}``."""
    assert result.status == status, (result.status, result.body)
    assert result.headers["content-type"] == "application/json"
    payload = json.loads(result.body)
    assert set(payload) == {"error"}
    assert payload["error"]["code"] == code, payload
    assert isinstance(payload["error"]["message"], str)
    assert payload["error"]["message"]
    error: dict[str, str] = payload["error"]
    return error


# --- a raw HTTP/1.1 client (h11) ----------------------------------------------------------


def json_body(value: object) -> bytes:
    return json.dumps(value).encode()


# --- 1-3: curl ----------------------------------------------------------------------------


async def test_curl_lists_models_with_the_daemons_key(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream(expected_key=KEY) as up,
            open_dataplane(shared_bao, runtime_dir, up.url, key=KEY) as dp,
        ):
            result = await curl(dp.socket_path, MODELS)
            assert result.rc == 0, result.stderr
            assert result.status == 200
            assert result.body == MODELS_BODY
            assert result.headers["content-type"] == "application/json"
            assert result.headers["x-request-id"] == "req-0"
            [seen] = up.requests
            assert (seen.method, seen.path, seen.query) == ("GET", "/v1/models", "")
            assert seen.headers["authorization"] == f"Bearer {KEY}"


async def test_curl_post_drops_credentials_and_hop_by_hop_headers(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream(expected_key=KEY) as up,
            open_dataplane(shared_bao, runtime_dir, up.url, key=KEY) as dp,
        ):
            up.script(Reply(status=201, body=b'{"ok":true}'))
            body = json.dumps(COMPLETION)
            result = await curl(
                dp.socket_path,
                "/v1/http/openai/v1/threads/th%2F1/messages?a=1&b=x%20y",
                "-X",
                "POST",
                "--data-binary",
                body,
                "-H",
                "Content-Type: application/json",
                "-H",
                "Authorization: Bearer app-secret",
                "-H",
                "Cookie: a=b",
                "-H",
                "Proxy-Authorization: x",
                "-H",
                "Connection: x-hop",
                "-H",
                "X-Hop: 1",
                "-H",
                "Keep-Alive: 5",
                "-H",
                "X-Custom: kept",
            )
            assert result.rc == 0, result.stderr
            assert (result.status, result.body) == (201, b'{"ok":true}')

            [seen] = up.requests
            assert seen.method == "POST"
            assert seen.path == "/v1/threads/th%2F1/messages"
            assert seen.query == "a=1&b=x%20y"
            assert seen.body == body.encode()
            headers = seen.headers
            assert headers["authorization"] == f"Bearer {KEY}"  # the daemon's, only
            assert "app-secret" not in json.dumps(headers)
            for dropped in ("cookie", "proxy-authorization", "x-hop", "keep-alive"):
                assert dropped not in headers, (dropped, headers)
            assert "x-hop" not in headers.get("connection", "")
            assert headers["x-custom"] == "kept"
            assert headers["content-type"] == "application/json"
            assert headers["user-agent"].startswith("curl/")
            assert headers["host"] == up.url.removeprefix("http://")
            assert headers["content-length"] == str(len(body))


async def test_the_providers_own_auth_header_is_dropped_and_set(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(
                shared_bao,
                runtime_dir,
                up.url,
                key=KEY,
                provider={"auth_header": "x-api-key", "auth_scheme": ""},
            ) as dp,
        ):
            up.script(Reply(body=b"{}"))
            answer = await call(
                dp.socket_path,
                "GET",
                "/v1/http/openai/v1/messages",
                [("x-api-key", "app-key"), ("authorization", "Bearer app-secret")],
            )
            assert answer.status == 200
            [seen] = up.requests
            assert seen.headers["x-api-key"] == KEY  # the daemon's, only
            assert "authorization" not in seen.headers


async def test_an_empty_first_segment_is_not_rerouted(shared_bao: Bao, runtime_dir: Path) -> None:
    """``/v1/http/openai//v1/models`` is path ``/v1/models`` under ``base_url`` + "/": it
    must reach the upstream as ``//v1/models`` (or be refused), never another endpoint."""
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
        ):
            up.script(Reply(body=b"{}"))
            answer = await call(dp.socket_path, "GET", "/v1/http/openai//v1/models?q=1")
            if answer.status == 400:
                assert_error(answer, 400, "bad_request")
                assert up.requests == []
            else:
                [seen] = up.requests
                assert (seen.path, seen.query) == ("//v1/models", "q=1")


async def test_curl_streaming_completion_arrives_verbatim(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream(expected_key=KEY) as up,
            open_dataplane(shared_bao, runtime_dir, up.url, key=KEY) as dp,
        ):
            result = await curl(
                dp.socket_path,
                CHAT,
                "-N",
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                STREAM_BODY,
            )
            assert result.rc == 0, result.stderr
            assert result.status == 200
            assert result.headers["content-type"] == "text/event-stream"
            assert result.body == b"".join(default_stream_events())
            assert result.body.endswith(b"data: [DONE]\n\n")
            assert up.requests[0].headers["authorization"] == f"Bearer {KEY}"


async def test_sse_events_are_relayed_as_they_come(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
            open_http(dp.socket_path) as app,
        ):
            up.script(Reply(stall_after_chunks=1))  # the first event, then nothing more
            body = STREAM_BODY.encode()
            await app.send_head(
                "POST",
                CHAT,
                [("content-type", "application/json"), ("content-length", str(len(body)))],
            )
            await app.send(h11.Data(data=body))
            await app.send(h11.EndOfMessage())
            head = await app.next_event()
            assert isinstance(head, h11.Response)
            assert head.status_code == 200
            received = b""
            with trio.move_on_after(3) as waited:
                while received != default_stream_events()[0]:
                    event = await app.next_event()
                    assert isinstance(event, h11.Data), event
                    received += event.data
            assert not waited.cancelled_caught, f"only {received!r} while the upstream waits"


# --- 4: the official SDK ------------------------------------------------------------------


def sdk_calls(socket_path: str) -> tuple[Any, str]:
    """A plain and a streaming completion with the sync SDK (blocking: run in a thread)."""
    with (
        httpx2.Client(transport=httpx2.HTTPTransport(uds=socket_path)) as http,
        openai.OpenAI(
            api_key="unused",
            base_url="http://openclawd/v1/http/openai/v1",
            http_client=http,
            max_retries=0,  # the daemon retries; the SDK must not hide its answers
        ) as client,
    ):
        completion = client.chat.completions.create(
            model="gpt-fake", messages=[{"role": "user", "content": "hi"}]
        )
        stream = client.chat.completions.create(
            model="gpt-fake", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    return completion, text


async def test_openai_sdk_sync_through_the_socket(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream(expected_key=KEY) as up,
            open_dataplane(shared_bao, runtime_dir, up.url, key=KEY) as dp,
        ):
            completion, text = await trio.to_thread.run_sync(sdk_calls, dp.socket_path)
            assert completion.choices[0].message.content == "Hello!"
            assert completion.usage is not None
            usage = completion.usage
            assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
                USAGE["prompt_tokens"],
                USAGE["completion_tokens"],
                USAGE["total_tokens"],
            )
            assert text == "Hello!"
            assert [r.path for r in up.requests] == ["/v1/chat/completions"] * 2
            assert [r.headers["authorization"] for r in up.requests] == [f"Bearer {KEY}"] * 2
            assert all("unused" not in json.dumps(r.headers) for r in up.requests)


# The async SDK breaks out of its SSE generators at [DONE] without closing them; under trio
# their finalizer closes them and says so. Those are the SDK's (openai, httpx2, httpcore2),
# not the daemon's (which uses httpx), so only they are let through.
@pytest.mark.filterwarnings(
    "ignore:Async generator 'openai\\.:ResourceWarning",
    "ignore:Async generator 'httpx2\\.:ResourceWarning",
    "ignore:Async generator 'httpcore2\\.:ResourceWarning",
)
async def test_openai_sdk_async_under_trio(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream(expected_key=KEY) as up,
            open_dataplane(shared_bao, runtime_dir, up.url, key=KEY) as dp,
            httpx2.AsyncClient(transport=httpx2.AsyncHTTPTransport(uds=dp.socket_path)) as http,
        ):
            client = openai.AsyncOpenAI(
                api_key="unused",
                base_url="http://openclawd/v1/http/openai/v1",
                http_client=http,
                max_retries=0,
            )
            completion = await client.chat.completions.create(
                model="gpt-fake", messages=[{"role": "user", "content": "hi"}]
            )
            assert completion.choices[0].message.content == "Hello!"
            assert completion.usage is not None
            assert completion.usage.total_tokens == USAGE["total_tokens"]
            stream = await client.chat.completions.create(
                model="gpt-fake", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            deltas = [c.choices[0].delta.content async for c in stream if c.choices]
            assert deltas == ["Hel", "lo", "!"]
            assert [r.headers["authorization"] for r in up.requests] == [f"Bearer {KEY}"] * 2


# --- 5: errors before the response head ---------------------------------------------------


async def test_unknown_provider_is_404(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
        ):
            result = await curl(dp.socket_path, "/v1/http/nope/v1/models")
            assert_error(result, 404, "unknown_provider")
            assert up.requests == []


async def test_bad_requests_are_400_and_never_sent(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
        ):
            for target in (
                "/v1/http/openai/../x",
                "/v1/http/openai/v1/../../admin",
                "/v1/http/openai/v1/./models",
                "/v1/http/openai/v1/models/..",
            ):
                result = await curl(dp.socket_path, target, "--path-as-is")
                assert_error(result, 400, "bad_request")
            # A header value that is not ASCII (obs-text, which HTTP/1.1 parsers accept).
            answer = await call(dp.socket_path, "GET", MODELS, [("x-name", "café".encode())])
            assert_error(answer, 400, "bad_request")
            assert up.requests == []


async def test_local_rate_limit_is_429_with_retry_after(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(
                shared_bao, runtime_dir, up.url, limits={"requests_per_minute": 1}
            ) as dp,
        ):
            assert (await curl(dp.socket_path, MODELS)).status == 200
            result = await curl(dp.socket_path, MODELS)
            assert_error(result, 429, "rate_limited")
            assert int(result.headers["retry-after"]) >= 1
            assert len(up.requests) == 1


async def test_unreachable_upstream_is_502_then_circuit_open_503(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    with trio.fail_after(20):
        async with open_dataplane(
            shared_bao,
            runtime_dir,
            f"http://127.0.0.1:{closed_port()}",
            provider={"max_retries": 0, "circuit_failure_threshold": 1, "circuit_reset_s": 60},
        ) as dp:
            result = await curl(dp.socket_path, MODELS)
            assert_error(result, 502, "upstream_unavailable")
            result = await curl(dp.socket_path, MODELS)
            error = assert_error(result, 503, "upstream_unavailable")
            assert "circuit open" in error["message"]


async def test_upstream_silent_before_its_head_is_504(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url, provider={"read_timeout_s": 0.3}) as dp,
        ):
            up.script(Reply(head_delay_s=math.inf))
            result = await curl(dp.socket_path, MODELS)  # read_timeout_s, not the 60 s default
            assert_error(result, 504, "upstream_timeout")
            assert len(up.requests) == 1  # a timeout is not retried


async def test_draining_is_503_for_new_connections_and_new_requests(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
            open_http(dp.socket_path) as app,
        ):
            assert (await app.request("GET", MODELS)).status == 200
            assert app.kept_alive
            dp.lifecycle.set_draining(trio.current_time() + 60)
            assert_error(await app.request("GET", MODELS), 503, "draining")
            assert_error(await curl(dp.socket_path, MODELS), 503, "draining")
            assert len(up.requests) == 1


async def test_peer_uid_not_allowed_is_403(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(
                shared_bao, runtime_dir, up.url, listen={"allowed_uids": [os.getuid() + 1]}
            ) as dp,
        ):
            assert_error(await curl(dp.socket_path, MODELS), 403, "forbidden")
            assert up.requests == []


# --- 6-7: retries -------------------------------------------------------------------------


async def test_429_is_retried_with_the_same_held_body(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
        ):
            up.script(Reply(status=429, headers=[("retry-after", "0")]), Reply())
            # Several receive sizes long, well under the 1 MiB that is held for a retry.
            payload = {"model": "m", "messages": [{"role": "user", "content": "x" * 300_000}]}
            body = json_body(payload)
            answer = await call(
                dp.socket_path, "POST", CHAT, [("content-type", "application/json")], body
            )
            assert answer.status == 200
            assert answer.json()["choices"][0]["message"]["content"] == "Hello!"
            assert len(up.requests) == 2
            assert [r.body for r in up.requests] == [body, body]
            assert dp.upstreams["openai"].statistics().retries == 1


async def test_401_rereads_the_key_and_retries_with_the_new_one(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream(expected_key=ROTATED) as up,
            # Vault is polled rarely: the 401 is what makes the daemon look again.
            open_dataplane(shared_bao, runtime_dir, up.url, key=KEY, refresh_interval_s=60) as dp,
        ):
            await trio.to_thread.run_sync(lambda: shared_bao.write(dp.vault_path, api_key=ROTATED))
            body = json_body(COMPLETION)
            answer = await call(
                dp.socket_path, "POST", CHAT, [("content-type", "application/json")], body
            )
            assert answer.status == 200, answer.body
            auths = [r.headers["authorization"] for r in up.requests]
            assert auths == [f"Bearer {KEY}", f"Bearer {ROTATED}"]
            assert [r.body for r in up.requests] == [body, body]


async def test_large_body_is_streamed_and_never_retried(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(
                shared_bao, runtime_dir, up.url, provider={"retry_backoff_s": 0.01}
            ) as dp,
        ):
            up.script(Reply(status=503), Reply(status=503), Reply(status=503))
            body = os.urandom(3 * MiB)
            answer = await call(dp.socket_path, "POST", "/v1/http/openai/v1/files", [], body)
            assert answer.status == 503  # relayed as the upstream sent it
            assert b"fake upstream answered 503" in answer.body
            [seen] = up.requests
            assert seen.body == body
            assert seen.headers["content-length"] == str(len(body))
            assert dp.upstreams["openai"].statistics().retries == 0


# --- 8-9: the app connection --------------------------------------------------------------


async def test_keep_alive_serves_requests_in_turn(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream(expected_key=KEY) as up,
            open_dataplane(shared_bao, runtime_dir, up.url, key=KEY) as dp,
            open_http(dp.socket_path) as app,
        ):
            first = await app.request("GET", MODELS)
            assert (first.status, first.body) == (200, MODELS_BODY)
            assert app.kept_alive
            second = await app.request(
                "POST", CHAT, [("content-type", "application/json")], json_body(COMPLETION)
            )
            assert second.status == 200
            assert second.json()["choices"][0]["message"]["content"] == "Hello!"
            assert app.kept_alive
            stream = await app.request(
                "POST",
                CHAT,
                [("content-type", "application/json")],
                json_body({**COMPLETION, "stream": True}),
            )
            assert stream.body == b"".join(default_stream_events())
            assert [(r.method, r.path) for r in up.requests] == [
                ("GET", "/v1/models"),
                ("POST", "/v1/chat/completions"),
                ("POST", "/v1/chat/completions"),
            ]


async def test_expect_100_continue_is_answered_before_the_body(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
            open_http(dp.socket_path) as app,
        ):
            body = json_body(COMPLETION)
            await app.send_head(
                "POST",
                CHAT,
                [
                    ("content-type", "application/json"),
                    ("content-length", str(len(body))),
                    ("expect", "100-continue"),
                ],
            )
            with trio.move_on_after(3) as waited:
                event = await app.next_event()
            assert not waited.cancelled_caught, "no 100 Continue while the app waits for it"
            assert isinstance(event, h11.InformationalResponse)
            assert event.status_code == 100
            assert up.requests == []  # nothing was sent upstream before the body
            await app.send(h11.Data(data=body))
            await app.send(h11.EndOfMessage())
            answer = await app.read_response()
            assert answer.status == 200
            assert answer.json()["choices"][0]["message"]["content"] == "Hello!"
            [seen] = up.requests
            assert seen.body == body
            assert "expect" not in seen.headers


# --- 10-12: the response ------------------------------------------------------------------


async def test_content_encoding_is_kept_and_identity_asked_by_default(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
            open_http(dp.socket_path) as app,
        ):
            compressed = gzip.compress(b'{"x":1}')
            gzipped = Reply(
                body=compressed,
                headers=[("content-type", "application/json"), ("content-encoding", "gzip")],
            )
            up.script(gzipped, gzipped)
            answer = await app.request("GET", MODELS)
            assert answer.status == 200
            assert answer.body == compressed  # not decoded on the way
            assert answer.headers["content-encoding"] == "gzip"
            assert answer.headers["content-length"] == str(len(compressed))
            assert up.requests[0].headers["accept-encoding"] == "identity"

            answer = await app.request("GET", MODELS, [("accept-encoding", "gzip, br")])
            assert answer.body == compressed
            assert up.requests[1].headers["accept-encoding"] == "gzip, br"


async def test_token_usage_is_read_on_the_side_of_json_and_sse_bodies(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
            open_http(dp.socket_path) as app,
        ):
            pool = dp.upstreams["openai"]
            stream = {**COMPLETION, "stream": True, "stream_options": {"include_usage": True}}
            answer = await app.request("POST", CHAT, body=json_body(stream))
            assert answer.status == 200
            assert answer.body == b"".join(default_stream_events(include_usage=True))
            assert pool.statistics().tokens == {"prompt": 5, "completion": 3}

            answer = await app.request("POST", CHAT, body=json_body(COMPLETION))
            assert json.loads(answer.body)["usage"] == USAGE
            assert pool.statistics().tokens == {"prompt": 10, "completion": 6}

            # Not read: a compressed body (passed on as it is), a JSON body over 1 MiB.
            usage = json_body({"usage": {"prompt_tokens": 100, "completion_tokens": 100}})
            up.script(
                Reply(
                    body=gzip.compress(usage),
                    headers=[("content-type", "application/json"), ("content-encoding", "gzip")],
                ),
                Reply(body=usage[:-1] + b', "pad": "' + b"x" * (1 << 20) + b'"}'),
            )
            assert (await app.request("GET", MODELS)).status == 200
            assert (await app.request("GET", MODELS)).status == 200
            assert pool.statistics().tokens == {"prompt": 10, "completion": 6}


async def test_hop_by_hop_response_headers_are_dropped(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
            open_http(dp.socket_path) as app,
        ):
            up.script(
                Reply(
                    body=b"{}",
                    headers=[
                        ("connection", "close, x-hop-reply"),
                        ("keep-alive", "timeout=5"),
                        ("x-hop-reply", "1"),
                        ("x-upstream", "kept"),
                    ],
                )
            )
            answer = await app.request("GET", MODELS)
            assert (answer.status, answer.body) == (200, b"{}")
            assert answer.headers["x-upstream"] == "kept"
            assert "keep-alive" not in answer.headers
            assert "x-hop-reply" not in answer.headers
            assert "connection" not in answer.headers
            # The upstream's "Connection: close" was about its own connection, not the app's.
            assert app.kept_alive
            assert (await app.request("GET", MODELS)).body == MODELS_BODY


async def test_upstream_failure_after_the_head_cuts_the_app_off(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url, provider={"read_timeout_s": 0.3}) as dp,
        ):
            # A chunked SSE body dropped after its first event.
            up.script(Reply(drop_after_chunks=1))
            result = await curl(
                dp.socket_path,
                CHAT,
                "-N",
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                STREAM_BODY,
            )
            assert result.status == 200
            assert result.rc == 18, (result.rc, result.stderr)  # partial transfer
            assert result.body == default_stream_events()[0]

            # A content-length body stalled right after its head.
            up.script(Reply(stall_after_chunks=0))
            result = await curl(dp.socket_path, MODELS)
            assert result.status == 200
            assert result.headers["content-length"] == str(len(MODELS_BODY))
            assert result.rc == 18, (result.rc, result.stderr)
            assert result.body == b""

            # The daemon serves on.
            result = await curl(dp.socket_path, MODELS)
            assert (result.rc, result.status, result.body) == (0, 200, MODELS_BODY)


async def test_failure_after_the_head_counts_against_the_circuit(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    """As on /v1/ws (channel.relay calls ``ProviderPool.record_failure``, "a failure after
    the head arrived (a drop or a stall mid-body)"): the drop is the provider's failure,
    shown in the status and counted by the circuit breaker."""
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(
                shared_bao,
                runtime_dir,
                up.url,
                provider={"circuit_failure_threshold": 1, "circuit_reset_s": 60},
            ) as dp,
        ):
            up.script(Reply(drop_after_chunks=1))
            result = await curl(dp.socket_path, CHAT, "--data-binary", STREAM_BODY)
            assert result.rc == 18, (result.rc, result.stderr)
            stats = dp.upstreams["openai"].statistics()
            assert stats.last_error is not None
            assert stats.circuit == "open", "a mid-body drop was not counted by the breaker"
            error = assert_error(await curl(dp.socket_path, MODELS), 503, "upstream_unavailable")
            assert "circuit open" in error["message"]
            assert len(up.requests) == 1


# --- 13: 20 MB each way, in bounded memory ------------------------------------------------


@dataclass
class SinkUpstream:
    """An upstream that reads request bodies and keeps only their size and digest, so
    the only copy of an upload this process could hold is the daemon's."""

    url: str = ""
    received: list[tuple[str, int, str, dict[str, str]]] = field(default_factory=list)

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            http = h11.Connection(h11.SERVER)
            size, digest = 0, hashlib.sha256()
            head = None
            while True:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(64 * 1024)
                    if not data:
                        return
                    http.receive_data(data)
                elif isinstance(event, h11.Request):
                    head = event
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    digest.update(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert head is not None
            headers = {k.decode(): v.decode() for k, v in head.headers}
            self.received.append((head.target.decode(), size, digest.hexdigest(), headers))
            body = json_body({"bytes": size})
            reply = [
                h11.Response(
                    status_code=200,
                    headers=[
                        ("content-type", "application/json"),
                        ("content-length", str(len(body))),
                        ("connection", "close"),
                    ],
                ),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ]
            await stream.send_all(b"".join(http.send(e) or b"" for e in reply))


@asynccontextmanager
async def open_sink_upstream() -> AsyncIterator[SinkUpstream]:
    sink = SinkUpstream()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    host, port = listeners[0].socket.getsockname()[:2]
    sink.url = f"http://{host}:{port}"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, sink.handle, listeners)
        yield sink
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def rss_peak() -> AsyncIterator[list[int]]:
    """Sample this process's RSS every few ms in the block; ``[0]`` is the peak growth."""
    gc.collect()
    base = current_rss()
    growth = [0]

    async def sample() -> None:
        while True:
            growth[0] = max(growth[0], current_rss() - base)
            await trio.sleep(0.002)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        yield growth
        growth[0] = max(growth[0], current_rss() - base)
        nursery.cancel_scope.cancel()


# A daemon holding the whole 20 MB body (or response) would add at least 20 MB here: the
# sink keeps no data and curl is another process, so nothing else in this process is
# proportional to the transfer.
RSS_BOUND = 10 * MiB


async def test_20mb_upload_is_streamed_in_bounded_memory(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    with trio.fail_after(30):
        async with (
            open_sink_upstream() as sink,
            open_dataplane(shared_bao, runtime_dir, sink.url, key=KEY) as dp,
        ):
            data = os.urandom(20 * MiB)
            upload = runtime_dir / "upload.bin"
            upload.write_bytes(data)
            digest = hashlib.sha256(data).hexdigest()
            del data
            # Warm up: the pool, the connection code paths, the allocator's arenas.
            warm = await curl(dp.socket_path, "/v1/http/openai/v1/files", "--data-binary", "x")
            assert warm.status == 200, warm.body
            async with rss_peak() as growth:
                result = await curl(
                    dp.socket_path,
                    "/v1/http/openai/v1/files",
                    "-H",
                    "Content-Type: application/octet-stream",
                    "--data-binary",
                    f"@{upload}",
                )
            assert result.rc == 0, result.stderr
            assert result.status == 200
            assert result.json() == {"bytes": 20 * MiB}
            target, size, sha, headers = sink.received[-1]
            assert (target, size, sha) == ("/v1/files", 20 * MiB, digest)
            assert headers["authorization"] == f"Bearer {KEY}"
            assert growth[0] < RSS_BOUND, f"RSS grew by {growth[0] / MiB:.1f} MiB"


async def test_20mb_download_is_streamed_in_bounded_memory(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    with trio.fail_after(30):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
        ):
            up.script(Reply(stream_bytes=1 * MiB))  # warm up
            warm = await curl(dp.socket_path, MODELS, "-o", "/dev/null")
            assert warm.rc == 0, warm.stderr
            up.script(Reply(stream_bytes=20 * MiB))
            async with rss_peak() as growth:
                done = await trio.run_process(
                    [
                        CURL,
                        "-sS",
                        "--unix-socket",
                        dp.socket_path,
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code} %{size_download}",
                        f"http://openclawd{MODELS}",
                    ],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
            assert done.returncode == 0, done.stderr
            assert done.stdout.decode() == f"200 {20 * MiB}"
            assert growth[0] < RSS_BOUND, f"RSS grew by {growth[0] / MiB:.1f} MiB"


# --- the app's body going wrong -----------------------------------------------------------


async def test_a_stalled_or_malformed_body_is_400(shared_bao: Bao, runtime_dir: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(
                shared_bao, runtime_dir, up.url, listen={"handshake_timeout_s": 0.3}
            ) as dp,
        ):
            for size in (100, 3 * 1024 * 1024):  # held for a retry, or streamed through
                async with open_http(dp.socket_path) as app:
                    await app.send_head("POST", CHAT, [("content-length", str(size + 10))])
                    await app.send(h11.Data(data=b"x" * size))  # and then nothing more
                    answer = await app.read_response()
                    assert answer.status == 400
                    assert answer.json()["error"] == {
                        "code": "bad_request",
                        "message": "no request body bytes for 0.3s",
                    }
            stream = await trio.open_unix_socket(dp.socket_path)
            async with stream:
                head = f"POST {CHAT} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                await stream.send_all(head.encode() + b"zz\r\nnot hex\r\n")
                received = b""
                while chunk := await stream.receive_some(65536):
                    received += chunk
                assert received.startswith(b"HTTP/1.1 400 ")
                assert b'"code":"bad_request"' in received
            # The held body never reached the upstream; the streamed one did not complete.
            assert all(len(r.body) != 100 for r in up.requests)


async def test_an_app_leaving_mid_upload_ends_the_upstream_request(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
        ):
            size = 3 * 1024 * 1024
            async with open_http(dp.socket_path) as app:
                await app.send_head("POST", CHAT, [("content-length", str(size))])
                await app.send(h11.Data(data=b"x" * (size // 2)))
                await up.wait_connections_opened(1)  # the upload is under way upstream
            await up.wait_connections_closed(1)
            await dp.lifecycle.work.wait_idle()
            assert dp.passthrough.inflight == 0
            assert up.requests == []  # the upstream never got a whole request
            answer = await call(dp.socket_path, "GET", "/v1/http/openai/v1/models")
            assert answer.status == 200  # and the daemon serves on
