"""Token control's wiring in the daemon: its statistics (``/v1/limits``, status, metrics),
and the fleet's lease keeper ([shared], CONTRACT.md 5.6-5.7). The arithmetic is
``protocol/limits.py``'s; the engine is ``shared/engine.py``'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import trio

from openclawd.config import Config, SharedConfig
from openclawd.credentials import read_credential
from openclawd.lifecycle import Lifecycle
from openclawd.protocol.limits import Limits, utc_day
from openclawd.statistics import TokenControlStatistics
from openclawd.upstream.headroom import Headroom
from openclawd.upstream.http import Upstreams

if TYPE_CHECKING:  # the engine's client (valkey-glide) is imported only by a fleet's daemon
    from openclawd.shared.leases import LeaseKeeper

__all__ = ["keep_leases", "statistics"]


def statistics(
    config: Config, limits: Limits, upstreams: Upstreams, keeper: LeaseKeeper | None
) -> TokenControlStatistics:
    """Token control's figures; the limits as ``GET /v1/limits`` shows them."""
    now = trio.current_time()
    snapshot = limits.snapshot(now, utc_day(time.time())[0])
    providers: dict[str, dict[str, object]] = {
        name: dict(set_limits) for name, set_limits in snapshot["providers"].items()
    }
    for name, pool in upstreams.pools.items():
        providers.setdefault(name, {})["upstream"] = {
            "remaining_requests": pool.headroom.remaining["requests"],
            "remaining_tokens": pool.headroom.remaining["tokens"],
            "reset_s": pool.headroom.reset_s(now),
        }
    reachable = None if not config.shared.url else bool(keeper and keeper.reachable)
    tally = limits.tally
    return TokenControlStatistics(
        shared_mode="shared" if reachable else "local",
        shared_reachable=reachable,
        requests=dict(tally.requests),
        tokens=dict(tally.tokens),
        refusals=dict(tally.refusals),
        fallbacks=dict(upstreams.fallbacks),
        limits={"clients": snapshot["clients"], "providers": providers},
    )


async def keep_leases(
    shared: SharedConfig,
    limits: Limits,
    lifecycle: Lifecycle,
    started: Callable[[LeaseKeeper], None],
    headrooms: Callable[[], Mapping[str, Headroom]] = dict,
) -> None:
    """Feed ``limits`` from the engine of ``shared`` until cancelled, and share the
    upstreams' ``headrooms`` (by provider) with the fleet; the daemon is
    ``degraded`` until the engine first answers, and while it does not. The engine's
    password is read from its credential file here, and only handed to its client."""
    from openclawd.shared.engine import open_engine
    from openclawd.shared.leases import LeaseKeeper

    password = None
    if shared.password_file:
        password = read_credential(shared.password_file, what="shared.password_file")

    def reachable(answers: bool) -> None:
        if answers:
            lifecycle.recover("shared")
        else:
            lifecycle.degrade("shared", "shared limits' engine unreachable")

    lifecycle.degrade("shared", "shared limits' engine has not answered yet")
    async with open_engine(
        shared.url, password=password, cluster=shared.cluster, namespace=shared.namespace
    ) as engine:
        keeper = LeaseKeeper(
            engine,
            limits,
            on_failure=shared.on_failure,
            expected_daemons=shared.expected_daemons,
            on_change=reachable,
            headrooms=headrooms,
        )
        started(keeper)
        await keeper.run()
