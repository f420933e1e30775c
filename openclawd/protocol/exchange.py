"""One request's life on the data socket, from admission to its ending (sans-IO).

Every request (a ``/v1/ws`` request, a ``/v1/http`` exchange, the start of a realtime
session) passes the same ``Admission``: the daemon's drain, then the limits (today the
per-uid request rate; token control plugs in here). An admitted request is an
``Exchange``: the driver tells it what happened on the wire (the head went out, body
bytes went out, the end went out, an error, the app's cancel, the app leaving, the daemon's
cut) and it decides how the request ended, once, whatever order those come in, and what
the app is still owed, and how what admission charged it is settled (corrected to the
usage reported, or refunded). After h11's ``Connection``: no sockets, tasks or clock;
``now`` is passed in. The drivers only move bytes.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from openclawd.config import ClientConfig
from openclawd.errors import DrainingError, ForbiddenError, OpenclawdError, RateLimitedError
from openclawd.protocol.limits import Charge, Limits, check_allowed, has_limits
from openclawd.protocol.usage import used_tokens

__all__ = ["Admission", "Ask", "Ending", "Exchange"]


class DaemonState(Protocol):
    """What admission needs of the daemon's lifecycle."""

    @property
    def draining(self) -> bool: ...

    @property
    def stopping(self) -> bool: ...


class Limit(Protocol):
    """A limit admission checks: None to let the request through, else the refusal."""

    def check(self, uid: int, now: float) -> RateLimitedError | None: ...


@dataclass(frozen=True, slots=True)
class Ask:
    """One request asking to start: who (the peer's uid, its client), where (a provider or
    a route), with which body ``model`` (None: none) and how many tokens (the estimate).
    ``day`` and ``into_day`` are the UTC day's number and the seconds into it."""

    uid: int
    client: ClientConfig | None = None
    provider: str | None = None
    model: object = None
    tokens: int = 0
    day: int = 0
    into_day: float = 0.0


class Admission:
    """Whether a new request may start now; shared by every entry point.

    Args:
        per_uid: limits per peer uid (``[limits] requests_per_minute``); they apply to a
            client without limits of its own.
        limits: the clients' and providers' limits (token control), if any are set.
    """

    def __init__(
        self, daemon: DaemonState, per_uid: list[Limit], limits: Limits | None = None
    ) -> None:
        self.daemon = daemon
        self.per_uid = per_uid
        self.limits = limits
        # In a fleet: a round of leases out of turn (shared/leases.py ``top_up``); it
        # returns False at once when nothing would come of it.
        self.top_up: Callable[[], Awaitable[bool]] | None = None

    def admit(self, uid: int, now: float) -> None:
        """``admit_request`` for a request known only by its peer's uid."""
        self.admit_request(Ask(uid), now)

    def admit_request(self, ask: Ask, now: float) -> Charge | None:
        """Let one request through, taking its share of every limit over it; returns what
        it took (settle it at the request's end), or None if no token limit is set.

        Raises:
            DrainingError: the daemon is draining or stopping.
            ForbiddenError: the client may not use the provider, route or model.
            RateLimitedError: a limit refused it (the error says until when).
            BudgetExhaustedError: a daily budget is spent.
        """
        self._gate(ask, now)
        return self._take(ask, now)

    async def admit_request_waiting(self, ask: Ask, clock: Callable[[], float]) -> Charge | None:
        """``admit_request``; but in a fleet, a request its limits refuse for want of what
        this daemon has on hand waits for a round of leases out of turn (``top_up``, at
        most half a second) and is tried once more, rather than refused while the fleet
        has room (CONTRACT.md 5.6). ``clock``: trio's current time."""
        self._gate(ask, clock())
        if self.top_up is None:
            return self._take(ask, clock())
        try:
            return self._take(ask, clock(), count_refusal=False)
        except RateLimitedError:
            if not await self.top_up():
                return self._take(ask, clock())  # (to count the refusal, the same again)
        return self._take(ask, clock())

    def _gate(self, ask: Ask, now: float) -> None:
        """What refuses a request before any limit is taken from: the drain, the
        client's lists, the per-uid rate."""
        if self.daemon.draining or self.daemon.stopping:
            raise DrainingError("openclawd is draining: send new requests elsewhere or later")
        client = ask.client
        if client is not None and ask.provider is not None:
            try:
                check_allowed(client, ask.provider, ask.model)
            except ForbiddenError:
                if self.limits is not None:
                    self.limits.tally.refusals[("client", client.name, "forbidden")] += 1
                raise
        if client is None or not has_limits(client):
            for limit in self.per_uid:
                refused = limit.check(ask.uid, now)
                if refused is not None:
                    raise refused

    def _take(self, ask: Ask, now: float, *, count_refusal: bool = True) -> Charge | None:
        if self.limits is None:
            return None
        name = ask.client.name if ask.client is not None else None
        return self.limits.admit(
            name,
            ask.provider,
            ask.tokens,
            now=now,
            day=ask.day,
            into_day=ask.into_day,
            count_refusal=count_refusal,
        )


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
        self.charge: Charge | None = None  # what admission took, settled at the end
        self.usage: Any = None  # the token usage the upstream reported, once read
        self.response_model: str | None = None  # the model the upstream's answer names

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

    def settle(self, now: float, day: int) -> None:
        """The request is over: what admission charged is corrected to ``usage`` (the
        upstream answered; None: no usage reported, the estimate stands), or refunded
        whole if the upstream never answered (cancelled or refused before it)."""
        if self.charge is None or self.charge.settled:
            return
        if self.head_sent:
            self.charge.settle(used_tokens(self.usage), now, day)
        else:
            self.charge.refund(now, day)
        self.charge.account(str(self.logged_status()), self.usage)

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


Clock = Callable[[], tuple[float, int, float]]  # now (trio's), the UTC day, seconds into it


def provider_limits(
    exchange: Exchange,
    limits: Limits | None,
    clock: Clock,
    top_up: Callable[[], Awaitable[bool]] | None = None,
) -> Callable[[str], Awaitable[Callable[[], None]]] | None:
    """For a request to a route: a function that charges the provider about to be tried
    its own limits (the request's token estimate, and one request) and joins that charge
    to the exchange's, returning what gives it back if the route moves on. None without
    limits. In a fleet, a refusal for want of what is on hand waits for ``top_up`` and
    tries once more (``Admission.admit_request_waiting``).

    The function raises the limit's refusal (``RateLimitedError``)."""
    if limits is None:
        return None

    def admit(provider: str, tokens: int, *, count_refusal: bool = True) -> Charge:
        now, day, into_day = clock()
        return limits.admit(
            None, provider, tokens, now=now, day=day, into_day=into_day, count_refusal=count_refusal
        )

    async def take(provider: str) -> Callable[[], None]:
        whole = exchange.charge
        tokens = whole.tokens if whole is not None else 0
        try:
            charge = admit(provider, tokens, count_refusal=top_up is None)
        except RateLimitedError:
            if top_up is None:
                raise
            await top_up()
            charge = admit(provider, tokens)
        if whole is None:
            whole = exchange.charge = Charge(tokens, tally=limits.tally)
        whole.join(charge)

        def give_back() -> None:
            now, day, _ = clock()
            whole.leave(charge, now, day)

        return give_back

    return take
