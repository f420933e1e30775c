"""What a provider's upstream counts, for the status and the metrics.

The pool's ``Figures`` live on across a reload that replaces the pool (the counters of a
provider never go back); ``UpstreamStatistics`` is a frozen snapshot of them.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

# Upper bounds of the upstream latency histogram's buckets: from a fast local model to a
# provider thinking for minutes before its first byte.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True, slots=True)
class LatencySnapshot:
    """The upstream latency histogram: ``counts[i]`` requests took at most
    ``buckets[i]`` seconds and more than the bound before it; ``counts[-1]`` took longer
    than every bound. Not cumulative."""

    buckets: tuple[float, ...]
    counts: tuple[int, ...]
    sum_s: float


@dataclass(frozen=True, slots=True)
class UpstreamStatistics:
    """A frozen snapshot of one provider's upstream, for status and metrics."""

    circuit: str
    last_error: str | None
    remaining_requests: int | None
    remaining_tokens: int | None
    # Final status ("200", "429", ...) or, with no response, the error code ("no_key",
    # "upstream_unavailable", "upstream_timeout", "cancelled", ...) -> requests.
    requests: Mapping[str, int]
    retries: int
    tokens: Mapping[str, int]  # "prompt" / "completion" -> count
    latency: LatencySnapshot  # from sending to the response head, retries included


@dataclass(slots=True)
class Figures:
    """What a provider's pool counts; handed on to the pool that replaces it on reload,
    so the counters of a provider never go back."""

    requests: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    tokens: Counter[str] = field(default_factory=Counter)
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    latency_sum_s: float = 0.0

    def observe_latency(self, seconds: float) -> None:
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.latency_sum_s += seconds
