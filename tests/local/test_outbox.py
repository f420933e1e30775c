"""The frames on their way to an app's WebSocket (local/outbox.py): written by the task
that has them when the outbox is idle, else queued for its writer; whole, in order, and
bounded."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import pytest
import trio
import trio.testing

from openclawd.local.outbox import QUEUED_FRAMES, Outbox
from openclawd.websocket import ConnectionClosed, Sender


class FakeSender:
    """Records each write (a batch of frames) and by which task; ``gate`` holds writes."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, list[str]]] = []
        self.gate: trio.Event | None = None
        self.closed = False

    async def send_batch(self, messages: Sequence[str | bytes]) -> None:
        if self.closed:
            raise ConnectionClosed(None)  # type: ignore[arg-type]
        if self.gate is not None:
            await self.gate.wait()
        self.writes.append((trio.lowlevel.current_task().name, [str(m) for m in messages]))


def outbox_of(sender: FakeSender) -> Outbox:
    return Outbox(cast(Sender, sender))


async def test_an_idle_outbox_is_written_by_the_task_with_the_frames() -> None:
    sender = FakeSender()
    outbox = outbox_of(sender)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run, name="writer")
        await outbox.send(["a", "b"])
        await outbox.send(["c"])
        me = trio.lowlevel.current_task().name
        assert sender.writes == [(me, ["a", "b"]), (me, ["c"])]  # never the writer's
        nursery.cancel_scope.cancel()


async def test_frames_given_during_a_write_wait_and_go_out_together_in_order() -> None:
    sender = FakeSender()
    outbox = outbox_of(sender)
    sender.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run, name="writer")
        nursery.start_soon(outbox.send, ["first"], name="direct")
        await trio.testing.wait_all_tasks_blocked()  # "direct" is in its write
        await outbox.send(["x1", "x2"])  # queued: returns at once
        await outbox.send(["y1"])
        sender.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert sender.writes == [("direct", ["first"]), ("writer", ["x1", "x2", "y1"])]
        # Idle again: the next frames are written by their own task.
        await outbox.send(["z"])
        assert sender.writes[-1] == (trio.lowlevel.current_task().name, ["z"])
        nursery.cancel_scope.cancel()


async def test_a_full_queue_holds_up_the_task_giving_frames() -> None:
    sender = FakeSender()
    outbox = outbox_of(sender)
    sender.gate = trio.Event()
    given: list[int] = []

    async def give_many() -> None:
        for n in range(QUEUED_FRAMES + 5):
            await outbox.send([str(n)])
            given.append(n)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run, name="writer")
        nursery.start_soon(outbox.send, ["held"], name="direct")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(give_many)
        await trio.testing.wait_all_tasks_blocked()
        assert len(given) == QUEUED_FRAMES  # the next one waits for room
        sender.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert given == list(range(QUEUED_FRAMES + 5))
        nursery.cancel_scope.cancel()
    written = [frame for _, batch in sender.writes for frame in batch]
    assert written == ["held", *(str(n) for n in range(QUEUED_FRAMES + 5))]


async def test_send_last_returns_once_written() -> None:
    sender = FakeSender()
    outbox = outbox_of(sender)
    sender.gate = trio.Event()
    done: list[str] = []

    async def last() -> None:
        await outbox.send_last("end")
        done.append("end")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run, name="writer")
        nursery.start_soon(outbox.send, ["busy"], name="direct")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(last)
        await trio.testing.wait_all_tasks_blocked()
        assert done == []  # queued, not written
        sender.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert done == ["end"]
        assert sender.writes[-1] == ("writer", ["end"])
        nursery.cancel_scope.cancel()


async def test_a_closed_websocket_fails_every_frame_and_lets_waiters_go() -> None:
    sender = FakeSender()
    outbox = outbox_of(sender)
    sender.gate = trio.Event()
    done: list[str] = []

    async def last() -> None:
        await outbox.send_last("end")
        done.append("let go")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run, name="writer")
        nursery.start_soon(outbox.send, ["busy"], name="direct")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(last)
        await outbox.send(["queued"])
        await trio.testing.wait_all_tasks_blocked()
        sender.closed = True
        sender.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert done == ["let go"]
        with pytest.raises(trio.BrokenResourceError):
            await outbox.send(["after"])
        with pytest.raises(trio.BrokenResourceError):
            await outbox.send_last("after")


async def test_a_direct_write_that_finds_the_websocket_closed_fails_the_next_too() -> None:
    sender = FakeSender()
    sender.closed = True
    outbox = outbox_of(sender)
    with pytest.raises(trio.BrokenResourceError):
        await outbox.send(["a"])
    with pytest.raises(trio.BrokenResourceError):
        await outbox.send_last("end")
