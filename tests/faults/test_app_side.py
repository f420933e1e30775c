"""What an app can do wrong on the data socket, byte by byte, and what it is told."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import trio

from ..bao import BaoServer
from ..dataplane.harness import open_app, open_dataplane, server_frames
from ..fake_upstream import open_fake_upstream

HANDSHAKE = (
    b"GET /v1/ws HTTP/1.1\r\nHost: openclawd\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked client frame (FIN set), payload under 126 bytes."""
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + mask + masked


async def handshake(stream: trio.SocketStream) -> bytes:
    """Open /v1/ws and wait for the 101 (a client may send no frame before it); returns
    what was received so far."""
    await stream.send_all(HANDSHAKE)
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
    answering no ping (a half-open connection): closed 1011 once ``ping_interval_s`` and
    then ``ping_timeout_s`` have passed, not much later."""
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
                opened = trio.current_time()
                while 0x8 not in complete_opcodes(frames):  # until the close frame is in
                    frames += await stream.receive_some()
                closed = trio.current_time() - opened
            opcodes, close = server_frames(frames)
            assert opcodes[-1] == 0x8
            assert int.from_bytes(close[:2], "big") == 1011
            assert interval_s + timeout_s <= closed < interval_s + timeout_s + 1.0
