"""The fleet's limits as leases (shared/leases.py, CONTRACT.md 5.6), against a real Valkey:
daemons spend locally what their keepers leased from the engine, so together they never
spend more than the limit; corrections and refunds go back; an engine that does not answer
falls back as ``on_failure`` says, and leasing comes back with it."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import pytest
import trio
import trio.testing

from openclawd.config import ClientConfig
from openclawd.errors import BudgetExhaustedError, RateLimitedError
from openclawd.protocol.exchange import Admission, Ask
from openclawd.protocol.limits import Limits
from openclawd.protocol.meters import Allowance, Bucket
from openclawd.shared.engine import Engine, Period, Take, open_engine
from openclawd.shared.engine import Limit as EngineLimit
from openclawd.shared.leases import HELD_SHARE, LeaseKeeper
from openclawd.upstream.headroom import Headroom

from ..valkey import ValkeyCluster, ValkeyServer

DAY = 20_000
TICK_S = 0.05


class Serving:
    draining = False
    stopping = False


def daemon_limits(figures: dict[str, int]) -> Limits:
    return Limits({"c": figures}, {}, now=trio.current_time(), lease_tick_s=TICK_S)


@asynccontextmanager
async def engine_of(server: ValkeyServer, namespace: str) -> AsyncIterator[Engine]:
    async with open_engine(server.url, password=server.password, namespace=namespace) as engine:
        yield engine


def spend_all(limits: Limits, amount: int) -> int:
    """Admit ``amount`` at a time until refused; returns what was admitted."""
    admitted = 0
    while True:
        try:
            limits.admit("c", None, amount, now=trio.current_time(), day=DAY, into_day=0.0)
        except RateLimitedError:
            return admitted
        admitted += amount


async def test_two_daemons_never_spend_more_than_the_fleets_budget(
    shared_valkey: ValkeyServer, namespace: str
) -> None:
    async with engine_of(shared_valkey, namespace) as engine:
        fleet = [daemon_limits({"tokens_per_day": 1000}) for _ in range(2)]
        keepers = [
            LeaseKeeper(engine, lim, on_failure="local", expected_daemons=2) for lim in fleet
        ]
        admitted = [0, 0]
        idle = 0
        for _ in range(500):  # rounds of leasing and spending, until nothing moves
            for keeper in keepers:
                await keeper.tick()
            spent = [spend_all(lim, 10) for lim in fleet]
            admitted = [a + s for a, s in zip(admitted, spent, strict=True)]
            idle = 0 if any(spent) else idle + 1
            if idle == 3:  # a refusal's want is leased the next round: three is nothing
                break
        used = await engine.used(EngineLimit("client:c:tokens_per_day", 1000, Period.DAY))
        held = sum(lim.all()[0].meter.level for lim in fleet)  # type: ignore[union-attr]
    assert sum(admitted) + held == used  # every token spent was leased first
    assert used <= 1000
    assert sum(admitted) >= 1000 - 2 * 20  # and the fleet does not starve itself
    assert min(admitted) > 0  # both daemons had a share
    with pytest.raises(BudgetExhaustedError):
        fleet[0].admit("c", None, 1000, now=trio.current_time(), day=DAY, into_day=0.0)


async def test_a_correction_down_is_given_back_to_the_fleet(
    shared_valkey: ValkeyServer, namespace: str, mock_clock: trio.testing.MockClock
) -> None:
    async with engine_of(shared_valkey, namespace) as engine:
        limits = daemon_limits({"tokens_per_minute": 6000})
        keeper = LeaseKeeper(engine, limits, on_failure="local", expected_daemons=1)

        async def tick() -> None:
            mock_clock.jump(TICK_S)
            await keeper.tick()

        await tick()
        with pytest.raises(RateLimitedError):  # more than the reserve: wanted next tick
            limits.admit("c", None, 800, now=trio.current_time(), day=DAY, into_day=0.0)
        await tick()
        charge = limits.admit("c", None, 800, now=trio.current_time(), day=DAY, into_day=0.0)
        charge.settle(50, now=trio.current_time(), day=DAY)
        await tick()
        meter = limits.all()[0].meter
        assert isinstance(meter, Allowance)
        # What stays on hand is what this daemon spends in a tick, lately: a quarter of
        # the 800 of the tick before; the rest of the 750 the correction gave back is
        # the fleet's again.
        assert meter.level == 200
        assert meter.fleet_used <= 250  # held + spent; the bucket refills meanwhile
        for _ in range(40):  # no more requests: the share goes back to the fleet ...
            await tick()
        assert meter.level == 6000 * HELD_SHARE  # ... all but the daemon's split (of one)
        assert meter.fleet_used < 100


async def test_an_engine_that_does_not_answer_falls_back_and_leasing_comes_back(
    valkey: ValkeyServer, namespace: str
) -> None:
    changes: list[bool] = []
    async with engine_of(valkey, namespace) as engine:
        local = daemon_limits({"requests_per_minute": 600})
        keeper = LeaseKeeper(
            engine, local, on_failure="local", expected_daemons=3, on_change=changes.append
        )
        refuse = daemon_limits({"requests_per_minute": 600})
        strict = LeaseKeeper(engine, refuse, on_failure="refuse", expected_daemons=3)
        await keeper.tick()
        await strict.tick()
        assert (keeper.reachable, strict.reachable) == (True, True)

        valkey.stop()
        for _ in range(3):  # the local share lasts as long as the engine is gone
            await keeper.tick()
            await strict.tick()
        assert (keeper.reachable, strict.reachable) == (False, False)
        assert changes == [True, False]
        # "local": a bucket of this daemon's own, 600 / 3 at once.
        assert isinstance(local.all()[0].meter, Bucket)
        assert spend_all(local, 1) == 200
        # "refuse": what was leased is spent, then refused.
        leased = spend_all(refuse, 1)
        assert leased <= 10
        with pytest.raises(RateLimitedError):
            refuse.admit("c", None, 1, now=trio.current_time(), day=DAY, into_day=0.0)

        valkey.start()
        with trio.fail_after(30):
            while not keeper.reachable:
                await keeper.tick()
        assert changes == [True, False, True]
        assert isinstance(local.all()[0].meter, Allowance)
        await keeper.tick()
        assert spend_all(local, 1) >= 1  # leasing again (its split of HELD_SHARE, 1)


async def test_daemons_competing_for_requests_larger_than_a_ticks_lease_all_progress(
    shared_valkey: ValkeyServer, namespace: str
) -> None:
    """A request's estimate may be larger than a tick's reserve: a partial lease is kept
    until it covers it (found by bench/fleet: given back each tick, no request ever fit)."""
    async with engine_of(shared_valkey, namespace) as engine:
        fleet = [daemon_limits({"tokens_per_day": 2000}) for _ in range(3)]
        keepers = [
            LeaseKeeper(engine, lim, on_failure="local", expected_daemons=3) for lim in fleet
        ]
        admitted = [0, 0, 0]
        for _ in range(50):
            spent = [spend_all(lim, 400) for lim in fleet]
            admitted = [a + s for a, s in zip(admitted, spent, strict=True)]
            for keeper in keepers:
                await keeper.tick()
    assert sum(admitted) == 2000  # five requests of 400: the whole budget, none over


async def test_a_request_finding_too_little_on_hand_waits_for_a_round_out_of_turn(
    shared_valkey: ValkeyServer, namespace: str
) -> None:
    """Found by bench/fleet: requests of 41 tokens every five ticks, under a limit whose
    tick's share is 17. Each finds too little on hand: it asks the keeper for a round of
    leases now, waits for it, and goes (refused only if the fleet has no room)."""
    async with engine_of(shared_valkey, namespace) as engine:
        limits = daemon_limits({"tokens_per_minute": 10200})
        # Its split of what the fleet holds unspent: 5 tokens, less than a request.
        keeper = LeaseKeeper(engine, limits, on_failure="local", expected_daemons=10)
        admission = Admission(Serving(), [], limits)
        client = ClientConfig(name="c", tokens_per_minute=10200)
        await keeper.tick()
        admission.top_up = keeper.top_up
        admitted = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keeper.run)
            for _ in range(20):
                await trio.sleep(5 * TICK_S)
                ask = Ask(1, client, None, tokens=41, day=DAY)
                charge = await admission.admit_request_waiting(ask, trio.current_time)
                assert charge is not None
                charge.settle(17, now=trio.current_time(), day=DAY)
                admitted += 1
            nursery.cancel_scope.cancel()
    assert admitted == 20
    assert limits.tally.refusals == {}  # a refusal that the round made good is not counted


async def test_a_quiet_fleet_holds_next_to_nothing_unspent(
    shared_valkey: ValkeyServer, namespace: str, mock_clock: trio.testing.MockClock
) -> None:
    """What daemons hold unspent the engine has counted before the upstream sees it: fifty
    daemons each keeping a tick's worth of a limit (or one request) let a 60-s window at
    the upstream run 8 % over the limit (bench/fleet, N = 50). A daemon's reserve follows
    what it spends: fifty daemons sending a request now and then hold nothing between
    them, and still every request under the limit goes."""
    async with engine_of(shared_valkey, namespace) as engine:
        fleet = [daemon_limits({"requests_per_minute": 600}) for _ in range(50)]
        keepers = [
            LeaseKeeper(engine, lim, on_failure="local", expected_daemons=50) for lim in fleet
        ]
        held_each_tick = []
        for tick in range(120):  # a request a tick, for each daemon in turn
            limits, keeper = fleet[tick % 50], keepers[tick % 50]
            try:  # refused for want of a lease, the daemon has a round out of turn
                limits.admit("c", None, 1, now=trio.current_time(), day=DAY, into_day=0.0)
            except RateLimitedError:
                await keeper.tick()
                limits.admit("c", None, 1, now=trio.current_time(), day=DAY, into_day=0.0)
            mock_clock.jump(TICK_S)
            for each in keepers:  # every daemon's tick
                await each.tick()
            meters = [lim.all()[0].meter for lim in fleet]
            held_each_tick.append(sum(m.level for m in meters if isinstance(m, Allowance)))
        held = [lim.all()[0].meter for lim in fleet]
    assert all(isinstance(meter, Allowance) for meter in held)
    assert max(held_each_tick) == 0  # 120 requests went, and nothing was ever held


async def test_a_busy_daemons_reserve_follows_its_rate_whatever_rounds_come_between(
    shared_valkey: ValkeyServer, namespace: str, mock_clock: trio.testing.MockClock
) -> None:
    """A daemon sending 100 requests a tick comes to hold about that much on hand, so its
    requests rarely wait for a round; rounds out of turn (one per request that found too
    little) do not cut the rate short. (Found by bench/fleet: a rate taken per round stayed
    at one request, so every request of a busy daemon waited for a round.)"""
    async with engine_of(shared_valkey, namespace) as engine:
        limits = daemon_limits({"requests_per_minute": 6_000_000})
        # Its split of what the fleet holds unspent: 6,000,000 * 0.005 / 100,000, nothing.
        keeper = LeaseKeeper(engine, limits, on_failure="local", expected_daemons=100_000)
        waited = []
        for _ in range(12):
            mock_clock.jump(TICK_S)
            await keeper.tick()
            rounds = 0
            for _ in range(100):
                try:
                    limits.admit("c", None, 1, now=trio.current_time(), day=DAY, into_day=0.0)
                except RateLimitedError:
                    rounds += 1
                    await keeper.tick()  # the round out of turn this request asks for
                    limits.admit("c", None, 1, now=trio.current_time(), day=DAY, into_day=0.0)
            waited.append(rounds)
    assert waited[0] == 100  # nothing on hand yet: each request, a round
    assert waited[-1] <= 1, waited  # the reserve came up to its rate


async def test_a_limit_one_daemon_saw_spent_holds_the_fleet_back_until_its_reset(
    shared_valkey: ValkeyServer, namespace: str
) -> None:
    """The upstream's headroom is the fleet's (CONTRACT.md 5.2, 5.6): a daemon whose own
    responses never said the provider's limit is spent waits for the reset another daemon
    was told of, and takes a later word (the limit back) the same way."""
    with trio.fail_after(30):
        async with engine_of(shared_valkey, namespace) as engine:
            rooms = [Headroom(), Headroom()]
            keepers = [
                LeaseKeeper(
                    engine,
                    daemon_limits({}),
                    on_failure="local",
                    expected_daemons=2,
                    headrooms=functools.partial(dict, openai=room),
                )
                for room in rooms
            ]
            for keeper in keepers:
                await keeper.tick()
            assert rooms[1].wait(trio.current_time()) == 0  # nothing said yet

            said = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "40s"}
            rooms[0].observe(said.get, trio.current_time(), 0.0)
            await keepers[0].tick()
            await keepers[1].tick()
            wait = rooms[1].wait(trio.current_time())
            assert 0 < wait <= 40
            assert rooms[1].remaining["requests"] == 0

            back = {"x-ratelimit-remaining-requests": "99", "x-ratelimit-reset-requests": "1s"}
            rooms[1].observe(back.get, trio.current_time(), 0.0)
            await keepers[1].tick()
            await keepers[0].tick()
            assert rooms[0].remaining["requests"] == 99
            assert rooms[0].wait(trio.current_time()) == 0


async def test_a_master_failing_over_leaves_the_daemon_local_until_its_slot_is_served(
    valkey_cluster: ValkeyCluster, namespace: str
) -> None:
    """A cluster's master killed under a daemon's limit (CONTRACT.md 5.6): while its slot
    is served by nobody the daemon counts locally and refuses nothing under its share; it
    goes back to leasing once the replica serves the slot, and only then (a ping, which
    any node answers, would flap between the two)."""
    changes: list[bool] = []
    refused: list[str] = []
    spent_locally = 0
    async with open_engine(
        valkey_cluster.url, password=valkey_cluster.password, cluster=True, namespace=namespace
    ) as engine:
        limits = daemon_limits({"requests_per_minute": 600})
        keeper = LeaseKeeper(
            engine, limits, on_failure="local", expected_daemons=3, on_change=changes.append
        )
        key = engine.key(EngineLimit(limits.all()[0].key, 600))

        async def run_the_daemon(failed_over: trio.Event) -> None:
            nonlocal spent_locally
            while not (failed_over.is_set() and keeper.reachable):
                await keeper.tick()
                if keeper.reachable is False and spent_locally < 150:  # its share: 200
                    try:
                        limits.admit("c", None, 1, now=trio.current_time(), day=DAY, into_day=0)
                    except RateLimitedError as exc:
                        refused.append(str(exc))
                    spent_locally += 1
                await trio.sleep(TICK_S)

        with trio.fail_after(60):
            await keeper.tick()
            assert changes == [True]
            failed_over = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_the_daemon, failed_over)
                await trio.to_thread.run_sync(valkey_cluster.kill_master_of, key)
                failed_over.set()
    assert changes == [True, False, True]
    assert spent_locally > 0
    assert refused == []
    assert isinstance(limits.all()[0].meter, Allowance)


class SlowEngine:
    """An engine whose every call takes ``delay_s`` (a loaded host): a bucket of plenty."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.calls: list[str] = []  # what each call was about, in order

    async def take(self, limit: EngineLimit, amount: int) -> Take:
        await self._call(limit.name)
        return Take(fitted=True, used=float(amount), retry_after_s=0.0)

    async def adjust(self, limit: EngineLimit, delta: int) -> float:
        await self._call(limit.name)
        return 0.0

    async def used(self, limit: EngineLimit) -> float:
        await self._call(limit.name)
        return 0.0

    async def ping(self) -> None:
        await self._call("ping")

    async def upstream_word(self, provider: str, mine: object) -> None:
        await self._call(f"word:{provider}")

    async def _call(self, about: str) -> None:
        self.calls.append(about)
        await trio.sleep(self.delay_s)


async def test_a_request_waits_for_a_slow_round_rather_than_be_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Found by bench/fleet (N = 50, the host loaded): a round out of turn slower than a
    tick (0.2 s here, virtual) refused the request that asked for it while the fleet had
    room. It is waited for, up to the engine's own bound on a call."""
    limits = daemon_limits({"requests_per_minute": 600})
    keeper = LeaseKeeper(
        cast(Engine, SlowEngine(0.2)), limits, on_failure="local", expected_daemons=50
    )
    admission = Admission(Serving(), [], limits)
    admission.top_up = keeper.top_up
    client = ClientConfig(name="c", requests_per_minute=600)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run)
        await trio.sleep(10)  # rounds, idle: nothing on hand (its split of 0.5 % is nothing)
        assert keeper.reachable
        charge = await admission.admit_request_waiting(
            Ask(1, client, None, day=DAY), trio.current_time
        )
        assert charge is not None
        nursery.cancel_scope.cancel()


async def test_a_round_out_of_turn_leases_only_what_requests_wanted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A request's round out of turn asks the engine for the limits it was refused by,
    nothing else: the other limits and the upstreams' words wait for the next tick (the
    request waits for the round, so it is kept short)."""
    limits = Limits(
        {"c": {"requests_per_minute": 600}},
        {"openai": {"tokens_per_minute": 6000}},
        now=trio.current_time(),
        lease_tick_s=TICK_S,
    )
    engine = SlowEngine(0.001)
    keeper = LeaseKeeper(
        cast(Engine, engine),
        limits,
        on_failure="local",
        expected_daemons=50,
        headrooms=functools.partial(dict, openai=Headroom()),
    )
    admission = Admission(Serving(), [], limits)
    admission.top_up = keeper.top_up
    client = ClientConfig(name="c", requests_per_minute=600)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run)
        await trio.sleep(TICK_S / 2)  # the first tick's round is over, the next not due
        full_round = list(engine.calls)
        engine.calls.clear()
        ask = Ask(1, client, None, day=DAY)  # under the client's limit only
        assert await admission.admit_request_waiting(ask, trio.current_time) is not None
        out_of_turn = list(engine.calls)
        nursery.cancel_scope.cancel()
    assert full_round == [
        "client:c:requests_per_minute",
        "provider:openai:tokens_per_minute",
        "word:openai",
    ]
    assert out_of_turn == ["client:c:requests_per_minute"]


async def test_what_a_request_wanted_is_kept_while_it_may_still_wait_for_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A request waits up to half a second for its round, which may start late (a slow
    round before it), and the keeper's next tick may come before the request takes what
    the round leased. What it wanted stays on hand for it: given up 0.15 s after the
    refusal, the next tick gave the lease back first (a flake of the slow-round test)."""
    limits = daemon_limits({"requests_per_minute": 600})
    keeper = LeaseKeeper(
        cast(Engine, SlowEngine(0.0)), limits, on_failure="local", expected_daemons=50
    )
    await keeper.tick()
    with pytest.raises(RateLimitedError):  # nothing on hand: wanted
        limits.admit("c", None, 1, now=trio.current_time(), day=DAY, into_day=0.0)
    await trio.sleep(0.2)  # the round it waits for starts late, inside its half second
    await keeper.tick(wanted_only=True)
    await keeper.tick()  # the next tick, before the request is back
    limits.admit("c", None, 1, now=trio.current_time(), day=DAY, into_day=0.0)
