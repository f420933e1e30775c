"""Nothing an app sends is echoed where a key could hide (issue 17).

An app that puts a key where a provider's name goes (``/v1/http/KEY/...``, ``"provider":
KEY`` on /v1/ws, ``/v1/realtime/KEY``), or in a frame's type or a header's name, must not
find it repeated in the answer, and the operator must not find it in the log: a name that
is not a configured provider is "unknown provider", nothing more. Each case sends a fresh
random ``sk-...`` string and searches every answer and every log line for it; the
configured provider is served as before.

Runs the data plane in the test's own trio run (``tests/dataplane/harness.py``) with the
log configured at debug level into a buffer.
"""

from __future__ import annotations

import io
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from ..bao import BaoServer
from ..dataplane.harness import DataPlane, call, close_of, open_app, open_dataplane, open_realtime
from ..fake_upstream import open_fake_upstream
from ..fake_ws_upstream import open_fake_ws_upstream


def fake_key() -> str:
    # A name-shaped key ([A-Za-z0-9_.-]): the shape alone cannot tell it from a name.
    return "sk-proj-" + secrets.token_hex(24)


@asynccontextmanager
async def plane(bao: BaoServer, runtime: Path) -> AsyncIterator[DataPlane]:
    async with (
        open_fake_upstream() as http_up,
        open_fake_ws_upstream() as ws_up,
        open_dataplane(bao, runtime, http_up.url, provider={"ws_url": ws_up.url}) as dp,
    ):
        yield dp


def pieces(key: str, run: int = 12) -> list[str]:
    """Every ``run`` characters of the key's random part: a key cut short still leaks."""
    secret = key.removeprefix("sk-proj-")
    return [secret[i : i + run] for i in range(len(secret) - run + 1)]


def assert_absent(key: str, log_text: io.StringIO, *answers: Any) -> None:
    logged = log_text.getvalue()
    for piece in pieces(key):
        for answer in answers:
            assert piece not in repr(answer), f"the key is echoed in the answer {answer!r}"
        assert piece not in logged, "a piece of the key is in the log"


async def test_http_unknown_provider_is_not_echoed(
    shared_bao: BaoServer, runtime_dir: Path, log_text: io.StringIO
) -> None:
    key = fake_key()
    with trio.fail_after(20):
        async with plane(shared_bao, runtime_dir) as dp:
            answer = await call(dp.socket_path, "GET", f"/v1/http/{key}/v1/models")
            assert answer.status == 404
            assert answer.json() == {
                "error": {"code": "unknown_provider", "message": "unknown provider"}
            }
            # The configured provider is served, and named in its log line.
            served = await call(dp.socket_path, "GET", "/v1/http/openai/v1/models")
            assert served.status == 200
    assert_absent(key, log_text, answer)
    assert "event=http.request" in log_text.getvalue()
    assert "provider=openai" in log_text.getvalue()


@pytest.mark.parametrize(
    ("target", "status", "error"),
    [
        ("/{key}/v1/models?x={key}", 404, {"code": "not_found", "message": "no such route"}),
        ("/v1/realtime/{key}", 426, None),  # plain HTTP to a WebSocket endpoint
    ],
    ids=["unknown-path", "websocket-endpoint"],
)
async def test_a_path_is_not_echoed(
    shared_bao: BaoServer,
    runtime_dir: Path,
    log_text: io.StringIO,
    target: str,
    status: int,
    error: dict[str, str] | None,
) -> None:
    key = fake_key()
    with trio.fail_after(20):
        async with plane(shared_bao, runtime_dir) as dp:
            answer = await call(dp.socket_path, "GET", target.format(key=key))
            assert answer.status == status
            if error is not None:
                assert answer.json() == {"error": error}
    assert_absent(key, log_text, answer)


async def test_ws_unknown_provider_is_not_echoed(
    shared_bao: BaoServer, runtime_dir: Path, log_text: io.StringIO
) -> None:
    key = fake_key()
    with trio.fail_after(20):
        async with plane(shared_bao, runtime_dir) as dp, open_app(dp.socket_path) as app:
            await app.send({"type": "request", "id": "r1", "provider": key, "path": "/v1/models"})
            refused = await app.receive_for("r1")
            assert refused["code"] == "unknown_provider"
            assert refused["message"] == "unknown provider"
            served = await app.call("r2", "/v1/chat/completions", body={"model": "m"})
            assert served[-1]["type"] == "response.end"
    assert_absent(key, log_text, refused)


@pytest.mark.parametrize(
    "place",
    ["type", "header-name", "bad-header-name", "refused-header", "method", "path", "field"],
)
async def test_ws_bad_request_messages_do_not_quote_the_app(
    shared_bao: BaoServer, runtime_dir: Path, log_text: io.StringIO, place: str
) -> None:
    key = fake_key()
    request: dict[str, Any] = {"type": "request", "id": "r1", "provider": "openai"}
    if place == "type":
        frame: dict[str, Any] = {"type": key, "id": "r1"}
    elif place == "header-name":
        frame = {**request, "path": "/v1/x", "headers": {key: 5}}
    elif place == "bad-header-name":
        frame = {**request, "path": "/v1/x", "headers": {f"{key} x": "v"}}
    elif place == "refused-header":
        # "Authorization" is refused by its name: the value is never quoted.
        frame = {**request, "path": "/v1/x", "headers": {"Authorization": f"Bearer {key}"}}
    elif place == "method":
        frame = {**request, "path": "/v1/x", "method": key}
    elif place == "path":
        frame = {**request, "path": key}
    else:  # an unknown field is ignored; the missing path is what is refused
        frame = {**request, key: key}
    with trio.fail_after(20):
        async with plane(shared_bao, runtime_dir) as dp, open_app(dp.socket_path) as app:
            await app.send(json.dumps(frame))
            refused = await app.receive_for("r1")
            assert refused["type"] == "error"
            assert refused["code"] == "bad_request"
    assert_absent(key, log_text, refused)


async def test_realtime_unknown_provider_is_not_echoed(
    shared_bao: BaoServer, runtime_dir: Path, log_text: io.StringIO
) -> None:
    key = fake_key()
    with trio.fail_after(20):
        async with plane(shared_bao, runtime_dir) as dp:
            closed = await close_of(dp.socket_path, f"/v1/realtime/{key}/v1/realtime?x=1")
            assert closed == (1008, "unknown provider")
            async with open_realtime(dp.socket_path) as app:
                await app.send("hello")
                assert await app.recv() == "hello"
    assert_absent(key, log_text, closed)
    assert "event=realtime.open" in log_text.getvalue()


async def raw_exchange(socket_path: str, request: bytes) -> bytes:
    """Send ``request`` as it is and read until the daemon closes."""
    stream = await trio.open_unix_socket(socket_path)
    async with stream:
        await stream.send_all(request)
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
    return bytes(data)


@pytest.mark.parametrize("place", ["header-name", "chunk-header"])
async def test_http_errors_do_not_quote_the_request(
    shared_bao: BaoServer, runtime_dir: Path, log_text: io.StringIO, place: str
) -> None:
    """/v1/http: a header refused for its value is named by its place, and a malformed
    body is not quoted (h11's error text quotes the chunk header it could not read)."""
    key = fake_key()
    head = "POST /v1/http/openai/v1/chat/completions HTTP/1.1\r\nHost: o\r\nConnection: close\r\n"
    if place == "header-name":
        request = f"{head}{key}: caf\xe9\r\nContent-Length: 0\r\n\r\n".encode("latin-1")
    else:
        request = f"{head}Transfer-Encoding: chunked\r\n\r\n{key}\r\n".encode()
    with trio.fail_after(20):
        async with plane(shared_bao, runtime_dir) as dp:
            answer = await raw_exchange(dp.socket_path, request)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert_absent(key, log_text, answer)
