"""Requests the control server cannot parse get a JSON 4xx (CONTRACT.md 4, issue 17).

hypercorn rejects them before the app sees anything; every error answer of the control API
is still ``{"error": CODE, "message": TEXT}``. A real control server (the app over
``FakeOps``, served by ``openclawd.asgi.serve_asgi`` on a unix socket, as the daemon serves
it) is sent raw bytes; the answer is read off the socket: its status, its JSON body, and
the connection closed when the answer says ``Connection: close``. The server serves on.
"""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from http import HTTPStatus
from pathlib import Path

import pytest
import trio

from openclawd.asgi import serve_asgi
from openclawd.control import create_app

from .test_app import FakeOps

KEY = "sk-proj-" + secrets.token_hex(20)

CASES = {
    "no-host": (b"GET /healthz HTTP/1.1\r\n\r\n", 400, "bad_request"),
    "space-in-a-header-name": (
        b"GET /healthz HTTP/1.1\r\nHost: openclawd\r\nBad Name: " + KEY.encode() + b"\r\n\r\n",
        400,
        "bad_request",
    ),
    "two-content-lengths": (
        b"POST /v1/resume HTTP/1.1\r\nHost: openclawd\r\n"
        b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        400,
        "bad_request",
    ),
    "100-kb-url": (
        b"GET /" + (KEY.encode() * (100_000 // len(KEY))) + b" HTTP/1.1\r\nHost: openclawd\r\n\r\n",
        431,
        "too_large",
    ),
    "binary-garbage": (
        bytes(range(256)) + b"\x00\xff" + KEY.encode() + b"\r\n\r\n",
        400,
        "bad_request",
    ),
}


@asynccontextmanager
async def control_server(runtime_dir: Path) -> AsyncIterator[str]:
    """The control app served as the daemon serves it; yields the socket's path."""
    path = str(runtime_dir / "control.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)
        sock.listen(16)
        async with trio.open_nursery() as nursery:
            app = create_app(FakeOps())
            await nursery.start(
                lambda task_status: serve_asgi(
                    app, sock, backlog=16, log_name="test.control", task_status=task_status
                )
            )
            yield path
            nursery.cancel_scope.cancel()


class Reader:
    """HTTP/1.1 responses read off a stream, by hand (no client library's leniency)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.reason = ""  # the last status line's reason phrase

    async def _more(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.buffer += data
        return bool(data)

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            assert await self._more(), f"closed before a whole head: {self.buffer!r}"
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, status, self.reason = status_line.split(" ", 2)
        assert version == "HTTP/1.1"
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"header {name} twice"
            headers[name.lower()] = value.strip()
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            assert await self._more(), "closed inside the body"
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status), headers, body

    async def at_eof(self) -> bool:
        """Whether the server closed the connection after what was read (a reset counts:
        it closed with part of a request it will never read still unread)."""
        try:
            return not self.buffer and not await self._more()
        except trio.BrokenResourceError:
            return not self.buffer


async def send_ignoring_a_close(stream: trio.SocketStream, data: bytes) -> None:
    """Send ``data``; the server may answer and close before it has read it all."""
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(data)


@pytest.mark.parametrize(("raw", "status", "code"), CASES.values(), ids=CASES.keys())
async def test_an_unparseable_request_gets_a_json_4xx(
    runtime_dir: Path, raw: bytes, status: int, code: str
) -> None:
    with trio.fail_after(30):
        async with control_server(runtime_dir) as path:
            stream = await trio.open_unix_socket(path)
            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(send_ignoring_a_close, stream, raw)
                reader = Reader(stream)
                got, headers, body = await reader.response()
                assert got == status
                assert reader.reason == HTTPStatus(status).phrase
                assert headers["content-type"] == "application/json"
                answer = json.loads(body)
                assert set(answer) == {"error", "message"}
                assert answer["error"] == code
                assert isinstance(answer["message"], str)
                assert answer["message"]
                assert KEY not in body.decode()  # nothing of the request is repeated
                # The answer says the connection ends, and it does.
                assert headers["connection"] == "close"
                assert await reader.at_eof()
            # The server serves on.
            stream = await trio.open_unix_socket(path)
            async with stream:
                await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: openclawd\r\n\r\n")
                got, _, body = await Reader(stream).response()
                assert (got, json.loads(body)) == (200, {"status": "ok"})


@pytest.mark.parametrize(
    ("request_line", "status"),
    [
        ("GET /healthz", 200),
        ("GET /no/such/route", 404),
        ("GET /v1/drain", 200),
        ("PUT /v1/drain", 405),
        ("POST /v1/resume", 200),
    ],
)
async def test_status_lines_carry_their_reason_phrase(
    runtime_dir: Path, request_line: str, status: int
) -> None:
    """``HTTP/1.1 200 OK``, not ``HTTP/1.1 200 `` (issue 17: curl -v on every route)."""
    with trio.fail_after(30):
        async with control_server(runtime_dir) as path:
            stream = await trio.open_unix_socket(path)
            async with stream:
                request = f"{request_line} HTTP/1.1\r\nHost: openclawd\r\nContent-Length: 0\r\n\r\n"
                await stream.send_all(request.encode())
                reader = Reader(stream)
                got, _, _ = await reader.response()
                assert (got, reader.reason) == (status, HTTPStatus(status).phrase)
