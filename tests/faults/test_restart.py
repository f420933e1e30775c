"""A daemon that dies hard (SIGKILL, an OOM kill) leaves its socket files behind; the
next one must take their place and serve, with no one cleaning up by hand."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from ..conftest import DaemonProcess, unix_request

StartDaemon = Callable[..., DaemonProcess]
WriteConfig = Callable[..., Path]


def test_after_a_sigkill_the_next_daemon_replaces_the_stale_sockets_and_serves(
    start_daemon: StartDaemon, write_config: WriteConfig, runtime_dir: Path
) -> None:
    config = write_config()
    data, control = runtime_dir / "data.sock", runtime_dir / "control.sock"
    first = start_daemon(config)
    first.wait_ready()
    first.signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    assert data.exists()  # left behind: nobody removed them
    assert control.exists()

    second = start_daemon(config)
    second.wait_ready()
    assert second.stderr.count("event=socket.stale_removed") == 2
    assert unix_request(data, "GET", "/nowhere")[0] == 404  # the data socket answers
    assert unix_request(control, "GET", "/healthz")[0] == 200  # and the control socket
    second.signal(signal.SIGTERM)
    assert second.wait() == 0
    assert not data.exists()
    assert not control.exists()
