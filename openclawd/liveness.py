"""Is a WebSocket peer alive? Liveness and the message deadline, both ways.

``Activity`` is when a peer last showed it is alive (sent bytes, or took some of ours)
and since when it has left a message unfinished; ``watch`` pings a quiet peer and says
when it has gone silent, left a message unfinished too long, or closed. Used for the apps'
WebSockets and the upstream sessions alike; knows nothing of what runs over them.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import struct
import termios
from collections.abc import Callable, Iterator
from typing import Literal, Protocol

import trio

__all__ = ["Activity", "Peer", "Verdict", "socket_of", "unsent_bytes", "watch"]

# How often, per ping timeout, a peer that owes a pong has its backlog looked at. While a
# writer is blocked on it, the backlog is a sawtooth: it falls as the peer reads, and jumps
# back when the writer refills it (after half the buffer is free, for a unix socket). Two
# looks a timeout apart can see the same height; looks closer together see it fall.
_BACKLOG_SAMPLES = 8

Verdict = Literal["closed", "silent", "unfinished"]


class Peer(Protocol):
    """The WebSocket ``watch`` looks after (``websocket.watch`` gives one)."""

    @property
    def closed(self) -> bool: ...

    async def ping(self) -> bool:
        """Ping, and return once answered (True), or once the WebSocket closed (False)."""
        ...


class Activity:
    """When the peer last showed it is alive: sent us bytes, or took some of ours; and,
    for an app's connection, since when it has left a message unfinished.

    A peer that sends a message a byte at a time (slowloris) is alive by every byte, so
    liveness alone never cuts it off: a message must also be finished within
    ``message_timeout_s`` of its first byte (``watch`` enforces both). An
    ``ActivityStream`` over an activity whose ``message_timeout_s`` is finite reads where
    the peer's messages begin and end off the bytes, and reports them (``message_part``);
    ``received`` and ``control_frame`` serve a reporter that sees only bytes, or frames.
    """

    def __init__(self, *, message_timeout_s: float = math.inf) -> None:
        self.last = trio.current_time()
        self.message_timeout_s = message_timeout_s
        self.unfinished_since = math.inf  # the first byte of what is not finished yet
        self._in_message = False  # a data message has begun (a frame of it was parsed)
        self._alarm: trio.CancelScope | None = None  # the waiting watch's, if it waits
        self._backlog: Callable[[], int | None] | None = None
        self._last_backlog: int | None = None

    def touch(self) -> None:
        self.last = trio.current_time()

    def received(self) -> None:
        """Bytes came: a sign of life, and the start of a message if none was under way
        (they may be a whole message: ``message_part`` then ends it at once)."""
        self.last = trio.current_time()
        self._begin()

    def message_part(self, *, finished: bool) -> None:
        """A data frame, or part of one, was parsed; ``finished``: its message is whole."""
        self._in_message = not finished
        if finished:
            self.unfinished_since = math.inf
        else:
            self._begin()

    def control_frame(self) -> None:
        """A ping, pong or close was parsed: finished, unless it came inside a message."""
        if not self._in_message:
            self.unfinished_since = math.inf

    @property
    def message_deadline(self) -> float:
        """When what the peer began must be finished by (inf: nothing under way)."""
        return self.unfinished_since + self.message_timeout_s

    @contextlib.contextmanager
    def waiting_until(self, deadline: float) -> Iterator[trio.CancelScope]:
        """``trio.move_on_at(deadline)``, moved earlier to ``message_deadline`` as soon as
        it comes first, even if the message begins during the wait."""
        with trio.move_on_at(min(deadline, self.message_deadline)) as scope:
            self._alarm = scope
            try:
                yield scope
            finally:
                self._alarm = None

    def _begin(self) -> None:
        if self.unfinished_since == math.inf:
            self.unfinished_since = trio.current_time()
            if self._alarm is not None:
                self._alarm.deadline = min(self._alarm.deadline, self.message_deadline)

    def observe(self, backlog: Callable[[], int | None]) -> None:
        """``backlog()``: the bytes sent that the peer has not taken yet (None: unknown).
        A send may wait long behind a slow reader; the backlog shrinking in the meantime
        shows that reader alive all the same."""
        self._backlog = backlog

    def check(self) -> None:
        """Touch if the peer has taken some of its backlog since the last check."""
        if self._backlog is None:
            return
        backlog = self._backlog()
        if backlog is not None and self._last_backlog is not None and backlog < self._last_backlog:
            self.touch()
        self._last_backlog = backlog


def socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return stream.socket if isinstance(stream, trio.SocketStream) else None


def unsent_bytes(sock: trio.socket.SocketType) -> int | None:
    """What the socket holds that the peer has not read yet (SIOCOUTQ), if it can tell."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):  # closed, or not a kind that says
        return None
    value: int = struct.unpack("i", raw)[0]
    return value


async def watch(
    peer: Peer,
    activity: Activity,
    *,
    interval_s: float,
    timeout_s: float,
    excused: Callable[[], bool] = lambda: False,
) -> Verdict:
    """Ping ``peer`` whenever it has been quiet for ``interval_s``. Runs until it returns:
    ``"silent"`` once the peer has not answered for ``timeout_s``, ``"unfinished"`` once
    it has left a message unfinished for ``activity.message_timeout_s``, ``"closed"`` if
    it closed while a ping waited.

    Any sign of life counts, both ways (``activity``): a peer slowly reading a backlog is
    alive. While ``excused()`` is true a missing pong is not held against the peer: its
    pong may sit unread behind messages we hold back (our queue for it is full because
    the other side of a relay is slow).

    Cancellation: safe; a ping is never cut off half sent (it is sent in its own task).
    """
    async with trio.open_nursery() as nursery:
        verdict = await _watch(nursery, peer, activity, interval_s, timeout_s, excused)
        nursery.cancel_scope.cancel()
        return verdict


async def _watch(
    nursery: trio.Nursery,
    peer: Peer,
    activity: Activity,
    interval_s: float,
    timeout_s: float,
    excused: Callable[[], bool],
) -> Verdict:
    while True:
        with activity.waiting_until(activity.last + interval_s):
            await trio.sleep_forever()
        if _overdue(activity):
            return "unfinished"
        if trio.current_time() - activity.last < interval_s:
            continue
        answered = trio.Event()
        activity.check()  # the backlog now, to compare with from here on
        nursery.start_soon(_ping, peer, answered)
        verdict = await _wait_for_pong(peer, activity, answered, timeout_s, excused)
        if verdict is not None:
            return verdict
        activity.touch()


async def _wait_for_pong(
    peer: Peer,
    activity: Activity,
    answered: trio.Event,
    timeout_s: float,
    excused: Callable[[], bool],
) -> Verdict | None:
    """Until the ping is ``answered`` (None), or a verdict comes first."""
    deadline = trio.current_time() + timeout_s
    step = timeout_s / _BACKLOG_SAMPLES
    while not answered.is_set() and not peer.closed:
        with activity.waiting_until(min(deadline, trio.current_time() + step)):
            await answered.wait()
        if _overdue(activity):
            return "unfinished"
        if answered.is_set():
            break
        activity.check()
        deadline = max(deadline, activity.last + timeout_s)
        now = trio.current_time()
        if now < deadline:
            continue
        if not excused():
            return "silent"
        deadline = now + timeout_s
    return "closed" if peer.closed else None


def _overdue(activity: Activity) -> bool:
    return trio.current_time() >= activity.message_deadline


async def _ping(peer: Peer, answered: trio.Event) -> None:
    if await peer.ping():
        answered.set()
