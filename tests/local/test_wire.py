"""The wire under a WebSocket (``openclawd/websocket.py``): a burst of messages in one write
(``ActivityStream.hold``/``release``, ``Sender.send_batch``), and liveness (``Activity``,
``watch``): a peer is alive if it answers, sends, or takes some of what we sent it.

Real trio streams throughout: in-memory pairs where only the bytes matter, AF_UNIX socket
pairs (what the data socket is) where the kernel's count of unread bytes does.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from trio_websocket import WebSocketConnection, wrap_client_stream

from openclawd import liveness, websocket
from openclawd.websocket import Activity, ActivityStream, Sender

from ..dataplane.harness import client_frame

SLICE = 64 * 1024
MAX_MESSAGE = 1 << 20
UPGRADE = (
    b"GET / HTTP/1.1\r\nhost: openclawd\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
    b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
)


class CountingStream(trio.abc.Stream):
    """``inner``, with every ``send_all`` call's bytes noted."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


def counted_wire() -> tuple[ActivityStream, CountingStream, trio.abc.Stream, Activity]:
    """A wire over one end of an in-memory pair: the wire, its counter, the other end."""
    ours, theirs = trio.testing.memory_stream_pair()
    counter = CountingStream(ours)
    activity = Activity()
    return ActivityStream(counter, activity), counter, theirs, activity


async def receive_exactly(stream: trio.abc.Stream, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        assert chunk, "closed early"
        data += chunk
    return bytes(data)


async def nothing_to_receive(stream: trio.abc.Stream) -> bool:
    with trio.move_on_after(0.05):
        await stream.receive_some(1)
        return False
    return True


# -- ActivityStream: hold and release ----------------------------------------------------


async def test_held_sends_go_out_with_the_first_send_after_release() -> None:
    with trio.fail_after(10):
        wire, counter, theirs, _ = counted_wire()
        wire.hold()
        for piece in (b"one ", b"two ", b"three "):
            await wire.send_all(piece)
        assert counter.writes == []
        assert await nothing_to_receive(theirs)
        wire.release()
        assert counter.writes == []  # release itself writes nothing
        await wire.send_all(b"four")
        assert counter.writes == [b"one two three four"]  # one write, in order
        assert await receive_exactly(theirs, 18) == b"one two three four"
        await wire.send_all(b"five")  # not holding: at once, alone
        assert counter.writes[1:] == [b"five"]


async def test_holding_gathers_up_to_64_kib_and_no_more() -> None:
    with trio.fail_after(10):
        wire, counter, theirs, _ = counted_wire()
        wire.hold()
        await wire.send_all(b"a" * (SLICE - 10))
        await wire.send_all(b"b" * 10)  # exactly 64 KiB gathered: still held
        assert counter.writes == []
        await wire.send_all(b"c")  # one byte past: all out at once, while holding
        expected = b"a" * (SLICE - 10) + b"b" * 10 + b"c"
        assert b"".join(counter.writes) == expected
        assert all(len(write) <= SLICE for write in counter.writes)
        assert await receive_exactly(theirs, len(expected)) == expected
        writes = len(counter.writes)
        await wire.send_all(b"d")  # still holding: gathered again
        assert len(counter.writes) == writes
        wire.release()
        await wire.send_all(b"e")
        assert counter.writes[writes:] == [b"de"]


async def test_a_large_send_while_holding_goes_out_at_once() -> None:
    with trio.fail_after(10):
        wire, counter, theirs, _ = counted_wire()
        wire.hold()
        await wire.send_all(b"x")
        big = bytes(range(256)) * 600  # 150 KiB
        await wire.send_all(big)
        assert b"".join(counter.writes) == b"x" + big
        assert await receive_exactly(theirs, len(big) + 1) == b"x" + big


async def test_bytes_are_never_reordered_or_lost() -> None:
    with trio.fail_after(10):
        wire, counter, theirs, _ = counted_wire()
        rng = random.Random(7)
        expected = bytearray()
        holding = False
        for step in range(400):
            roll = rng.random()
            if roll < 0.15:
                wire.hold()
                holding = True
            elif roll < 0.3:
                wire.release()
                holding = False
            else:
                size = rng.choice([0, 1, 10, 500, 4000, 20_000, 70_000])
                data = bytes([step % 256]) * size
                await wire.send_all(data)
                expected += data
            sent = b"".join(counter.writes)
            assert expected.startswith(sent), step  # what went out is in order
            if not holding and roll >= 0.3:
                assert sent == expected, step  # and nothing is left behind
        wire.release()
        await wire.send_all(b"")
        assert b"".join(counter.writes) == expected
        assert all(len(write) <= SLICE for write in counter.writes)
        assert await receive_exactly(theirs, len(expected)) == expected


async def test_activity_is_touched_by_real_sends_only(mock_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(10):
        wire, counter, theirs, activity = counted_wire()
        start = activity.last
        mock_clock.jump(1)
        wire.hold()
        await wire.send_all(b"held")
        assert activity.last == start
        wire.release()
        await wire.send_all(b"out")
        assert counter.writes == [b"heldout"]
        assert activity.last == start + 1
        mock_clock.jump(1)
        wire.hold()
        await wire.send_all(b"z" * (SLICE + 1))  # over the limit: a real send
        assert activity.last == start + 2
        mock_clock.jump(1)
        await theirs.send_all(b"hi")
        assert await wire.receive_some(10) == b"hi"
        assert activity.last == start + 3  # and so is a receive


async def test_a_prefix_is_received_first() -> None:
    with trio.fail_after(10):
        ours, theirs = trio.testing.memory_stream_pair()
        wire = ActivityStream(ours, Activity(), b"GET / HTTP/1.1\r\n")
        await theirs.send_all(b"host: x\r\n\r\n")
        assert await wire.receive_some(100) == b"GET / HTTP/1.1\r\n"
        assert await wire.receive_some(100) == b"host: x\r\n\r\n"


# -- Sender.send_batch over a real trio-websocket pair -----------------------------------


async def open_pair(
    nursery: trio.Nursery,
) -> tuple[WebSocketConnection, WebSocketConnection, ActivityStream, CountingStream]:
    """Our side (``websocket.accept`` over a counted wire) and a trio-websocket client."""
    ours, theirs = trio.testing.memory_stream_pair()
    counter = CountingStream(ours)
    wire = ActivityStream(counter, Activity())
    accepted: list[WebSocketConnection] = []

    async def serve() -> None:
        accepted.append(await websocket.accept(nursery, wire, max_message_bytes=MAX_MESSAGE))

    async with trio.open_nursery() as handshake:
        handshake.start_soon(serve)
        client = await wrap_client_stream(nursery, theirs, "openclawd", "/")  # type: ignore[arg-type]
    return accepted[0], client, wire, counter


async def receive_messages(ws: WebSocketConnection, n: int) -> list[str | bytes]:
    return [await ws.get_message() for _ in range(n)]


MESSAGES: list[str | bytes] = [f"event {i}: " + "x" * (i * 37) for i in range(9)] + [b"\x00\x01"]


async def test_a_batch_goes_out_in_one_write_complete_and_in_order() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ws, client, wire, counter = await open_pair(nursery)
            before = len(counter.writes)
            await Sender(ws, wire).send_batch(MESSAGES)
            assert len(counter.writes) - before == 1 < len(MESSAGES)
            assert await receive_messages(client, len(MESSAGES)) == MESSAGES
            await Sender(ws, wire).send("after")  # the wire is not left holding
            assert len(counter.writes) - before == 2
            assert await client.get_message() == "after"
            nursery.cancel_scope.cancel()


async def test_a_batch_of_large_messages_takes_fewer_writes_than_messages() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ws, client, wire, counter = await open_pair(nursery)
            messages: list[str | bytes] = [chr(ord("a") + i) * 30_000 for i in range(6)]
            before = len(counter.writes)
            await Sender(ws, wire).send_batch(messages)
            assert 0 < len(counter.writes) - before < len(messages)
            assert await receive_messages(client, len(messages)) == messages
            nursery.cancel_scope.cancel()


async def test_a_batch_of_one() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ws, client, wire, counter = await open_pair(nursery)
            before = len(counter.writes)
            await Sender(ws, wire).send_batch(["only"])
            assert len(counter.writes) - before == 1
            assert await client.get_message() == "only"
            await Sender(ws, wire).send_batch([])
            assert len(counter.writes) - before == 1
            nursery.cancel_scope.cancel()


async def test_a_batch_without_a_wire_writes_each_message() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ws, client, _, counter = await open_pair(nursery)
            before = len(counter.writes)
            await Sender(ws).send_batch(MESSAGES)
            assert len(counter.writes) - before == len(MESSAGES)
            assert await receive_messages(client, len(MESSAGES)) == MESSAGES
            nursery.cancel_scope.cancel()


# -- Activity.observe / check over a real socket pair ------------------------------------


Pair = tuple[trio.socket.SocketType, trio.socket.SocketType]


@pytest.fixture
def pair() -> Iterator[Pair]:
    """An AF_UNIX socket pair (what the data socket is), closed whatever the test did."""
    ours, theirs = trio.socket.socketpair()
    with ours, theirs:
        yield ours, theirs


def socket_wire(pair: Pair) -> tuple[ActivityStream, trio.SocketStream]:
    """A wire over our end (observed: the wire does it), and the peer's end."""
    ours, theirs = pair
    return ActivityStream(trio.SocketStream(ours), Activity()), trio.SocketStream(theirs)


async def test_check_touches_once_the_peer_takes_some_of_its_backlog(
    pair: Pair, mock_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(10):
        wire, theirs = socket_wire(pair)
        activity = wire.activity
        for _ in range(4):
            await wire.send_all(b"x" * 1000)  # four sends: four pieces the peer can take
        sent_at = activity.last
        mock_clock.jump(1)
        activity.check()  # the baseline: no touch
        assert activity.last == sent_at
        mock_clock.jump(1)
        activity.check()  # nothing read since: no touch
        assert activity.last == sent_at
        await receive_exactly(theirs, 1000)
        mock_clock.jump(1)
        activity.check()
        assert activity.last == trio.current_time() == sent_at + 3
        mock_clock.jump(1)
        activity.check()  # nothing more read: no touch
        assert activity.last == sent_at + 3
        await receive_exactly(theirs, 3000)
        mock_clock.jump(1)
        activity.check()
        assert activity.last == sent_at + 5


async def test_check_without_reading_never_touches(
    pair: Pair, mock_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(10):
        wire, _ = socket_wire(pair)
        activity = wire.activity
        await wire.send_all(b"x" * 1000)
        sent_at = activity.last
        for _ in range(5):
            mock_clock.jump(1)
            activity.check()
            assert activity.last == sent_at
        await wire.send_all(b"y" * 1000)  # more backlog: a send, not a sign of the peer
        sent_again = activity.last
        mock_clock.jump(1)
        activity.check()
        assert activity.last == sent_again


async def test_a_closed_socket_has_no_backlog_and_check_does_not_raise(
    pair: Pair, mock_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(10):
        wire, _ = socket_wire(pair)
        sock = pair[0]
        activity = wire.activity
        await wire.send_all(b"x" * 1000)
        backlog = liveness.unsent_bytes(sock)
        assert backlog is not None
        assert backlog > 0
        activity.check()
        last = activity.last
        await wire.aclose()
        assert liveness.unsent_bytes(sock) is None
        mock_clock.jump(1)
        activity.check()
        activity.check()
        assert activity.last == last


async def test_check_without_a_backlog_to_observe_is_a_no_op(
    mock_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        wire, _, theirs, activity = counted_wire()  # in memory: no socket to ask
        await wire.send_all(b"x")
        last = activity.last
        mock_clock.jump(1)
        await receive_exactly(theirs, 1)
        activity.check()
        assert activity.last == last


# -- watch ---------------------------------------------------------------------------------


async def accept_raw_peer(
    nursery: trio.Nursery,
    ours: trio.socket.SocketType,
    theirs: trio.socket.SocketType,
    *,
    message_timeout_s: float = math.inf,
) -> tuple[WebSocketConnection, Activity, trio.SocketStream]:
    """Our WebSocket over ``ours``, and its peer over ``theirs``: a raw stream that has done
    the handshake and will never answer a ping (nor parse anything)."""
    activity = Activity(message_timeout_s=message_timeout_s)
    wire = ActivityStream(trio.SocketStream(ours), activity)
    peer = trio.SocketStream(theirs)
    await peer.send_all(UPGRADE)
    ws = await websocket.accept(nursery, wire, max_message_bytes=MAX_MESSAGE)
    head = b""
    while b"\r\n\r\n" not in head:
        head += await peer.receive_some(1)
    assert head.startswith(b"HTTP/1.1 101 ")
    return ws, activity, peer


async def test_watch_spares_a_peer_that_reads_but_never_answers(
    pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    ours, theirs = pair
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ws, activity, peer = await accept_raw_peer(nursery, ours, theirs)
            for _ in range(40):
                await ws.send_message("x" * 1000)  # ~40 KB: 8 s of reading below
            taken = 0

            async def read_slowly() -> None:
                nonlocal taken
                while True:
                    await trio.sleep(0.1)
                    taken += len(await peer.receive_some(500))

            nursery.start_soon(read_slowly)
            started = trio.current_time()
            with trio.move_on_after(5) as scope:
                await websocket.watch(ws, activity, interval_s=1, timeout_s=1)
            assert scope.cancelled_caught, "declared dead while it was reading"
            assert trio.current_time() - started == pytest.approx(5)
            assert 0 < taken < 40 * 1000  # it was still reading, its backlog not gone
            nursery.cancel_scope.cancel()


async def test_watch_sees_a_backlog_that_falls_between_refills(
    pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    """A writer blocked on a slow reader refills the socket as soon as it may: the backlog
    is a sawtooth, falling as the peer reads and jumping back up. With its period equal to
    the ping timeout, two looks a timeout apart see the same height every time; the reader
    is alive all the same (the CI flake of the slow-reader channel test)."""
    ours, theirs = pair
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ws, activity, _ = await accept_raw_peer(nursery, ours, theirs)
            start = trio.current_time()

            def sawtooth() -> int:
                phase = round((trio.current_time() - start) * 1000) % 1000  # period: 1 s
                return 200_000 - phase * 100

            activity.observe(sawtooth)
            with trio.move_on_after(5) as scope:
                await websocket.watch(ws, activity, interval_s=1, timeout_s=1)
            assert scope.cancelled_caught, "declared dead while its backlog kept falling"
            nursery.cancel_scope.cancel()


async def test_watch_gives_up_on_a_peer_that_neither_reads_nor_answers(
    pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    ours, theirs = pair
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ws, activity, _ = await accept_raw_peer(nursery, ours, theirs)
            for _ in range(40):
                await ws.send_message("x" * 1000)
            started = trio.current_time()
            verdict: websocket.Verdict | None = None
            with trio.move_on_after(5):
                verdict = await websocket.watch(ws, activity, interval_s=1, timeout_s=1)
            assert verdict == "silent"
            # Quiet for the interval, then no answer for the timeout.
            assert trio.current_time() - started == pytest.approx(2)
            nursery.cancel_scope.cancel()


async def test_watch_spares_a_peer_that_answers_and_ends_when_it_closes(
    pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    ours, theirs = pair
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            activity = Activity()
            wire = ActivityStream(trio.SocketStream(ours), activity)
            accepted: list[WebSocketConnection] = []

            async def serve() -> None:
                ws = await websocket.accept(nursery, wire, max_message_bytes=MAX_MESSAGE)
                accepted.append(ws)

            async with trio.open_nursery() as handshake:
                handshake.start_soon(serve)
                client = await wrap_client_stream(nursery, trio.SocketStream(theirs), "oc", "/")
            result: list[websocket.Verdict] = []
            ended = trio.Event()

            async def run_watch() -> None:
                result.append(
                    await websocket.watch(accepted[0], activity, interval_s=1, timeout_s=1)
                )
                ended.set()

            nursery.start_soon(run_watch)
            await trio.sleep(4.5)  # between two pings: none in flight when it closes
            assert result == []  # it answers every ping: alive
            await client.aclose()
            with trio.move_on_after(3):
                await ended.wait()
            assert result == ["closed"]
            nursery.cancel_scope.cancel()


# -- unfinished messages (slowloris) -------------------------------------------------------


async def test_a_message_begun_while_waiting_moves_the_wait_s_end_earlier(
    autojump_clock: trio.testing.MockClock,
) -> None:
    activity = Activity(message_timeout_s=3)
    assert activity.message_deadline == math.inf
    started = trio.current_time()
    with activity.waiting_until(started + 100) as scope:
        await trio.sleep(1)
        activity.received()  # the first byte of a message, a second into the wait
        await trio.sleep_forever()
    assert scope.cancelled_caught
    assert trio.current_time() - started == pytest.approx(4)


async def test_only_a_finished_message_or_a_control_frame_outside_one_ends_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    activity = Activity(message_timeout_s=3)
    activity.received()
    begun = trio.current_time()
    await trio.sleep(1)
    activity.received()  # more bytes of the same: the clock is not reset
    activity.message_part(finished=False)
    activity.control_frame()  # a ping inside a fragmented message
    assert activity.message_deadline == begun + 3
    activity.message_part(finished=True)
    assert activity.message_deadline == math.inf
    activity.received()
    activity.control_frame()  # bytes that were a whole ping
    assert activity.message_deadline == math.inf


async def test_watch_cuts_a_message_trickled_a_byte_a_second(
    pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    """Every byte is a sign of life, so liveness alone would keep it for ever (the frame
    takes 106 s); the message must be finished 5 s after its first byte."""
    ours, theirs = pair
    with trio.fail_after(200):
        async with trio.open_nursery() as nursery:
            ws, activity, peer = await accept_raw_peer(nursery, ours, theirs, message_timeout_s=5)
            frame = client_frame(0x1, b"x" * 100)
            started = trio.current_time()

            async def trickle() -> None:
                for byte in frame:
                    await peer.send_all(bytes([byte]))
                    await trio.sleep(1)

            nursery.start_soon(trickle)
            verdict = await websocket.watch(ws, activity, interval_s=2, timeout_s=2)
            assert verdict == "unfinished"
            assert trio.current_time() - started == pytest.approx(5)
            nursery.cancel_scope.cancel()


async def test_watch_spares_messages_each_finished_in_time(
    pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    """Messages (and pings between them) for 30 s, each split across two writes 1 s apart,
    a fragmented one among them: each is finished within 5 s, none is cut."""
    ours, theirs = pair
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            ws, activity, peer = await accept_raw_peer(nursery, ours, theirs, message_timeout_s=5)
            received: list[str | bytes] = []
            arrived = trio.Event()

            async def taken(count: int) -> None:
                """Causal: our side has the message whole before the pause after it."""
                nonlocal arrived
                while len(received) < count:
                    await arrived.wait()

            async def send() -> None:
                # The sleeps are the script's pacing in virtual time (autojump_clock: the
                # kernel hands a socket pair's bytes over at send, so no jump overtakes
                # them), not waits for something: "taken" is that.
                sent = 0
                while True:
                    for _ in range(3):  # 4.5 s of messages alone: each is finished in time
                        frame = client_frame(0x1, b"whole")
                        await peer.send_all(frame[:3])
                        await trio.sleep(1)
                        await peer.send_all(frame[3:])
                        sent += 1
                        await taken(sent)
                        await trio.sleep(0.5)  # between messages: no deadline may run
                    await peer.send_all(client_frame(0x1, b"frag", fin=False))
                    await trio.sleep(2)
                    await peer.send_all(client_frame(0x9, b"p") + client_frame(0x0, b"ment"))
                    sent += 1
                    await taken(sent)
                    await trio.sleep(0.5)  # between messages: no deadline may run

            async def take() -> None:
                nonlocal arrived
                while True:
                    received.append(await ws.get_message())
                    arrived.set()
                    arrived = trio.Event()

            nursery.start_soon(send)
            nursery.start_soon(take)
            with trio.move_on_after(30) as scope:
                verdict = await websocket.watch(ws, activity, interval_s=3, timeout_s=3)
            assert scope.cancelled_caught, f"cut: {verdict}"
            assert len(received) > 10
            assert set(received) == {"whole", "fragment"}
            nursery.cancel_scope.cancel()


async def test_watch_cuts_a_fragmented_message_that_never_ends(
    pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    """Whole frames, and pings between them, keep coming; the message they make never
    ends."""
    ours, theirs = pair
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            ws, activity, peer = await accept_raw_peer(nursery, ours, theirs, message_timeout_s=5)
            started = trio.current_time()

            async def send() -> None:
                await peer.send_all(client_frame(0x2, b"first", fin=False))
                while True:
                    await trio.sleep(1)
                    await peer.send_all(
                        client_frame(0x9, b"p") + client_frame(0x0, b"more", fin=False)
                    )

            nursery.start_soon(send)
            verdict = await websocket.watch(ws, activity, interval_s=2, timeout_s=2)
            assert verdict == "unfinished"
            assert trio.current_time() - started == pytest.approx(5)
            nursery.cancel_scope.cancel()
