"""One request's life (protocol/exchange.py): admission and the ending, sans-IO, in h11's
style: drive the object through each order of events and assert what it decided."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from openclawd.errors import (
    DrainingError,
    OpenclawdError,
    RateLimitedError,
    UpstreamError,
    UpstreamTimeoutError,
)
from openclawd.protocol.exchange import Admission, Ending, Exchange
from openclawd.protocol.ratelimit import RateLimiter


@dataclass
class Daemon:
    draining: bool = False
    stopping: bool = False


# --- admission ------------------------------------------------------------------------------


def test_admission_lets_requests_through_while_serving() -> None:
    admission = Admission(Daemon(), [RateLimiter(0)])
    for now in range(100):
        admission.admit(1000, float(now))


@pytest.mark.parametrize("state", [Daemon(draining=True), Daemon(stopping=True)])
def test_admission_refuses_everything_during_a_drain(state: Daemon) -> None:
    admission = Admission(state, [RateLimiter(0)])
    with pytest.raises(DrainingError) as caught:
        admission.admit(1000, 0.0)
    assert (caught.value.code, caught.value.http_status, caught.value.close_code) == (
        "draining",
        503,
        1013,
    )


def test_a_drain_refuses_before_a_limit_is_spent() -> None:
    limiter = RateLimiter(1)
    daemon = Daemon(draining=True)
    admission = Admission(daemon, [limiter])
    with pytest.raises(DrainingError):
        admission.admit(1000, 0.0)
    daemon.draining = False
    admission.admit(1000, 0.0)  # the one request of the minute was not spent by the refusal
    with pytest.raises(RateLimitedError) as caught:
        admission.admit(1000, 0.0)
    assert caught.value.retry_after_s == 60.0


def test_every_limit_is_asked_in_order() -> None:
    asked: list[str] = []

    class Limit:
        def __init__(self, name: str, refuse: bool) -> None:
            self.name, self.refuse = name, refuse

        def check(self, uid: int, now: float) -> RateLimitedError | None:
            asked.append(self.name)
            return RateLimitedError(self.name, retry_after_s=1.0) if self.refuse else None

    admission = Admission(Daemon(), [Limit("a", False), Limit("b", True), Limit("c", False)])
    with pytest.raises(RateLimitedError, match="^b$"):
        admission.admit(7, 0.0)
    assert asked == ["a", "b"]


# --- the ending -----------------------------------------------------------------------------


def test_a_request_answered_to_its_end_is_finished() -> None:
    exchange = Exchange(answers_after_head=False)
    assert (exchange.ended, exchange.head_sent) == (False, False)
    exchange.responded(200)
    exchange.sent(10)
    exchange.sent(5)
    exchange.finished()
    assert (exchange.ending, exchange.logged_status(), exchange.body_bytes) == (
        Ending.FINISHED,
        200,
        15,
    )


@pytest.mark.parametrize("answers_after_head", [True, False])
def test_an_error_before_the_head_is_told_to_the_app(answers_after_head: bool) -> None:
    exchange = Exchange(answers_after_head=answers_after_head)
    error = UpstreamTimeoutError("upstream read timeout")
    assert exchange.fail(error) is True
    assert not exchange.ended  # not until the answer is out
    exchange.answered(504, 80)
    assert (exchange.ending, exchange.error, exchange.logged_status()) == (
        Ending.FAILED,
        error,
        504,
    )
    assert exchange.body_bytes == 80


def test_on_http_an_error_after_the_head_cuts_the_answer() -> None:
    exchange = Exchange(answers_after_head=False)
    exchange.responded(200)
    exchange.sent(3)
    error = UpstreamError("dropped")
    assert exchange.fail(error) is False
    assert (exchange.ending, exchange.error, exchange.logged_status()) == (
        Ending.FAILED,
        error,
        200,
    )


def test_on_the_channel_an_error_after_the_head_is_still_told() -> None:
    exchange = Exchange(answers_after_head=True)
    exchange.responded(200)
    assert exchange.fail(UpstreamError("dropped")) is True
    exchange.answered()
    assert exchange.ending is Ending.FAILED


def test_an_error_after_the_end_is_only_kept() -> None:
    exchange = Exchange(answers_after_head=True)
    exchange.responded(200)
    exchange.finished()
    late = UpstreamTimeoutError("total deadline")
    assert exchange.fail(late) is False
    assert (exchange.ending, exchange.error, exchange.late_error) == (Ending.FINISHED, None, late)


def test_a_cancel_is_told_once_and_never_after_the_end() -> None:
    exchange = Exchange(answers_after_head=True)
    assert exchange.cancelled() is True
    assert exchange.ending is Ending.CANCELLED
    assert exchange.cancelled() is False
    exchange.finished()  # the cancelled frame is the last: the ending stays
    assert exchange.ending is Ending.CANCELLED
    done = Exchange(answers_after_head=True)
    done.finished()
    assert done.cancelled() is False
    assert done.ending is Ending.FINISHED


@pytest.mark.parametrize(
    ("cut", "ending", "status"), [(False, Ending.APP_GONE, "app gone"), (True, Ending.CUT, "cut")]
)
def test_a_request_left_behind(cut: bool, ending: Ending, status: str) -> None:
    exchange = Exchange(answers_after_head=False)
    exchange.left("drain deadline reached" if cut else "app gone", cut=cut)
    assert (exchange.ending, exchange.logged_status()) == (ending, status)


def test_leaving_after_the_end_changes_nothing() -> None:
    exchange = Exchange(answers_after_head=False)
    exchange.responded(201)
    exchange.finished()
    exchange.left("app gone")
    exchange.left("cut", cut=True)
    assert (exchange.ending, exchange.logged_status(), exchange.reason) == (
        Ending.FINISHED,
        201,
        None,
    )


def test_the_app_leaving_mid_answer_logs_as_app_gone_with_what_it_got() -> None:
    exchange = Exchange(answers_after_head=False)
    exchange.responded(200)
    exchange.sent(31)
    exchange.left("app gone")
    assert (exchange.logged_status(), exchange.body_bytes) == ("app gone", 31)


def test_a_cut_after_the_head_logs_the_status_sent() -> None:
    exchange = Exchange(answers_after_head=False)
    exchange.responded(200)
    exchange.left("drain deadline reached", cut=True)
    assert (exchange.ending, exchange.logged_status()) == (Ending.CUT, 200)


def test_an_error_whose_answer_never_went_out_logs_as_error() -> None:
    exchange = Exchange(answers_after_head=False)
    assert exchange.fail(OpenclawdError("internal error"))
    exchange.left("cut", cut=True)
    assert exchange.logged_status() == "error"


# --- admission with clients and token limits (CONTRACT.md 5.1-5.3) ----------------------------


def test_the_per_uid_rate_is_for_clients_without_limits_of_their_own() -> None:
    from openclawd.config import ClientConfig
    from openclawd.protocol.exchange import Ask
    from openclawd.protocol.limits import Limits

    limited = ClientConfig(name="billing", uids=(1,), requests_per_minute=100)
    plain = ClientConfig(name="ops", uids=(2,))
    limits = Limits({"billing": {"requests_per_minute": 100}, "ops": {}}, {}, now=0.0)
    admission = Admission(Daemon(), [RateLimiter(1)], limits)
    for _ in range(5):
        admission.admit_request(Ask(1, limited, "openai"), 0.0)  # its own 100/minute
    admission.admit_request(Ask(2, plain, "openai"), 0.0)
    with pytest.raises(RateLimitedError, match="uid 2"):
        admission.admit_request(Ask(2, plain, "openai"), 0.0)


def test_admission_checks_the_clients_lists_before_spending_anything() -> None:
    from openclawd.config import ClientConfig
    from openclawd.errors import ForbiddenError
    from openclawd.protocol.exchange import Ask
    from openclawd.protocol.limits import Limits

    client = ClientConfig(name="billing", uids=(1,), providers=("openai",), tokens_per_minute=10)
    limits = Limits({"billing": {"tokens_per_minute": 10}}, {}, now=0.0)
    admission = Admission(Daemon(), [], limits)
    with pytest.raises(ForbiddenError):
        admission.admit_request(Ask(1, client, "anthropic", tokens=10), 0.0)
    charge = admission.admit_request(Ask(1, client, "openai", tokens=10), 0.0)
    assert charge is not None
    assert charge.tokens == 10


def test_an_exchange_settles_its_charge_by_how_it_ended() -> None:
    from openclawd.protocol.limits import Limits

    limits = Limits({"c": {"tokens_per_minute": 1000}}, {}, now=0.0)
    answered = Exchange(answers_after_head=True)
    answered.charge = limits.admit("c", None, 500, now=0.0, day=0, into_day=0.0)
    answered.responded(200)
    answered.usage = {"prompt_tokens": 40, "completion_tokens": 2}
    answered.finished()
    answered.settle(0.0, 0)
    never = Exchange(answers_after_head=True)
    never.charge = limits.admit("c", None, 300, now=0.0, day=0, into_day=0.0)
    never.fail(UpstreamError("refused"))
    never.settle(0.0, 0)
    assert limits.snapshot(0.0, 0)["clients"]["c"]["tokens_per_minute"]["used"] == 42
