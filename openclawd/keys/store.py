"""The keys held: for each provider, the pool read from one secret version and the entry
in use, and what follows from them (rotation counts, readiness, redaction, snapshots).

Sync and in memory: it never talks to Vault (``manager.py`` reads, then hands the secret
version here) and never blocks, so ``current`` may be called from any request handler.
A key rotated out is still remembered for a while, only so ``redact`` can withhold it.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio

from openclawd import logs
from openclawd.config import ProviderConfig
from openclawd.errors import UnknownProviderError, VaultError
from openclawd.keys.key import Key, KeySnapshot, ProviderKeyStatistics, iso_utc, pool
from openclawd.keys.vault import SecretVersion
from openclawd.lifecycle import Lifecycle

# The key manager's parts log as one: operators filter on this name (docs/operations.md).
log = logs.get("openclawd.keys.manager")

# Keys rotated out are still withheld from what the daemon shows (``redact``): how many.
_RETIRED_KEYS = 32

# Where a pool was read: (vault_path, key_field).
Source = tuple[str, str | tuple[str, ...]]


@dataclass(slots=True)
class ProviderKeys:
    """One provider's keys, and the state of the reads that change them."""

    config: ProviderConfig
    pool: tuple[Key, ...] = ()
    # Where ``pool`` was read. A reload that points the provider elsewhere must take the
    # new source's key even if its KV version number is the same.
    source: Source | None = None
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


class KeyStore:
    """The keys of every configured provider."""

    def __init__(
        self,
        providers: Mapping[str, ProviderConfig],
        lifecycle: Lifecycle,
        wall_clock: Callable[[], float],
    ) -> None:
        self._providers = {n: ProviderKeys(p) for n, p in providers.items()}
        self._lifecycle = lifecycle
        self._wall = wall_clock
        self._retired: deque[Key] = deque(maxlen=_RETIRED_KEYS)
        self.rotations: Counter[tuple[str, str]] = Counter()

    def __getitem__(self, name: str) -> ProviderKeys:
        return self._providers[name]

    def get(self, name: str) -> ProviderKeys | None:
        return self._providers.get(name)

    def names(self, provider: str | None = None) -> list[str]:
        """Every provider's name, or just ``provider``'s.

        Raises:
            UnknownProviderError: ``provider`` is not configured.
        """
        if provider is None:
            return list(self._providers)
        if provider not in self._providers:
            raise UnknownProviderError(f"no provider named {provider!r}")
        return [provider]

    def current(self, provider: str) -> Key | None:
        """The key new work for ``provider`` should use, or None if there is none yet."""
        state = self._providers.get(provider)
        return None if state is None else state.current

    def reconfigure(self, providers: Mapping[str, ProviderConfig]) -> None:
        """Take a reloaded provider table: a provider kept keeps its keys until re-read,
        a provider gone no longer holds readiness back."""
        for gone in self._providers.keys() - providers.keys():
            self._lifecycle.unblock(f"key:{gone}")
            self._lifecycle.recover(f"key:{gone}")
        self._providers = {n: self._providers.get(n, ProviderKeys(p)) for n, p in providers.items()}
        for name, provider in providers.items():
            self._providers[name].config = provider

    def take(self, name: str, trigger: str, source: Source, secret: SecretVersion) -> None:
        """``secret``, read from ``source``, is ``name``'s new version: its pool takes over.

        Raises:
            VaultSecretError: ``secret`` holds no usable key; the keys in force stay.
        """
        state = self._providers[name]
        keys = pool(name, source[1], secret, self._wall())
        before = state.version
        self._retired.extend(state.pool)
        state.pool, state.cursor, state.last_error, state.source = keys, 0, None, source
        self._rotated(name, trigger, before, secret.version, keys[0])

    def next_in_pool(
        self, provider: str, state: ProviderKeys, failed: Key, before: int | None
    ) -> None:
        """``failed`` was refused and Vault has nothing newer: the pool's next key, if any."""
        if len(state.pool) > 1 and state.current is failed:
            state.cursor = (state.cursor + 1) % len(state.pool)
            self._rotated(provider, "auth_failure", before, state.version, state.current)

    def secret_failed(self, name: str, exc: VaultError) -> None:
        """``name``'s secret could not be used (or read): its keys in force stay."""
        state = self._providers[name]
        message = str(exc)
        if message != state.last_error:
            log.warning("key.invalid", provider=name, error=message, kept_version=state.version)
        state.last_error = message
        self.publish()

    def redact(self, text: str) -> str:
        """``text`` with every key held (any provider, any pool entry, and the last ones
        rotated out) replaced by its fingerprint."""
        for state in self._providers.values():
            for key in state.pool:
                if key.secret in text:
                    text = text.replace(key.secret, key.fingerprint)
        for key in self._retired:
            if key.secret in text:
                text = text.replace(key.secret, key.fingerprint)
        return text

    def publish(self) -> None:
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

    def statistics(self) -> dict[str, ProviderKeyStatistics]:
        """Each provider's key in use (no secret) and last error."""
        providers = {}
        for name, state in self._providers.items():
            key = state.current
            snapshot = (
                None
                if key is None
                else KeySnapshot(
                    key.version, key.fingerprint, iso_utc(key.fetched_at) or "", len(state.pool)
                )
            )
            providers[name] = ProviderKeyStatistics(snapshot, state.last_error)
        return providers

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
        self.publish()
