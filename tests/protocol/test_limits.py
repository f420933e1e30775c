"""Token control's arithmetic (protocol/limits.py), sans-IO: buckets, daily budgets,
admission that takes all or nothing, and a charge settled at the end (CONTRACT.md 5.1-5.3,
5.5)."""

from __future__ import annotations

import json

import pytest

from openclawd.errors import BudgetExhaustedError, RateLimitedError
from openclawd.protocol.limits import (
    Bucket,
    DayBudget,
    Limits,
)
from openclawd.protocol.usage import completion_allowance, estimate_tokens, used_tokens

DAY = 20_000  # a UTC day's number


# --- a per-minute bucket ---------------------------------------------------------------------


def test_a_bucket_of_n_holds_n_at_once_and_refills_n_per_minute() -> None:
    bucket = Bucket(60, now=0.0)
    for _ in range(60):
        assert bucket.wait_for(1, 0.0) is None
        bucket.take(1, 0.0)
    assert bucket.used(0.0) == 60
    assert bucket.wait_for(1, 0.0) == pytest.approx(1.0)  # one a second
    assert bucket.used(30.0) == 30
    assert bucket.wait_for(30, 30.0) is None
    assert bucket.used(1000.0) == 0  # never more than N


def test_at_most_n_plus_n_t_over_60_over_any_t_seconds() -> None:
    bucket = Bucket(120, now=0.0)
    taken = 0
    now = 0.0
    while now <= 30.0:
        while bucket.wait_for(1, now) is None:
            bucket.take(1, now)
            taken += 1
        now += 0.25
    assert taken <= 120 + 120 * 30 / 60 + 1


def test_an_amount_over_the_whole_limit_never_fits() -> None:
    """At most N at once (CONTRACT.md 5.1): not even a full bucket takes more than N."""
    bucket = Bucket(100, now=0.0)
    assert bucket.wait_for(100, 0.0) is None
    assert bucket.wait_for(101, 0.0) == pytest.approx(60.0)
    assert bucket.wait_for(500, 600.0) == pytest.approx(60.0)


def test_a_correction_may_take_a_bucket_below_zero() -> None:
    bucket = Bucket(60, now=0.0)
    bucket.take(90, 0.0)
    assert bucket.used(0.0) == 90
    assert bucket.wait_for(1, 0.0) == pytest.approx(31.0)


# --- a daily budget ----------------------------------------------------------------------------


def test_a_day_budget_refuses_past_its_limit_until_the_next_utc_day() -> None:
    budget = DayBudget(1000)
    budget.take(900, DAY)
    assert budget.wait_for(100, DAY, 3600.0) is None
    assert budget.wait_for(101, DAY, 3600.0) == pytest.approx(86_400 - 3600)
    assert budget.used(DAY) == 900
    assert budget.used(DAY + 1) == 0
    assert budget.wait_for(1000, DAY + 1, 0.0) is None


# --- admission ---------------------------------------------------------------------------------


def limits(**client: int) -> Limits:
    return Limits({"billing": client}, {"openai": {"requests_per_minute": 3}}, now=0.0)


def test_a_request_takes_from_every_limit_over_it() -> None:
    lim = limits(requests_per_minute=10, tokens_per_minute=1000, tokens_per_day=5000)
    lim.admit("billing", "openai", 300, now=0.0, day=DAY, into_day=0.0)
    snap = lim.snapshot(0.0, DAY)
    assert snap == {
        "clients": {
            "billing": {
                "requests_per_minute": {"limit": 10, "used": 1},
                "tokens_per_minute": {"limit": 1000, "used": 300},
                "tokens_per_day": {"limit": 5000, "used": 300},
            }
        },
        "providers": {"openai": {"requests_per_minute": {"limit": 3, "used": 1}}},
    }


def test_a_refused_request_takes_nothing() -> None:
    lim = limits(tokens_per_minute=1000)
    lim.admit("billing", "openai", 900, now=0.0, day=DAY, into_day=0.0)
    with pytest.raises(RateLimitedError) as caught:
        lim.admit("billing", "openai", 200, now=0.0, day=DAY, into_day=0.0)
    assert str(caught.value) == "client billing: tokens_per_minute 1000 reached"
    assert caught.value.code == "rate_limited"
    assert caught.value.retry_after_s == pytest.approx(6.0)  # 100 more at 1000/60 a second
    snap = lim.snapshot(0.0, DAY)
    assert snap["providers"]["openai"]["requests_per_minute"]["used"] == 1
    assert snap["clients"]["billing"]["tokens_per_minute"]["used"] == 900


def test_the_longest_wait_is_told_when_several_limits_refuse() -> None:
    lim = limits(requests_per_minute=1)
    lim.admit("billing", "openai", 0, now=0.0, day=DAY, into_day=0.0)
    with pytest.raises(RateLimitedError) as caught:
        lim.admit("billing", "openai", 0, now=0.0, day=DAY, into_day=0.0)
    assert caught.value.retry_after_s == pytest.approx(60.0)  # the client's 1/minute


def test_a_spent_budget_is_budget_exhausted_until_the_next_day() -> None:
    lim = limits(tokens_per_day=100)
    lim.admit("billing", None, 100, now=0.0, day=DAY, into_day=80_000.0)
    with pytest.raises(BudgetExhaustedError) as caught:
        lim.admit("billing", None, 1, now=0.0, day=DAY, into_day=80_000.0)
    assert caught.value.code == "budget_exhausted"
    assert caught.value.retry_after_s == pytest.approx(6400.0)
    assert str(caught.value) == "client billing: tokens_per_day 100 reached"
    lim.admit("billing", None, 100, now=0.0, day=DAY + 1, into_day=1.0)


def test_a_request_of_an_unlimited_client_to_an_unlimited_provider_is_free() -> None:
    lim = limits()
    for _ in range(1000):
        lim.admit("other", "anthropic", 10**6, now=0.0, day=DAY, into_day=0.0)
    assert lim.snapshot(0.0, DAY)["clients"] == {"billing": {}}


# --- the charge's settlement -------------------------------------------------------------------


def test_a_charge_is_corrected_to_the_reported_usage() -> None:
    lim = limits(tokens_per_minute=1000, tokens_per_day=10_000)
    charge = lim.admit("billing", "openai", 500, now=0.0, day=DAY, into_day=0.0)
    charge.settle(120, now=0.0, day=DAY)
    client = lim.snapshot(0.0, DAY)["clients"]["billing"]
    assert client["tokens_per_minute"]["used"] == 120
    assert client["tokens_per_day"]["used"] == 120
    assert lim.snapshot(0.0, DAY)["providers"]["openai"]["requests_per_minute"]["used"] == 1
    charge.settle(999, now=0.0, day=DAY)  # once only
    assert lim.snapshot(0.0, DAY)["clients"]["billing"]["tokens_per_day"]["used"] == 120


def test_a_charge_under_the_usage_takes_the_rest() -> None:
    lim = limits(tokens_per_minute=1000)
    charge = lim.admit("billing", None, 100, now=0.0, day=DAY, into_day=0.0)
    charge.settle(1300, now=0.0, day=DAY)
    assert lim.snapshot(0.0, DAY)["clients"]["billing"]["tokens_per_minute"]["used"] == 1300


def test_no_usage_keeps_the_estimate_and_a_refund_gives_all_back() -> None:
    lim = limits(requests_per_minute=5, tokens_per_minute=1000)
    kept = lim.admit("billing", None, 200, now=0.0, day=DAY, into_day=0.0)
    kept.settle(None, now=0.0, day=DAY)
    refunded = lim.admit("billing", None, 300, now=0.0, day=DAY, into_day=0.0)
    refunded.refund(now=0.0, day=DAY)
    refunded.refund(now=0.0, day=DAY)  # once only
    client = lim.snapshot(0.0, DAY)["clients"]["billing"]
    assert client["tokens_per_minute"]["used"] == 200
    assert client["requests_per_minute"]["used"] == 1


# --- the estimate ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "allowance"),
    [
        ({"max_completion_tokens": 7, "max_tokens": 9}, 7),
        ({"max_tokens": 9, "max_output_tokens": 11}, 9),
        ({"max_output_tokens": 11}, 11),
        ({"max_tokens": "9"}, 1024),
        ({"max_tokens": True}, 1024),
        ({"max_tokens": -1}, 1024),
        ({}, 1024),
    ],
)
def test_the_completion_allowance(body: dict[str, object], allowance: int) -> None:
    assert completion_allowance(body, 1024) == allowance
    raw = json.dumps(body).encode()
    assert estimate_tokens(raw, 1024) == -(-len(raw) // 4) + allowance


def test_a_body_that_is_not_json_is_its_bytes_and_the_default() -> None:
    assert estimate_tokens(b"x" * 9, 50) == 3 + 50
    assert estimate_tokens(b"", 50) == 50


@pytest.mark.parametrize(
    ("usage", "tokens"),
    [
        ({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}, 15),
        ({"input_tokens": 7, "output_tokens": 3}, 10),
        ({"output_tokens": 3}, 3),
        ({"prompt_tokens": "10"}, None),
        (None, None),
        ([1], None),
    ],
)
def test_used_tokens(usage: object, tokens: int | None) -> None:
    assert used_tokens(usage) == tokens


def test_a_reload_keeps_what_unchanged_limits_counted_and_starts_changed_ones_full() -> None:
    lim = Limits(
        {"billing": {"requests_per_minute": 10, "tokens_per_minute": 1000}},
        {"openai": {"requests_per_minute": 5}},
        now=0.0,
    )
    lim.admit("billing", "openai", 400, now=0.0, day=DAY, into_day=0.0)
    lim.configure(
        {"billing": {"requests_per_minute": 10, "tokens_per_minute": 2000}, "ops": {}},
        {},
        now=0.0,
    )
    snap = lim.snapshot(0.0, DAY)
    assert snap == {
        "clients": {
            "billing": {
                "requests_per_minute": {"limit": 10, "used": 1},  # unchanged: kept
                "tokens_per_minute": {"limit": 2000, "used": 0},  # changed: full
            },
            "ops": {},
        },
        "providers": {},
    }
