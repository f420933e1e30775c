"""How a /v1/realtime session ends: the close-code table as data (CONTRACT.md 3.2, 3.4).

Sans-IO, after h11's ``Connection``: the driver (``local/realtime.py``) feeds a ``Relay``
each thing that ends a session (the upstream refused the handshake or could not be
reached, a side closed or dropped, went silent on pings, left a message unfinished or sent
one too big, the daemon cut the session or failed) and performs the ``Ending`` it gets
back: the close frame for the app, the one for the upstream, and whether what the ending
side sent first still reaches the other. ``TABLE`` holds every row, keyed by the side and
the ``Cause``. The first event decides; later ones (both sides closing at once) change
nothing. Knows nothing of sockets, tasks, messages or the clock. Refusals before a session
starts (peer not allowed, limits, draining) are the error classes' (``errors.py``); a
drain lets a session run on, and its deadline, like shutdown, is a ``Cut`` carrying the
close its cutter chose.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import ClassVar, Final

from openclawd.protocol.closecodes import CloseCode, close_reason, sendable


class Side(enum.Enum):
    """One end of a relayed session."""

    APP = "app"
    UPSTREAM = "upstream"

    @property
    def other(self) -> Side:
        return Side.UPSTREAM if self is Side.APP else Side.APP


class State(enum.Enum):
    """Where a session is; ``ENDED`` once an event has decided its ending."""

    CONNECTING = "connecting"  # the upstream handshake is under way
    RELAYING = "relaying"
    ENDED = "ended"


class Cause(enum.Enum):
    """What ended a session; with the side it happened to, a row of ``TABLE``."""

    CLOSED = "closed"  # a close frame, with a code that may be passed on
    CLOSED_WITHOUT_CODE = "closed_without_code"  # a close frame without a code (1005)
    CLOSED_UNSENDABLE = "closed_unsendable"  # a code no close frame may carry
    DROPPED = "dropped"  # gone without a close frame (1006)
    TOO_BIG = "too_big"  # a message over max_message_bytes
    SILENT = "silent"  # no pong within ping_timeout_s
    UNFINISHED = "unfinished"  # a message left unfinished for message_timeout_s
    KEY_REFUSED = "key_refused"  # the upstream answered the handshake 401 or 403
    RATE_LIMITED = "rate_limited"  # ... 429
    REFUSED = "refused"  # ... any other status
    UNREACHABLE = "unreachable"  # no connection, no TLS, or no handshake in time
    CUT = "cut"  # the daemon cut the session: drain deadline, shutdown
    FAILED = "failed"  # an internal error


# --- events: what the driver feeds -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Closed:
    """``side``'s WebSocket closed, with ``code`` and ``reason`` as the WebSocket library
    reports them (1005: the close frame had no code; 1006: no close frame, it dropped)."""

    side: Side
    code: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class TooBig:
    """``side`` sent a message over ``max_message_bytes``."""

    side: Side


@dataclass(frozen=True, slots=True)
class Silent:
    """``side`` did not answer a ping within ``ping_timeout_s``."""

    side: Side


@dataclass(frozen=True, slots=True)
class Unfinished:
    """``side`` began a message and did not finish it within ``message_timeout_s``."""

    side: Side


@dataclass(frozen=True, slots=True)
class Refused:
    """The upstream answered the handshake with HTTP ``status``; ``reason`` names it
    (``upstream 429, retry after 7s``)."""

    status: int
    reason: str
    side: ClassVar[Side] = Side.UPSTREAM


@dataclass(frozen=True, slots=True)
class Unreachable:
    """The upstream could not be reached, or its handshake failed; ``reason`` says how."""

    reason: str
    side: ClassVar[Side] = Side.UPSTREAM


@dataclass(frozen=True, slots=True)
class Cut:
    """The daemon cut the session: the app is closed with ``code`` and ``reason``, chosen
    by whoever cut it (1001 at a drain's deadline, 1012 at shutdown; None: not said)."""

    code: int | None = None
    reason: str = ""
    side: ClassVar[None] = None


@dataclass(frozen=True, slots=True)
class Failed:
    """An internal error ended the session."""

    side: ClassVar[None] = None


Event = Closed | TooBig | Silent | Unfinished | Refused | Unreachable | Cut | Failed


# --- the table -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """How a row closes one side: with ``code`` (None: the event's, the code the ending
    side closed with or the cutter chose) and ``reason``, a template over the event's
    fields (``code``, ``reason``, ``status``) and the session's limits
    (``max_message_bytes``, ``ping_timeout_s``, ``message_timeout_s``)."""

    code: CloseCode | None
    reason: str


@dataclass(frozen=True, slots=True)
class Row:
    """One row of ``TABLE``."""

    app: Reply  # when the app ended it, its own close (closing it again does nothing)
    upstream: Reply | None  # None: there is no upstream session to close
    deliver: bool = False  # what the ending side sent before its end reaches the other first


AS_CLOSED: Final = Reply(None, "{reason}")  # the event's code and reason
_NORMAL = Reply(CloseCode.NORMAL, "")
_BYE = Reply(CloseCode.GOING_AWAY, "openclawd ended the session")
# trio-websocket's words when it closes a peer for an oversize message (it then reports
# the WebSocket closed with them); ours match them.
OVERSIZE_REASON: Final = "Exceeded maximum message size: {max_message_bytes} bytes"
_OVERSIZE = Reply(CloseCode.TOO_BIG, OVERSIZE_REASON)

_APP, _UP = Side.APP, Side.UPSTREAM

TABLE: Final[Mapping[tuple[Side | None, Cause], Row]] = {
    # The app ended it: its own close (for the log), and the upstream is told.
    (_APP, Cause.CLOSED): Row(AS_CLOSED, AS_CLOSED, deliver=True),
    (_APP, Cause.CLOSED_WITHOUT_CODE): Row(AS_CLOSED, _NORMAL, deliver=True),
    (_APP, Cause.CLOSED_UNSENDABLE): Row(AS_CLOSED, _NORMAL, deliver=True),
    (_APP, Cause.DROPPED): Row(
        AS_CLOSED, Reply(CloseCode.GOING_AWAY, "the app went away"), deliver=True
    ),
    (_APP, Cause.TOO_BIG): Row(_OVERSIZE, _OVERSIZE, deliver=True),
    (_APP, Cause.SILENT): Row(
        Reply(CloseCode.INTERNAL, "no pong within {ping_timeout_s:g}s"),
        Reply(CloseCode.GOING_AWAY, "the app stopped answering pings"),
    ),
    (_APP, Cause.UNFINISHED): Row(
        Reply(CloseCode.POLICY, "message not finished within {message_timeout_s:g}s"),
        Reply(CloseCode.GOING_AWAY, "the app left a message unfinished"),
    ),
    # The upstream ended it: its code and reason are passed on where they may be.
    (_UP, Cause.CLOSED): Row(AS_CLOSED, AS_CLOSED, deliver=True),
    (_UP, Cause.CLOSED_WITHOUT_CODE): Row(
        Reply(CloseCode.NORMAL, "{reason}"), AS_CLOSED, deliver=True
    ),
    (_UP, Cause.CLOSED_UNSENDABLE): Row(
        Reply(CloseCode.BAD_GATEWAY, "upstream closed with {code}"), AS_CLOSED, deliver=True
    ),
    (_UP, Cause.DROPPED): Row(
        Reply(CloseCode.BAD_GATEWAY, "upstream dropped the connection"), AS_CLOSED, deliver=True
    ),
    (_UP, Cause.TOO_BIG): Row(
        Reply(CloseCode.TOO_BIG, "upstream message over max_message_bytes ({max_message_bytes})"),
        _OVERSIZE,
        deliver=True,
    ),
    (_UP, Cause.SILENT): Row(
        Reply(CloseCode.BAD_GATEWAY, "upstream stopped answering pings"), _NORMAL
    ),
    (_UP, Cause.UNFINISHED): Row(
        Reply(CloseCode.BAD_GATEWAY, "upstream message not finished within {message_timeout_s:g}s"),
        _NORMAL,
    ),
    (_UP, Cause.KEY_REFUSED): Row(Reply(CloseCode.POLICY, "{reason}"), None),
    (_UP, Cause.RATE_LIMITED): Row(Reply(CloseCode.TRY_AGAIN, "{reason}"), None),
    (_UP, Cause.REFUSED): Row(Reply(CloseCode.BAD_GATEWAY, "{reason}"), None),
    (_UP, Cause.UNREACHABLE): Row(Reply(CloseCode.BAD_GATEWAY, "{reason}"), None),
    # The daemon ended it.
    (None, Cause.CUT): Row(AS_CLOSED, _BYE),  # the app gets the cutter's close
    (None, Cause.FAILED): Row(Reply(CloseCode.INTERNAL, "internal error"), _BYE),
}

# Handshake statuses with a row of their own; any other is REFUSED.
REFUSALS: Final[Mapping[int, Cause]] = {
    401: Cause.KEY_REFUSED,
    403: Cause.KEY_REFUSED,
    429: Cause.RATE_LIMITED,
}

_CAUSES: Final[Mapping[type[Event], Cause]] = {
    TooBig: Cause.TOO_BIG,
    Silent: Cause.SILENT,
    Unfinished: Cause.UNFINISHED,
    Unreachable: Cause.UNREACHABLE,
    Cut: Cause.CUT,
    Failed: Cause.FAILED,
}


def cause_of(event: Event, *, max_message_bytes: int) -> Cause:
    """The ``Cause`` an event is, for its row of ``TABLE``. A side closed with 1009 and
    the WebSocket library's own words for ``max_message_bytes`` was closed by us for an
    oversize message; with any other reason, 1009 is the peer's own close."""
    oversize = OVERSIZE_REASON.format(max_message_bytes=max_message_bytes)
    match event:
        case Closed(code=CloseCode.TOO_BIG, reason=reason) if reason == oversize:
            return Cause.TOO_BIG
        case Closed(code=1006):
            return Cause.DROPPED
        case Closed(code=1005):
            return Cause.CLOSED_WITHOUT_CODE
        case Closed(code=code):
            return Cause.CLOSED if sendable(code) else Cause.CLOSED_UNSENDABLE
        case Refused(status=status):
            return REFUSALS.get(status, Cause.REFUSED)
        case _:
            return _CAUSES[type(event)]


# --- the relay -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CloseFrame:
    """Close a side with ``code`` and ``reason`` (at most 123 UTF-8 bytes)."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Ending:
    """How a session ended, and how each side is closed. A side that closed itself is
    given its own close (closing it again does nothing; the log shows it)."""

    cause: Cause
    side: Side | None  # the side it happened to; None: the daemon
    app: CloseFrame | None  # None: cut, and the cutter did not say how
    upstream: CloseFrame | None  # None: there is no upstream session to close
    deliver: bool  # first let what ``side`` sent before its end reach the other side


class Relay:
    """One realtime session's ending: fed what happens, it says how each side is closed.

    ``secret`` is the key the upstream session was opened with: an upstream close reason
    that quotes it is withheld from the app (``fingerprint`` names the key instead).
    """

    def __init__(
        self,
        *,
        max_message_bytes: int,
        ping_timeout_s: float,
        message_timeout_s: float,
        secret: str = "",
        fingerprint: str = "",
    ) -> None:
        self._max_message_bytes = max_message_bytes
        self._limits = {
            "max_message_bytes": max_message_bytes,
            "ping_timeout_s": ping_timeout_s,
            "message_timeout_s": message_timeout_s,
        }
        self._secret = secret
        self._fingerprint = fingerprint
        self._state = State.CONNECTING
        self._ending: Ending | None = None

    def use_key(self, secret: str, fingerprint: str) -> None:
        """The key the session is about to open with (a route's next provider's): what a
        close reason may not quote."""
        self._secret, self._fingerprint = secret, fingerprint

    @property
    def state(self) -> State:
        return self._state

    @property
    def ending(self) -> Ending | None:
        """How the session ended; None while it runs."""
        return self._ending

    def opened(self) -> None:
        """The upstream accepted the handshake: relaying starts (a no-op once ended).

        Raises:
            ValueError: not connecting (a driver bug).
        """
        if self._state is State.CONNECTING:
            self._state = State.RELAYING
        elif self._state is not State.ENDED:
            raise ValueError(f"opened while {self._state.value}")

    def handle(self, event: Event) -> Ending:
        """Take one thing that ends the session; returns the session's ending. The first
        event decides it, and every later one returns the same ending.

        Raises:
            ValueError: an event that cannot happen now (a driver bug): the handshake's
                outcome once relaying, or the upstream closing before it was opened.
        """
        if self._ending is not None:
            return self._ending
        self._check(event)
        cause = cause_of(event, max_message_bytes=self._max_message_bytes)
        row = TABLE[event.side, cause]
        values = self._values(event)
        relaying = self._state is State.RELAYING
        code = event.code if isinstance(event, Closed | Cut) else None
        self._ending = Ending(
            cause=cause,
            side=event.side,
            app=_frame(row.app, code, values),
            upstream=_frame(row.upstream, code, values) if relaying else None,
            deliver=row.deliver and relaying,
        )
        self._state = State.ENDED
        return self._ending

    def _check(self, event: Event) -> None:
        if isinstance(event, Refused | Unreachable):
            allowed = self._state is State.CONNECTING
        else:
            allowed = self._state is State.RELAYING or event.side is not Side.UPSTREAM
        if not allowed:
            raise ValueError(f"{type(event).__name__} while {self._state.value}")

    def _values(self, event: Event) -> dict[str, object]:
        """What a reply's template may name."""
        values: dict[str, object] = {f.name: getattr(event, f.name) for f in fields(event)}
        values.update(self._limits)
        reason = values.get("reason")
        if event.side is Side.UPSTREAM and isinstance(reason, str) and self._quotes(reason):
            values["reason"] = f"(the upstream's reason quoted key {self._fingerprint}: withheld)"
        return values

    def _quotes(self, text: str) -> bool:
        """Does ``text`` hold the key, or any piece of it ``_KEY_RUN`` characters long?"""
        secret = self._secret
        if not secret:
            return False
        if len(secret) <= _KEY_RUN:
            return secret in text
        return any(secret[i : i + _KEY_RUN] in text for i in range(len(secret) - _KEY_RUN + 1))


# A run of this many characters of a key in a text counts as quoting it: a close reason
# (123 bytes at most) always cuts a real key short.
_KEY_RUN = 8


def _frame(
    reply: Reply | None, code: int | None, values: Mapping[str, object]
) -> CloseFrame | None:
    """``reply`` made concrete for one event (``code``: the event's, if it has one); None
    when there is no reply, or it passes on a code the event does not have."""
    if reply is None:
        return None
    chosen = code if reply.code is None else reply.code
    if chosen is None:
        return None
    return CloseFrame(int(chosen), close_reason(reply.reason.format_map(values)))
