"""The control API of the real daemon process, driven with curl as an operator would
(CONTRACT.md section 4): health, status, rotation, drain and resume on every entry point,
the drain's deadline, metrics whose numbers follow what happens, the bearer-token TCP
listener, and no key in anything the daemon shows."""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio_websocket

from ..bao import BaoServer, free_port
from ..conftest import DaemonProcess
from ..conftest import leak_forms as forms
from ..fake_upstream import USAGE, Reply
from .daemon_process import curl, curl_json, metric, running_daemon
from .harness import open_app, open_realtime

KEY = "sk-control-0001-aaaaaaaaaaaaaaaa"
NEW_KEY = "sk-control-0002-bbbbbbbbbbbbbbbb"
CHAT = "/v1/http/openai/v1/chat/completions"
StartDaemon = Callable[..., DaemonProcess]


def fingerprint(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:12]


async def ws_close_of(socket_path: str) -> tuple[int, str | None]:
    """Open /v1/ws and read until the daemon closes it: its close code and reason."""
    stream = await trio.open_unix_socket(socket_path)
    async with stream, trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(nursery, stream, "openclawd", "/v1/ws")
        try:
            while True:
                await ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            nursery.cancel_scope.cancel()
            return exc.reason.code, exc.reason.reason


async def test_an_operator_session_with_curl(
    shared_bao: BaoServer, runtime_dir: Path, start_daemon: StartDaemon
) -> None:
    control = runtime_dir / "control.sock"
    data = str(runtime_dir / "data.sock")
    shown: list[str] = []  # every status and metrics text the daemon produced

    async def scrape() -> str:
        status, text = await curl("/metrics", unix_socket=control)
        assert status == 200
        shown.append(text)
        return text

    with trio.fail_after(60):
        async with running_daemon(shared_bao, runtime_dir, start_daemon, KEY) as (
            daemon,
            up,
            vault_path,
        ):
            assert await curl_json(control, "/healthz") == (200, {"status": "ok"})
            assert await curl_json(control, "/readyz") == (200, {"ready": True})
            status, body = await curl_json(control, "/v1/status")
            assert status == 200
            shown.append(repr(body))
            assert body["state"] == "ready"
            assert body["version"] == "0.1.0"
            assert body["connections"] == {"clients": 0, "inflight": 0, "realtime": 0}
            openai = body["providers"]["openai"]
            assert openai["key"]["version"] == 1
            assert openai["key"]["fingerprint"] == fingerprint(KEY)
            assert openai["key"]["pool_size"] == 1
            assert openai["upstream"] == {"circuit": "closed", "last_error": None}
            assert openai["vault"] == {"path": f"secret/{vault_path}", "last_error": None}
            assert body["vault"]["addr"] == shared_bao.addr
            assert body["vault"]["auth"] == "token"
            assert body["vault"]["reachable"] is True
            assert body["vault"]["last_error"] is None

            before = await scrape()
            assert (
                metric(before, "openclawd_requests_total", provider="openai", status="200") is None
            )
            assert metric(before, "openclawd_key_version", provider="openai") == 1
            assert (
                metric(before, "openclawd_key_rotations_total", provider="openai", trigger="vault")
                == 1
            )

            # A streamed request on /v1/ws with usage, then the app leaves normally.
            async with open_app(data) as app:
                during = await scrape()
                assert metric(during, "openclawd_connections", kind="ws") == 1
                frames = await app.call(
                    "r1",
                    body={"model": "m", "stream": True, "stream_options": {"include_usage": True}},
                )
                assert frames[-1]["type"] == "response.end"
                assert frames[-1]["usage"]["prompt_tokens"] == USAGE["prompt_tokens"]
            # A plain request through /v1/http, whose usage is read on the side.
            status, _ = await curl(
                CHAT, unix_socket=data, method="POST", data='{"model":"m"}',
                headers=("content-type: application/json",),
            )  # fmt: skip
            assert status == 200
            await trio.to_thread.run_sync(daemon.wait_log, "code=1000 reason=bye")

            after = await scrape()
            assert metric(after, "openclawd_requests_total", provider="openai", status="200") == 2
            assert metric(after, "openclawd_upstream_seconds_count", provider="openai") == 2
            assert metric(after, "openclawd_tokens_total", provider="openai", kind="prompt") == (
                2 * USAGE["prompt_tokens"]
            )
            assert (
                metric(after, "openclawd_tokens_total", provider="openai", kind="completion")
                == 2 * USAGE["completion_tokens"]
            )
            assert metric(after, "openclawd_closes_total", code="1000") == 1
            assert metric(after, "openclawd_connections", kind="ws") == 0
            assert metric(after, "openclawd_upstream_retries_total") == 0

            # Rotation: a new version in Vault, taken at once on the operator's word.
            await trio.to_thread.run_sync(lambda: shared_bao.write(vault_path, api_key=NEW_KEY))
            up.expected_key = NEW_KEY
            rotated_now = {"openai": {"from_version": 1, "to_version": 2, "changed": True}}
            assert await curl_json(
                control, "/v1/keys/rotate", method="POST", data='{"provider":"openai"}'
            ) == (200, {"providers": rotated_now})
            assert await curl_json(control, "/v1/keys/rotate", method="POST") == (
                200,
                {"providers": {"openai": {"from_version": 2, "to_version": 2, "changed": False}}},
            )
            status, body = await curl_json(control, "/v1/status")
            shown.append(repr(body))
            assert body["providers"]["openai"]["key"]["version"] == 2
            assert body["providers"]["openai"]["key"]["fingerprint"] == fingerprint(NEW_KEY)
            status, _ = await curl("/v1/http/openai/v1/models", unix_socket=data)
            assert status == 200  # the upstream now takes the new key only
            rotated = await scrape()
            assert metric(rotated, "openclawd_key_version", provider="openai") == 2
            assert (
                metric(
                    rotated, "openclawd_key_rotations_total", provider="openai", trigger="operator"
                )
                == 1
            )
            assert metric(rotated, "openclawd_requests_total", provider="openai", status="200") == 3

            status, body = await curl_json(
                control, "/v1/keys/rotate", method="POST", data='{"provider":"nope"}'
            )
            assert (status, body) == (
                404,
                {"error": "unknown_provider", "message": "unknown provider"},
            )
            status, body = await curl_json(control, "/v1/keys/rotate")
            assert (status, body["error"]) == (405, "method_not_allowed")
            status, body = await curl_json(control, "/v1/nothing")
            assert (status, body["error"]) == (404, "not_found")

            # Drain and resume, with nothing in flight; by default the deadline is
            # [shutdown] drain_timeout_s (10 s in this config).
            assert await curl_json(control, "/v1/drain", method="POST") == (
                202,
                {"state": "draining", "inflight": 0, "deadline_s": 10},
            )
            assert await curl_json(
                control, "/v1/drain", method="POST", data='{"deadline_s": 30}'
            ) == (202, {"state": "draining", "inflight": 0, "deadline_s": 30})
            status, body = await curl_json(control, "/v1/drain")
            assert (status, body["state"], body["inflight"]) == (200, "draining", 0)
            assert 0 < body["remaining_s"] <= 30
            assert await curl_json(control, "/readyz") == (
                503,
                {"ready": False, "reasons": ["draining"]},
            )
            status, text = await curl("/v1/http/openai/v1/models", unix_socket=data)
            assert status == 503
            assert '"code":"draining"' in text
            assert await curl_json(control, "/v1/resume", method="POST") == (
                200,
                {"state": "ready"},
            )
            status, body = await curl_json(control, "/v1/drain")
            assert body == {"state": "ready", "inflight": 0, "remaining_s": None}
            status, _ = await curl("/v1/http/openai/v1/models", unix_socket=data)
            assert status == 200

            daemon.signal(signal.SIGTERM)
            assert await trio.to_thread.run_sync(daemon.wait) == 0

    log = daemon.stderr
    assert "event=control.rotate" in log
    assert "event=daemon.draining" in log
    assert "event=daemon.resumed" in log
    for output in [*shown, log]:
        for key in (KEY, NEW_KEY):
            for form in forms(key):
                assert form not in output


async def test_a_drain_lets_a_slow_stream_finish_while_new_work_is_refused(
    shared_bao: BaoServer, runtime_dir: Path, start_daemon: StartDaemon
) -> None:
    control = runtime_dir / "control.sock"
    data = str(runtime_dir / "data.sock")
    with trio.fail_after(60):
        async with running_daemon(shared_bao, runtime_dir, start_daemon, KEY) as (daemon, up, _):
            async with open_app(data) as app:
                chunks = [b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"]
                up.script(Reply(chunks=chunks, chunk_delay_s=0.5))
                await app.request("slow", body={"model": "m", "stream": True})
                assert (await app.receive_for("slow"))["status"] == 200

                assert await curl_json(
                    control, "/v1/drain", method="POST", data='{"deadline_s": 30}'
                ) == (202, {"state": "draining", "inflight": 1, "deadline_s": 30})
                status, body = await curl_json(control, "/v1/status")
                assert body["state"] == "draining"
                assert body["connections"]["inflight"] == 1
                await trio.to_thread.run_sync(
                    daemon.notify.wait_for, "STATUS", "draining: 1 in flight, 30s left"
                )

                # New work is refused on every entry point, each in its own way.
                await app.request("late", body={"model": "m"})
                late = await app.receive_for("late")
                assert (late["type"], late["code"]) == ("error", "draining")
                assert await ws_close_of(data) == (1013, "openclawd is draining")
                status, _ = await curl("/v1/http/openai/v1/models", unix_socket=data)
                assert status == 503
                async with open_realtime(data) as session:
                    assert (await session.closed())[0] == 1013

                frames = await app.exchange("slow")
                assert [f.get("data") for f in frames[:-1]] == ["1", "2", "3"]
                assert frames[-1]["type"] == "response.end"
                # sd_notify's STATUS line showed the drain's progress, then its end.
                await trio.to_thread.run_sync(
                    daemon.notify.wait_for, "STATUS", "draining: nothing in flight"
                )
                assert await curl_json(control, "/v1/drain") == (
                    200,
                    {"state": "draining", "inflight": 0, "remaining_s": pytest.approx(30, abs=5)},
                )
                assert await curl_json(control, "/v1/resume", method="POST") == (
                    200,
                    {"state": "ready"},
                )
                frames = await app.call("again", body={"model": "m"})  # the channel lived on
                assert frames[-1]["type"] == "response.end"
            daemon.signal(signal.SIGTERM)
            assert await trio.to_thread.run_sync(daemon.wait) == 0


async def test_the_drain_deadline_closes_a_stuck_stream_with_1001(
    shared_bao: BaoServer, runtime_dir: Path, start_daemon: StartDaemon
) -> None:
    control = runtime_dir / "control.sock"
    data = str(runtime_dir / "data.sock")
    with trio.fail_after(60):
        async with running_daemon(shared_bao, runtime_dir, start_daemon, KEY) as (daemon, up, _):
            async with open_app(data) as app:
                up.script(Reply(chunks=[b"data: 1\n\n", b"data: 2\n\n"], stall_after_chunks=1))
                await app.request("stuck", body={"model": "m", "stream": True})
                assert (await app.receive_for("stuck"))["status"] == 200
                assert (await app.receive_for("stuck"))["data"] == "1"

                # A drain undone before its deadline cuts nothing.
                status, body = await curl_json(
                    control, "/v1/drain", method="POST", data='{"deadline_s": 0.3}'
                )
                assert (status, body["inflight"]) == (202, 1)
                assert (await curl_json(control, "/v1/resume", method="POST"))[0] == 200
                await trio.sleep(0.6)
                assert (await app.call("alive", "/v1/models", method="GET"))[-1]["type"] == (
                    "response.end"
                )

                # At the deadline every connection still open is closed with 1001: the one
                # with stuck work, and an idle one.
                async with open_app(data) as idle:
                    status, body = await curl_json(
                        control, "/v1/drain", method="POST", data='{"deadline_s": 0.5}'
                    )
                    assert (status, body["inflight"]) == (202, 1)
                    for client in (app, idle):
                        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                            await client.receive_for("stuck")
                        assert closed.value.reason.code == 1001
                        assert closed.value.reason.reason == "drain deadline reached"

            await trio.to_thread.run_sync(daemon.wait_log, "event=daemon.drain_deadline")
            # The close's line comes once the daemon is done with the connection.
            await trio.to_thread.run_sync(
                daemon.wait_log, 'code=1001 reason="drain deadline reached"'
            )
            assert await curl_json(control, "/v1/drain") == (
                200,
                {"state": "draining", "inflight": 0, "remaining_s": 0},
            )
            _, text = await curl("/metrics", unix_socket=control)
            assert metric(text, "openclawd_closes_total", code="1001") == 2
            assert await curl_json(control, "/v1/resume", method="POST") == (
                200,
                {"state": "ready"},
            )
            async with open_app(data) as app:
                frames = await app.call("after", body={"model": "m"})
                assert frames[-1]["type"] == "response.end"
            daemon.signal(signal.SIGTERM)
            assert await trio.to_thread.run_sync(daemon.wait) == 0


async def test_the_tcp_listener_takes_only_the_bearer_token(
    shared_bao: BaoServer, runtime_dir: Path, start_daemon: StartDaemon
) -> None:
    token = "tok-" + "7" * 40
    token_file = runtime_dir / "control-token"
    token_file.write_text(token + "\n")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    tcp = {"tcp": f"127.0.0.1:{port}", "token_file": str(token_file)}
    with trio.fail_after(60):
        async with running_daemon(shared_bao, runtime_dir, start_daemon, KEY, control=tcp) as (
            daemon,
            _,
            _,
        ):
            for headers in (
                (),
                ("Authorization: Bearer wrong",),
                (f"Authorization: Basic {token}",),
                (f"Authorization: Bearer {token}x",),
            ):
                for target in ("/healthz", "/v1/status", "/metrics"):
                    status, text = await curl(target, base=base, headers=headers)
                    assert status == 401, (headers, target)
                    assert '"error": "unauthorized"' in text
                status, _ = await curl("/v1/drain", base=base, method="POST", headers=headers)
                assert status == 401
            assert (await curl_json(runtime_dir / "control.sock", "/v1/drain"))[1]["state"] == (
                "ready"
            )  # the refused drain did nothing

            good = (f"Authorization: Bearer {token}",)
            status, text = await curl("/v1/status", base=base, headers=good)
            assert status == 200
            assert '"state":"ready"' in text
            status, _ = await curl(
                "/v1/status", base=base, headers=(f"authorization: bearer {token}",)
            )
            assert status == 200
            status, text = await curl("/v1/drain", base=base, method="POST", headers=good)
            assert (status, '"state":"draining"' in text) == (202, True)
            status, text = await curl("/v1/resume", base=base, method="POST", headers=good)
            assert (status, text) == (200, '{"state":"ready"}')
            daemon.signal(signal.SIGTERM)
            assert await trio.to_thread.run_sync(daemon.wait) == 0
    assert token not in daemon.stderr
    assert "event=control.unauthorized" in daemon.stderr


async def test_rotate_with_vault_down_is_503_and_the_old_key_serves_on(
    bao: BaoServer, runtime_dir: Path, start_daemon: StartDaemon
) -> None:
    control = runtime_dir / "control.sock"
    data = str(runtime_dir / "data.sock")
    with trio.fail_after(60):
        async with running_daemon(bao, runtime_dir, start_daemon, KEY) as (daemon, up, _):
            await trio.to_thread.run_sync(bao.stop)

            status, body = await curl_json(control, "/v1/keys/rotate", method="POST")
            assert (status, body["error"]) == (503, "vault_unreachable")
            assert body["message"].startswith("the keys in force are kept: ")
            status, body = await curl_json(control, "/v1/status")
            assert body["state"] == "degraded"
            assert body["vault"]["reachable"] is False
            assert body["vault"]["last_error"]
            assert body["providers"]["openai"]["key"]["version"] == 1
            assert await curl_json(control, "/readyz") == (200, {"ready": True})
            status, _ = await curl("/v1/http/openai/v1/models", unix_socket=data)
            assert status == 200  # served on the last good key
            _, text = await curl("/metrics", unix_socket=control)
            assert (metric(text, "openclawd_vault_errors_total") or 0) >= 1
            assert metric(text, "openclawd_vault_reachable") == 0
            assert metric(text, "openclawd_state", state="degraded") == 1
            daemon.signal(signal.SIGTERM)
            assert await trio.to_thread.run_sync(daemon.wait) == 0
    assert "event=vault.error during=operator" in daemon.stderr
    assert KEY not in daemon.stderr
