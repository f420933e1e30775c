"""The daemon raises its soft limit on open files to the hard one (systemd's default soft
limit, 1024, is below what the default ``max_connections`` needs) and warns when even
the hard limit is short. Each case runs in a child process with limits of its own."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from openclawd import config
from openclawd.daemon import files_needed
from openclawd.local.server import REFUSING_AT_ONCE

from ..conftest import daemon_tables


def run_with_limits(soft: int, hard: int, needed: int) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(
        f"""
        import resource, sys
        from openclawd import logs
        from openclawd.daemon import raise_file_limit
        resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))
        logs.configure(stream=sys.stderr)
        returned = raise_file_limit({needed})
        print(returned, *resource.getrlimit(resource.RLIMIT_NOFILE))
        """
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    done = run_with_limits(soft=256, hard=4096, needed=3000)
    assert done.stdout.split() == ["4096", "4096", "4096"]
    assert "file_limit_low" not in done.stderr


def test_a_hard_limit_below_the_need_is_used_and_warned_of() -> None:
    done = run_with_limits(soft=256, hard=512, needed=3000)
    assert done.stdout.split() == ["512", "512", "512"]
    assert "event=daemon.file_limit_low" in done.stderr
    assert "limit=512 needed=3000" in done.stderr


def test_the_need_counts_connections_twice_refusals_pools_and_spare(runtime_dir: Path) -> None:
    tables = daemon_tables(runtime_dir, listen={"max_connections": 1000})
    tables["vault"] = {"addr": "http://127.0.0.1:8200", "token_file": str(runtime_dir / "t")}
    tables["providers"] = {
        "a": {"base_url": "http://127.0.0.1:1", "vault_path": "a", "max_connections": 100},
        "b": {"base_url": "http://127.0.0.1:2", "vault_path": "b", "max_connections": 20},
    }
    cfg = config.parse(tables, source="x.toml")
    assert files_needed(cfg) == 2 * 1000 + REFUSING_AT_ONCE + 120 + 64
