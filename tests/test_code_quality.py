"""The code holds to its own rules: ruff (ASYNC, B, I, UP, SIM, PT, and C901 at a
complexity of at most 10) and mypy --strict; no module of the daemon over 450 lines but
the config's."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO

MAX_MODULE_LINES = 450
# The config is one schema: its tables, their keys and their checks, read together.
LONG_MODULES = {"openclawd/config.py"}


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_ruff_lint() -> None:
    result = run_tool("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    result = run_tool("ruff", "format", "--check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict() -> None:
    result = run_tool("mypy", "--no-incremental")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_enforces_the_complexity_bound() -> None:
    """C901 is in the rules ``test_ruff_lint`` runs, at 10: a function with 11 branches
    fails it."""
    branches = "".join(f"    if x == {n}:\n        return {n}\n" for n in range(11))
    source = f"def f(x: int) -> int:\n{branches}    return -1\n"
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--stdin-filename", "x.py", "-"],
        cwd=REPO,
        input=source,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "C901" in result.stdout


def test_no_module_is_too_long() -> None:
    long = {
        str(path.relative_to(REPO)): lines
        for path in sorted((REPO / "openclawd").rglob("*.py"))
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert set(long) <= LONG_MODULES, long
