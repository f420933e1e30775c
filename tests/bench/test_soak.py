"""``bench/soak``: its verdict on memory, and a short run end to end (the real soak takes
minutes and is not part of CI; docs/performance.md, "The soak")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.runner import BenchError
from bench.soak import WINDOW, verdict

REPO = Path(__file__).resolve().parents[2]
MB = 2**20


def samples(*mb: float, every_s: float = 5.0) -> list[tuple[float, int]]:
    return [(i * every_s, int(m * MB)) for i, m in enumerate(mb)]


def test_growth_is_measured_from_the_end_of_the_warm_up() -> None:
    # The climb during the warm-up (first 10 s) does not count; medians damp one spike.
    rss = samples(40, 50, 60, 60, 61, 90, 61, 62, 62)
    result = verdict(rss, warmup_s=10, max_growth=0.05)
    assert (result["baseline_mb"], result["final_mb"], result["peak_mb"]) == (60, 62, 90)
    assert result["growth"] == pytest.approx(62 / 60 - 1, abs=1e-4)
    assert result["passed"] is True


def test_growth_over_the_bound_fails() -> None:
    rss = samples(60, 60, 60, 62, 64, 66)  # medians 60 and 64
    result = verdict(rss, warmup_s=0, max_growth=0.05)
    assert result["growth"] == pytest.approx(64 / 60 - 1, abs=1e-4)
    assert result["passed"] is False


def test_too_few_samples_after_the_warm_up_is_an_error() -> None:
    with pytest.raises(BenchError, match="samples after the warm-up"):
        verdict(samples(*[60] * (2 * WINDOW)), warmup_s=5, max_growth=0.05)


def test_a_short_soak_rotates_loses_nothing_and_leaks_no_key(tmp_path: Path) -> None:
    output = tmp_path / "soak.json"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["TMPDIR"] = str(scratch)
    argv = [sys.executable, "-m", "bench.soak", "--minutes", "0.1", "--warmup-s", "2"]
    argv += ["--streams", "6", "--rotate-every-s", "1.5", "--sample-every-s", "0.5"]
    argv += ["--max-growth", "1", "--output", str(output)]
    run = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    text = output.read_text()
    results = json.loads(text)
    assert results["failures"] == 0
    assert results["requests"]["ws"] > 0
    assert results["requests"]["http"] > 0
    assert results["rotations"] >= 2
    # /v1/ws names the key version of each response: more than one served, the rotations
    # took (with the old key revoked at once, and no request failed).
    assert len(results["key_versions"]["ws"]) >= 2
    rss = [(at, int(mb * MB)) for at, mb in results["rss_mb"]]
    assert len(rss) >= 10
    recomputed = verdict(rss, warmup_s=2, max_growth=1)
    assert recomputed["growth"] == pytest.approx(results["verdict"]["growth"], abs=0.01)
    assert "PASSED" in run.stdout
    for out in (run.stdout, run.stderr, text):
        assert "sk-bench-" not in out
    assert list(scratch.iterdir()) == []  # the run's directory is gone
