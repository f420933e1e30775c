"""What the mock provider says on Anthropic's Messages API (``POST /v1/messages``).

Sans-IO, like ``openclawd.mock.content``: from a request body to the objects the server
sends, no sockets, clock reads or sleeps. The shapes follow Anthropic's public API closely
enough for the official ``anthropic`` SDK to parse them: the ``message`` object, the
stream's events (``message_start``, ``content_block_start``, ``ping``,
``content_block_delta``, ``content_block_stop``, ``message_delta``, ``message_stop``,
each an SSE event with its name), the usage (input tokens in ``message_start``, output
tokens in ``message_delta``) and the error object.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from openclawd.mock.content import count_tokens, split_reply

# The header every request must carry, as Anthropic's API requires it.
VERSION_HEADER = "anthropic-version"


class AnthropicRequestError(Exception):
    """A request the mock refuses, with the status and Anthropic-shaped body to answer."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.body = error_body(message, kind)


def error_body(message: str, kind: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


@dataclass(frozen=True, slots=True)
class MessagesRequest:
    model: str
    prompt: str  # the last user message's text
    input_tokens: int
    max_tokens: int
    stream: bool


def parse_messages_request(body: bytes | str) -> MessagesRequest:
    """Validate a ``POST /v1/messages`` body as Anthropic does, in outline.

    Raises:
        AnthropicRequestError: 400 for a body that is not a JSON object, or a missing or
            wrong ``model``, ``max_tokens``, ``messages`` or ``stream``.
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise AnthropicRequestError(400, "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise AnthropicRequestError(400, "The request body must be a JSON object.")
    model, max_tokens = data.get("model"), data.get("max_tokens")
    if not isinstance(model, str) or not model:
        raise AnthropicRequestError(400, "model: Field required")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise AnthropicRequestError(400, "max_tokens: Field required (an integer >= 1)")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise AnthropicRequestError(400, "messages: Field required (a non-empty array)")
    texts = [_text_of(data.get("system"))]
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise AnthropicRequestError(
                400, f"messages.{index}.role: Input should be 'user' or 'assistant'"
            )
        texts.append(_text_of(message.get("content")))
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise AnthropicRequestError(400, "stream: Input should be a valid boolean")
    users = [_text_of(m.get("content")) for m in messages if m["role"] == "user"]
    return MessagesRequest(
        model=model,
        prompt=users[-1] if users else "",
        input_tokens=sum(count_tokens(t) + 3 for t in texts if t),
        max_tokens=max_tokens,
        stream=stream,
    )


def _text_of(content: Any) -> str:
    """A message's text: a string, or the text blocks of a list of content blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            block["text"]
            for block in content
            if isinstance(block, dict) and isinstance(block.get("text"), str)
        )
    return ""


def _pieces(request: MessagesRequest, text: str) -> tuple[list[str], str]:
    """The pieces of the reply (one token each), cut at ``max_tokens``, and why it stops."""
    pieces = split_reply(text)
    if len(pieces) > request.max_tokens:
        return pieces[: request.max_tokens], "max_tokens"
    return pieces, "end_turn"


def message(request: MessagesRequest, text: str, *, message_id: str) -> dict[str, Any]:
    """The non-streaming ``message`` object."""
    pieces, stop_reason = _pieces(request, text)
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": request.model,
        "content": [{"type": "text", "text": "".join(pieces)}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": request.input_tokens, "output_tokens": len(pieces)},
    }


def stream_events(
    request: MessagesRequest, text: str, *, message_id: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The stream's ``(event name, data)`` pairs, in order."""
    pieces, stop_reason = _pieces(request, text)
    start = message(request, "", message_id=message_id)
    start.update(content=[], stop_reason=None)
    start["usage"] = {"input_tokens": request.input_tokens, "output_tokens": 1}
    yield "message_start", {"type": "message_start", "message": start}
    block = {"type": "text", "text": ""}
    yield "content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}
    yield "ping", {"type": "ping"}
    for piece in pieces:
        delta = {"type": "text_delta", "text": piece}
        yield "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
    yield "content_block_stop", {"type": "content_block_stop", "index": 0}
    yield (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": len(pieces)},
        },
    )
    yield "message_stop", {"type": "message_stop"}


def sse(event: str, data: Mapping[str, Any]) -> bytes:
    """One SSE event with its name, as Anthropic sends them."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
