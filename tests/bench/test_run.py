"""``bench/run``'s runner, end to end, in its ``--smoke`` size: every scenario runs against a
real bao, the fake upstream and the daemon, and reports every figure.

This checks that the benchmark works and tells the truth about failures, never how fast
anything is: no figure is compared with a target here (docs/performance.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PATHS = ("direct", "ws", "http")


def test_a_smoke_run_reports_every_scenario_and_leaks_no_key(tmp_path: Path) -> None:
    output = tmp_path / "out.json"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["TMPDIR"] = str(scratch)
    run = subprocess.run(
        [sys.executable, "-m", "bench.runner", "--smoke", "--output", str(output)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    text = output.read_text()
    results = json.loads(text)
    assert results["mode"] == "smoke"
    assert results["machine"]["cpus"] >= 1
    assert {"openclawd", "trio", "httpx", "bao"} <= set(results["versions"])
    s = results["scenarios"]
    plan = results["plan"]

    _assert_latencies(s, plan)
    _assert_relay_and_throughput(s, plan)
    _assert_memory_and_startup(s, plan)
    _assert_rotation(s["rotation"])

    assert len(results["load_average_at_start"]) == len(results["load_average_at_end"]) == 3
    _assert_streams(s, plan, run.stdout)

    assert "| scenario | direct | via /v1/ws | via /v1/http |" in run.stdout
    # Keys: every one the runner makes starts with this; none is in any output.
    for out in (run.stdout, run.stderr, text):
        assert "sk-bench-" not in out
    # Its runtime dir (Vault's data, the daemon's log, sockets) is gone.
    assert list(scratch.iterdir()) == []


def _assert_latencies(s: dict[str, Any], plan: dict[str, Any]) -> None:
    """Scenarios 1-3: every request answered, the figures ordered, the added delay right."""
    for name in ("latency", "latency_after_idle", "first_event"):
        for path in PATHS:
            figures = s[name][path]
            assert figures["failures"] == 0, (name, path, figures)
            assert (
                figures["requests"]
                == plan["rounds"]
                * (plan["sequential"] if name == "latency" else plan["first_event"])
                - plan["rounds"]
            )  # the first of each batch opens the connection: not counted
            assert 0 < figures["p50_us"] <= figures["p99_us"]
        for path in ("ws", "http"):
            added = s[name][path]["added_p50_us"]
            assert added == round(s[name][path]["p50_us"] - s[name]["direct"]["p50_us"], 1)
            # CPU time comes in clock ticks (10 ms): a smoke run's few requests may show 0.
            assert s[name][path]["daemon_cpu_us_per_request"] >= 0


def _assert_relay_and_throughput(s: dict[str, Any], plan: dict[str, Any]) -> None:
    for path in PATHS:
        assert s["relay"][path]["failures"] == 0
        assert s["relay"][path]["events_per_s"] > 0
    assert set(s["throughput"]) == {str(c) for c in plan["concurrency"]}
    for row in s["throughput"].values():
        for path in PATHS:
            assert row[path]["requests_per_s"] > 0
            assert row[path]["failures"] == 0


def _assert_memory_and_startup(s: dict[str, Any], plan: dict[str, Any]) -> None:
    steps = s["memory"]["idle_connections"]
    assert [step["connections"] for step in steps] == plan["idle"]
    assert all(step["rss_mb"] > 0 for step in steps)
    assert s["startup"]["starts"] == plan["starts"]
    assert s["startup"]["ready_ms_p50"] > 0


def _assert_rotation(rotation: dict[str, Any]) -> None:
    assert rotation["failures"] == 0, rotation
    assert rotation["rotations"] >= 1
    # Every new key reached the upstream: the daemon followed each rotation.
    assert len(rotation["new_key_first_used_after_ms"]) == rotation["rotations"]
    assert all(ms is not None and ms >= 0 for ms in rotation["new_key_first_used_after_ms"])
    # The ws clients saw the versions move on (key_version in response.end).
    assert len(rotation["ws"]["key_versions"]) >= 2


def _assert_streams(s: dict[str, Any], plan: dict[str, Any], stdout: str) -> None:
    """8: every stream complete, every event timed, on every path, at every N."""
    assert set(s["streams"]) == {str(n) for n in plan["streams"]}
    for n, row in s["streams"].items():
        streams = int(n) * plan["streams_rounds"]
        assert len(row["load_average"]) == 3
        for path in PATHS:
            figures = row[path]
            assert figures["failures"] == 0, (n, path, figures)
            assert figures["streams"] == streams
            assert figures["events"] == streams * plan["streams_events"]
            assert 0 < figures["p50_us"] <= figures["p99_us"] <= figures["max_us"]
            assert figures["client_processes"] >= 1
            assert figures["client_cpu_percent_busiest"] >= 0
            assert figures["upstream_cpu_percent"] >= 0
        for path in ("ws", "http"):
            figures = row[path]
            direct = row["direct"]
            assert figures["added_p50_us"] == round(figures["p50_us"] - direct["p50_us"], 1)
            assert figures["added_p99_us"] == round(figures["p99_us"] - direct["p99_us"], 1)
            assert figures["daemon_cpu_s_per_1k_events"] >= 0  # clock ticks: may be 0
        assert f"| 8 {int(n):,} streams: event delay p50 / p99 (ms) |" in stdout
