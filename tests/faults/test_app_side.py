"""What an app can do wrong on the data socket, byte by byte, and what it is told."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from ..bao import BaoServer
from ..dataplane.harness import (
    client_frame,
    open_app,
    open_dataplane,
    open_http,
    server_frames,
)
from ..fake_upstream import open_fake_upstream
from ..fake_ws_upstream import open_fake_ws_upstream

HANDSHAKE = (
    b"GET {path} HTTP/1.1\r\nHost: openclawd\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


async def handshake(stream: trio.SocketStream, path: str = "/v1/ws") -> bytes:
    """Open ``path`` and wait for the 101 (a client may send no frame before it); returns
    what was received so far."""
    await stream.send_all(HANDSHAKE.replace(b"{path}", path.encode()))
    received = b""
    while b"\r\n\r\n" not in received:
        received += await stream.receive_some()
    return received


def complete_opcodes(data: bytes) -> list[int]:
    """The opcodes of the whole (short, unmasked) server frames at the start of ``data``."""
    opcodes = []
    while len(data) >= 2 and len(data) >= 2 + (data[1] & 0x7F):
        opcodes.append(data[0] & 0x0F)
        data = data[2 + (data[1] & 0x7F) :]
    return opcodes


async def read_to_end(stream: trio.SocketStream) -> bytes:
    received = b""
    while data := await stream.receive_some():
        received += data
    return received


async def test_a_text_frame_that_is_not_utf8_is_closed_1007_with_a_close_frame(
    shared_bao: BaoServer, runtime_dir: Path
) -> None:
    """CONTRACT 3.4 and RFC 6455 7.4.1: invalid UTF-8 in a text message is 1007. The app
    must get the close frame with the code, not a bare TCP close (1006), and the daemon
    serves on."""
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
        ):
            stream = await trio.open_unix_socket(dp.socket_path)
            async with stream:
                received = await handshake(stream)
                await stream.send_all(client_frame(0x1, b'{"type":"\xff\xfe"}'))
                head, _, frames = (received + await read_to_end(stream)).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101")
            opcodes, close = server_frames(frames)
            assert opcodes[0] == 0x1  # the hello
            assert opcodes[-1] == 0x8  # a close frame, not just a dropped connection
            assert int.from_bytes(close[:2], "big") == 1007
            assert close[2:]  # a reason
            with trio.fail_after(2):  # counted once the daemon is done with it
                while dp.local.closes[1007] != 1:  # noqa: ASYNC110 - a counter, no event
                    await trio.sleep(0.01)
            async with open_app(dp.socket_path) as app:  # and the daemon serves on
                assert (await app.call("a", body={}))[-1]["type"] == "response.end"


async def test_a_half_open_app_is_closed_within_ping_interval_plus_timeout(
    shared_bao: BaoServer, runtime_dir: Path
) -> None:
    """An app that completed the handshake and then went silent, reading nothing and
    answering no ping (a half-open connection): pinged, then closed 1011 when the pong does
    not come (the test's deadline is far below the 20 s defaults)."""
    interval_s, timeout_s = 0.3, 0.4
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(
                shared_bao,
                runtime_dir,
                up.url,
                listen={"ping_interval_s": interval_s, "ping_timeout_s": timeout_s},
            ) as dp,
        ):
            stream = await trio.open_unix_socket(dp.socket_path)
            async with stream:
                head, _, frames = (await handshake(stream)).partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 101")
                while 0x8 not in complete_opcodes(frames):  # until the close frame is in
                    frames += await stream.receive_some()
            opcodes, close = server_frames(frames)
            # The hello, then the ping it owed a pong for, then the close: in that order.
            assert opcodes[0] == 0x1
            assert 0x9 in opcodes[1:-1]
            assert opcodes[-1] == 0x8
            assert int.from_bytes(close[:2], "big") == 1011


# -- slowloris: what an app begins sending it must finish --------------------------------

CHAT = "/v1/http/openai/v1/chat/completions"
MESSAGE_TIMEOUT_S = 1.0
TRICKLE_S = 0.2  # a byte this often: a sign of life far more often than any ping asks


async def trickle(stream: trio.SocketStream, data: bytes, sent: list[int] | None = None) -> None:
    """Send ``data`` a byte every ``TRICKLE_S``; ``sent`` counts the bytes sent so far."""
    for byte in data:
        await stream.send_all(bytes([byte]))
        if sent is not None:
            sent[0] += 1
        await trio.sleep(TRICKLE_S)


@pytest.mark.parametrize("path", ["/v1/ws", "/v1/realtime/openai"])
async def test_a_frame_trickled_a_byte_at_a_time_is_cut_1008_while_others_are_served(
    shared_bao: BaoServer, runtime_dir: Path, path: str
) -> None:
    """A message sent a byte every 0.2 s (it would take 7 s) is alive by every byte, so
    pings never catch it: it is closed 1008, with the reason, once it has been unfinished
    for ``message_timeout_s``. Another app is served meanwhile."""
    frame = client_frame(0x1, b'{"type":"ping","id":"slow-loris"}')
    assert len(frame) * TRICKLE_S > 5 * MESSAGE_TIMEOUT_S
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_fake_ws_upstream() as ws_up,
            open_dataplane(
                shared_bao,
                runtime_dir,
                up.url,
                listen={"message_timeout_s": MESSAGE_TIMEOUT_S, "ping_interval_s": 0.3},
                provider={"ws_url": ws_up.url},
            ) as dp,
        ):
            stream = await trio.open_unix_socket(dp.socket_path)
            async with stream, trio.open_nursery() as nursery:
                head, _, frames = (await handshake(stream, path)).partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 101")
                if path.startswith("/v1/realtime"):
                    await ws_up.wait_handshakes(1)  # the session is relaying
                sent = [0]
                nursery.start_soon(trickle, stream, frame, sent)
                async with open_app(dp.socket_path) as app:  # served meanwhile
                    assert (await app.call("other", body={}))[-1]["type"] == "response.end"
                while 0x8 not in complete_opcodes(frames):
                    frames += await stream.receive_some()
                nursery.cancel_scope.cancel()
            # Cut while the message was still coming, a byte at a time (so never silent
            # long enough for a ping to catch it), for the message timeout it names.
            assert 1 < sent[0] < len(frame)
            opcodes, close = server_frames(frames)
            assert opcodes[-1] == 0x8
            assert int.from_bytes(close[:2], "big") == 1008
            assert close[2:] == b"message not finished within 1s"
            if path.startswith("/v1/realtime"):
                await ws_up.wait_connections_closed(1)
                assert ws_up.close_codes == [(1001, "the app left a message unfinished")]
                assert ws_up.received == []  # nothing of the unfinished message went on
            with trio.fail_after(2):
                while dp.local.closes[1008] != 1:  # noqa: ASYNC110 - a counter, no event
                    await trio.sleep(0.01)


async def test_a_request_body_trickled_a_byte_at_a_time_is_cut_400(
    shared_bao: BaoServer, runtime_dir: Path
) -> None:
    """Each byte comes well inside the gap the connection allows (2 s), but the daemon
    waits for the body ``message_timeout_s`` in all: 400, naming the limit, and the upstream
    never asked."""
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(
                shared_bao,
                runtime_dir,
                up.url,
                listen={"message_timeout_s": MESSAGE_TIMEOUT_S, "handshake_timeout_s": 2.0},
            ) as dp,
            open_http(dp.socket_path) as app,
            trio.open_nursery() as nursery,
        ):
            body = b'{"model":"m","messages":[]}' * 2
            assert len(body) * TRICKLE_S > 5 * MESSAGE_TIMEOUT_S
            await app.send_head("POST", CHAT, [("content-length", str(len(body)))])
            sent = [0]
            nursery.start_soon(trickle, app.stream, body, sent)
            answer = await app.read_response()
            nursery.cancel_scope.cancel()
            assert 1 < sent[0] < len(body)  # cut while the body was still coming
            assert answer.status == 400
            assert answer.json()["error"] == {
                "code": "bad_request",
                "message": "request body not finished within 1s",
            }
            assert up.requests == []


async def test_an_upload_the_upstream_is_slow_to_take_is_not_charged_to_the_app(
    shared_bao: BaoServer, runtime_dir: Path
) -> None:
    """The app sends its 3 MiB at once; the upstream takes 2 s to start reading it, twice
    ``message_timeout_s``. Only the time the daemon waits for the app's bytes counts: the
    upload goes through whole."""
    size = 3 * 1024 * 1024
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(
                shared_bao, runtime_dir, up.url, listen={"message_timeout_s": MESSAGE_TIMEOUT_S}
            ) as dp,
            open_http(dp.socket_path) as app,
        ):
            up.body_read_delay_s = 2 * MESSAGE_TIMEOUT_S
            body = b'{"model":"m","messages":[],"pad":"' + b"x" * size + b'"}'
            answer = await app.request("POST", CHAT, body=body)
            assert answer.status == 200, answer.body
            assert up.requests[0].body == body
