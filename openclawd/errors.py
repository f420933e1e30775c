"""The one exception tree of openclawd.

Errors are split by who is at fault, as h11 splits Local from Remote and trio splits
Closed from Broken: the app (``ClientError``), the provider or the network
(``UpstreamError``), the key source (``VaultError``), the fleet's shared engine
(``SharedUnavailableError``) and the operator's configuration (``ConfigError``, startup and
reload only).

This is the one table of codes (CONTRACT.md 3.1-3.4, 4): each class carries its wire
``code``, its ``http_status`` (the data socket's and the control API's answer) and its
``close_code`` (a ``CloseCode`` member, when it ends a WebSocket), as h11's errors carry
``error_status_hint``. A refusal is one of these raised, never a tuple; only the
per-connection handlers turn them into frames, JSON answers or close codes. No message of
any of them may ever hold a key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from openclawd.protocol.closecodes import CloseCode


class OpenclawdError(Exception):
    """Base of every error openclawd raises on purpose."""

    code: str = "internal"
    close_code: CloseCode = CloseCode.INTERNAL
    http_status: int = 500  # the data socket's HTTP answer (CONTRACT.md 3.3)


class ClientError(OpenclawdError):
    """The app broke the contract: a bad frame, a refused header, a limit."""

    code = "bad_request"
    close_code = CloseCode.POLICY
    http_status = 400


class UnknownProviderError(ClientError):
    """The app or operator named a provider that is not configured."""

    code = "unknown_provider"
    http_status = 404


class NotFoundError(ClientError):
    """No such route (the path is never repeated: an app may have put a key in it)."""

    code = "not_found"
    http_status = 404


class UpgradeRequiredError(ClientError):
    """A WebSocket endpoint asked for without the upgrade (RFC 9110 15.5.22)."""

    http_status = 426


class MethodNotAllowedError(ClientError):
    """The route exists, but not for this method (control API)."""

    code = "method_not_allowed"
    http_status = 405


class TooLargeError(ClientError):
    """A request body or head larger than the daemon takes."""

    code = "too_large"
    close_code = CloseCode.TOO_BIG
    http_status = 413


class HeadTooLargeError(TooLargeError):
    """A request line and headers larger than the daemon takes (RFC 6585 5)."""

    http_status = 431


class NotImplementedByUsError(ClientError):
    """A request the daemon's HTTP server cannot handle (a transfer coding but chunked)."""

    code = "not_implemented"
    http_status = 501


class ForbiddenError(ClientError):
    """The peer is not allowed (``[listen] allowed_uids`` / ``allowed_gids``)."""

    code = "forbidden"
    close_code = CloseCode.POLICY
    http_status = 403


class BusyError(ClientError):
    """A connection over ``[listen] max_connections``: try again later."""

    code = "busy"
    close_code = CloseCode.TRY_AGAIN
    http_status = 503


class FrameError(ClientError):
    """A frame from the app that cannot be acted on; ``request_id`` names the request it
    was about, when the frame carried a usable one."""

    def __init__(
        self, message: str, *, code: str = "bad_request", request_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


class PeerTimeoutError(ClientError):
    """The app stopped answering pings: a half-open or hung peer."""

    close_code = CloseCode.INTERNAL


class UnfinishedMessageError(ClientError):
    """The app began a WebSocket message, or a /v1/http request body, and did not finish
    it within ``[listen] message_timeout_s`` (a slowloris, or a hung app). Closes 1008:
    it breaks the daemon's policy, as an oversize message would if it were not 1009's."""

    @classmethod
    def of(cls, what: str, timeout_s: float) -> UnfinishedMessageError:
        return cls(f"{what} not finished within {timeout_s:g}s")


class MessageTooBigError(ClientError):
    """A WebSocket message over ``max_message_bytes`` (counted in bytes, UTF-8 for text)."""

    close_code = CloseCode.TOO_BIG


class RateLimitedError(ClientError):
    """A local limit (``[limits] requests_per_minute``) refused the request."""

    code = "rate_limited"
    close_code = CloseCode.TRY_AGAIN
    http_status = 429

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BudgetExhaustedError(RateLimitedError):
    """A daily token budget (``tokens_per_day``) is spent: room again on the next UTC day."""

    code = "budget_exhausted"


class NoKeyError(OpenclawdError):
    """The provider has no key yet (Vault never answered for it): try again later."""

    code = "no_key"
    close_code = CloseCode.TRY_AGAIN
    http_status = 503


class DrainingError(OpenclawdError):
    """The daemon is draining or stopping and takes no new work."""

    code = "draining"
    close_code = CloseCode.TRY_AGAIN
    http_status = 503


class StoppingError(OpenclawdError):
    """The daemon is shutting down: a drain can no longer be started or undone."""

    code = "stopping"
    http_status = 409


class UpstreamError(OpenclawdError):
    """The provider or the network between us failed."""

    code = "upstream_unavailable"
    close_code = CloseCode.BAD_GATEWAY
    http_status = 502


class UpstreamConnectionError(UpstreamError):
    """The connection failed before any response byte: safe to retry."""


class PoolBusyError(UpstreamError):
    """Every pooled connection to the provider is busy: our limit, not the provider's
    failure (never retried, never counted against the circuit)."""

    http_status = 503


class UpstreamProtocolError(UpstreamError):
    """The upstream's bytes broke its protocol: malformed SSE, an event over the size limit."""


class UpstreamTimeoutError(UpstreamError):
    """The upstream took longer than a configured timeout (a read gap or the total)."""

    code = "upstream_timeout"
    http_status = 504


class UpstreamRejectedError(UpstreamError):
    """The upstream answered a WebSocket handshake with an HTTP status instead of 101:
    ``close_code`` is the one the app is closed with (1008, 1013 or 1014)."""

    def __init__(self, message: str, *, status: int, close_code: CloseCode) -> None:
        super().__init__(message)
        self.status = status
        self.close_code = close_code


class CircuitOpenError(UpstreamError):
    """The provider's circuit breaker is open: failing fast instead of piling on."""

    http_status = 503


class VaultError(OpenclawdError):
    """The key source failed: unreachable, refused our token, or returned junk."""

    code = "vault_unreachable"
    http_status = 503


class SharedUnavailableError(OpenclawdError):
    """The shared engine (``[shared]``, Valkey or Redis OSS) failed: unreachable, timed out,
    refused our password, or answered junk. Raised only by ``openclawd/shared/engine.py``;
    its message names the engine's host and port, never its password."""

    code = "shared_unavailable"
    close_code = CloseCode.TRY_AGAIN
    http_status = 503


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
