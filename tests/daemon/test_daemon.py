"""The daemon in-process: drain, deadlines, the second signal, the data socket's door.

Signals are real (sent to this process); trio delivers them to the daemon's receiver.
Work in flight is simulated with the lifecycle's own WorkTracker, which is what the request
and realtime handlers use.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from openclawd import config
from openclawd.daemon import Daemon
from openclawd.notify import Notifier

from ..conftest import daemon_tables, unix_http, unix_request


def make_daemon(runtime: Path, **tables: dict[str, Any]) -> Daemon:
    cfg = config.parse(daemon_tables(runtime, **tables), source=str(runtime / "x.toml"))
    return Daemon(cfg, Notifier(None))


async def wait_until(daemon: Daemon, predicate: Any) -> None:
    """Wait for a condition on the daemon's lifecycle, woken by its change events."""
    while not predicate():
        await daemon.lifecycle.wait_changed()


class Running:
    """The daemon's run() in a task, with an event set when it returns."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.done = trio.Event()

    async def run(self) -> None:
        try:
            await self.daemon.run()
        finally:
            self.done.set()


async def start_ready(nursery: trio.Nursery, daemon: Daemon) -> Running:
    """Run the daemon in ``nursery`` and return once it is ready."""
    running = Running(daemon)
    nursery.start_soon(running.run)
    await wait_until(daemon, lambda: daemon.lifecycle.ready)
    return running


async def hold_work(
    daemon: Daemon, release: trio.Event, *, task_status: trio.TaskStatus[None]
) -> None:
    with daemon.lifecycle.work.track():
        task_status.started()
        await release.wait()


async def test_sigterm_waits_for_inflight_work_then_exits(runtime_dir: Path) -> None:
    daemon = make_daemon(runtime_dir, shutdown={"drain_timeout_s": 30.0})
    release = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            running = await start_ready(nursery, daemon)
            await nursery.start(hold_work, daemon, release)

            os.kill(os.getpid(), signal.SIGTERM)
            await wait_until(daemon, lambda: daemon.lifecycle.stopping)
            assert daemon.lifecycle.state.value == "stopping"
            # While the drain runs: new app connections are refused with 503 `draining`,
            # and the control API still answers.
            status, _, body = await trio.to_thread.run_sync(
                unix_request, runtime_dir / "data.sock", "GET", "/v1/http/x/y"
            )
            assert (status, body["error"]["code"]) == (503, "draining")
            status, _, body = await trio.to_thread.run_sync(
                unix_request, runtime_dir / "control.sock", "GET", "/readyz"
            )
            assert (status, body) == (503, {"ready": False, "reasons": ["draining"]})
            # Everything the daemon does now, it has done: it waits for the work.
            await trio.testing.wait_all_tasks_blocked()
            assert not running.done.is_set()

            release.set()
            await running.done.wait()
    assert not (runtime_dir / "data.sock").exists()
    assert not (runtime_dir / "control.sock").exists()


async def test_drain_deadline_cuts_stuck_work(
    runtime_dir: Path, caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    daemon = make_daemon(runtime_dir, shutdown={"drain_timeout_s": 0.5})
    never = trio.Event()
    with trio.fail_after(10), caplog.at_level(logging.INFO, logger="openclawd.daemon"):
        async with trio.open_nursery() as nursery:
            running = await start_ready(nursery, daemon)
            await nursery.start(hold_work, daemon, never)
            started = trio.current_time()
            os.kill(os.getpid(), signal.SIGTERM)
            await running.done.wait()
            elapsed = trio.current_time() - started  # virtual: the drain deadline, exactly
            nursery.cancel_scope.cancel()
    assert elapsed == pytest.approx(0.5)
    events = [r.getMessage() for r in caplog.records]
    assert "daemon.drain_deadline" in events
    assert "daemon.drained" not in events


async def test_each_operators_drain_is_followed_to_its_deadline_by_the_daemon(
    runtime_dir: Path, caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    """``drain`` only changes the state; the daemon's own task follows each drain: a drain
    that reaches its deadline is logged once, a resume ends the drain quietly, and a new
    drain after a deadline is followed again."""
    daemon = make_daemon(runtime_dir)
    never = trio.Event()

    def deadlines() -> int:
        return [r.getMessage() for r in caplog.records].count("daemon.drain_deadline")

    with trio.fail_after(1000), caplog.at_level(logging.INFO, logger="openclawd.daemon"):
        async with trio.open_nursery() as nursery:
            running = await start_ready(nursery, daemon)
            await nursery.start(hold_work, daemon, never)
            daemon.drain(10.0)
            await trio.sleep(5)
            daemon.drain(10.0)  # moves the deadline: one drain, one deadline
            await trio.sleep(30)
            assert deadlines() == 1
            daemon.drain(3.0)  # after a deadline: a new drain, followed again
            await trio.sleep(30)
            assert deadlines() == 2
            daemon.resume()
            daemon.drain(50.0)
            await trio.sleep(10)
            daemon.resume()  # before its deadline: nothing is cut or logged
            await trio.sleep(100)
            assert deadlines() == 2
            assert not running.done.is_set()
            nursery.cancel_scope.cancel()


async def test_second_signal_stops_at_once(
    runtime_dir: Path, caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    daemon = make_daemon(runtime_dir, shutdown={"drain_timeout_s": 60.0})
    never = trio.Event()
    with trio.fail_after(10), caplog.at_level(logging.INFO, logger="openclawd.daemon"):
        async with trio.open_nursery() as nursery:
            running = await start_ready(nursery, daemon)
            await nursery.start(hold_work, daemon, never)
            os.kill(os.getpid(), signal.SIGINT)
            await wait_until(daemon, lambda: daemon.lifecycle.stopping)
            os.kill(os.getpid(), signal.SIGHUP)  # a reload is skipped while stopping
            await trio.sleep(5)  # virtual: the daemon keeps waiting
            assert not running.done.is_set()  # draining: 60 s of patience left
            started = trio.current_time()
            os.kill(os.getpid(), signal.SIGTERM)
            await running.done.wait()
            assert trio.current_time() == started  # virtual: no deadline was waited for
            nursery.cancel_scope.cancel()
    events = [r.getMessage() for r in caplog.records]
    assert "config.reload_skipped" in events
    assert "config.reloading" not in events
    assert not (runtime_dir / "data.sock").exists()
    assert not (runtime_dir / "control.sock").exists()


async def test_the_watchdog_is_fed_at_half_of_watchdog_usec(
    runtime_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    receiver = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await receiver.bind(str(runtime_dir / "notify"))
    cfg = config.parse(daemon_tables(runtime_dir), source=str(runtime_dir / "x.toml"))
    notifier = Notifier(str(runtime_dir / "notify"), watchdog_usec=400_000)
    daemon = Daemon(cfg, notifier)
    fed: list[float] = []
    with receiver, trio.fail_after(10):
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon.run)
                while len(fed) < 4:
                    if b"WATCHDOG=1" in (await receiver.recv(65536)).split(b"\n"):
                        fed.append(trio.current_time())
                nursery.cancel_scope.cancel()
        finally:
            notifier.close()
    # Virtual times: every 0.2 s exactly, from the first.
    assert [t - fed[0] for t in fed] == pytest.approx([0.0, 0.2, 0.4, 0.6])


async def test_drain_with_nothing_in_flight_is_immediate(runtime_dir: Path) -> None:
    daemon = make_daemon(runtime_dir, shutdown={"drain_timeout_s": 60.0})
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            running = await start_ready(nursery, daemon)
            os.kill(os.getpid(), signal.SIGTERM)
            await running.done.wait()


async def test_data_socket_answers_unknown_paths_404_and_bad_requests_400(
    runtime_dir: Path,
) -> None:
    daemon = make_daemon(runtime_dir)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await start_ready(nursery, daemon)
            status, _, body = await trio.to_thread.run_sync(
                unix_request, runtime_dir / "data.sock", "GET", "/v2/anything?x=1"
            )
            assert (status, body) == (
                404,
                {"error": {"code": "not_found", "message": "no such route"}},
            )
            # A header line without a colon: h11 rejects it, quoting the line in its error.
            bad_line = b"Authorization Bearer app-credential-xyz\r\n"
            raw = await trio.to_thread.run_sync(
                unix_http,
                runtime_dir / "data.sock",
                b"GET / HTTP/1.1\r\nHost: x\r\n" + bad_line + b"\r\n",
            )
            head, _, payload = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 ")
            assert b"app-credential-xyz" not in raw
            assert json.loads(payload) == {
                "error": {"code": "bad_request", "message": "malformed HTTP request"}
            }
            nursery.cancel_scope.cancel()


async def test_a_client_too_slow_to_send_its_request_head_is_cut_off(
    runtime_dir: Path, caplog: pytest.LogCaptureFixture, io_clock: trio.testing.MockClock
) -> None:
    daemon = make_daemon(runtime_dir, listen={"handshake_timeout_s": 0.3})
    with trio.fail_after(10), caplog.at_level(logging.INFO, logger="openclawd.local.server"):
        async with trio.open_nursery() as nursery:
            await start_ready(nursery, daemon)
            started = trio.current_time()
            async with await trio.open_unix_socket(str(runtime_dir / "data.sock")) as stream:
                await stream.send_all(b"GET /v1/ws HT")  # and nothing more
                assert await stream.receive_some() == b""  # closed by the daemon
            # Virtual time: the head timeout, not before (nor the 10 s default after).
            assert trio.current_time() - started == pytest.approx(0.3)
            assert daemon.local.clients == 0
            nursery.cancel_scope.cancel()
    closes = [r for r in caplog.records if r.getMessage() == "connection.close"]
    assert [r.fields["outcome"] for r in closes] == ["handshake timeout"]  # type: ignore[attr-defined]


async def wait_for_log(caplog: pytest.LogCaptureFixture, event: str) -> None:
    while event not in [r.getMessage() for r in caplog.records]:  # noqa: ASYNC110
        await trio.sleep(0.01)  # a log line has no event to wait on


async def write_fifo(path: Path, data: bytes) -> None:
    """Write to a FIFO once a reader has it open, without blocking the trio loop."""
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
            await trio.sleep(0.01)
            continue
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return


async def test_a_stop_during_a_reload_wins(
    runtime_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fifo = runtime_dir / "config.fifo"
    os.mkfifo(fifo)
    cfg = config.parse(daemon_tables(runtime_dir), source=str(fifo))
    daemon = Daemon(cfg, Notifier(None))
    release = trio.Event()
    with trio.fail_after(10), caplog.at_level(logging.INFO, logger="openclawd.daemon"):
        async with trio.open_nursery() as nursery:
            running = await start_ready(nursery, daemon)
            await nursery.start(hold_work, daemon, release)
            os.kill(os.getpid(), signal.SIGHUP)
            await wait_for_log(caplog, "config.reloading")  # now reading the FIFO
            os.kill(os.getpid(), signal.SIGTERM)
            await wait_until(daemon, lambda: daemon.lifecycle.stopping)
            await write_fifo(fifo, b'[logging]\nlevel = "error"\n')
            await wait_for_log(caplog, "config.reload_skipped")
            release.set()
            await running.done.wait()
    events = [r.getMessage() for r in caplog.records]
    assert "config.reloaded" not in events
    assert daemon.config.logging.level == "debug"  # the new file was not applied
