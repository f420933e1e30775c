"""The realtime relay's ending table (CONTRACT.md 3.2, 3.4): feed events, compare the close
frames each side gets, as wsproto tests its close codes. Sync: no trio, no sockets.

3.2's rows "peer not allowed" (1008) and "over a connection limit, rate limited, draining"
(1013) refuse a session before it starts: they are the error classes' (tests/test_errors.py,
end to end in tests/dataplane/test_realtime.py), not the relay's."""

from __future__ import annotations

import pytest

from openclawd.errors import UnfinishedMessageError
from openclawd.protocol.closecodes import MAX_REASON_BYTES, CloseCode, handshake_refusal
from openclawd.protocol.relay import (
    AS_CLOSED,
    TABLE,
    Cause,
    Closed,
    CloseFrame,
    Cut,
    Ending,
    Event,
    Failed,
    Refused,
    Relay,
    Side,
    Silent,
    State,
    TooBig,
    Unfinished,
    Unreachable,
    cause_of,
)

APP, UP = Side.APP, Side.UPSTREAM
KEY = "sk-rt-0001-abcdefghijkl"
FINGERPRINT = "sha256:1a2b3c4d5e6f"
BYE = (1001, "openclawd ended the session")


def make_relay(*, opened: bool = True) -> Relay:
    relay = Relay(
        max_message_bytes=1024,
        ping_timeout_s=0.3,
        message_timeout_s=30,
        secret=KEY,
        fingerprint=FINGERPRINT,
    )
    if opened:
        relay.opened()
    return relay


Frame = tuple[int, str] | None


def frames(ending: Ending) -> tuple[Frame, Frame]:
    """(app, upstream) as (code, reason) pairs, None where nothing is sent."""
    app, up = ending.app, ending.upstream
    return (
        None if app is None else (app.code, app.reason),
        None if up is None else (up.code, up.reason),
    )


# Each row of CONTRACT.md 3.2's table (and its "the upstream's close code and reason are
# passed on"), cited in the id, with every way the relay produces it: the event, whether the
# upstream was open, then what the app and the upstream are sent.
CONTRACT_ROWS = [
    # | 1000 | normal end |
    pytest.param(Closed(APP, 1000, "done"), True, (1000, "done"), (1000, "done"), id="1000-app"),
    pytest.param(Closed(UP, 1000, "done"), True, (1000, "done"), (1000, "done"), id="1000-up"),
    pytest.param(Closed(UP, 1005), True, (1000, ""), (1005, ""), id="1000-up-no-code"),
    pytest.param(Closed(APP, 1005), True, (1005, ""), (1000, ""), id="1000-app-no-code"),
    # | 1001 | the operator's drain reached its deadline |
    # A cut, with the close the cutter chose (local/server.py's Cutter, daemon.py's).
    pytest.param(
        Cut(1001, "drain deadline reached"),
        True,
        (1001, "drain deadline reached"),
        BYE,
        id="1001-drain-deadline",
    ),
    # | 1008 | peer not allowed; upstream refused the key (401/403) |
    pytest.param(Refused(401, "upstream 401"), False, (1008, "upstream 401"), None, id="1008-401"),
    pytest.param(Refused(403, "upstream 403"), False, (1008, "upstream 403"), None, id="1008-403"),
    # (1008 is also 3.4's message left unfinished for message_timeout_s.)
    pytest.param(
        Unfinished(APP),
        True,
        (1008, "message not finished within 30s"),
        (1001, "the app left a message unfinished"),
        id="1008-unfinished",
    ),
    # | 1009 | a message over `max_message_bytes` |
    pytest.param(
        TooBig(APP),
        True,
        (1009, "Exceeded maximum message size: 1024 bytes"),
        (1009, "Exceeded maximum message size: 1024 bytes"),
        id="1009-app",
    ),
    pytest.param(
        TooBig(UP),
        True,
        (1009, "upstream message over max_message_bytes (1024)"),
        (1009, "Exceeded maximum message size: 1024 bytes"),
        id="1009-up",
    ),
    # | 1011 | internal error |
    pytest.param(Failed(), True, (1011, "internal error"), BYE, id="1011-internal"),
    pytest.param(Failed(), False, (1011, "internal error"), None, id="1011-internal-connecting"),
    # (1011 is also 3.4's peer that does not answer within ping_timeout_s.)
    pytest.param(
        Silent(APP),
        True,
        (1011, "no pong within 0.3s"),
        (1001, "the app stopped answering pings"),
        id="1011-silent-app",
    ),
    # | 1012 | daemon shutting down (SIGTERM) |
    pytest.param(
        Cut(1012, "openclawd is shutting down"),
        True,
        (1012, "openclawd is shutting down"),
        BYE,
        id="1012-shutdown",
    ),
    pytest.param(
        Cut(1012, "openclawd is shutting down"),
        False,
        (1012, "openclawd is shutting down"),
        None,
        id="1012-shutdown-connecting",
    ),
    # | 1013 | over a connection limit, rate limited, draining, or upstream 429 |
    pytest.param(
        Refused(429, "upstream 429, retry after 7s"),
        False,
        (1013, "upstream 429, retry after 7s"),
        None,
        id="1013-429",
    ),
    # | 1014 | upstream unreachable, upstream handshake failed (5xx), upstream dropped |
    pytest.param(
        Unreachable("cannot connect to the upstream: refused"),
        False,
        (1014, "cannot connect to the upstream: refused"),
        None,
        id="1014-unreachable",
    ),
    pytest.param(
        Unreachable("no upstream handshake within connect_timeout_s=0.3"),
        False,
        (1014, "no upstream handshake within connect_timeout_s=0.3"),
        None,
        id="1014-handshake-timeout",
    ),
    pytest.param(Refused(500, "upstream 500"), False, (1014, "upstream 500"), None, id="1014-500"),
    pytest.param(Refused(503, "upstream 503"), False, (1014, "upstream 503"), None, id="1014-503"),
    pytest.param(Refused(404, "upstream 404"), False, (1014, "upstream 404"), None, id="1014-404"),
    pytest.param(
        Closed(UP, 1006),
        True,
        (1014, "upstream dropped the connection"),
        (1006, ""),
        id="1014-dropped",
    ),
    pytest.param(
        Silent(UP),
        True,
        (1014, "upstream stopped answering pings"),
        (1000, ""),
        id="1014-silent-up",
    ),
    pytest.param(
        Closed(UP, 1015, "tls"),
        True,
        (1014, "upstream closed with 1015"),
        (1015, "tls"),
        id="1014-unsendable",
    ),
    # The upstream's close code and reason are passed on.
    pytest.param(
        Closed(UP, 4001, "expired"), True, (4001, "expired"), (4001, "expired"), id="pass-up"
    ),
    pytest.param(
        Closed(UP, 1001, "going away"),
        True,
        (1001, "going away"),
        (1001, "going away"),
        id="pass-up-1001",
    ),
    # The app's close is passed on to the upstream the same way.
    pytest.param(Closed(APP, 4000, "bye"), True, (4000, "bye"), (4000, "bye"), id="pass-app"),
    pytest.param(
        Closed(APP, 1006), True, (1006, ""), (1001, "the app went away"), id="pass-app-dropped"
    ),
]


@pytest.mark.parametrize(("event", "opened", "app", "upstream"), CONTRACT_ROWS)
def test_contract_row(event: Event, opened: bool, app: Frame, upstream: Frame) -> None:
    relay = make_relay(opened=opened)
    ending = relay.handle(event)
    assert frames(ending) == (app, upstream)
    assert ending.side is event.side
    assert ending.cause is cause_of(event, max_message_bytes=1024)
    assert relay.state is State.ENDED
    assert relay.ending is ending


def test_every_code_of_the_contract_table_is_a_row_here() -> None:
    codes = {app[0] for *_, app, _ in (row.values for row in CONTRACT_ROWS) if app}
    assert codes >= set(CloseCode)
    daemons = {reply.code for row in TABLE.values() if (reply := row.app).code}
    assert daemons == set(CloseCode) - {CloseCode.DRAIN_DEADLINE, CloseCode.SHUTDOWN}


@pytest.mark.parametrize("status", [*range(400, 432), *range(500, 512), 301, 200])
def test_a_refusal_has_the_code_the_handshake_error_carries(status: int) -> None:
    ending = make_relay(opened=False).handle(Refused(status, f"upstream {status}"))
    assert ending.app == CloseFrame(handshake_refusal(status), f"upstream {status}")
    assert ending.upstream is None


def test_an_unfinished_message_is_the_error_class_close() -> None:
    unfinished = UnfinishedMessageError.of("message", 30)
    ending = make_relay().handle(Unfinished(APP))
    assert ending.app == CloseFrame(unfinished.close_code, str(unfinished))


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        (1000, Cause.CLOSED),
        (1001, Cause.CLOSED),
        (1011, Cause.CLOSED),
        (1014, Cause.CLOSED),
        (3000, Cause.CLOSED),
        (4999, Cause.CLOSED),
        (1005, Cause.CLOSED_WITHOUT_CODE),
        (1006, Cause.DROPPED),
        (1004, Cause.CLOSED_UNSENDABLE),
        (1015, Cause.CLOSED_UNSENDABLE),
        (2000, Cause.CLOSED_UNSENDABLE),
        (5000, Cause.CLOSED_UNSENDABLE),
    ],
)
def test_a_close_code_is_its_cause(code: int, cause: Cause) -> None:
    assert cause_of(Closed(APP, code), max_message_bytes=1024) is cause
    assert cause_of(Closed(UP, code), max_message_bytes=1024) is cause


@pytest.mark.parametrize("side", list(Side))
def test_a_close_in_the_librarys_oversize_words_is_an_oversize_message(side: Side) -> None:
    # trio-websocket closes a side whose message is over the limit itself, and then
    # reports the WebSocket closed with 1009 and these words.
    closed = Closed(side, 1009, "Exceeded maximum message size: 1024 bytes")
    assert make_relay().handle(closed) == make_relay().handle(TooBig(side))


@pytest.mark.parametrize(
    "reason",
    [
        "Exceeded maximum message size: 65536 bytes",  # the upstream's own limit
        "Exceeded maximum message size: 1024 bytes and more",
        "message too big",
        "",
    ],
)
def test_an_upstreams_own_1009_is_passed_on(reason: str) -> None:
    ending = make_relay().handle(Closed(UP, 1009, reason))
    assert ending.cause is Cause.CLOSED
    assert ending.app == CloseFrame(1009, reason)


# --- the table's shape -------------------------------------------------------------------

SIDE_CAUSES = [
    Cause.CLOSED,
    Cause.CLOSED_WITHOUT_CODE,
    Cause.CLOSED_UNSENDABLE,
    Cause.DROPPED,
    Cause.TOO_BIG,
    Cause.SILENT,
    Cause.UNFINISHED,
]
HANDSHAKE_CAUSES = [Cause.KEY_REFUSED, Cause.RATE_LIMITED, Cause.REFUSED, Cause.UNREACHABLE]


def test_the_table_has_exactly_a_row_for_each_way_to_end() -> None:
    expected = {
        *((side, cause) for side in Side for cause in SIDE_CAUSES),
        *((UP, cause) for cause in HANDSHAKE_CAUSES),
        (None, Cause.CUT),
        (None, Cause.FAILED),
    }
    assert set(TABLE) == expected


def test_only_a_close_or_a_cut_passes_its_code_on() -> None:
    # The events with a code: Closed, and Cut (the cutter's).
    closes = {Cause.CLOSED, Cause.CLOSED_WITHOUT_CODE, Cause.CLOSED_UNSENDABLE, Cause.DROPPED}
    closes.add(Cause.CUT)
    for (_, cause), row in TABLE.items():
        if AS_CLOSED in (row.app, row.upstream):
            assert cause in closes, cause


@pytest.mark.parametrize(
    ("event", "deliver"),
    [
        (Closed(APP, 1000), True),
        (Closed(UP, 4001), True),
        (Closed(UP, 1005), True),
        (Closed(UP, 1006), True),
        (Closed(APP, 1006), True),
        (TooBig(APP), True),
        (TooBig(UP), True),
        (Silent(APP), False),
        (Silent(UP), False),
        (Unfinished(APP), False),
        (Cut(), False),
        (Failed(), False),
    ],
)
def test_what_a_closing_side_sent_first_is_delivered(event: Event, deliver: bool) -> None:
    # Not for a silent side (nothing more is coming) or the daemon's own end.
    assert make_relay().handle(event).deliver is deliver


def test_frames_carry_plain_ints() -> None:
    ending = make_relay().handle(Failed())
    assert ending.app is not None
    assert ending.upstream is not None
    assert type(ending.app.code) is int
    assert type(ending.upstream.code) is int


# --- what reaches the app of an upstream's reason -------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        Closed(UP, 4000, f"bad key {KEY}"),
        Closed(UP, 4000, f"bad key {KEY[5:13]}..."),  # a piece of it is enough
        Refused(401, f"upstream 401: {KEY}"),
        Unreachable(f"cannot connect: {KEY}"),
    ],
)
def test_an_upstream_reason_quoting_the_key_is_withheld(event: Event) -> None:
    ending = make_relay(opened=isinstance(event, Closed)).handle(event)
    assert ending.app is not None
    assert ending.app.reason == f"(the upstream's reason quoted key {FINGERPRINT}: withheld)"


def test_an_upstream_reason_without_the_key_is_kept() -> None:
    ending = make_relay().handle(Closed(UP, 4000, f"bad key {KEY[:7]}"))  # 7 < a piece
    assert ending.app == CloseFrame(4000, f"bad key {KEY[:7]}")


def test_without_a_key_nothing_is_withheld() -> None:
    relay = Relay(max_message_bytes=1024, ping_timeout_s=1, message_timeout_s=1)
    relay.opened()
    assert relay.handle(Closed(UP, 4000, "expired")).app == CloseFrame(4000, "expired")


def test_a_long_reason_is_cut_to_fit_a_close_frame() -> None:
    ending = make_relay(opened=False).handle(Unreachable("upstream TLS handshake failed: " * 9))
    assert ending.app is not None
    assert len(ending.app.reason.encode()) == MAX_REASON_BYTES


# --- edge order ------------------------------------------------------------------------------


def test_both_sides_closing_at_once_the_first_reported_decides() -> None:
    relay = make_relay()
    first = relay.handle(Closed(UP, 4001, "expired"))
    assert relay.handle(Closed(APP, 1000, "done")) is first
    assert frames(first) == ((4001, "expired"), (4001, "expired"))


def test_the_other_order_decides_the_other_way() -> None:
    relay = make_relay()
    first = relay.handle(Closed(APP, 1000, "done"))
    assert relay.handle(Closed(UP, 4001, "expired")) is first
    assert frames(first) == ((1000, "done"), (1000, "done"))


@pytest.mark.parametrize(
    "later",
    [Silent(UP), Silent(APP), Unfinished(APP), TooBig(UP), Closed(UP, 1006), Cut(), Failed()],
)
def test_nothing_after_the_ending_changes_it(later: Event) -> None:
    # The driver reports a cut on its way out whatever happened; a side may go silent
    # while what the closed side sent is still being delivered.
    relay = make_relay()
    ending = relay.handle(Closed(APP, 1000, "done"))
    assert relay.handle(later) is ending
    assert relay.state is State.ENDED


def test_a_silence_before_a_close_decides() -> None:
    relay = make_relay()
    ending = relay.handle(Silent(UP))
    assert relay.handle(Closed(UP, 1006)) is ending
    assert ending.cause is Cause.SILENT


def test_a_cut_whose_cutter_did_not_say_leaves_the_app_to_it() -> None:
    assert frames(make_relay().handle(Cut())) == (None, BYE)


def test_a_cut_while_connecting_has_no_upstream_to_close() -> None:
    ending = make_relay(opened=False).handle(Cut())
    assert frames(ending) == (None, None)
    assert ending.side is None


def test_an_app_gone_while_connecting_has_no_upstream_to_tell() -> None:
    ending = make_relay(opened=False).handle(Closed(APP, 1001, "going away"))
    assert frames(ending) == ((1001, "going away"), None)
    assert not ending.deliver


def test_opened_after_the_ending_is_a_no_op() -> None:
    relay = make_relay(opened=False)
    ending = relay.handle(Cut())
    relay.opened()
    assert relay.state is State.ENDED
    assert relay.ending is ending


def test_states() -> None:
    relay = make_relay(opened=False)
    seen = [(relay.state, relay.ending)]
    relay.opened()
    seen.append((relay.state, relay.ending))
    ending = relay.handle(Closed(APP, 1000))
    seen.append((relay.state, relay.ending))
    assert seen == [(State.CONNECTING, None), (State.RELAYING, None), (State.ENDED, ending)]


@pytest.mark.parametrize(
    ("opened", "event"),
    [
        (True, Refused(401, "upstream 401")),
        (True, Unreachable("cannot connect")),
        (False, Closed(UP, 1000)),
        (False, TooBig(UP)),
        (False, Silent(UP)),
        (False, Unfinished(UP)),
    ],
)
def test_an_event_that_cannot_happen_now_is_a_driver_bug(opened: bool, event: Event) -> None:
    relay = make_relay(opened=opened)
    with pytest.raises(ValueError, match=type(event).__name__):
        relay.handle(event)
    assert relay.ending is None


def test_opened_twice_is_a_driver_bug() -> None:
    relay = make_relay()
    with pytest.raises(ValueError, match="opened while relaying"):
        relay.opened()


def test_side_other() -> None:
    assert APP.other is UP
    assert UP.other is APP


def test_the_relay_does_not_show_its_key() -> None:
    assert KEY not in repr(make_relay())
