"""The key manager under reload, an operator's rotation while Vault hangs, and a secret
missing from Vault: on trio's virtual clock against the in-memory Vault of
``test_manager``, every time exact."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from openclawd import config
from openclawd.keys.manager import KeyManager
from openclawd.keys.vault import SecretMetadata, SecretVersion, VaultSecretError
from openclawd.keys.vault import VaultUnreachableError as Unreachable
from openclawd.lifecycle import Lifecycle

from .test_manager import PATH, FakeVault, manager_for

OTHER = "openclawd/openai-next"


class HangingVault(FakeVault):
    """Answers until ``hang`` is set; from then on every call waits forever (a Vault
    that accepted the connection and never answers)."""

    def __init__(self) -> None:
        super().__init__()
        self.hang = False

    async def _enter(self, call: str) -> None:
        await super()._enter(call)
        if self.hang:
            await trio.sleep_forever()


class StrictVault(FakeVault):
    """Metadata of a path that does not exist is an error, as Vault's 404 is."""

    async def read_metadata(self, path: str) -> SecretMetadata:
        if not self.versions.get(path):
            await self._enter("metadata")
            raise VaultSecretError("not found in Vault")
        return await super().read_metadata(path)

    def destroy(self, path: str) -> None:
        del self.versions[path]


def tables(refresh: float = 30.0, timeout: float = 10.0, **provider: Any) -> dict[str, Any]:
    return {
        "vault": {
            "addr": "http://127.0.0.1:8200",
            "token_file": "/nonexistent/token",
            "refresh_interval_s": refresh,
            "request_timeout_s": timeout,
        },
        "providers": {
            "openai": {"base_url": "https://api.openai.com", "vault_path": PATH, **provider}
        },
    }


def make(vault: FakeVault, **kwargs: Any) -> tuple[KeyManager, Lifecycle]:
    return manager_for(vault, config.parse(tables(**kwargs)))


# --- reload -------------------------------------------------------------------------------


async def test_a_shorter_refresh_interval_applies_to_the_wait_under_way(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = FakeVault()
    vault.write(PATH, api_key="sk-one")
    manager, _ = make(vault, refresh=30.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        await trio.sleep_until(5)
        await manager.reload(config.parse(tables(refresh=8.0)))
        await trio.sleep_until(20)
        # The wait begun at 0 ends at 0 + 8, not at 30; then every 8 s.
        assert vault.times("metadata") == [8.0, 16.0]
        await manager.reload(config.parse(tables(refresh=3.0)))  # at 20: 16 + 3 is past
        await trio.sleep_until(24)
        assert vault.times("metadata") == [8.0, 16.0, 20.0, 23.0]
        await manager.reload(config.parse(tables(refresh=30.0)))  # longer: 23 + 30
        await trio.sleep_until(60)
        assert vault.times("metadata") == [8.0, 16.0, 20.0, 23.0, 53.0]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("change", "secret"),
    [({"vault_path": OTHER}, "sk-next"), ({"key_field": "backup"}, "sk-backup")],
    ids=["vault_path", "key_field"],
)
async def test_a_new_key_source_is_taken_even_at_the_same_version(
    autojump_clock: trio.testing.MockClock, change: dict[str, Any], secret: str
) -> None:
    vault = FakeVault()
    vault.write(PATH, api_key="sk-one", backup="sk-backup")
    vault.write(OTHER, api_key="sk-next")  # version 1 too: only the source differs
    manager, _ = make(vault)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        await manager.reload(config.parse(tables(**change)))
        key = manager.current("openai")
        assert key is not None
        assert (key.version, key.secret) == (1, secret)
        assert manager.rotations[("openai", "reload")] == 1
        # The next polls see the same version at the new source: nothing more changes.
        await trio.sleep_until(65)
        assert manager.current("openai") is key
        assert manager.statistics().providers["openai"].last_error is None
        nursery.cancel_scope.cancel()


async def test_a_new_source_whose_field_is_missing_keeps_the_key_and_says_why(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = FakeVault()
    vault.write(PATH, api_key="sk-one")
    manager, _ = make(vault)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        kept = manager.current("openai")
        await manager.reload(config.parse(tables(key_field="nope")))
        assert manager.current("openai") is kept
        error = "version 1 field 'nope' is missing"
        assert manager.statistics().providers["openai"].last_error == error
        await trio.sleep_until(31)  # the poll finds the same version: still wrong
        assert manager.statistics().providers["openai"].last_error == error
        nursery.cancel_scope.cancel()


# --- the operator's rotation, bounded ----------------------------------------------------


async def test_rotate_gives_up_after_the_request_timeout_while_vault_hangs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = HangingVault()
    vault.write(PATH, api_key="sk-one")
    manager, lifecycle = make(vault, refresh=5.0, timeout=10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        kept = manager.current("openai")
        vault.hang = True
        await trio.sleep_until(7)  # the poll at 5 hangs
        with trio.fail_after(60), pytest.raises(Unreachable) as caught:
            await manager.rotate_now()
        assert str(caught.value) == "Vault did not answer within 10s"
        assert trio.current_time() == 17.0
        assert manager.current("openai") is kept
        stats = manager.statistics()
        assert stats.reachable is False
        assert stats.last_error == "Vault did not answer within 10s"
        assert lifecycle.state.value == "degraded"
        # Vault answers again: the next rotation works.
        vault.hang = False
        vault.write(PATH, api_key="sk-two")
        assert await manager.rotate_now("openai") == {"openai": (1, 2, True)}
        nursery.cancel_scope.cancel()


async def test_a_reload_while_vault_hangs_is_bounded_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """SIGHUP re-reads every key; systemd waits for READY=1 meanwhile, so that read has
    the same bound as the operator's."""
    vault = HangingVault()
    vault.write(PATH, api_key="sk-one")
    manager, _ = make(vault, timeout=4.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        kept = manager.current("openai")
        vault.hang = True
        with trio.fail_after(60):
            await manager.reload(config.parse(tables(refresh=8.0, timeout=4.0)))
        assert trio.current_time() == 4.0
        assert manager.config.vault.refresh_interval_s == 8.0
        assert manager.current("openai") is kept
        assert manager.statistics().last_error == "Vault did not answer within 4s"
        nursery.cancel_scope.cancel()


class SlowVault(FakeVault):
    """Answers every secret read, each after ``delay_s``: slow, but well."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    async def read_secret(self, path: str, version: int | None = None) -> SecretVersion:
        await trio.sleep(self.delay_s)
        return await super().read_secret(path, version)


async def test_a_slow_vault_answering_each_read_in_time_is_not_cut_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The bound is ``request_timeout_s`` per Vault read, not for all providers together:
    three reads of 6 s each (under 10 s) make a rotation of 18 s that succeeds."""
    vault = SlowVault(6.0)
    names = ("a", "b", "c")
    tables_ = tables(timeout=10.0)
    tables_["providers"] = {
        n: {"base_url": "https://api.openai.com", "vault_path": f"p/{n}"} for n in names
    }
    for n in names:
        vault.write(f"p/{n}", api_key=f"sk-{n}")
    manager, lifecycle = manager_for(vault, config.parse(tables_))
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        for n in names:
            vault.write(f"p/{n}", api_key=f"sk-{n}-2")
        started = trio.current_time()
        result = await manager.rotate_now()
        assert trio.current_time() - started == 18.0
        assert result == {n: (1, 2, True) for n in names}
        assert manager.statistics().reachable is True
        assert lifecycle.state.value == "ready"
        nursery.cancel_scope.cancel()


# --- a secret missing from Vault -----------------------------------------------------------


async def test_a_secret_missing_at_start_is_named_in_the_providers_last_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = StrictVault()  # nothing written
    manager, lifecycle = make(vault)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        assert manager.statistics().providers["openai"].last_error == "not found in Vault"
        await trio.sleep_until(31)  # the metadata poll of the missing path
        assert vault.times("metadata") == [30.0]
        assert manager.statistics().providers["openai"].last_error == "not found in Vault"
        assert lifecycle.not_ready_reasons() == ["no key for openai"]
        vault.write(PATH, api_key="sk-one")
        await trio.sleep_until(61)
        assert manager.current("openai") is not None
        assert manager.statistics().providers["openai"].last_error is None
        nursery.cancel_scope.cancel()


async def test_a_secret_removed_later_is_named_and_the_key_kept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = StrictVault()
    vault.write(PATH, api_key="sk-one")
    manager, _ = make(vault)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        kept = manager.current("openai")
        vault.destroy(PATH)
        await trio.sleep_until(31)
        assert manager.current("openai") is kept
        assert manager.statistics().providers["openai"].last_error == "not found in Vault"
        # The operator's rotation finds it missing too: the key in force stays.
        assert await manager.rotate_now() == {"openai": (1, 1, False)}
        assert manager.statistics().providers["openai"].last_error == "not found in Vault"
        nursery.cancel_scope.cancel()


async def test_a_secret_missing_when_vault_comes_back_after_a_failed_login(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = StrictVault()  # nothing written, and Vault down at first
    vault.down = True
    manager, _ = make(vault)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        # Vault never answered: nothing is known of the secret yet; the Vault error says why.
        assert manager.statistics().last_error == "Vault unreachable: ConnectionError"
        vault.down = False
        await trio.sleep_until(2)  # the login retried at 1 s
        assert manager.statistics().providers["openai"].last_error == "not found in Vault"
        nursery.cancel_scope.cancel()


class GatedVault(FakeVault):
    """Holds every read of ``gated`` until ``release`` is set: a poll of the old path that
    is still under way when a reload moves the provider elsewhere."""

    def __init__(self, gated: str) -> None:
        super().__init__()
        self.gated = gated
        self.holding = trio.Event()
        self.release = trio.Event()

    async def read_metadata(self, path: str) -> SecretMetadata:
        if path == self.gated and not self.release.is_set():
            self.holding.set()
            await self.release.wait()
        return await super().read_metadata(path)


async def test_a_poll_of_the_old_source_does_not_undo_a_reload(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = GatedVault(PATH)
    vault.write(PATH, api_key="sk-old")
    vault.release.set()
    manager, _ = make(vault, refresh=5.0)
    vault.write(OTHER, api_key="sk-new")
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        vault.release = trio.Event()
        vault.write(PATH, api_key="sk-old2")  # news at the old source, read by the poll
        await vault.holding.wait()  # the poll is reading the old path ...
        await manager.reload(config.parse(tables(refresh=5.0, vault_path=OTHER)))
        key = manager.current("openai")
        assert key is not None
        assert key.secret == "sk-new"
        vault.release.set()  # ... and finishes after the reload
        await trio.sleep(1)
        assert manager.current("openai") is key
        assert manager.rotations[("openai", "vault")] == 1  # the first load only
        nursery.cancel_scope.cancel()


async def test_a_reload_that_adds_the_first_provider_logs_in_and_follows_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Started with no provider, the manager has not logged in to Vault; the reload that
    brings the first one must (then load its key and poll it), not leave it keyless."""
    vault = FakeVault()
    vault.write(PATH, api_key="sk-one")
    empty = tables(refresh=5.0)
    del empty["providers"]
    manager, lifecycle = manager_for(vault, config.parse(empty))
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        assert vault.times("login") == []
        await trio.sleep_until(3)
        await manager.reload(config.parse(tables(refresh=5.0)))
        await trio.sleep_until(4)
        key = manager.current("openai")
        assert key is not None
        assert key.secret == "sk-one"
        assert vault.times("login") == [3.0]
        assert lifecycle.ready
        vault.write(PATH, api_key="sk-two")
        await trio.sleep_until(9)  # polled at 3 + 5
        key = manager.current("openai")
        assert key is not None
        assert key.secret == "sk-two"
        nursery.cancel_scope.cancel()
