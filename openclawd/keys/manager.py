"""The key manager: the current key of every provider, kept in step with Vault.

Owns everything that changes the provider keys: the first load, the metadata poll every
``refresh_interval_s`` (``vault``), the operator's ``rotate_now`` (``operator``), an
upstream's 401/403 (``auth_failure``, single-flight per provider), and SIGHUP
(``reload``); and the Vault token's life (``token.py``: renewal at 2/3 of its TTL, a new
AppRole login when renewal is refused or the max TTL nears). Vault errors back off with
full jitter from 1 s up to 5 min, and the last good keys stay in force meanwhile.

``current(provider)`` is sync and never blocks: request handlers take the ``Key`` object
(``key.py``) and keep it for the whole request, so a rotation never changes a key under
work in flight. The keys themselves are held in ``store.py``; they never leave the
package except as ``Key`` objects, whose repr shows the fingerprint. Talks to Vault only
through the ``VaultAPI`` protocol (``keys.vault.Vault`` in the daemon), so the schedules
can be tested with an in-memory Vault under a fake clock.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

import trio

from openclawd import logs
from openclawd.config import Config
from openclawd.errors import VaultError
from openclawd.keys.key import (
    Key,
    KeySnapshot,
    KeyStatistics,
    ProviderKeyStatistics,
    fingerprint,
    iso_utc,
    key_values,
)
from openclawd.keys.store import KeyStore
from openclawd.keys.token import TokenKeeper
from openclawd.keys.vault import (
    SecretMetadata,
    SecretVersion,
    TokenInfo,
    VaultAuthError,
    VaultSecretError,
    VaultUnreachableError,
)
from openclawd.lifecycle import Lifecycle

__all__ = [
    "AUTH_REREAD_INTERVAL_S",
    "BACKOFF_BASE_S",
    "BACKOFF_CAP_S",
    "TRIGGERS",
    "Key",
    "KeyManager",
    "KeySnapshot",
    "KeyStatistics",
    "ProviderKeyStatistics",
    "VaultAPI",
    "fingerprint",
    "key_values",
]

log = logs.get(__name__)

BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 300.0
# After an upstream 401/403 re-read Vault and found nothing newer (or failed), the next
# refusals wait this long before reading again: an app hammering a refused key (revoked
# with nothing newer in Vault, or while Vault fails) must not hammer Vault with it. A
# read that found a new version leaves the next refusal free to read (another rotation).
AUTH_REREAD_INTERVAL_S = 1.0
TRIGGERS = ("vault", "operator", "auth_failure", "reload")


class VaultAPI(Protocol):
    async def login(self) -> TokenInfo: ...
    async def renew(self) -> TokenInfo: ...
    async def read_metadata(self, path: str) -> SecretMetadata: ...
    async def read_secret(self, path: str, version: int | None = None) -> SecretVersion: ...


class KeyManager:
    """Keys for every configured provider; run ``serve`` in the daemon's root nursery."""

    def __init__(
        self,
        config: Config,
        vault: VaultAPI,
        lifecycle: Lifecycle,
        *,
        jitter: Callable[[], float] = random.random,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._vault = vault
        self._lifecycle = lifecycle
        self._jitter = jitter
        self._wall = wall_clock
        self._keys = KeyStore(config.providers, lifecycle, wall_clock)
        self._token = TokenKeeper(
            vault,
            lifecycle,
            auth=lambda: self._config.vault.auth,
            backoff=self._backoff,
            failed=self._vault_failed,
        )
        self._reachable = False
        self._last_error: str | None = None
        self._last_refresh: float | None = None
        self._poll_now = trio.Event()
        self._has_providers = trio.Event()  # set once there is a provider to serve
        if self._keys.names():
            self._has_providers.set()
        # The metadata poll's wait under way: its scope, when it began, and the backoff it
        # waits (None: it waits refresh_interval_s, which a reload may change meanwhile).
        self._poll_wait: tuple[trio.CancelScope, float, float | None] | None = None
        self.vault_errors = 0
        self._keys.publish()

    # --- what request handlers use --------------------------------------------------------

    @property
    def config(self) -> Config:
        """The config the manager follows (the one of the last reload)."""
        return self._config

    @property
    def rotations(self) -> Counter[tuple[str, str]]:
        """How many times each (provider, trigger) changed the key in use."""
        return self._keys.rotations

    def current(self, provider: str) -> Key | None:
        """The key new work for ``provider`` should use, or None if there is none yet."""
        return self._keys.current(provider)

    # --- running --------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Log in, load every key, then keep the token alive and follow Vault until cancelled.

        ``started()`` comes once the first attempt is over, successful or not: the daemon
        listens meanwhile, and readiness waits for the keys (not for this function).
        """
        if not self._keys.names():
            # Nothing to read until a reload brings a provider; then log in as at a start.
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            await self._has_providers.wait()
        token = await self._login_with_retry(task_status)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._token.keep, token)
            nursery.start_soon(self._watch)

    async def _login_with_retry(self, task_status: trio.TaskStatus[None]) -> TokenInfo:
        """Log in and load the keys, retrying with backoff until it works.

        ``task_status.started()`` comes after the first attempt, whatever its outcome.
        """
        attempt = 0
        started = False
        while True:
            try:
                token = await self._vault.login()
                self._token.seen(token)
                await self._refresh_all("vault")
            except VaultError as exc:
                self._vault_failed("login", exc)
                delay = self._backoff(attempt)
                attempt += 1
                log.warning("vault.retry", after="login", retry_in_s=round(delay, 3))
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(delay)
                continue
            if not started:
                task_status.started()
            return token

    async def _watch(self) -> None:
        """Poll metadata every refresh_interval_s; back off while Vault fails. A reload
        that changes the interval moves the end of the wait under way."""
        backoff: float | None = None
        attempt = 0
        while True:
            with trio.CancelScope() as wait:
                self._poll_wait = (wait, trio.current_time(), backoff)
                self._schedule_poll()
                await self._poll_now.wait()
            self._poll_wait = None
            self._poll_now = trio.Event()
            try:
                await self._refresh_all("vault", only_if_changed=True)
                backoff = None
                attempt = 0
            except VaultError as exc:
                self._vault_failed("poll", exc)
                backoff = self._backoff(attempt)
                attempt += 1
                log.warning("vault.retry", after="poll", retry_in_s=round(backoff, 3))

    def _schedule_poll(self) -> None:
        """End the poll's wait at its start + the interval in force (now, if that is
        past); a backoff keeps its own end."""
        if self._poll_wait is None:
            return
        scope, since, backoff = self._poll_wait
        scope.deadline = since + (
            backoff if backoff is not None else self._config.vault.refresh_interval_s
        )

    # --- triggers -------------------------------------------------------------------------

    async def rotate_now(
        self, provider: str | None = None
    ) -> dict[str, tuple[int | None, int | None, bool]]:
        """Re-read keys from Vault now (the operator's trigger).

        Returns:
            ``{provider: (from_version, to_version, changed)}``.

        The whole operation is bounded by ``[vault] request_timeout_s``: a read queued
        behind a hung poll does not add its own timeout to the wait.

        Raises:
            UnknownProviderError: ``provider`` is not configured.
            VaultUnreachableError: Vault did not answer (within ``request_timeout_s``);
                every key in force stays.
        """
        names = self._keys.names(provider)
        before = {n: self._keys[n].version for n in names}
        try:
            await self._bounded_refresh("operator", names)
        except VaultError as exc:
            self._vault_failed("operator", exc)
            raise
        return {
            n: (before[n], self._keys[n].version, before[n] != self._keys[n].version) for n in names
        }

    async def reload(self, config: Config) -> None:
        """SIGHUP: take the new provider table and refresh interval, and re-read every key
        (``reload``), bounded as ``rotate_now`` is. A provider whose ``vault_path`` or
        ``key_field`` changed takes the new source's key whatever its version number."""
        self._config = config
        self._keys.reconfigure(config.providers)
        self._schedule_poll()
        self._keys.publish()
        if self._keys.names() and not self._has_providers.is_set():
            # The first providers: ``serve`` logs in now and loads their keys.
            self._has_providers.set()
            return
        try:
            await self._bounded_refresh("reload", self._keys.names())
        except VaultError as exc:
            self._vault_failed("reload", exc)

    async def _bounded_refresh(self, trigger: str, names: list[str]) -> None:
        """``_refresh_all`` with each provider's read bounded by ``request_timeout_s``
        (a read queued behind a hung one waits no longer than that either): a hung Vault
        ends it after that long, a slow one answering each read in time does not.

        Raises:
            VaultUnreachableError: a read got no answer in time (or Vault failed as a whole).
            VaultAuthError: every path was refused.
        """
        await self._refresh_all(
            trigger, names=names, read_timeout_s=self._config.vault.request_timeout_s
        )

    async def auth_failure(self, provider: str, failed: Key) -> Key | None:
        """The upstream refused ``failed`` (401/403): re-read now, once for a burst.

        Returns the key to retry with: the newest version's, else the next key of the
        pool, else ``failed`` itself (nothing better exists; the caller relays the error).
        Concurrent calls for one provider share a single Vault read.
        """
        state = self._keys[self._keys.names(provider)[0]]
        if state.current is not None and state.current is not failed:
            return state.current  # someone already moved on from that key
        if state.flight is not None:
            await state.flight.wait()
            return state.current
        now = trio.current_time()
        if state.auth_read_fruitless and now - state.auth_read_at < AUTH_REREAD_INTERVAL_S:
            # Vault was just read for this, in vain. The pool's next key.
            self._keys.next_in_pool(provider, state, failed, state.version)
            return state.current
        state.auth_read_at = now
        state.flight = trio.Event()
        try:
            before = state.version
            try:
                await self._refresh_one(provider, "auth_failure")
            except VaultSecretError as exc:
                self._keys.secret_failed(provider, exc)
            except VaultError as exc:
                self._vault_failed("auth_failure", exc)
            state.auth_read_fruitless = state.version == before
            if state.version == before:
                self._keys.next_in_pool(provider, state, failed, before)
            return state.current
        finally:
            state.flight.set()
            state.flight = None

    def redact(self, text: str) -> str:
        """``text`` with every key held (any provider, any pool entry, and the last ones
        rotated out) replaced by its fingerprint: a last line of defence for what the
        daemon shows operators."""
        return self._keys.redact(text)

    def poll_soon(self) -> None:
        """Check Vault now rather than at the next interval."""
        self._poll_now.set()

    # --- reading --------------------------------------------------------------------------

    async def _refresh_all(
        self,
        trigger: str,
        *,
        names: list[str] | None = None,
        only_if_changed: bool = False,
        read_timeout_s: float = math.inf,
    ) -> None:
        """Refresh the named providers (all by default), each within ``read_timeout_s``.

        Raises:
            VaultUnreachableError, VaultAuthError: Vault as a whole failed, or a read got
                no answer within ``read_timeout_s``; keys are kept.
        """
        names = names if names is not None else self._keys.names()
        refused: list[VaultAuthError] = []
        for name in names:
            try:
                with trio.move_on_after(read_timeout_s) as bounded:
                    await self._refresh_one(name, trigger, only_if_changed=only_if_changed)
                if bounded.cancelled_caught:
                    raise VaultUnreachableError(f"Vault did not answer within {read_timeout_s:g}s")
            except VaultSecretError as exc:
                self._keys.secret_failed(name, exc)
            except VaultAuthError as exc:  # one path refused: a policy problem, or our token
                self._keys.secret_failed(name, exc)
                refused.append(exc)
        if refused and len(refused) == len(names):
            raise refused[-1]  # every path refused: it is the token
        self._reachable = True
        self._last_error = None
        self._last_refresh = self._wall()
        self._lifecycle.recover("vault")
        self._keys.publish()

    async def _refresh_one(self, name: str, trigger: str, *, only_if_changed: bool = False) -> None:
        state = self._keys[name]
        path = state.config.vault_path
        source = (path, state.config.key_field)
        # Same source and same version: nothing to take. A new source is always taken.
        same_source = state.source == source

        def stale() -> bool:
            # A reload moved the provider while we read: what we read is not its key (the
            # reload reads the new source itself), nor its error.
            current = self._keys.get(name)
            return (
                current is not state or (state.config.vault_path, state.config.key_field) != source
            )

        try:
            if only_if_changed:
                metadata = await self._vault.read_metadata(path)
                if stale():
                    return
                if metadata.deleted:
                    version = metadata.current_version
                    raise VaultSecretError(f"current version {version} is deleted")
                if same_source and metadata.current_version == state.version:
                    state.last_error = None
                    return
                secret = await self._vault.read_secret(path, metadata.current_version)
            else:
                secret = await self._vault.read_secret(path)
        except VaultSecretError:
            if stale():
                return
            raise
        if stale():
            return
        if same_source and secret.version == state.version:
            state.last_error = None
            return
        self._keys.take(name, trigger, source, secret)

    # --- bookkeeping ----------------------------------------------------------------------

    def _vault_failed(self, during: str, exc: VaultError) -> None:
        self.vault_errors += 1
        self._last_error = str(exc)
        if isinstance(exc, VaultUnreachableError | VaultAuthError):
            self._reachable = False
            self._lifecycle.degrade("vault", "vault unreachable")
            if isinstance(exc, VaultAuthError) and during not in ("login", "token"):
                self._token.relogin_soon()  # a read refused after login: perhaps it expired
        log.warning("vault.error", during=during, error=str(exc), kind=type(exc).__name__)
        self._keys.publish()

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform over [0, min(cap, base * 2**attempt)]."""
        return self._jitter() * min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0**attempt)

    def statistics(self) -> KeyStatistics:
        return KeyStatistics(
            addr=self._config.vault.addr,
            auth=self._config.vault.auth,
            reachable=self._reachable,
            token_ttl_s=self._token.ttl_s(),
            last_refresh=iso_utc(self._last_refresh),
            last_error=self._last_error,
            providers=self._keys.statistics(),
            rotations=dict(self._keys.rotations),
            vault_errors=self.vault_errors,
        )
