"""What the control API shows of one statistics snapshot: the bodies of ``GET /v1/status``
(CONTRACT.md 4) and ``GET /v1/limits`` (5.7). Pure: a snapshot and the config in, JSON-ready
dicts out; the control API redacts them on the way out.
"""

from __future__ import annotations

from typing import Any

from openclawd.config import Config
from openclawd.statistics import Statistics

__all__ = ["limits_body", "status_body"]


def status_body(stats: Statistics, config: Config) -> dict[str, Any]:
    """``GET /v1/status`` (CONTRACT.md 4) from one statistics snapshot.

    Besides the contract's fields, each provider shows where its secret is read from and
    why the last read failed (``vault``: ``path`` is ``MOUNT/PATH`` from ``config``, since
    the key statistics do not carry it; ``last_error`` is the key manager's).
    """
    providers: dict[str, Any] = {}
    for name, keyed in stats.keys.providers.items():
        key = keyed.key
        upstream = stats.upstreams.get(name)
        provider = config.providers.get(name)
        providers[name] = {
            "key": None
            if key is None
            else {
                "version": key.version,
                "fingerprint": key.fingerprint,
                "fetched_at": key.fetched_at,
                "pool_size": key.pool_size,
            },
            "upstream": {
                "circuit": upstream.circuit if upstream else "closed",
                "last_error": upstream.last_error if upstream else None,
            },
            "ratelimit": {
                "remaining_requests": upstream.remaining_requests if upstream else None,
                "remaining_tokens": upstream.remaining_tokens if upstream else None,
            },
            "vault": {
                "path": _vault_path(config, provider.vault_path) if provider else None,
                "last_error": keyed.last_error,
            },
        }
    keys = stats.keys
    return {
        "state": stats.state,
        "version": stats.version,
        "uptime_s": round(stats.uptime_s, 1),
        "connections": {
            "clients": stats.local.clients,
            "inflight": stats.requests_inflight,
            "realtime": stats.realtime_sessions,
        },
        "providers": providers,
        "shared": _shared(stats),
        "vault": {
            "addr": keys.addr,
            "auth": keys.auth,
            "reachable": keys.reachable,
            "token_ttl_s": keys.token_ttl_s,
            "last_refresh": keys.last_refresh,
            "last_error": keys.last_error,
        },
    }


def _shared(stats: Statistics) -> dict[str, Any]:
    token_control = stats.token_control
    return {"mode": token_control.shared_mode, "reachable": token_control.shared_reachable}


def limits_body(stats: Statistics) -> dict[str, Any]:
    """``GET /v1/limits`` (CONTRACT.md 5.7): where limits are counted, and each client's
    and provider's limits that are set, with what they have used; each provider's
    upstream headroom as its last response told."""
    return {"shared": _shared(stats), **stats.token_control.limits}


def _vault_path(config: Config, path: str) -> str:
    """A KV v2 secret as operators name it (``bao kv get MOUNT/PATH``)."""
    return f"{config.vault.mount.strip('/')}/{path.strip('/')}"
