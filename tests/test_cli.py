"""The command line: exit codes and what each command prints."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from openclawd import __version__, cli


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "openclawd", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_version() -> None:
    result = run_cli("version")
    assert (result.returncode, result.stdout) == (0, f"openclawd {__version__}\n")


def test_check_config_valid_prints_effective_config(write_config: Callable[..., Path]) -> None:
    path = write_config(listen={"mode": "0600"})
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    effective = tomllib.loads(result.stdout)
    assert effective["listen"]["mode"] == "0600"
    assert effective["listen"]["max_connections"] == 1024  # defaults are filled in
    assert effective["shutdown"]["drain_timeout_s"] == 5.0


def test_check_config_invalid_exits_2_with_one_line_per_problem(
    write_config: Callable[..., Path],
) -> None:
    path = write_config(text='[listen]\nmode = 660\nbogus = 1\n[logging]\nlevel = "loud"\n')
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f'listen.mode: must be a string of octal digits like "0660", not an integer (in {path})',
        f"listen.bogus: unknown key (in {path})",
        "logging.level: must be one of 'debug', 'info', 'warning', 'error', not 'loud'"
        f" (in {path})",
    ]


def test_check_config_missing_file_exits_2(tmp_path: Path) -> None:
    result = run_cli("check-config", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "cannot read: No such file or directory" in result.stderr


def test_run_with_invalid_config_exits_2(write_config: Callable[..., Path]) -> None:
    path = write_config(text="[listen]\nsocket = 1\n")
    result = run_cli("run", "--config", str(path))
    assert result.returncode == 2
    assert "listen.socket: must be a string, not an integer" in result.stderr


def test_default_config_path_is_the_contracts() -> None:
    args = cli._parser().parse_args(["run"])
    assert args.config == "/etc/openclawd/openclawd.toml"
    args = cli._parser().parse_args(["check-config"])
    assert args.config == "/etc/openclawd/openclawd.toml"


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["frobnicate"], ["run", "--bogus"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
    assert "usage: openclawd" in capsys.readouterr().err


def test_run_holds_exactly_the_signals_the_daemon_handles() -> None:
    from openclawd.daemon import HANDLED_SIGNALS

    assert cli._HELD_SIGNALS == HANDLED_SIGNALS


def test_check_config_never_prints_the_vault_token(write_config: Callable[..., Path]) -> None:
    provider = {"base_url": "https://api.example.com", "vault_path": "oc/x"}
    path = write_config(vault={"addr": "https://vault:8200"}, **{"providers.x": provider})
    env = {"VAULT_TOKEN": "hvs.SECRET-token-xyz"}
    result = run_cli("check-config", "--config", str(path), env=env)
    assert result.returncode == 0, result.stderr
    assert 'token_file = ""' in result.stdout
    assert "SECRET" not in result.stdout + result.stderr


def test_tune_gc_freezes_the_start_heap_and_collects_young_objects_less_often() -> None:
    """In a fresh interpreter: what ``run`` does to the collector before the loop starts."""
    code = (
        "import gc; from openclawd.cli import tune_gc; before = gc.get_freeze_count(); "
        "tune_gc(); print(before, gc.get_freeze_count(), *gc.get_threshold())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    before, frozen, *threshold = (int(n) for n in result.stdout.split())
    assert before == 0
    assert frozen > 1000  # the imported modules' objects, no longer scanned
    assert threshold == [10_000, 10, 10]
