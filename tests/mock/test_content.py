"""The mock provider's sans-IO content: request validation, bodies, stream chunks, SSE
framing and the realtime session's events. Plain sync tests: no trio, no sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest

from openclawd.mock import content
from openclawd.mock.content import (
    ChatRequest,
    MockRequestError,
    RealtimeSession,
    completion,
    parse_chat_request,
    reply_text,
    split_reply,
    sse,
    stream_chunks,
)

MESSAGES = [{"role": "user", "content": "hi"}]


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def assert_openai_error(exc: MockRequestError, param: str | None) -> None:
    assert exc.status == 400
    assert set(exc.body) == {"error"}
    error = exc.body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert isinstance(error["message"], str)
    assert error["message"]
    assert error["param"] == param
    json.dumps(exc.body)  # serialisable as it is sent


# --- parse_chat_request -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        pytest.param(b"{not json", None, id="not-json"),
        pytest.param(b"", None, id="empty-body"),
        pytest.param(b"\xff\xfe{", None, id="not-utf8"),
        pytest.param(b"[1, 2]", None, id="array"),
        pytest.param(b'"text"', None, id="string"),
        pytest.param(b"null", None, id="null"),
        pytest.param(body(messages=MESSAGES), "model", id="model-missing"),
        pytest.param(body(model="", messages=MESSAGES), "model", id="model-empty"),
        pytest.param(body(model=3, messages=MESSAGES), "model", id="model-not-string"),
        pytest.param(body(model="mock-1"), "messages", id="messages-missing"),
        pytest.param(body(model="mock-1", messages=[]), "messages", id="messages-empty"),
        pytest.param(body(model="mock-1", messages="hi"), "messages", id="messages-string"),
        pytest.param(
            body(model="mock-1", messages={"role": "user"}), "messages", id="messages-object"
        ),
        pytest.param(
            body(model="mock-1", messages=[{"content": "hi"}]), "messages[0]", id="no-role"
        ),
        pytest.param(
            body(model="mock-1", messages=[*MESSAGES, {"role": 1, "content": "x"}]),
            "messages[1]",
            id="role-not-string",
        ),
        pytest.param(
            body(model="mock-1", messages=[*MESSAGES, "hello"]),
            "messages[1]",
            id="message-not-object",
        ),
        pytest.param(
            body(model="mock-1", messages=MESSAGES, stream="yes"), "stream", id="stream-string"
        ),
        pytest.param(body(model="mock-1", messages=MESSAGES, stream=1), "stream", id="stream-int"),
        pytest.param(
            body(model="mock-1", messages=MESSAGES, stream_options={"include_usage": True}),
            "stream_options",
            id="stream-options-without-stream",
        ),
        pytest.param(
            body(
                model="mock-1",
                messages=MESSAGES,
                stream=False,
                stream_options={"include_usage": True},
            ),
            "stream_options",
            id="stream-options-with-stream-false",
        ),
        pytest.param(
            body(model="mock-1", messages=MESSAGES, stream=True, stream_options="usage"),
            "stream_options",
            id="stream-options-not-object",
        ),
        pytest.param(
            body(model="mock-1", messages=MESSAGES, stream=True, stream_options=[]),
            "stream_options",
            id="stream-options-empty-list",
        ),
    ],
)
def test_invalid_requests_are_400_with_an_openai_error(raw: bytes, param: str | None) -> None:
    with pytest.raises(MockRequestError) as caught:
        parse_chat_request(raw)
    assert_openai_error(caught.value, param)


def test_a_str_body_is_parsed_like_bytes() -> None:
    text = json.dumps({"model": "mock-1", "messages": MESSAGES})
    assert parse_chat_request(text) == parse_chat_request(text.encode())


def test_a_valid_request() -> None:
    chat = parse_chat_request(
        body(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chat == ChatRequest(
        model="gpt-4o-mini",
        prompt="hi",
        prompt_tokens=1 + 4,
        stream=True,
        include_usage=True,
    )


def test_stream_defaults_to_false_and_usage_to_off() -> None:
    chat = parse_chat_request(body(model="mock-1", messages=MESSAGES))
    assert (chat.stream, chat.include_usage) == (False, False)
    chat = parse_chat_request(body(model="mock-1", messages=MESSAGES, stream=True))
    assert (chat.stream, chat.include_usage) == (True, False)
    chat = parse_chat_request(
        body(model="mock-1", messages=MESSAGES, stream=True, stream_options=None)
    )
    assert (chat.stream, chat.include_usage) == (True, False)


def test_the_prompt_is_the_last_user_message() -> None:
    chat = parse_chat_request(
        body(
            model="mock-1",
            messages=[
                {"role": "system", "content": "be terse"},
                {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "an answer"},
                {"role": "user", "content": "second question"},
                {"role": "assistant", "content": "another answer"},
            ],
        )
    )
    assert chat.prompt == "second question"
    # every message counts: words plus 4 per message
    assert chat.prompt_tokens == (2 + 4) + (2 + 4) + (2 + 4) + (2 + 4) + (2 + 4)


def test_the_prompt_from_content_parts_joins_the_text_parts() -> None:
    chat = parse_chat_request(
        body(
            model="mock-1",
            messages=[
                {"role": "user", "content": "older"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look at"},
                        {"type": "image_url", "image_url": {"url": "data:,"}},
                        {"type": "text", "text": "this picture"},
                        "stray",
                    ],
                },
            ],
        )
    )
    assert chat.prompt == "look at this picture"


def test_no_user_message_gives_an_empty_prompt() -> None:
    chat = parse_chat_request(body(model="mock-1", messages=[{"role": "system", "content": "x"}]))
    assert chat.prompt == ""
    assert 'You said: ""' in reply_text(chat.prompt, None)


# --- reply text ---------------------------------------------------------------------------


def test_reply_text_names_the_key_version_and_quotes_the_prompt() -> None:
    text = reply_text("what   is\nthis", 7)
    assert "key version 7 from Vault" in text
    assert text.endswith('You said: "what is this"')
    assert "key version" not in reply_text("x", None)
    assert "You said" not in reply_text(None, 3)
    assert "key version 3 from Vault" in reply_text(None, 3)


def test_reply_text_cuts_a_long_prompt() -> None:
    text = reply_text("word " * 50, 1)
    said = text.split('You said: "', 1)[1].rstrip('"')
    assert len(said) == 60
    assert said.endswith("...")


@pytest.mark.parametrize("text", ["one", "one two", "a  b ", reply_text("hi there", 2)])
def test_split_reply_pieces_join_back(text: str) -> None:
    pieces = split_reply(text)
    assert "".join(pieces) == text
    assert len(pieces) == text.count(" ") + 1


# --- completion and stream ----------------------------------------------------------------


def chat(*, stream: bool = True, include_usage: bool = False) -> ChatRequest:
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    return parse_chat_request(
        body(
            model="mock-1",
            messages=[{"role": "user", "content": "tell me three things"}],
            stream=stream,
            **options,
        )
    )


def test_completion_shape_and_usage() -> None:
    request = chat(stream=False)
    text = reply_text(request.prompt, 4)
    result = completion(request, text, completion_id="chatcmpl-1", created=1700000000)
    assert result["id"] == "chatcmpl-1"
    assert result["object"] == "chat.completion"
    assert result["created"] == 1700000000
    assert result["model"] == "mock-1"
    [choice] = result["choices"]
    assert choice["index"] == 0
    assert choice["message"] == {"role": "assistant", "content": text, "refusal": None}
    assert choice["finish_reason"] == "stop"
    assert result["usage"] == {
        "prompt_tokens": request.prompt_tokens,
        "completion_tokens": len(split_reply(text)),
        "total_tokens": request.prompt_tokens + len(split_reply(text)),
    }
    json.dumps(result)


def test_stream_chunks_in_order_without_usage() -> None:
    request = chat()
    text = reply_text(request.prompt, 2)
    chunks = list(stream_chunks(request, text, completion_id="c1", created=5))
    pieces = split_reply(text)
    assert len(chunks) == 1 + len(pieces) + 1
    for chunk in chunks:
        assert chunk["id"] == "c1"
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["created"] == 5
        assert chunk["model"] == "mock-1"
        assert len(chunk["choices"]) == 1
        assert chunk["choices"][0]["index"] == 0
        assert "usage" not in chunk
    first, *middle, last = (c["choices"][0] for c in chunks)
    assert first["delta"] == {"role": "assistant", "content": ""}
    assert first["finish_reason"] is None
    assert [c["delta"] for c in middle] == [{"content": p} for p in pieces]
    assert all(c["finish_reason"] is None for c in middle)
    assert last["delta"] == {}
    assert last["finish_reason"] == "stop"
    joined = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert joined == text


def test_stream_chunks_end_with_usage_when_asked() -> None:
    request = chat(include_usage=True)
    text = reply_text(request.prompt, 2)
    chunks = list(stream_chunks(request, text, completion_id="c1", created=5))
    pieces = split_reply(text)
    assert len(chunks) == 1 + len(pieces) + 1 + 1
    *content_chunks, usage_chunk = chunks
    assert content_chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in content_chunks)
    assert usage_chunk["object"] == "chat.completion.chunk"
    assert usage_chunk["id"] == "c1"
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["prompt_tokens"] == request.prompt_tokens
    assert usage["completion_tokens"] == len(pieces)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # the same totals as the non-streamed answer
    assert usage == completion(request, text, completion_id="x", created=0)["usage"]
    joined = "".join(c["choices"][0]["delta"].get("content", "") for c in content_chunks)
    assert joined == text


def test_sse_framing() -> None:
    assert sse("[DONE]") == b"data: [DONE]\n\n"
    framed = sse({"a": 1, "b": "x y"})
    assert framed == b'data: {"a":1,"b":"x y"}\n\n'
    assert framed.count(b"\n") == 2  # one line: compact JSON never holds a newline
    assert json.loads(framed.removeprefix(b"data: ")) == {"a": 1, "b": "x y"}
    multiline = sse({"text": "line one\nline two"})
    assert multiline.count(b"\n") == 2  # the newline is escaped inside the JSON


def test_models_list() -> None:
    result = content.models(123)
    assert result["object"] == "list"
    assert [m["id"] for m in result["data"]] == list(content.MODELS)
    for model in result["data"]:
        assert model == {
            "id": model["id"],
            "object": "model",
            "created": 123,
            "owned_by": content.OWNER,
        }


def test_error_body_shape() -> None:
    assert content.error_body("nope", code="invalid_api_key") == {
        "error": {
            "message": "nope",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    error = content.error_body("m", code=None, param="p", kind="server_error")["error"]
    assert (error["param"], error["type"], error["code"]) == ("p", "server_error", None)


# --- realtime -----------------------------------------------------------------------------


def session(key_version: int | None = 3) -> RealtimeSession:
    return RealtimeSession(session_id="s1", model="gpt-realtime", key_version=key_version)


def response_create(rt: RealtimeSession) -> list[dict[str, Any]]:
    return rt.receive(json.dumps({"type": "response.create"}))


def assert_response(events: list[dict[str, Any]], key_version: int | None) -> str:
    """Checks one response.create exchange; returns its text."""
    created, *deltas, done_text, done = events
    assert created["type"] == "response.created"
    response_id = created["response"]["id"]
    assert created["response"]["status"] == "in_progress"
    assert created["response"]["output"] == []
    assert deltas
    assert all(d["type"] == "response.output_text.delta" for d in deltas)
    assert all(d["response_id"] == response_id for d in deltas)
    assert done_text["type"] == "response.output_text.done"
    text = done_text["text"]
    assert "".join(d["delta"] for d in deltas) == text
    assert len(deltas) == len(split_reply(text))
    assert text == reply_text(None, key_version)
    assert done["type"] == "response.done"
    assert done["response"]["id"] == response_id
    assert done["response"]["status"] == "completed"
    [item] = done["response"]["output"]
    assert item["content"] == [{"type": "output_text", "text": text}]
    usage = done["response"]["usage"]
    assert usage["output_tokens"] == len(deltas)
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    return str(text)


def test_realtime_opens_with_session_created() -> None:
    rt = session()
    [event] = rt.opening()
    assert event["type"] == "session.created"
    assert event["session"]["id"] == "s1"
    assert event["session"]["model"] == "gpt-realtime"
    assert event["session"]["instructions"] == ""


def test_realtime_response_create() -> None:
    rt = session(key_version=5)
    rt.opening()
    text = assert_response(response_create(rt), key_version=5)
    assert "key version 5 from Vault" in text


def test_realtime_session_update_changes_instructions() -> None:
    rt = session()
    rt.opening()
    [event] = rt.receive(
        json.dumps({"type": "session.update", "session": {"instructions": "be brief"}})
    )
    assert event["type"] == "session.updated"
    assert event["session"]["instructions"] == "be brief"
    assert rt.instructions == "be brief"
    # an update without instructions leaves them as they are
    [event] = rt.receive(json.dumps({"type": "session.update", "session": {}}))
    assert event["session"]["instructions"] == "be brief"


@pytest.mark.parametrize(
    ("send", "code"),
    [
        pytest.param("{nope", "invalid_json", id="bad-json"),
        pytest.param("[1]", "invalid_event", id="not-object"),
        pytest.param(json.dumps({"event_id": "e1"}), "invalid_event", id="no-type"),
        pytest.param(json.dumps({"type": 5}), "invalid_event", id="type-not-string"),
        pytest.param(json.dumps({"type": "bogus.event"}), "unknown_event", id="unknown-type"),
        pytest.param(None, "invalid_event", id="binary"),
    ],
)
def test_realtime_errors_do_not_end_the_session(send: str | None, code: str) -> None:
    rt = session()
    rt.opening()
    events = rt.receive_binary() if send is None else rt.receive(send)
    [event] = events
    assert event["type"] == "error"
    error = event["error"]
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    # the session goes on
    assert_response(response_create(rt), key_version=3)


def test_realtime_unknown_event_error_names_the_client_event_id() -> None:
    rt = session()
    [event] = rt.receive(json.dumps({"type": "bogus", "event_id": "client_7"}))
    assert event["error"]["event_id"] == "client_7"
    assert "bogus" in event["error"]["message"]
    [event] = rt.receive(json.dumps({"type": "bogus", "event_id": 7}))
    assert event["error"]["event_id"] is None


def test_realtime_input_events_are_taken_silently() -> None:
    rt = session()
    assert rt.receive(json.dumps({"type": "input_audio_buffer.append", "audio": ""})) == []
    assert rt.receive(json.dumps({"type": "conversation.item.create", "item": {}})) == []


def test_realtime_event_and_response_ids_are_unique() -> None:
    rt = session()
    events = rt.opening()
    first = response_create(rt)
    events += first
    events += rt.receive("{bad")
    events += rt.receive(json.dumps({"type": "session.update", "session": {}}))
    second = response_create(rt)
    events += second
    ids = [e["event_id"] for e in events]
    assert len(ids) == len(set(ids))
    assert first[0]["response"]["id"] != second[0]["response"]["id"]
    assert first[-1]["response"]["output"][0]["id"] != second[-1]["response"]["output"][0]["id"]
    # another session's ids do not collide with this one's
    other = RealtimeSession(session_id="s2", model="m", key_version=None)
    other_ids = [e["event_id"] for e in other.opening() + response_create(other)]
    assert not set(other_ids) & set(ids)
