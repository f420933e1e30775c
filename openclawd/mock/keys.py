"""The mock provider's key check: which keys it accepts, read from Vault like the daemon.

``VaultKeys`` accepts exactly the key (or the pool of keys) held by the current version
of one KV v2 secret, so a key written to Vault is the only one the mock takes from then
on: the demo proves that the daemon injects the key and follows its rotation. It reads the
secret's metadata on each check (cheap) and the secret only when the version changed; when
Vault does not answer it keeps checking against the last keys read, as the daemon does.
``AnyKey`` accepts any non-empty key, for a mock run with no Vault.

The keys are compared in constant time and never logged or echoed back.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from openclawd import logs
from openclawd.errors import VaultError
from openclawd.keys.vault import Vault

log = logs.get(__name__)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer to a presented key: accepted (and which KV version it is), or the HTTP
    status and message to refuse it with."""

    accepted: bool
    version: int | None = None
    status: int = 200
    code: str | None = None
    message: str = ""


MISSING = Verdict(
    False,
    status=401,
    code="missing_api_key",
    message="You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
)
INCORRECT = Verdict(
    False,
    status=401,
    code="invalid_api_key",
    message="Incorrect API key provided: it is not the current key in Vault.",
)


class KeyCheck(Protocol):
    async def check(self, presented: str) -> Verdict:
        """Judge the key an request carried (``""``: none)."""
        ...


class AnyKey:
    """Accepts any non-empty key (a mock run with no Vault to check against)."""

    async def check(self, presented: str) -> Verdict:
        return Verdict(True) if presented else MISSING


class VaultKeys:
    """Accepts the keys of the current version of ``mount/path``'s ``field`` in Vault."""

    def __init__(self, vault: Vault, path: str, field: str = "api_key") -> None:
        self._vault = vault
        self._path = path
        self._field = field
        self._version: int | None = None
        self._keys: tuple[bytes, ...] = ()
        self._lock = trio.Lock()  # one refresh at a time; the others wait for its result

    async def check(self, presented: str) -> Verdict:
        if not presented:
            return MISSING
        async with self._lock:
            try:
                await self._refresh()
            except VaultError as exc:
                if not self._keys:
                    log.warning("mock.vault_error", path=self._path, error=str(exc))
                    return Verdict(
                        False,
                        status=503,
                        code="mock_key_unavailable",
                        message="The mock provider cannot read its key from Vault.",
                    )
                log.warning("mock.vault_error", path=self._path, error=str(exc), kept=True)
        given = presented.encode()
        # Every key is compared, so the time taken does not say which one matched.
        matched = [hmac.compare_digest(given, key) for key in self._keys]
        if any(matched):
            return Verdict(True, version=self._version)
        return INCORRECT

    async def _refresh(self) -> None:
        metadata = await self._vault.read_metadata(self._path)
        if metadata.current_version == self._version:
            return
        secret = await self._vault.read_secret(self._path)
        keys = _keys_of(secret.data.get(self._field))
        if not keys:
            log.warning("mock.key_invalid", path=self._path, version=secret.version)
            return
        self._keys = keys
        if self._version is not None:
            log.info("mock.key_changed", path=self._path, version=secret.version)
        self._version = secret.version


def _keys_of(value: object) -> tuple[bytes, ...]:
    """The keys of a field's value, read as the daemon reads them (``keys.key.pool``):
    a string or a list of strings, each stripped (the daemon sends the key stripped); a
    value the daemon refuses (an empty or non-string member) gives none here either."""
    values: Sequence[object] = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        return ()
    return tuple(str(v).strip().encode() for v in values)
