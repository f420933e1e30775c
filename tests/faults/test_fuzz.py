"""Generated inputs against the sans-IO cores the app and the upstream feed: the /v1/ws
frame decoder (``messages.decode``, ``Session``) and the SSE decoder.

Whatever comes in, they raise nothing but openclawd's own errors, and their state stays
sound. The default run tries a few thousand inputs per property; the slow run
(``pytest -m slow tests/faults``) tries 100,000 each.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openclawd.errors import ClientError, FrameError, UpstreamProtocolError
from openclawd.protocol import messages
from openclawd.protocol.session import Abort, Ignore, Send, Session, Start
from openclawd.protocol.sse import SSEDecoder

DEFAULT_EXAMPLES = 2_000
SLOW_EXAMPLES = 100_000


def runs(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,  # nothing written into the checkout
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- /v1/ws frames --------------------------------------------------------------------

FIELDS = ("type", "id", "provider", "method", "path", "body", "headers")
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.sampled_from(["request", "cancel", "ping", "POST", "GET", "/v1/x", "openai", "r1"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
paths = st.one_of(
    st.text(max_size=30),
    st.builds(lambda s: "/" + s, st.text(max_size=30)),
    st.sampled_from(["/v1/chat/completions", "//x", "/a/../b", "/%2e%2e/x", "/a b", "/a#b"]),
)
headers = st.dictionaries(
    st.one_of(st.text(max_size=12), st.sampled_from(["Authorization", "x-ok", "Cookie"])),
    st.one_of(st.text(max_size=20), st.integers(), st.none()),
    max_size=4,
)
# Frames shaped like the contract's, each field often right, sometimes anything at all.
frame_objects = st.fixed_dictionaries(
    {},
    optional={
        "type": st.one_of(st.sampled_from(["request", "cancel", "ping"]), json_values),
        "id": st.one_of(st.text(min_size=1, max_size=130), json_values),
        "provider": st.one_of(st.sampled_from(["openai", "other"]), json_values),
        "method": st.one_of(st.sampled_from(sorted(messages.METHODS)), json_values),
        "path": st.one_of(paths, json_values),
        "body": json_values,
        "headers": st.one_of(headers, json_values),
    },
)


def encoded(obj: Any) -> str:
    return json.dumps(obj)


frames = st.one_of(
    frame_objects.map(encoded),
    json_values.map(encoded),
    st.text(max_size=200),  # anything at all, JSON or not
    st.binary(max_size=64),  # binary messages are refused too
    st.sampled_from(['{"id":"\\ud800","type":"ping"}', "[", "NaN", '{"a":Infinity}']),
)


def check_decode(message: str | bytes) -> None:
    refused: FrameError | None = None
    try:
        frame = messages.decode(message)
    except FrameError as exc:  # any other exception fails the test
        refused = exc
    if refused is not None:
        assert isinstance(refused, ClientError)
        assert refused.code == "bad_request"
        if refused.request_id is not None:
            assert isinstance(refused.request_id, str)
            assert 1 <= len(refused.request_id) <= messages.MAX_ID_CHARS
        return
    if isinstance(frame, messages.Request):
        assert 1 <= len(frame.id) <= messages.MAX_ID_CHARS
        assert frame.provider
        assert frame.method in messages.METHODS
        assert frame.path.startswith("/")
        assert not frame.path.startswith("//")
        assert not messages.has_dot_segment(frame.path.split("?", 1)[0])
        for name, value in frame.headers:
            assert name == name.lower()
            assert name not in messages.CREDENTIAL_HEADERS
            assert isinstance(value, str)
        if frame.has_body:
            messages.encode_body(frame.body)  # whatever was accepted can be sent on
    else:
        assert isinstance(frame, messages.Cancel | messages.Ping)


@runs(DEFAULT_EXAMPLES)
@given(frames)
def test_the_frame_decoder_raises_only_frame_errors(message: str | bytes) -> None:
    check_decode(message)


@pytest.mark.slow
@runs(SLOW_EXAMPLES)
@given(frames)
def test_the_frame_decoder_raises_only_frame_errors_slow(message: str | bytes) -> None:
    check_decode(message)


def check_session(sequence: list[tuple[str, str | bytes]]) -> None:
    """A channel's session fed any frames, with requests finishing at any point: it never
    raises, answers in JSON, and its in-flight set is exactly what it started and was
    not finished, never over the limit."""
    limit = 3
    session = Session({"openai": frozenset({"authorization"})}, limit)
    expected: set[str] = set()
    for action, message in sequence:
        if action == "finish" and isinstance(message, str):
            session.finish(message)
            expected.discard(message)
            continue
        result = session.receive(message)
        if isinstance(result, Start):
            assert result.request.id not in expected
            expected.add(result.request.id)
        elif isinstance(result, Send):
            sent = json.loads(result.text)
            assert sent["type"] in ("error", "pong")
            if sent["type"] == "error":
                # Never tied to a request in flight: it would read as that request's end.
                assert sent["id"] not in expected
        elif isinstance(result, Abort):
            assert result.id in expected
        else:
            assert isinstance(result, Ignore)
        assert session.inflight == expected
        assert len(expected) <= limit


ids = st.sampled_from(["a", "b", "c", "d", "e"])
requests_ = st.builds(
    lambda rid, provider, kind: json.dumps(
        {"type": kind, "id": rid, "provider": provider, "path": "/v1/x"}
    ),
    ids,
    st.sampled_from(["openai", "nope"]),
    st.sampled_from(["request", "request", "cancel", "ping"]),
)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("receive"), st.one_of(requests_, frames)),
        st.tuples(st.just("finish"), ids),
    ),
    max_size=30,
)


@runs(DEFAULT_EXAMPLES // 4)
@given(steps)
def test_a_session_never_raises_and_keeps_its_in_flight_set_true(
    sequence: list[tuple[str, str | bytes]],
) -> None:
    check_session(sequence)


@pytest.mark.slow
@runs(SLOW_EXAMPLES)
@given(steps)
def test_a_session_never_raises_and_keeps_its_in_flight_set_true_slow(
    sequence: list[tuple[str, str | bytes]],
) -> None:
    check_session(sequence)


# --- SSE ------------------------------------------------------------------------------

sse_pieces = st.sampled_from(
    [
        b"data: ",
        b"data:",
        b"event: x",
        b"id: 1",
        b"id: \x00",
        b"retry: 5",
        b": comment",
        b"\n",
        b"\r\n",
        b"\r",
        b"\xef\xbb\xbf",
        b"\xff\xfe",
        "é€😀".encode(),
        b"[DONE]",
        b'{"usage":{"prompt_tokens":1}}',
        b"x" * 50,
    ]
)
streams = st.one_of(
    st.lists(st.one_of(sse_pieces, st.binary(max_size=8)), max_size=40).map(b"".join),
    st.binary(max_size=300),
)


def decode_all(stream: bytes, cuts: list[int], limit: int) -> tuple[list[Any], bool]:
    """Feed ``stream`` cut at ``cuts``; the events, and whether it failed on size."""
    decoder = SSEDecoder(max_event_bytes=limit)
    events: list[Any] = []
    bounds = [0, *sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]
    try:
        for start, end in zip(bounds, bounds[1:], strict=False):
            events += decoder.feed(stream[start:end])
            # Memory stays bounded by the limit, whatever the input (or by the two bytes
            # of a possible byte order mark, held until the third tells).
            assert decoder.buffered_bytes <= max(limit, 2)
        events += decoder.close()
    except UpstreamProtocolError:
        # A failed decoder stays failed, and holds nothing.
        assert decoder.buffered_bytes == 0
        with pytest.raises(UpstreamProtocolError):
            decoder.feed(b"data: more\n\n")
        with pytest.raises(UpstreamProtocolError):
            decoder.close()
        return events, True
    if limit >= len(b"data: next"):  # after close, a new stream from scratch
        assert decoder.feed(b"data: next\n\n")[0].data == "next"
    return events, False


def check_sse(stream: bytes, cuts: list[int], limit: int) -> None:
    whole, whole_failed = decode_all(stream, [], limit)
    split, split_failed = decode_all(stream, cuts, limit)
    assert split_failed == whole_failed
    if not whole_failed:
        # However the bytes arrive, the same events come out.
        assert [(e.event, e.data, e.id) for e in split] == [(e.event, e.data, e.id) for e in whole]
        for event in whole:
            assert isinstance(event.data, str)


@runs(DEFAULT_EXAMPLES)
@given(streams, st.lists(st.integers(min_value=0), max_size=12), st.integers(1, 400))
def test_the_sse_decoder_is_split_invariant_and_bounded(
    stream: bytes, cuts: list[int], limit: int
) -> None:
    check_sse(stream, cuts, limit)


@pytest.mark.slow
@runs(SLOW_EXAMPLES)
@given(streams, st.lists(st.integers(min_value=0), max_size=12), st.integers(1, 400))
def test_the_sse_decoder_is_split_invariant_and_bounded_slow(
    stream: bytes, cuts: list[int], limit: int
) -> None:
    check_sse(stream, cuts, limit)
