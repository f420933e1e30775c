"""How the daemon cuts the data socket's connections: at a deadline, with the close it
chose (1001 at the end of an operator's drain, 1012 at shutdown)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import trio

__all__ = ["Close", "Cutter"]


@dataclass(frozen=True, slots=True)
class Close:
    """How a WebSocket entry point wants its app closed."""

    code: int
    reason: str


class Cutter:
    """Cuts the data socket's connections at a deadline, with the close code its caller
    chose: every connection runs in a cancel scope that carries the cut's deadline, so a
    drain needs no task of its own to cut, and a cut connection is told what the one who
    cut it chose, not what it can guess from the daemon's state."""

    def __init__(self) -> None:
        self.deadline = math.inf
        self.why: Close | None = None  # the close a cut WebSocket gets
        self._scopes: set[trio.CancelScope] = set()

    @property
    def open(self) -> int:
        """Connections the cut would reach."""
        return len(self._scopes)

    def cut_at(self, deadline: float, why: Close | None) -> None:
        """Cut every connection at ``deadline`` (trio time; ``math.inf``: no cut, which
        is how a resume undoes a drain's), closing a WebSocket with ``why``. Connections
        that come after a deadline has passed are not cut by it (they are refused)."""
        self.deadline, self.why = deadline, why
        for scope in self._scopes:
            scope.deadline = deadline

    @contextlib.contextmanager
    def guard(self) -> Iterator[trio.CancelScope]:
        """The scope one connection runs in."""
        deadline = self.deadline if self.deadline > trio.current_time() else math.inf
        with trio.CancelScope(deadline=deadline) as scope:
            self._scopes.add(scope)
            try:
                yield scope
            finally:
                self._scopes.discard(scope)
