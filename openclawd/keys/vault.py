"""Vault access: the only module that imports hvac (and sees requests' exceptions).

Owns one hvac client and the translation of everything it can raise into openclawd's
``VaultError`` tree, at this boundary, so nothing above sees a library exception. hvac is
synchronous: ``Vault`` runs each call in a worker thread behind a CapacityLimiter(1)
(one request at a time, in order) with ``abandon_on_cancel=True``, so a slow or hung Vault
never blocks the event loop and a cancelled caller does not wait for it.

Results are plain values (``TokenInfo``, ``SecretMetadata``, ``SecretVersion``). Secret
data is returned to the key manager and nowhere else; no error text built here contains
the token or secret data (hvac's own messages hold Vault's error strings and the URL path,
never request bodies or headers).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests
import trio

from openclawd import credentials
from openclawd.config import VaultConfig
from openclawd.errors import VaultError

_T = TypeVar("_T")


class VaultUnreachableError(VaultError):
    """No answer: connection refused or reset, timeout, TLS failure, Vault sealed or 5xx."""

    code = "vault_unreachable"


class VaultAuthError(VaultError):
    """Vault answered and refused our credentials (401/403, or a bad credential file)."""

    code = "vault_auth_failed"


class VaultSecretError(VaultError):
    """The secret is missing, deleted, destroyed, or not of the expected shape."""

    code = "vault_secret_invalid"


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What Vault says of our token: seconds left, renewable, and whether it expires at all
    (a root token does not). ``ttl_s`` alone cannot tell: Vault rounds it to whole seconds,
    so a token in its last half second also shows ``ttl`` 0."""

    ttl_s: float
    renewable: bool
    expires: bool = True


@dataclass(frozen=True, slots=True)
class SecretMetadata:
    current_version: int
    deleted: bool  # the current version is soft-deleted or destroyed


@dataclass(frozen=True, slots=True)
class SecretVersion:
    version: int
    data: Mapping[str, Any]

    def __repr__(self) -> str:  # the data holds keys: never in a repr
        return f"SecretVersion(version={self.version}, fields={sorted(self.data)})"


def read_credential(path: str, *, what: str) -> str:
    """Read a Vault credential file (see ``openclawd.credentials``).

    Raises:
        VaultAuthError: the file is missing, unreadable or empty (its content never shows).
    """
    try:
        return credentials.read_credential(path, what=what)
    except credentials.CredentialError as exc:
        raise VaultAuthError(str(exc)) from None


class VaultClient:
    """The synchronous calls, each translated. Used from worker threads via ``Vault``."""

    def __init__(self, config: VaultConfig) -> None:
        self._mount = config.mount.strip("/")
        verify: bool | str = config.ca_cert or True
        # No proxy or netrc from the environment: an HTTP(S)_PROXY meant for other
        # programs would otherwise see the token (and the keys Vault answers) in clear.
        session = requests.Session()
        session.trust_env = False
        self._client = hvac.Client(
            url=config.addr, verify=verify, timeout=config.request_timeout_s, session=session
        )

    def set_token(self, token: str) -> None:
        self._client.token = token

    def lookup_self(self) -> TokenInfo:
        data = self._call(self._client.auth.token.lookup_self)["data"]
        return TokenInfo(
            ttl_s=float(data.get("ttl") or 0),
            renewable=bool(data.get("renewable")),
            expires=data.get("expire_time") is not None,
        )

    def renew_self(self) -> TokenInfo:
        auth = self._call(self._client.auth.token.renew_self)["auth"]
        # Only an expiring token is renewed: a lease of 0 here means "about to expire".
        return TokenInfo(float(auth.get("lease_duration") or 0), bool(auth.get("renewable")))

    def approle_login(self, role_id: str, secret_id: str) -> TokenInfo:
        """Log in with AppRole; the client uses the new token from then on."""
        auth = self._call(
            self._client.auth.approle.login, role_id=role_id, secret_id=secret_id, use_token=True
        )["auth"]
        return TokenInfo(float(auth.get("lease_duration") or 0), bool(auth.get("renewable")))

    def read_metadata(self, path: str) -> SecretMetadata:
        data = self._call(
            self._client.secrets.kv.v2.read_secret_metadata, path=path, mount_point=self._mount
        )["data"]
        current = int(data.get("current_version") or 0)
        version = (data.get("versions") or {}).get(str(current), {})
        deleted = bool(version.get("deletion_time")) or bool(version.get("destroyed"))
        return SecretMetadata(current_version=current, deleted=deleted)

    def read_secret(self, path: str, version: int | None = None) -> SecretVersion:
        response = self._call(
            self._client.secrets.kv.v2.read_secret_version,
            path=path,
            version=version,
            mount_point=self._mount,
            raise_on_deleted_version=True,
        )
        data = response["data"]
        return SecretVersion(version=int(data["metadata"]["version"]), data=data["data"] or {})

    def write_secret(self, path: str, data: Mapping[str, Any]) -> int:
        """Write a new version of a secret (the demo seeds its key so); returns its version."""
        response = self._call(
            self._client.secrets.kv.v2.create_or_update_secret,
            path=path,
            secret=dict(data),
            mount_point=self._mount,
        )
        return int(response["data"]["version"])

    def _call(self, fn: Callable[..., Any], /, **kwargs: Any) -> Any:
        try:
            result = fn(**kwargs)
        except hvac.exceptions.InvalidPath as exc:
            raise VaultSecretError(f"not found in Vault ({_vault_errors(exc)})") from None
        except (hvac.exceptions.Unauthorized, hvac.exceptions.Forbidden) as exc:
            raise VaultAuthError(f"Vault refused: {_vault_errors(exc)}") from None
        except hvac.exceptions.InternalServerError as exc:
            text = _vault_errors(exc)
            if "max TTL" in text:
                # A renewal past the token's max TTL is answered 500: a refusal, not an outage.
                raise VaultAuthError(f"Vault refused: {text}") from None
            raise VaultUnreachableError(f"Vault answered InternalServerError: {text}") from None
        except (
            hvac.exceptions.VaultDown,
            hvac.exceptions.BadGateway,
            hvac.exceptions.VaultNotInitialized,
            hvac.exceptions.RateLimitExceeded,
        ) as exc:
            raise VaultUnreachableError(
                f"Vault answered {type(exc).__name__}: {_vault_errors(exc)}"
            ) from None
        except hvac.exceptions.VaultError as exc:
            raise VaultError(f"Vault error {type(exc).__name__}: {_vault_errors(exc)}") from None
        except requests.exceptions.RequestException as exc:
            raise VaultUnreachableError(f"Vault unreachable: {type(exc).__name__}") from None
        if not isinstance(result, dict):
            raise VaultError(f"unexpected answer from Vault to {fn.__name__}")
        return result


def _vault_errors(exc: hvac.exceptions.VaultError) -> str:
    errors = getattr(exc, "errors", None)
    if isinstance(errors, list) and errors:
        return "; ".join(str(e) for e in errors)[:200]
    return type(exc).__name__


class Vault:
    """The async face of ``VaultClient``: one call at a time, in a worker thread.

    Cancellation: a cancelled call returns at once; its thread finishes (or times out
    after ``request_timeout_s``) in the background and its result is dropped.
    """

    def __init__(self, config: VaultConfig) -> None:
        self.config = config
        self._client = VaultClient(config)
        self._limiter = trio.CapacityLimiter(1)

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await trio.to_thread.run_sync(
            fn, *args, limiter=self._limiter, abandon_on_cancel=True
        )

    async def login(self) -> TokenInfo:
        """Authenticate as configured (token or AppRole) and return the token's TTL."""
        config = self.config
        if config.auth == "approle":
            role_id = read_credential(config.role_id_file, what="vault.role_id_file")
            secret_id = read_credential(config.secret_id_file, what="vault.secret_id_file")
            return await self._run(self._client.approle_login, role_id, secret_id)
        if config.token_file:
            token = read_credential(config.token_file, what="vault.token_file")
        else:
            token = os.environ.get("VAULT_TOKEN", "")
            if not token:
                raise VaultAuthError(
                    "no Vault token: vault.token_file is empty and so is VAULT_TOKEN"
                )
        return await self.use_token(token)

    async def use_token(self, token: str) -> TokenInfo:
        """Authenticate with ``token``, given rather than read from the config's sources."""
        self._client.set_token(token)
        return await self._run(self._client.lookup_self)

    async def renew(self) -> TokenInfo:
        return await self._run(self._client.renew_self)

    async def read_metadata(self, path: str) -> SecretMetadata:
        return await self._run(self._client.read_metadata, path)

    async def read_secret(self, path: str, version: int | None = None) -> SecretVersion:
        return await self._run(self._client.read_secret, path, version)

    async def write_secret(self, path: str, data: Mapping[str, Any]) -> int:
        return await self._run(self._client.write_secret, path, data)
