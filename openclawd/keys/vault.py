"""Vault access: the only module that imports hvac (and sees requests' exceptions).

Owns one hvac client and the translation of everything it can raise into openclawd's
``VaultError`` tree, at this boundary, so nothing above sees a library exception. hvac is
synchronous: ``Vault`` runs each call in a worker thread behind a CapacityLimiter(1)
(one request at a time, in order) with ``abandon_on_cancel=True``, so a slow or hung Vault
never blocks the event loop and a cancelled caller does not wait for it.

Results are plain values (``TokenInfo``, ``SecretMetadata``, ``SecretVersion``). Secret
data is returned to the key manager and nowhere else. Error texts are built here, for an
operator to act on: the cause and the place (the address for a network failure, ``MOUNT/PATH``
for a missing secret, the API path and the policy capability for a refusal), with Vault's
own error strings stripped of go-multierror's wrapper. None holds the token or secret data:
they are made of the config, the API path and Vault's error strings, never of a request.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.client import RemoteDisconnected
from typing import Any, TypeVar
from urllib.parse import urlsplit

import hvac
import hvac.exceptions
import requests
import trio
import urllib3.exceptions

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


@dataclass(frozen=True, slots=True)
class _Request:
    """What one call asks of Vault, for the texts of its errors.

    ``action`` and ``api_path`` say what was refused ("read" on
    ``secret/data/openclawd/openai``), ``needs`` the policy capabilities that would allow
    it; ``secret`` is the KV secret as operators name it (``MOUNT/PATH``), for "not found".
    ``refused`` replaces the whole refusal text, for logins (no policy path to name there);
    ``login`` marks a login, where Vault refuses credentials with a 400 (AppRole) too.
    """

    action: str
    api_path: str
    needs: str = '"read"'
    secret: str = ""
    version: int | None = None
    refused: str = ""
    login: bool = False


class VaultClient:
    """The synchronous calls, each translated. Used from worker threads via ``Vault``."""

    def __init__(self, config: VaultConfig) -> None:
        self._mount = config.mount.strip("/")
        self._addr = config.addr
        self._ca_cert = config.ca_cert
        self._timeout_s = config.request_timeout_s
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
        request = _Request(
            "read",
            "auth/token/lookup-self",
            refused="Vault refused the token: {errors} (it is invalid, expired or revoked)",
        )
        data = self._call(request, self._client.auth.token.lookup_self)["data"]
        return TokenInfo(
            ttl_s=float(data.get("ttl") or 0),
            renewable=bool(data.get("renewable")),
            expires=data.get("expire_time") is not None,
        )

    def renew_self(self) -> TokenInfo:
        request = _Request(
            "update",
            "auth/token/renew-self",
            refused="Vault refused to renew the token: {errors}",
        )
        auth = self._call(request, self._client.auth.token.renew_self)["auth"]
        # Only an expiring token is renewed: a lease of 0 here means "about to expire".
        return TokenInfo(float(auth.get("lease_duration") or 0), bool(auth.get("renewable")))

    def approle_login(self, role_id: str, secret_id: str) -> TokenInfo:
        """Log in with AppRole; the client uses the new token from then on."""
        request = _Request(
            "update",
            "auth/approle/login",
            refused="Vault refused the AppRole login: {errors}",
            login=True,
        )
        auth = self._call(
            request,
            self._client.auth.approle.login,
            role_id=role_id,
            secret_id=secret_id,
            use_token=True,
        )["auth"]
        return TokenInfo(float(auth.get("lease_duration") or 0), bool(auth.get("renewable")))

    def read_metadata(self, path: str) -> SecretMetadata:
        data = self._call(
            self._kv("read", "metadata", path),
            self._client.secrets.kv.v2.read_secret_metadata,
            path=path,
            mount_point=self._mount,
        )["data"]
        current = int(data.get("current_version") or 0)
        version = (data.get("versions") or {}).get(str(current), {})
        deleted = bool(version.get("deletion_time")) or bool(version.get("destroyed"))
        return SecretMetadata(current_version=current, deleted=deleted)

    def read_secret(self, path: str, version: int | None = None) -> SecretVersion:
        response = self._call(
            self._kv("read", "data", path, version=version),
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
            self._kv("write", "data", path, needs='"create" or "update"'),
            self._client.secrets.kv.v2.create_or_update_secret,
            path=path,
            secret=dict(data),
            mount_point=self._mount,
        )
        return int(response["data"]["version"])

    def _kv(
        self,
        action: str,
        kind: str,
        path: str,
        *,
        needs: str = '"read"',
        version: int | None = None,
    ) -> _Request:
        path = path.strip("/")
        return _Request(
            action,
            f"{self._mount}/{kind}/{path}",
            needs=needs,
            secret=f"{self._mount}/{path}",
            version=version,
        )

    def _call(self, request: _Request, fn: Callable[..., Any], /, **kwargs: Any) -> Any:
        try:
            result = fn(**kwargs)
        except hvac.exceptions.VaultError as exc:
            raise _answered(request, exc) from None
        except (requests.exceptions.RequestException, OSError) as exc:
            raise VaultUnreachableError(self._unreachable(exc)) from None
        if not isinstance(result, dict):
            raise VaultError(f"unexpected answer from Vault to {fn.__name__}")
        return result

    def _unreachable(self, exc: BaseException) -> str:
        """Why no answer came, naming the address (never the request: it holds the token).

        The most specific cause wins: TLS, then name resolution, refusal, a dropped
        connection, and only then a timeout (urllib3's NewConnectionError, raised for any
        failed connect, is a ConnectTimeoutError for compatibility).
        """
        causes = list(_causes(exc))
        return (
            self._tls_failure(causes)
            or self._connect_failure(causes)
            or f"Vault at {self._addr} unreachable: {type(exc).__name__}"
        )

    def _tls_failure(self, causes: list[BaseException]) -> str | None:
        addr = self._addr
        if self._ca_cert and (
            _first(causes, ssl.SSLError) or any("CA certificate bundle" in str(c) for c in causes)
        ):
            # requests may fall back to the system's CAs when the file is missing: the
            # certificate is then "not trusted", and the file is what to fix.
            try:
                with open(self._ca_cert, "rb"):
                    pass
            except OSError as unusable:
                return f"vault.ca_cert {self._ca_cert} cannot be used: {unusable.strerror}"
        bad = _first(causes, ssl.SSLCertVerificationError)
        if isinstance(bad, ssl.SSLCertVerificationError):
            problem = bad.verify_message or bad.reason or "not trusted"
            return f"Vault at {addr}: TLS certificate not accepted: {problem}"
        if isinstance(tls := _first(causes, ssl.SSLError), ssl.SSLError):
            return f"Vault at {addr}: TLS failed: {tls.reason or tls.strerror or tls}"
        return None

    def _connect_failure(self, causes: list[BaseException]) -> str | None:
        addr = self._addr
        if _first(causes, urllib3.exceptions.NameResolutionError, socket.gaierror):
            return f"Vault address {urlsplit(addr).hostname or addr} could not be resolved"
        if _first(causes, ConnectionRefusedError):
            return f"Vault at {addr} refused the connection"
        if _first(causes, ConnectionResetError, ConnectionAbortedError, RemoteDisconnected):
            return f"Vault at {addr} closed the connection"
        if _first(causes, TimeoutError) or any(
            isinstance(c, urllib3.exceptions.TimeoutError)
            and not isinstance(c, urllib3.exceptions.NewConnectionError)
            for c in causes
        ):
            return f"Vault at {addr} did not answer within {self._timeout_s:g}s"
        if isinstance(os_error := _first(causes, OSError), OSError) and os_error.strerror:
            return f"Vault at {addr} unreachable: {os_error.strerror}"
        return None


def _first(causes: list[BaseException], *kinds: type[BaseException]) -> BaseException | None:
    return next((c for c in causes if isinstance(c, kinds)), None)


# Vault cannot serve now (sealed, uninitialized, a bad gateway, rate-limited): an outage.
_OUTAGES = (
    hvac.exceptions.VaultDown,
    hvac.exceptions.BadGateway,
    hvac.exceptions.VaultNotInitialized,
    hvac.exceptions.RateLimitExceeded,
)


def _answered(request: _Request, exc: hvac.exceptions.VaultError) -> VaultError:
    """Ours for the error Vault answered ``request`` with."""
    if isinstance(exc, hvac.exceptions.InvalidPath):
        return VaultSecretError(_not_found(request, exc))
    text = _vault_errors(exc)
    if isinstance(exc, hvac.exceptions.Unauthorized | hvac.exceptions.Forbidden):
        return VaultAuthError(_refused(request, text))
    if isinstance(exc, hvac.exceptions.InvalidRequest):
        if request.login:  # AppRole answers bad credentials with a 400
            return VaultAuthError(_refused(request, text))
        return VaultError(f"Vault error InvalidRequest on {request.api_path}: {text}")
    if isinstance(exc, hvac.exceptions.InternalServerError):
        if "max TTL" in text:
            # A renewal past the token's max TTL is answered 500: a refusal, not an outage.
            return VaultAuthError(_refused(request, text))
        return VaultUnreachableError(f"Vault answered InternalServerError: {text}")
    if isinstance(exc, _OUTAGES):
        return VaultUnreachableError(f"Vault answered {type(exc).__name__}: {text}")
    return VaultError(f"Vault error {type(exc).__name__}: {text}")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception under it: causes, contexts, urllib3's ``reason`` and
    exceptions carried in ``args`` (requests wraps urllib3, which wraps the socket's)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        nested = [getattr(current, "reason", None), current.__cause__, current.__context__]
        nested += list(current.args)
        todo += [e for e in nested if isinstance(e, BaseException)]


def _not_found(request: _Request, exc: hvac.exceptions.InvalidPath) -> str:
    secret = request.secret or request.api_path
    metadata = _deleted_version(exc)
    if metadata is not None:  # KV v2 answers 404 for a deleted version, with its metadata
        version, how = metadata
        return f"{secret} version {version} is {how} in Vault"
    where = secret if request.version is None else f"{secret} version {request.version}"
    detail = _vault_errors(exc, default="")
    return f"{where} not found in Vault" + (f" ({detail})" if detail else "")


def _deleted_version(exc: hvac.exceptions.InvalidPath) -> tuple[int, str] | None:
    body = getattr(exc, "json", None)
    try:
        metadata = body["data"]["metadata"]  # type: ignore[index]
        version = int(metadata["version"])
    except (TypeError, KeyError, ValueError):
        return None
    if metadata.get("destroyed"):
        return version, "destroyed"
    if metadata.get("deletion_time"):
        return version, "deleted"
    return None


def _refused(request: _Request, errors: str) -> str:
    if request.refused:
        return request.refused.format(errors=errors)
    return (
        f"Vault refused {request.action} on {request.api_path}: {errors} "
        f"(the token's policy needs {request.needs} on it)"
    )


# hashicorp/go-multierror's text: "1 error occurred:\n\t* permission denied\n\n".
_MULTI_ERROR = re.compile(r"^\s*\d+ errors? occurred:\s*", re.ASCII)
_MULTI_ITEM = re.compile(r"^\s*\*\s*", re.ASCII)


def _vault_errors(exc: hvac.exceptions.VaultError, default: str | None = None) -> str:
    """Vault's own error strings, one line, without go-multierror's wrapper."""
    errors = getattr(exc, "errors", None)
    if not isinstance(errors, list) or not errors:
        return type(exc).__name__ if default is None else default
    items: list[str] = []
    for error in errors:
        text = str(error)
        if _MULTI_ERROR.match(text):
            lines = _MULTI_ERROR.sub("", text).splitlines()
            items += [_MULTI_ITEM.sub("", line).strip() for line in lines if line.strip()]
        else:
            items.append(" ".join(text.split()))
    return "; ".join(item for item in items if item)[:200]


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
