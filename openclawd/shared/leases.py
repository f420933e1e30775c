"""This daemon's share of the fleet's limits: leases from the engine (CONTRACT.md 5.6).

The common path never waits on the network. In shared mode each limit is an
``Allowance`` (protocol/meters.py) that admission spends locally; ``LeaseKeeper`` fills it
from the fleet's bucket in the engine, every ``tick_s``, up to a reserve, pays a
correction up (an allowance in debt), and gives back what it holds over the reserve
(refunds, a daemon that slowed down). Whatever is spent here was first taken from the
engine, so the fleet never spends more than its limit (corrections of a request's
estimate aside).

What a daemon holds unspent the engine counted before the upstream sees it: fifty daemons
each holding a tick's worth of a limit let a 60-s window at the upstream go over the limit
by 8 %. So the reserve is the larger of what this daemon spends in a tick (a moving
average over time), what a refused request wanted, and an even split among
``expected_daemons`` of ``HELD_SHARE`` of the limit; and a request that finds too little
on hand asks for a round out of turn (``top_up``) and waits for it, one round trip to the
engine, rather than be refused while the fleet has room. A busy daemon spends its reserve
within a tick, and a quiet one holds at most its split: the fleet holds about
``HELD_SHARE`` of a limit unspent.

While the engine does not answer (``on_failure``):
- ``"local"``: each limit becomes a bucket of this daemon's own, limit / ``expected_daemons``;
  a request under it is never refused for the engine's sake;
- ``"refuse"``: the allowances are no longer filled; what was leased is spent, then
  requests under a shared limit are refused (``rate_limited``).
The keeper goes back to leasing by itself once the engine answers, and reports the
engine's reachability (``reachable``; the daemon is ``degraded`` meanwhile).

Each tick also shares the upstreams' headroom (CONTRACT.md 5.2, 5.6): what this daemon's
responses last said of a provider's limits goes to the engine, and the fleet's latest word
comes back into the provider's ``Headroom``, so a limit one daemon saw spent holds every
daemon back until its reset, still without a request waiting on the network.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import trio

from openclawd import logs
from openclawd.errors import SharedUnavailableError
from openclawd.protocol.limits import Limit, Limits
from openclawd.protocol.meters import Allowance, Bucket, DayBudget
from openclawd.shared.engine import Engine, Period
from openclawd.shared.engine import Limit as EngineLimit
from openclawd.upstream.headroom import Headroom

__all__ = ["LeaseKeeper"]

log = logs.get(__name__)

# The part of a limit the whole fleet may hold unspent on hand beyond its spending, split
# evenly among the expected daemons (a busy daemon holds what it spends in a tick).
HELD_SHARE = 0.005
# The longest a request waits for a round out of turn: the engine's own bound on a call
# (shared/engine.py), so a loaded host's slow round is waited for rather than refused.
TOP_UP_WAIT_S = 0.5


class LeaseKeeper:
    """Keeps ``limits`` (made with ``lease_tick_s``) fed from ``engine``."""

    def __init__(
        self,
        engine: Engine,
        limits: Limits,
        *,
        on_failure: str,
        expected_daemons: int,
        on_change: Callable[[bool], None] = lambda reachable: None,
        headrooms: Callable[[], Mapping[str, Headroom]] = dict,
    ) -> None:
        assert limits.lease_tick_s is not None
        self.engine = engine
        self.limits = limits
        self.tick_s = limits.lease_tick_s
        self.on_failure = on_failure
        self.expected_daemons = expected_daemons
        self.reachable: bool | None = None  # None until the engine first answered or not
        self._woken = trio.Event()  # a request wants a round now
        self._next_round_done = trio.Event()
        self._on_change = on_change
        self._headrooms = headrooms  # by provider, as the pools are now (reloads)
        self._passed_on: dict[str, float | None] = {}  # when the word last passed on was said

    async def run(self) -> None:
        """Lease every tick, and out of turn when a request asks (then only what requests
        want), until cancelled."""
        next_tick = trio.current_time()
        while True:
            done, self._next_round_done = self._next_round_done, trio.Event()
            self._woken = trio.Event()
            full = trio.current_time() >= next_tick
            await self.tick(wanted_only=not full)
            if full:
                next_tick = trio.current_time() + self.tick_s
            done.set()
            with trio.move_on_at(next_tick):
                await self._woken.wait()

    async def top_up(self) -> bool:
        """A round of leases now, for what refused requests want; waits for it, at most
        ``TOP_UP_WAIT_S``. False at once while the engine does not answer (nothing would
        come)."""
        if not self.reachable:
            return False
        done = self._next_round_done
        self._woken.set()
        with trio.move_on_after(TOP_UP_WAIT_S):
            await done.wait()
        return True

    async def tick(self, *, wanted_only: bool = False) -> None:
        """One round of leases over every limit, and of the upstreams' words; notices the
        engine failing or back. ``wanted_only``: a round out of turn, for the limits a
        request was refused for want of (nothing else is due before the next tick)."""
        try:
            if self.reachable is False:
                await self._probe()  # the local buckets stay until the engine answers
            for limit in self.limits.all():
                if not wanted_only or (isinstance(limit.meter, Allowance) and limit.meter.want):
                    await self._lease(limit)
            for provider, headroom in () if wanted_only else self._headrooms().items():
                await self._share_word(provider, headroom)
        except SharedUnavailableError as exc:
            self._unreachable(str(exc))
        else:
            self._reachable()

    async def _probe(self) -> None:
        """Ask the engine for every limit's figure: in a cluster, a master that failed
        over is back only once its replica serves its slots (any node answers a ping)."""
        limits = self.limits.all()
        if not limits:
            await self.engine.ping()
        for limit in limits:
            await self.engine.used(_shared(limit))

    async def _lease(self, limit: Limit) -> None:
        meter = limit.meter
        if not isinstance(meter, Allowance):
            # A local bucket while the engine was down: leasing again from nothing.
            meter = limit.meter = Allowance(limit.figure, self.tick_s)
        shared = _shared(limit)
        split = math.floor(limit.figure * HELD_SHARE / self.expected_daemons)
        rate = meter.rate(trio.current_time())
        reserve = max(meter.want, math.floor(rate + 0.5), split)
        with trio.CancelScope(shield=True):  # a call cut short may or may not be made
            await self._settle(shared, meter, reserve)

    async def _share_word(self, provider: str, headroom: Headroom) -> None:
        """Pass this daemon's new word from ``provider``'s upstream on; take the fleet's."""
        now = trio.current_time()
        mine = None
        if headroom.said_at is not None and headroom.said_at != self._passed_on.get(provider):
            mine = headroom.word(now)
            self._passed_on[provider] = headroom.said_at
        fleets = await self.engine.upstream_word(provider, mine)
        if fleets is not None and headroom.adopt(fleets, trio.current_time()):
            self._passed_on[provider] = headroom.said_at  # (ours again: nothing new)

    async def _settle(self, shared: EngineLimit, meter: Allowance, reserve: int) -> None:
        # What a refused request wanted stays on hand until a request that large takes it,
        # or for as long as a request waits for its round (and a tick) after the last
        # refusal: by then the requester went elsewhere, or away.
        kept_s = TOP_UP_WAIT_S + self.tick_s
        if meter.want and trio.current_time() - meter.wanted_at > kept_s:
            meter.want = 0
        if meter.level > reserve and not meter.want:
            excess = math.floor(meter.level - reserve)
            meter.level -= excess
            meter.fleet_used = await self.engine.adjust(shared, -excess)
            return
        want = math.ceil(reserve - meter.level)
        if want <= 0:
            meter.fleet_used = await self.engine.used(shared)
            return
        taken = await self.engine.take(shared, want)
        if not taken.fitted:
            # What the fleet's bucket still has, if anything, rather than nothing.
            room = math.floor(shared.capacity - taken.used)
            if 0 < room < want:
                taken = await self.engine.take(shared, room)
                want = room if taken.fitted else 0
            else:
                want = 0
        meter.level += want
        meter.fleet_used = taken.used
        meter.retry_s = taken.retry_after_s if want == 0 else 0.0

    def _unreachable(self, error: str) -> None:
        if self.reachable is False:
            return
        self.reachable = False
        log.warning("shared.unreachable", error=error, on_failure=self.on_failure)
        if self.on_failure == "local":
            now = trio.current_time()
            for limit in self.limits.all():
                share = max(1, limit.figure // self.expected_daemons)
                limit.meter = DayBudget(share) if limit.per_day else Bucket(share, now)
        self._on_change(False)

    def _reachable(self) -> None:
        if self.reachable:
            return
        if self.reachable is False:
            log.info("shared.reachable")
        self.reachable = True
        self._on_change(True)


def _shared(limit: Limit) -> EngineLimit:
    return EngineLimit(limit.key, limit.figure, Period.DAY if limit.per_day else Period.MINUTE)
