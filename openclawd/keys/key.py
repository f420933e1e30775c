"""What a provider key is, as the daemon holds and shows it.

Owns the ``Key`` value (its repr and str show the fingerprint, never the key), how a key
is named anywhere (``fingerprint``), how a secret version becomes a pool of keys
(``key_values``, ``pool``), and the frozen snapshots that status and metrics read. Pure:
no Vault I/O, no clock reads, no state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from openclawd.keys.vault import SecretVersion, VaultSecretError


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


def iso_utc(t: float | None) -> str | None:
    """A wall-clock time as shown in status: ``2026-11-21T10:00:00Z``."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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


def pool(
    provider: str, key_field: str | tuple[str, ...], secret: SecretVersion, fetched_at: float
) -> tuple[Key, ...]:
    """The keys of ``provider`` that ``secret`` holds, in pool order.

    Raises:
        VaultSecretError: as ``key_values``.
    """
    values = key_values(key_field, secret)
    return tuple(
        Key(provider, secret.version, i, fingerprint(v), fetched_at, v)
        for i, v in enumerate(values)
    )
