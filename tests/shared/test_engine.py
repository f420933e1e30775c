"""The engine boundary (openclawd/shared/engine.py) against real Valkey: a standalone server
and a cluster of three masters with one replica each (tests/valkey.py).

Assertions are on what the engine answers and on amounts, never on how long something took:
a bucket of N per minute refills N/60 a second, so a test that must see a refill waits
exactly the ``retry_after_s`` the engine gave, and a test that must not see one uses a small
N (6 a minute: a tenth of a token a second) and whole amounts. Every test runs under
``trio.fail_after``, in a namespace of its own.
"""

from __future__ import annotations

import math
import traceback

import pytest
import trio

from openclawd.errors import SharedUnavailableError
from openclawd.shared.engine import Engine, Limit, Period, open_engine
from openclawd.upstream.headroom import Word

from ..valkey import ValkeyCluster, ValkeyServer
from .conftest import Target

TIMEOUT_S = 30


def wait_for(take_amount: float, limit: Limit, used: float) -> float:
    """What the engine should say a take waits: the missing tokens at N/60 a second."""
    return (take_amount - (limit.capacity - used)) / (limit.capacity / 60)


async def test_a_bucket_takes_what_fits_and_says_how_long_the_rest_waits(
    engine: Engine, target: Target
) -> None:
    limit = Limit("client:billing:requests_per_minute", 6)  # 0.1 a second
    with trio.fail_after(TIMEOUT_S):
        before = target.time()
        first = await engine.take(limit, 4)
        after = target.time()
        assert first.fitted
        assert first.retry_after_s == 0
        assert 4 - (after - before) * 0.1 <= first.used <= 4
        # The state holds the engine's clock, read inside the script.
        stamp = float(target.cli("HGET", engine.key(limit), "ts"))
        assert before <= stamp <= after

        refused = await engine.take(limit, 3)
        assert not refused.fitted
        assert refused.retry_after_s == pytest.approx(wait_for(3, limit, refused.used), abs=1e-5)
        assert refused.used <= first.used  # nothing taken (a little refilled)

        assert (await engine.take(limit, 2)).fitted
        never = await engine.take(limit, 7)  # more than the capacity
        assert (never.fitted, never.retry_after_s) == (False, math.inf)


async def test_a_bucket_refills_by_the_engine_clock(engine: Engine) -> None:
    limit = Limit("provider:openai:requests_per_minute", 6000)  # 100 a second
    with trio.fail_after(TIMEOUT_S):
        assert (await engine.take(limit, 6000)).fitted
        refused = await engine.take(limit, 1)
        assert not refused.fitted
        assert (
            0 < refused.retry_after_s == pytest.approx(wait_for(1, limit, refused.used), abs=1e-5)
        )
        await trio.sleep(refused.retry_after_s)
        again = await engine.take(limit, 1)
        assert again.fitted  # exactly when the engine said
        assert again.used < 6000


async def test_concurrent_takes_from_two_daemons_never_exceed_the_limit(
    engine: Engine, target: Target, namespace: str
) -> None:
    bucket = Limit("provider:openai:requests_per_minute", 60)  # 1 a second
    day = Limit("client:batch:tokens_per_day", 100, Period.DAY)
    fitted = {bucket: 0, day: 0}

    async def take(client: Engine, limit: Limit) -> None:
        if (await client.take(limit, 1)).fitted:
            fitted[limit] += 1

    with trio.fail_after(TIMEOUT_S):
        async with open_engine(
            target.url, password=target.password, cluster=target.cluster, namespace=namespace
        ) as other:
            before = target.time()
            async with trio.open_nursery() as nursery:
                for i in range(300):
                    for limit in (bucket, day):
                        nursery.start_soon(take, (engine, other)[i % 2], limit)
            after = target.time()
    assert fitted[day] == 100
    assert 60 <= fitted[bucket] <= 60 + math.floor(after - before)  # + its refill meanwhile


async def test_give_back_and_charge_more(engine: Engine) -> None:
    limit = Limit("client:billing:tokens_per_minute", 6)  # 0.1 a second
    with trio.fail_after(TIMEOUT_S):
        assert (await engine.take(limit, 6)).fitted
        assert not (await engine.take(limit, 1)).fitted

        # A refund: what was given back can be taken again, and no more.
        assert await engine.adjust(limit, -3) <= 3
        assert (await engine.take(limit, 3)).fitted
        assert not (await engine.take(limit, 1)).fitted

        # Giving back more than was spent leaves the bucket full, never fuller.
        assert await engine.adjust(limit, -100) == 0
        assert (await engine.take(limit, 6)).fitted

        # A correction up (the upstream reported more than the estimate): the bucket goes
        # into debt, and the next take waits for it to be repaid.
        used = await engine.adjust(limit, 3)
        assert 6 < used <= 9
        refused = await engine.take(limit, 1)
        assert not refused.fitted
        assert refused.retry_after_s == pytest.approx(wait_for(1, limit, refused.used), abs=1e-5)
        assert await engine.used(limit) <= used


async def test_a_daily_total_is_keyed_by_the_engine_utc_day(engine: Engine, target: Target) -> None:
    limit = Limit("client:batch:tokens_per_day", 1000, Period.DAY)
    with trio.fail_after(TIMEOUT_S):
        assert await engine.used(limit) == 0
        before = target.time()
        assert (await engine.take(limit, 600)).fitted
        refused = await engine.take(limit, 600)
        after = target.time()
        assert (refused.fitted, refused.used) == (False, 600)
        # It waits for the engine's next UTC midnight.
        midnight = (math.floor(before / 86400) + 1) * 86400
        assert midnight - after <= refused.retry_after_s <= midnight - before
        assert int(target.cli("HGET", engine.key(limit), "day")) == math.floor(after / 86400)

        assert await engine.adjust(limit, -100) == 500  # a refund
        assert (await engine.take(limit, 500)).fitted
        assert await engine.used(limit) == 1000
        assert await engine.adjust(limit, 50) == 1050  # a correction up, whatever the room
        assert await engine.adjust(limit, -5000) == 0  # never below nothing

        # A total of another day counts for nothing today.
        assert (await engine.take(limit, 1000)).fitted
        target.cli("HSET", engine.key(limit), "day", str(math.floor(after / 86400) - 1))
        assert await engine.used(limit) == 0
        assert (await engine.take(limit, 1000)).fitted


async def test_namespaces_keep_fleets_apart(engine: Engine, target: Target, namespace: str) -> None:
    limit = Limit("provider:openai:requests_per_minute", 6)
    with trio.fail_after(TIMEOUT_S):
        assert (await engine.take(limit, 6)).fitted
        async with open_engine(
            target.url,
            password=target.password,
            cluster=target.cluster,
            namespace=namespace + "-other",
        ) as other:
            assert (await other.take(limit, 6)).fitted
            assert other.key(limit) != engine.key(limit)


async def test_one_limit_has_one_slot_and_limits_spread_over_the_masters(
    valkey_cluster: ValkeyCluster, namespace: str
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_engine(
            valkey_cluster.url, password=valkey_cluster.password, cluster=True, namespace=namespace
        ) as engine:
            masters = set()
            for n in range(30):
                keys = [engine.key(Limit(f"client:c{n}:tokens", 10, p)) for p in Period]
                assert all(key.startswith(f"{{{namespace}:client:c{n}:tokens}}:") for key in keys)
                slots = {valkey_cluster.keyslot(key) for key in keys}
                assert slots == {valkey_cluster.keyslot(f"{namespace}:client:c{n}:tokens")}
                for period in Period:
                    await engine.take(Limit(f"client:c{n}:tokens", 10, period), 1)
                # Written where the cluster says the slot lives (no redirection followed).
                master = valkey_cluster.master_of(keys[0])
                assert master.cli("EXISTS", *keys) == "2"
                masters.add(master)
            assert len(masters) == 3


async def test_a_killed_master_fails_over_and_the_client_follows(
    valkey_cluster: ValkeyCluster, namespace: str
) -> None:
    limit = Limit("provider:openai:requests_per_minute", 1_000_000)
    outcomes: list[str] = []
    failed_over = trio.Event()

    async def spend(engine: Engine) -> None:
        # Until the first take that fits after the failover: every failure is our error.
        while True:
            try:
                await engine.take(limit, 1)
            except SharedUnavailableError as exc:
                outcomes.append(str(exc))
                await trio.sleep(0.05)
                continue
            outcomes.append("ok")
            if failed_over.is_set():
                return
            await trio.sleep(0.01)

    with trio.fail_after(TIMEOUT_S):
        async with open_engine(
            valkey_cluster.url, password=valkey_cluster.password, cluster=True, namespace=namespace
        ) as engine:
            assert (await engine.take(limit, 1)).fitted
            key = engine.key(limit)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(spend, engine)
                victim = await trio.to_thread.run_sync(valkey_cluster.kill_master_of, key)
                failed_over.set()
            assert valkey_cluster.master_of(key) is not victim
            assert set(outcomes) - {"ok"}, "no take failed while the master was dead"
            assert outcomes[-1] == "ok"
            assert not any(valkey_cluster.password in outcome for outcome in outcomes)
            assert (await engine.take(limit, 1)).fitted


async def test_a_dead_standalone_engine_is_our_error_until_it_is_back(valkey: ValkeyServer) -> None:
    limit = Limit("provider:openai:requests_per_minute", 60)
    with trio.fail_after(TIMEOUT_S):
        async with open_engine(valkey.url, password=valkey.password, timeout_s=0.2) as engine:
            assert (await engine.take(limit, 60)).fitted
            valkey.stop()
            with pytest.raises(SharedUnavailableError) as caught:
                await engine.take(limit, 1)
            assert f"127.0.0.1:{valkey.port}" in str(caught.value)
            assert valkey.password not in str(caught.value)
            # A client made while the engine is down is made; its calls fail.
            async with open_engine(valkey.url, password=valkey.password, timeout_s=0.2) as late:
                with pytest.raises(SharedUnavailableError):
                    await late.ping()
                valkey.start()  # a new, empty server on the same port
                await until_it_answers(late)
            await until_it_answers(engine)
            assert (await engine.take(limit, 60)).fitted  # the old bucket died with it


async def test_a_cancelled_take_is_whole_or_nothing_and_the_client_goes_on(
    engine: Engine,
) -> None:
    limit = Limit("client:billing:tokens_per_minute", 6)  # 0.1 a second
    with trio.fail_after(TIMEOUT_S):
        with trio.CancelScope() as scope:
            scope.cancel()
            await engine.take(limit, 6)
        assert scope.cancelled_caught
        await engine.ping()
        used = await engine.used(limit)  # (it may still land later)
        assert used == 0 or 5 < used <= 6


async def until_it_answers(engine: Engine) -> None:
    """Until the client has reconnected by itself (the caller's fail_after bounds it)."""
    while True:
        try:
            await engine.ping()
        except SharedUnavailableError:
            await trio.sleep(0.05)
        else:
            return


@pytest.mark.parametrize("password", ["wrong-Pa55word", None])
async def test_a_wrong_password_is_our_error_and_never_shown(
    target: Target, password: str | None, capfd: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_engine(
            target.url, password=password, cluster=target.cluster, timeout_s=0.2
        ) as engine:
            with pytest.raises(SharedUnavailableError) as caught:
                await engine.take(Limit("client:x:requests_per_minute", 6), 1)
    shown = "".join(traceback.format_exception(caught.value)) + repr(engine)
    out, err = capfd.readouterr()
    for secret in filter(None, [password, target.password]):
        assert secret not in shown + out + err
    assert any(why in str(caught.value) for why in ("WRONGPASS", "NOAUTH"))  # it says why


def test_a_client_error_text_holding_the_password_is_scrubbed() -> None:
    from openclawd.shared.address import EngineAddress
    from openclawd.shared.engine import _translate

    address = EngineAddress("127.0.0.1", 6379, tls=False)
    exc = _translate(address, "take x", RuntimeError("AUTH s3cret-pw failed\n  twice"), "s3cret-pw")
    assert str(exc) == "shared engine 127.0.0.1:6379: take x: RuntimeError: AUTH *** failed twice"


def test_limits_and_namespaces_keep_the_hash_tag_whole() -> None:
    for name in ["", "a{b", "a}b", "a b"]:
        with pytest.raises(ValueError, match="without braces"):
            Limit(name, 1)
    with pytest.raises(ValueError, match="positive"):
        Limit("x", 0)


async def test_a_namespace_with_a_brace_is_refused() -> None:
    with pytest.raises(ValueError, match="namespace"):
        async with open_engine("valkey://127.0.0.1:1", password=None, namespace="a}"):
            pass


async def test_a_negative_take_is_refused(engine: Engine) -> None:
    with pytest.raises(ValueError, match="adjust"):
        await engine.take(Limit("x", 1), -1)


async def test_an_upstreams_word_is_shared_and_the_later_one_is_kept(
    engine: Engine, target: Target
) -> None:
    """The fleet's latest word on a provider's limits (CONTRACT.md 5.6: the upstream
    headroom of 5.2 is shared), by the engine's clock: a word said earlier than the stored
    one does not replace it."""
    with trio.fail_after(TIMEOUT_S):
        assert await engine.upstream_word("openai", None) is None
        spent = Word(0.5, {"requests": 0, "tokens": 900}, {"requests": 30.0, "tokens": None})
        stored = await engine.upstream_word("openai", spent)
        assert stored is not None
        assert stored.remaining == {"requests": 0, "tokens": 900}
        assert stored.reset_in_s["tokens"] is None
        assert 0.5 <= stored.age_s < 30
        assert 0 < (stored.reset_in_s["requests"] or 0) <= 30.0

        older = Word(120.0, {"requests": 500, "tokens": None}, {"requests": None, "tokens": None})
        kept = await engine.upstream_word("openai", older)
        assert kept is not None
        assert kept.remaining["requests"] == 0
        newer = Word(0.0, {"requests": 499, "tokens": None}, {"requests": 1.0, "tokens": None})
        replaced = await engine.upstream_word("openai", newer)
        assert replaced is not None
        assert replaced.remaining == {"requests": 499, "tokens": None}
        assert await engine.upstream_word("anthropic", None) is None  # per provider
