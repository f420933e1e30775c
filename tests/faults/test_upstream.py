"""What an upstream can do wrong, and what the app gets: a bounded wait, a clear error
code, a retry only where nothing was relayed yet."""

from __future__ import annotations

import math
import socket
import struct
from functools import partial
from pathlib import Path

import trio

from ..bao import BaoServer
from ..conftest import server_tls
from ..dataplane.harness import call, open_app, open_dataplane
from ..fake_upstream import Reply, open_fake_upstream

STREAM = {"model": "m", "stream": True}
READ_GAP_S = 0.5
NO_BACKOFF = {"retry_backoff_s": 0.01, "retry_backoff_max_s": 0.01}


async def test_an_upstream_silent_before_its_head_is_upstream_timeout_after_the_read_gap(
    shared_bao: BaoServer, runtime_dir: Path
) -> None:
    """No byte at all: the app hears ``upstream_timeout`` (/v1/ws) or 504 (/v1/http), the
    daemon having given up on the upstream (it closed the connection, the upstream never
    answered) after ``read_timeout_s``: the test's deadline is a third of the 60 s
    default; never retried (the provider may be working on it)."""
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(
                shared_bao, runtime_dir, up.url, provider={"read_timeout_s": READ_GAP_S}
            ) as dp,
            open_app(dp.socket_path) as app,
        ):
            up.script(Reply(head_delay_s=math.inf), Reply(head_delay_s=math.inf))
            frames = await app.call("w", body={})
            assert [f["type"] for f in frames] == ["error"]
            assert frames[0]["code"] == "upstream_timeout"
            await up.wait_connections_closed(1)
            assert up.close_reasons == {0: "client"}  # the daemon gave up, not the upstream
            answer = await call(dp.socket_path, "POST", "/v1/http/openai/v1/x", body=b"{}")
            assert answer.status == 504
            assert answer.json()["error"]["code"] == "upstream_timeout"
            await up.wait_connections_closed(2)
            assert up.close_reasons == {0: "client", 1: "client"}
            assert len(up.requests) == 2  # one each: no retry


async def resetting_upstream(nursery: trio.Nursery) -> tuple[int, list[int]]:
    """Reads each request head, then resets the connection (TCP RST) before any byte of
    an answer. Returns the port and a list that grows by one per connection."""
    seen: list[int] = []

    async def handle(stream: trio.SocketStream) -> None:
        seen.append(len(seen))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            data += chunk
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1], seen


async def test_a_reset_before_the_first_byte_is_retried_then_upstream_unavailable(
    shared_bao: BaoServer, runtime_dir: Path
) -> None:
    """Nothing was relayed, so it is safe to try again (max_retries); then the app hears
    ``upstream_unavailable`` (/v1/ws) or 502 (/v1/http)."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port, seen = await resetting_upstream(nursery)
            async with (
                open_dataplane(
                    shared_bao,
                    runtime_dir,
                    f"http://127.0.0.1:{port}",
                    provider={"max_retries": 2, **NO_BACKOFF},
                ) as dp,
                open_app(dp.socket_path) as app,
            ):
                frames = await app.call("r", body={})
                assert [f["type"] for f in frames] == ["error"]
                assert frames[0]["code"] == "upstream_unavailable"
                assert len(seen) == 3  # the first try and two retries
                answer = await call(dp.socket_path, "POST", "/v1/http/openai/v1/x", body=b"{}")
                assert answer.status == 502
                assert answer.json()["error"]["code"] == "upstream_unavailable"
                assert len(seen) == 6
            nursery.cancel_scope.cancel()


async def test_a_reset_after_the_first_byte_ends_the_request_and_is_not_retried(
    shared_bao: BaoServer, runtime_dir: Path
) -> None:
    """Bytes were relayed: a retry would send them twice. The request ends with an error
    frame in place of ``response.end``; /v1/http cuts the app's response short."""
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url, provider=NO_BACKOFF) as dp,
            open_app(dp.socket_path) as app,
        ):
            up.script(Reply(drop_after_chunks=1, drop_with_reset=True, chunk_delay_s=0.05))
            frames = await app.call("d", body=STREAM)
            assert frames[0]["type"] == "response.start"
            assert frames[-1]["type"] == "error"
            assert frames[-1]["code"] == "upstream_unavailable"
            assert "response.end" not in [f["type"] for f in frames]
            assert len(up.requests) == 1
            await up.wait_connections_closed(1)
            # The channel and the daemon serve on.
            assert (await app.call("next", body={}))[-1]["type"] == "response.end"


async def test_an_https_upstream_with_an_untrusted_certificate_is_refused_never_plain(
    shared_bao: BaoServer, runtime_dir: Path, certificate: tuple[Path, Path]
) -> None:
    """TLS to a self-signed upstream fails the handshake: the app hears
    ``upstream_unavailable`` / 502 naming the certificate; no byte of a request (so no key)
    ever reaches the server, in the clear or otherwise."""
    received = bytearray()
    handshakes_failed = 0

    async def handle(tcp: trio.SocketStream) -> None:
        nonlocal handshakes_failed
        stream = trio.SSLStream(tcp, server_tls(certificate), server_side=True)
        try:
            while data := await stream.receive_some(65536):
                received.extend(data)
        except trio.BrokenResourceError:
            handshakes_failed += 1
        finally:
            await trio.aclose_forcefully(tcp)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            async with (
                open_dataplane(
                    shared_bao,
                    runtime_dir,
                    f"https://127.0.0.1:{port}",
                    provider={"max_retries": 0},
                ) as dp,
                open_app(dp.socket_path) as app,
            ):
                frames = await app.call("t", body={})
                assert [f["type"] for f in frames] == ["error"]
                assert frames[0]["code"] == "upstream_unavailable"
                assert "certificate" in frames[0]["message"]
                answer = await call(dp.socket_path, "POST", "/v1/http/openai/v1/x", body=b"{}")
                assert answer.status == 502
                assert "certificate" in answer.json()["error"]["message"]
            nursery.cancel_scope.cancel()
    assert received == b""
    assert handshakes_failed >= 2


async def test_garbage_for_an_sse_stream_ends_the_request_cleanly_and_the_channel_serves_on(
    shared_bao: BaoServer, runtime_dir: Path
) -> None:
    """Bytes that are no SSE (binary noise, stray fields, broken UTF-8): the app gets
    well-formed frames whatever came, its request ends, and the next one is served."""
    garbage = [
        b"\x00\xff\xfe garbage \r\r\n",
        b"event\n: x\nid: \x00\nretry: nope\ndata: \xc3\x28 half a character\n\n",
        bytes(range(256)) + b"\n\n",  # ends its line: the next event stands alone
        b"data: [DONE]\n\n",
    ]
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
            open_app(dp.socket_path) as app,
        ):
            up.script(Reply(chunks=garbage))
            frames = await app.call("g", body=STREAM)
            assert frames[0]["type"] == "response.start"
            assert frames[-1]["type"] == "response.end"
            events = [f["data"] for f in frames if f["type"] == "response.event"]
            assert events[-1] == "[DONE]"
            assert all(isinstance(data, str) for data in events)
            assert (await app.call("next", body={}))[-1]["type"] == "response.end"


async def test_a_10mb_sse_event_passes_whole_through_v1_http(
    shared_bao: BaoServer, runtime_dir: Path
) -> None:
    """/v1/http relays the bytes as they come: one 10 MB event arrives whole and exact."""
    event = b"data: " + b"x" * (10 * 1024 * 1024) + b"\n\n"
    with trio.fail_after(30):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
        ):
            up.script(Reply(chunks=[event, b"data: [DONE]\n\n"]))
            answer = await call(dp.socket_path, "POST", "/v1/http/openai/v1/x", body=b"{}")
            assert answer.status == 200
            assert answer.body == event + b"data: [DONE]\n\n"


async def test_a_10mb_sse_event_is_one_frame_on_v1_ws_and_one_over_16mib_is_an_error(
    shared_bao: BaoServer, runtime_dir: Path
) -> None:
    """/v1/ws relays one frame per event: a 10 MB event is one ``response.event`` with its
    data exact (``max_message_bytes`` bounds what the app sends, not what it is sent). An
    event over 16 MiB ends the request with ``upstream_unavailable`` naming the limit, and
    the channel serves on."""
    data = "x" * (10 * 1024 * 1024)
    huge = b"data: " + b"y" * (17 * 1024 * 1024) + b"\n\n"
    with trio.fail_after(60):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
            open_app(dp.socket_path) as app,
        ):
            up.script(
                Reply(chunks=[f"data: {data}\n\n".encode(), b"data: [DONE]\n\n"]),
                Reply(chunks=[b"data: small\n\n", huge]),
            )
            frames = await app.call("big", body=STREAM)
            assert [f["type"] for f in frames] == [
                "response.start",
                "response.event",
                "response.event",
                "response.end",
            ]
            assert frames[1]["data"] == data
            assert frames[2]["data"] == "[DONE]"
            frames = await app.call("huge", body=STREAM)
            assert [f["type"] for f in frames] == ["response.start", "response.event", "error"]
            assert frames[-1]["code"] == "upstream_unavailable"
            assert frames[-1]["message"] == f"SSE event larger than {16 * 1024 * 1024} bytes"
            assert (await app.call("after", body={}))[-1]["type"] == "response.end"
