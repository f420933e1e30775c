"""The one drain's cut (local/cutter.py): a deadline on every connection's
cancel scope, and the close chosen by whoever cut, in virtual time."""

from __future__ import annotations

import math

import trio
import trio.testing

from openclawd.local.cutter import Close, Cutter

DRAIN = Close(1001, "drain deadline reached")
SHUTDOWN = Close(1012, "openclawd is shutting down")


async def connection(cutter: Cutter, ended: dict[str, float], name: str) -> None:
    with cutter.guard():
        await trio.sleep_forever()
    ended[name] = trio.current_time()


async def test_connections_open_at_a_drain_are_cut_at_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cutter = Cutter()
    ended: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection, cutter, ended, "a")
        nursery.start_soon(connection, cutter, ended, "b")
        await trio.testing.wait_all_tasks_blocked()
        assert cutter.open == 2
        cutter.cut_at(trio.current_time() + 30, DRAIN)
        await trio.sleep(10)
        cutter.cut_at(trio.current_time() + 5, DRAIN)  # a new drain moves the deadline
    assert ended == {"a": 15.0, "b": 15.0}
    assert (cutter.why, cutter.open) == (DRAIN, 0)


async def test_a_resume_before_the_deadline_cuts_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cutter = Cutter()
    ended: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection, cutter, ended, "a")
        await trio.testing.wait_all_tasks_blocked()
        cutter.cut_at(trio.current_time() + 30, DRAIN)
        await trio.sleep(29)
        cutter.cut_at(math.inf, None)
        await trio.sleep(1000)
        assert ended == {}
        cutter.cut_at(trio.current_time(), SHUTDOWN)  # the shutdown's cut: at once
    assert ended == {"a": 1029.0}
    assert cutter.why == SHUTDOWN


async def test_a_connection_after_the_deadline_is_not_cut_by_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After an operator's drain has cut, the daemon still drains: a new connection must
    live long enough to be told so (1013 / 503), not be cut at birth."""
    cutter = Cutter()
    cutter.cut_at(trio.current_time() + 1, DRAIN)
    await trio.sleep(2)
    ended: dict[str, float] = {}
    with trio.move_on_after(100):
        await connection(cutter, ended, "late")
    assert ended == {}
