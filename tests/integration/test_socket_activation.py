"""systemd socket activation (CONTRACT.md 6), the test playing systemd: it binds both
listening sockets, hands them to the daemon as systemd does (descriptors 3 and 4,
``LISTEN_FDS``, ``LISTEN_FDNAMES``, ``LISTEN_PID`` set by the process that then execs the
daemon), stops it, connects an app while no daemon runs, and starts a second daemon on the
same sockets, which serves that app."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from ..bao import BaoServer, shared_bao  # noqa: F401 - a fixture
from ..conftest import DaemonProcess, unix_request
from ..dataplane.daemon_process import write_config
from ..dataplane.harness import unique_vault_path
from ..fake_upstream import open_fake_upstream

KEY = "sk-activation-0001-aaaaaaaaaaaaaaaa"
StartDaemon = Callable[..., DaemonProcess]

# What systemd does between fork and exec: the sockets to descriptors 3 and 4, and
# LISTEN_PID set to the pid of the process that becomes the daemon.
SYSTEMD = """
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]  # out of the way of 3 and 4
for i, fd in enumerate(moved):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


@pytest.fixture
def sockets(runtime_dir: Path) -> Iterator[tuple[socket.socket, socket.socket]]:
    """The two listening sockets, as a ``.socket`` unit holds them."""
    data = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with data, control:
        data.bind(str(runtime_dir / "data.sock"))
        control.bind(str(runtime_dir / "control.sock"))
        os.chmod(runtime_dir / "data.sock", 0o666)  # SocketMode=: the daemon leaves it alone
        data.listen(16)
        control.listen(16)
        yield data, control


def activated(
    start_daemon: StartDaemon, config: Path, sockets: tuple[socket.socket, socket.socket]
) -> DaemonProcess:
    fds = tuple(s.fileno() for s in sockets)
    return start_daemon(
        config,
        env={"LISTEN_FDS": "2", "LISTEN_FDNAMES": "data:control"},
        launcher=(sys.executable, "-c", SYSTEMD, ",".join(map(str, fds))),
        pass_fds=fds,
    )


async def test_an_app_connecting_during_a_restart_is_served(
    shared_bao: BaoServer,  # noqa: F811
    runtime_dir: Path,
    start_daemon: StartDaemon,
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    data, control = runtime_dir / "data.sock", runtime_dir / "control.sock"
    vault_path = unique_vault_path()
    await trio.to_thread.run_sync(lambda: shared_bao.write(vault_path, api_key=KEY))
    with trio.fail_after(90):
        async with open_fake_upstream(expected_key=KEY) as upstream:
            config = write_config(runtime_dir, shared_bao, upstream.url, vault_path)
            first = activated(start_daemon, config, sockets)
            await trio.to_thread.run_sync(first.wait_ready)
            status, _, body = await trio.to_thread.run_sync(
                unix_request, control, "GET", "/v1/status"
            )
            assert (status, body["state"]) == (200, "ready")
            first.signal(signal.SIGTERM)
            assert await trio.to_thread.run_sync(first.wait) == 0
            assert "event=socket.inherited name=data" in first.stderr
            # The files are the socket unit's: still there, mode untouched, still listening.
            assert stat.S_IMODE(data.stat().st_mode) == 0o666
            assert stat.S_ISSOCK(control.stat().st_mode)

            # No daemon runs: the app connects (the kernel queues it) and sends its request.
            app = http.client.HTTPConnection("openclawd", timeout=30)
            app.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            app.sock.settimeout(30)
            app.sock.connect(str(data))
            app.request("GET", "/v1/http/openai/v1/models")
            assert upstream.requests == []

            second = activated(start_daemon, config, sockets)

            def answer() -> tuple[int, object]:
                response = app.getresponse()
                return response.status, json.loads(response.read())

            status, models = await trio.to_thread.run_sync(answer)
            app.close()
            assert status == 200, models
            assert isinstance(models, dict)
            assert models["object"] == "list"
            assert len(upstream.requests) == 1  # with the key from Vault
            await trio.to_thread.run_sync(second.wait_ready)
            code = await trio.run_process(
                [sys.executable, "-m", "openclawd", "status", "--config", str(config)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert code.returncode == 0, code.stderr
            assert code.stdout.decode().startswith("state        ready\n")
            second.signal(signal.SIGTERM)
            assert await trio.to_thread.run_sync(second.wait) == 0
    assert stat.S_ISSOCK(data.stat().st_mode)
    assert stat.S_ISSOCK(control.stat().st_mode)
    assert KEY not in first.stderr + second.stderr


def test_a_socket_that_is_not_listening_stops_the_start_naming_it(
    runtime_dir: Path, start_daemon: StartDaemon, write_config: Callable[..., Path]
) -> None:
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as data,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as control,
    ):
        data.bind(str(runtime_dir / "data.sock"))
        data.listen()
        control.bind(str(runtime_dir / "control.sock"))
        daemon = activated(start_daemon, write_config(), (data, control))
        assert daemon.wait() == 1
    assert (
        "descriptor 4 (control) is a SOCK_DGRAM socket, not SOCK_STREAM (ListenStream=)"
        in daemon.stderr
    )
    assert "event=daemon.listen_failed" in daemon.stderr
