"""The one table of WebSocket close codes and wire error codes (CONTRACT.md 3.1, 3.2).

Everything that closes an app's WebSocket or sends an ``error`` frame names its code from
here, so the contract's table lives in one place. Pure data: no I/O.
"""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    """Close codes the daemon sends on the data socket's WebSockets."""

    NORMAL = 1000  # normal end
    DRAIN_DEADLINE = 1001  # the operator's drain reached its deadline
    GOING_AWAY = 1001  # (to an upstream) the daemon ends the session
    POLICY = 1008  # peer not allowed; upstream refused the key (401/403); an unfinished message
    TOO_BIG = 1009  # a message over max_message_bytes
    INTERNAL = 1011  # internal error (also: the peer stopped answering pings)
    SHUTDOWN = 1012  # daemon shutting down (SIGTERM)
    TRY_AGAIN = 1013  # over a connection limit, rate limited, draining, or upstream 429
    BAD_GATEWAY = 1014  # upstream unreachable, handshake failed (5xx), or dropped


# Wire codes of ``error`` frames, in the contract's order.
ERROR_CODES = frozenset(
    {
        "bad_request",
        "unknown_provider",
        "too_many_inflight",
        "rate_limited",
        "forbidden",  # 5.1: a provider, route or model outside the client's lists
        "budget_exhausted",  # 5.5: a daily token budget spent
        "no_key",
        "upstream_unavailable",
        "upstream_timeout",
        "cancelled",
        "draining",
        "internal",
    }
)

# RFC 6455 5.5: a control frame's payload is at most 125 bytes, 2 of them the code.
MAX_REASON_BYTES = 123


def close_reason(text: str) -> str:
    """``text`` cut to fit a close frame (at most 123 UTF-8 bytes, never mid-character)."""
    data = text.encode()
    if len(data) <= MAX_REASON_BYTES:
        return text
    return data[:MAX_REASON_BYTES].decode("utf-8", "ignore")


# Close codes a peer may put in a close frame (RFC 6455 7.4; 1012-1014 registered by IANA).
# 1004 is reserved, 1005/1006/1015 only ever describe a close locally.
_SENDABLE = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})


def sendable(code: int) -> bool:
    """May ``code`` be sent in a close frame?"""
    return code in _SENDABLE or 3000 <= code <= 4999


def handshake_refusal(status: int) -> CloseCode:
    """The close code for an upstream that refused a WebSocket handshake with ``status``
    (CONTRACT.md 3.2): the key refused, rate limited, or anything else a bad gateway."""
    if status in (401, 403):
        return CloseCode.POLICY
    if status == 429:
        return CloseCode.TRY_AGAIN
    return CloseCode.BAD_GATEWAY
