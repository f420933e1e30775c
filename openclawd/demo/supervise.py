"""The demo's processes: the Vault dev server, the mock provider, the daemon, in order.

Owns their lives. Each child runs in a process group of its own, so the terminal's Ctrl-C
(or its hangup) reaches the demo alone and the stop happens in order: the daemon drains
while its provider and Vault are still there, then the mock and Vault stop. The daemon is
supervised as systemd does it, through ``NOTIFY_SOCKET``: the guide is printed on
``READY=1``, and its ``STATUS=`` lines are shown as they change. A second signal stops at
once: the daemon gets the second SIGTERM that makes it close its connections (1012) and
exit, and SIGKILL only if it has not within ``HURRY_S``.

Secrets: the demo key goes to Vault and nowhere else; the root token goes to bao and the
daemon in their environments (never in an argv, which ``ps`` shows), and bao's output that
prints it is dropped, so neither is written to disk.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import trio

from openclawd.config import VaultConfig
from openclawd.demo.guide import guide
from openclawd.demo.layout import (
    DRAIN_TIMEOUT_S,
    VAULT_MOUNT,
    VAULT_PATH,
    DemoError,
    Layout,
    write_config,
)
from openclawd.errors import VaultError
from openclawd.keys.key import fingerprint
from openclawd.keys.vault import Vault
from openclawd.mock.keys import VaultKeys
from openclawd.mock.server import serve_mock

# Stop signals: Ctrl-C, kill, the terminal closing, Ctrl-\.
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
VAULT_START_TIMEOUT_S = 20.0
READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
HURRY_S = 2.0


class Output:
    """The demo's messages; a reader that went away (a closed pipe) never stops the demo."""

    def __init__(self, stream: TextIO) -> None:
        self._stream: TextIO | None = stream

    def say(self, text: str) -> None:
        if self._stream is None:
            return
        try:
            print(text, file=self._stream, flush=True)
        except (BrokenPipeError, ValueError, OSError):
            self._stream = None  # the stop still runs in order, just silently


class Stop:
    """The signals' effect: ``requested`` on the first, ``hurry`` on the second."""

    def __init__(self) -> None:
        self.requested = trio.Event()
        self.hurry = trio.Event()

    async def serve(self, signals: Any, out: Output) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not self.requested.is_set():
                out.say(
                    f"\n{name}: stopping: the daemon drains first, then the mock provider and "
                    "Vault stop (again: stop at once)"
                )
                self.requested.set()
            else:
                out.say(f"{name} again: stopping at once")
                self.hurry.set()


def _child_environ(**extra: str) -> dict[str, str]:
    """Our environment minus what would point a child at another Vault or systemd."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("VAULT_", "BAO_"))
        and name not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    }
    env.update(extra)
    return env


async def _start_process(argv: list[str], what: str, **options: Any) -> trio.Process:
    try:
        # A process group of its own: the terminal's signals go to the demo alone.
        return await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, process_group=0, **options
        )
    except OSError as exc:
        raise DemoError(f"cannot start {what} ({argv[0]}): {exc}") from None


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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _vault(addr: str) -> Vault:
    return Vault(VaultConfig(addr=addr, auth="token", mount=VAULT_MOUNT, request_timeout_s=5.0))


async def start_vault(bao: str, layout: Layout, root_token: str) -> tuple[trio.Process, str]:
    """Start ``bao server -dev`` on a free loopback port and wait until it answers.

    Raises:
        DemoError: it cannot start, exited, or did not answer in time (see its log).
    """
    for attempt in range(3):  # a free port may be taken before bao binds it
        port = _free_port()
        addr = f"http://127.0.0.1:{port}"
        try:
            flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if attempt else os.O_TRUNC)
            log_fd = os.open(layout.bao_log, flags, 0o600)
        except OSError as exc:
            raise DemoError(f"cannot write {layout.bao_log}: {exc}") from None
        try:
            # stdout is bao's banner, which prints the root token: dropped. Its log (on
            # stderr) has no secret.
            process = await _start_process(
                [
                    bao,
                    "server",
                    "-dev",
                    "-dev-no-store-token",
                    f"-dev-listen-address=127.0.0.1:{port}",
                ],
                "the Vault dev server",
                stdout=subprocess.DEVNULL,
                stderr=log_fd,
                cwd=layout.bao_home,
                env=_child_environ(HOME=str(layout.bao_home), BAO_DEV_ROOT_TOKEN_ID=root_token),
            )
        finally:
            os.close(log_fd)
        answered = False
        try:
            answered = await _wait_vault(_vault(addr), process, root_token)
        finally:
            if not answered:
                await stop_process(process, STOP_GRACE_S)
        if answered:
            return process, addr
    raise DemoError(f"the Vault dev server did not start; see {layout.bao_log}")


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


async def demo(layout: Layout, bao: str, out: Output) -> int:
    """Start everything, print the guide, run until a signal or a child's death, stop.

    Returns 0 after a stop by signal, 1 if a child died on its own.

    Raises:
        DemoError: something could not start.
    """
    root_token = "demo-root-" + secrets.token_hex(12)
    stop = Stop()
    with trio.open_signal_receiver(*SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop.serve, signals, out)
            try:
                return await _with_vault(layout, bao, root_token, stop, out)
            finally:
                nursery.cancel_scope.cancel()


async def _unless_stopped(stop: Stop, fn: Any) -> Any:
    """``await fn()``, or None if a stop is requested first."""
    result: list[Any] = []
    async with trio.open_nursery() as nursery:

        async def run() -> None:
            result.append(await fn())
            nursery.cancel_scope.cancel()

        async def cancel_on_stop() -> None:
            await stop.requested.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(run)
        nursery.start_soon(cancel_on_stop)
    return result[0] if result else None


async def _with_vault(layout: Layout, bao: str, root_token: str, stop: Stop, out: Output) -> int:
    out.say(f"openclawd demo: working in {layout.root}")
    started = await _unless_stopped(stop, functools.partial(start_vault, bao, layout, root_token))
    if started is None:
        return 0
    vault_process, vault_addr = started
    try:
        async with trio.open_nursery() as nursery:
            died: list[int] = []

            async def watch_vault() -> None:
                died.append(await vault_process.wait())
                out.say(f"the Vault dev server exited ({died[0]}): stopping; see {layout.bao_log}")
                nursery.cancel_scope.cancel()

            async def rest() -> None:
                died.append(await _with_mock(layout, bao, root_token, vault_addr, stop, out))
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_vault)
            nursery.start_soon(rest)
        return 1 if any(died) else 0
    finally:
        await stop_process(vault_process, 0 if stop.hurry.is_set() else STOP_GRACE_S)
        out.say("  Vault dev server stopped")


async def _with_mock(
    layout: Layout, bao: str, root_token: str, vault_addr: str, stop: Stop, out: Output
) -> int:
    demo_key = "sk-demo-" + secrets.token_urlsafe(24)
    vault = _vault(vault_addr)
    mock_vault = _vault(vault_addr)
    try:
        await vault.use_token(root_token)
        version = await vault.write_secret(VAULT_PATH, {"api_key": demo_key})
        await mock_vault.use_token(root_token)
    except VaultError as exc:
        raise DemoError(f"cannot write the demo key to the Vault dev server: {exc}") from None
    out.say(
        f"  Vault dev server at {vault_addr} (its log: {layout.bao_log}); demo key written "
        f"to {VAULT_MOUNT}/{VAULT_PATH}, version {version}, {fingerprint(demo_key)}"
    )
    if stop.requested.is_set():
        return 0
    async with trio.open_nursery() as nursery:
        mock_port = await nursery.start(serve_mock, VaultKeys(mock_vault, VAULT_PATH))
        out.say(f"  mock provider at http://127.0.0.1:{mock_port}")
        environ = _child_environ(NOTIFY_SOCKET=str(layout.notify_socket), VAULT_TOKEN=root_token)
        write_config(layout, vault_addr=vault_addr, mock_port=mock_port, environ=environ)
        code = 0
        if not stop.requested.is_set():  # a signal while the mock started: no daemon
            ready_text = guide(
                layout, vault_addr=vault_addr, root_token=root_token, bao=bao, mock_port=mock_port
            )
            code = await _with_daemon(layout, environ, ready_text, stop, out)
        nursery.cancel_scope.cancel()
    return code


async def _with_daemon(
    layout: Layout, environ: Mapping[str, str], ready_text: str, stop: Stop, out: Output
) -> int:
    """Run ``openclawd run`` until a stop (then drain it) or its own exit (then 1).

    Raises:
        DemoError: the daemon cannot start, or is not ready within ``READY_TIMEOUT_S``.
    """
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with notify:
        try:
            await notify.bind(str(layout.notify_socket))
        except OSError as exc:
            raise DemoError(f"cannot listen on {layout.notify_socket}: {exc}") from None
        daemon = await _start_process(
            [sys.executable, "-m", "openclawd", "run", "--config", str(layout.config)],
            "the daemon",
            env=dict(environ),
            cwd=layout.root,  # not the caller's directory: `-m` imports from the cwd first
        )
        exit_code = 0
        ready = trio.Event()
        stopping = trio.Event()  # the daemon said STOPPING=1: it took the first SIGTERM
        # The notify socket is read for the daemon's whole life (a datagram queue that
        # nobody reads fills up): READY prints the guide, STATUS lines show the drain.
        async with trio.open_nursery() as reader:
            reader.start_soon(_read_notify, notify, ready_text, ready, stopping, out)
            try:
                async with trio.open_nursery() as nursery:

                    async def watch_exit() -> None:
                        nonlocal exit_code
                        code = await daemon.wait()
                        if not stop.requested.is_set():
                            out.say(f"the daemon exited with code {code} (its log is above)")
                            exit_code = 1
                        nursery.cancel_scope.cancel()

                    async def cancel_on_stop() -> None:
                        await stop.requested.wait()
                        nursery.cancel_scope.cancel()

                    async def ready_deadline() -> None:
                        with trio.move_on_after(READY_TIMEOUT_S):
                            await ready.wait()
                            return
                        raise DemoError(
                            f"the daemon was not ready within {READY_TIMEOUT_S:g} s "
                            "(its log is above)"
                        )

                    nursery.start_soon(watch_exit)
                    nursery.start_soon(cancel_on_stop)
                    nursery.start_soon(ready_deadline)
            finally:
                await _stop_daemon(daemon, stop, stopping)
                reader.cancel_scope.cancel()
        out.say(f"  daemon stopped (exit {daemon.returncode})")
        return exit_code


async def _read_notify(
    notify: trio.socket.SocketType,
    ready_text: str,
    ready: trio.Event,
    stopping: trio.Event,
    out: Output,
) -> None:
    status = None
    while True:
        datagram = await notify.recv(4096)
        for line in datagram.decode(errors="replace").splitlines():
            if line == "STOPPING=1":
                stopping.set()
            if line == "READY=1" and not ready.is_set():
                out.say(ready_text)
                ready.set()
            elif line.startswith("STATUS=") and line != status and ready.is_set():
                status = line
                out.say(f"  [daemon {line}]")


async def _stop_daemon(daemon: trio.Process, stop: Stop, stopping: trio.Event) -> None:
    """SIGTERM (the daemon drains); a second stop signal sends the second SIGTERM that
    stops it at once, then SIGKILL after ``HURRY_S``; SIGKILL too past its drain timeout.

    The second SIGTERM goes only once the daemon has taken the first (``stopping``, its
    STOPPING=1; or after ``HURRY_S``): two signals that reach a process before it has
    handled the first are one signal (the kernel, and trio's receiver, keep one pending
    of each), and the daemon would drain on instead of stopping.

    Cancellation: shielded; returns once the daemon is gone.
    """

    def signal_daemon(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            daemon.send_signal(signum)

    with trio.CancelScope(shield=True):
        if daemon.returncode is None:
            signal_daemon(signal.SIGTERM)
        async with trio.open_nursery() as nursery:

            async def hurry() -> None:
                await stop.hurry.wait()
                with trio.move_on_after(HURRY_S):
                    await stopping.wait()
                signal_daemon(signal.SIGTERM)
                await trio.sleep(HURRY_S)
                signal_daemon(signal.SIGKILL)

            async def deadline() -> None:
                await trio.sleep(DRAIN_TIMEOUT_S + STOP_GRACE_S)
                signal_daemon(signal.SIGKILL)

            nursery.start_soon(hurry)
            nursery.start_soon(deadline)
            await daemon.wait()
            nursery.cancel_scope.cancel()
