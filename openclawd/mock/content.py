"""What the mock provider says: OpenAI-shaped bodies, stream chunks and realtime events.

Sans-IO, like ``openclawd.protocol``: plain functions from a request to the objects the
server sends, with no sockets, clock reads or sleeps (the server owns the pacing, the
caller passes ids and times in). The shapes follow OpenAI's public API closely enough for
the official SDK to parse them: ``chat.completion``, ``chat.completion.chunk`` with the
``usage`` chunk of ``stream_options.include_usage``, ``list`` of models, the error object,
and the realtime events ``session.created``, ``response.created``,
``response.output_text.delta``, ``response.done``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MODELS = ("mock-1", "gpt-4o-mini", "gpt-realtime")
OWNER = "openclawd-mock"
# The pause before each streamed word: about the pace of a fast model.
DEFAULT_CHUNK_DELAY_S = 0.03
# The largest request body the mock reads; a larger one is answered 413.
MAX_REQUEST_BYTES = 1024 * 1024


class MockRequestError(Exception):
    """A request the mock refuses, with the status and OpenAI-shaped body to answer."""

    def __init__(self, status: int, message: str, *, code: str | None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = error_body(message, code=code, param=param)


def error_body(
    message: str,
    *,
    code: str | None,
    param: str | None = None,
    kind: str = "invalid_request_error",
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    prompt: str  # the last user message's text
    prompt_tokens: int
    stream: bool
    include_usage: bool


def parse_chat_request(body: bytes | str) -> ChatRequest:
    """Validate a ``POST /v1/chat/completions`` body as OpenAI does, in outline.

    Raises:
        MockRequestError: 400 for a body that is not a JSON object, a missing or wrong
            ``model`` or ``messages``, or a wrong ``stream`` / ``stream_options``.
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise MockRequestError(400, "The request body is not valid JSON.", code=None) from None
    if not isinstance(data, dict):
        raise MockRequestError(400, "The request body must be a JSON object.", code=None)
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise MockRequestError(400, "you must provide a model parameter", code=None, param="model")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise MockRequestError(
            400, "'messages' must be a non-empty array", code=None, param="messages"
        )
    texts: list[str] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise MockRequestError(
                400,
                f"messages[{index}] must be an object with a 'role'",
                code=None,
                param=f"messages[{index}]",
            )
        texts.append(_text_of(message.get("content")))
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise MockRequestError(400, "'stream' must be a boolean", code=None, param="stream")
    options = data.get("stream_options")
    options = {} if options is None else options  # not `or {}`: [] or 0 is no object
    if not isinstance(options, dict) or (options and not stream):
        raise MockRequestError(
            400,
            "'stream_options' is only allowed when 'stream' is true, as an object",
            code=None,
            param="stream_options",
        )
    user_texts = [
        _text_of(m.get("content")) for m in messages if isinstance(m, dict) and m["role"] == "user"
    ]
    return ChatRequest(
        model=model,
        prompt=user_texts[-1] if user_texts else "",
        prompt_tokens=sum(count_tokens(t) + 4 for t in texts),
        stream=stream,
        include_usage=bool(options.get("include_usage")),
    )


def _text_of(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def count_tokens(text: str) -> int:
    """A rough token count (words and punctuation), stable for tests."""
    return len(text.split())


def reply_text(prompt: str | None, key_version: int | None) -> str:
    """The mock's answer: it says which key reached it, so rotation can be watched, and
    quotes the start of the prompt (``None``: a realtime response, which has none)."""
    key = f"key version {key_version} from Vault" if key_version is not None else "a key"
    text = f"Hello from the openclawd mock provider! Your request reached me with {key}."
    if prompt is None:
        return text
    said = " ".join(prompt.split())
    said = said if len(said) <= 60 else said[:57] + "..."
    return f'{text} You said: "{said}"'


def split_reply(text: str) -> list[str]:
    """The pieces a stream sends, one per word (with its following space)."""
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    request: ChatRequest, text: str, *, completion_id: str, created: int
) -> dict[str, Any]:
    """The non-streaming ``chat.completion`` object."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": request.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage(request.prompt_tokens, len(split_reply(text))),
    }


def stream_chunks(
    request: ChatRequest, text: str, *, completion_id: str, created: int
) -> Iterator[dict[str, Any]]:
    """The ``chat.completion.chunk`` objects of a stream, in order (``[DONE]`` excluded):
    the role, one per piece of ``text``, the finish reason, then the usage chunk if asked."""
    pieces = split_reply(text)

    def chunk(delta: Mapping[str, Any], finish_reason: str | None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": request.model,
            "choices": [
                {"index": 0, "delta": dict(delta), "logprobs": None, "finish_reason": finish_reason}
            ],
        }

    yield chunk({"role": "assistant", "content": ""}, None)
    for piece in pieces:
        yield chunk({"content": piece}, None)
    yield chunk({}, "stop")
    if request.include_usage:
        yield {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": request.model,
            "choices": [],
            "usage": usage(request.prompt_tokens, len(pieces)),
        }


def sse(data: Mapping[str, Any] | str) -> bytes:
    """One SSE event with only a ``data`` field, as OpenAI sends them."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def models(created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": OWNER}
            for name in MODELS
        ],
    }


# --- realtime ---------------------------------------------------------------------------


@dataclass
class RealtimeSession:
    """One realtime session's state: ids, the session's settings, and the event counter.

    ``receive(text)`` turns a client event into the server events to send, in order; the
    server sends them with a short pause before each ``delta`` so they arrive as a stream.
    """

    session_id: str
    model: str
    key_version: int | None
    _events: int = 0
    _responses: int = 0
    instructions: str = ""

    def _event_id(self) -> str:
        self._events += 1
        return f"event_{self.session_id}_{self._events}"

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "event_id": self._event_id(), **fields}

    def _session(self) -> dict[str, Any]:
        return {
            "id": self.session_id,
            "object": "realtime.session",
            "type": "realtime",
            "model": self.model,
            "output_modalities": ["text"],
            "instructions": self.instructions,
        }

    def opening(self) -> list[dict[str, Any]]:
        return [self._event("session.created", session=self._session())]

    def receive(self, text: str) -> list[dict[str, Any]]:
        try:
            event = json.loads(text)
        except (ValueError, RecursionError):
            return [self._error("invalid_json", "The event is not valid JSON.", None)]
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            return [self._error("invalid_event", "An event is an object with a 'type'.", None)]
        kind = event["type"]
        client_id = event.get("event_id")
        if kind == "session.update":
            session = event.get("session")
            if isinstance(session, dict) and isinstance(session.get("instructions"), str):
                self.instructions = session["instructions"]
            return [self._event("session.updated", session=self._session())]
        if kind == "response.create":
            return self._response()
        if kind in ("input_audio_buffer.append", "conversation.item.create"):
            return []  # taken in silently, as the provider does until a response is asked
        return [self._error("unknown_event", f"Unknown event type {kind!r}.", client_id)]

    def receive_binary(self) -> list[dict[str, Any]]:
        return [self._error("invalid_event", "Events are JSON text messages, not binary.", None)]

    def _error(self, code: str, message: str, client_id: Any) -> dict[str, Any]:
        error = error_body(message, code=code)["error"]
        error["event_id"] = client_id if isinstance(client_id, str) else None
        return self._event("error", error=error)

    def _response(self) -> list[dict[str, Any]]:
        self._responses += 1
        response_id = f"resp_{self.session_id}_{self._responses}"
        item_id = f"item_{self.session_id}_{self._responses}"
        text = reply_text(None, self.key_version)
        pieces = split_reply(text)

        def response(status: str, output: Sequence[Any], usage_: Any) -> dict[str, Any]:
            return {
                "object": "realtime.response",
                "id": response_id,
                "status": status,
                "output": list(output),
                "usage": usage_,
            }

        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": text}],
        }
        where = {"response_id": response_id, "item_id": item_id, "output_index": 0}
        events = [self._event("response.created", response=response("in_progress", [], None))]
        events += [
            self._event("response.output_text.delta", **where, content_index=0, delta=piece)
            for piece in pieces
        ]
        events.append(self._event("response.output_text.done", **where, content_index=0, text=text))
        events.append(
            self._event(
                "response.done",
                response=response(
                    "completed",
                    [item],
                    {
                        "input_tokens": 1,
                        "output_tokens": len(pieces),
                        "total_tokens": 1 + len(pieces),
                    },
                ),
            )
        )
        return events
