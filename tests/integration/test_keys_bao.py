"""The key manager against a real OpenBao dev server (``bao`` from the test extra).

Real Vault client (hvac in worker threads), real clock, short intervals. Admin writes go
through the root token in a worker thread. Every test runs under ``trio.fail_after``.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from openclawd import config
from openclawd.errors import UnknownProviderError
from openclawd.keys.manager import KeyManager
from openclawd.keys.vault import (
    SecretMetadata,
    SecretVersion,
    TokenInfo,
    Vault,
    VaultError,
    VaultUnreachableError,
)
from openclawd.lifecycle import Lifecycle
from openclawd.logs import LogfmtFormatter

from ..bao import BaoServer, running_bao, shared_bao  # noqa: F401 - shared_bao is a fixture
from ..conftest import doc_blocks

PATH = "openclawd/openai"  # each test's own path under the session's server: see ``bao``
# Tests that stop the server or revoke what it issued have one of their own.
OWN_SERVER = {
    "test_approle_logs_in_again_when_renewal_is_refused",
    "test_vault_stopped_degrades_and_keeps_keys_then_recovers",
    "test_vault_down_at_start_then_up",
    "test_no_key_in_logs_or_statistics_during_a_rotation_run",
}
OTHER_PATH = "openclawd/other"
_paths = itertools.count()


@pytest.fixture
def bao(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[BaoServer]:
    """The session's dev server, with ``PATH`` (and the other path a test writes) made
    the test's own so versions start at 1; or a server of the test's own, for a test
    in ``OWN_SERVER``."""
    n = next(_paths)
    monkeypatch.setattr(sys.modules[__name__], "PATH", f"openclawd/keys{n}/openai")
    monkeypatch.setattr(sys.modules[__name__], "OTHER_PATH", f"openclawd/keys{n}/other")
    if request.node.originalname in OWN_SERVER:
        with running_bao() as server:
            yield server
    else:
        yield request.getfixturevalue("shared_bao")


PROVIDER = "openai"
# The least-privilege policy exactly as docs/operations.md gives it to operators, so the tests
# that run the daemon on it prove that policy is enough.
(READ_POLICY,) = doc_blocks("docs/operations.md", "hcl", "Keys and Vault")

_T = TypeVar("_T")


class CountingVault(Vault):
    """The real Vault boundary, counting the calls the manager makes; what each login and
    renewal came to is kept too (``outcome`` waits for it)."""

    def __init__(self, cfg: config.VaultConfig) -> None:
        super().__init__(cfg)
        self.calls: Counter[str] = Counter()
        self.outcomes: list[tuple[str, TokenInfo | VaultError]] = []
        self._answered = trio.Event()

    async def _watched(self, call: str, result: Awaitable[TokenInfo]) -> TokenInfo:
        try:
            info = await result
        except VaultError as exc:
            self._answer(call, exc)
            raise
        self._answer(call, info)
        return info

    def _answer(self, call: str, result: TokenInfo | VaultError) -> None:
        self.outcomes.append((call, result))
        self._answered.set()
        self._answered = trio.Event()

    async def outcome(self, call: str) -> TokenInfo | VaultError:
        """What the first ``call`` ("login", "renew") came to, once it has."""
        while True:
            for made, result in self.outcomes:
                if made == call:
                    return result
            await self._answered.wait()

    async def login(self) -> TokenInfo:
        self.calls["login"] += 1
        return await self._watched("login", super().login())

    async def renew(self) -> TokenInfo:
        self.calls["renew"] += 1
        return await self._watched("renew", super().renew())

    async def read_metadata(self, path: str) -> SecretMetadata:
        self.calls["read_metadata"] += 1
        return await super().read_metadata(path)

    async def read_secret(self, path: str, version: int | None = None) -> SecretVersion:
        self.calls["read_secret"] += 1
        return await super().read_secret(path, version)


@dataclass
class Harness:
    config: config.Config
    vault: CountingVault
    lifecycle: Lifecycle
    manager: KeyManager


def make(
    bao: BaoServer,  # noqa: F811
    tmp_path: Path,
    *,
    refresh_interval_s: float = 0.2,
    vault: dict[str, Any] | None = None,
    providers: dict[str, dict[str, Any]] | None = None,
) -> Harness:
    """A KeyManager on the real Vault client; token auth with the root token by default."""
    token_file = tmp_path / "vault-token"
    if not token_file.exists():
        token_file.write_text(bao.root_token + "\n")
    vault_table: dict[str, Any] = {
        "addr": bao.addr,
        "auth": "token",
        "token_file": str(token_file),
        "refresh_interval_s": refresh_interval_s,
        "request_timeout_s": 2.0,
    }
    vault_table.update(vault or {})
    if providers is None:
        providers = {PROVIDER: {"base_url": "http://127.0.0.1:9", "vault_path": PATH}}
    cfg = config.parse(
        {"vault": vault_table, "providers": providers},
        source=str(tmp_path / "openclawd.toml"),
        environ={},
    )
    counting = CountingVault(cfg.vault)
    lifecycle = Lifecycle()
    lifecycle.set_listening()
    manager = KeyManager(cfg, counting, lifecycle, jitter=lambda: 0.05)
    return Harness(cfg, counting, lifecycle, manager)


async def admin(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """A blocking admin call (hvac, process control) in a worker thread."""
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


async def wait_for(predicate: Callable[[], object], what: str, within_s: float = 5.0) -> float:
    """Poll ``predicate`` until true; returns the seconds it took."""
    start = trio.current_time()
    while not predicate():  # noqa: ASYNC110 - the manager has no change event to wait on
        if trio.current_time() - start > within_s:
            raise AssertionError(f"timed out after {within_s} s waiting for {what}")
        await trio.sleep(0.02)
    return trio.current_time() - start


def version_of(h: Harness) -> int | None:
    key = h.manager.current(PROVIDER)
    return None if key is None else key.version


def state(h: Harness) -> str:
    """The lifecycle state (a function: each read is fresh, for mypy's narrowing too)."""
    return h.lifecycle.state.value


def last_error(h: Harness) -> str | None:
    return h.manager.statistics().providers[PROVIDER].last_error


def sha(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:12]


# --- loading and following ---------------------------------------------------------------------


async def test_token_auth_loads_the_key_and_the_daemon_becomes_ready(
    bao: BaoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    secret = "sk-token-auth-0123456789"
    assert await admin(bao.write, PATH, api_key=secret) == 1
    h = make(bao, tmp_path)
    assert not h.lifecycle.ready  # no key yet: blocked
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(h.manager.serve)
            key = h.manager.current(PROVIDER)
            assert key is not None
            assert key.version == 1
            assert key.index == 0
            assert key.secret == secret
            assert key.fingerprint == sha(secret)
            assert secret not in repr(key)
            assert secret not in str(key)
            assert repr(key) == f"<Key openai v1 #0 {sha(secret)}>"

            assert h.lifecycle.ready
            assert state(h) == "ready"
            stats = h.manager.statistics()
            assert stats.addr == bao.addr
            assert stats.auth == "token"
            assert stats.reachable is True
            assert stats.token_ttl_s is None  # the root token never expires
            assert stats.last_error is None
            assert stats.vault_errors == 0
            assert stats.providers[PROVIDER].last_error is None
            snapshot = stats.providers[PROVIDER].key
            assert snapshot is not None
            assert (snapshot.version, snapshot.fingerprint, snapshot.pool_size) == (
                1,
                sha(secret),
                1,
            )
            assert h.vault.calls["login"] == 1
            nursery.cancel_scope.cancel()


async def test_token_auth_with_a_policy_scoped_token(
    bao: BaoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    await admin(bao.write, PATH, api_key="sk-scoped")
    await admin(bao.write_policy, "openclawd-read", READ_POLICY)
    token = await admin(bao.create_token, "1h", ["openclawd-read"])
    (tmp_path / "vault-token").write_text(token)
    h = make(bao, tmp_path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(h.manager.serve)
            key = h.manager.current(PROVIDER)
            assert key is not None
            assert key.secret == "sk-scoped"
            ttl = h.manager.statistics().token_ttl_s
            assert ttl is not None
            assert 3590 <= ttl <= 3600
            nursery.cancel_scope.cancel()


async def test_a_new_kv_version_is_picked_up_within_refresh_interval(
    bao: BaoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    await admin(bao.write, PATH, api_key="sk-one")
    h = make(bao, tmp_path, refresh_interval_s=0.2)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(h.manager.serve)
            first = h.manager.current(PROVIDER)
            assert first is not None
            assert first.version == 1
            # the first load counts as a vault-triggered rotation from None to 1
            assert h.manager.rotations == {(PROVIDER, "vault"): 1}

            # A few polls with nothing new: no secret read.
            await wait_for(lambda: h.vault.calls["read_metadata"] >= 3, "three polls")
            assert h.vault.calls["read_secret"] == 1
            assert h.manager.current(PROVIDER) is first

            polls = h.vault.calls["read_metadata"]
            assert await admin(bao.write, PATH, api_key="sk-two") == 2
            # Picked up by the poll (the default interval is 30 s: wait_for gives up at 5).
            await wait_for(lambda: version_of(h) == 2, "version 2")
            assert h.vault.calls["read_metadata"] > polls
            key = h.manager.current(PROVIDER)
            assert key is not None
            assert key.secret == "sk-two"
            assert key.fingerprint == sha("sk-two")
            assert h.manager.rotations[(PROVIDER, "vault")] == 2
            assert h.vault.calls["read_secret"] == 2
            assert first.secret == "sk-one"  # work in flight keeps its key object
            nursery.cancel_scope.cancel()


async def test_a_list_is_a_pool(bao: BaoServer, tmp_path: Path) -> None:  # noqa: F811
    await admin(bao.write, PATH, api_key=["k1", "k2", "k3"])
    h = make(bao, tmp_path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(h.manager.serve)
            snapshot = h.manager.statistics().providers[PROVIDER].key
            assert snapshot is not None
            assert snapshot.pool_size == 3
            assert snapshot.version == 1
            assert snapshot.fingerprint == sha("k1")
            key = h.manager.current(PROVIDER)
            assert key is not None
            assert (key.secret, key.index, key.version) == ("k1", 0, 1)
            nursery.cancel_scope.cancel()


async def test_soft_deleted_and_malformed_versions_keep_the_old_key(
    bao: BaoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    await admin(bao.write, PATH, api_key="sk-good")
    # polls only when asked (poll_soon), so each bad version is seen for sure
    h = make(bao, tmp_path, refresh_interval_s=60)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(h.manager.serve)
            good = h.manager.current(PROVIDER)
            assert good is not None
            assert good.version == 1

            async def expect_kept(error: str) -> None:
                h.manager.poll_soon()
                await wait_for(lambda: last_error(h) == error, repr(error))
                assert h.manager.current(PROVIDER) is good
                stats = h.manager.statistics()
                assert stats.reachable is True
                snapshot = stats.providers[PROVIDER].key
                assert snapshot is not None
                assert (snapshot.version, snapshot.fingerprint) == (1, sha("sk-good"))
                assert h.lifecycle.ready

            assert await admin(bao.write, PATH, api_key="sk-deleted") == 2
            await admin(bao.soft_delete_latest, PATH)
            await expect_kept("current version 2 is deleted")

            assert await admin(bao.write, PATH, other="x") == 3
            await expect_kept("version 3 field 'api_key' is missing")

            assert await admin(bao.write, PATH, api_key=42) == 4
            await expect_kept("version 4 field 'api_key' must be a string or a list of strings")

            assert await admin(bao.write, PATH, api_key="") == 5
            await expect_kept("version 5 field 'api_key' holds an empty key")

            assert await admin(bao.write, PATH, api_key=["sk-a", "  "]) == 6
            await expect_kept("version 6 field 'api_key' holds an empty key")

            assert h.manager.rotations == {(PROVIDER, "vault"): 1}

            assert await admin(bao.write, PATH, api_key="sk-fixed") == 7
            h.manager.poll_soon()
            await wait_for(lambda: version_of(h) == 7, "version 7")
            assert last_error(h) is None
            key = h.manager.current(PROVIDER)
            assert key is not None
            assert key.secret == "sk-fixed"
            assert h.manager.rotations == {(PROVIDER, "vault"): 2}
            nursery.cancel_scope.cancel()


async def test_soft_deleted_latest_version_on_operator_rotation(
    bao: BaoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """rotate_now reads the latest version directly: a deleted one is an error too."""
    await admin(bao.write, PATH, api_key="sk-good")
    h = make(bao, tmp_path, refresh_interval_s=60)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(h.manager.serve)
            good = h.manager.current(PROVIDER)
            await admin(bao.write, PATH, api_key="sk-deleted")
            await admin(bao.soft_delete_latest, PATH)
            assert await h.manager.rotate_now(PROVIDER) == {PROVIDER: (1, 1, False)}
            assert h.manager.current(PROVIDER) is good
            error = last_error(h)
            assert error is not None
            assert error == f"secret/{PATH} version 2 is deleted in Vault"
            nursery.cancel_scope.cancel()


# --- triggers ------------------------------------------------------------------------------


async def test_operator_rotation_returns_from_and_to_versions(
    bao: BaoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    await admin(bao.write, PATH, api_key="sk-one")
    h = make(bao, tmp_path, refresh_interval_s=60)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(h.manager.serve)
            first = h.manager.current(PROVIDER)
            assert await h.manager.rotate_now() == {PROVIDER: (1, 1, False)}
            assert h.manager.current(PROVIDER) is first
            assert h.manager.rotations[(PROVIDER, "operator")] == 0

            assert await admin(bao.write, PATH, api_key="sk-two") == 2
            assert await h.manager.rotate_now(PROVIDER) == {PROVIDER: (1, 2, True)}
            key = h.manager.current(PROVIDER)
            assert key is not None
            assert (key.version, key.secret) == (2, "sk-two")
            assert h.manager.rotations[(PROVIDER, "operator")] == 1

            assert await admin(bao.write, PATH, api_key="sk-three") == 3
            assert await h.manager.rotate_now() == {PROVIDER: (2, 3, True)}
            assert h.manager.rotations[(PROVIDER, "operator")] == 2
            assert h.manager.rotations[(PROVIDER, "vault")] == 1  # the first load only

            with pytest.raises(UnknownProviderError, match="nope"):
                await h.manager.rotate_now("nope")
            nursery.cancel_scope.cancel()


async def test_auth_failure_burst_reads_vault_once(
    bao: BaoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    await admin(bao.write, PATH, api_key="sk-revoked")
    h = make(bao, tmp_path, refresh_interval_s=60)  # no poll in the way
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(h.manager.serve)
            failed = h.manager.current(PROVIDER)
            assert failed is not None
            assert await admin(bao.write, PATH, api_key="sk-new") == 2
            reads_before = h.vault.calls["read_secret"]

            results: list[Any] = []

            async def one() -> None:
                results.append(await h.manager.auth_failure(PROVIDER, failed))

            async with trio.open_nursery() as burst:
                for _ in range(50):
                    burst.start_soon(one)

            assert h.vault.calls["read_secret"] - reads_before == 1
            assert len(results) == 50
            new = h.manager.current(PROVIDER)
            assert new is not None
            assert (new.version, new.secret) == (2, "sk-new")
            assert all(r is new for r in results)
            assert h.manager.rotations[(PROVIDER, "auth_failure")] == 1
            nursery.cancel_scope.cancel()


async def test_auth_failure_moves_to_the_next_key_of_the_pool(
    bao: BaoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    await admin(bao.write, PATH, api_key=["k1", "k2"])
    h = make(bao, tmp_path, refresh_interval_s=60)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(h.manager.serve)
            k1 = h.manager.current(PROVIDER)
            assert k1 is not None
            assert k1.secret == "k1"

            k2 = await h.manager.auth_failure(PROVIDER, k1)
            assert k2 is not None
            assert (k2.secret, k2.index, k2.version) == ("k2", 1, 1)
            assert h.manager.current(PROVIDER) is k2
            assert h.manager.rotations[(PROVIDER, "auth_failure")] == 1
            # a late 401 for the key already left behind changes nothing
            assert await h.manager.auth_failure(PROVIDER, k1) is k2
            # k2 refused as well: round the pool, back to k1
            again = await h.manager.auth_failure(PROVIDER, k2)
            assert again is not None
            assert again.secret == "k1"
            assert h.manager.rotations[(PROVIDER, "auth_failure")] == 2
            nursery.cancel_scope.cancel()


async def test_reload_reads_a_new_provider_and_keeps_the_others(
    bao: BaoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    await admin(bao.write, PATH, api_key="sk-openai")
    await admin(bao.write, OTHER_PATH, token="sk-other")
    h = make(bao, tmp_path, refresh_interval_s=60)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(h.manager.serve)
            openai = h.manager.current(PROVIDER)
            assert openai is not None
            providers = {
                PROVIDER: {"base_url": "http://127.0.0.1:9", "vault_path": PATH},
                "other": {
                    "base_url": "http://127.0.0.1:9",
                    "vault_path": OTHER_PATH,
                    "key_field": "token",
                },
            }
            await h.manager.reload(make(bao, tmp_path, providers=providers).config)
            other = h.manager.current("other")
            assert other is not None
            assert (other.secret, other.version) == ("sk-other", 1)
            assert h.manager.current(PROVIDER) is openai
            assert h.manager.rotations == {(PROVIDER, "vault"): 1, ("other", "reload"): 1}
            assert state(h) == "ready"
            nursery.cancel_scope.cancel()


# --- the token -----------------------------------------------------------------------------


async def approle_harness(
    bao: BaoServer,  # noqa: F811
    tmp_path: Path,
    *,
    token_ttl: str,
    token_max_ttl: str,
    refresh_interval_s: float,
) -> Harness:
    await admin(bao.write_policy, "openclawd-read", READ_POLICY)
    role_id, secret_id = await admin(
        bao.enable_approle,
        "openclawd",
        token_ttl=token_ttl,
        token_max_ttl=token_max_ttl,
        policies=["openclawd-read"],
    )
    (tmp_path / "role-id").write_text(role_id)
    (tmp_path / "secret-id").write_text(secret_id)
    return make(
        bao,
        tmp_path,
        refresh_interval_s=refresh_interval_s,
        vault={
            "auth": "approle",
            "token_file": "",
            "role_id_file": str(tmp_path / "role-id"),
            "secret_id_file": str(tmp_path / "secret-id"),
        },
    )


async def test_approle_renews_then_logs_in_again(
    bao: BaoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    await admin(bao.write, PATH, api_key="sk-approle-1")
    # Vault caps a renewal at max TTL - whole seconds elapsed: the renewal at ~2 s gets
    # the full 3 s, the one at ~4 s gets 1 s (< 2/3 of 3): log in again.
    h = await approle_harness(
        bao, tmp_path, token_ttl="3s", token_max_ttl="5s", refresh_interval_s=0.2
    )
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            start = trio.current_time()
            await nursery.start(h.manager.serve)
            key = h.manager.current(PROVIDER)
            assert key is not None
            assert key.secret == "sk-approle-1"
            stats = h.manager.statistics()
            assert stats.auth == "approle"
            assert stats.token_ttl_s is not None
            assert 0 < stats.token_ttl_s <= 3
            assert h.vault.calls["login"] == 1

            await wait_for(lambda: h.vault.calls["renew"] >= 1, "a renewal", within_s=3)
            assert h.vault.calls["login"] == 1  # renewed, not logged in again
            await wait_for(lambda: h.vault.calls["login"] >= 2, "a second login", within_s=3)
            assert h.vault.calls["renew"] == 2
            # In time, before the first token's max TTL ran out: no read failed (checked
            # below, once that TTL is over).
            assert h.manager.statistics().vault_errors == 0

            # the first token's max TTL is over: reads keep working on the new token
            await trio.sleep_until(start + 5.3)
            assert await admin(bao.write, PATH, api_key="sk-approle-2") == 2
            await wait_for(lambda: version_of(h) == 2, "version 2 after re-login")
            key = h.manager.current(PROVIDER)
            assert key is not None
            assert key.secret == "sk-approle-2"
            stats = h.manager.statistics()
            assert stats.reachable is True
            assert stats.vault_errors == 0
            assert stats.last_error is None
            assert state(h) == "ready"
            nursery.cancel_scope.cancel()


async def test_approle_logs_in_again_when_renewal_is_refused(
    bao: BaoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Our token is revoked: the renewal at 2/3 of its TTL is refused (403), and the
    manager must log in again at once (issue 3: "when renewal is refused ... log in
    again"), not retry the renewal of a dead token until a poll happens to fail."""
    await admin(bao.write, PATH, api_key="sk-approle-1")
    h = await approle_harness(
        bao, tmp_path, token_ttl="3s", token_max_ttl="1h", refresh_interval_s=60
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(h.manager.serve)
            assert h.vault.calls["login"] == 1
            await admin(bao.revoke_prefix, "auth/approle/login")

            await wait_for(lambda: h.vault.calls["renew"] >= 1, "the renewal", within_s=3)
            await wait_for(lambda: h.vault.calls["login"] >= 2, "a new login", within_s=2)
            assert await admin(bao.write, PATH, api_key="sk-approle-2") == 2
            assert await h.manager.rotate_now() == {PROVIDER: (1, 2, True)}
            nursery.cancel_scope.cancel()


async def test_token_auth_reports_degraded_when_the_token_cannot_be_renewed(
    bao: BaoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A token that cannot be renewed: at 2/3 of its TTL token_file is read again and
    holds nothing newer: degraded ("vault token cannot be renewed"), keys kept. A fresh
    token written to token_file (as an agent would) is picked up and the daemon recovers.

    Non-renewable, 5 s: whatever Vault's rounding of ``ttl`` to whole seconds, the file
    is read again with 1-2 s left on the token.
    """
    await admin(bao.write, PATH, api_key="sk-token-1")
    await admin(bao.write_policy, "openclawd-read", READ_POLICY)
    short = await admin(bao.create_token, "5s", ["openclawd-read"], renewable=False)
    (tmp_path / "vault-token").write_text(short)
    h = make(bao, tmp_path, refresh_interval_s=0.2)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(h.manager.serve)
            kept = h.manager.current(PROVIDER)
            assert kept is not None
            assert state(h) == "ready"
            await wait_for(
                lambda: "vault token cannot be renewed" in h.lifecycle.degradations(),
                "degraded for the token",
                within_s=5,
            )
            assert h.vault.calls["renew"] == 0
            assert h.vault.calls["login"] == 2  # the start, and the re-read of the file
            assert state(h) == "degraded"
            assert h.lifecycle.ready
            assert h.manager.current(PROVIDER) is kept

            fresh = await admin(bao.create_token, "1h", ["openclawd-read"])
            (tmp_path / "vault-token").write_text(fresh)
            await wait_for(lambda: state(h) == "ready", "recovered", within_s=5)
            ttl = h.manager.statistics().token_ttl_s
            assert ttl is not None
            assert ttl > 3000
            assert await admin(bao.write, PATH, api_key="sk-token-2") == 2
            await wait_for(lambda: version_of(h) == 2, "version 2 on the fresh token")
            assert h.manager.current(PROVIDER) is not kept
            nursery.cancel_scope.cancel()


async def test_a_token_in_its_last_half_second_is_not_taken_for_a_non_expiring_one(
    bao: BaoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Vault rounds a token's ``ttl`` to whole seconds: with < 0.5 s left, lookup-self
    says ``ttl: 0`` but ``expire_time`` is set. Only a token without ``expire_time``
    (root, or no TTL) never expires. A renewable 1 s token, looked up in its last half
    second, must be taken for one that expires and renewed at once, not left to expire.

    Real time decides whether the manager's login lands in that half second: it starts
    0.6 s after the token was made (never earlier, so never with ``ttl`` 1). On a loaded
    machine the login, or the renewal that follows it at once, may come after the token
    expired: that attempt proves nothing and is made again with a fresh token, so a slow
    machine makes the test pass later, never fail. A manager that took the token for a
    non-expiring one fails every attempt (and so the test, at its ``fail_after``).
    """
    await admin(bao.write, PATH, api_key="sk-last-half-second")
    await admin(bao.write_policy, "openclawd-read", READ_POLICY)
    with trio.fail_after(60):
        for _attempt in itertools.count(1):
            token = await admin(bao.create_token, "1s", ["openclawd-read"])
            made = trio.current_time()  # after Vault made it: its expiry is within 1 s
            (tmp_path / "vault-token").write_text(token)
            h = make(bao, tmp_path, refresh_interval_s=0.2)
            # Where the login lands in the token's life (not a wait for an event): with
            # at most 0.4 s left, lookup-self rounds its ttl to 0.
            await trio.sleep_until(made + 0.6)
            async with trio.open_nursery() as nursery:
                await nursery.start(h.manager.serve)
                login = await h.vault.outcome("login")
                if isinstance(login, VaultError):  # the token expired first: too late
                    nursery.cancel_scope.cancel()
                    continue
                assert (login.ttl_s, login.expires) == (0, True)  # its last half second
                assert h.manager.current(PROVIDER) is not None
                ttl = h.manager.statistics().token_ttl_s
                assert ttl is not None, (
                    "a token with < 0.5 s left is taken for one that never expires"
                )
                assert ttl <= 1
                renewal = await h.vault.outcome("renew")  # none: the fail_after ends the test
                if isinstance(renewal, VaultError):  # renewed at once, but still too late
                    nursery.cancel_scope.cancel()
                    continue
                assert renewal.ttl_s >= 1  # renewed in time: a new second to live
                stats = h.manager.statistics()
                assert stats.reachable is True
                assert stats.vault_errors == 0
                assert state(h) == "ready"
                nursery.cancel_scope.cancel()
            return


# --- Vault away and back -------------------------------------------------------------------


async def test_vault_stopped_degrades_and_keeps_keys_then_recovers(
    bao: BaoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    secret = "sk-survivor"
    await admin(bao.write, PATH, api_key=secret)
    h = make(bao, tmp_path, refresh_interval_s=0.2)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(h.manager.serve)
            kept = h.manager.current(PROVIDER)
            assert kept is not None
            assert state(h) == "ready"

            await admin(bao.stop)
            await wait_for(lambda: not h.manager.statistics().reachable, "unreachable")
            stats = h.manager.statistics()
            assert stats.reachable is False
            assert stats.last_error is not None
            assert stats.last_error == f"Vault at {bao.addr} refused the connection"
            assert stats.vault_errors >= 1
            assert state(h) == "degraded"
            assert h.lifecycle.ready  # degraded still serves
            assert h.manager.current(PROVIDER) is kept

            with pytest.raises(VaultUnreachableError):
                await h.manager.rotate_now()
            assert h.manager.current(PROVIDER) is kept

            errors = h.manager.statistics().vault_errors
            await wait_for(
                lambda: h.manager.statistics().vault_errors >= errors + 2, "more failed retries"
            )
            assert h.manager.current(PROVIDER) is kept
            assert state(h) == "degraded"

            # a fresh server on the same address, seeded again: version 1, the same key
            await admin(bao.start)
            assert await admin(bao.write, PATH, api_key=secret) == 1
            await wait_for(lambda: h.manager.statistics().reachable, "reachable again")
            stats = h.manager.statistics()
            assert stats.reachable is True
            assert stats.last_error is None
            assert stats.providers[PROVIDER].last_error is None
            assert state(h) == "ready"
            # same version, same key: nothing rotated, the key object in force stays
            assert h.manager.current(PROVIDER) is kept
            assert h.manager.rotations == {(PROVIDER, "vault"): 1}
            nursery.cancel_scope.cancel()


async def test_vault_down_at_start_then_up(
    bao: BaoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """No key yet and no Vault: not ready (blocked); ready once Vault answers."""
    await admin(bao.stop)
    h = make(bao, tmp_path, refresh_interval_s=0.2)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(h.manager.serve)  # returns after the first, failed attempt
            assert h.manager.current(PROVIDER) is None
            assert h.manager.statistics().reachable is False
            assert not h.lifecycle.ready
            assert state(h) == "starting"

            await admin(bao.start)
            await admin(bao.write, PATH, api_key="sk-late")
            await wait_for(lambda: h.manager.current(PROVIDER) is not None, "the key")
            assert h.manager.statistics().reachable is True
            assert state(h) == "ready"
            nursery.cancel_scope.cancel()


# --- secrets never show --------------------------------------------------------------------


async def test_no_key_in_logs_or_statistics_during_a_rotation_run(
    bao: BaoServer,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # everything: ours and our libraries'
    caplog.set_level(logging.DEBUG, logger="openclawd")
    keys = [
        "sk-LOGTEST-first-aaaaaaaaaaaa",
        "sk-LOGTEST-pool-bbbbbbbbbbbb",
        "sk-LOGTEST-pool-cccccccccccc",
        "sk-LOGTEST-bad-dddddddddddd",
        "sk-LOGTEST-deleted-eeeeeeee",
        "sk-LOGTEST-operator-ffffffff",
    ]
    await admin(bao.write, PATH, api_key=keys[0])
    h = make(bao, tmp_path, refresh_interval_s=60)  # polls when asked: no races
    seen: list[str] = []
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await nursery.start(h.manager.serve)
            seen.append(repr(h.manager.statistics()))

            await admin(bao.write, PATH, api_key=[keys[1], keys[2]])  # poll: a pool
            h.manager.poll_soon()
            await wait_for(lambda: version_of(h) == 2, "version 2")
            current = h.manager.current(PROVIDER)
            assert current is not None
            rotated = await h.manager.auth_failure(PROVIDER, current)  # next in the pool
            assert rotated is not None
            assert rotated.secret == keys[2]
            seen.append(repr(h.manager.statistics()))

            await admin(bao.write, PATH, api_key=[keys[3], ""])  # malformed
            h.manager.poll_soon()
            error = "version 3 field 'api_key' holds an empty key"
            await wait_for(lambda: last_error(h) == error, "the malformed version")
            seen.append(repr(h.manager.statistics()))
            await admin(bao.write, PATH, api_key=keys[4])
            await admin(bao.soft_delete_latest, PATH)  # deleted
            h.manager.poll_soon()
            await wait_for(lambda: last_error(h) == "current version 4 is deleted", "deleted")
            seen.append(repr(h.manager.statistics()))

            await admin(bao.write, PATH, api_key=keys[5])
            result = await h.manager.rotate_now(PROVIDER)
            assert result == {PROVIDER: (2, 5, True)}
            seen.append(repr(result))
            seen.append(repr(h.manager.statistics()))
            seen.append(repr(h.manager.current(PROVIDER)))

            await admin(bao.stop)  # and errors while Vault is away
            h.manager.poll_soon()
            await wait_for(lambda: not h.manager.statistics().reachable, "unreachable")
            seen.append(repr(h.manager.statistics()))
            nursery.cancel_scope.cancel()

    records = caplog.records
    events = [r.getMessage() for r in records if r.name.startswith("openclawd")]
    assert events.count("key.rotated") == 4  # load, poll, auth_failure, operator
    assert "key.invalid" in events
    assert "vault.error" in events
    formatter = LogfmtFormatter()
    formatted = "\n".join(formatter.format(r) for r in records)
    assert "event=key.rotated" in formatted
    texts = {
        "caplog.text": caplog.text,
        "logfmt": formatted,
        "record fields": "\n".join(repr(getattr(r, "fields", None)) for r in records),
        "statistics and results": "\n".join(seen),
    }
    for where, text in texts.items():
        for key in keys:
            assert key not in text, f"a key appears in {where}"
        assert "LOGTEST" not in text, f"part of a key appears in {where}"


async def test_vault_is_reached_directly_whatever_proxy_the_environment_names(
    bao: BaoServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await admin(bao.write, PATH, api_key="sk-direct-0001")
    # A proxy that would see the token and the secret in clear: nothing listens there, so
    # a request sent through it fails.
    dead = "http://127.0.0.1:9"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    vault = Vault(config.VaultConfig(addr=bao.addr, auth="token", request_timeout_s=5.0))
    with trio.fail_after(10):
        await vault.use_token(bao.root_token)
        secret = await vault.read_secret(PATH)
    assert secret.data["api_key"] == "sk-direct-0001"
