"""The key manager's schedules and rules, against an in-memory Vault, on trio's fake clock.

Every time asserted here is exact virtual time: the manager starts at t=0, and with
``jitter`` fixed at 1.0 the backoff is its upper bound (1, 2, 4, ... 300 s).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from openclawd import config
from openclawd.errors import UnknownProviderError
from openclawd.keys.manager import AUTH_REREAD_INTERVAL_S, Key, KeyManager, fingerprint
from openclawd.keys.vault import (
    SecretMetadata,
    SecretVersion,
    TokenInfo,
    VaultAuthError,
    VaultSecretError,
    VaultUnreachableError,
)
from openclawd.lifecycle import Lifecycle


class FakeVault:
    """KV v2 and token endpoints in memory; records (virtual time, call) for each call."""

    def __init__(self) -> None:
        self.versions: dict[str, list[dict[str, Any]]] = {}
        self.deleted: set[tuple[str, int]] = set()
        self.calls: list[tuple[float, str]] = []
        self.down = False
        self.login_ttls: list[float] = []  # successive logins' TTLs; the last repeats
        self.renew_results: list[float | Exception] = []
        self.renewable = True
        self.login_refusals = 0

    def write(self, path: str, **data: Any) -> int:
        self.versions.setdefault(path, []).append(data)
        return len(self.versions[path])

    def times(self, call: str) -> list[float]:
        return [t for t, c in self.calls if c == call]

    async def _enter(self, call: str) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append((trio.current_time(), call))
        if self.down:
            raise VaultUnreachableError("Vault unreachable: ConnectionError")

    async def login(self) -> TokenInfo:
        await self._enter("login")
        if self.login_refusals:
            self.login_refusals -= 1
            raise VaultAuthError("Vault refused: invalid role or secret ID")
        ttl = self.login_ttls.pop(0) if len(self.login_ttls) > 1 else self.login_ttls[0]
        return TokenInfo(ttl_s=ttl, renewable=self.renewable, expires=ttl > 0)

    async def renew(self) -> TokenInfo:
        await self._enter("renew")
        result = self.renew_results.pop(0)
        if isinstance(result, Exception):
            raise result
        return TokenInfo(ttl_s=result, renewable=True)

    async def read_metadata(self, path: str) -> SecretMetadata:
        await self._enter("metadata")
        current = len(self.versions.get(path, []))
        return SecretMetadata(current, (path, current) in self.deleted)

    async def read_secret(self, path: str, version: int | None = None) -> SecretVersion:
        await self._enter("secret")
        versions = self.versions.get(path)
        if not versions:
            raise VaultSecretError("not found in Vault")
        version = version or len(versions)
        if (path, version) in self.deleted:
            raise VaultSecretError("not found in Vault (deleted)")
        return SecretVersion(version, versions[version - 1])


PATH = "openclawd/openai"


def make(
    vault: FakeVault, *, auth: str = "token", required: bool = True, refresh: float = 30.0
) -> tuple[KeyManager, Lifecycle]:
    vault_table: dict[str, Any] = {
        "addr": "http://127.0.0.1:8200",
        "auth": auth,
        "refresh_interval_s": refresh,
    }
    if auth == "token":
        vault_table["token_file"] = "/nonexistent/token"
    else:
        vault_table.update(role_id_file="role", secret_id_file="secret")
    cfg = config.parse(
        {
            "vault": vault_table,
            "providers": {
                "openai": {
                    "base_url": "https://api.openai.com",
                    "vault_path": PATH,
                    "required": required,
                }
            },
        }
    )
    return manager_for(vault, cfg)


def manager_for(vault: FakeVault, cfg: config.Config) -> tuple[KeyManager, Lifecycle]:
    """A manager of ``cfg`` over ``vault``, its daemon listening; jitter at its top, and a
    fixed wall clock, so every schedule is exact."""
    lifecycle = Lifecycle()
    lifecycle.set_listening()
    if not vault.login_ttls:
        vault.login_ttls = [0.0]  # a token that never expires, unless a test says otherwise
    return KeyManager(cfg, vault, lifecycle, jitter=lambda: 1.0, wall_clock=lambda: 1e9), lifecycle


async def run_until(
    manager: KeyManager, seconds: float, check: Callable[[], None] | None = None
) -> None:
    """Serve for ``seconds`` of virtual time from t=0, then stop."""
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        await trio.sleep_until(seconds)
        if check is not None:
            check()
        nursery.cancel_scope.cancel()


async def test_first_load_then_poll_every_refresh_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = FakeVault()
    vault.write(PATH, api_key="sk-one")
    manager, lifecycle = make(vault)
    assert lifecycle.not_ready_reasons() == ["no key for openai"]
    await run_until(manager, 95)
    assert vault.times("login") == [0.0]
    assert vault.times("secret") == [0.0]
    assert vault.times("metadata") == [30.0, 60.0, 90.0]
    key = manager.current("openai")
    assert key is not None
    assert (key.version, key.secret, key.fingerprint) == (1, "sk-one", fingerprint("sk-one"))
    assert lifecycle.ready
    assert manager.rotations == {("openai", "vault"): 1}


async def test_new_version_is_read_at_the_next_poll_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = FakeVault()
    vault.write(PATH, api_key="sk-one")
    manager, _ = make(vault)
    first: list[Key | None] = []

    async def rotate_at_45() -> None:
        first.append(manager.current("openai"))
        await trio.sleep_until(45)
        vault.write(PATH, api_key="sk-two")
        await trio.sleep_until(59)
        assert manager.current("openai") is first[0]  # not seen before the poll
        await trio.sleep_until(61)
        new = manager.current("openai")
        assert new is not None
        assert (new.version, new.secret) == (2, "sk-two")

    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        await rotate_at_45()
        nursery.cancel_scope.cancel()
    assert vault.times("secret") == [0.0, 60.0]  # the secret is read only when it changed
    assert first[0] is not None
    assert first[0].secret == "sk-one"  # work in flight keeps the key object it took
    assert manager.rotations[("openai", "vault")] == 2


async def test_vault_errors_back_off_with_full_jitter_and_keys_are_kept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = FakeVault()
    vault.write(PATH, api_key="sk-one")
    manager, lifecycle = make(vault)
    kept: list[Key | None] = []

    async def outage() -> None:
        await trio.sleep_until(35)
        kept.append(manager.current("openai"))
        vault.down = True
        await trio.sleep_until(600)
        assert manager.current("openai") is kept[0]
        assert lifecycle.state.value == "degraded"
        assert lifecycle.ready  # degraded still serves
        stats = manager.statistics()
        assert stats.reachable is False
        assert stats.last_error == "Vault unreachable: ConnectionError"
        vault.down = False

    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        await outage()
        await trio.sleep_until(1000)
        nursery.cancel_scope.cancel()
    # 30 ok; 60 fails; then 1, 2, 4, ... 256 s later (jitter at its top), capped at 300;
    # the retry at 871 works and the 30 s rhythm resumes.
    assert vault.times("metadata") == [
        30.0,
        60.0,
        61.0,
        63.0,
        67.0,
        75.0,
        91.0,
        123.0,
        187.0,
        315.0,
        571.0,
        871.0,
        901.0,
        931.0,
        961.0,
        991.0,
    ]
    assert manager.statistics().reachable is True
    assert lifecycle.state.value == "ready"
    assert manager.statistics().vault_errors == 10


async def test_backoff_is_jittered_below_its_bound() -> None:
    vault = FakeVault()
    manager, _ = make(vault)
    values = iter([0.0, 0.5, 0.25])
    manager._jitter = lambda: next(values)
    assert [manager._backoff(n) for n in (3, 3, 20)] == [0.0, 4.0, 75.0]


async def test_token_is_renewed_at_two_thirds_of_its_ttl(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = FakeVault()
    vault.write(PATH, api_key="sk-one")
    vault.login_ttls = [90.0]
    vault.renew_results = [90.0, 90.0, 90.0]
    manager, _ = make(vault, auth="approle")
    await run_until(manager, 200, lambda: None)
    assert vault.times("renew") == [60.0, 120.0, 180.0]
    assert vault.times("login") == [0.0]


async def test_approle_logs_in_again_when_the_max_ttl_nears(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = FakeVault()
    vault.write(PATH, api_key="sk-one")
    vault.login_ttls = [90.0]
    vault.renew_results = [30.0, 90.0]  # capped: the token's max TTL is 30 s away
    manager, lifecycle = make(vault, auth="approle")

    def check() -> None:
        assert manager.statistics().token_ttl_s == 90.0 - 10.0  # logged in anew at 60

    await run_until(manager, 70, check)
    assert vault.times("renew") == [60.0]
    assert vault.times("login") == [0.0, 60.0]
    assert lifecycle.state.value == "ready"


async def test_a_token_in_its_last_second_is_renewed_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = FakeVault()
    vault.write(PATH, api_key="sk-one")
    vault.login_ttls = [90.0]
    vault.renew_results = [0.0, 90.0]  # "0 s left", rounded down: still an expiring token
    manager, _ = make(vault, auth="approle")
    await run_until(manager, 65)
    assert vault.times("renew") == [60.0]
    assert vault.times("login") == [0.0, 60.0]  # 0 < 2/3 of 90: a new login, not "forever"
    assert manager.statistics().token_ttl_s == 85.0


async def test_approle_logs_in_again_when_renewal_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = FakeVault()
    vault.write(PATH, api_key="sk-one")
    vault.login_ttls = [90.0]
    vault.renew_results = [VaultAuthError("Vault refused: permission denied"), 90.0]
    manager, _ = make(vault, auth="approle")
    await run_until(manager, 125)
    assert vault.times("renew") == [60.0, 120.0]
    assert vault.times("login") == [0.0, 60.0]


async def test_a_token_that_cannot_be_renewed_reports_degraded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = FakeVault()
    vault.write(PATH, api_key="sk-one")
    vault.login_ttls = [90.0, 20.0]  # re-reading the token file brings nothing better
    vault.renew_results = [20.0]
    manager, lifecycle = make(vault, auth="token")
    await run_until(manager, 65)
    assert vault.times("login") == [0.0, 60.0]
    assert lifecycle.state.value == "degraded"
    assert lifecycle.degradations() == ["vault token cannot be renewed"]
    assert manager.current("openai") is not None


async def test_login_failure_is_retried_and_readiness_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = FakeVault()
    vault.write(PATH, api_key="sk-one")
    vault.down = True
    manager, lifecycle = make(vault)

    async def later() -> None:
        await trio.sleep_until(5)
        assert lifecycle.not_ready_reasons() == ["no key for openai"]
        vault.down = False

    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)  # returns after the first attempt
        assert trio.current_time() == 0.0
        await later()
        await trio.sleep_until(10)
        nursery.cancel_scope.cancel()
    assert vault.times("login") == [0.0, 1.0, 3.0, 7.0]
    assert lifecycle.ready


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"other": "x"}, "version 2 field 'api_key' is missing"),
        ({"api_key": 42}, "version 2 field 'api_key' must be a string or a list of strings"),
        ({"api_key": ["a", 1]}, "version 2 field 'api_key' must be a string or a list of strings"),
        ({"api_key": ""}, "version 2 field 'api_key' holds an empty key"),
        ({"api_key": []}, "version 2 field 'api_key' holds an empty key"),
    ],
)
async def test_a_malformed_secret_keeps_the_previous_key(
    autojump_clock: trio.testing.MockClock, data: dict[str, Any], error: str
) -> None:
    vault = FakeVault()
    vault.write(PATH, api_key="sk-one")
    manager, lifecycle = make(vault)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        before = manager.current("openai")
        vault.write(PATH, **data)
        await trio.sleep_until(31)
        assert manager.current("openai") is before
        assert manager.statistics().providers["openai"].last_error == error
        assert lifecycle.state.value == "ready"
        vault.write(PATH, api_key="sk-three")  # fixed by a newer version
        await trio.sleep_until(61)
        key = manager.current("openai")
        assert key is not None
        assert (key.version, key.secret) == (3, "sk-three")
        assert manager.statistics().providers["openai"].last_error is None
        nursery.cancel_scope.cancel()


async def test_a_soft_deleted_latest_version_keeps_the_previous_key(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = FakeVault()
    vault.write(PATH, api_key="sk-one")
    manager, _ = make(vault)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        vault.deleted.add((PATH, vault.write(PATH, api_key="sk-two")))
        await trio.sleep_until(31)
        key = manager.current("openai")
        assert key is not None
        assert key.version == 1
        assert manager.statistics().providers["openai"].last_error == (
            "current version 2 is deleted"
        )
        nursery.cancel_scope.cancel()


async def test_pool_and_auth_failure(autojump_clock: trio.testing.MockClock) -> None:
    vault = FakeVault()
    vault.write(PATH, api_key=["k1", "k2"])
    manager, _ = make(vault)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        first = manager.current("openai")
        assert first is not None
        assert manager.statistics().providers["openai"].key.pool_size == 2  # type: ignore[union-attr]
        reads = len(vault.times("secret"))
        results = []

        async def fail(key: Key) -> None:
            results.append(await manager.auth_failure("openai", key))

        async with trio.open_nursery() as burst:
            for _ in range(50):
                burst.start_soon(fail, first)
        assert len(vault.times("secret")) == reads + 1  # one Vault read for the burst
        assert {r.secret for r in results if r is not None} == {"k2"}  # the pool's next key
        assert len(results) == 50
        assert manager.rotations[("openai", "auth_failure")] == 1
        # Right after that read, another refusal reads nothing: the pool's next key.
        reads = len(vault.times("secret"))
        assert await manager.auth_failure("openai", results[0]) is first  # type: ignore[arg-type]
        assert len(vault.times("secret")) == reads
        # A new version in Vault wins over the pool (once the re-read interval is over).
        await trio.sleep(AUTH_REREAD_INTERVAL_S)
        vault.write(PATH, api_key=["k3"])
        second = manager.current("openai")
        assert second is not None
        newest = await manager.auth_failure("openai", second)
        assert newest is not None
        assert (newest.version, newest.secret) == (2, "k3")
        # A late report about a key we already moved past costs no Vault read.
        reads = len(vault.times("secret"))
        assert await manager.auth_failure("openai", first) is newest
        assert len(vault.times("secret")) == reads
        with pytest.raises(UnknownProviderError):
            await manager.auth_failure("nope", first)
        nursery.cancel_scope.cancel()


async def test_operator_rotation(autojump_clock: trio.testing.MockClock) -> None:
    vault = FakeVault()
    vault.write(PATH, api_key="sk-one")
    manager, _ = make(vault)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        assert await manager.rotate_now() == {"openai": (1, 1, False)}
        vault.write(PATH, api_key="sk-two")
        assert await manager.rotate_now("openai") == {"openai": (1, 2, True)}
        assert manager.rotations[("openai", "operator")] == 1
        with pytest.raises(UnknownProviderError):
            await manager.rotate_now("nope")
        vault.down = True
        kept = manager.current("openai")
        with pytest.raises(VaultUnreachableError):
            await manager.rotate_now()
        assert manager.current("openai") is kept
        assert manager.statistics().reachable is False
        nursery.cancel_scope.cancel()


async def test_reload_adds_providers_and_rereads(autojump_clock: trio.testing.MockClock) -> None:
    vault = FakeVault()
    vault.write(PATH, api_key="sk-one")
    vault.write("openclawd/other", api_key="sk-other")
    manager, lifecycle = make(vault)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        new = config.parse(
            {
                "vault": {"addr": "http://127.0.0.1:8200", "token_file": "/t"},
                "providers": {
                    "openai": {"base_url": "https://a.example", "vault_path": PATH},
                    "other": {"base_url": "https://b.example", "vault_path": "openclawd/other"},
                },
            }
        )
        vault.write(PATH, api_key="sk-two")
        await manager.reload(new)
        assert manager.current("openai").secret == "sk-two"  # type: ignore[union-attr]
        assert manager.current("other").secret == "sk-other"  # type: ignore[union-attr]
        assert manager.rotations[("openai", "reload")] == 1
        assert manager.rotations[("other", "reload")] == 1
        assert lifecycle.ready
        nursery.cancel_scope.cancel()


async def test_an_optional_provider_without_a_key_degrades_but_does_not_block(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = FakeVault()  # nothing written
    manager, lifecycle = make(vault, required=False)
    await run_until(manager, 1)
    assert lifecycle.ready
    assert lifecycle.degradations() == ["no key for openai"]
    assert manager.statistics().providers["openai"].last_error == "not found in Vault"


def test_a_key_never_shows_its_secret() -> None:
    key = Key("openai", 3, 0, fingerprint("sk-live-123"), 0.0, "sk-live-123")
    assert "sk-live-123" not in repr(key)
    assert "sk-live-123" not in str(key)
    assert "sk-live-123" not in f"{key}"
    assert repr(key) == f"<Key openai v3 #0 {fingerprint('sk-live-123')}>"
    assert fingerprint("sk-live-123").startswith("sha256:")
    assert len(fingerprint("sk-live-123")) == len("sha256:") + 12
    secret_version = SecretVersion(3, {"api_key": "sk-live-123"})
    assert "sk-live-123" not in repr(secret_version)


async def test_a_refused_login_is_retried_without_an_extra_login_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = FakeVault()
    vault.write(PATH, api_key="sk-one")
    vault.login_ttls = [90.0]
    vault.renew_results = [90.0]
    vault.login_refusals = 1
    manager, lifecycle = make(vault, auth="approle")
    await run_until(manager, 65)
    assert vault.times("login") == [0.0, 1.0]  # the retry, and no second one after it
    assert vault.times("renew") == [61.0]
    assert lifecycle.state.value == "ready"


async def test_reload_dropping_a_keyless_optional_provider_clears_its_degradation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = FakeVault()  # nothing written: the optional provider stays keyless
    manager, lifecycle = make(vault, required=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        assert lifecycle.degradations() == ["no key for openai"]
        await manager.reload(
            config.parse({"vault": {"addr": "http://127.0.0.1:8200", "token_file": "/t"}})
        )
        assert lifecycle.degradations() == []
        assert lifecycle.state.value == "ready"
        nursery.cancel_scope.cancel()


async def test_redact_withholds_every_key_held_and_those_rotated_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    vault = FakeVault()
    vault.write(PATH, api_key=["sk-pool-aaaa", "sk-pool-bbbb"])
    manager, _ = make(vault)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        vault.write(PATH, api_key="sk-new-cccc")
        await manager.rotate_now()
        text = "failed with sk-pool-aaaa, then sk-pool-bbbb, now sk-new-cccc; sk-other stays"
        assert manager.redact(text) == (
            f"failed with {fingerprint('sk-pool-aaaa')}, then {fingerprint('sk-pool-bbbb')}, "
            f"now {fingerprint('sk-new-cccc')}; sk-other stays"
        )
        nursery.cancel_scope.cancel()


async def test_refusals_after_a_fruitless_re_read_wait_but_rotations_are_followed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A 401 re-read that found nothing newer holds the next ones back for
    AUTH_REREAD_INTERVAL_S (no Vault read per request of an app on a revoked key); one that
    found a new version does not (two rotations a moment apart are both followed)."""
    vault = FakeVault()
    vault.write(PATH, api_key="k1")
    manager, _ = make(vault)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        k1 = manager.current("openai")
        assert k1 is not None
        vault.write(PATH, api_key="k2")
        k2 = await manager.auth_failure("openai", k1)
        assert k2 is not None
        assert k2.secret == "k2"
        vault.write(PATH, api_key="k3")  # rotated again, at once
        k3 = await manager.auth_failure("openai", k2)
        assert k3 is not None
        assert k3.secret == "k3"
        reads = len(vault.times("secret"))
        assert await manager.auth_failure("openai", k3) is k3  # refused, nothing newer
        reads += 1  # that one read Vault, in vain
        assert len(vault.times("secret")) == reads
        for _ in range(10):  # the app goes on with the refused key: no more reads ...
            await trio.sleep(AUTH_REREAD_INTERVAL_S / 20)
            assert await manager.auth_failure("openai", k3) is k3
        assert len(vault.times("secret")) == reads
        await trio.sleep(AUTH_REREAD_INTERVAL_S)  # ... until the interval is over
        vault.write(PATH, api_key="k4")
        k4 = await manager.auth_failure("openai", k3)
        assert k4 is not None
        assert k4.secret == "k4"
        nursery.cancel_scope.cancel()
