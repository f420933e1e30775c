"""The front door's accept loop, out of files: it waits and tries again, and says so once
per shortage (the flood's cap: ``tests/faults/test_flood.py``)."""

from __future__ import annotations

import errno
import logging
import socket

import pytest
import trio
import trio.testing

from openclawd.config import ListenConfig
from openclawd.lifecycle import Lifecycle
from openclawd.local.server import LocalServer


class ScriptedListener(trio.abc.Listener[trio.SocketStream]):
    """Each ``accept`` takes the next of ``script``: an errno to raise, or a stream to
    return; once it is used up, ``accept`` waits for ever."""

    def __init__(self, script: list[int | trio.SocketStream]) -> None:
        self.script = script
        self.accepted_at: list[float] = []

    async def accept(self) -> trio.SocketStream:
        await trio.lowlevel.checkpoint()
        self.accepted_at.append(trio.current_time())
        if not self.script:
            await trio.sleep_forever()
        step = self.script.pop(0)
        if isinstance(step, int):
            raise OSError(step, "Too many open files")
        return step

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_out_of_files_accept_is_retried_and_logged_once_per_shortage(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    ours, theirs = socket.socketpair()
    theirs.close()  # the app left at once: its connection ends "closed before a request"
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    emfile = errno.EMFILE
    listener = ScriptedListener([emfile, emfile, emfile, stream, errno.ENFILE])
    server = LocalServer(ListenConfig(), Lifecycle())
    with caplog.at_level(logging.INFO, logger="openclawd.local.server"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.accept_loop, listener, nursery)
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
    # Three failures 0.1 s apart, the stream, a failure, then a wait: six calls.
    assert listener.accepted_at == pytest.approx([0, 0.1, 0.2, 0.3, 0.3, 0.4])
    events = [r.getMessage().split()[0] for r in caplog.records]
    assert events.count("connection.accept_failed") == 2  # one per shortage
    assert events.count("connection.accept_recovered") == 1
    assert server.clients == 0
