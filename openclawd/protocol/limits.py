"""Token control's arithmetic: per-minute buckets, daily budgets, and what a request is
charged (CONTRACT.md 5.1-5.3, 5.5). Sans-IO: ``now`` (trio's clock, for the buckets) and
``day`` (the UTC day's number, for the budgets) are passed in; nothing here reads a clock,
a socket or a file.

A per-minute limit of N is a bucket of N refilled continuously (N/60 a second). A request
is admitted only if every limit over it has room, and then takes from all of them at once
(``Limits.admit``): a request count of 1 and its tokens, charged before it is sent (an
estimate: the prompt's bytes / 4 and the completion's allowance). The ``Charge`` it gets is
settled when the request ends: corrected to the usage the upstream reported, kept if none
was reported, refunded whole if the upstream never answered. The estimate, and what a
usage counts, are ``protocol/usage.py``'s.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from openclawd.config import ClientConfig, Config, ProviderLimits
from openclawd.errors import BudgetExhaustedError, ForbiddenError, RateLimitedError
from openclawd.protocol.meters import Allowance, Bucket, DayBudget
from openclawd.protocol.usage import token_counts

__all__ = [
    "Bucket",
    "check_allowed",
    "client_figures",
    "has_limits",
    "provider_figures",
    "Charge",
    "DayBudget",
    "Limit",
    "Limits",
    "Scope",
    "Tally",
    "utc_day",
]

_SECONDS_PER_DAY = 86_400.0


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose limit: a client's or a provider's, by name."""

    kind: str  # "client" | "provider"
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


@dataclass(slots=True)
class Limit:
    """One limit of a scope: ``name`` is ``requests_per_minute``, ``tokens_per_minute`` or
    ``tokens_per_day``."""

    scope: Scope
    name: str
    meter: Bucket | DayBudget | Allowance
    figure: int = 0  # the configured limit (a local fallback's share is a part of it)

    @property
    def key(self) -> str:
        """The limit's name in the fleet's engine: ``client:billing:tokens_per_minute``."""
        return f"{self.scope.kind}:{self.scope.name}:{self.name}"

    @property
    def per_day(self) -> bool:
        return self.name == "tokens_per_day"

    @property
    def counts_tokens(self) -> bool:
        return self.name != "requests_per_minute"

    def wait_for(self, amount: int, now: float, day: int, into_day: float) -> float | None:
        if isinstance(self.meter, DayBudget):
            return self.meter.wait_for(amount, day, into_day)
        return self.meter.wait_for(amount, now)

    def take(self, amount: int, now: float, day: int) -> None:
        if isinstance(self.meter, DayBudget):
            self.meter.take(amount, day)
        else:
            self.meter.take(amount, now)

    def give(self, amount: int, now: float, day: int) -> None:
        if isinstance(self.meter, DayBudget):
            self.meter.give(amount, day)
        else:
            self.meter.give(amount, now)

    def used(self, now: float, day: int) -> int:
        if isinstance(self.meter, DayBudget):
            return self.meter.used(day)
        return self.meter.used(now)

    def refusal(self, retry_after_s: float) -> RateLimitedError:
        """The error a request over this limit gets (its message names the scope and the
        limit, never anything the app sent)."""
        message = f"{self.scope}: {self.name} {self.meter.limit} reached"
        retry = math.ceil(retry_after_s * 1000) / 1000
        if self.per_day:
            return BudgetExhaustedError(message, retry_after_s=retry)
        return RateLimitedError(message, retry_after_s=retry)


@dataclass(slots=True)
class Tally:
    """What token control counted, for the metrics: requests and tokens by client and
    provider, refusals by scope and limit. Counters only go up."""

    requests: Counter[tuple[str, str, str]] = field(
        default_factory=Counter
    )  # client, provider, status
    tokens: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # client, provider, kind
    refusals: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # scope, name, limit


@dataclass(slots=True)
class Charge:
    """What one admitted request took; settle it once, when the request ends."""

    tokens: int  # the estimate charged to every token limit
    limits: list[Limit] = field(default_factory=list)
    settled: bool = False
    client: str = ""
    provider: str = ""
    tally: Tally | None = None

    def join(self, other: Charge) -> None:
        """Take ``other`` (the same request's charge on the provider a route chose) in:
        settled together, accounted to its provider."""
        self.limits.extend(other.limits)
        self.provider = other.provider

    def leave(self, other: Charge, now: float, day: int) -> None:
        """Give ``other`` back and take it out (the route moved on to its next provider)."""
        other.refund(now, day)
        self.limits = [lim for lim in self.limits if lim not in other.limits]

    def account(self, status: str, usage: Any) -> None:
        """Count the request's end in the tally: its status and the tokens it reported."""
        if self.tally is None:
            return
        self.tally.requests[(self.client, self.provider, status)] += 1
        for kind, count in token_counts(usage).items():
            self.tally.tokens[(self.client, self.provider, kind)] += count

    def settle(self, used_tokens: int | None, now: float, day: int) -> None:
        """The request ended with the upstream's answer: correct the token limits to
        ``used_tokens`` (None: no usage reported, the estimate stands)."""
        if self.settled:
            return
        self.settled = True
        if used_tokens is None:
            return
        delta = used_tokens - self.tokens
        for limit in self.limits:
            if limit.counts_tokens and delta > 0:
                limit.take(delta, now, day)
            elif limit.counts_tokens and delta < 0:
                limit.give(-delta, now, day)

    def refund(self, now: float, day: int) -> None:
        """The request was cancelled or refused before the upstream answered: everything
        it took is given back."""
        if self.settled:
            return
        self.settled = True
        for limit in self.limits:
            limit.give(self.tokens if limit.counts_tokens else 1, now, day)


class Limits:
    """Every limit of the clients and providers, built from their configured figures
    (``{"requests_per_minute": N, "tokens_per_minute": N, "tokens_per_day": N}``, 0 or
    absent: no such limit)."""

    def __init__(
        self,
        clients: Mapping[str, Mapping[str, int]],
        providers: Mapping[str, Mapping[str, int]],
        now: float,
        *,
        lease_tick_s: float | None = None,
    ) -> None:
        """``lease_tick_s``: the limits are the fleet's (CONTRACT.md 5.6), each an
        ``Allowance`` a lease keeper tops up that often; None: this daemon's alone."""
        self.clients: dict[str, list[Limit]] = {}
        self.providers: dict[str, list[Limit]] = {}
        self.tally = Tally()
        self.lease_tick_s = lease_tick_s
        self.configure(clients, providers, now)

    @classmethod
    def of(cls, config: Config, *, now: float, lease_tick_s: float | None = None) -> Limits:
        """Every client's and provider's limit in ``config``."""
        return cls(*_figures_of(config), now=now, lease_tick_s=lease_tick_s)

    def all(self) -> list[Limit]:
        """Every limit, clients' then providers'."""
        return [
            lim for group in (*self.clients.values(), *self.providers.values()) for lim in group
        ]

    def configure_from(self, config: Config, *, now: float) -> None:
        """``configure`` from a reloaded ``config``."""
        self.configure(*_figures_of(config), now=now)

    def configure(
        self,
        clients: Mapping[str, Mapping[str, int]],
        providers: Mapping[str, Mapping[str, int]],
        now: float,
    ) -> None:
        """Take reloaded figures: a limit whose figure is unchanged keeps what it has
        counted; a new or changed one starts full."""
        tick = self.lease_tick_s
        self.clients = _reconfigured(self.clients, "client", clients, now, tick)
        self.providers = _reconfigured(self.providers, "provider", providers, now, tick)

    @property
    def counts_tokens(self) -> bool:
        """Does any limit count tokens? (Else a request's tokens need no estimate.)"""
        return any(
            lim.counts_tokens
            for group in (*self.clients.values(), *self.providers.values())
            for lim in group
        )

    def over(self, client: str | None, provider: str | None) -> list[Limit]:
        """The limits a request of ``client`` to ``provider`` is under."""
        found = list(self.clients.get(client or "", ()))
        found.extend(self.providers.get(provider or "", ()))
        return found

    def admit(
        self,
        client: str | None,
        provider: str | None,
        tokens: int,
        *,
        now: float,
        day: int,
        into_day: float,
        count_refusal: bool = True,
    ) -> Charge:
        """Take one request and ``tokens`` from every limit over it, or none of them.
        ``count_refusal``: a refusal counts in the tally (False: the caller will try once
        more, and count the last).

        Raises:
            RateLimitedError: a per-minute limit has no room (``retry_after_s`` says when).
            BudgetExhaustedError: a daily budget is spent.
        """
        limits = self.over(client, provider)
        waits = [
            (wait, limit)
            for limit in limits
            if (wait := limit.wait_for(tokens if limit.counts_tokens else 1, now, day, into_day))
            is not None
        ]
        if waits:
            wait, limit = max(waits, key=lambda pair: pair[0])
            if count_refusal:
                self.tally.refusals[(limit.scope.kind, limit.scope.name, limit.name)] += 1
            raise limit.refusal(wait)
        for limit in limits:
            limit.take(tokens if limit.counts_tokens else 1, now, day)
        return Charge(
            tokens, limits, client=client or "", provider=provider or "", tally=self.tally
        )

    def snapshot(self, now: float, day: int) -> dict[str, dict[str, dict[str, dict[str, int]]]]:
        """``{"clients": {NAME: {LIMIT: {"limit": N, "used": N}}}, "providers": ...}``:
        only the limits that are set (``GET /v1/limits``)."""

        def table(groups: Mapping[str, list[Limit]]) -> dict[str, dict[str, dict[str, int]]]:
            return {
                name: {
                    lim.name: {"limit": lim.meter.limit, "used": lim.used(now, day)}
                    for lim in limits
                }
                for name, limits in groups.items()
            }

        return {"clients": table(self.clients), "providers": table(self.providers)}


def _reconfigured(
    before: Mapping[str, list[Limit]],
    kind: str,
    figures: Mapping[str, Mapping[str, int]],
    now: float,
    tick: float | None,
) -> dict[str, list[Limit]]:
    kept = {
        (lim.scope.name, lim.name, lim.figure): lim for group in before.values() for lim in group
    }
    return {
        name: [
            kept.get((name, lim.name, lim.figure), lim)
            for lim in _limits(Scope(kind, name), values, now, tick)
        ]
        for name, values in figures.items()
    }


def _limits(
    scope: Scope, figures: Mapping[str, int], now: float, tick: float | None
) -> list[Limit]:
    found: list[Limit] = []
    for name in ("requests_per_minute", "tokens_per_minute", "tokens_per_day"):
        figure = figures.get(name, 0)
        if figure <= 0:
            continue
        meter: Bucket | DayBudget | Allowance
        if tick is not None:
            meter = Allowance(figure, tick)
        elif name == "tokens_per_day":
            meter = DayBudget(figure)
        else:
            meter = Bucket(figure, now)
        found.append(Limit(scope, name, meter, figure))
    return found


def utc_day(wall: float) -> tuple[int, float]:
    """The UTC day of the wall-clock time ``wall`` (seconds since the epoch): its number,
    and the seconds into it."""
    day, into = divmod(wall, _SECONDS_PER_DAY)
    return int(day), into


def check_allowed(client: ClientConfig, provider: str, model: object) -> None:
    """Raise unless ``client`` may use ``provider`` (a provider or a route) with this body
    ``model`` (None: the body names none).

    Raises:
        ForbiddenError: the provider or route, or the model, is outside the client's lists
            (the app's values are not repeated: they may hold what should not be echoed).
    """
    if client.providers and provider not in client.providers:
        raise ForbiddenError(f"client {client.name} may not use this provider or route")
    if client.models and model is not None and model not in client.models:
        raise ForbiddenError(f"client {client.name} may not use this model")


def has_limits(client: ClientConfig) -> bool:
    """Does the client have limits of its own? (Else ``[limits] requests_per_minute``
    applies to it per uid.)"""
    return bool(client.requests_per_minute or client.tokens_per_minute or client.tokens_per_day)


def client_figures(client: ClientConfig) -> dict[str, int]:
    """The client's limits, as ``protocol.limits.Limits`` takes them."""
    return {
        "requests_per_minute": client.requests_per_minute,
        "tokens_per_minute": client.tokens_per_minute,
        "tokens_per_day": client.tokens_per_day,
    }


def provider_figures(limits: ProviderLimits) -> dict[str, int]:
    """A provider's limits, as ``Limits`` takes them."""
    return {
        "requests_per_minute": limits.requests_per_minute,
        "tokens_per_minute": limits.tokens_per_minute,
    }


def _figures_of(config: Config) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    clients = {name: client_figures(client) for name, client in config.clients.items()}
    providers = {name: provider_figures(p.limits) for name, p in config.providers.items()}
    return clients, providers
