"""The /v1/ws frames: decode() rules and error codes, encode functions (CONTRACT.md 3.1)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from openclawd.errors import FrameError
from openclawd.protocol import messages
from openclawd.protocol.messages import Cancel, Ping, Request, decode

_MISSING = object()


def frame(**fields: Any) -> str:
    return json.dumps(fields)


def request(**overrides: Any) -> str:
    fields: dict[str, Any] = {
        "type": "request",
        "id": "r1",
        "provider": "openai",
        "path": "/v1/chat/completions",
    }
    fields.update(overrides)
    return json.dumps({k: v for k, v in fields.items() if v is not _MISSING})


def refused(message: str | bytes) -> FrameError:
    with pytest.raises(FrameError) as info:
        decode(message)
    assert info.value.code == "bad_request"
    return info.value


# --- frames that are not frames --------------------------------------------------------


def test_binary_message_refused() -> None:
    exc = refused(b'{"type":"ping","id":1}')
    assert exc.request_id is None


@pytest.mark.parametrize(
    "text",
    ["", "{", "not json", '{"type":"ping",}', "{'type':'ping'}", "[" * 100_000],
    ids=["empty", "open-brace", "words", "trailing-comma", "single-quotes", "deep-nesting"],
)
def test_not_json_refused(text: str) -> None:
    assert refused(text).request_id is None


@pytest.mark.parametrize("text", ["[]", '[{"type":"ping"}]', "5", "1.5", '"ping"', "null", "true"])
def test_json_not_an_object_refused(text: str) -> None:
    assert refused(text).request_id is None


@pytest.mark.parametrize(
    "fields",
    [{}, {"type": None}, {"type": 5}, {"type": ["request"]}, {"type": {"a": 1}}],
    ids=["missing", "null", "number", "list", "object"],
)
def test_missing_or_non_string_type_refused(fields: dict[str, Any]) -> None:
    assert refused(json.dumps(fields)).request_id is None


def test_non_string_type_with_valid_id_names_the_id() -> None:
    assert refused(frame(type=5, id="abc")).request_id == "abc"


@pytest.mark.parametrize(
    ("fields", "request_id"),
    [
        ({"type": "requests", "id": "r7"}, "r7"),
        ({"type": "Request", "id": "r7"}, "r7"),
        ({"type": "response.start", "id": "x" * 128}, "x" * 128),
        ({"type": "bogus"}, None),
        ({"type": "bogus", "id": ""}, None),
        ({"type": "bogus", "id": "x" * 129}, None),
        ({"type": "bogus", "id": 5}, None),
    ],
    ids=["id", "capitalised", "id-128", "no-id", "empty-id", "id-129", "number-id"],
)
def test_unknown_type(fields: dict[str, Any], request_id: str | None) -> None:
    exc = refused(json.dumps(fields))
    assert exc.request_id == request_id


@pytest.mark.parametrize("kind", ["t" * 10_000, "é" * 10_000, "\x00" * 10_000])
def test_unknown_type_message_is_short(kind: str) -> None:
    exc = refused(frame(type=kind, id="r1"))
    assert "unknown frame type" in str(exc)
    # Only a short, quoted prefix of the app's input is echoed (JSON escapes may make a
    # non-ASCII prefix longer in characters, but it stays bounded).
    assert len(str(exc)) < (200 if kind[0] == "t" else 400)
    assert kind[:41] not in str(exc)


# --- ping ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ping_id", ["p1", "", "x" * 1000, 5, 1.5, True, None, [1, "a"], {"n": {"m": 1}}]
)
def test_ping_echoes_any_json_id(ping_id: Any) -> None:
    assert decode(frame(type="ping", id=ping_id)) == Ping(ping_id)


def test_ping_without_id() -> None:
    assert decode(frame(type="ping")) == Ping(None)


def test_ping_ignores_extra_fields() -> None:
    assert decode(frame(type="ping", id="p", extra=[1, 2])) == Ping("p")


# --- cancel ----------------------------------------------------------------------------


@pytest.mark.parametrize("cancel_id", ["c", "x" * 128, "é" * 128, "with space"])
def test_cancel(cancel_id: str) -> None:
    assert decode(frame(type="cancel", id=cancel_id)) == Cancel(cancel_id)


@pytest.mark.parametrize(
    "fields",
    [
        {"type": "cancel"},
        {"type": "cancel", "id": ""},
        {"type": "cancel", "id": "x" * 129},
        {"type": "cancel", "id": 5},
        {"type": "cancel", "id": None},
        {"type": "cancel", "id": ["a"]},
    ],
    ids=["missing", "empty", "129-chars", "number", "null", "list"],
)
def test_cancel_bad_id_refused(fields: dict[str, Any]) -> None:
    exc = refused(json.dumps(fields))
    assert exc.request_id is None


# --- request: id, provider, method -----------------------------------------------------


def test_minimal_request() -> None:
    assert decode(request()) == Request(
        id="r1",
        provider="openai",
        method="POST",
        path="/v1/chat/completions",
        headers=(),
        body=None,
        has_body=False,
    )


@pytest.mark.parametrize("rid", ["a", "x" * 128, "é" * 128, "550e8400-e29b-41d4-a716"])
def test_request_id_ok(rid: str) -> None:
    assert decode(request(id=rid)).id == rid


@pytest.mark.parametrize(
    "rid",
    [_MISSING, "", "x" * 129, 5, None, ["a"], {"a": "b"}, True],
    ids=["missing", "empty", "129-chars", "number", "null", "list", "object", "bool"],
)
def test_request_bad_id_refused(rid: Any) -> None:
    exc = refused(request(id=rid))
    assert exc.request_id is None


@pytest.mark.parametrize(
    "provider",
    [_MISSING, "", None, 5, ["openai"], {"name": "openai"}],
    ids=["missing", "empty", "null", "number", "list", "object"],
)
def test_request_bad_provider_refused(provider: Any) -> None:
    exc = refused(request(provider=provider))
    assert exc.request_id == "r1"


def test_method_defaults_to_post() -> None:
    assert decode(request()).method == "POST"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
def test_every_allowed_method(method: str) -> None:
    assert decode(request(method=method)).method == method


@pytest.mark.parametrize(
    "method",
    ["post", "Get", "CONNECT", "TRACE", "FOO", "", " POST", None, 1],
)
def test_bad_method_refused(method: Any) -> None:
    assert refused(request(method=method)).request_id == "r1"


# --- request: path ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/v1/chat/completions",
        "/v1/models?limit=2",
        "/v1/models?after=a/b&x=%20y",
        "/v1/files/file-abc.jsonl",
        "/v1/a..b/.c/d.",
        "/v1/%2F",
    ],
)
def test_path_ok(path: str) -> None:
    assert decode(request(path=path)).path == path


@pytest.mark.parametrize(
    "path",
    [
        _MISSING,
        None,
        5,
        "",
        "v1/models",
        "https://evil.example/v1",
        "//evil.example/v1",
        "/v1/chat completions",
        "/v1/models\t",
        "/v1/\x00",
        "/v1/\r\nHost: x",
        "/v1/\x7f",
        "/v1/models#frag",
        "/v1\\models",
        "/v1/../x",
        "/v1/./x",
        "/./",
        "/..",
        "/v1/..",
        "/v1/..?x=1",
        "/v1/%2e%2e/x",
        "/v1/.%2E/x",
        "/%2e",
    ],
    ids=[
        "missing",
        "null",
        "number",
        "empty",
        "relative",
        "absolute-url",
        "double-slash",
        "space",
        "tab",
        "nul",
        "crlf",
        "del",
        "fragment",
        "backslash",
        "dotdot",
        "dot",
        "slash-dot-slash",
        "slash-dotdot",
        "trailing-dotdot",
        "dotdot-before-query",
        "encoded-dotdot",
        "half-encoded-dotdot",
        "encoded-dot",
    ],
)
def test_bad_path_refused(path: Any) -> None:
    assert refused(request(path=path)).request_id == "r1"


@pytest.mark.parametrize(
    ("path", "dotted"),
    [
        ("/v1/chat/completions", False),
        ("/v1/..x/a.b/...", False),
        ("/v1/%2e%2e", True),
        ("/v1/%2E./x", True),
        ("/./x", True),
        ("..", True),
    ],
)
def test_has_dot_segment(path: str, dotted: bool) -> None:
    assert messages.has_dot_segment(path) is dotted


# --- request: headers ------------------------------------------------------------------


def test_headers_absent_or_null() -> None:
    assert decode(request()).headers == ()
    assert decode(request(headers=None)).headers == ()


@pytest.mark.parametrize("headers", [[], [["a", "b"]], "a: b", 5, True])
def test_headers_not_an_object_refused(headers: Any) -> None:
    assert refused(request(headers=headers)).request_id == "r1"


@pytest.mark.parametrize(
    "value",
    [5, None, True, ["a"], {"a": "b"}, "a\rb", "a\nb", "a\r\nX-Injected: 1", "a\x00b", "\x7f"],
    ids=["number", "null", "bool", "list", "object", "cr", "lf", "crlf", "nul", "del"],
)
def test_bad_header_value_refused(value: Any) -> None:
    assert refused(request(headers={"x-ok": value})).request_id == "r1"


def test_header_value_may_hold_tab_but_not_non_ascii() -> None:
    headers = decode(request(headers={"x-a": "a\tb"})).headers
    assert headers == (("x-a", "a\tb"),)
    # Not encodable on the wire the same way by every client: refused, not sent broken.
    error = refused(request(headers={"x-b": "café"}))
    assert (error.code, error.request_id) == ("bad_request", "r1")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(constant: str) -> None:
    message = '{"type":"request","id":"r1","provider":"p","path":"/x","body":' + constant + "}"
    with pytest.raises(FrameError):
        decode(message)


@pytest.mark.parametrize(
    "name",
    ["", "bad header", "x:y", "x\r\ny", "café", "x(y)", "x/y", "x@y", "x{", '"x"'],
)
def test_bad_header_name_refused(name: str) -> None:
    assert refused(request(headers={name: "v"})).request_id == "r1"


@pytest.mark.parametrize(
    "name",
    ["Authorization", "authorization", "AUTHORIZATION", "Cookie", "cookie", "Proxy-Authorization"],
)
def test_credential_header_refused(name: str) -> None:
    exc = refused(request(id="cred-1", headers={"x-ok": "1", name: "Bearer sk-secret"}))
    assert exc.code == "bad_request"
    assert exc.request_id == "cred-1"
    assert "sk-secret" not in str(exc)


@pytest.mark.parametrize(
    "name",
    [
        "Connection",
        "Host",
        "Content-Length",
        "Transfer-Encoding",
        "Upgrade",
        "Keep-Alive",
        "TE",
        "Trailer",
        "host",
        "CONTENT-LENGTH",
    ],
)
def test_hop_by_hop_header_dropped(name: str) -> None:
    headers = decode(request(headers={"X-Before": "1", name: "whatever", "X-After": "2"})).headers
    assert headers == (("x-before", "1"), ("x-after", "2"))


def test_other_headers_kept_lower_cased_in_order() -> None:
    headers = decode(
        request(
            headers={
                "OpenAI-Beta": "assistants=v2",
                "Content-Type": "application/json",
                "x-request-id": "abc",
                "Accept": "text/event-stream",
            }
        )
    ).headers
    assert headers == (
        ("openai-beta", "assistants=v2"),
        ("content-type", "application/json"),
        ("x-request-id", "abc"),
        ("accept", "text/event-stream"),
    )


LONG_NAME = "x" * 10_000  # a valid header-name token


@pytest.mark.parametrize(
    "headers",
    [{LONG_NAME + "(": "v"}, {LONG_NAME: 5}, {LONG_NAME: "a\nb"}],
    ids=["bad-name", "non-string-value", "lf-in-value"],
)
def test_header_errors_echo_little_of_the_input(headers: dict[str, Any]) -> None:
    exc = refused(request(headers=headers))
    assert len(str(exc)) < 200


# --- request: body and extra fields ----------------------------------------------------


def test_body_absent() -> None:
    req = decode(request())
    assert req.has_body is False
    assert req.body is None


def test_body_null() -> None:
    req = decode(request(body=None))
    assert req.has_body is True
    assert req.body is None


@pytest.mark.parametrize(
    "body",
    [
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        [1, 2, 3],
        "plain text",
        "",
        0,
        False,
        {},
    ],
)
def test_body_kept_verbatim(body: Any) -> None:
    req = decode(request(body=body))
    assert req.has_body is True
    assert req.body == body
    assert type(req.body) is type(body)


def test_unknown_extra_fields_ignored() -> None:
    req = decode(request(stream=True, timeout=5, meta={"a": 1}, method="GET"))
    assert req == Request(id="r1", provider="openai", method="GET", path="/v1/chat/completions")


def test_request_with_everything() -> None:
    text = json.dumps(
        {
            "type": "request",
            "id": "full",
            "provider": "anthropic",
            "method": "PUT",
            "path": "/v1/messages?beta=true",
            "headers": {"Anthropic-Version": "2023-06-01", "Host": "x"},
            "body": {"max_tokens": 5},
        }
    )
    assert decode(text) == Request(
        id="full",
        provider="anthropic",
        method="PUT",
        path="/v1/messages?beta=true",
        headers=(("anthropic-version", "2023-06-01"),),
        body={"max_tokens": 5},
        has_body=True,
    )


def test_lone_surrogate_body_is_refused_or_encodable() -> None:
    """JSON may spell a lone surrogate (``"\\ud800"``); it has no UTF-8 form, so the body
    could never be sent upstream. Either decode refuses it or encode_body copes."""
    text = '{"type":"request","id":"r1","provider":"openai","path":"/x","body":{"a":"\\ud800"}}'
    try:
        req = decode(text)
    except FrameError as exc:
        refusal: FrameError | None = exc
    else:
        refusal = None
        messages.encode_body(req.body)  # must not raise UnicodeEncodeError
    if refusal is not None:
        assert refusal.request_id == "r1"


# --- encode ----------------------------------------------------------------------------


def test_hello() -> None:
    text = messages.hello("1.2.3", ["anthropic", "openai"], 1048576, 64)
    assert json.loads(text) == {
        "type": "hello",
        "protocol": 1,
        "server": "openclawd/1.2.3",
        "providers": ["anthropic", "openai"],
        "max_message_bytes": 1048576,
        "max_inflight": 64,
    }


@pytest.mark.parametrize("ping_id", ["p", 7, None, [1, {"a": None}], "é"])
def test_pong(ping_id: Any) -> None:
    assert json.loads(messages.pong(ping_id)) == {"type": "pong", "id": ping_id}


def test_response_start() -> None:
    headers = {"content-type": "application/json", "x-request-id": "req_1"}
    assert json.loads(messages.response_start("r1", 201, headers)) == {
        "type": "response.start",
        "id": "r1",
        "status": 201,
        "headers": {"content-type": "application/json", "x-request-id": "req_1"},
    }


@pytest.mark.parametrize("event", [None, "message", "content_block_delta"])
@pytest.mark.parametrize("data", ["[DONE]", '{"a": 1}', "", "line1\nline2"])
def test_response_event(event: str | None, data: str) -> None:
    assert json.loads(messages.response_event("r1", event, data)) == {
        "type": "response.event",
        "id": "r1",
        "event": event,
        "data": data,
    }


@pytest.mark.parametrize("body", [{"a": [1, 2]}, "text body", None, [], 3])
def test_response_body(body: Any) -> None:
    assert json.loads(messages.response_body("r1", body)) == {
        "type": "response.body",
        "id": "r1",
        "body": body,
    }


@pytest.mark.parametrize("usage", [None, {"prompt_tokens": 3, "completion_tokens": 5}])
def test_response_end(usage: Any) -> None:
    assert json.loads(messages.response_end("r1", 4, 2, usage, "openai_eu")) == {
        "type": "response.end",
        "id": "r1",
        "key_version": 4,
        "attempts": 2,
        "usage": usage,
        "provider": "openai_eu",  # CONTRACT.md 5.4: the provider that answered
    }


def test_error_without_retry_after() -> None:
    assert json.loads(messages.error("r1", "no_key", "no key for openai")) == {
        "type": "error",
        "id": "r1",
        "code": "no_key",
        "message": "no key for openai",
        "retry_after": None,
    }


def test_error_with_retry_after_and_null_id() -> None:
    assert json.loads(messages.error(None, "rate_limited", "slow down", 1.5)) == {
        "type": "error",
        "id": None,
        "code": "rate_limited",
        "message": "slow down",
        "retry_after": 1.5,
    }


def test_encode_keeps_non_ascii() -> None:
    text = messages.response_event("r-é", None, "héllo ✓ 日本")
    assert "héllo ✓ 日本" in text
    assert "r-é" in text
    assert "\\u" not in text
    assert json.loads(text)["data"] == "héllo ✓ 日本"


def test_encode_is_compact() -> None:
    text = messages.pong("p")
    assert text == '{"type":"pong","id":"p"}'


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"model": "m", "messages": [{"role": "user"}]},
            b'{"model":"m","messages":[{"role":"user"}]}',
        ),
        ([1, 2], b"[1,2]"),
        ("text", b'"text"'),
        (None, b"null"),
        ({"a": "é✓"}, '{"a":"é✓"}'.encode()),
    ],
)
def test_encode_body_compact_json_bytes(body: Any, expected: bytes) -> None:
    data = messages.encode_body(body)
    assert isinstance(data, bytes)
    assert data == expected
    assert json.loads(data) == body
