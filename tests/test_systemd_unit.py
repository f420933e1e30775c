"""The shipped systemd unit: it verifies clean, scores <= 2.0, and matches the daemon."""

from __future__ import annotations

import re
import shutil
import subprocess

from openclawd import config

from .conftest import REPO

UNIT = REPO / "systemd" / "openclawd.service"


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is needed to check the unit (Debian package: systemd)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_verify_prints_nothing() -> None:
    # systemd-analyze verify exits 0 even on bad values: its output is what counts.
    result = systemd_analyze("verify", str(UNIT))
    assert result.stderr == ""
    assert result.stdout == ""
    assert result.returncode == 0


def test_security_exposure_is_at_most_2() -> None:
    result = systemd_analyze("security", "--offline=yes", str(UNIT))
    match = re.search(r"Overall exposure level for openclawd\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0


def test_unit_runs_the_daemon_the_contract_way() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["ExecStart"][0].endswith("openclawd run --config /etc/openclawd/openclawd.toml")
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["RuntimeDirectory"] == ["openclawd"]
    assert s["User"] == ["openclawd"]
    assert s["Restart"] == ["on-failure"]
    assert "2" in s["RestartPreventExitStatus"][0].split()
    assert int(s["WatchdogSec"][0]) > 0
    creds = [c.split(":", 1)[0] for c in s["LoadCredential"]]
    assert creds == ["vault-role-id", "vault-secret-id"]


def test_stop_timeout_outlasts_the_drain() -> None:
    s = unit_settings()
    stop_s = int(s["TimeoutStopSec"][0])
    example = config.load(str(REPO / "etc" / "openclawd.toml"), environ={})
    assert stop_s > example.shutdown.drain_timeout_s
    assert stop_s > config.ShutdownConfig().drain_timeout_s


def test_example_config_matches_the_unit() -> None:
    # The shipped config reads the credentials the shipped unit loads.
    s = unit_settings()
    creds = {c.split(":", 1)[0] for c in s["LoadCredential"]}
    example = config.load(str(REPO / "etc" / "openclawd.toml"), environ={})
    assert {example.vault.role_id_file, example.vault.secret_id_file} == creds
    assert example.listen.socket.startswith("/run/openclawd/")
    assert example.control.socket.startswith("/run/openclawd/")
