"""One request's life on the data socket, from admission to its ending (sans-IO).

Every request (a ``/v1/ws`` request, a ``/v1/http`` exchange, the start of a realtime
session) passes the same ``Admission``: the daemon's drain, then the limits (today the
per-uid request rate; token control plugs in here). An admitted request is an
``Exchange``: the driver tells it what happened on the wire (the head went out, body
bytes went out, the end went out, an error, the app's cancel, the app leaving, the daemon's
cut) and it decides how the request ended, once, whatever order those come in, and what
the app is still owed. After h11's ``Connection``: no sockets, tasks or clock; ``now``
is passed in. The drivers only move bytes.
"""

from __future__ import annotations

import enum
from typing import Protocol

from openclawd.errors import DrainingError, OpenclawdError, RateLimitedError

__all__ = ["Admission", "Ending", "Exchange"]


class DaemonState(Protocol):
    """What admission needs of the daemon's lifecycle."""

    @property
    def draining(self) -> bool: ...

    @property
    def stopping(self) -> bool: ...


class Limit(Protocol):
    """A limit admission checks: None to let the request through, else the refusal."""

    def check(self, uid: int, now: float) -> RateLimitedError | None: ...


class Admission:
    """Whether a new request may start now; shared by every entry point."""

    def __init__(self, daemon: DaemonState, limits: list[Limit]) -> None:
        self.daemon = daemon
        self.limits = limits

    def admit(self, uid: int, now: float) -> None:
        """Let one request of peer ``uid`` through, taking its share of every limit.

        Raises:
            DrainingError: the daemon is draining or stopping.
            RateLimitedError: a limit refused it (the error says until when).
        """
        if self.daemon.draining or self.daemon.stopping:
            raise DrainingError("openclawd is draining: send new requests elsewhere or later")
        for limit in self.limits:
            refused = limit.check(uid, now)
            if refused is not None:
                raise refused


class Ending(enum.Enum):
    """How a request ended."""

    FINISHED = "finished"  # its whole answer went out
    FAILED = "failed"  # an error ended it: answered with the error, or cut mid-answer
    CANCELLED = "cancelled"  # the app cancelled it (a /v1/ws cancel frame)
    APP_GONE = "app gone"  # the app left before the end
    CUT = "cut"  # the daemon cut it (a drain's deadline, the shutdown)


class Exchange:
    """The state of one admitted request.

    Args:
        answers_after_head: can an error still be told to the app once the head went
            out? On ``/v1/ws`` it can (an ``error`` frame ends the request); on
            ``/v1/http`` it cannot (the answer is cut, so the app sees it truncated).
    """

    def __init__(self, *, answers_after_head: bool) -> None:
        self.answers_after_head = answers_after_head
        self.status: int | None = None  # the status the app was sent, once sent
        self.body_bytes = 0  # answer bytes the app was sent
        self.error: OpenclawdError | None = None  # what failed it, if anything
        self.late_error: OpenclawdError | None = None  # an error after it had ended
        self.ending: Ending | None = None
        self.reason: str | None = None  # why it was left behind (APP_GONE, CUT)

    @property
    def ended(self) -> bool:
        return self.ending is not None

    @property
    def head_sent(self) -> bool:
        return self.status is not None

    def responded(self, status: int) -> None:
        """The answer's head (status) went out."""
        self.status = status

    def sent(self, size: int) -> None:
        """``size`` bytes of the answer went out."""
        self.body_bytes += size

    def finished(self) -> None:
        """The answer's end is out (or, on ``/v1/ws``, queued: the id is free)."""
        self._end(Ending.FINISHED)

    def fail(self, error: OpenclawdError) -> bool:
        """``error`` ended the request. Returns whether the app is to be told (with an
        error frame or answer, then ``answered``); if not, the answer is cut where it is.
        An error after the end is only kept (``late_error``)."""
        if self.ended:
            self.late_error = error
            return False
        self.error = error
        if self.head_sent and not self.answers_after_head:
            self._end(Ending.FAILED)
            return False
        return True

    def answered(self, status: int | None = None, size: int = 0) -> None:
        """The error the app was to be told is out (with this status and body size, for
        an HTTP answer)."""
        if status is not None:
            self.status = status
        self.body_bytes += size
        self._end(Ending.FAILED)

    def cancelled(self) -> bool:
        """The app cancelled the request. Returns whether it is to be told (it is not
        once the request has ended)."""
        if self.ended:
            return False
        self.ending = Ending.CANCELLED
        return True

    def left(self, reason: str | None, *, cut: bool = False) -> None:
        """The request is left behind, unfinished: the app went (``cut``: the daemon cut
        it), for ``reason``. Nothing if it had ended."""
        if not self.ended:
            self._end(Ending.CUT if cut else Ending.APP_GONE)
            self.reason = reason

    def logged_status(self) -> int | str:
        """The status a log line shows: the status sent, once the answer ended; "app
        gone" if the app left first; "cut" if the daemon cut it before any answer."""
        if self.ending in (Ending.FINISHED, Ending.FAILED) and self.status is not None:
            return self.status
        if self.ending is Ending.APP_GONE:
            return "app gone"
        if self.status is not None:
            return self.status
        return "error" if self.error is not None else "cut"

    def _end(self, ending: Ending) -> None:
        if self.ending is None:
            self.ending = ending
