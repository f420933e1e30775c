"""The shipped systemd units: they verify clean, the service scores <= 2.0, and they match
the daemon: the service runs it on the two sockets its socket units hold (CONTRACT.md 6)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from openclawd import config

from .conftest import REPO

UNIT = REPO / "systemd" / "openclawd.service"
DATA_SOCKET = REPO / "systemd" / "openclawd.socket"
CONTROL_SOCKET = REPO / "systemd" / "openclawd-control.socket"


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is needed to check the unit (Debian package: systemd)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


def unit_settings(unit: Path = UNIT) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


@pytest.mark.parametrize("unit", [UNIT, DATA_SOCKET, CONTROL_SOCKET], ids=lambda u: u.name)
def test_verify_prints_nothing(unit: Path) -> None:
    # systemd-analyze verify exits 0 even on bad values: its output is what counts.
    result = systemd_analyze("verify", str(unit))
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


def test_the_socket_units_hold_the_sockets_of_the_example_config() -> None:
    example = config.load(str(REPO / "etc" / "openclawd.toml"), environ={})
    for unit, name, path in (
        (DATA_SOCKET, "data", example.listen.socket),
        (CONTROL_SOCKET, "control", example.control.socket),
    ):
        s = unit_settings(unit)
        assert s["ListenStream"] == [path]
        assert s["FileDescriptorName"] == [name]
        assert s["Service"] == ["openclawd.service"]
        assert s["SocketMode"] == ["0660"]
        assert s["WantedBy"] == ["sockets.target"]


def test_the_service_uses_both_sockets_and_keeps_their_files() -> None:
    s = unit_settings()
    sockets = ["openclawd.socket", "openclawd-control.socket"]
    assert s["Sockets"][0].split() == sockets
    assert s["Requires"][0].split() == sockets
    assert sockets == [u for after in s["After"] for u in after.split() if u.endswith(".socket")]
    # RuntimeDirectory= would otherwise remove /run/openclawd, the sockets' files with it,
    # whenever the service stops or restarts.
    assert s["RuntimeDirectoryPreserve"] == ["yes"]
