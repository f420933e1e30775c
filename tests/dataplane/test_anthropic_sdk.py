"""The official ``anthropic`` SDK through ``/v1/http`` of the real daemon process, to a
provider configured with ``preset = "anthropic"`` alone (besides its base_url, here the
built-in mock's Messages API on loopback): the key goes in ``x-api-key`` with the
preset's ``anthropic-version``, plain and streamed messages arrive, and the usage the
upstream reported (``message_start``'s input tokens, ``message_delta``'s output tokens) is
what token control charges the client (CONTRACT.md 5.3, 5.7)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import trio

from openclawd.mock import content
from openclawd.mock.keys import INCORRECT, MISSING, Verdict
from openclawd.mock.server import serve_mock

from ..bao import BaoServer
from ..conftest import DaemonProcess, daemon_tables, render_toml
from .daemon_process import curl, curl_json, metric
from .harness import unique_vault_path

KEY = "sk-ant-test-0001"
PROMPT = "what is a sidecar"


class OnlyKey:
    """The mock's key check: ``KEY`` alone, as version 3."""

    def __init__(self) -> None:
        self.presented: list[str] = []

    async def check(self, presented: str) -> Verdict:
        self.presented.append(presented)
        if not presented:
            return MISSING
        return Verdict(True, version=3) if presented == KEY else INCORRECT


def sdk_calls(socket_path: str) -> tuple[Any, str, Any]:
    """A plain and a streamed message with the sync SDK (blocking: run in a thread)."""
    with (
        httpx2.Client(transport=httpx2.HTTPTransport(uds=socket_path)) as http,
        anthropic.Anthropic(
            api_key="unused",  # required by the SDK; the daemon drops it, adds the real key
            base_url="http://openclawd/v1/http/claude",
            http_client=http,
            max_retries=0,  # the daemon retries; the SDK must not hide its answers
        ) as client,
    ):
        message = client.messages.create(
            model="claude-mock", max_tokens=300, messages=[{"role": "user", "content": PROMPT}]
        )
        with client.messages.stream(
            model="claude-mock", max_tokens=300, messages=[{"role": "user", "content": PROMPT}]
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
    return message, text, final


async def test_the_anthropic_sdk_through_the_socket_is_charged_its_reported_usage(
    shared_bao: BaoServer, runtime_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    vault_path = unique_vault_path()
    await trio.to_thread.run_sync(lambda: shared_bao.write(vault_path, api_key=KEY))
    token_file = runtime_dir / "vault-token"
    token_file.write_text(shared_bao.root_token + "\n")
    keys = OnlyKey()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(functools.partial(serve_mock, keys, chunk_delay_s=0.0))
            tables = daemon_tables(
                runtime_dir,
                vault={"addr": shared_bao.addr, "auth": "token", "token_file": str(token_file)},
                logging={"level": "info"},
            )
            tables["providers.claude"] = {
                "preset": "anthropic",
                "base_url": f"http://127.0.0.1:{port}",
                "vault_path": vault_path,
            }
            tables["clients.app"] = {"uids": [os.getuid()], "tokens_per_day": 1_000_000}
            config = runtime_dir / "openclawd.toml"
            config.write_text(render_toml(tables))
            daemon = start_daemon(config)
            await trio.to_thread.run_sync(daemon.wait_ready)

            data = str(runtime_dir / "data.sock")
            message, text, final = await trio.to_thread.run_sync(sdk_calls, data)
            control = runtime_dir / "control.sock"
            status, limits = await curl_json(control, "/v1/limits")
            _, metrics = await curl("/metrics", unix_socket=control)
            nursery.cancel_scope.cancel()

    reply = content.reply_text(PROMPT, 3)  # the mock names the key version it got
    assert message.content[0].text == reply
    assert (text, final.content[0].text) == (reply, reply)
    assert message.stop_reason == final.stop_reason == "end_turn"
    # Only the daemon's key reached the upstream, in the preset's header.
    assert keys.presented == [KEY, KEY]
    usage = message.usage
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        usage.input_tokens,
        usage.output_tokens,
    )
    used = 2 * (usage.input_tokens + usage.output_tokens)
    # Each request was charged at least its max_tokens (300) in advance; what stays is
    # what the upstream reported.
    assert used < 300
    assert status == 200
    assert limits["clients"]["app"]["tokens_per_day"] == {"limit": 1_000_000, "used": used}
    for kind, count in (("prompt", usage.input_tokens), ("completion", usage.output_tokens)):
        labels = {"client": "app", "provider": "claude", "kind": kind}
        assert metric(metrics, "openclawd_client_tokens_total", **labels) == 2 * count
    assert KEY not in metrics
    assert KEY not in daemon.stderr_path.read_text()
