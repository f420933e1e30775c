"""Shared fixtures: short runtime dirs, config files, and a daemon run as a subprocess."""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio.testing

from openclawd import logs

REPO = Path(__file__).resolve().parent.parent


def leak_forms(key: str) -> list[str]:
    """A key as it could leak: plain, base64 (alone and as in a Basic header), URL-encoded."""
    return [
        key,
        base64.b64encode(key.encode()).decode(),
        base64.b64encode(f"user:{key}".encode()).decode(),
        urllib.parse.quote(key, safe=""),
    ]


def doc_blocks(doc: str, lang: str, section: str | None = None) -> list[str]:
    """The fenced code blocks in ``lang`` of ``doc`` (a path from the repository's top, such
    as ``README.md`` or ``docs/operations.md``), from one ``## section`` or all."""
    text = (REPO / doc).read_text()
    if section is not None:
        text = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(rf"```{lang}\n(.*?)```", text, re.S)]


@pytest.fixture
def io_clock() -> trio.testing.MockClock:
    """Virtual time for a test with real sockets in flight in its own trio run: the clock
    jumps to the next deadline once every task has been blocked for 10 ms of real time
    (trio's advice for real I/O; ``autojump_clock`` jumps at once). Not for a test that
    waits on a thread or another process with only a far deadline pending: the clock
    would jump to that deadline first."""
    return trio.testing.MockClock(autojump_threshold=0.01)


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    """A short directory for sockets: AF_UNIX paths must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="oc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def render_toml(tables: dict[str, dict[str, Any]]) -> str:
    lines = []
    for table, keys in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in keys.items()]
        lines.append("")
    return "\n".join(lines)


def daemon_tables(runtime: Path, **overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A minimal runnable config in ``runtime``; ``overrides`` merge per table."""
    tables: dict[str, dict[str, Any]] = {
        "listen": {"socket": str(runtime / "data.sock")},
        "control": {"socket": str(runtime / "control.sock")},
        "shutdown": {"drain_timeout_s": 5.0},
        "logging": {"level": "debug"},
    }
    for table, keys in overrides.items():
        tables.setdefault(table, {}).update(keys)
    return tables


@pytest.fixture
def write_config(runtime_dir: Path) -> Callable[..., Path]:
    def write(text: str | None = None, name: str = "openclawd.toml", **tables: Any) -> Path:
        path = runtime_dir / name
        if text is None:
            text = render_toml(daemon_tables(runtime_dir, **tables))
        path.write_text(text)
        return path

    return write


class NotifyReceiver:
    """Plays systemd's side of sd_notify: a datagram socket that collects messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []
        self._cursor = 0

    def wait_for(self, key: str, value: str | None = None, timeout: float = 10.0) -> dict[str, str]:
        """The next message, after the last one matched, with ``key`` (= ``value``).

        Messages are consumed in order, so successive calls prove the order they came in.
        """
        deadline = time.monotonic() + timeout
        while True:
            while self._cursor < len(self.messages):
                message = self.messages[self._cursor]
                self._cursor += 1
                if key in message and (value is None or message[key] == value):
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {key}={value} within {timeout}s; got {self.messages}")
            self.sock.settimeout(remaining)
            try:
                payload = self.sock.recv(65536)
            except TimeoutError:
                continue
            self.messages.append(
                dict(line.split("=", 1) for line in payload.decode().splitlines() if "=" in line)
            )

    def drain(self, quiet_s: float = 0.2) -> list[dict[str, str]]:
        """Collect what is pending until ``quiet_s`` pass without a message; return all."""
        self.sock.settimeout(quiet_s)
        while True:
            try:
                payload = self.sock.recv(65536)
            except TimeoutError:
                return self.messages
            self.messages.append(
                dict(line.split("=", 1) for line in payload.decode().splitlines() if "=" in line)
            )

    def close(self) -> None:
        self.sock.close()


class DaemonProcess:
    """``openclawd run`` in a subprocess, with stderr captured to a file."""

    def __init__(
        self,
        config: Path,
        runtime: Path,
        env: dict[str, str] | None = None,
        *,
        launcher: tuple[str, ...] = (),
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        """``launcher`` runs before the daemon's command and execs it (it is given the
        command as its last arguments); ``pass_fds`` are kept open for it."""
        self.config = config
        self.stderr_path = runtime / f"stderr-{time.monotonic_ns()}.log"
        self.stdout_path = runtime / f"stdout-{time.monotonic_ns()}.log"
        self.notify = NotifyReceiver(runtime / f"notify-{time.monotonic_ns() % 10**9}")
        environ = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("VAULT_", "NOTIFY_", "WATCHDOG_"))
        }
        environ["NOTIFY_SOCKET"] = str(self.notify.path)
        environ.update(env or {})
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in close()
        self._stdout = open(self.stdout_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [*launcher, sys.executable, "-m", "openclawd", "run", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            pass_fds=pass_fds,
            stdout=self._stdout,  # nothing is expected there; kept to be searched
            stderr=self._stderr,
            env=environ,
        )

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout=timeout)

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stderr:
            assert time.monotonic() < deadline, f"no {text!r} in the log: {self.stderr}"
            time.sleep(0.01)

    def wait_ready(self, timeout: float = 15.0) -> dict[str, str]:
        return self.notify.wait_for("READY", "1", timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._stderr.close()
        self._stdout.close()
        self.notify.close()


@pytest.fixture
def start_daemon(runtime_dir: Path) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(config: Path, env: dict[str, str] | None = None, **how: Any) -> DaemonProcess:
        daemon = DaemonProcess(config, runtime_dir, env, **how)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.close()


def unix_http(path: str | Path, request: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes to a unix socket and read until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str | Path, timeout: float) -> None:
        super().__init__("openclawd", timeout=timeout)
        self._unix_path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._unix_path)


def unix_request(
    path: str | Path, method: str, target: str, body: object = None, timeout: float = 5.0
) -> tuple[int, dict[str, str], Any]:
    """One HTTP request over a unix socket; the body is decoded as JSON when it is JSON.

    A real HTTP client (it reads by Content-Length): hypercorn keeps a connection open
    after a `Connection: close` response (hypercorn issue #330), as curl and httpx expect.
    """
    conn = _UnixHTTPConnection(path, timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {} if payload is None else {"content-type": "application/json"}
        conn.request(method, target, body=payload, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        content_type = response.getheader("content-type", "")
        decoded = json.loads(raw) if content_type.startswith("application/json") else raw
        return response.status, {k.lower(): v for k, v in response.getheaders()}, decoded
    finally:
        conn.close()


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (and its key)."""
    if shutil.which("openssl") is None:  # a missing tool fails, never skips
        pytest.fail("the openssl CLI is not installed (Debian package openssl)")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def server_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    """A server's TLS context presenting that certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


@pytest.fixture
def log_text() -> Iterator[io.StringIO]:
    """Every log line of the test, as the CLI formats them (ours at debug, the libraries'
    at warning), in a buffer; the logging set-up is put back afterwards."""
    out = io.StringIO()
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("openclawd").level)
    logs.configure("debug", "logfmt", out)
    yield out
    logs.configure()
    root.handlers[:] = saved[1]
    root.setLevel(saved[0])
    logging.getLogger("openclawd").setLevel(saved[2])
