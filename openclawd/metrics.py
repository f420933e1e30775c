"""Prometheus metrics, rendered from the daemon's statistics snapshot at each scrape.

Owns the metric names, labels and help texts (CONTRACT.md section 4 names the binding
ones; the others are ours). Components only count, in their own ``statistics()``; this
module turns one ``Statistics`` snapshot into metric families with prometheus_client, so a
scrape costs nothing between scrapes and always agrees with ``/v1/status``. It must not
hold counters of its own, and no label value may ever come from a key or an app's data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from openclawd.keys.manager import TRIGGERS
from openclawd.lifecycle import State
from openclawd.statistics import Statistics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TOKEN_KINDS = ("prompt", "completion")


class _Collector(Collector):
    def __init__(self, source: Callable[[], Statistics]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        stats = self._source()
        yield from _daemon(stats)
        yield from _connections(stats)
        yield from _upstreams(stats)
        yield from _keys(stats)
        yield from _token_control(stats)


class Metrics:
    """The metrics of one daemon, on a registry of their own (never the global one)."""

    def __init__(self, source: Callable[[], Statistics]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(source))

    def render(self) -> bytes:
        """The Prometheus text exposition of the current statistics."""
        return generate_latest(self.registry)


def _daemon(stats: Statistics) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "openclawd_info", "The running openclawd's version.", labels=["version"]
    )
    info.add_metric([stats.version], 1)
    yield info
    state = GaugeMetricFamily(
        "openclawd_state", "1 for the daemon's current state, 0 for the others.", labels=["state"]
    )
    for candidate in State:
        state.add_metric([candidate.value], 1 if candidate.value == stats.state else 0)
    yield state
    yield GaugeMetricFamily(
        "openclawd_uptime_seconds", "Seconds since the daemon started.", value=stats.uptime_s
    )
    yield CounterMetricFamily(
        "openclawd_trace_spans_dropped",
        "Spans not exported: the export queue was full, or the collector failed.",
        value=stats.trace_spans_dropped,
    )


def _connections(stats: Statistics) -> Iterator[Metric]:
    connections = GaugeMetricFamily(
        "openclawd_connections",
        "Open app connections on the data socket, by kind: ws (/v1/ws), realtime "
        "(/v1/realtime), http (/v1/http and other plain HTTP), pending (no request yet).",
        labels=["kind"],
    )
    for kind, count in sorted(stats.local.connections.items()):
        connections.add_metric([kind], count)
    yield connections
    yield GaugeMetricFamily(
        "openclawd_inflight_requests",
        "Requests in flight on /v1/ws and /v1/http.",
        value=stats.requests_inflight,
    )
    closes = CounterMetricFamily(
        "openclawd_closes",
        "App WebSockets (/v1/ws, /v1/realtime) closed, by close code.",
        labels=["code"],
    )
    for code, count in sorted(stats.local.closes.items()):
        closes.add_metric([str(code)], count)
    yield closes


def _upstreams(stats: Statistics) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        "openclawd_requests",
        "Upstream HTTP requests by provider and final status: the upstream's HTTP status "
        "after retries, or the error code when there was no response (no_key, "
        "upstream_unavailable, upstream_timeout, cancelled).",
        labels=["provider", "status"],
    )
    latency = HistogramMetricFamily(
        "openclawd_upstream_seconds",
        "Seconds from sending an upstream HTTP request to its response head, retries included.",
        labels=["provider"],
    )
    tokens = CounterMetricFamily(
        "openclawd_tokens",
        "Tokens reported in upstream responses' usage, by provider and kind (prompt, completion).",
        labels=["provider", "kind"],
    )
    circuit = GaugeMetricFamily(
        "openclawd_circuit_open",
        "1 while the provider's circuit breaker refuses requests (open or half open).",
        labels=["provider"],
    )
    retries = 0
    for name, upstream in sorted(stats.upstreams.items()):
        for status, count in sorted(upstream.requests.items()):
            requests.add_metric([name, status], count)
        cumulative = list(accumulate(upstream.latency.counts))
        bounds = [*(f"{b:g}" for b in upstream.latency.buckets), "+Inf"]
        latency.add_metric(
            [name], list(zip(bounds, cumulative, strict=True)), upstream.latency.sum_s
        )
        for kind in TOKEN_KINDS:
            tokens.add_metric([name, kind], upstream.tokens.get(kind, 0))
        circuit.add_metric([name], 0 if upstream.circuit == "closed" else 1)
        retries += upstream.retries
    yield requests
    yield latency
    yield CounterMetricFamily(
        "openclawd_upstream_retries",
        "Upstream HTTP attempts made again (429, 5xx, connection failures, 401/403 with a "
        "new key).",
        value=retries,
    )
    yield tokens
    yield circuit


def _keys(stats: Statistics) -> Iterator[Metric]:
    keys = stats.keys
    version = GaugeMetricFamily(
        "openclawd_key_version",
        "The KV v2 version of the key in use, by provider (absent while there is none).",
        labels=["provider"],
    )
    rotations = CounterMetricFamily(
        "openclawd_key_rotations",
        "Changes of the key in use, by provider and trigger (vault, operator, "
        "auth_failure, reload).",
        labels=["provider", "trigger"],
    )
    invalid = GaugeMetricFamily(
        "openclawd_key_invalid",
        "1 while the provider's secret in Vault cannot be used (field missing, empty, "
        "version deleted): the last good key stays in use.",
        labels=["provider"],
    )
    for name, provider in sorted(keys.providers.items()):
        if provider.key is not None:
            version.add_metric([name], provider.key.version)
        for trigger in TRIGGERS:
            rotations.add_metric([name, trigger], keys.rotations.get((name, trigger), 0))
        invalid.add_metric([name], 0 if provider.last_error is None else 1)
    yield version
    yield rotations
    yield invalid
    yield CounterMetricFamily(
        "openclawd_vault_errors",
        "Failed calls to Vault (login, renewal, reads).",
        value=keys.vault_errors,
    )
    yield GaugeMetricFamily(
        "openclawd_vault_reachable",
        "1 if the last call to Vault worked.",
        value=1 if keys.reachable else 0,
    )
    if keys.token_ttl_s is not None:
        yield GaugeMetricFamily(
            "openclawd_vault_token_ttl_seconds",
            "Seconds the daemon's Vault token has left.",
            value=keys.token_ttl_s,
        )


def _token_control(stats: Statistics) -> Iterator[Metric]:
    """Token control (CONTRACT.md 5.7): label values are configured client, provider,
    route and limit names and statuses, never an app's data."""
    tc = stats.token_control
    yield _counted(
        "openclawd_limit_refusals",
        "Requests refused by token control, by whose limit and which.",
        ["scope", "name", "limit"],
        tc.refusals.items(),
    )
    yield _counted(
        "openclawd_client_requests",
        "Requests ended, by client, provider and the status the app was sent.",
        ["client", "provider", "status"],
        tc.requests.items(),
    )
    yield _counted(
        "openclawd_client_tokens",
        "Tokens the upstream reported, by client, provider and kind (prompt, completion).",
        ["client", "provider", "kind"],
        tc.tokens.items(),
    )
    yield _counted(
        "openclawd_route_fallbacks",
        "Requests a route sent on to its next provider, and why.",
        ["route", "from", "to", "reason"],
        tc.fallbacks.items(),
    )
    if tc.shared_reachable is not None:
        yield GaugeMetricFamily(
            "openclawd_shared_reachable",
            "1 while the shared limits' engine answers, 0 while it does not.",
            value=1 if tc.shared_reachable else 0,
        )


def _counted(
    name: str, text: str, labels: list[str], counts: Iterable[tuple[tuple[str, ...], int]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, text, labels=labels)
    for values, count in sorted(counts):
        family.add_metric(list(values), count)
    return family
