"""The key manager's Vault token: renewed at 2/3 of its TTL, replaced by a new login when
renewal is refused or capped by the max TTL, or when a read is refused after login.

Owns the token's expiry as last seen (for status) and the wish to log in again; it reads
no secret and keeps no key. The manager logs in first (a login is worth nothing without
the keys it reads), then runs ``keep`` beside its metadata poll; a Vault error here goes
back to the manager (``failed``), which counts it, and ``keep`` retries after ``backoff``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from openclawd import logs
from openclawd.errors import VaultError
from openclawd.keys.vault import TokenInfo, VaultAuthError
from openclawd.lifecycle import Lifecycle

# The key manager's parts log as one: operators filter on this name (docs/operations.md).
log = logs.get("openclawd.keys.manager")


class TokenAPI(Protocol):
    """What keeping a token needs of ``keys.vault.Vault``."""

    async def login(self) -> TokenInfo: ...
    async def renew(self) -> TokenInfo: ...


def renew_after(token: TokenInfo) -> float | None:
    """When to renew: at 2/3 of the TTL; never for a token that does not expire."""
    return max(0.0, token.ttl_s) * 2 / 3 if token.expires else None


class TokenKeeper:
    """The token's schedule: ``seen`` each token obtained, ``keep`` the one logged in with."""

    def __init__(
        self,
        vault: TokenAPI,
        lifecycle: Lifecycle,
        *,
        auth: Callable[[], str],
        backoff: Callable[[int], float],
        failed: Callable[[str, VaultError], None],
    ) -> None:
        self._vault = vault
        self._lifecycle = lifecycle
        self._auth = auth  # ``[vault] auth`` of the config in force
        self._backoff = backoff
        self._failed = failed
        self._expires_at: float | None = None  # trio time; None = never
        self._relogin = trio.Event()

    def seen(self, token: TokenInfo) -> None:
        """``token`` was just obtained: note when it expires."""
        now = trio.current_time()
        self._expires_at = now + token.ttl_s if token.expires else None

    def ttl_s(self) -> float | None:
        """What is left of the token's TTL (0.1 s steps), or None if it does not expire."""
        if self._expires_at is None:
            return None
        return max(0.0, round(self._expires_at - trio.current_time(), 1))

    def relogin_soon(self) -> None:
        """A read was refused after login (perhaps the token expired): log in again now."""
        self._relogin.set()

    async def keep(self, token: TokenInfo) -> None:
        """Renew at 2/3 of the TTL; log in again when renewal is refused or capped."""
        full_ttl = token.ttl_s
        wait_s = renew_after(token)
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
                    renewed = await self._renew()
                    if renewed is None or renewed.ttl_s < full_ttl * 2 / 3:
                        # Refused, or capped by the max TTL: a new token is needed.
                        token = await self._login_again(renewed or token)
                        full_ttl = token.ttl_s
                    else:
                        token = renewed
                wait_s = renew_after(token)
                attempt = 0
            except VaultError as exc:
                self._failed("token", exc)
                wait_s = self._backoff(attempt)
                attempt += 1

    async def _renew(self) -> TokenInfo | None:
        """The token renewed, or None if Vault refused to renew it."""
        try:
            renewed = await self._vault.renew()
        except VaultAuthError as exc:
            log.warning("vault.renew_refused", error=str(exc))
            return None
        self.seen(renewed)
        log.info("vault.token_renewed", ttl_s=renewed.ttl_s)
        return renewed

    async def _login_again(self, token: TokenInfo) -> TokenInfo:
        """A new token: AppRole logs in again; ``token`` auth re-reads its file (an agent
        may have written a fresh one) and reports degraded if that brings nothing new."""
        fresh = await self._vault.login()
        self.seen(fresh)
        auth = self._auth()
        log.info("vault.logged_in", auth=auth, ttl_s=fresh.ttl_s)
        if auth == "approle" or not fresh.expires or fresh.ttl_s > token.ttl_s:
            self._lifecycle.recover("vault-token")
        else:
            self._lifecycle.degrade("vault-token", "vault token cannot be renewed")
            log.warning("vault.token_not_renewable", ttl_s=fresh.ttl_s)
        return fresh
