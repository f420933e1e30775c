"""Where a peer's messages begin and end, read by ``ActivityStream`` off the bytes it sends
(``protocol.wsframes.PeerBytes``): trio-websocket's public API hands over whole messages only, so
``message_timeout_s`` is kept below it. The reader is fed byte by byte and in random
splits and compared, at every offset, with where the frames it was given begin and end;
then the timing, over a real trio-websocket connection: the unfinished-message clock runs
while the reader waits for the peer, never while it waits for room in its queue.
"""

from __future__ import annotations

import math
import random

import pytest
import trio
import trio.testing

from openclawd import websocket
from openclawd.protocol.wsframes import PeerBytes
from openclawd.websocket import Activity, ActivityStream

from .test_trio_websocket_adapter import UPGRADE, close_payload, frame, upgrade

# (frame, its message goes on after it): masked and not, every length encoding, control
# frames between messages and inside one, empty frames.
FRAMES: list[tuple[bytes, bool]] = [
    (frame(0x1, b"hello"), False),
    (frame(0x2, bytes(range(200))), False),  # 16-bit length
    (frame(0x9, b"ping"), False),
    (frame(0x1, b"x" * 70_000), False),  # 64-bit length
    (frame(0x1, b"frag", fin=False), True),
    (frame(0xA, b"pong"), True),  # a control frame inside a fragmented message
    (frame(0x0, b"", fin=False), True),
    (frame(0x0, b"ment" * 40, fin=False), True),
    (frame(0x9, b""), True),
    (frame(0x0, b"end"), False),
    (frame(0x1, b""), False),
    (frame(0x2, b"unmasked", masked=False), False),
    (frame(0x8, close_payload(1000, b"bye")), False),
]


def stream_and_boundaries() -> tuple[bytes, list[bool]]:
    """The head and ``FRAMES`` as one byte string, and for every offset into it whether a
    reader fed that far is between messages (nothing begun is unfinished)."""
    data = bytearray(UPGRADE)
    between = [True] * (len(UPGRADE) + 1)  # the head is no message
    for raw, goes_on in FRAMES:
        between += [False] * (len(raw) - 1) + [not goes_on]
        data += raw
    return bytes(data), between


def test_fed_byte_by_byte_it_is_between_messages_exactly_where_the_frames_say() -> None:
    data, between = stream_and_boundaries()
    peer = PeerBytes(frames=True)
    assert peer.between_messages
    for offset in range(len(data)):
        peer.feed(data[offset : offset + 1])
        assert peer.between_messages == between[offset + 1], offset
    assert bytes(peer.head) == UPGRADE


@pytest.mark.parametrize("seed", range(20))
def test_fed_in_random_splits_it_agrees_at_every_split(seed: int) -> None:
    data, between = stream_and_boundaries()
    rng = random.Random(seed)
    peer = PeerBytes(frames=True)
    offset = 0
    while offset < len(data):
        size = rng.choice([1, 2, 3, 7, 50, 300, 5_000, 80_000])
        peer.feed(data[offset : offset + size])
        offset = min(offset + size, len(data))
        assert peer.between_messages == between[offset], offset
    assert bytes(peer.head) == UPGRADE


def test_a_head_ends_at_its_blank_line_wherever_the_reads_split_it() -> None:
    for split in range(len(UPGRADE) + 1):
        peer = PeerBytes(frames=True)
        peer.feed(UPGRADE[:split])
        assert peer.in_head == (split < len(UPGRADE)), split
        peer.feed(UPGRADE[split:] + frame(0x1, b"half")[:4])
        assert not peer.in_head
        assert bytes(peer.head) == UPGRADE
        assert not peer.between_messages, split  # the frame after it is under way


def test_a_head_with_bare_line_feeds_ends_as_h11_ends_it() -> None:
    peer = PeerBytes(frames=True)
    peer.feed(b"HTTP/1.1 401 Unauthorized\ncontent-length: 0\n\n" + frame(0x1, b"x")[:3])
    assert bytes(peer.head) == b"HTTP/1.1 401 Unauthorized\ncontent-length: 0\n\n"
    assert not peer.between_messages


def test_without_frames_it_keeps_the_head_and_is_always_between_messages() -> None:
    data, _ = stream_and_boundaries()
    peer = PeerBytes(frames=False)
    for offset in range(0, len(data), 5):
        peer.feed(data[offset : offset + 5])
        assert peer.between_messages
    assert bytes(peer.head) == UPGRADE


def test_a_head_that_never_ends_is_not_kept_past_the_limit() -> None:
    peer = PeerBytes(frames=True)
    for _ in range(100):
        peer.feed(b"x-header: " + b"y" * 1000 + b"\r\n")
    assert not peer.in_head
    assert len(peer.head) == 0
    assert peer.between_messages


# -- the clock, on a stream ----------------------------------------------------------------


async def test_the_clock_starts_once_the_reader_asks_for_the_rest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(100):
        ours, theirs = trio.testing.memory_stream_pair()
        activity = Activity(message_timeout_s=5)
        wire = ActivityStream(ours, activity, UPGRADE)
        assert await wire.receive_some() == UPGRADE
        data = frame(0x1, b"whole") + frame(0x1, b"half")
        await theirs.send_all(data[:-2])
        assert await wire.receive_some() == data[:-2]
        await trio.sleep(10)  # the reader is busy elsewhere: not the peer's time
        assert activity.message_deadline == math.inf
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wire.receive_some)
            await trio.testing.wait_all_tasks_blocked()
            asked = trio.current_time()
            assert activity.message_deadline == asked + 5
            await trio.sleep(1)
            await theirs.send_all(data[-2:])
        assert activity.message_deadline == math.inf
        assert activity.last == asked + 1


async def test_a_reader_waiting_for_room_in_its_queue_does_not_run_the_peers_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """trio-websocket queues ``QUEUE_SIZE`` messages, then waits for room before it reads
    on. A message half sent behind the ones it waits with is not the peer's to finish yet:
    its clock starts when the reader asks for the rest."""
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            ours, peer = trio.testing.memory_stream_pair()
            activity = Activity(message_timeout_s=5)
            wire = ActivityStream(ours, activity)
            accepted: list[websocket.WebSocketConnection] = []

            async def serve() -> None:
                accepted.append(await websocket.accept(nursery, wire, max_message_bytes=1000))

            async with trio.open_nursery() as handshake:
                handshake.start_soon(serve)
                await upgrade(peer)
            ws = accepted[0]
            whole = [frame(0x1, f"m{i}".encode()) for i in range(websocket.QUEUE_SIZE + 1)]
            half = frame(0x1, b"later")
            await peer.send_all(b"".join(whole) + half[:4])
            await trio.sleep(30)  # the queue is full: the reader waits with the last whole one
            assert activity.message_deadline == math.inf
            assert await ws.get_message() == "m0"  # room: the reader goes on, and asks
            await trio.testing.wait_all_tasks_blocked()
            asked = trio.current_time()
            assert activity.message_deadline == asked + 5
            await peer.send_all(half[4:])
            await trio.testing.wait_all_tasks_blocked()
            assert activity.message_deadline == math.inf
            assert [await ws.get_message() for _ in whole[1:]] == [
                f"m{i}" for i in range(1, len(whole))
            ]
            assert await ws.get_message() == "later"
            nursery.cancel_scope.cancel()


def test_a_servers_close_frame_is_read_as_sent_however_the_bytes_are_split() -> None:
    """The code and reason of the peer's close frame, read off the bytes (wsproto refuses
    codes it does not know, such as 1014, and reports 1002 instead)."""
    close = (1014).to_bytes(2, "big") + "upstream failed: é".encode()
    stream = b"".join(
        frame(op, data, masked=False) for op, data in ((1, b"hi"), (9, b"p"), (8, close))
    )
    for cut in range(len(stream) + 1):
        peer = PeerBytes(frames=True)
        peer.in_head = False
        peer.feed(stream[:cut])
        if cut < len(stream):
            assert peer.close_frame is None
        peer.feed(stream[cut:])
        assert peer.close_frame == (1014, "upstream failed: é")


def test_a_close_frame_without_a_code_or_masked_is_not_read() -> None:
    for sent in (frame(0x8, b"", masked=False), frame(0x8, b"\x03\xf6bye")):
        peer = PeerBytes(frames=True)
        peer.in_head = False
        peer.feed(sent)
        assert peer.close_frame is None
        assert peer.between_messages
