"""The mock provider served for real: ``serve_mock`` on a loopback port, a real HTTP client
(httpx) and a real WebSocket client (the ``websockets`` library's sync client, in worker
threads), and ``VaultKeys`` against a real OpenBao dev server. Real clock throughout: real
sockets and threads are in flight."""

from __future__ import annotations

import functools
import io
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from openclawd.config import VaultConfig
from openclawd.keys.vault import SecretMetadata, SecretVersion, Vault
from openclawd.mock import content
from openclawd.mock.keys import INCORRECT, MISSING, AnyKey, KeyCheck, VaultKeys, Verdict
from openclawd.mock.server import serve_mock

from ..bao import BaoServer

Bao = BaoServer

KEY = "sk-mock-test-0001"
NEW_KEY = "sk-mock-test-0002"
WRONG_KEY = "sk-mock-test-wrong-9999"
CHAT = {"model": "mock-1", "messages": [{"role": "user", "content": "say something"}]}


class OneKey:
    """Accepts exactly ``KEY``, as key version 7 (the server's wiring, without Vault)."""

    async def check(self, presented: str) -> Verdict:
        if not presented:
            return MISSING
        return Verdict(True, version=7) if presented == KEY else INCORRECT


@dataclass
class Mock:
    port: int
    client: httpx.AsyncClient

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def chat(self, key: str | None = KEY, **fields: Any) -> httpx.Response:
        return await self.client.post(
            "/v1/chat/completions", json={**CHAT, **fields}, headers=bearer(key)
        )


def bearer(key: str | None) -> dict[str, str]:
    return {} if key is None else {"authorization": f"Bearer {key}"}


@asynccontextmanager
async def running_mock(
    keys: KeyCheck, chunk_delay_s: float = 0.0, host: str = "127.0.0.1"
) -> AsyncIterator[Mock]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            functools.partial(serve_mock, keys, host=host, port=0, chunk_delay_s=chunk_delay_s)
        )
        shown = f"[{host}]" if ":" in host else host
        async with httpx.AsyncClient(
            base_url=f"http://{shown}:{port}", trust_env=False, timeout=5.0
        ) as client:
            yield Mock(port, client)
        nursery.cancel_scope.cancel()


def sse_events(body: str) -> list[str]:
    """The ``data`` of each SSE event of a complete body; each event is one data line."""
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    for event in events:
        assert event.startswith("data: ")
        assert "\n" not in event
    return [event.removeprefix("data: ") for event in events]


def assert_openai_error(response: httpx.Response, status: int, code: str | None) -> None:
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]


# --- HTTP -----------------------------------------------------------------------------------


async def test_models_lists_the_models_with_openai_headers() -> None:
    with trio.fail_after(10):
        async with running_mock(AnyKey()) as mock:
            first = await mock.client.get("/v1/models", headers=bearer("any"))
            second = await mock.client.get("/v1/models", headers=bearer("any"))
    assert first.status_code == 200
    assert first.headers["content-type"].startswith("application/json")
    body = first.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == list(content.MODELS)
    assert all(m["object"] == "model" for m in body["data"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    assert first.headers["x-request-id"].startswith("req_")
    limit = int(first.headers["x-ratelimit-limit-requests"])
    remaining = [int(r.headers["x-ratelimit-remaining-requests"]) for r in (first, second)]
    assert limit > remaining[0] > remaining[1] >= 0


async def test_serves_on_the_ipv6_loopback(log_text: io.StringIO) -> None:
    with trio.fail_after(10):
        async with running_mock(AnyKey(), host="::1") as mock:
            response = await mock.client.get("/v1/models", headers=bearer("any"))
    assert response.status_code == 200
    assert f"url=http://[::1]:{mock.port}" in log_text.getvalue()


async def test_chat_completion() -> None:
    with trio.fail_after(10):
        async with running_mock(OneKey()) as mock:
            response = await mock.chat(
                messages=[
                    {"role": "system", "content": "be nice"},
                    {"role": "user", "content": "what time is it"},
                ]
            )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert "x-request-id" in response.headers
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "mock-1"
    assert body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    text = choice["message"]["content"]
    assert text == content.reply_text("what time is it", 7)  # the key's version, the prompt
    usage = body["usage"]
    assert usage["prompt_tokens"] == (2 + 4) + (4 + 4)
    assert usage["completion_tokens"] == len(content.split_reply(text))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize("include_usage", [False, True])
async def test_chat_completion_stream(include_usage: bool) -> None:
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    with trio.fail_after(10):
        async with running_mock(OneKey()) as mock:
            response = await mock.chat(stream=True, **options)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == content.reply_text("say something", 7)
    with_choices = [c for c in chunks if c["choices"]]
    assert with_choices[0]["choices"][0]["delta"]["role"] == "assistant"
    assert with_choices[-1]["choices"][0]["finish_reason"] == "stop"
    usage_chunks = [c for c in chunks if "usage" in c]
    if not include_usage:
        assert usage_chunks == []
        assert chunks[-1] is with_choices[-1]
        return
    [usage_chunk] = usage_chunks
    assert usage_chunk is chunks[-1]  # the last before [DONE]
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["completion_tokens"] == len(content.split_reply(text))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_a_stream_is_paced_one_word_per_delay(io_clock: trio.testing.MockClock) -> None:
    delay = 0.02
    arrivals: list[tuple[float, str]] = []
    with trio.fail_after(10):
        async with running_mock(OneKey(), chunk_delay_s=delay) as mock:
            request = mock.client.build_request(
                "POST",
                "/v1/chat/completions",
                json={**CHAT, "stream": True},
                headers=bearer(KEY),
            )
            response = await mock.client.send(request, stream=True)
            try:
                start = trio.current_time()
                async for line in response.aiter_lines():
                    if line:
                        arrivals.append((trio.current_time() - start, line))
            finally:
                await response.aclose()
    assert arrivals[-1][1] == "data: [DONE]"
    words = [t for t, line in arrivals if '"content":"' in line and '"content":""' not in line]
    assert len(words) == len(content.split_reply(content.reply_text("say something", 7)))
    # Spread out, not sent at once: virtual time, a delay before each word at least.
    assert words[-1] - words[0] >= (len(words) - 1) * delay - 1e-9  # float sums
    assert arrivals[-1][0] >= len(words) * delay - 1e-9


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-header"),
        pytest.param({"authorization": f"Basic {KEY}"}, id="basic-scheme"),
        pytest.param({"authorization": "Bearer"}, id="bearer-without-key"),
    ],
)
async def test_no_bearer_key_is_401_missing_api_key(headers: dict[str, str]) -> None:
    with trio.fail_after(10):
        async with running_mock(OneKey()) as mock:
            models = await mock.client.get("/v1/models", headers=headers)
            chat = await mock.client.post("/v1/chat/completions", json=CHAT, headers=headers)
    for response in (models, chat):
        assert_openai_error(response, 401, "missing_api_key")
        assert KEY not in response.text


async def test_a_wrong_key_is_401_invalid_api_key_and_never_echoed() -> None:
    with trio.fail_after(10):
        async with running_mock(OneKey()) as mock:
            models = await mock.client.get("/v1/models", headers=bearer(WRONG_KEY))
            chat = await mock.chat(WRONG_KEY)
            lower_scheme = await mock.client.get(
                "/v1/models", headers={"authorization": f"bearer {KEY}"}
            )
    for response in (models, chat):
        assert_openai_error(response, 401, "invalid_api_key")
        assert WRONG_KEY not in response.text
        assert "x-request-id" in response.headers
    assert lower_scheme.status_code == 200  # the scheme is case-insensitive


async def test_a_bad_chat_request_is_400_after_the_key_check() -> None:
    with trio.fail_after(10):
        async with running_mock(OneKey()) as mock:
            bad = await mock.client.post(
                "/v1/chat/completions", content=b"{oops", headers=bearer(KEY)
            )
            no_model = await mock.client.post(
                "/v1/chat/completions", json={"messages": CHAT["messages"]}, headers=bearer(KEY)
            )
            unauthorised = await mock.client.post(
                "/v1/chat/completions", content=b"{oops", headers=bearer(WRONG_KEY)
            )
    assert_openai_error(bad, 400, None)
    assert_openai_error(no_model, 400, None)
    assert no_model.json()["error"]["param"] == "model"
    assert_openai_error(unauthorised, 401, "invalid_api_key")


async def test_unknown_path_is_404_and_wrong_method_405_as_openai_errors() -> None:
    with trio.fail_after(10):
        async with running_mock(OneKey()) as mock:
            missing = await mock.client.get("/v1/nope", headers=bearer(KEY))
            method = await mock.client.delete("/v1/models", headers=bearer(KEY))
            get_chat = await mock.client.get("/v1/chat/completions", headers=bearer(KEY))
    assert_openai_error(missing, 404, None)
    assert "/v1/nope" in missing.json()["error"]["message"]
    assert_openai_error(method, 405, None)
    assert_openai_error(get_chat, 405, None)


async def _chunked(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 64 * 1024):
        yield data[start : start + 64 * 1024]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_over_1_mib_is_413_and_the_connection_stays_usable(framing: str) -> None:
    big = json.dumps({**CHAT, "pad": "x" * content.MAX_REQUEST_BYTES}).encode()
    with trio.fail_after(15):
        async with running_mock(OneKey()) as mock:
            body: bytes | AsyncIterator[bytes] = (
                big if framing == "content-length" else (_chunked(big))
            )
            response = await mock.client.post(
                "/v1/chat/completions", content=body, headers=bearer(KEY)
            )
            assert_openai_error(response, 413, None)
            # the same pooled client goes on: the unread rest of the body did not wedge it
            assert (await mock.client.get("/v1/models", headers=bearer(KEY))).status_code == 200
            # a refused key, the large body left unread
            refused = await mock.client.post(
                "/v1/chat/completions", content=big, headers=bearer(WRONG_KEY)
            )
            assert_openai_error(refused, 401, "invalid_api_key")
            assert (await mock.chat()).status_code == 200
    # just under the limit is fine
    small = json.dumps({**CHAT, "pad": "x" * (content.MAX_REQUEST_BYTES - 200)}).encode()
    assert len(small) <= content.MAX_REQUEST_BYTES
    with trio.fail_after(10):
        async with running_mock(OneKey()) as mock:
            ok = await mock.client.post("/v1/chat/completions", content=small, headers=bearer(KEY))
    assert ok.status_code == 200


# --- realtime WebSocket ---------------------------------------------------------------------


class Realtime:
    """A realtime session through the ``websockets`` sync client, from worker threads (each
    call has a timeout: a thread cannot be cancelled)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send(self, message: str | bytes | dict[str, Any]) -> None:
        data = json.dumps(message) if isinstance(message, dict) else message
        await trio.to_thread.run_sync(self.ws.send, data)

    async def recv(self) -> dict[str, Any]:
        text = await trio.to_thread.run_sync(self.ws.recv, 5.0)
        event: dict[str, Any] = json.loads(text)
        return event

    async def recv_until(self, kind: str) -> list[dict[str, Any]]:
        events = [await self.recv()]
        while events[-1]["type"] != kind:
            events.append(await self.recv())
        return events


@asynccontextmanager
async def open_realtime(url: str, key: str | None) -> AsyncIterator[Realtime]:
    stack = ExitStack()

    def open_ws() -> ClientConnection:
        client = connect(url, additional_headers=bearer(key), open_timeout=5, close_timeout=2)
        ws: ClientConnection = stack.enter_context(client)
        return ws

    ws = await trio.to_thread.run_sync(open_ws)
    try:
        yield Realtime(ws)
    finally:
        await trio.to_thread.run_sync(stack.close)


async def handshake_refusal(url: str, key: str | None) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as caught:
        async with open_realtime(url, key):
            pass
    return caught.value


@pytest.mark.parametrize(
    ("key", "code"),
    [(None, "missing_api_key"), (WRONG_KEY, "invalid_api_key")],
)
async def test_realtime_refused_handshake_is_an_http_401(key: str | None, code: str) -> None:
    with trio.fail_after(10):
        async with running_mock(OneKey()) as mock:
            refusal = await handshake_refusal(f"{mock.ws_url}/v1/realtime", key)
    assert refusal.response.status_code == 401
    body = json.loads(refusal.response.body or b"")
    assert body["error"]["code"] == code
    assert WRONG_KEY.encode() not in (refusal.response.body or b"")


async def test_realtime_unknown_path_is_a_404_handshake_answer() -> None:
    with trio.fail_after(10):
        async with running_mock(OneKey()) as mock:
            refusal = await handshake_refusal(f"{mock.ws_url}/v1/nope", KEY)
    assert refusal.response.status_code == 404
    body = json.loads(refusal.response.body or b"")
    assert body["error"]["message"] == "Invalid URL (GET /v1/nope)"


async def test_realtime_session() -> None:
    with trio.fail_after(10):
        async with (
            running_mock(OneKey()) as mock,
            open_realtime(f"{mock.ws_url}/v1/realtime?model=gpt-test-rt", KEY) as rt,
        ):
            created = await rt.recv()
            await rt.send({"type": "session.update", "session": {"instructions": "short"}})
            updated = await rt.recv()
            await rt.send({"type": "response.create"})
            events = await rt.recv_until("response.done")
    assert created["type"] == "session.created"
    assert created["session"]["model"] == "gpt-test-rt"
    assert updated["type"] == "session.updated"
    assert updated["session"]["instructions"] == "short"
    assert events[0]["type"] == "response.created"
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    [done_text] = [e for e in events if e["type"] == "response.output_text.done"]
    assert "".join(deltas) == done_text["text"] == content.reply_text(None, 7)
    usage = events[-1]["response"]["usage"]
    assert usage["output_tokens"] == len(deltas)
    assert events[-1]["response"]["status"] == "completed"


async def test_realtime_errors_leave_the_session_open() -> None:
    with trio.fail_after(10):
        async with (
            running_mock(OneKey()) as mock,
            open_realtime(f"{mock.ws_url}/v1/realtime", KEY) as rt,
        ):
            created = await rt.recv()
            errors = []
            for bad in ("{not json", b"\x00binary", b"", {"type": "no.such.event"}):
                await rt.send(bad)
                errors.append(await rt.recv())
            await rt.send({"type": "response.create"})
            events = await rt.recv_until("response.done")
    assert created["session"]["model"] == "gpt-realtime"  # the default
    assert [e["type"] for e in errors] == ["error"] * 4
    assert [e["error"]["code"] for e in errors] == [
        "invalid_json",
        "invalid_event",
        "invalid_event",
        "unknown_event",
    ]
    assert events[0]["type"] == "response.created"
    ids = [e["event_id"] for e in [created, *errors, *events]]
    assert len(ids) == len(set(ids))


# --- VaultKeys against a real OpenBao ----------------------------------------------------------


class CountingVault(Vault):
    """The real Vault boundary, counting the reads ``VaultKeys`` makes."""

    def __init__(self, cfg: VaultConfig) -> None:
        super().__init__(cfg)
        self.metadata_reads = 0
        self.secret_reads = 0

    async def read_metadata(self, path: str) -> SecretMetadata:
        self.metadata_reads += 1
        return await super().read_metadata(path)

    async def read_secret(self, path: str, version: int | None = None) -> SecretVersion:
        self.secret_reads += 1
        return await super().read_secret(path, version)


async def vault_for(bao: Bao) -> CountingVault:
    vault = CountingVault(
        VaultConfig(addr=bao.addr, auth="token", mount="secret", request_timeout_s=3.0)
    )
    await vault.use_token(bao.root_token)
    return vault


async def write(bao: Bao, path: str, **data: Any) -> int:
    return await trio.to_thread.run_sync(functools.partial(bao.write, path, **data))


@pytest.fixture
def path() -> str:
    """A secret path of the test's own on the shared server."""
    return f"mock/{uuid.uuid4().hex}"


async def test_vault_keys_accept_only_the_current_version(shared_bao: Bao, path: str) -> None:
    with trio.fail_after(20):
        assert await write(shared_bao, path, api_key=KEY) == 1
        vault = await vault_for(shared_bao)
        keys = VaultKeys(vault, path)
        async with running_mock(keys) as mock:
            first = await mock.chat(KEY)
            assert await keys.check(KEY) == Verdict(True, version=1)
            assert (await mock.chat(NEW_KEY)).status_code == 401

            assert await write(shared_bao, path, api_key=NEW_KEY) == 2
            old = await mock.chat(KEY)
            new = await mock.chat(NEW_KEY)
            models = await mock.client.get("/v1/models", headers=bearer(NEW_KEY))
    assert first.status_code == 200
    assert "key version 1 from Vault" in first.json()["choices"][0]["message"]["content"]
    assert_openai_error(old, 401, "invalid_api_key")  # the mock rejects the old key at once
    assert KEY not in old.text
    assert new.status_code == 200
    assert "key version 2 from Vault" in new.json()["choices"][0]["message"]["content"]
    assert models.status_code == 200


async def test_vault_keys_read_the_secret_only_when_the_version_changes(
    shared_bao: Bao, path: str
) -> None:
    with trio.fail_after(20):
        await write(shared_bao, path, api_key=KEY)
        vault = await vault_for(shared_bao)
        keys = VaultKeys(vault, path)
        for _ in range(3):
            assert (await keys.check(KEY)).accepted
        assert (vault.metadata_reads, vault.secret_reads) == (3, 1)
        assert not (await keys.check(WRONG_KEY)).accepted
        assert (vault.metadata_reads, vault.secret_reads) == (4, 1)
        await write(shared_bao, path, api_key=NEW_KEY)
        assert await keys.check(NEW_KEY) == Verdict(True, version=2)
        assert await keys.check(NEW_KEY) == Verdict(True, version=2)
        assert (vault.metadata_reads, vault.secret_reads) == (6, 2)
        # no key presented: refused without asking Vault
        assert await keys.check("") == MISSING
        assert vault.metadata_reads == 6


async def test_vault_keys_accept_each_key_of_a_pool(shared_bao: Bao, path: str) -> None:
    pool = [KEY, NEW_KEY, "sk-mock-test-0003"]
    with trio.fail_after(20):
        await write(shared_bao, path, api_key=pool)
        keys = VaultKeys(await vault_for(shared_bao), path)
        async with running_mock(keys) as mock:
            accepted = [(await mock.chat(key)).status_code for key in pool]
            refused = await mock.chat(WRONG_KEY)
            # a pool of one key later: the others are refused from then on
            await write(shared_bao, path, api_key=[NEW_KEY])
            after = [(await mock.chat(key)).status_code for key in pool]
    assert accepted == [200, 200, 200]
    assert_openai_error(refused, 401, "invalid_api_key")
    assert after == [401, 200, 401]


async def test_vault_keys_use_the_configured_field(shared_bao: Bao, path: str) -> None:
    with trio.fail_after(20):
        await write(shared_bao, path, api_key=WRONG_KEY, token=KEY)
        keys = VaultKeys(await vault_for(shared_bao), path, field="token")
        assert await keys.check(KEY) == Verdict(True, version=1)
        assert await keys.check(WRONG_KEY) == INCORRECT


async def test_vault_keys_are_stripped_as_the_daemon_sends_them(shared_bao: Bao, path: str) -> None:
    with trio.fail_after(20):
        await write(shared_bao, path, api_key=f" {KEY}\n")  # as written from a file
        keys = VaultKeys(await vault_for(shared_bao), path)
        assert await keys.check(KEY) == Verdict(True, version=1)
        await write(shared_bao, path, api_key=[f"{KEY}\n", f"\t{NEW_KEY} "])
        assert await keys.check(KEY) == Verdict(True, version=2)
        assert await keys.check(NEW_KEY) == Verdict(True, version=2)


@pytest.mark.parametrize(
    "bad_version",
    [
        pytest.param({"other": "x"}, id="field-missing"),
        pytest.param({"api_key": ""}, id="field-empty"),
        pytest.param({"api_key": 42}, id="field-not-a-string"),
        pytest.param({"api_key": []}, id="empty-pool"),
        # a pool the daemon refuses as a whole is refused as a whole here too
        pytest.param({"api_key": [NEW_KEY, ""]}, id="pool-with-an-empty-key"),
        pytest.param({"api_key": [NEW_KEY, 5]}, id="pool-with-a-non-string"),
    ],
)
async def test_a_version_without_a_key_keeps_the_previous_keys(
    shared_bao: Bao, path: str, bad_version: dict[str, Any], log_text: io.StringIO
) -> None:
    with trio.fail_after(20):
        await write(shared_bao, path, api_key=KEY)
        keys = VaultKeys(await vault_for(shared_bao), path)
        assert await keys.check(KEY) == Verdict(True, version=1)
        assert await write(shared_bao, path, **bad_version) == 2
        assert await keys.check(KEY) == Verdict(True, version=1)
        assert await keys.check(NEW_KEY) == INCORRECT
        assert await write(shared_bao, path, api_key=NEW_KEY) == 3
        assert await keys.check(NEW_KEY) == Verdict(True, version=3)
        assert await keys.check(KEY) == INCORRECT
    assert "event=mock.key_invalid" in log_text.getvalue()


async def test_a_missing_secret_is_503_mock_key_unavailable(shared_bao: Bao, path: str) -> None:
    with trio.fail_after(20):
        keys = VaultKeys(await vault_for(shared_bao), path)
        async with running_mock(keys) as mock:
            response = await mock.chat(KEY)
            missing = await mock.chat(None)
    assert_openai_error(response, 503, "mock_key_unavailable")
    assert_openai_error(missing, 401, "missing_api_key")


async def test_vault_down_keeps_the_last_keys_read_else_503(bao: Bao) -> None:
    path = "mock/down"
    with trio.fail_after(30):
        await write(bao, path, api_key=KEY)
        read_before = VaultKeys(await vault_for(bao), path)
        never_read = VaultKeys(await vault_for(bao), path)
        assert await read_before.check(KEY) == Verdict(True, version=1)
        await trio.to_thread.run_sync(bao.stop)
        async with running_mock(read_before) as kept, running_mock(never_read) as empty:
            still = await kept.chat(KEY)
            wrong = await kept.chat(WRONG_KEY)
            unavailable = await empty.chat(KEY)
    assert still.status_code == 200
    assert "key version 1 from Vault" in still.json()["choices"][0]["message"]["content"]
    assert_openai_error(wrong, 401, "invalid_api_key")
    assert_openai_error(unavailable, 503, "mock_key_unavailable")
    assert KEY not in unavailable.text


def lines_with(log: str, event: str) -> Iterator[str]:
    return (line for line in log.splitlines() if f"event={event}" in line)


async def test_the_log_never_holds_a_key(shared_bao: Bao, path: str, log_text: io.StringIO) -> None:
    with trio.fail_after(20):
        await write(shared_bao, path, api_key=KEY)
        keys = VaultKeys(await vault_for(shared_bao), path)
        async with running_mock(keys) as mock:
            assert (await mock.chat(KEY)).status_code == 200
            assert (await mock.chat(WRONG_KEY)).status_code == 401
            assert (await mock.chat(KEY, stream=True)).status_code == 200
            assert (
                await mock.client.post("/v1/chat/completions", content=b"{bad", headers=bearer(KEY))
            ).status_code == 400
            await write(shared_bao, path, api_key=[NEW_KEY, KEY + "-b"])
            assert (await mock.chat(KEY)).status_code == 401
            assert (await mock.chat(NEW_KEY)).status_code == 200
            async with open_realtime(f"{mock.ws_url}/v1/realtime", NEW_KEY) as rt:
                await rt.recv()
            with pytest.raises(InvalidStatus):
                async with open_realtime(f"{mock.ws_url}/v1/realtime", WRONG_KEY):
                    pass
        await write(shared_bao, path, other="no key here")
        assert await keys.check(NEW_KEY) == Verdict(True, version=2)
    log = log_text.getvalue()
    # the events that matter were logged, with versions and codes ...
    assert any("key_version=1" in line for line in lines_with(log, "mock.request"))
    assert any("code=invalid_api_key" in line for line in lines_with(log, "mock.refused"))
    assert any("version=2" in line for line in lines_with(log, "mock.key_changed"))
    assert any("version=3" in line for line in lines_with(log, "mock.key_invalid"))
    assert list(lines_with(log, "mock.realtime"))
    # ... and never a key
    for secret in (KEY, NEW_KEY, WRONG_KEY, "sk-mock-test"):
        assert secret not in log
    assert "level=error" not in log
