"""HTTP edges of the data socket (issue 17), read byte for byte by a raw unix-socket client.

* A plain HTTP request to a WebSocket endpoint is answered 426 with ``Upgrade: websocket``
  and ``Connection: Upgrade`` (RFC 9110 15.5.22).
* Every status line carries a reason phrase: the standard one for the daemon's own
  answers, the upstream's for a relayed response (the standard one when it gave none).
* The ``http.request`` log line shows the status sent and the body bytes actually
  written to the app; ``status="app gone"`` only when the app left before the response
  ended, and then with the bytes written until it left.
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import h11
import pytest
import trio

from ..bao import BaoServer
from ..fake_upstream import Reply, open_fake_upstream
from .harness import DataPlane, open_dataplane, open_http

MODELS = "/v1/http/openai/v1/models"


async def raw(socket_path: str, target: str, *headers: str) -> tuple[str, dict[str, str], bytes]:
    """Send ``GET target`` (``Connection: close``) and read until the daemon closes: the
    exact status line, the headers (lower-cased names) and the raw body bytes."""
    head = "".join(f"{h}\r\n" for h in ("Host: openclawd", "Connection: close", *headers))
    stream = await trio.open_unix_socket(socket_path)
    async with stream:
        await stream.send_all(f"GET {target} HTTP/1.1\r\n{head}\r\n".encode())
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
    top, _, body = bytes(data).partition(b"\r\n\r\n")
    status_line, *lines = top.decode("latin-1").split("\r\n")
    fields: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return status_line, fields, body


@asynccontextmanager
async def plane(bao: BaoServer, runtime: Path, upstream_url: str = "") -> AsyncIterator[DataPlane]:
    if upstream_url:
        async with open_dataplane(bao, runtime, upstream_url) as dp:
            yield dp
        return
    async with open_fake_upstream() as up, open_dataplane(bao, runtime, up.url) as dp:
        yield dp


# --- 426 ------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/v1/ws", "/v1/realtime/openai"])
async def test_plain_http_to_a_websocket_endpoint_is_426_with_upgrade(
    shared_bao: BaoServer, runtime_dir: Path, target: str
) -> None:
    with trio.fail_after(20):
        async with plane(shared_bao, runtime_dir) as dp:
            status_line, headers, _ = await raw(dp.socket_path, target)
    assert status_line == "HTTP/1.1 426 Upgrade Required"
    assert headers["upgrade"] == "websocket"
    tokens = [t.strip().lower() for t in headers["connection"].split(",")]
    assert "upgrade" in tokens


# --- reason phrases -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "status_line"),
    [
        ("/nowhere", "HTTP/1.1 404 Not Found"),
        ("/v1/http/nope/v1/models", "HTTP/1.1 404 Not Found"),
        ("/v1/http/openai/../v1/models", "HTTP/1.1 400 Bad Request"),
        # The fake upstream sends "HTTP/1.1 200 " (no reason): the standard one is added.
        (MODELS, "HTTP/1.1 200 OK"),
    ],
)
async def test_status_lines_carry_a_reason_phrase(
    shared_bao: BaoServer, runtime_dir: Path, target: str, status_line: str
) -> None:
    with trio.fail_after(20):
        async with plane(shared_bao, runtime_dir) as dp:
            assert (await raw(dp.socket_path, target))[0] == status_line


async def test_a_relayed_response_keeps_the_upstreams_reason(
    shared_bao: BaoServer, runtime_dir: Path
) -> None:
    async def upstream(stream: trio.SocketStream) -> None:
        http = h11.Connection(h11.SERVER)
        while True:
            event = http.next_event()
            if isinstance(event, h11.EndOfMessage):
                break
            if event is h11.NEED_DATA:
                http.receive_data(await stream.receive_some(65536))
        await stream.send_all(
            b"HTTP/1.1 418 Short And Stout\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi"
        )
        await stream.aclose()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, upstream, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            async with plane(shared_bao, runtime_dir, f"http://127.0.0.1:{port}") as dp:
                status_line, _, body = await raw(dp.socket_path, MODELS)
            nursery.cancel_scope.cancel()
    assert status_line == "HTTP/1.1 418 Short And Stout"
    assert body == b"hi"


# --- the http.request log line ------------------------------------------------------------


async def logged_request(log_text: io.StringIO) -> dict[str, str]:
    """The fields of the (first) http.request line, once it is logged."""
    while "event=http.request" not in log_text.getvalue():  # noqa: ASYNC110 - a log line
        await trio.sleep(0.01)
    line = next(x for x in log_text.getvalue().splitlines() if "event=http.request" in x)
    return {k: v.strip('"') for k, v in re.findall(r'(\w+)=("[^"]*"|\S+)', line)}


async def test_an_app_leaving_mid_body_is_logged_with_the_bytes_it_got(
    shared_bao: BaoServer, runtime_dir: Path, log_text: io.StringIO
) -> None:
    chunks = [b"data: one\n\n", b"data: two and more\n\n", b"data: never\n\n"]
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
        ):
            up.script(Reply(chunks=chunks, stall_after_chunks=2))
            async with open_http(dp.socket_path) as app:
                await app.send_head("GET", MODELS)
                await app.send(h11.EndOfMessage())
                assert isinstance(await app.next_event(), h11.Response)
                got = b""
                while len(got) < len(chunks[0]) + len(chunks[1]):
                    event = await app.next_event()
                    assert isinstance(event, h11.Data)
                    got += event.data
            fields = await logged_request(log_text)
    assert fields["status"] == "app gone"
    assert fields["bytes_out"] == str(len(got))


async def test_a_response_read_whole_is_logged_with_its_status_and_size(
    shared_bao: BaoServer, runtime_dir: Path, log_text: io.StringIO
) -> None:
    """The app closes as soon as it has the last byte, as curl does: the line still says
    200 and every byte (it said "app gone" with bytes_out=0 when the close won the race)."""
    with trio.fail_after(60):
        async with plane(shared_bao, runtime_dir) as dp:
            for _ in range(20):
                # Kept alive (no Connection: close), so the app's close comes first.
                async with open_http(dp.socket_path) as app:
                    answer = await app.request("GET", MODELS)
                assert answer.status == 200
                body = answer.body
            while log_text.getvalue().count("event=http.request") < 20:  # noqa: ASYNC110
                await trio.sleep(0.01)
    lines = [x for x in log_text.getvalue().splitlines() if "event=http.request" in x]
    assert len(lines) == 20
    for line in lines:
        assert " status=200 " in line, line
        assert f" bytes_out={len(body)} " in line, line


async def test_the_daemons_own_answer_is_logged_with_its_status(
    shared_bao: BaoServer, runtime_dir: Path, log_text: io.StringIO
) -> None:
    with trio.fail_after(20):
        async with plane(shared_bao, runtime_dir) as dp:
            status_line, _, body = await raw(dp.socket_path, "/v1/http/nope/v1/models")
            assert status_line == "HTTP/1.1 404 Not Found"
            fields = await logged_request(log_text)
    assert fields["status"] == "404"
    assert fields["error"] == "unknown_provider"
    assert fields["bytes_out"] == str(len(body))
