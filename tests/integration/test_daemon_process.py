"""The daemon as systemd runs it: a subprocess, real signals, a real NOTIFY_SOCKET."""

from __future__ import annotations

import grp
import json
import os
import signal
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ..conftest import DaemonProcess, unix_request

StartDaemon = Callable[..., DaemonProcess]
WriteConfig = Callable[..., Path]


def get_json(sock: Path, path: str) -> tuple[int, object]:
    status, _, body = unix_request(sock, "GET", path)
    return status, body


def test_ready_then_sigterm_exits_0_and_removes_both_sockets(
    start_daemon: StartDaemon, write_config: WriteConfig, runtime_dir: Path
) -> None:
    daemon = start_daemon(write_config())
    ready = daemon.wait_ready()
    assert ready["STATUS"] == "ready"
    data, control = runtime_dir / "data.sock", runtime_dir / "control.sock"
    assert stat.S_ISSOCK(data.stat().st_mode)
    assert stat.S_ISSOCK(control.stat().st_mode)
    assert get_json(control, "/healthz") == (200, {"status": "ok"})
    assert get_json(control, "/readyz") == (200, {"ready": True})

    daemon.signal(signal.SIGTERM)
    daemon.notify.wait_for("STOPPING", "1")
    assert daemon.wait() == 0
    assert not data.exists()
    assert not control.exists()
    assert "event=daemon.stopped" in daemon.stderr
    # The collector was tuned before the loop started (tune_gc: no full passes under load).
    log = daemon.stderr
    assert "event=gc.tuned" in log
    assert log.index("event=gc.tuned") < log.index("event=daemon.listening")


def test_sigint_drains_like_sigterm(
    start_daemon: StartDaemon, write_config: WriteConfig, runtime_dir: Path
) -> None:
    daemon = start_daemon(write_config())
    daemon.wait_ready()
    daemon.signal(signal.SIGINT)
    daemon.notify.wait_for("STOPPING", "1")
    assert daemon.wait() == 0
    assert not (runtime_dir / "data.sock").exists()


def test_sighup_reloads_with_reloading_and_monotonic_usec(
    start_daemon: StartDaemon, write_config: WriteConfig
) -> None:
    path = write_config()
    daemon = start_daemon(path)
    daemon.wait_ready()
    path.write_text(path.read_text().replace('level = "debug"', 'level = "warning"'))
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    daemon.signal(signal.SIGHUP)
    reloading = daemon.notify.wait_for("RELOADING", "1")
    assert int(reloading["MONOTONIC_USEC"]) >= before
    assert daemon.notify.wait_for("READY", "1")["STATUS"] == "ready"  # after RELOADING
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    # The new level took effect: info lines stop after the reload.
    log = daemon.stderr
    assert "event=config.reloaded" not in log  # logged at info, after level became warning
    assert "event=daemon.stopping" not in log
    assert "event=config.reloading" in log


def test_invalid_config_on_sighup_keeps_the_daemon_and_its_config(
    start_daemon: StartDaemon, write_config: WriteConfig, runtime_dir: Path
) -> None:
    path = write_config()
    daemon = start_daemon(path)
    daemon.wait_ready()
    good = path.read_text()
    path.write_text(good + "\n[listen]\nmode = 660\n")  # also a duplicate table: not TOML
    daemon.signal(signal.SIGHUP)
    daemon.notify.wait_for("RELOADING", "1")
    ready = daemon.notify.wait_for("READY", "1")
    assert ready["STATUS"].startswith("reload rejected, old config kept: (file): not valid TOML")
    # Valid but for one key, and it would silence info lines: rejected as a whole.
    path.write_text(good.replace('level = "debug"', 'level = "error"\nbogus = true'))
    daemon.signal(signal.SIGHUP)
    ready = daemon.notify.wait_for("READY", "1")
    assert ready["STATUS"] == "reload rejected, old config kept: logging.bogus: unknown key"
    assert daemon.proc.poll() is None
    assert get_json(runtime_dir / "control.sock", "/healthz") == (200, {"status": "ok"})
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert "event=config.reload_rejected" in daemon.stderr
    assert f'problem="logging.bogus: unknown key (in {path})"' in daemon.stderr


def test_stale_socket_file_is_replaced(
    start_daemon: StartDaemon, write_config: WriteConfig, runtime_dir: Path
) -> None:
    data = runtime_dir / "data.sock"
    crashed = socket.socket(socket.AF_UNIX)
    crashed.bind(str(data))  # a socket file nobody listens on, as a crash leaves behind
    crashed.close()
    assert data.exists()
    daemon = start_daemon(write_config())
    daemon.wait_ready()
    assert "event=socket.stale_removed" in daemon.stderr
    assert get_json(data, "/nowhere")[0] == 404  # the new daemon answers on the old path
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


def test_live_socket_is_refused_and_left_alone(
    start_daemon: StartDaemon, write_config: WriteConfig, runtime_dir: Path
) -> None:
    control = runtime_dir / "control.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(control))
        live.listen()
        inode = control.stat().st_ino
        daemon = start_daemon(write_config())
        assert daemon.wait() == 1
        assert f"another process is listening on {control}" in daemon.stderr
        assert control.stat().st_ino == inode  # the live socket's file is untouched
        assert not (runtime_dir / "data.sock").exists()  # and we cleaned up our own


def test_a_path_that_is_not_a_socket_is_never_removed(
    start_daemon: StartDaemon, write_config: WriteConfig, runtime_dir: Path
) -> None:
    data = runtime_dir / "data.sock"
    data.write_text("precious")
    daemon = start_daemon(write_config())
    assert daemon.wait() == 1
    assert f"{data} exists and is not a socket; refusing to replace it" in daemon.stderr
    assert data.read_text() == "precious"


def test_socket_files_get_the_configured_mode_and_group(
    start_daemon: StartDaemon, write_config: WriteConfig, runtime_dir: Path
) -> None:
    # A group we may give files to: any, as root; otherwise one we are a member of.
    choices = (g.gr_gid for g in grp.getgrall()) if os.geteuid() == 0 else os.getgroups()
    gid = next((g for g in choices if g != os.getgid()), None)
    assert gid is not None, "the test needs a second group this user may use"
    other = grp.getgrgid(gid)
    daemon = start_daemon(
        write_config(listen={"mode": "0600", "group": other.gr_name}, control={"mode": "0640"})
    )
    daemon.wait_ready()
    data, control = (runtime_dir / "data.sock").stat(), (runtime_dir / "control.sock").stat()
    assert stat.S_IMODE(data.st_mode) == 0o600
    assert data.st_gid == other.gr_gid
    assert stat.S_IMODE(control.st_mode) == 0o640
    assert control.st_gid == os.getgid()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


def test_unknown_group_fails_startup_naming_the_key(
    start_daemon: StartDaemon, write_config: WriteConfig, runtime_dir: Path
) -> None:
    daemon = start_daemon(write_config(control={"group": "no-such-group-oc"}))
    assert daemon.wait() == 1
    assert "control.group: no such group 'no-such-group-oc'" in daemon.stderr
    assert list(runtime_dir.glob("*.sock")) == []


def test_required_provider_without_key_holds_readiness(
    start_daemon: StartDaemon, write_config: WriteConfig, runtime_dir: Path
) -> None:
    path = write_config(
        vault={"addr": "http://127.0.0.1:1"},
        **{"providers.openai": {"base_url": "http://127.0.0.1:2", "vault_path": "oc/openai"}},
    )
    daemon = start_daemon(path, env={"VAULT_TOKEN": "hvs.SECRET-token-xyz"})
    status = daemon.notify.wait_for("STATUS")
    assert status == {"STATUS": "starting: no key for openai"}
    assert get_json(runtime_dir / "control.sock", "/readyz") == (
        503,
        {"ready": False, "reasons": ["no key for openai"]},
    )
    # A reload before READY=1 must not send READY=1: startup has not finished.
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("event=config.reloaded")
    messages = daemon.notify.drain()
    assert messages[-1] == {"STATUS": "starting: no key for openai"}
    assert all("READY" not in m and "RELOADING" not in m for m in messages)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert "SECRET" not in daemon.stderr
    assert all("SECRET" not in v for m in daemon.notify.messages for v in m.values())


def test_watchdog_is_fed_at_half_the_interval(
    start_daemon: StartDaemon, write_config: WriteConfig
) -> None:
    """The real process reads WATCHDOG_USEC and keeps feeding; the interval itself is
    checked in virtual time in tests/daemon/test_daemon.py."""
    daemon = start_daemon(write_config(), env={"WATCHDOG_USEC": "400000"})
    daemon.wait_ready()
    first = daemon.notify.wait_for("WATCHDOG", "1")
    second = daemon.notify.wait_for("WATCHDOG", "1")  # a later message: fed again
    assert first is not second
    daemon.signal(signal.SIGTERM)
    daemon.notify.wait_for("STOPPING", "1")
    assert daemon.wait() == 0


@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_connection_log_lines_carry_the_connection_id(
    start_daemon: StartDaemon, write_config: WriteConfig, runtime_dir: Path, fmt: str
) -> None:
    daemon = start_daemon(write_config(logging={"format": fmt}))
    daemon.wait_ready()
    get_json(runtime_dir / "data.sock", "/v1/nothing")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    lines = [ln for ln in daemon.stderr.splitlines() if "connection." in ln]
    assert len(lines) == 2
    if fmt == "json":
        records = [json.loads(ln) for ln in lines]
        assert [r["event"] for r in records] == ["connection.open", "connection.close"]
        assert {r["conn"] for r in records} == {"c1"}
        assert records[0]["peer_uid"] == os.getuid()
        assert records[0]["peer_pid"] > 0
        assert records[1]["outcome"] == "not found"
    else:
        assert all(" conn=c1 " in ln for ln in lines)
        assert f"peer_uid={os.getuid()}" in lines[0]


def signal_mask(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    raise AssertionError(field)


def test_signals_during_startup_are_held_not_fatal(
    start_daemon: StartDaemon, write_config: WriteConfig, runtime_dir: Path
) -> None:
    daemon = start_daemon(write_config())
    ours = sum(1 << (s - 1) for s in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM))
    usr1 = 1 << (signal.SIGUSR1 - 1)
    deadline = time.monotonic() + 10
    # Wait until `run` holds our signals. Between fork and exec, subprocess blocks every
    # signal (SIGUSR1 too): that is not our mask, and signals sent then would kill.
    while (mask := signal_mask(daemon.proc.pid, "SigBlk")) & ours != ours or mask & usr1:
        assert time.monotonic() < deadline
        assert daemon.proc.poll() is None
        time.sleep(0.001)
    daemon.signal(signal.SIGHUP)
    daemon.signal(signal.SIGTERM)  # before the daemon could have installed its receiver
    assert daemon.wait() == 0
    assert list(runtime_dir.glob("*.sock")) == []
    assert "event=daemon.stopping signal=SIGTERM" in daemon.stderr


def test_reload_that_unrequires_a_provider_makes_the_daemon_ready(
    start_daemon: StartDaemon, write_config: WriteConfig, runtime_dir: Path
) -> None:
    provider = {"base_url": "http://127.0.0.1:2", "vault_path": "oc/openai"}
    path = write_config(vault={"addr": "http://127.0.0.1:1"}, **{"providers.openai": provider})
    daemon = start_daemon(path, env={"VAULT_TOKEN": "unused-in-this-test"})
    assert daemon.notify.wait_for("STATUS") == {"STATUS": "starting: no key for openai"}
    path.write_text(
        path.read_text().replace(
            'vault_path = "oc/openai"', 'vault_path = "oc/openai"\nrequired = false'
        )
    )
    daemon.signal(signal.SIGHUP)
    # Ready now, and degraded: openai (optional now) has no key. Whether "vault
    # unreachable" is in the same line depends on whether the first login failed yet.
    ready = daemon.wait_ready()
    assert ready["STATUS"].startswith("degraded: ")
    assert "no key for openai" in ready["STATUS"].removeprefix("degraded: ").split(", ")
    assert get_json(runtime_dir / "control.sock", "/readyz") == (200, {"ready": True})
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


def test_control_tcp_without_a_readable_token_file_stops_startup(
    start_daemon: StartDaemon, write_config: WriteConfig, runtime_dir: Path
) -> None:
    path = write_config(control={"tcp": "127.0.0.1:9477", "token_file": "/nonexistent"})
    daemon = start_daemon(path)
    assert daemon.wait() == 1
    assert "control.token_file: cannot read /nonexistent" in daemon.stderr
    assert list(runtime_dir.glob("*.sock")) == []


@pytest.mark.parametrize(
    ("listen", "status"),
    [
        ({"allowed_uids": [os.getuid() + 1]}, 403),
        ({"allowed_gids": [os.getgid() + 1]}, 403),
        ({"allowed_uids": [os.getuid()], "allowed_gids": [os.getgid()]}, 404),
    ],
)
def test_peers_outside_allowed_ids_are_refused(
    start_daemon: StartDaemon,
    write_config: WriteConfig,
    runtime_dir: Path,
    listen: dict[str, list[int]],
    status: int,
) -> None:
    daemon = start_daemon(write_config(listen=listen))
    daemon.wait_ready()
    code, body = get_json(runtime_dir / "data.sock", "/v1/anything")
    assert code == status
    if status == 403:
        assert body == {
            "error": {
                "code": "forbidden",
                "message": f"peer uid {os.getuid()} gid {os.getgid()} is not allowed",
            }
        }
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
