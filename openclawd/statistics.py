"""The daemon's statistics: one frozen snapshot of everything status and metrics show.

Owns only the shape. The daemon assembles a ``Statistics`` from its components'
``statistics()`` (key manager, data socket, upstream pools) and counters at the moment it is
asked; the control API renders it as ``/v1/status`` and the metrics module as Prometheus
text, so both always agree. It holds no key: keys appear as version and fingerprint only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from openclawd.keys.manager import KeyStatistics
from openclawd.local.server import LocalStatistics
from openclawd.upstream.http import UpstreamStatistics


@dataclass(frozen=True, slots=True)
class TokenControlStatistics:
    """Token control's figures (CONTRACT.md 5.7): where limits are counted, and what was
    counted, by label values (client and provider names, statuses, limit names)."""

    shared_mode: str = "local"  # "local" | "shared"
    shared_reachable: bool | None = None  # None: no engine configured
    requests: Mapping[tuple[str, str, str], int] = field(default_factory=dict)
    tokens: Mapping[tuple[str, str, str], int] = field(default_factory=dict)
    refusals: Mapping[tuple[str, str, str], int] = field(default_factory=dict)
    fallbacks: Mapping[tuple[str, str, str, str], int] = field(default_factory=dict)
    limits: Mapping[str, Any] = field(default_factory=dict)  # GET /v1/limits' clients, providers


@dataclass(frozen=True, slots=True)
class Statistics:
    state: str  # starting | ready | degraded | draining | stopping
    version: str
    uptime_s: float
    requests_inflight: int  # /v1/ws and /v1/http requests between send and last byte
    realtime_sessions: int
    local: LocalStatistics
    keys: KeyStatistics
    upstreams: Mapping[str, UpstreamStatistics]
    token_control: TokenControlStatistics = field(default_factory=TokenControlStatistics)
    trace_spans_dropped: int = 0  # spans the tracer dropped (queue full, collector failed)
