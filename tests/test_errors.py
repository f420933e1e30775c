"""The one table of codes (errors.py): each error class carries its wire code, HTTP status
and close code, and every entry point answers from it (CONTRACT.md 3.1-3.4, 4)."""

from __future__ import annotations

import pytest

from openclawd import errors
from openclawd.protocol.closecodes import ERROR_CODES, CloseCode, sendable

# (class, wire code, HTTP status, close code), as the contract gives them.
TABLE = [
    (errors.ClientError, "bad_request", 400, 1008),
    (errors.UnknownProviderError, "unknown_provider", 404, 1008),
    (errors.NotFoundError, "not_found", 404, 1008),
    (errors.MethodNotAllowedError, "method_not_allowed", 405, 1008),
    (errors.UpgradeRequiredError, "bad_request", 426, 1008),
    (errors.TooLargeError, "too_large", 413, 1009),
    (errors.HeadTooLargeError, "too_large", 431, 1009),
    (errors.NotImplementedByUsError, "not_implemented", 501, 1008),
    (errors.ForbiddenError, "forbidden", 403, 1008),  # 3.4, 5.1: HTTP 403, close 1008
    (errors.BusyError, "busy", 503, 1013),  # 3.4: max_connections, close 1013
    (errors.MessageTooBigError, "bad_request", 400, 1009),
    (errors.PeerTimeoutError, "bad_request", 400, 1011),
    (errors.UnfinishedMessageError, "bad_request", 400, 1008),
    (errors.RateLimitedError, "rate_limited", 429, 1013),
    (errors.BudgetExhaustedError, "budget_exhausted", 429, 1013),  # 5.5
    (errors.NoKeyError, "no_key", 503, 1013),
    (errors.DrainingError, "draining", 503, 1013),  # 4: new connections 1013 / 503
    (errors.StoppingError, "stopping", 409, 1011),
    (errors.UpstreamError, "upstream_unavailable", 502, 1014),
    (errors.UpstreamConnectionError, "upstream_unavailable", 502, 1014),
    (errors.PoolBusyError, "upstream_unavailable", 503, 1014),
    (errors.CircuitOpenError, "upstream_unavailable", 503, 1014),
    (errors.UpstreamTimeoutError, "upstream_timeout", 504, 1014),
    (errors.VaultError, "vault_unreachable", 503, 1011),
    (errors.SharedUnavailableError, "shared_unavailable", 503, 1013),  # 5.6: the engine
    (errors.OpenclawdError, "internal", 500, 1011),
]


@pytest.mark.parametrize(("kind", "code", "status", "close"), TABLE, ids=lambda v: str(v))
def test_each_error_carries_its_codes(
    kind: type[errors.OpenclawdError], code: str, status: int, close: int
) -> None:
    exc = kind.__new__(kind)  # the class's table row, whatever its constructor takes
    assert (exc.code, exc.http_status, exc.close_code) == (code, status, close)
    assert isinstance(exc.close_code, CloseCode)
    assert sendable(exc.close_code)


def test_every_error_class_is_in_the_table() -> None:
    def subclasses(kind: type) -> set[type]:
        found = set(kind.__subclasses__())
        for sub in list(found):
            found |= subclasses(sub)
        return found

    listed = {row[0] for row in TABLE}
    unlisted = {
        k
        for k in subclasses(errors.OpenclawdError)
        if k not in listed and k.__module__ == "openclawd.errors"
    }
    # Errors that never reach an app or an operator's answer by their class's codes.
    assert {k.__name__ for k in unlisted} <= {
        "ConfigError",  # startup and reload only
        "ListenError",  # startup only
        "FrameError",  # its code is the frame's (set per instance)
        "UpstreamRejectedError",  # its close code is the handshake's (set per instance)
        "UpstreamProtocolError",
    }


def test_wire_codes_of_data_socket_errors_are_the_contracts() -> None:
    """Every code an ``error`` frame can carry is one of CONTRACT.md 3.1's."""
    frame_errors = [
        errors.ClientError,
        errors.UnknownProviderError,
        errors.RateLimitedError,
        errors.NoKeyError,
        errors.DrainingError,
        errors.UpstreamError,
        errors.UpstreamTimeoutError,
        errors.OpenclawdError,
    ]
    assert {k.code for k in frame_errors} <= ERROR_CODES


def test_a_refused_handshake_carries_its_close_code() -> None:
    exc = errors.UpstreamRejectedError("upstream 429", status=429, close_code=CloseCode.TRY_AGAIN)
    assert (exc.close_code, exc.status) == (1013, 429)
