"""sd_notify: what reaches systemd's socket, and that failures never raise."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import pytest

from openclawd.notify import Notifier


def receive(sock: socket.socket) -> dict[str, str]:
    sock.settimeout(5)
    payload = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in payload.splitlines())


@pytest.fixture
def receiver(runtime_dir: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(runtime_dir / "notify"))
    return sock


def test_messages_reach_a_path_socket(receiver: socket.socket, runtime_dir: Path) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(runtime_dir / "notify")})
    assert notifier.enabled
    assert notifier.ready("ready")
    assert receive(receiver) == {"READY": "1", "STATUS": "ready"}
    assert notifier.status("draining: 2 in flight")
    assert receive(receiver) == {"STATUS": "draining: 2 in flight"}
    assert notifier.stopping()
    assert receive(receiver) == {"STOPPING": "1"}
    assert notifier.watchdog()
    assert receive(receiver) == {"WATCHDOG": "1"}
    with receiver:
        notifier.close()


def test_reloading_carries_monotonic_usec(receiver: socket.socket, runtime_dir: Path) -> None:
    notifier = Notifier(str(runtime_dir / "notify"))
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    message = receive(receiver)
    assert message["RELOADING"] == "1"
    assert before <= int(message["MONOTONIC_USEC"]) <= after
    notifier.close()
    receiver.close()


def test_abstract_namespace_socket() -> None:
    name = f"openclawd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        notifier = Notifier("@" + name)
        assert notifier.ready()
        assert receive(sock) == {"READY": "1"}
        notifier.close()


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.stopping() is False
    assert notifier.watchdog_interval_s is None


def test_failure_is_logged_not_raised(runtime_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(str(runtime_dir / "nobody-listens-here"))
    with caplog.at_level(logging.WARNING, logger="openclawd.notify"):
        assert notifier.ready() is False
    assert [r.getMessage() for r in caplog.records] == ["notify.failed"]
    notifier.close()


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    env = {"NOTIFY_SOCKET": "", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_environ(env).watchdog_interval_s == 15.0
    mine = {**env, "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_environ(mine).watchdog_interval_s == 15.0
    # systemd addressed the watchdog to another process (we were forked): not ours.
    other = {**env, "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_environ(other).watchdog_interval_s is None
