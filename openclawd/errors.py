"""The one exception tree of openclawd.

Errors are split by who is at fault, as h11 splits Local from Remote and trio splits
Closed from Broken: the app (``ClientError``), the provider or the network
(``UpstreamError``), the key source (``VaultError``) and the operator's configuration
(``ConfigError``, startup and reload only). Each class names the contract's wire ``code``
and, where it ends a WebSocket, its ``close_code``. Only per-connection handlers turn these
into frames or close codes. No message of any of them may ever hold a key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class OpenclawdError(Exception):
    """Base of every error openclawd raises on purpose."""

    code: str = "internal"
    close_code: int = 1011


class ClientError(OpenclawdError):
    """The app broke the contract: a bad frame, a refused header, a limit."""

    code = "bad_request"
    close_code = 1008


class UnknownProviderError(ClientError):
    """The app or operator named a provider that is not configured."""

    code = "unknown_provider"


class UpstreamError(OpenclawdError):
    """The provider or the network between us failed."""

    code = "upstream_unavailable"
    close_code = 1014


class VaultError(OpenclawdError):
    """The key source failed: unreachable, refused our token, or returned junk."""

    code = "vault_unreachable"


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with a config file: the full key path and what is wrong with it."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class ConfigError(OpenclawdError):
    """The configuration cannot be used; carries every problem found, not just the first."""

    code = "bad_config"

    def __init__(self, source: str, problems: Sequence[ConfigProblem]) -> None:
        self.source = source
        self.problems = tuple(problems)
        super().__init__(self._summary())

    def _summary(self) -> str:
        count = len(self.problems)
        head = f"{self.source}: {count} problem{'s' if count != 1 else ''}"
        return "; ".join([head, *(str(p) for p in self.problems)])

    def lines(self) -> list[str]:
        """One line per problem, each starting with the key path and naming the file."""
        return [f"{p.key}: {p.message} (in {self.source})" for p in self.problems]


class ListenError(OpenclawdError):
    """A socket could not be set up: path taken by a live daemon, bad group, permissions."""

    code = "listen_failed"
