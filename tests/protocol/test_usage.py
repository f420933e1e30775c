"""Token usage read from bodies as they pass (protocol/usage.py), sans-IO."""

from __future__ import annotations

import json

import pytest

from openclawd.protocol.usage import (
    USAGE_BODY_BYTES,
    UsageReader,
    body_kind,
    model_of,
    token_counts,
)


def test_token_counts_of_openai_and_anthropic_usage_ignoring_junk() -> None:
    total: dict[str, int] = {}
    for usage in (
        {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        {"input_tokens": 7, "output_tokens": 3},
        None,
        "usage",
        [1, 2],
        {"prompt_tokens": "10", "completion_tokens": "5"},
        {"prompt_tokens": True, "completion_tokens": False},
        {"input_tokens": -4, "output_tokens": -1},
        {"prompt_tokens": 1.5, "completion_tokens": None},
    ):
        for kind, count in token_counts(usage).items():
            total[kind] = total.get(kind, 0) + count
    assert total == {"prompt": 17, "completion": 8}


@pytest.mark.parametrize(
    ("content_type", "encoding", "kind"),
    [
        ("text/event-stream; charset=utf-8", None, "sse"),
        ("application/json", "identity", "json"),
        ("application/problem+json", None, "json"),
        ("application/json", "gzip", None),  # passed on compressed: not read
        ("text/plain", None, None),
        (None, None, None),
    ],
)
def test_body_kind(content_type: str | None, encoding: str | None, kind: str | None) -> None:
    assert body_kind(content_type, encoding) == kind


def test_sse_usage_is_merged_across_events_split_anywhere() -> None:
    stream = (
        b'event: message_start\ndata: {"message":{"usage":{"input_tokens":9}}}\n\n'
        b'data: {"delta":"hi","usage":null}\n\n'
        b'event: message_delta\ndata: {"usage":{"output_tokens":4}}\n\n'
    )
    for cut in range(len(stream)):
        reader = UsageReader("sse")
        reader.feed(stream[:cut])
        reader.feed(stream[cut:])
        assert not reader.done  # an SSE stream's usage is known at its end
        reader.close()
        assert reader.done
        assert reader.usage == {"input_tokens": 9, "output_tokens": 4}


def test_a_json_body_with_a_length_is_read_at_its_last_byte() -> None:
    body = json.dumps({"id": "x", "usage": {"prompt_tokens": 3, "completion_tokens": 2}}).encode()
    reader = UsageReader("json", len(body))
    reader.feed(body[:-1])
    assert not reader.done
    reader.feed(body[-1:])
    assert reader.done
    assert reader.usage == {"prompt_tokens": 3, "completion_tokens": 2}


def test_a_json_body_without_a_length_is_read_at_close_and_junk_is_no_usage() -> None:
    reader = UsageReader("json")
    reader.feed(b'{"usage": {"prompt_tokens": 1}}')
    reader.close()
    assert reader.usage == {"prompt_tokens": 1}
    junk = UsageReader("json")
    junk.feed(b"{not json")
    junk.close()
    assert (junk.done, junk.usage) == (True, None)


def test_what_is_too_large_to_read_on_the_side_is_given_up_quietly() -> None:
    reader = UsageReader("json")
    reader.feed(b" " * (USAGE_BODY_BYTES + 1))
    assert (reader.done, reader.usage) == (True, None)
    sse = UsageReader("sse")
    sse.feed(b'data: {"usage":{"prompt_tokens":2}}\n\n')
    sse.feed(b"data: " + b"x" * (USAGE_BODY_BYTES + 1))  # one event over the bound
    assert sse.done
    sse.close()
    assert sse.usage == {"prompt_tokens": 2}  # what was read before it is kept


def test_a_body_of_no_kind_is_never_read() -> None:
    reader = UsageReader(None)
    assert reader.done
    reader.feed(b'{"usage":{"prompt_tokens":1}}')
    reader.close()
    assert reader.usage is None


def test_the_model_that_answered_is_read_from_the_first_event_naming_it() -> None:
    """``gen_ai.response.model`` (CONTRACT.md 7): OpenAI's chunks name it at the top,
    Anthropic's ``message_start`` under ``message``; a JSON body at its top."""
    openai = [
        b'data: {"id":"c","model":"gpt-4o-mini-2024-07-18","choices":[]}\n\n',
        b'data: {"id":"c","model":"other","choices":[],"usage":{"prompt_tokens":3}}\n\n',
    ]
    reader = UsageReader("sse")
    for chunk in openai:
        reader.feed(chunk)
    reader.close()
    assert reader.model == "gpt-4o-mini-2024-07-18"
    assert reader.usage == {"prompt_tokens": 3}

    anthropic = UsageReader("sse")
    anthropic.feed(
        b'event: message_start\ndata: {"type":"message_start","message":'
        b'{"model":"claude-x","usage":{"input_tokens":5}}}\n\n'
    )
    anthropic.close()
    assert anthropic.model == "claude-x"

    body = UsageReader("json")
    body.feed(json.dumps({"model": "m-1", "usage": {"prompt_tokens": 1}}).encode())
    body.close()
    assert body.model == "m-1"
    assert model_of('{"model": 7}') is None  # not a name
    assert model_of('not json, but says "model"') is None
