"""Vault going away under load: requests go on, on the last keys read, the daemon says it
is degraded, and it follows Vault again when it is back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from ..bao import BaoServer
from ..dataplane.harness import DataPlane, open_app, open_dataplane
from ..fake_upstream import open_fake_upstream

CLIENTS = 4


async def until(predicate: Callable[[], bool], what: str, within_s: float = 10.0) -> None:
    with trio.move_on_after(within_s):
        while not predicate():  # noqa: ASYNC110 - the daemon's state has no event to wait on
            await trio.sleep(0.02)
    assert predicate(), f"not within {within_s} s: {what}"


def version(dp: DataPlane) -> int | None:
    key = dp.keys.current("openai")
    return None if key is None else key.version


async def test_vault_killed_under_load_fails_no_request_and_recovery_follows_it(
    bao: BaoServer, runtime_dir: Path
) -> None:
    ends: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    with trio.fail_after(60):
        async with (
            open_fake_upstream() as up,
            open_dataplane(bao, runtime_dir, up.url, refresh_interval_s=0.2) as dp,
        ):
            stop = trio.Event()

            async def client(index: int) -> None:
                async with open_app(dp.socket_path) as app:
                    sent = 0
                    while not stop.is_set():
                        frames = await app.call(f"c{index}-{sent}", body={})
                        sent += 1
                        last = frames[-1]
                        (ends if last["type"] == "response.end" else failures).append(last)

            async with trio.open_nursery() as nursery:
                for index in range(CLIENTS):
                    nursery.start_soon(client, index)
                await until(lambda: len(ends) >= 20, "requests flowing")
                assert version(dp) == 1

                await trio.to_thread.run_sync(lambda: bao.stop(kill=True))
                await until(lambda: not dp.keys.statistics().reachable, "Vault seen down")
                assert dp.lifecycle.state.value == "degraded"
                before = len(ends)
                await trio.sleep(1.0)  # Vault down for a while, under load
                served_while_down = len(ends) - before
                assert version(dp) == 1  # the last key read serves on

                await trio.to_thread.run_sync(bao.start)  # a fresh dev server: empty
                for key in ("sk-test-0002", "sk-test-0003"):  # version 2 is new to the daemon
                    await trio.to_thread.run_sync(
                        lambda key=key: bao.write(dp.vault_path, api_key=key)
                    )
                await until(lambda: version(dp) == 2, "the new version followed")
                await until(lambda: dp.keys.statistics().reachable, "Vault seen back")
                assert dp.lifecycle.state.value == "ready"
                served = len(ends)
                await until(lambda: len(ends) >= served + 20, "requests on the new key")
                stop.set()

    assert failures == []
    assert served_while_down > 0
    assert ends[-1]["key_version"] == 2
