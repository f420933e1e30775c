"""``openclawd demo``: the daemon on an embedded default, with nothing to set up.

Owns the demo's processes and files, all of them in one runtime directory: a real OpenBao
dev server (the ``bao`` binary of the ``demo`` extra) holding a generated demo key in KV
v2, the built-in mock provider (in this process) that accepts only the key Vault holds
now, and ``openclawd run`` on a config written for them, supervised the way systemd does
it (``NOTIFY_SOCKET``: the guide is printed on ``READY=1``). Ctrl-C (SIGINT) or SIGTERM
drains the daemon, then stops the mock and Vault; a second one stops everything at once.

The children run in process groups of their own, so the terminal's Ctrl-C reaches the
demo alone and the stop happens in order (the daemon drains while its provider and Vault
are still there). The demo key and the Vault token are never written to disk by the demo
or printed (the dev server's root token is printed, as the way to rotate the key); the
daemon gets the token in its environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import trio

from openclawd import config as config_module
from openclawd import logs
from openclawd.config import VaultConfig
from openclawd.errors import ConfigError, VaultError
from openclawd.keys.manager import fingerprint
from openclawd.keys.vault import Vault
from openclawd.mock.keys import VaultKeys
from openclawd.mock.server import serve_mock

log = logs.get(__name__)

PROVIDER = "mock"
VAULT_MOUNT = "secret"  # the dev server mounts KV v2 here
VAULT_PATH = "openclawd/mock"
MODEL = "mock-1"
REFRESH_INTERVAL_S = 2.0
DRAIN_TIMEOUT_S = 10.0
VAULT_START_TIMEOUT_S = 20.0
READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
INSTALL_HINT = "pip install -e '.[demo]' in a clone, or pip install 'openclawd[demo]'"
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
        f"{executable} or on PATH. It comes with the `demo` extra: {INSTALL_HINT}"
    )


@contextlib.contextmanager
def runtime_directory(given: str | None) -> Iterator[tuple[Path, bool]]:
    """The directory the demo works in, and whether it is the demo's own temporary one.

    A temporary directory is removed at the end with everything in it; a given one is
    created if needed and keeps what the demo leaves (the config and bao's log).
    """
    if given is None:
        path = Path(tempfile.mkdtemp(prefix="openclawd-demo-"))
        try:
            Layout(path).check()
            yield path, True
        finally:
            shutil.rmtree(path, ignore_errors=True)
        return
    path = Path(given).absolute()
    Layout(path).check()  # before anything is created
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise DemoError(f"cannot create the runtime directory {path}: {exc.strerror}") from None
    if not path.is_dir():
        raise DemoError(f"the runtime directory {path} is not a directory")
    yield path, False


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
        return self.root / "bao-home"  # the dev server writes its token helper file here

    @property
    def bao_log(self) -> Path:
        return self.root / "bao.log"

    def check(self) -> None:
        for path in (self.data_socket, self.control_socket, self.notify_socket):
            if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
                raise DemoError(
                    f"the runtime directory's path is too long for a unix socket ({path}): "
                    "give a shorter --runtime-dir"
                )


def write_config(
    layout: Layout, *, vault_addr: str, mock_port: int, environ: Mapping[str, str]
) -> None:
    """The daemon's config for the demo, checked with the daemon's own parser in the
    environment the daemon will have."""
    quoted: Callable[[object], str] = lambda value: json.dumps(str(value))  # noqa: E731
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
"""
    layout.config.write_text(text)
    try:
        config_module.load(str(layout.config), environ=environ)
    except ConfigError as exc:  # a bug in the demo, not the user's doing
        raise DemoError("the demo wrote an invalid config: " + "; ".join(exc.lines())) from None


# --- the guide printed once the daemon is ready ----------------------------------------------

_WS_SNIPPET = """\
{python} - <<'EOF'
import json, trio, trio_websocket
async def main():
    stream = await trio.open_unix_socket({socket})
    async with trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(nursery, stream, "openclawd", "/v1/ws")
        print(json.loads(await ws.get_message()))
        body = {{"model": "{model}", "stream": True, "stream_options": {{"include_usage": True}},
                "messages": [{{"role": "user", "content": "Hi"}}]}}
        await ws.send_message(json.dumps({{"type": "request", "id": "r1", "provider": "{provider}",
                                          "path": "/v1/chat/completions", "body": body}}))
        while True:
            frame = json.loads(await ws.get_message())
            print(frame)
            if frame["type"] in ("response.end", "error"):
                break
        await ws.aclose()
trio.run(main)
EOF"""


def guide(layout: Layout, *, vault_addr: str, root_token: str, bao: str, mock_port: int) -> str:
    """What the demo prints once the daemon is READY: where things are, and what to paste."""
    data = str(layout.data_socket)
    control = str(layout.control_socket)
    body = json.dumps(
        {
            "model": MODEL,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Hi"}],
        }
    )
    ws = _WS_SNIPPET.format(
        python=sys.executable, socket=json.dumps(data), model=MODEL, provider=PROVIDER
    )
    return f"""
openclawd demo is ready.

  data socket     {data}
  control socket  {control}
  Vault (dev)     {vault_addr}  root token {root_token}  key: {VAULT_MOUNT}/{VAULT_PATH}
  mock provider   http://127.0.0.1:{mock_port}  accepts only the key Vault holds now
  daemon config   {layout.config}

Paste these into another terminal.

# the daemon's status: state, key version and fingerprint, Vault, upstream
curl -sS --unix-socket {control} http://openclawd/v1/status; echo

# a streamed chat completion through /v1/http (curl and the openai SDK work unchanged)
curl -sS -N --unix-socket {data} \\
  http://openclawd/v1/http/{PROVIDER}/v1/chat/completions \\
  -H 'content-type: application/json' -d '{body}'

# the same over the /v1/ws channel, from Python
{ws}

# rotate the key in Vault: the mock refuses the old key from now on, and the daemon follows
# (at its next poll, within {REFRESH_INTERVAL_S:g} s, or at once when the mock answers 401).
# Run the curl lines again: the answer names key version 2; the log shows key.rotated.
printf 'sk-demo-%s' "$(date +%s%N)" | BAO_ADDR={vault_addr} BAO_TOKEN={root_token} \\
  {bao} kv put -mount={VAULT_MOUNT} {VAULT_PATH} api_key=-

# metrics, as Prometheus scrapes them
curl -sS --unix-socket {control} http://openclawd/metrics | grep ^openclawd_

Press Ctrl-C to drain the daemon and stop everything the demo started.
"""


# --- processes -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _child_environ(**extra: str) -> dict[str, str]:
    """Our environment minus what would point a child at another Vault or systemd."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("VAULT_", "BAO_"))
        and name not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")
    }
    env.update(extra)
    return env


async def _start_process(argv: list[str], **options: Any) -> trio.Process:
    # A process group of its own: the terminal's Ctrl-C goes to the demo alone.
    return await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, process_group=0, **options
    )


async def stop_process(process: trio.Process, timeout_s: float) -> int:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL; returns the exit status.

    Cancellation: shielded; the process is always waited for (no zombie, nothing running).
    """
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            with trio.move_on_after(timeout_s):
                await process.wait()
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        code: int = await process.wait()
    return code


async def start_vault(bao: str, layout: Layout, root_token: str) -> tuple[trio.Process, str]:
    """Start ``bao server -dev`` on a free loopback port and wait until it answers.

    Raises:
        DemoError: it exited or did not answer in time (bao's log is in the runtime dir).
    """
    layout.bao_home.mkdir(mode=0o700, exist_ok=True)
    for _attempt in range(3):  # a free port may be taken before bao binds it
        port = _free_port()
        addr = f"http://127.0.0.1:{port}"
        # A local file, opened at once: nothing for the event loop to wait on.
        with open(layout.bao_log, "ab") as bao_log:  # noqa: ASYNC230
            process = await _start_process(
                [
                    bao,
                    "server",
                    "-dev",
                    f"-dev-root-token-id={root_token}",
                    f"-dev-listen-address=127.0.0.1:{port}",
                ],
                stdout=bao_log,
                stderr=subprocess.STDOUT,
                cwd=layout.bao_home,
                env=_child_environ(HOME=str(layout.bao_home)),
            )
        try:
            vault = _vault(addr)
            if await _wait_vault(vault, process, root_token):
                return process, addr
        except BaseException:
            await stop_process(process, STOP_GRACE_S)
            raise
        await stop_process(process, STOP_GRACE_S)
    raise DemoError(f"the Vault dev server did not start; see {layout.bao_log}")


def _vault(addr: str) -> Vault:
    return Vault(VaultConfig(addr=addr, auth="token", mount=VAULT_MOUNT, request_timeout_s=5.0))


async def _wait_vault(vault: Vault, process: trio.Process, root_token: str) -> bool:
    """True once Vault answers with the root token; False if the process exited first."""
    with trio.move_on_after(VAULT_START_TIMEOUT_S):
        while process.returncode is None:
            try:
                await vault.use_token(root_token)
            except VaultError:
                await trio.sleep(0.05)
                continue
            return True
        return False
    raise DemoError(f"the Vault dev server did not answer within {VAULT_START_TIMEOUT_S:g} s")


async def _wait_ready(notify: trio.socket.SocketType, daemon: trio.Process) -> None:
    """Wait for the daemon's ``READY=1`` on the notify socket.

    Raises:
        DemoError: the daemon exited first, or took over ``READY_TIMEOUT_S``.
    """
    async with trio.open_nursery() as nursery:

        async def watch_exit() -> None:
            code = await daemon.wait()
            raise DemoError(
                f"the daemon exited with code {code} before it was ready (its log is above)"
            )

        nursery.start_soon(watch_exit)
        with trio.move_on_after(READY_TIMEOUT_S) as waited:
            while True:
                datagram = await notify.recv(4096)
                if "READY=1" in datagram.decode(errors="replace").splitlines():
                    break
        nursery.cancel_scope.cancel()
    if waited.cancelled_caught:
        raise DemoError(f"the daemon was not ready within {READY_TIMEOUT_S:g} s (its log is above)")


# --- the demo ------------------------------------------------------------------------------


async def _demo(layout: Layout, bao: str, out: TextIO) -> int:
    """Start everything, print the guide, run until a signal or a child's death, stop."""
    root_token = "demo-root-" + secrets.token_hex(12)
    demo_key = "sk-demo-" + secrets.token_urlsafe(24)
    exit_code = 0
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            stopping = trio.Event()
            hurry = trio.Event()

            async def on_signals() -> None:
                async for signum in signals:
                    if stopping.is_set():
                        print("second signal: stopping at once", file=out, flush=True)
                        hurry.set()
                        return
                    print(
                        f"\n{signal.Signals(signum).name}: stopping: the daemon drains first, "
                        "then the mock provider and Vault stop (again: stop at once)",
                        file=out,
                        flush=True,
                    )
                    stopping.set()

            nursery.start_soon(on_signals)
            try:
                exit_code = await _run(layout, bao, root_token, demo_key, stopping, hurry, out)
            except* DemoError as group:
                for exc in _leaves(group):
                    print(f"openclawd demo: {exc}", file=sys.stderr, flush=True)
                exit_code = 1
            finally:
                nursery.cancel_scope.cancel()
    return exit_code


def _leaves(group: BaseExceptionGroup[DemoError]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


async def _run(
    layout: Layout,
    bao: str,
    root_token: str,
    demo_key: str,
    stopping: trio.Event,
    hurry: trio.Event,
    out: TextIO,
) -> int:
    async def until_stopping(fn: Callable[[], Any]) -> Any:
        """``fn()``, unless a signal comes first (then None)."""
        result: list[Any] = []
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                result.append(await fn())
                nursery.cancel_scope.cancel()

            async def stop() -> None:
                await stopping.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
            nursery.start_soon(stop)
        return result[0] if result else None

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    say(f"openclawd demo: working in {layout.root}")
    started = await until_stopping(lambda: start_vault(bao, layout, root_token))
    if started is None:
        return 0
    vault_process, vault_addr = started
    try:
        vault = _vault(vault_addr)
        mock_vault = _vault(vault_addr)
        try:
            await vault.use_token(root_token)
            version = await vault.write_secret(VAULT_PATH, {"api_key": demo_key})
            await mock_vault.use_token(root_token)
        except VaultError as exc:
            raise DemoError(f"cannot write the demo key to the Vault dev server: {exc}") from None
        say(
            f"  Vault dev server at {vault_addr} (bao's log: {layout.bao_log}); demo key "
            f"written to {VAULT_MOUNT}/{VAULT_PATH}, version {version}, {fingerprint(demo_key)}"
        )
        if stopping.is_set():
            return 0
        async with trio.open_nursery() as mock_nursery:
            mock_port = await mock_nursery.start(serve_mock, VaultKeys(mock_vault, VAULT_PATH))
            say(f"  mock provider at http://127.0.0.1:{mock_port}")

            def guide_text() -> str:
                return guide(
                    layout,
                    vault_addr=vault_addr,
                    root_token=root_token,
                    bao=bao,
                    mock_port=mock_port,
                )

            environ = _child_environ(
                NOTIFY_SOCKET=str(layout.notify_socket), VAULT_TOKEN=root_token
            )
            write_config(layout, vault_addr=vault_addr, mock_port=mock_port, environ=environ)
            if stopping.is_set():  # a signal while the mock started: no daemon to drain
                mock_nursery.cancel_scope.cancel()
                return 0
            code = await _run_daemon(layout, environ, guide_text(), stopping, hurry, out)
            mock_nursery.cancel_scope.cancel()
        return code
    finally:
        await stop_process(vault_process, 0 if hurry.is_set() else STOP_GRACE_S)
        say("  Vault dev server stopped")


async def _run_daemon(
    layout: Layout,
    environ: Mapping[str, str],
    ready_text: str,
    stopping: trio.Event,
    hurry: trio.Event,
    out: TextIO,
) -> int:
    """Run ``openclawd run`` until a signal (then drain it) or its own exit."""
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with notify:
        await notify.bind(str(layout.notify_socket))
        daemon = await _start_process(
            [sys.executable, "-m", "openclawd", "run", "--config", str(layout.config)],
            env=dict(environ),
        )
        exit_code = 0
        try:
            async with trio.open_nursery() as nursery:

                async def ready() -> None:
                    await _wait_ready(notify, daemon)
                    print(ready_text, file=out, flush=True)

                async def stop_on_signal() -> None:
                    await stopping.wait()
                    nursery.cancel_scope.cancel()

                async def watch_exit() -> None:
                    nonlocal exit_code
                    code = await daemon.wait()
                    if not stopping.is_set():
                        print(f"the daemon exited with code {code}: stopping", file=out, flush=True)
                        exit_code = 1
                    nursery.cancel_scope.cancel()

                nursery.start_soon(ready)
                nursery.start_soon(stop_on_signal)
                nursery.start_soon(watch_exit)
        finally:
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as stopper:
                    stopper.start_soon(stop_process, daemon, DRAIN_TIMEOUT_S + STOP_GRACE_S)

                    async def kill_on_hurry() -> None:
                        await hurry.wait()
                        with contextlib.suppress(ProcessLookupError):
                            daemon.kill()

                    stopper.start_soon(kill_on_hurry)
                    await daemon.wait()
                    stopper.cancel_scope.cancel()
            print(f"  daemon stopped (exit {daemon.returncode})", file=out, flush=True)
            layout.notify_socket.unlink(missing_ok=True)
        return exit_code


def _cleanup(layout: Layout) -> None:
    """Remove what must not outlive the demo: Vault's home (the dev token helper file)."""
    shutil.rmtree(layout.bao_home, ignore_errors=True)


def run(runtime_dir: str | None, *, out: TextIO = sys.stdout) -> int:
    """``openclawd demo``: 0 after a stop by signal, 1 when something failed (said on
    stderr)."""
    try:
        bao = find_bao()
        with runtime_directory(runtime_dir) as (root, _temporary):
            layout = Layout(root)
            try:
                return trio.run(_demo, layout, bao, out)
            finally:
                _cleanup(layout)
    except DemoError as exc:
        print(f"openclawd demo: {exc}", file=sys.stderr)
        return 1
