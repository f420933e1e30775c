"""The benchmark's own pieces: the fast fake upstream (``bench/upstream.py``) and the load
client (``bench/client.py``).

The upstream runs as what it is, its own process (asyncio, not trio), once for the module;
the tests talk HTTP/1.1 to it over raw sockets, so that what is on the wire (chunks,
keep-alive, a connection closed) is what is checked. Its accepted keys are shared by the
module's tests: each test sets its own, with keys of its own.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from bench import upstream
from bench.client import (
    Client,
    EventDelays,
    HttpPeer,
    PeerFailure,
    SSECounter,
    Target,
    percentile,
    request_body,
)
from bench.runner import StreamsTally, shares, streams_row

REPO = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"
IO_TIMEOUT_S = 5.0


# -- the upstream, as a subprocess -------------------------------------------------------


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.upstream"],
        cwd=REPO,
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, "the upstream exited before it said its port"
        yield int(json.loads(line)["port"])
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=IO_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def bench_call(port: int, method: str, path: str, body: object = None) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=IO_TIMEOUT_S)
    try:
        payload = None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=payload)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def accept_keys(port: int, *keys: str) -> None:
    status, _ = bench_call(port, "POST", "/_bench/keys", {"accept": list(keys)})
    assert status == 200


def stats(port: int) -> tuple[dict[str, Any], bytes]:
    status, raw = bench_call(port, "GET", "/_bench/stats")
    assert status == 200
    return json.loads(raw), raw


def new_key(name: str) -> str:
    return f"sk-bench-{name}-{random.randrange(1 << 64):016x}"


@pytest.fixture
def key(port: int, request: pytest.FixtureRequest) -> str:
    """A key of this test's own, the only one the upstream accepts."""
    value = new_key(request.node.name[:20])
    accept_keys(port, value)
    return value


def http_request(
    path: str,
    body: object = None,
    *,
    key: str | None = None,
    method: str = "POST",
    headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    raw = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    lines = [f"{method} {path} HTTP/1.1", "host: bench"]
    if key is not None:
        lines.append(f"authorization: Bearer {key}")
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"content-length: {len(raw)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + raw


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    chunks: list[bytes] | None = None  # a chunked body, chunk by chunk

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Conn:
    """One client connection to the upstream, read exactly (keep-alive, pipelining)."""

    sock: socket.socket
    buffer: bytearray = field(default_factory=bytearray)

    @classmethod
    def open(cls, port: int) -> Conn:
        return cls(socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self.buffer += data

    def read_until(self, marker: bytes) -> bytes:
        while (end := self.buffer.find(marker)) < 0:
            self._fill()
        out = bytes(self.buffer[: end + len(marker)])
        del self.buffer[: end + len(marker)]
        return out

    def read_exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._fill()
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    def reply(self) -> Reply:
        head = self.read_until(b"\r\n\r\n").decode("latin-1")
        status_line, *header_lines = head[:-4].split("\r\n")
        status = int(status_line.split(" ")[1])
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.read_until(b"\r\n")[:-2], 16)
                if size == 0:
                    assert self.read_exact(2) == b"\r\n"
                    return Reply(status, headers, b"".join(chunks), chunks)
                chunks.append(self.read_exact(size))
                assert self.read_exact(2) == b"\r\n"
        return Reply(status, headers, self.read_exact(int(headers["content-length"])))

    def at_eof(self) -> bool:
        """Has the server closed the connection (after what was read)?"""
        if self.buffer:
            return False
        try:
            return self.sock.recv(65536) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def conn(port: int) -> Iterator[Conn]:
    connection = Conn.open(port)
    yield connection
    connection.close()


def decode_chunked(raw: bytes) -> list[bytes]:
    """The chunks of a whole chunked body (no trailers)."""
    chunks: list[bytes] = []
    position = 0
    while True:
        end = raw.index(b"\r\n", position)
        size = int(raw[position:end], 16)
        start = end + 2
        if size == 0:
            assert raw[start:] == b"\r\n"
            return chunks
        chunks.append(raw[start : start + size])
        assert raw[start + size : start + size + 2] == b"\r\n"
        position = start + size + 2


def sse_body(events: int) -> bytes:
    """The SSE bytes of ``upstream.stream(events)``, out of their HTTP chunks."""
    whole = upstream.stream(events)
    return b"".join(decode_chunked(whole[whole.index(b"\r\n\r\n") + 4 :]))


def check_events(chunks: list[bytes], events: int) -> None:
    """``events`` content events, a usage event and [DONE]: one HTTP chunk each."""
    assert len(chunks) == events + 2
    for chunk in chunks:
        assert chunk.startswith(b"data: ")
        assert chunk.endswith(b"\n\n")
        assert chunk.count(b"\n\n") == 1
    datas = [chunk[len(b"data: ") : -2] for chunk in chunks]
    for index, data in enumerate(datas[:events]):
        event = json.loads(data)
        assert event["object"] == "chat.completion.chunk"
        assert event["choices"][0]["delta"] == {"content": f"w{index}"}
        assert "usage" not in event
    usage = json.loads(datas[events])
    assert usage["choices"] == []
    assert set(usage["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert datas[-1] == b"[DONE]"


# -- bench.upstream: pure pieces ---------------------------------------------------------


@pytest.mark.parametrize("events", [1, 2, 5, 40])
def test_stream_parts_join_back_and_cut_after_the_first_event(events: int) -> None:
    first, rest = upstream.stream_parts(events)
    whole = upstream.stream(events)
    assert first + rest == whole
    head_end = whole.index(b"\r\n\r\n") + 4
    head, body = whole[:head_end], whole[head_end:]
    chunks = decode_chunked(body)
    check_events(chunks, events)
    # The first part: the head and exactly the first event's HTTP chunk, no byte more.
    first_chunk = b"%x\r\n%s\r\n" % (len(chunks[0]), chunks[0])
    assert first == head + first_chunk
    assert b'"w0"' in first
    assert b'"w1"' not in first
    assert rest.startswith(b"%x\r\n" % len(chunks[1]))


def test_stream_of_no_events_has_usage_and_done_only() -> None:
    whole = upstream.stream(0)
    chunks = decode_chunked(whole[whole.index(b"\r\n\r\n") + 4 :])
    check_events(chunks, 0)


def test_fingerprint_is_sha256_and_12_hex() -> None:
    value = upstream.fingerprint("sk-one")
    assert re.fullmatch(r"sha256:[0-9a-f]{12}", value)
    assert value == "sha256:" + hashlib.sha256(b"sk-one").hexdigest()[:12]
    assert upstream.fingerprint("sk-one") == value
    assert upstream.fingerprint("sk-two") != value
    assert "sk-one" not in value


# -- bench.upstream: the server ----------------------------------------------------------


def test_a_completion_is_json_with_usage(port: int, key: str, conn: Conn) -> None:
    conn.send(http_request(CHAT, request_body(stream=False, events=0), key=key))
    reply = conn.reply()
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["total_tokens"] == (
        body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )


def assert_401(reply: Reply) -> None:
    assert reply.status == 401
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert error["code"] == "invalid_api_key"
    assert error["type"] == "invalid_request_error"
    assert isinstance(error["message"], str)
    assert error["message"]


def test_no_accepted_key_refuses_every_key(port: int, conn: Conn) -> None:
    accept_keys(port)
    for key in (new_key("any"), None):
        conn.send(http_request(CHAT, request_body(stream=False, events=0), key=key))
        assert_401(conn.reply())


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer sk-wrong", "Basic c2s6eA==", "Bearer {key}x", "{key}"],
)
def test_a_wrong_or_missing_key_gets_an_openai_401(
    port: int, key: str, conn: Conn, authorization: str | None
) -> None:
    before, _ = stats(port)
    headers = () if authorization is None else (("authorization", authorization.format(key=key)),)
    conn.send(http_request(CHAT, request_body(stream=False, events=0), headers=headers))
    assert_401(conn.reply())
    after, _ = stats(port)
    assert after["refused"] == before["refused"] + 1
    assert upstream.fingerprint(key) not in after["requests"]


def test_keys_route_sets_the_accepted_keys(port: int, conn: Conn) -> None:
    old, new = new_key("old"), new_key("new")
    accept_keys(port, old)
    body = request_body(stream=False, events=0)
    conn.send(http_request(CHAT, body, key=old))
    assert conn.reply().status == 200
    accept_keys(port, new)  # replaces, does not add
    conn.send(http_request(CHAT, body, key=old))
    assert_401(conn.reply())
    conn.send(http_request(CHAT, body, key=new))
    assert conn.reply().status == 200


def test_keys_route_refuses_a_body_without_accept(port: int) -> None:
    status, raw = bench_call(port, "POST", "/_bench/keys", {"keys": ["x"]})
    assert status == 400
    assert json.loads(raw)["error"]["code"] == "bad_json"


def test_stats_count_per_fingerprint_and_never_show_a_key(port: int, conn: Conn) -> None:
    one, two = new_key("one"), new_key("two")
    accept_keys(port, one, two)
    before, _ = stats(port)
    started = time.monotonic()
    body = request_body(stream=False, events=0)
    for key in (one, two, one, "sk-not-accepted"):
        conn.send(http_request(CHAT, body, key=key))
        conn.reply()
    ended = time.monotonic()
    after, raw = stats(port)
    assert after["requests"][upstream.fingerprint(one)] == 2
    assert after["requests"][upstream.fingerprint(two)] == 1
    assert upstream.fingerprint("sk-not-accepted") not in after["requests"]
    assert after["refused"] == before["refused"] + 1
    # CLOCK_MONOTONIC, comparable across processes: the first request's time, not the last.
    first_one = after["first_seen"][upstream.fingerprint(one)]
    first_two = after["first_seen"][upstream.fingerprint(two)]
    assert started <= first_one <= first_two <= ended
    for name in after["requests"]:
        assert re.fullmatch(r"sha256:[0-9a-f]{12}", name)
    for secret in (one, two, "sk-not-accepted", "sk-bench"):
        assert secret.encode() not in raw


@pytest.mark.parametrize("events", [0, 1, 7])
def test_a_stream_has_n_events_usage_and_done(port: int, key: str, conn: Conn, events: int) -> None:
    conn.send(http_request(CHAT, request_body(stream=True, events=events), key=key))
    reply = conn.reply()
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert reply.chunks is not None
    check_events(reply.chunks, events)


def test_a_stream_without_max_tokens_has_16_events(port: int, key: str, conn: Conn) -> None:
    conn.send(http_request(CHAT, {"model": "bench", "stream": True}, key=key))
    reply = conn.reply()
    assert reply.chunks is not None
    check_events(reply.chunks, 16)


def test_a_gap_sends_the_head_and_first_event_first(port: int, key: str, conn: Conn) -> None:
    first, rest = upstream.stream_parts(3)
    sent = time.monotonic()
    conn.send(http_request(CHAT, request_body(stream=True, events=3, gap_ms=300), key=key))
    assert conn.read_exact(len(first)) == first
    assert not conn.buffer
    conn.sock.settimeout(0.1)
    with pytest.raises(TimeoutError):
        conn.sock.recv(65536)  # the rest is not there yet
    conn.sock.settimeout(IO_TIMEOUT_S)
    assert conn.read_exact(len(rest)) == rest
    assert time.monotonic() - sent >= 0.25  # the rest went at least ~300 ms after
    conn.sock.settimeout(0.05)
    with pytest.raises(TimeoutError):
        conn.sock.recv(65536)  # and nothing after it


def test_a_request_during_a_gap_is_answered_after_the_stream(
    port: int, key: str, conn: Conn
) -> None:
    streamed = http_request(CHAT, request_body(stream=True, events=2, gap_ms=200), key=key)
    plain = http_request(CHAT, request_body(stream=False, events=0), key=key)
    conn.send(streamed + plain)  # pipelined: the second waits behind the first's gap
    reply = conn.reply()
    assert reply.chunks is not None
    check_events(reply.chunks, 2)
    second = conn.reply()
    assert second.status == 200
    assert second.json()["object"] == "chat.completion"


def test_keep_alive_answers_requests_one_after_the_other(port: int, key: str, conn: Conn) -> None:
    conn.send(http_request(CHAT, request_body(stream=False, events=0), key=key))
    assert conn.reply().status == 200
    conn.send(http_request(CHAT, request_body(stream=True, events=2), key=key))
    reply = conn.reply()
    assert reply.status == 200
    assert reply.chunks is not None
    check_events(reply.chunks, 2)
    conn.send(http_request("/_bench/stats", method="GET"))
    assert conn.reply().json()["requests"][upstream.fingerprint(key)] == 2


def test_connection_close_is_honoured(port: int, key: str, conn: Conn) -> None:
    body = request_body(stream=False, events=0)
    conn.send(http_request(CHAT, body, key=key, headers=(("connection", "close"),)))
    assert conn.reply().status == 200
    assert conn.at_eof()


def test_a_chunked_request_body_is_refused_and_closed(port: int, key: str, conn: Conn) -> None:
    conn.send(
        f"POST {CHAT} HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer {key}\r\n"
        "transfer-encoding: chunked\r\n\r\n".encode()
    )
    reply = conn.reply()
    assert reply.status == 400
    assert reply.json()["error"]["code"] == "bad_request"
    assert conn.at_eof()


def test_an_unfinished_head_over_64_kib_is_refused_and_closed(port: int, conn: Conn) -> None:
    head = f"POST {CHAT} HTTP/1.1\r\nx-pad: ".encode()
    conn.send(head + b"a" * (upstream.MAX_HEAD_BYTES - len(head)))  # 64 KiB: still waited for
    time.sleep(0.05)
    conn.send(b"a")  # one byte over
    reply = conn.reply()
    assert reply.status == 400
    assert "too large" in reply.json()["error"]["message"]
    assert conn.at_eof()


def test_a_whole_head_over_64_kib_is_refused(port: int, key: str, conn: Conn) -> None:
    """The limit holds for a head however its bytes arrive: here the part before the limit,
    then the rest with the head's end (one read each on loopback)."""
    body = json.dumps(request_body(stream=False, events=0)).encode()
    head = (
        f"POST {CHAT} HTTP/1.1\r\nauthorization: Bearer {key}\r\n"
        f"content-length: {len(body)}\r\nx-pad: "
    ).encode()
    conn.send(head + b"a" * (60_000 - len(head)))
    time.sleep(0.05)
    conn.send(b"a" * 10_000 + b"\r\n\r\n" + body)  # the head: ~70 KB, over 64 KiB
    reply = conn.reply()
    assert reply.status == 400, f"a ~70 KB head was answered {reply.status}, not refused"


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        ({"max_tokens": "3"}, "bad_max_tokens"),
        ({"max_tokens": -1}, "bad_max_tokens"),
        ({"max_tokens": 2.5}, "bad_max_tokens"),
        ({"max_tokens": None}, "bad_max_tokens"),
        ({"max_tokens": upstream.MAX_STREAM_EVENTS + 1}, "bad_max_tokens"),
        ({"max_tokens": 3, "bench_gap_ms": "10"}, "bad_gap"),
        ({"max_tokens": 3, "bench_gap_ms": -1}, "bad_gap"),
        ({"max_tokens": 3, "bench_gap_ms": 60_001}, "bad_gap"),
        ({"max_tokens": 3, "bench_gap_ms": None}, "bad_gap"),
    ],
)
def test_bad_stream_parameters_get_a_400_and_keep_the_connection(
    port: int, key: str, conn: Conn, extra: dict[str, object], code: str
) -> None:
    conn.send(http_request(CHAT, {"model": "bench", "stream": True, **extra}, key=key))
    reply = conn.reply()
    assert reply.status == 400
    assert reply.json()["error"]["code"] == code
    conn.send(http_request(CHAT, request_body(stream=False, events=0), key=key))
    assert conn.reply().status == 200


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]"])
def test_a_body_that_is_not_a_json_object_gets_a_400(
    port: int, key: str, conn: Conn, body: bytes
) -> None:
    conn.send(http_request(CHAT, body, key=key))
    reply = conn.reply()
    assert reply.status == 400
    assert reply.json()["error"]["code"] == "bad_json"


def test_an_unknown_route_gets_a_404(port: int, conn: Conn) -> None:
    conn.send(http_request("/v1/models", method="GET"))
    reply = conn.reply()
    assert reply.status == 404
    assert reply.json()["error"]["code"] == "not_found"


# -- bench.client: pure pieces -----------------------------------------------------------


def feed_all(counter: SSECounter, pieces: list[bytes]) -> int:
    return sum(counter.feed(piece) for piece in pieces)


def test_sse_counter_counts_a_stream_fed_whole() -> None:
    counter = SSECounter()
    assert counter.feed(sse_body(5)) == 7
    assert counter.events == 7  # 5 content events, usage, [DONE]
    assert counter.done


def test_sse_counter_at_every_split_position() -> None:
    data = sse_body(3)
    for cut in range(len(data) + 1):
        counter = SSECounter()
        assert feed_all(counter, [data[:cut], data[cut:]]) == 5, cut
        assert counter.events == 5, cut
        assert counter.done, cut


def test_sse_counter_byte_by_byte_and_at_random_cuts() -> None:
    data = sse_body(4)
    counter = SSECounter()
    assert feed_all(counter, [data[i : i + 1] for i in range(len(data))]) == 6
    assert counter.done
    rng = random.Random(20240611)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 12)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        counter = SSECounter()
        assert feed_all(counter, pieces) == 6, cuts
        assert counter.events == 6, cuts
        assert counter.done, cuts


def test_sse_counter_notes_done_only_once_its_event_is_complete() -> None:
    data = sse_body(2)
    counter = SSECounter()
    assert counter.feed(data[:-1]) == 3
    assert not counter.done
    assert counter.feed(data[-1:]) == 1
    assert counter.done
    assert counter.events == 4


def test_sse_counter_without_done() -> None:
    counter = SSECounter()
    assert counter.feed(b"data: {}\n\ndata: {}\n\ndata: [DO") == 2
    assert counter.feed(b"NE]") == 0
    assert not counter.done
    assert counter.events == 2


def test_percentile_nearest_rank() -> None:
    samples = [7, 1, 10, 3, 9, 2, 8, 4, 6, 5]  # 1..10, unordered
    assert percentile(samples, 0.5) == 5.0
    assert percentile(samples, 0.99) == 10.0
    assert percentile(samples, 0.9) == 9.0
    assert percentile(samples, 0.91) == 10.0
    assert percentile(samples, 1.0) == 10.0
    assert percentile(samples, 0.0) == 1.0
    assert percentile(samples, 0.01) == 1.0
    assert percentile(samples, 0.11) == 2.0
    assert percentile([42], 0.5) == 42.0
    assert isinstance(percentile([3, 1], 0.5), float)
    assert samples == [7, 1, 10, 3, 9, 2, 8, 4, 6, 5]  # not sorted in place


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(percentile([], 0.5))
    assert math.isnan(percentile([], 0.99))


def test_request_body_shapes() -> None:
    plain = request_body(stream=False, events=5, gap_ms=300)
    assert plain["model"] == "bench"
    assert plain["messages"][0]["role"] == "user"
    assert "stream" not in plain
    assert "max_tokens" not in plain
    assert "bench_gap_ms" not in plain
    streamed = request_body(stream=True, events=5)
    assert streamed["stream"] is True
    assert streamed["max_tokens"] == 5
    assert "bench_gap_ms" not in streamed
    assert "bench_gap_ms" not in request_body(stream=True, events=5, gap_ms=0)
    gapped = request_body(stream=True, events=5, gap_ms=300)
    assert gapped["bench_gap_ms"] == 300
    assert gapped["max_tokens"] == 5
    assert {k: v for k, v in gapped.items() if k != "bench_gap_ms"} == streamed


def test_target_of() -> None:
    tcp = Target.of({"kind": "http", "tcp": ["127.0.0.1", "8080"], "key": "sk-x"})
    assert tcp == Target(kind="http", tcp=("127.0.0.1", 8080), key="sk-x")
    assert tcp.tcp == ("127.0.0.1", 8080)
    assert tcp.unix is None
    assert tcp.path == "/v1/chat/completions"
    assert tcp.provider == ""
    unix = Target.of({"kind": "ws", "unix": "/tmp/oc.sock", "provider": "openai", "path": "/v1/ws"})
    assert unix == Target(kind="ws", unix="/tmp/oc.sock", provider="openai", path="/v1/ws")
    assert unix.tcp is None
    assert unix.key is None
    with pytest.raises(KeyError):
        Target.of({"tcp": ["127.0.0.1", 1]})
    with pytest.raises(AttributeError):
        tcp.kind = "ws"  # type: ignore[misc]  # frozen


# -- bench.client: HttpPeer against the upstream -----------------------------------------


def encoded(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


async def test_http_peer_keeps_one_connection(port: int, key: str) -> None:
    with trio.fail_after(10):
        peer = await HttpPeer.open(
            Target.of({"kind": "http", "tcp": ["127.0.0.1", port], "key": key})
        )
        try:
            stream = peer.stream
            local = stream.socket.getsockname()
            plain = encoded(request_body(stream=False, events=0))
            for _ in range(3):
                outcome = await peer.request(plain)
                assert outcome.events == 0
                assert outcome.first_event_ns is None
                assert outcome.latency_ns > 0
                assert peer.usable
                assert peer.stream is stream
            outcome = await peer.request(encoded(request_body(stream=True, events=2)))
            assert outcome.events == 4
            assert peer.stream.socket.getsockname() == local
        finally:
            await peer.aclose()
    assert stats(port)[0]["requests"][upstream.fingerprint(key)] == 4


@pytest.mark.parametrize("events", [0, 1, 6])
async def test_http_peer_counts_a_streams_events(port: int, key: str, events: int) -> None:
    with trio.fail_after(10):
        peer = await HttpPeer.open(Target(kind="http", tcp=("127.0.0.1", port), key=key))
        try:
            outcome = await peer.request(encoded(request_body(stream=True, events=events)))
        finally:
            await peer.aclose()
    # Every event counts: the content events, the usage event and [DONE].
    assert outcome.events == events + 2
    assert outcome.first_event_ns is not None
    assert 0 < outcome.first_event_ns <= outcome.latency_ns


async def test_http_peer_times_the_first_event_before_a_gap(port: int, key: str) -> None:
    with trio.fail_after(10):
        peer = await HttpPeer.open(Target(kind="http", tcp=("127.0.0.1", port), key=key))
        try:
            body = request_body(stream=True, events=3, gap_ms=300)
            outcome = await peer.request(encoded(body))
        finally:
            await peer.aclose()
    assert outcome.events == 5
    assert outcome.first_event_ns is not None
    assert outcome.latency_ns - outcome.first_event_ns >= 200_000_000  # the gap: ~300 ms


@pytest.mark.parametrize("peer_key", ["sk-wrong", None])
async def test_http_peer_reports_a_401(port: int, key: str, peer_key: str | None) -> None:
    with trio.fail_after(10):
        peer = await HttpPeer.open(Target(kind="http", tcp=("127.0.0.1", port), key=peer_key))
        try:
            with pytest.raises(PeerFailure) as caught:
                await peer.request(encoded(request_body(stream=False, events=0)))
        finally:
            await peer.aclose()
    assert str(caught.value) == "status 401"


async def test_client_sequential_reports_events_and_failures(port: int, key: str) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            client = Client(nursery)
            spec = {"kind": "http", "tcp": ["127.0.0.1", port]}
            answer = await client.handle(
                {"op": "targets", "targets": {"good": {**spec, "key": key}, "bad": spec}}
            )
            assert answer == {"ok": True}
            good = await client.handle(
                {"op": "sequential", "target": "good", "n": 3, "stream": True, "events": 4}
            )
            bad = await client.handle({"op": "sequential", "target": "bad", "n": 2})
            nursery.cancel_scope.cancel()
    assert good["events"] == [6, 6, 6]
    assert len(good["latency_ns"]) == len(good["first_event_ns"]) == 3
    assert good["failures"] == {}
    assert bad["latency_ns"] == []
    assert bad["failures"] == {"status 401": 2}


# -- timed streams (scenario 8): the upstream's stamps, the client's delays --------------


def timed_data(chunk: bytes) -> bytes:
    assert chunk.startswith(b"data: ")
    assert chunk.endswith(b"\n\n")
    return chunk[len(b"data: ") : -2]


def test_timed_event_is_one_chunk_stamped_with_sent_and_due() -> None:
    raw = upstream.timed_event(7, 5_000_123_456, 5_000_000_000)
    chunks = decode_chunked(raw + b"0\r\n\r\n")
    assert len(chunks) == 1
    event = json.loads(timed_data(chunks[0]))
    assert event["object"] == "chat.completion.chunk"
    assert event["choices"][0]["delta"] == {"content": "w7"}
    assert event["bench_sent_ns"] == 5_000_123_456
    assert event["bench_due_ns"] == 5_000_000_000


def test_timed_end_is_usage_done_and_the_last_chunk() -> None:
    raw = upstream.timed_end()
    assert raw.endswith(b"0\r\n\r\n")
    chunks = decode_chunked(raw)
    assert len(chunks) == 2
    assert json.loads(timed_data(chunks[0]))["choices"] == []
    assert chunks[1] == b"data: [DONE]\n\n"


def test_event_delays_are_arrival_minus_sent_and_lateness_sent_minus_due() -> None:
    delays = EventDelays()
    data = timed_data(
        decode_chunked(upstream.timed_event(0, 1_000_500, 1_000_000) + b"0\r\n\r\n")[0]
    )
    assert delays.add(data, 1_250_500)  # bytes: an SSE event on the HTTP paths
    assert delays.add(data.decode(), 1_000_600)  # text: a /v1/ws frame's data
    assert delays.delays_ns == [250_000, 100]
    assert delays.upstream_late_ns == [500, 500]


def test_event_delays_skip_events_without_stamps() -> None:
    delays = EventDelays()
    usage = timed_data(decode_chunked(upstream.timed_end())[0])
    assert not delays.add(usage, 10)
    assert not delays.add("[DONE]", 10)
    assert not delays.add(b'{"bench_sent_ns":12}', 10)  # half a stamp is none
    assert delays.delays_ns == []
    assert delays.upstream_late_ns == []


def test_sse_counter_hands_each_complete_event_over_once_at_any_cut() -> None:
    chunked = b"".join(upstream.timed_event(i, 100 + i, 90 + i) for i in range(3))
    sse = b"".join(decode_chunked(chunked + b"0\r\n\r\n"))  # the SSE bytes alone
    for cut in range(len(sse) + 1):
        seen: list[bytes] = []
        counter = SSECounter(seen.append)
        counter.feed(sse[:cut])
        counter.feed(sse[cut:])
        assert [json.loads(part[len(b"data: ") :])["bench_sent_ns"] for part in seen] == [
            100,
            101,
            102,
        ], cut


def test_request_body_of_a_timed_stream() -> None:
    timed = request_body(stream=True, events=5, interval_ms=20, offset_ms=3.5, start_ns=42)
    assert timed["bench_interval_ms"] == 20
    assert timed["bench_offset_ms"] == 3.5
    assert timed["bench_start_ns"] == 42
    untimed = request_body(stream=True, events=5)
    assert {k: v for k, v in timed.items() if not k.startswith("bench_")} == untimed
    assert "bench_start_ns" not in request_body(stream=True, events=5, interval_ms=20)


def read_timed(conn: Conn, events: int) -> list[dict[str, Any]]:
    reply = conn.reply()
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/event-stream"
    assert reply.chunks is not None
    assert len(reply.chunks) == events + 2
    assert reply.chunks[-1] == b"data: [DONE]\n\n"
    assert "usage" in json.loads(timed_data(reply.chunks[-2]))
    return [json.loads(timed_data(chunk)) for chunk in reply.chunks[:events]]


def timed_request(key: str, **timing: float) -> bytes:
    body = {"stream": True, "max_tokens": 4} | {f"bench_{k}": v for k, v in timing.items()}
    return http_request(CHAT, body, key=key)


def test_a_timed_stream_is_stamped_on_its_schedule(port: int, key: str, conn: Conn) -> None:
    before = time.monotonic_ns()
    conn.send(timed_request(key, interval_ms=10, offset_ms=5))
    events = read_timed(conn, 4)
    after = time.monotonic_ns()
    assert [e["choices"][0]["delta"]["content"] for e in events] == ["w0", "w1", "w2", "w3"]
    due = [e["bench_due_ns"] for e in events]
    # Due every 10 ms from 5 ms after the request was read, on one clock with ours.
    assert [b - a for a, b in zip(due, due[1:], strict=False)] == pytest.approx(
        [10_000_000] * 3, abs=1_000
    )
    assert before + 5_000_000 <= due[0] + 1_000
    for event in events:
        # Written when due or after (the event loop's clock resolution aside), and before
        # we had it all.
        assert event["bench_due_ns"] - 1_000_000 <= event["bench_sent_ns"] <= after
    # Keep-alive: the next request is answered on the same connection.
    conn.send(http_request(CHAT, {"stream": False}, key=key))
    assert conn.reply().status == 200


def test_a_timed_stream_with_a_start_runs_on_that_schedule(port: int, key: str, conn: Conn) -> None:
    start_ns = time.monotonic_ns() + 50_000_000
    conn.send(timed_request(key, interval_ms=20, offset_ms=2.5, start_ns=start_ns))
    due = [e["bench_due_ns"] for e in read_timed(conn, 4)]
    expected = [start_ns + 2_500_000 + k * 20_000_000 for k in range(4)]
    assert due == pytest.approx(expected, abs=1_000)


@pytest.mark.parametrize(
    "timing",
    [
        {"interval_ms": -1},
        {"interval_ms": "20"},
        {"interval_ms": 20, "offset_ms": 1e9},
        {"interval_ms": 20, "start_ns": 1.5},
        {"interval_ms": 20, "start_ns": 1},  # an hour ago or more: not this clock
    ],
)
def test_bad_timing_gets_a_400(port: int, key: str, conn: Conn, timing: dict[str, Any]) -> None:
    body = {"stream": True, "max_tokens": 2} | {f"bench_{k}": v for k, v in timing.items()}
    conn.send(http_request(CHAT, body, key=key))
    reply = conn.reply()
    assert reply.status == 400
    assert reply.json()["error"]["code"] == "bad_timing"


async def test_http_peer_notes_each_timed_events_delay(port: int, key: str) -> None:
    delays = EventDelays()
    with trio.fail_after(10):
        peer = await HttpPeer.open(Target(kind="http", tcp=("127.0.0.1", port), key=key))
        try:
            body = request_body(stream=True, events=5, interval_ms=5)
            before = time.monotonic_ns()
            outcome = await peer.request(encoded(body), delays)
            after = time.monotonic_ns()
        finally:
            await peer.aclose()
    assert outcome.events == 7  # 5 stamped, usage, [DONE]
    assert len(delays.delays_ns) == len(delays.upstream_late_ns) == 5
    # Arrival minus sent, on one clock: never negative, never more than the whole wait.
    assert all(0 <= d <= after - before for d in delays.delays_ns)
    assert all(late >= -1_000_000 for late in delays.upstream_late_ns)


async def test_client_streams_open_then_go_all_at_once(port: int, key: str) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            client = Client(nursery)
            spec = {"kind": "http", "tcp": ["127.0.0.1", port]}
            await client.handle(
                {"op": "targets", "targets": {"good": {**spec, "key": key}, "bad": spec}}
            )
            opened = await client.handle({"op": "streams_open", "target": "good", "n": 3})
            assert opened == {"open": 3, "failures": {}}
            assert stats(port)[0]["requests"].get(upstream.fingerprint(key), 0) == 0
            go = {"op": "streams_go", "events": 4, "interval_ms": 5, "first": 3, "total": 6}
            start_ns = time.monotonic_ns() + 20_000_000
            good = await client.handle(go | {"start_ns": start_ns})
            assert client.ready == []  # used up, closed
            await client.handle({"op": "streams_open", "target": "bad", "n": 2})
            bad = await client.handle(go)
            nursery.cancel_scope.cancel()
    assert good["streams"] == 3
    assert good["failures"] == {}
    assert len(good["delays_ns"]) == len(good["upstream_late_ns"]) == 12
    assert all(d >= 0 for d in good["delays_ns"])
    assert stats(port)[0]["requests"][upstream.fingerprint(key)] == 3
    assert bad["streams"] == 0
    assert bad["failures"] == {"status 401": 2}
    assert bad["delays_ns"] == []


# -- bench.runner: scenario 8's figures --------------------------------------------------


def test_shares_are_even_and_add_up() -> None:
    assert shares(5, 1) == [5]
    assert shares(250, 2) == [125, 125]
    assert shares(1000, 3) == [334, 333, 333]
    assert shares(7, 4) == [2, 2, 2, 1]
    for n in range(1, 60):
        for parts in range(1, 9):
            split = shares(n, parts)
            assert sum(split) == n
            assert max(split) - min(split) <= 1


def answer(
    delays_us: list[int], streams: int, failures: dict[str, int] | None = None
) -> dict[str, Any]:
    return {
        "delays_ns": [d * 1000 for d in delays_us],
        "upstream_late_ns": [1000] * len(delays_us),
        "streams": streams,
        "failures": failures or {},
    }


def test_streams_row_merges_processes_and_rounds_and_subtracts_direct() -> None:
    direct, ws = StreamsTally(), StreamsTally()
    # Two client processes, two rounds: percentiles over every event of every one.
    direct.note([answer([1, 2], 1), answer([3, 4], 1)], 2.0, 0.1, 0.5, [0.2, 0.4])
    direct.note([answer([5, 6], 1), answer([7, 100], 1)], 2.0, 0.1, 0.2, [0.1, 0.1])
    ws.note(
        [answer([10, 20], 1), answer([30, 40], 0, {"status 502": 1})], 1.0, 0.6, 0.1, [0.3, 0.05]
    )
    ws.note([answer([50, 60], 1), answer([70, 1000], 1)], 3.0, 0.2, 0.3, [0.3, 0.3], 2.6, 5.0)
    row = streams_row({"direct": direct, "ws": ws}, client_processes=2)
    d, w = row["direct"], row["ws"]
    assert (d["events"], d["p50_us"], d["p99_us"], d["max_us"]) == (8, 4.0, 100.0, 100.0)
    assert (w["events"], w["p50_us"], w["p99_us"], w["max_us"]) == (8, 40.0, 1000.0, 1000.0)
    assert (d["streams"], d["failures"]) == (4, 0)
    assert (w["streams"], w["failures"], w["failure_reasons"]) == (3, 1, {"status 502": 1})
    assert w["added_p50_us"] == 36.0
    assert w["added_p99_us"] == 900.0
    assert "added_p50_us" not in d
    assert "daemon_cpu_s_per_1k_events" not in d
    # 0.8 CPU seconds over 8 events: 100 s per 1,000; over 4 s of streaming: 20%.
    assert w["daemon_cpu_s_per_1k_events"] == 100.0
    assert w["daemon_cpu_percent"] == 20
    # The busiest process of the worst round; the upstream's worst round.
    assert d["client_cpu_percent_busiest"] == 20
    assert w["client_cpu_percent_busiest"] == 30
    assert d["client_cpu_percent_total"] == 30  # 0.6 s of 2 s, first round
    assert w["client_cpu_percent_total"] == 35  # 0.35 s of 1 s
    assert d["upstream_cpu_percent"] == 25
    assert w["upstream_cpu_percent"] == 10
    assert d["upstream_late_p99_us"] == 1.0
    assert d["client_processes"] == w["client_processes"] == 2
    # 2.6 s busy on the machine, 0.2 + 0.3 + 0.6 of it ours: 1.5 s others' in 5 s.
    assert w["others_cpu_percent"] == 30
    assert d["others_cpu_percent"] == 0  # not measured
