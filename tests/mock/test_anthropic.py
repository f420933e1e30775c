"""The mock provider's Anthropic Messages API (``POST /v1/messages``), served for real on a
loopback port and read with a real HTTP client (httpx)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio

from openclawd.mock import content
from openclawd.mock.anthropic import parse_messages_request

from .test_server import KEY, WRONG_KEY, OneKey, running_mock

MESSAGES = {
    "model": "claude-mock",
    "max_tokens": 256,
    "system": "be brief",
    "messages": [{"role": "user", "content": [{"type": "text", "text": "say something"}]}],
}
HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}


async def post(
    body: dict[str, Any] | bytes = MESSAGES, headers: dict[str, str] = HEADERS
) -> httpx.Response:
    with trio.fail_after(10):
        async with running_mock(OneKey()) as mock:
            if isinstance(body, bytes):
                return await mock.client.post("/v1/messages", content=body, headers=headers)
            return await mock.client.post("/v1/messages", json=body, headers=headers)


def named_events(body: str) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of each SSE event of a complete body: two lines each."""
    assert body.endswith("\n\n")
    events = []
    for block in body[:-2].split("\n\n"):
        name, data = block.split("\n")
        events.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


async def test_a_message() -> None:
    response = await post()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert (body["type"], body["role"], body["model"]) == ("message", "assistant", "claude-mock")
    assert body["id"].startswith("msg_")
    text = content.reply_text("say something", 7)
    assert body["content"] == [{"type": "text", "text": text}]
    assert (body["stop_reason"], body["stop_sequence"]) == ("end_turn", None)
    # "be brief" and "say something": two words each, plus 3 per text.
    assert body["usage"] == {"input_tokens": 10, "output_tokens": len(content.split_reply(text))}


async def test_a_streamed_message_has_anthropics_events_and_usage() -> None:
    response = await post({**MESSAGES, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = named_events(response.text)
    names = [name for name, _ in events]
    pieces = content.split_reply(content.reply_text("say something", 7))
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * len(pieces),
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert (start["content"], start["stop_reason"]) == ([], None)
    assert start["usage"] == {"input_tokens": 10, "output_tokens": 1}
    deltas = [data["delta"]["text"] for name, data in events if name == "content_block_delta"]
    assert deltas == pieces
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"] == {"output_tokens": len(pieces)}


async def test_max_tokens_cuts_the_reply() -> None:
    body = (await post({**MESSAGES, "max_tokens": 3})).json()
    assert body["stop_reason"] == "max_tokens"
    assert body["usage"]["output_tokens"] == 3
    assert body["content"][0]["text"] == "".join(content.split_reply(body["content"][0]["text"]))


@pytest.mark.parametrize(
    ("headers", "status", "kind", "message"),
    [
        ({"anthropic-version": "2023-06-01"}, 401, "authentication_error", "x-api-key header"),
        (
            {"x-api-key": WRONG_KEY, "anthropic-version": "2023-06-01"},
            401,
            "authentication_error",
            "",
        ),
        ({"authorization": f"Bearer {KEY}", "anthropic-version": "2023-06-01"}, 401, "", ""),
        ({"x-api-key": KEY}, 400, "invalid_request_error", "anthropic-version: header is required"),
    ],
)
async def test_the_key_and_the_version_header_are_required(
    headers: dict[str, str], status: int, kind: str, message: str
) -> None:
    response = await post(headers=headers)
    assert response.status_code == status
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == (kind or "authentication_error")
    assert message in body["error"]["message"]
    assert WRONG_KEY not in response.text
    assert KEY not in response.text


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{oops", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (json.dumps({**MESSAGES, "model": ""}).encode(), "model: Field required"),
        (json.dumps({**MESSAGES, "max_tokens": 0}).encode(), "max_tokens"),
        (json.dumps({**MESSAGES, "messages": []}).encode(), "messages: Field required"),
        (
            json.dumps({**MESSAGES, "messages": [{"role": "system", "content": "x"}]}).encode(),
            "messages.0.role",
        ),
        (json.dumps({**MESSAGES, "stream": "yes"}).encode(), "stream"),
    ],
)
async def test_a_bad_body_is_400_invalid_request_error(body: bytes, message: str) -> None:
    response = await post(body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert message in error["message"]


def test_the_prompt_is_the_last_user_text() -> None:
    body = {
        **MESSAGES,
        "messages": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "second one"},
        ],
    }
    parsed = parse_messages_request(json.dumps(body))
    assert parsed.prompt == "second one"
    assert parsed.input_tokens == (2 + 3) + (1 + 3) + (1 + 3) + (2 + 3)
