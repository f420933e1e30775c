"""The soak: many concurrent streams through openclawd for minutes, with the key rotated in
Vault all along; the daemon's memory sampled throughout.

The same pieces as the benchmarks (``bench/runner.py``): a real ``bao``, the fast fake
upstream (which takes only the current key: a rotation revokes the old one at once), the
daemon under a ``NOTIFY_SOCKET``, and the load client, whose workers each send the next
streamed request as soon as the last one ended, half on /v1/ws and half on /v1/http.

It fails (exit 1) if any request failed, or if the daemon's RSS at the end (the median of
the last three samples) is more than ``--max-growth`` (5 %) above its RSS once warmed up
(the median of the first three samples after ``--warmup-s``): memory that grows with the
work done is a leak, whatever its size. Not part of CI (it takes minutes).

Usage: ``bench/soak [--minutes 10] [--streams 100] [--rotate-every-s 30] [--warmup-s 60]
[--sample-every-s 5] [--max-growth 0.05] [--output PATH]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio

from bench.runner import (
    REPO,
    BenchError,
    cpu_seconds,
    daemon,
    environment,
    load_client,
    machine,
    rotate_keys,
    say,
    versions,
)
from openclawd.demo.layout import DemoError, find_bao

# Medians over this many samples, at the start (after the warm-up) and at the end.
WINDOW = 3
# The load client's answer comes once the load's duration is over: this much later at most.
ANSWER_GRACE_S = 120.0


@dataclass(frozen=True)
class SoakPlan:
    seconds: float
    streams: int
    rotate_every_s: float
    warmup_s: float
    sample_every_s: float
    max_growth: float
    stream_events: int = 20
    gap_ms: float = 500  # a stream: its first event at once, the other 19 this much later


def verdict(samples: list[tuple[float, int]], warmup_s: float, max_growth: float) -> dict[str, Any]:
    """Did RSS (``samples``: seconds since the start, bytes) grow more than ``max_growth``
    after ``warmup_s``? Compares the medians of the first and the last ``WINDOW`` samples
    taken at or after the warm-up.

    Raises:
        BenchError: fewer than two windows of samples after the warm-up.
    """
    after = [rss for at, rss in samples if at >= warmup_s]
    if len(after) < 2 * WINDOW:
        raise BenchError(
            f"{len(after)} samples after the warm-up; {2 * WINDOW} needed: run longer, "
            "or sample more often"
        )
    baseline = statistics.median(after[:WINDOW])
    final = statistics.median(after[-WINDOW:])
    growth = final / baseline - 1
    return {
        "baseline_mb": round(baseline / 2**20, 1),
        "final_mb": round(final / 2**20, 1),
        "peak_mb": round(max(after) / 2**20, 1),
        "growth": round(growth, 4),
        "max_growth": max_growth,
        "passed": growth <= max_growth,
    }


async def soak(plan: SoakPlan) -> dict[str, Any]:
    bao = find_bao()
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "versions": versions(bao),
        "plan": asdict(plan),
    }
    ws = plan.streams // 2
    async with (
        environment(bao, REPO, max_connections=max(1024, 2 * plan.streams)) as (
            setup,
            vault,
            key,
            upstream,
        ),
        daemon(setup) as main,
        load_client(setup, key) as client,
    ):
        samples: list[tuple[float, int]] = []
        rotations: list[dict[str, Any]] = []

        async def sample() -> None:
            started = trio.current_time()
            while True:
                samples.append((round(trio.current_time() - started, 1), main.rss()))
                await trio.sleep(plan.sample_every_s)

        say(
            f"soak: {plan.streams} streams for {plan.seconds:g} s, a rotation every "
            f"{plan.rotate_every_s:g} s"
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            nursery.start_soon(
                rotate_keys, setup, vault, key, plan.rotate_every_s, plan.seconds, rotations
            )
            answer = await client.call(
                timeout_s=plan.seconds + ANSWER_GRACE_S,
                op="load",
                clients={"ws": ws, "http": plan.streams - ws},
                duration_s=plan.seconds,
                stream_events=plan.stream_events,
                gap_ms=plan.gap_ms,
            )
            nursery.cancel_scope.cancel()
        targets = answer["targets"]
        results["requests"] = {path: targets[path]["requests"] for path in targets}
        results["failures"] = sum(targets[path]["failures"] for path in targets)
        results["failure_reasons"] = {
            path: targets[path]["failure_reasons"] for path in targets if targets[path]["failures"]
        }
        results["key_versions"] = {path: targets[path]["key_versions"] for path in targets}
        results["rotations"] = len(rotations)
        results["cpu_s"] = {
            "daemon": round(main.cpu(), 1),
            "upstream": round(cpu_seconds(upstream.pid), 1),
            "client": round(cpu_seconds(client.process.pid), 1),
        }
    results["rss_mb"] = [[at, round(rss / 2**20, 1)] for at, rss in samples]
    results["verdict"] = verdict(samples, plan.warmup_s, plan.max_growth)
    return results


def summary(results: dict[str, Any]) -> str:
    v = results["verdict"]
    lines = [
        f"soak of {results['plan']['seconds']:g} s, {results['plan']['streams']} streams, "
        f"{results['rotations']} rotations",
        f"requests: {results['requests']}; failed: {results['failures']}",
        f"RSS after the warm-up {v['baseline_mb']:g} MB, at the end {v['final_mb']:g} MB, "
        f"peak {v['peak_mb']:g} MB: {v['growth']:+.1%} (at most {v['max_growth']:+.0%})",
        "RSS over time (s, MB): "
        + ", ".join(
            f"{at:g} {mb:g}"
            for at, mb in results["rss_mb"][:: max(1, len(results["rss_mb"]) // 12)]
        ),
        "PASSED" if v["passed"] and results["failures"] == 0 else "FAILED",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--rotate-every-s", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=60.0)
    parser.add_argument("--sample-every-s", type=float, default=5.0)
    parser.add_argument("--max-growth", type=float, default=0.05)
    parser.add_argument(
        "--output", type=Path, default=REPO / "bench" / "results" / "soak-latest.json"
    )
    args = parser.parse_args(argv)
    plan = SoakPlan(
        seconds=args.minutes * 60,
        streams=args.streams,
        rotate_every_s=args.rotate_every_s,
        warmup_s=args.warmup_s,
        sample_every_s=args.sample_every_s,
        max_growth=args.max_growth,
    )
    if plan.streams < 2 or plan.seconds <= plan.warmup_s:
        parser.error("at least 2 streams, and minutes longer than the warm-up")
    started = time.monotonic()
    try:
        results = trio.run(soak, plan)
    except (BenchError, DemoError) as exc:
        print(f"bench/soak: {exc}", file=sys.stderr)
        return 1
    results["seconds"] = round(time.monotonic() - started, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    print(summary(results))
    say(f"written to {args.output}")
    return 0 if results["verdict"]["passed"] and results["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
