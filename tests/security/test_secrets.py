"""No key, in any form, in anything the daemon ever shows: a busy life (rotations, a
refused key, retries, relayed errors, a drop, Vault down, a drain), then a search of
everything it produced for every key, plain, base64 and URL-encoded."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from ..bao import BaoServer
from ..conftest import DaemonProcess, leak_forms
from ..dataplane.daemon_process import curl, running_daemon
from ..dataplane.harness import call, open_app
from ..fake_upstream import Reply

StartDaemon = Callable[..., DaemonProcess]
KEYS = ["sk-secret-first-0001", "sk-secret-second-0002", "sk-secret-third-0003"]
CHAT = "/v1/http/openai/v1/chat/completions"
STREAM = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}


async def test_a_busy_life_leaves_no_key_in_any_output(
    bao: BaoServer, runtime_dir: Path, start_daemon: StartDaemon
) -> None:
    control = runtime_dir / "control.sock"
    data = str(runtime_dir / "data.sock")
    shown: list[str] = []  # every byte the daemon sent anyone, as text

    async def operator(target: str, method: str = "GET", body: str | None = None) -> str:
        status, text = await curl(target, unix_socket=control, method=method, data=body)
        shown.append(f"{status} {text}")
        return text

    async def app_call(app: Any, rid: str, **fields: Any) -> list[dict[str, Any]]:
        frames: list[dict[str, Any]] = await app.call(rid, **fields)
        shown.extend(repr(frame) for frame in frames)
        return frames

    async def http(body: bytes = b'{"model":"m"}') -> int:
        answer = await call(data, "POST", CHAT, body=body)
        shown.append(repr(answer))
        return answer.status

    with trio.fail_after(90):
        async with running_daemon(
            bao,
            runtime_dir,
            start_daemon,
            KEYS[0],
            logging={"level": "debug"},
        ) as (daemon, up, vault_path):
            async with open_app(data) as app:
                # Plain, streamed, and through /v1/http.
                await app_call(app, "a1", body={"model": "m"})
                await app_call(app, "a2", body=STREAM)
                assert await http() == 200
                # A 429 retried, a 503 relayed after the retries, a drop mid-stream.
                up.script(Reply(status=429, headers=[("retry-after", "0")]))
                assert (await app_call(app, "b1", body={}))[-1]["type"] == "response.end"
                up.script(*[Reply(status=503)] * 3)
                assert (await app_call(app, "b2", body={}))[0]["status"] == 503
                up.script(Reply(drop_after_chunks=1))
                assert (await app_call(app, "b3", body=STREAM))[-1]["type"] == "error"
                # A rotation in Vault the upstream learns first: the old key meets a 401,
                # the daemon re-reads Vault and retries with the new one.
                await trio.to_thread.run_sync(lambda: bao.write(vault_path, api_key=KEYS[1]))
                up.expected_key = KEYS[1]
                assert (await app_call(app, "c1", body={}))[-1]["key_version"] == 2
                assert await http() == 200
                # The operator's rotation, and one that finds nothing new.
                await trio.to_thread.run_sync(lambda: bao.write(vault_path, api_key=KEYS[2]))
                up.expected_key = KEYS[2]
                await operator("/v1/keys/rotate", "POST", "{}")
                await operator("/v1/keys/rotate", "POST", '{"provider":"openai"}')
                assert (await app_call(app, "c2", body={}))[-1]["key_version"] == 3
                # A key the upstream refuses for good: relayed 401, after one re-read.
                up.expected_key = "sk-nobody-has-this"
                assert (await app_call(app, "c3", body={}))[0]["status"] == 401
                assert await http() == 401
                up.expected_key = KEYS[2]
                # Vault down: rotation refused, requests go on on the last key.
                await trio.to_thread.run_sync(lambda: bao.stop(kill=True))
                await operator("/v1/keys/rotate", "POST", "{}")
                assert (await app_call(app, "d1", body={}))[-1]["type"] == "response.end"
                await operator("/v1/status")
                await operator("/metrics")
                # Bad frames and refused headers: their errors echo the app's input.
                await app.send(
                    {
                        "type": "request",
                        "id": "e1",
                        "provider": "openai",
                        "path": "/v1/x",
                        "headers": {"Authorization": "Bearer x"},
                    }
                )
                shown.append(repr(await app.receive_for("e1")))
                # A drain: new requests refused, then resumed.
                await operator("/v1/drain", "POST", '{"deadline_s": 5}')
                assert (await app_call(app, "f1", body={}))[-1]["code"] == "draining"
                await operator("/v1/drain")
                await operator("/v1/resume", "POST")
                await operator("/v1/status")
                await operator("/metrics")
                await operator("/readyz")
            daemon.signal(signal.SIGTERM)
            assert await trio.to_thread.run_sync(daemon.wait) == 0

    outputs = {
        "stderr": daemon.stderr,
        "stdout": daemon.stdout,
        "everything shown": "\n".join(shown),
    }
    assert "event=upstream.retry" in outputs["stderr"]  # the busy life did happen
    assert "event=key.rotated" in outputs["stderr"] or "key_version=3" in outputs["stderr"]
    for key in KEYS:
        for form in leak_forms(key):
            for name, text in outputs.items():
                assert form not in text, f"a form of a key is in {name}"
