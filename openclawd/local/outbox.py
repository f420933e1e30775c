"""The frames on their way to one app's WebSocket, from the tasks that make them.

Frames are written whole, one writer at a time, and a task's frames go out in the order
it gave them. When nothing is being written and nothing waits, the task that has frames
writes them itself: no hop to another task, which costs more than the write (two trips
through the scheduler per event). Otherwise they wait in a bounded queue for the
outbox's writer task (``run``), which sends all that waits in one write. A task whose
frames are queued waits while the queue is full: a slow app holds up its requests'
upstream reads, not memory. A write under way is never cut by a cancel (``Sender``).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Sequence

import trio

from openclawd.websocket import ConnectionClosed, Sender

__all__ = ["Outbox"]

# Frames queued before the tasks that make them wait (they then stop reading upstream).
QUEUED_FRAMES = 16

_Item = tuple[str, trio.Event | None]


class Outbox:
    """The frames for one WebSocket; ``run`` is its writer task, started with it.

    Once the WebSocket is closed (a write found it so, or the writer stopped), giving it a
    frame raises ``trio.BrokenResourceError``: the app is gone."""

    def __init__(self, sender: Sender) -> None:
        self.sender = sender
        self._queue: deque[_Item] = deque()
        self._writing = False
        self._closed = False
        self._writer = trio.lowlevel.ParkingLot()  # the writer, waiting for frames
        self._room = trio.lowlevel.ParkingLot()  # tasks waiting for room in the queue

    async def send(self, texts: Sequence[str]) -> None:
        """Give frames for the app, in order. Returns once they are written (when the
        outbox was idle) or queued (waiting while the queue is full).

        Raises:
            trio.BrokenResourceError: the app is gone.
        """
        if self._closed:
            raise trio.BrokenResourceError("the app's WebSocket is closed")
        if not self._writing and not self._queue:
            await self._write(texts)
            return
        for text in texts:
            await self._enqueue((text, None))

    async def send_last(self, text: str) -> None:
        """Give a request's last frame, and return once it is written or the app is gone.

        Raises:
            trio.BrokenResourceError: the app was gone before it was given.
        """
        if self._closed:
            raise trio.BrokenResourceError("the app's WebSocket is closed")
        if not self._writing and not self._queue:
            # Gone while it was written: as for a queued frame, not an error.
            with contextlib.suppress(trio.BrokenResourceError):
                await self._write((text,))
            return
        written = trio.Event()
        await self._enqueue((text, written))
        await written.wait()

    async def run(self) -> None:
        """The writer: sends what is queued, all of it at once, whenever nobody else
        writes. Returns when the WebSocket is closed; cancel it to stop it."""
        batch: list[_Item] = []
        try:
            while True:
                while self._writing or not self._queue:
                    await self._writer.park()
                batch = [self._queue.popleft() for _ in range(len(self._queue))]
                self._room.unpark_all()
                self._writing = True
                try:
                    await self.sender.send_batch([text for text, _ in batch])
                finally:
                    self._writing = False
                for _, written in batch:
                    if written is not None:
                        written.set()
                batch = []
        except ConnectionClosed:
            pass
        finally:
            self._close(batch)

    async def _write(self, texts: Sequence[str]) -> None:
        self._writing = True
        try:
            await self.sender.send_batch(texts)
        except ConnectionClosed:
            self._close([])
            raise trio.BrokenResourceError("the app's WebSocket is closed") from None
        finally:
            self._writing = False
            if self._queue:
                self._writer.unpark_all()

    async def _enqueue(self, item: _Item) -> None:
        while len(self._queue) >= QUEUED_FRAMES and not self._closed:
            await self._room.park()
        if self._closed:
            raise trio.BrokenResourceError("the app's WebSocket is closed")
        self._queue.append(item)
        self._writer.unpark_all()

    def _close(self, batch: list[_Item]) -> None:
        """No frame will be written any more: whoever waits on one is let go, and giving
        one fails from now on."""
        self._closed = True
        for _, written in [*batch, *self._queue]:
            if written is not None:
                written.set()
        self._queue.clear()
        self._room.unpark_all()
