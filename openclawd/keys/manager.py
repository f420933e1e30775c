"""The key manager: the current key of every provider, kept in step with Vault.

Owns the provider keys in memory and everything that changes them: the first load, the
metadata poll every ``refresh_interval_s`` (``vault``), the operator's ``rotate_now``
(``operator``), an upstream's 401/403 (``auth_failure``, single-flight per provider),
and SIGHUP (``reload``). It also keeps the Vault token alive: renewal at 2/3 of its TTL,
a new AppRole login when renewal is refused or the max TTL nears. Vault errors back off
with full jitter from 1 s up to 5 min, and the last good keys stay in force meanwhile.

``current(provider)`` is sync and never blocks: request handlers take the ``Key`` object
and keep it for the whole request, so a rotation never changes a key under work in flight.
Keys never leave this module except as ``Key`` objects, whose repr shows the fingerprint.
Talks to Vault only through the ``VaultAPI`` protocol (``keys.vault.Vault`` in the
daemon), so the schedules can be tested with an in-memory Vault under a fake clock.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import trio

from openclawd import logs
from openclawd.config import Config, ProviderConfig
from openclawd.errors import UnknownProviderError, VaultError
from openclawd.keys.vault import (
    SecretMetadata,
    SecretVersion,
    TokenInfo,
    VaultAuthError,
    VaultSecretError,
    VaultUnreachableError,
)
from openclawd.lifecycle import Lifecycle

log = logs.get(__name__)

BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 300.0
# After an upstream 401/403 re-read Vault and found nothing newer (or failed), the next
# refusals wait this long before reading again: an app hammering a refused key (revoked
# with nothing newer in Vault, or while Vault fails) must not hammer Vault with it. A
# read that found a new version leaves the next refusal free to read (another rotation).
AUTH_REREAD_INTERVAL_S = 1.0
TRIGGERS = ("vault", "operator", "auth_failure", "reload")
# Keys rotated out are still withheld from what the daemon shows (``redact``): how many.
_RETIRED_KEYS = 32


class VaultAPI(Protocol):
    async def login(self) -> TokenInfo: ...
    async def renew(self) -> TokenInfo: ...
    async def read_metadata(self, path: str) -> SecretMetadata: ...
    async def read_secret(self, path: str, version: int | None = None) -> SecretVersion: ...


def _renew_after(token: TokenInfo) -> float | None:
    """When to renew: at 2/3 of the TTL; never for a token that does not expire."""
    return max(0.0, token.ttl_s) * 2 / 3 if token.expires else None


def fingerprint(secret: str) -> str:
    """``sha256:`` + the first 12 hex digits of sha256(key): how a key is named anywhere."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True, repr=False, eq=False)
class Key:
    """One provider key. Only ``secret`` is the key; nothing shows it."""

    provider: str
    version: int
    index: int  # place in the pool of its version
    fingerprint: str
    fetched_at: float  # wall clock, seconds since the epoch
    secret: str = field(repr=False)

    def __repr__(self) -> str:
        return f"<Key {self.provider} v{self.version} #{self.index} {self.fingerprint}>"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class KeySnapshot:
    version: int
    fingerprint: str
    fetched_at: str
    pool_size: int


@dataclass(frozen=True, slots=True)
class ProviderKeyStatistics:
    key: KeySnapshot | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class KeyStatistics:
    """A frozen snapshot for status and metrics; holds no key."""

    addr: str
    auth: str
    reachable: bool
    token_ttl_s: float | None
    last_refresh: str | None
    last_error: str | None
    providers: Mapping[str, ProviderKeyStatistics]
    rotations: Mapping[tuple[str, str], int]
    vault_errors: int


@dataclass(slots=True)
class _Provider:
    config: ProviderConfig
    pool: tuple[Key, ...] = ()
    # Where ``pool`` was read: (vault_path, key_field). A reload that points the provider
    # elsewhere must take the new source's key even if its KV version number is the same.
    source: tuple[str, str | tuple[str, ...]] | None = None
    cursor: int = 0
    last_error: str | None = None
    flight: trio.Event | None = None  # set when an auth_failure re-read is done
    auth_read_at: float = -math.inf  # when an auth_failure last read Vault ...
    auth_read_fruitless: bool = False  # ... and found nothing newer there

    @property
    def current(self) -> Key | None:
        return self.pool[self.cursor] if self.pool else None

    @property
    def version(self) -> int | None:
        return self.pool[0].version if self.pool else None


def key_values(key_field: str | tuple[str, ...], secret: SecretVersion) -> list[str]:
    """The keys ``secret`` holds, in pool order (stripped): from one field holding a key or
    a list of keys, or (``key_field`` a list) from several fields holding one key each.
    What the daemon takes, and what ``check-config --online`` checks.

    Raises:
        VaultSecretError: a field is missing, of the wrong shape, or holds an empty key;
            the message names the version and the field, never a value.
    """
    if isinstance(key_field, str):
        raw = secret.data.get(key_field)
        where = f"version {secret.version} field {key_field!r}"
        if raw is None:
            raise VaultSecretError(f"{where} is missing")
        found = [raw] if isinstance(raw, str) else raw
        if not isinstance(found, list) or not all(isinstance(v, str) for v in found):
            raise VaultSecretError(f"{where} must be a string or a list of strings")
        if not found or not all(v.strip() for v in found):
            raise VaultSecretError(f"{where} holds an empty key")
        return [v.strip() for v in found]
    values = []
    for field_name in key_field:
        raw = secret.data.get(field_name)
        where = f"version {secret.version} field {field_name!r}"
        if raw is None:
            raise VaultSecretError(f"{where} is missing (key_field lists {len(key_field)} fields)")
        if not isinstance(raw, str):
            raise VaultSecretError(
                f"{where} must be a string (key_field is a list: one key per field)"
            )
        if not raw.strip():
            raise VaultSecretError(f"{where} holds an empty key")
        values.append(raw.strip())
    return values


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
        self._providers = {n: _Provider(p) for n, p in config.providers.items()}
        self._reachable = False
        self._last_error: str | None = None
        self._last_refresh: float | None = None
        self._token_expires_at: float | None = None  # trio time; None = never
        self._relogin = trio.Event()
        self._poll_now = trio.Event()
        self._has_providers = trio.Event()  # set once there is a provider to serve
        if self._providers:
            self._has_providers.set()
        # The metadata poll's wait under way: its scope, when it began, and the backoff it
        # waits (None: it waits refresh_interval_s, which a reload may change meanwhile).
        self._poll_wait: tuple[trio.CancelScope, float, float | None] | None = None
        self._retired: deque[Key] = deque(maxlen=_RETIRED_KEYS)
        self.rotations: Counter[tuple[str, str]] = Counter()
        self.vault_errors = 0
        self._publish()

    # --- what request handlers use --------------------------------------------------------

    @property
    def config(self) -> Config:
        """The config the manager follows (the one of the last reload)."""
        return self._config

    def current(self, provider: str) -> Key | None:
        """The key new work for ``provider`` should use, or None if there is none yet."""
        state = self._providers.get(provider)
        return None if state is None else state.current

    # --- running --------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Log in, load every key, then keep the token alive and follow Vault until cancelled.

        ``started()`` comes once the first attempt is over, successful or not: the daemon
        listens meanwhile, and readiness waits for the keys (not for this function).
        """
        if not self._providers:
            # Nothing to read until a reload brings a provider; then log in as at a start.
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            await self._has_providers.wait()
        token = await self._login_with_retry(task_status)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_token, token)
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
                self._token_seen(token)
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

    async def _keep_token(self, token: TokenInfo) -> None:
        """Renew at 2/3 of the TTL; log in again when renewal is refused or capped."""
        full_ttl = token.ttl_s
        wait_s = _renew_after(token)
        attempt = 0
        while True:
            with trio.move_on_after(wait_s if wait_s is not None else float("inf")):
                await self._relogin.wait()
            relogin = self._relogin.is_set()
            self._relogin = trio.Event()
            try:
                if relogin or not token.renewable:
                    token = await self._login_again(token)
                    full_ttl = token.ttl_s
                else:
                    try:
                        renewed = await self._vault.renew()
                    except VaultAuthError as exc:
                        log.warning("vault.renew_refused", error=str(exc))
                        renewed = None
                    if renewed is not None:
                        self._token_seen(renewed)
                        log.info("vault.token_renewed", ttl_s=renewed.ttl_s)
                    if renewed is None or renewed.ttl_s < full_ttl * 2 / 3:
                        # Refused, or capped by the max TTL: a new token is needed.
                        token = await self._login_again(renewed or token)
                        full_ttl = token.ttl_s
                    else:
                        token = renewed
                wait_s = _renew_after(token)
                attempt = 0
            except VaultError as exc:
                self._vault_failed("token", exc)
                wait_s = self._backoff(attempt)
                attempt += 1

    async def _login_again(self, token: TokenInfo) -> TokenInfo:
        """A new token: AppRole logs in again; ``token`` auth re-reads its file (an agent
        may have written a fresh one) and reports degraded if that brings nothing new."""
        fresh = await self._vault.login()
        self._token_seen(fresh)
        log.info("vault.logged_in", auth=self._config.vault.auth, ttl_s=fresh.ttl_s)
        if self._config.vault.auth == "approle" or not fresh.expires or fresh.ttl_s > token.ttl_s:
            self._lifecycle.recover("vault-token")
        else:
            self._lifecycle.degrade("vault-token", "vault token cannot be renewed")
            log.warning("vault.token_not_renewable", ttl_s=fresh.ttl_s)
        return fresh

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
        names = self._names(provider)
        before = {n: self._providers[n].version for n in names}
        try:
            await self._bounded_refresh("operator", names)
        except VaultError as exc:
            self._vault_failed("operator", exc)
            raise
        return {
            n: (before[n], self._providers[n].version, before[n] != self._providers[n].version)
            for n in names
        }

    async def reload(self, config: Config) -> None:
        """SIGHUP: take the new provider table and refresh interval, and re-read every key
        (``reload``), bounded as ``rotate_now`` is. A provider whose ``vault_path`` or
        ``key_field`` changed takes the new source's key whatever its version number."""
        self._config = config
        for gone in self._providers.keys() - config.providers.keys():
            self._lifecycle.unblock(f"key:{gone}")
            self._lifecycle.recover(f"key:{gone}")
        self._providers = {
            n: self._providers.get(n, _Provider(p)) for n, p in config.providers.items()
        }
        for name, provider in config.providers.items():
            self._providers[name].config = provider
        self._schedule_poll()
        self._publish()
        if self._providers and not self._has_providers.is_set():
            # The first providers: ``serve`` logs in now and loads their keys.
            self._has_providers.set()
            return
        try:
            await self._bounded_refresh("reload", list(self._providers))
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
        state = self._providers[self._names(provider)[0]]
        if state.current is not None and state.current is not failed:
            return state.current  # someone already moved on from that key
        if state.flight is not None:
            await state.flight.wait()
            return state.current
        now = trio.current_time()
        if state.auth_read_fruitless and now - state.auth_read_at < AUTH_REREAD_INTERVAL_S:
            # Vault was just read for this, in vain. The pool's next key.
            self._next_in_pool(provider, state, failed, state.version)
            return state.current
        state.auth_read_at = now
        state.flight = trio.Event()
        try:
            before = state.version
            try:
                await self._refresh_one(provider, "auth_failure")
            except VaultSecretError as exc:
                self._secret_failed(provider, exc)
            except VaultError as exc:
                self._vault_failed("auth_failure", exc)
            state.auth_read_fruitless = state.version == before
            if state.version == before:
                self._next_in_pool(provider, state, failed, before)
            return state.current
        finally:
            state.flight.set()
            state.flight = None

    def _next_in_pool(
        self, provider: str, state: _Provider, failed: Key, before: int | None
    ) -> None:
        """``failed`` was refused and Vault has nothing newer: the pool's next key, if any."""
        if len(state.pool) > 1 and state.current is failed:
            state.cursor = (state.cursor + 1) % len(state.pool)
            self._rotated(provider, "auth_failure", before, state.version, state.current)

    def redact(self, text: str) -> str:
        """``text`` with every key held (any provider, any pool entry, and the last ones
        rotated out) replaced by its fingerprint: a last line of defence for what the
        daemon shows operators."""
        for state in self._providers.values():
            for key in state.pool:
                if key.secret in text:
                    text = text.replace(key.secret, key.fingerprint)
        for key in self._retired:
            if key.secret in text:
                text = text.replace(key.secret, key.fingerprint)
        return text

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
        names = names if names is not None else list(self._providers)
        refused: list[VaultAuthError] = []
        for name in names:
            try:
                with trio.move_on_after(read_timeout_s) as bounded:
                    await self._refresh_one(name, trigger, only_if_changed=only_if_changed)
                if bounded.cancelled_caught:
                    raise VaultUnreachableError(f"Vault did not answer within {read_timeout_s:g}s")
            except VaultSecretError as exc:
                self._secret_failed(name, exc)
            except VaultAuthError as exc:  # one path refused: a policy problem, or our token
                self._secret_failed(name, exc)
                refused.append(exc)
        if refused and len(refused) == len(names):
            raise refused[-1]  # every path refused: it is the token
        self._reachable = True
        self._last_error = None
        self._last_refresh = self._wall()
        self._lifecycle.recover("vault")
        self._publish()

    async def _refresh_one(self, name: str, trigger: str, *, only_if_changed: bool = False) -> None:
        state = self._providers[name]
        path = state.config.vault_path
        source = (path, state.config.key_field)
        # Same source and same version: nothing to take. A new source is always taken.
        same_source = state.source == source

        def stale() -> bool:
            # A reload moved the provider while we read: what we read is not its key (the
            # reload reads the new source itself), nor its error.
            current = self._providers.get(name)
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
        pool = self._parse(name, source[1], secret)
        before = state.version
        self._retired.extend(state.pool)
        state.pool, state.cursor, state.last_error, state.source = pool, 0, None, source
        self._rotated(name, trigger, before, secret.version, pool[0])

    def _parse(
        self, name: str, key_field: str | tuple[str, ...], secret: SecretVersion
    ) -> tuple[Key, ...]:
        values = key_values(key_field, secret)
        now = self._wall()
        return tuple(
            Key(name, secret.version, i, fingerprint(v), now, v) for i, v in enumerate(values)
        )

    # --- bookkeeping ----------------------------------------------------------------------

    def _rotated(
        self, name: str, trigger: str, before: int | None, after: int | None, key: Key | None
    ) -> None:
        self.rotations[(name, trigger)] += 1
        log.info(
            "key.rotated",
            provider=name,
            trigger=trigger,
            from_version=before,
            to_version=after,
            fingerprint=key.fingerprint if key else None,
            pool_size=len(self._providers[name].pool),
        )
        self._publish()

    def _secret_failed(self, name: str, exc: VaultError) -> None:
        state = self._providers[name]
        message = str(exc)
        if message != state.last_error:
            log.warning("key.invalid", provider=name, error=message, kept_version=state.version)
        state.last_error = message
        self._publish()

    def _vault_failed(self, during: str, exc: VaultError) -> None:
        self.vault_errors += 1
        self._last_error = str(exc)
        if isinstance(exc, VaultUnreachableError | VaultAuthError):
            self._reachable = False
            self._lifecycle.degrade("vault", "vault unreachable")
            if isinstance(exc, VaultAuthError) and during not in ("login", "token"):
                self._relogin.set()  # a read refused after login: perhaps the token expired
        log.warning("vault.error", during=during, error=str(exc), kind=type(exc).__name__)
        self._publish()

    def _token_seen(self, token: TokenInfo) -> None:
        now = trio.current_time()
        self._token_expires_at = now + token.ttl_s if token.expires else None

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform over [0, min(cap, base * 2**attempt)]."""
        return self._jitter() * min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0**attempt)

    def _names(self, provider: str | None) -> list[str]:
        if provider is None:
            return list(self._providers)
        if provider not in self._providers:
            raise UnknownProviderError(f"no provider named {provider!r}")
        return [provider]

    def _publish(self) -> None:
        """Readiness and degradation from the keys we hold (CONTRACT.md 1 and 4)."""
        for name, state in self._providers.items():
            has_key = state.current is not None
            if has_key or not state.config.required:
                self._lifecycle.unblock(f"key:{name}")
            else:
                self._lifecycle.block(f"key:{name}", f"no key for {name}")
            if has_key or state.config.required:
                self._lifecycle.recover(f"key:{name}")
            else:
                self._lifecycle.degrade(f"key:{name}", f"no key for {name}")

    def statistics(self) -> KeyStatistics:
        def iso(t: float | None) -> str | None:
            if t is None:
                return None
            return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

        ttl = None
        if self._token_expires_at is not None:
            ttl = max(0.0, round(self._token_expires_at - trio.current_time(), 1))
        providers = {}
        for name, state in self._providers.items():
            key = state.current
            snapshot = (
                None
                if key is None
                else KeySnapshot(
                    key.version, key.fingerprint, iso(key.fetched_at) or "", len(state.pool)
                )
            )
            providers[name] = ProviderKeyStatistics(snapshot, state.last_error)
        return KeyStatistics(
            addr=self._config.vault.addr,
            auth=self._config.vault.auth,
            reachable=self._reachable,
            token_ttl_s=ttl,
            last_refresh=iso(self._last_refresh),
            last_error=self._last_error,
            providers=providers,
            rotations=dict(self.rotations),
            vault_errors=self.vault_errors,
        )
