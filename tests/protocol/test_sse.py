"""The SSE decoder: WHATWG event-stream parsing, chunk splits anywhere, bounded memory."""

from __future__ import annotations

import json
import random
import re

import pytest

from openclawd.errors import UpstreamError, UpstreamProtocolError
from openclawd.protocol.sse import Event, SSEDecoder

ENDINGS = pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])


def decode(*chunks: bytes, **kwargs: int) -> list[Event]:
    decoder = SSEDecoder(**kwargs)
    events: list[Event] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events + decoder.close()


def feed_only(*chunks: bytes) -> list[Event]:
    """Events from ``feed`` alone, so close()'s lenient flush cannot hide a missed dispatch."""
    decoder = SSEDecoder()
    events: list[Event] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events


def test_single_event() -> None:
    assert feed_only(b"data: hello\n\n") == [Event(None, "hello", None)]


def test_multi_line_data_joined_with_lf() -> None:
    assert feed_only(b"data: a\ndata: b\ndata: c\n\n") == [Event(None, "a\nb\nc", None)]


def test_event_name() -> None:
    events = feed_only(b"event: response.delta\ndata: {}\n\ndata: x\n\n")
    assert events == [Event("response.delta", "{}", None), Event(None, "x", None)]


def test_empty_event_name_is_the_default() -> None:
    assert feed_only(b"event:\ndata: x\n\n") == [Event(None, "x", None)]


def test_id_belongs_to_its_event_only() -> None:
    events = feed_only(b"id: 7\ndata: a\n\ndata: b\n\n")
    assert events == [Event(None, "a", "7"), Event(None, "b", None)]


def test_id_with_nul_is_ignored() -> None:
    assert feed_only(b"id: 1\nid: 2\x003\ndata: a\n\n") == [Event(None, "a", "1")]


def test_comments_ignored() -> None:
    events = feed_only(b": hello\ndata: a\n:\n: data: b\ndata: c\n\n")
    assert events == [Event(None, "a\nc", None)]


def test_keepalive_ping_stream_dispatches_nothing() -> None:
    decoder = SSEDecoder()
    for _ in range(1000):
        assert decoder.feed(b": ping\n\n") == []
    assert decoder.buffered_bytes == 0
    assert decoder.feed(b"data: after\n\n") == [Event(None, "after", None)]
    assert decoder.close() == []


@ENDINGS
def test_line_endings(eol: str) -> None:
    stream = f"event: e{eol}data: a{eol}data: b{eol}{eol}data: c{eol}{eol}".encode()
    assert feed_only(stream) == [Event("e", "a\nb", None), Event(None, "c", None)]


def test_mixed_line_endings() -> None:
    stream = b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\rdata: e\n\n"
    assert feed_only(stream) == [
        Event(None, "a\nb\nc", None),
        Event(None, "d", None),
        Event(None, "e", None),
    ]


def test_crlf_split_across_feeds_is_one_line_ending() -> None:
    # Were the LF taken as a second line ending, "b" would be its own event.
    assert feed_only(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [Event(None, "a\nb", None)]


def test_cr_at_end_of_chunk_ends_the_line_at_once() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\r") == [Event(None, "a", None)]
    assert decoder.feed(b"\ndata: b\r\n\r\n") == [Event(None, "b", None)]


def test_lone_cr_at_end_of_chunk_then_non_lf() -> None:
    assert feed_only(b"data: a\r", b"data: b\r", b"\r") == [Event(None, "a\nb", None)]


def test_cr_pending_survives_an_empty_feed() -> None:
    assert feed_only(b"data: a\r", b"", b"\ndata: b\n\n") == [Event(None, "a\nb", None)]


def test_done_verbatim() -> None:
    assert feed_only(b"data: [DONE]\n\n") == [Event(None, "[DONE]", None)]


def test_only_one_leading_space_removed() -> None:
    events = feed_only(b"data:  x\ndata:y\ndata: \n\nevent:  n\nid:  i\ndata: z \n\n")
    assert events == [Event(None, " x\ny\n", None), Event(" n", "z ", " i")]


def test_value_may_contain_colons() -> None:
    assert feed_only(b"data: a: b:c\n\n") == [Event(None, "a: b:c", None)]


def test_data_without_colon_is_an_empty_data_line() -> None:
    assert feed_only(b"data\n\n") == [Event(None, "", None)]
    assert feed_only(b"data\ndata\n\n") == [Event(None, "\n", None)]
    assert feed_only(b"data: a\ndata\n\n") == [Event(None, "a\n", None)]


def test_fields_without_data_dispatch_nothing() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"event: x\nid: 1\nretry: 5\n\n") == []
    # The name and id of a block without data do not leak into the next event.
    assert decoder.feed(b"data: a\n\n") == [Event(None, "a", None)]


def test_retry_and_unknown_fields_ignored() -> None:
    stream = b"retry: 1000\nfoo: bar\nDATA: no\nEvent: no\ndata: a\nbaz\n\n"
    assert feed_only(stream) == [Event(None, "a", None)]


def test_bom_skipped_at_start() -> None:
    assert feed_only(b"\xef\xbb\xbfdata: a\n\n") == [Event(None, "a", None)]


def test_bom_split_across_feeds_is_skipped() -> None:
    assert feed_only(b"\xef", b"\xbb", b"\xbfdata: a\n\n") == [Event(None, "a", None)]


def test_bom_only_at_start() -> None:
    # A second BOM is part of the line: the field is then "\ufeffdata", unknown, ignored.
    stream = b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\ndata: b\n\xef\xbb\xbfdata: c\n\n"
    assert feed_only(stream) == [Event(None, "b", None)]


def test_bom_like_start_is_not_eaten() -> None:
    assert feed_only(b"\xef", b"data: a\n\n") == []
    assert feed_only(b"\xefdata: a\n\ndata: b\n\n") == [Event(None, "b", None)]


def test_multibyte_utf8_split_across_feeds() -> None:
    raw = "data: café 🙂 日本\n\n".encode()
    expected = [Event(None, "café 🙂 日本", None)]
    for cut in range(len(raw) + 1):
        assert feed_only(raw[:cut], raw[cut:]) == expected, cut
    assert feed_only(*(raw[i : i + 1] for i in range(len(raw)))) == expected


def test_invalid_utf8_replaced_not_raised() -> None:
    events = feed_only(b"event: \xff\nid: \xc3\ndata: a\xfe\xffb\xe2\x82\n\n")
    assert events == [Event("\ufffd", "a\ufffd\ufffdb\ufffd", "\ufffd")]


def test_close_flushes_a_pending_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\nevent: e\nid: 9\ndata: last\n") == [Event(None, "a", None)]
    assert decoder.close() == [Event("e", "last", "9")]


def test_close_flushes_an_unterminated_last_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: [DONE]") == []
    assert decoder.close() == [Event(None, "[DONE]", None)]


def test_close_with_nothing_pending() -> None:
    assert SSEDecoder().close() == []
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\nevent: e\nid: 1\n: comment") == [Event(None, "a", None)]
    assert decoder.close() == []


def test_close_resets_for_a_new_stream() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"event: old\ndata: x\r")
    assert decoder.close() == [Event("old", "x", None)]
    assert decoder.buffered_bytes == 0
    # A fresh stream: its BOM is skipped and the old CR does not eat its first LF.
    assert decoder.feed(b"\xef\xbb\xbf\n\ndata: y\n\n") == [Event(None, "y", None)]


def test_max_event_bytes_for_a_long_data_event() -> None:
    decoder = SSEDecoder(max_event_bytes=1000)
    line = b"data: " + b"x" * 50 + b"\n"  # 56 bytes held per line: 17 fit, the 18th does not
    for _ in range(17):
        assert decoder.feed(line) == []
    assert decoder.buffered_bytes == 17 * 56
    with pytest.raises(UpstreamProtocolError, match="SSE event larger than 1000 bytes"):
        decoder.feed(line)


def test_max_event_bytes_for_a_never_terminated_line() -> None:
    decoder = SSEDecoder(max_event_bytes=4096)
    decoder.feed(b"data: ")
    for _ in range(40):
        assert decoder.feed(b"y" * 100) == []
    assert decoder.buffered_bytes == 4006
    with pytest.raises(UpstreamProtocolError, match="SSE event larger than 4096 bytes"):
        decoder.feed(b"y" * 100)


def test_max_event_bytes_counts_the_data_lines_as_received() -> None:
    exact = b"data: " + b"z" * 94
    assert len(exact) == 100
    assert decode(exact + b"\n\n", max_event_bytes=100) == [Event(None, "z" * 94, None)]
    assert decode(exact[:60], exact[60:] + b"\n\n", max_event_bytes=100) == [
        Event(None, "z" * 94, None)
    ]
    with pytest.raises(UpstreamProtocolError):
        decode(exact + b"z\n\n", max_event_bytes=100)
    with pytest.raises(UpstreamProtocolError):
        decode(exact + b"\n" + b"data\n\n", max_event_bytes=100)


def test_many_small_events_far_over_the_limit_in_total() -> None:
    decoder = SSEDecoder(max_event_bytes=64)
    stream = b"".join(b"data: event %d\n\n" % i for i in range(10_000))
    events = []
    for i in range(0, len(stream), 4096):
        events += decoder.feed(stream[i : i + 4096])
    assert len(stream) > 1000 * 64
    assert [e.data for e in events] == [f"event {i}" for i in range(10_000)]
    assert decoder.buffered_bytes == 0


def test_a_failed_decoder_stays_failed() -> None:
    decoder = SSEDecoder(max_event_bytes=10)
    with pytest.raises(UpstreamProtocolError) as caught:
        decoder.feed(b"data: 0123456789")
    assert isinstance(caught.value, UpstreamError)
    assert caught.value.code == "upstream_unavailable"
    assert decoder.buffered_bytes == 0
    with pytest.raises(UpstreamProtocolError):
        decoder.feed(b"\n\n")
    with pytest.raises(UpstreamProtocolError):
        decoder.close()


def test_max_event_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        SSEDecoder(max_event_bytes=0)


def test_buffered_bytes_back_to_zero_after_dispatch() -> None:
    decoder = SSEDecoder()
    assert decoder.buffered_bytes == 0
    decoder.feed(b"data: abc\nda")
    assert decoder.buffered_bytes == len(b"data: abc") + len(b"da")
    decoder.feed(b"ta: d\n")
    assert decoder.buffered_bytes == len(b"data: abc") + len(b"data: d")
    assert decoder.feed(b"\n") == [Event(None, "abc\nd", None)]
    assert decoder.buffered_bytes == 0


def chat_chunk(delta: dict[str, str], finish: str | None = None) -> str:
    return json.dumps(
        {
            "id": "chatcmpl-9xYz",
            "object": "chat.completion.chunk",
            "created": 1732150000,
            "model": "gpt-4o-mini-2024-07-18",
            "system_fingerprint": "fp_0ba0d124f1",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        },
        ensure_ascii=False,
    )


CHAT_PAYLOADS = [
    chat_chunk({"role": "assistant", "content": ""}),
    chat_chunk({"content": "Bonjour"}),
    chat_chunk({"content": ", ça va ? "}),
    chat_chunk({"content": "🙂 日本語\\n"}),
    chat_chunk({"content": " fin."}),
    chat_chunk({}, finish="stop"),
    "[DONE]",
]


def chat_stream(eol: str) -> bytes:
    parts = [f": keepalive{eol}{eol}"]
    parts += [f"data: {payload}{eol}{eol}" for payload in CHAT_PAYLOADS]
    return "".join(parts).encode()


def random_splits(raw: bytes, rng: random.Random) -> list[bytes]:
    chunks = []
    i = 0
    while i < len(raw):
        n = rng.choice([1, 1, 2, 3, 7, rng.randint(1, 64), rng.randint(1, 600)])
        chunks.append(raw[i : i + n])
        i += n
    return chunks


@ENDINGS
def test_openai_stream_whole_bytewise_and_random_splits(eol: str) -> None:
    raw = chat_stream(eol)
    expected = [Event(None, payload, None) for payload in CHAT_PAYLOADS]
    assert expected[-1].data == "[DONE]"
    assert feed_only(raw) == expected
    assert feed_only(*(raw[i : i + 1] for i in range(len(raw)))) == expected
    for seed in range(200):
        chunks = random_splits(raw, random.Random(seed))
        assert b"".join(chunks) == raw
        assert decode(*chunks) == expected, seed
    for payload in CHAT_PAYLOADS[:-1]:
        json.loads(payload)


def reference(raw: bytes) -> list[Event]:
    """The standard's algorithm as plainly as possible, on the whole stream as text."""
    text = raw.decode("utf-8", "replace").removeprefix("\ufeff")
    events: list[Event] = []
    data: list[str] = []
    name: str | None = None
    event_id: str | None = None
    lines = re.split(r"\r\n|\r|\n", text)
    if lines[-1]:
        lines.append("")  # close(): the last line and the pending event still count
    for line in lines:
        if line == "":
            if data:
                events.append(Event(name or None, "\n".join(data), event_id))
            data, name, event_id = [], None, None
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "data":
                data.append(value)
            elif field == "event":
                name = value
            elif field == "id" and "\0" not in value:
                event_id = value
    return events


FRAGMENTS = [
    b"data", b"data:", b"data: ", b"event:", b"id: ", b"retry: 9", b":", b" ", b"x", b"yz",
    b"\r", b"\n", b"\r\n", b"\n\n", b"\xef\xbb\xbf", b"\xc3\xa9", b"\xe2\x82", b"\xff",
    b"\x00", b"[DONE]",
]  # fmt: skip


def test_matches_the_reference_on_random_streams_and_splits() -> None:
    for seed in range(500):
        rng = random.Random(seed)
        raw = b"".join(rng.choices(FRAGMENTS, k=rng.randint(0, 80)))
        assert decode(*random_splits(raw, rng)) == reference(raw), (seed, raw)


def test_a_long_line_of_any_kind_fails_alike_whole_or_split() -> None:
    """The limit counts the line being read, whatever its field; a line that arrives
    whole must count the same (found by tests/faults/test_fuzz.py: an "event:" line over
    the limit passed whole and failed when cut)."""
    line = b"event: " + b"x" * 20 + b"\n"
    whole = SSEDecoder(max_event_bytes=10)
    with pytest.raises(UpstreamProtocolError):
        whole.feed(line)
    split = SSEDecoder(max_event_bytes=10)
    assert split.feed(line[:8]) == []  # within the limit so far
    with pytest.raises(UpstreamProtocolError):
        split.feed(line[8:])
    fine = SSEDecoder(max_event_bytes=64)
    assert fine.feed(line + b"data: ok\n\n")[0].event == "x" * 20
