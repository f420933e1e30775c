"""The daemon's state (lifecycle.py): a drain counts its work down on the STATUS line, and
every end of work during a drain is a change a drain can wait for (no polling)."""

from __future__ import annotations

import trio
import trio.testing

from openclawd.lifecycle import Lifecycle


async def changes(lifecycle: Lifecycle, seen: list[str]) -> None:
    while True:
        await lifecycle.wait_changed()
        seen.append(lifecycle.describe())


async def test_a_drain_counts_its_work_down_as_each_piece_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lifecycle = Lifecycle()
    lifecycle.set_listening()
    seen: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(changes, lifecycle, seen)
        await trio.testing.wait_all_tasks_blocked()
        lifecycle.work.begin()
        lifecycle.work.begin()
        lifecycle.work.end()  # not draining: no change
        lifecycle.work.begin()
        await trio.testing.wait_all_tasks_blocked()
        assert seen == []
        lifecycle.set_draining(trio.current_time() + 30)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(10.5)
        lifecycle.work.end()
        await trio.testing.wait_all_tasks_blocked()
        lifecycle.work.end()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert seen == [
        "draining: 2 in flight, 30s left",
        "draining: 1 in flight, 20s left",
        "draining: nothing in flight",
    ]


async def test_stopping_says_so(autojump_clock: trio.testing.MockClock) -> None:
    lifecycle = Lifecycle()
    lifecycle.set_listening()
    lifecycle.work.begin()
    lifecycle.set_stopping(trio.current_time() + 10)
    assert lifecycle.describe() == "stopping: 1 in flight, 10s left"
    await trio.sleep(10)
    assert lifecycle.describe() == "stopping: 1 in flight, 0s left"
