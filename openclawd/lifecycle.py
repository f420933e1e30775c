"""The daemon's lifecycle state, shared by the daemon, the data socket and the control API.

Owns the contract's ``state`` (starting, ready, degraded, draining, stopping), the reasons
the daemon is not ready, and the count of in-flight work that a drain waits for. The daemon
and the components it starts write it; the servers and the control API only read it.
Everything here is sync and never blocks, except the ``wait_*`` functions.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import trio


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DEGRADED = "degraded"
    DRAINING = "draining"
    STOPPING = "stopping"


class WorkTracker:
    """Counts in-flight work (upstream requests, realtime sessions) so a drain can wait."""

    def __init__(self, on_end: Callable[[], None] = lambda: None) -> None:
        """``on_end`` is called each time a piece of work ends."""
        self._count = 0
        self._idle = trio.Event()
        self._idle.set()
        self._on_end = on_end

    @property
    def count(self) -> int:
        return self._count

    @contextmanager
    def track(self) -> Iterator[None]:
        """Count the body of the ``with`` block as one piece of in-flight work."""
        self.begin()
        try:
            yield
        finally:
            self.end()

    def begin(self) -> None:
        """Count one piece of work from now; ``end()`` must follow, whatever happens. For
        work accepted in one task and done in another: counted from its acceptance, so a
        drain that starts in between still waits for it."""
        self._count += 1
        if self._count == 1:
            self._idle = trio.Event()

    def end(self) -> None:
        self._count -= 1
        if self._count == 0:
            self._idle.set()
        self._on_end()

    async def wait_idle(self) -> None:
        """Return once no work is in flight."""
        while self._count:
            await self._idle.wait()


class Lifecycle:
    """Where the daemon is in its life, and why it is not ready when it is not."""

    def __init__(self) -> None:
        self.started_monotonic = time.monotonic()
        # During a drain, each piece of work that ends is a change: the drain waits for
        # the last, and the STATUS line counts them down.
        self.work = WorkTracker(on_end=self._work_ended)
        self.listening = False
        self.draining = False
        self.stopping = False
        # When a drain (the operator's, or the shutdown's) gives up on in-flight work, in
        # trio time; None while no drain runs.
        self.drain_deadline: float | None = None
        self._blockers: dict[str, str] = {}
        self._degradations: dict[str, str] = {}
        self._changed = trio.Event()

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_monotonic

    @property
    def state(self) -> State:
        if self.stopping:
            return State.STOPPING
        if self.draining:
            return State.DRAINING
        if not self.listening or self._blockers:
            return State.STARTING
        if self._degradations:
            return State.DEGRADED
        return State.READY

    @property
    def ready(self) -> bool:
        """Ready for new work: listening, nothing blocking, not draining or stopping."""
        return self.state in (State.READY, State.DEGRADED)

    def not_ready_reasons(self) -> list[str]:
        reasons = []
        if not self.listening:
            reasons.append("starting")
        reasons.extend(self._blockers.values())
        if self.draining or self.stopping:
            reasons.append("draining")
        return reasons

    def degradations(self) -> list[str]:
        return list(self._degradations.values())

    def block(self, key: str, reason: str) -> None:
        """Hold readiness back (e.g. ``no key for openai``) until ``unblock(key)``."""
        self._set(self._blockers, key, reason)

    def unblock(self, key: str) -> None:
        self._set(self._blockers, key, None)

    def degrade(self, key: str, reason: str) -> None:
        """Mark the daemon as serving but impaired (e.g. ``vault unreachable``)."""
        self._set(self._degradations, key, reason)

    def recover(self, key: str) -> None:
        self._set(self._degradations, key, None)

    def set_listening(self) -> None:
        self.listening = True
        self._notify()

    def set_draining(self, deadline: float | None) -> None:
        """Start a drain that ends at ``deadline`` (trio time), move its deadline, or with
        None end it (the operator's resume)."""
        self.draining = deadline is not None
        self.drain_deadline = deadline
        self._notify()

    def set_stopping(self, deadline: float) -> None:
        """Shut down: new work is refused; work in flight has until ``deadline``."""
        self.stopping = True
        self.drain_deadline = deadline
        self._notify()

    def drain_remaining_s(self) -> float | None:
        """Seconds left before the drain's deadline (0 once passed); None with no drain."""
        if self.drain_deadline is None:
            return None
        return max(0.0, self.drain_deadline - trio.current_time())

    def describe(self) -> str:
        """A one-line status for sd_notify's STATUS= and for logs."""
        state = self.state
        if state is State.STARTING:
            return "starting: " + ", ".join(self.not_ready_reasons())
        if state is State.DEGRADED:
            return "degraded: " + ", ".join(self.degradations())
        if state in (State.DRAINING, State.STOPPING):
            remaining = self.drain_remaining_s()
            if not self.work.count:
                return f"{state.value}: nothing in flight"
            left = "" if remaining is None else f", {math.ceil(remaining)}s left"
            return f"{state.value}: {self.work.count} in flight{left}"
        return "ready"

    async def wait_unblocked(self) -> None:
        """Return once nothing holds readiness back (e.g. a required provider's key)."""
        while self._blockers:
            await self._changed.wait()

    async def wait_changed(self) -> None:
        """Return at the next change of state or reasons, or when work in flight ends."""
        await self._changed.wait()

    def _set(self, table: dict[str, str], key: str, reason: str | None) -> None:
        before = table.get(key)
        if reason is None:
            table.pop(key, None)
        else:
            table[key] = reason
        if table.get(key) != before:
            self._notify()

    def _work_ended(self) -> None:
        if self.draining or self.stopping:
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
