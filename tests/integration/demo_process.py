"""``openclawd demo`` run as a user runs it: a subprocess whose stdout is the guide.

``DemoProcess`` starts the demo with its own HOME and TMPDIR (fresh directories, so a test
can see what the demo leaves there) and none of the caller's Vault, OpenBao or systemd
variables; reader threads collect stdout and stderr line by line, so a test waits for a
line with a deadline instead of sleeping. ``Guide`` is the text printed on READY, parsed:
the addresses and the copy-paste command blocks, which tests run with bash as they are.

The demo's children (the daemon and bao) are recorded from ``/proc`` once it is ready, with
their start times, so ``close()`` can kill their process groups even when a broken demo
left them behind, and never a process that merely reused a pid.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

READY_LINE = "openclawd demo is ready."
READY_TIMEOUT_S = 40.0
EXIT_TIMEOUT_S = 30.0


def clean_environ(**extra: str) -> dict[str, str]:
    """Our environment minus what would point a process at another Vault or systemd."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("VAULT_", "BAO_", "NOTIFY_", "WATCHDOG_"))
    }
    env.update(extra)
    return env


# --- /proc -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Proc:
    """A process as /proc shows it; ``start`` (clock ticks since boot) tells a reused pid."""

    pid: int
    ppid: int
    pgrp: int
    start: int
    state: str


def proc(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may hold spaces: split after the last one.
    fields = stat[stat.rindex(")") + 2 :].split()
    return Proc(pid, int(fields[1]), int(fields[2]), int(fields[19]), fields[0])


def children(ppid: int) -> list[Proc]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := proc(int(entry.name))) and info.ppid == ppid:
            found.append(info)
    return found


def descendants(pid: int) -> list[Proc]:
    found = []
    for child in children(pid):
        found.append(child)
        found += descendants(child.pid)
    return found


def alive(recorded: Proc) -> bool:
    """The recorded process still exists (a zombie counts: nobody waited for it)."""
    now = proc(recorded.pid)
    return now is not None and now.start == recorded.start


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def port_refuses(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
        return False


def http_status(url: str, path: str, key: str) -> int:
    """The status of ``GET url+path`` with ``Authorization: Bearer key``."""
    parsed = urllib.parse.urlsplit(url)
    assert parsed.hostname is not None
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=5.0)
    try:
        conn.request("GET", path, headers={"authorization": f"Bearer {key}"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


# --- the guide -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Guide:
    """What the demo printed on READY."""

    text: str
    data_socket: Path
    control_socket: Path
    vault_addr: str
    root_token: str
    vault_key_path: str
    mock_url: str
    config: Path
    blocks: list[str]  # the command blocks, each from its first `# ` comment line

    @property
    def vault_port(self) -> int:
        port = urllib.parse.urlsplit(self.vault_addr).port
        assert port is not None
        return port

    @property
    def mock_port(self) -> int:
        port = urllib.parse.urlsplit(self.mock_url).port
        assert port is not None
        return port

    def block(self, topic: str) -> str:
        """The one command block whose first comment line holds ``topic``."""
        found = [b for b in self.blocks if topic in b.splitlines()[0]]
        assert len(found) == 1, f"{len(found)} blocks about {topic!r} in the guide:\n{self.text}"
        return found[0]


_FIELDS = {
    "data_socket": re.compile(r"^  data socket +(\S+)$"),
    "control_socket": re.compile(r"^  control socket +(\S+)$"),
    "vault": re.compile(r"^  Vault \(dev\) +(\S+) +root token (\S+) +key: (\S+)$"),
    "mock_url": re.compile(r"^  mock provider +(http://\S+) "),
    "config": re.compile(r"^  daemon config +(\S+)$"),
}


def parse_guide(text: str) -> Guide:
    """The guide's addresses and its command blocks; fails the test naming what is missing."""
    lines = text.splitlines()
    assert READY_LINE in lines, f"no {READY_LINE!r} in:\n{text}"
    lines = lines[lines.index(READY_LINE) :]
    found: dict[str, tuple[str, ...]] = {}
    for line in lines:
        for name, pattern in _FIELDS.items():
            if match := pattern.match(line):
                assert name not in found, f"two {name} lines in the guide:\n{text}"
                found[name] = match.groups()
    missing = set(_FIELDS) - set(found)
    assert not missing, f"the guide has no {sorted(missing)} line:\n{text}"

    # Blocks: between "Paste these..." and "Press Ctrl-C...", separated by blank lines.
    start = next(i for i, line in enumerate(lines) if line.startswith("Paste these"))
    end = next(i for i, line in enumerate(lines) if line.startswith("Press Ctrl-C"))
    blocks, current = [], []
    for line in [*lines[start + 1 : end], ""]:
        if line.strip():
            current.append(line)
        elif current:
            blocks.append("\n".join(current) + "\n")
            current = []
    return Guide(
        text=text,
        data_socket=Path(found["data_socket"][0]),
        control_socket=Path(found["control_socket"][0]),
        vault_addr=found["vault"][0],
        root_token=found["vault"][1],
        vault_key_path=found["vault"][2],
        mock_url=found["mock_url"][0],
        config=Path(found["config"][0]),
        blocks=blocks,
    )


def run_block(block: str, env: dict[str, str], timeout: float = 20.0) -> str:
    """Run a pasted command block with bash; its stdout, after checking it exited 0."""
    done = subprocess.run(
        ["bash", "-c", block],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, (
        f"the block exited {done.returncode}:\n{block}\nstdout:\n{done.stdout}\n"
        f"stderr:\n{done.stderr}"
    )
    return done.stdout


# --- the demo process ------------------------------------------------------------------------


class DemoProcess:
    """``python -m openclawd demo [args]`` with stdout and stderr piped and collected."""

    def __init__(self, args: list[str], *, home: Path, tmpdir: Path) -> None:
        self.home = home
        self.tmpdir = tmpdir
        self.guide: Guide | None = None
        self.children: list[Proc] = []  # recorded on READY
        self._lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._changed = threading.Condition()
        self._open = 2  # streams not yet at EOF
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "openclawd", "demo", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=clean_environ(HOME=str(home), TMPDIR=str(tmpdir)),
        )
        self._readers = [
            threading.Thread(target=self._read, args=(name, stream), daemon=True)
            for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr))
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, name: str, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            with self._changed:
                self._lines[name].append(raw.decode(errors="replace"))
                self._changed.notify_all()
        with self._changed:
            self._open -= 1
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stdout(self) -> str:
        with self._changed:
            return "".join(self._lines["stdout"])

    @property
    def stderr(self) -> str:
        with self._changed:
            return "".join(self._lines["stderr"])

    def output(self) -> str:
        return f"--- stdout:\n{self.stdout}\n--- stderr:\n{self.stderr}"

    def wait_line(self, text: str, timeout: float) -> None:
        """Until a stdout line is ``text``; fails with the output on exit or timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while f"{text}\n" not in self._lines["stdout"]:
                remaining = deadline - time.monotonic()
                if self._open == 0 or remaining <= 0:
                    code = self.proc.poll()
                    why = f"exited with {code}" if self._open == 0 else f"not in {timeout} s"
                    pytest.fail(
                        f"no {text!r} from the demo ({why})\n"
                        f"--- stdout:\n{''.join(self._lines['stdout'])}\n"
                        f"--- stderr:\n{''.join(self._lines['stderr'])}",
                        pytrace=False,
                    )
                self._changed.wait(remaining)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> Guide:
        """READY, the guide parsed, and the demo's children recorded."""
        self.wait_line(READY_LINE, timeout)
        self.wait_line("Press Ctrl-C to drain the daemon and stop everything the demo started.", 5)
        self.guide = parse_guide(self.stdout)
        self.children = descendants(self.pid)
        return self.guide

    def stop(self, signum: int, timeout: float = EXIT_TIMEOUT_S) -> int:
        """Send ``signum`` and wait for the exit and the end of both streams."""
        self.proc.send_signal(signum)
        return self.wait(timeout)

    def wait(self, timeout: float = EXIT_TIMEOUT_S) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()  # the tests after this one fail at once instead of waiting again
            pytest.fail(f"the demo did not exit within {timeout} s\n{self.output()}", False)
        for reader in self._readers:
            reader.join(5.0)
        return code

    def close(self) -> None:
        """Kill whatever is left: the demo and each child's process group (idempotent)."""
        if self.proc.poll() is None:
            known = {child.pid for child in self.children}
            self.children += [p for p in descendants(self.pid) if p.pid not in known]
        self._kill_children()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._await_children_dead()
        for reader in self._readers:
            reader.join(5.0)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def _kill_children(self) -> None:
        """SIGKILL each child still alive: its process group if it leads one, else itself."""
        for child in self.children:
            if alive(child):
                with contextlib.suppress(ProcessLookupError):
                    if child.pgrp == child.pid:  # its own group: whatever it started too
                        os.killpg(child.pgrp, signal.SIGKILL)
                    else:
                        os.kill(child.pid, signal.SIGKILL)

    def _await_children_dead(self) -> None:
        """SIGKILL is asynchronous: wait until each is dead (a zombie at most, for init),
        5 s at most in all."""
        deadline = time.monotonic() + 5.0
        for child in self.children:
            while (now := proc(child.pid)) and now.start == child.start and now.state != "Z":
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
