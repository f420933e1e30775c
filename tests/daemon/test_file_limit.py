"""The daemon raises its soft limit on open files to the hard one (systemd's default soft
limit, 1024, is below what the default ``max_connections`` needs) and warns when even
the hard limit is short. Each case runs in a child process with limits of its own."""

from __future__ import annotations

import re
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

from openclawd import config
from openclawd.listeners import files_needed

from ..conftest import REPO, daemon_tables


def run_with_limits(soft: int, hard: int, needed: int) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(
        f"""
        import resource, sys
        from openclawd import logs
        from openclawd.listeners import raise_file_limit
        resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))
        logs.configure(stream=sys.stderr)
        returned = raise_file_limit({needed})
        print(returned, *resource.getrlimit(resource.RLIMIT_NOFILE))
        """
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )


HARD = min(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])  # a child cannot raise it


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    done = run_with_limits(soft=256, hard=HARD, needed=HARD - 1)
    assert done.stdout.split() == [str(HARD)] * 3
    assert "file_limit_low" not in done.stderr


def test_a_hard_limit_below_the_need_is_used_and_warned_of() -> None:
    done = run_with_limits(soft=256, hard=512, needed=3000)
    assert done.stdout.split() == ["512", "512", "512"]
    assert "event=daemon.file_limit_low" in done.stderr
    assert "limit=512 needed=3000" in done.stderr


def test_the_unit_s_limit_covers_the_default_config_and_systemd_s_default_does_not(
    runtime_dir: Path,
) -> None:
    """Why the daemon raises its limit, and why the unit sets one: with the defaults
    (1,024 connections, one provider's pool of 100) the need is over systemd's default
    soft limit of 1,024 files, and under the unit's ``LimitNOFILE``."""
    tables = daemon_tables(runtime_dir)
    tables["vault"] = {"addr": "http://127.0.0.1:8200", "token_file": str(runtime_dir / "t")}
    tables["providers"] = {"openai": {"base_url": "http://127.0.0.1:1", "vault_path": "a"}}
    needed = files_needed(config.parse(tables, source="x.toml"))
    unit = (REPO / "systemd" / "openclawd.service").read_text()
    (limit,) = re.findall(r"^LimitNOFILE=(\d+)$", unit, flags=re.MULTILINE)
    assert 1024 < needed <= int(limit)
    tables["listen"] = {**tables["listen"], "max_connections": 2048}
    assert files_needed(config.parse(tables, source="x.toml")) > needed + 2 * 1000
