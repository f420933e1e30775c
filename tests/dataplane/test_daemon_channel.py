"""The data socket in the real daemon process: SIGTERM lets running work finish (a /v1/ws
stream, a realtime session), refuses new work on every entry point, then closes what is
left with 1012 and exits 0 (CONTRACT.md 1, 3)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio_websocket

from ..bao import BaoServer
from ..conftest import DaemonProcess
from ..fake_upstream import Reply, open_fake_upstream
from ..fake_ws_upstream import open_fake_ws_upstream
from .daemon_process import curl, curl_json, write_config
from .harness import open_app, open_realtime, unique_vault_path

KEY = "sk-daemon-0001"


async def test_sigterm_finishes_the_stream_refuses_new_work_then_closes_1012(
    shared_bao: BaoServer,
    runtime_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    vault_path = unique_vault_path()
    await trio.to_thread.run_sync(lambda: shared_bao.write(vault_path, api_key=KEY))
    with trio.fail_after(30):
        async with open_fake_upstream(expected_key=KEY) as up:
            config = write_config(runtime_dir, shared_bao, up.url, vault_path)
            daemon = start_daemon(config)
            await trio.to_thread.run_sync(daemon.wait_ready)
            socket_path = str(runtime_dir / "data.sock")
            async with open_app(socket_path) as app, open_app(socket_path) as idle:
                up.script(
                    Reply(
                        chunks=[b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"], chunk_delay_s=0.4
                    )
                )
                await app.request("long", body={"model": "m", "stream": True})
                assert (await app.receive_for("long"))["status"] == 200

                daemon.signal(signal.SIGTERM)
                await trio.to_thread.run_sync(daemon.notify.wait_for, "STOPPING", "1")
                # The drain's progress, on sd_notify's STATUS line.
                await trio.to_thread.run_sync(
                    daemon.notify.wait_for, "STATUS", "stopping: 1 in flight, 10s left"
                )
                await app.request("late", body={"model": "m"})
                late = await app.receive_for("late")
                assert (late["type"], late["code"]) == ("error", "draining")
                # A shutdown's drain is not the operator's to move or undo.
                control = runtime_dir / "control.sock"
                for route in ("/v1/drain", "/v1/resume"):
                    status, body = await curl_json(control, route, method="POST")
                    assert (status, body["error"]) == (409, "stopping")

                frames = await app.exchange("long")
                assert [f.get("data") for f in frames[:-1]] == ["1", "2", "3"]
                assert frames[-1]["type"] == "response.end"
                assert frames[-1]["key_version"] == 1

                # Nothing left in flight: both channels are closed with 1012.
                for client in (app, idle):
                    with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                        await client.receive()
                    assert closed.value.reason.code == 1012
            assert await trio.to_thread.run_sync(daemon.wait) == 0
    log = daemon.stderr
    assert KEY not in log
    assert "key=sha256:" in log  # the upstream log line names the fingerprint
    # Every connection has its close line, those cut at the end with their 1012.
    opened = log.count("event=connection.open")
    assert opened >= 2
    assert log.count("event=connection.close") == opened
    assert log.count('code=1012 reason="openclawd is shutting down"') == 2


async def test_sigterm_lets_a_realtime_session_run_on_while_new_work_is_refused(
    shared_bao: BaoServer,
    runtime_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    vault_path = unique_vault_path()
    await trio.to_thread.run_sync(lambda: shared_bao.write(vault_path, api_key=KEY))
    with trio.fail_after(30):
        async with (
            open_fake_upstream(expected_key=KEY) as up,
            open_fake_ws_upstream(expected_key=KEY) as ws_up,
        ):
            config = write_config(runtime_dir, shared_bao, up.url, vault_path, ws_up.url)
            daemon = start_daemon(config)
            await trio.to_thread.run_sync(daemon.wait_ready)
            socket_path = str(runtime_dir / "data.sock")
            status, body = await curl("/v1/http/openai/v1/models", unix_socket=socket_path)
            assert status == 200
            assert "gpt-fake" in body
            async with open_realtime(socket_path) as session:
                await session.send("before")
                assert await session.recv() == "before"

                daemon.signal(signal.SIGTERM)
                await trio.to_thread.run_sync(daemon.notify.wait_for, "STOPPING", "1")
                status, body = await curl("/v1/http/openai/v1/models", unix_socket=socket_path)
                assert status == 503
                assert '"code":"draining"' in body
                async with open_realtime(socket_path) as late:
                    assert await late.closed() == (1013, "openclawd is draining")

                await session.send("during the drain")  # the session runs on
                assert await session.recv() == "during the drain"
                await session.close(1000, "done")
            assert await trio.to_thread.run_sync(daemon.wait) == 0  # nothing left: exit
            assert ws_up.close_codes == [(1000, "done")]
    assert KEY not in daemon.stderr
    assert "event=realtime.open" in daemon.stderr
    assert "event=http.request" in daemon.stderr
