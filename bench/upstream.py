"""A fast OpenAI-shaped upstream for the benchmarks: its own process, loopback only.

The tests' fake upstream (``tests/fake_upstream.py``) records every request and can be
scripted to misbehave; that costs time on every request. This one does as little as an
upstream can, so that what a benchmark measures is the client and openclawd, not it:
stdlib asyncio, a small HTTP/1.1 parser for the requests openclawd and the load client
send (Content-Length bodies, keep-alive), and responses rendered once and cached.

Routes:

* ``POST /v1/chat/completions`` -- ``{"stream": false}``: a JSON completion with usage;
  ``{"stream": true, "max_tokens": N}``: N SSE chunk events (one HTTP chunk each, all
  written at once, as fast as the reader takes them), a usage event, and ``[DONE]``.
  With ``"bench_gap_ms": G`` the head and the first event go at once and the rest G ms
  later, as a model's first token comes before the others: the time to the first event
  is then that of the first event alone, not of a burst.
  With ``"bench_interval_ms": I`` (and ``"bench_offset_ms": O``, default 0) it is a *timed*
  stream: the head at once, event ``k`` due ``O + k * I`` ms after the request was read
  (or after ``"bench_start_ns"``, a ``time.monotonic_ns()`` value, if given: streams
  requested at different times then run on one schedule), each stamped as it is written
  with ``"bench_sent_ns"`` (``time.monotonic_ns()``: CLOCK_MONOTONIC, comparable across
  processes on one host) and ``"bench_due_ns"`` (when it was due; sent minus due is how
  late this upstream was), then usage and ``[DONE]`` right after the last. The load
  client takes its own clock on arrival: the difference is the delay of everything
  between (``bench/client.py``).
* ``POST /_bench/keys`` -- ``{"accept": [KEY, ...]}``: the keys it accepts from now on
  (``Authorization: Bearer KEY``). A request with any other key gets an OpenAI-shaped 401.
* ``GET /_bench/stats`` -- per key fingerprint: requests accepted and the
  ``time.monotonic()`` of the first (CLOCK_MONOTONIC: comparable across processes on one
  host); and the number of 401s. Keys never appear in it.
* ``POST /_bench/arrivals`` -- ``{"record": true}``: from now on note the
  ``time.monotonic()`` of every accepted completion request, per key fingerprint (the
  earlier notes are dropped); ``false`` stops it. Off by default: then a request costs one
  attribute test more. ``GET /_bench/arrivals``: ``{"arrivals": {FINGERPRINT: [T, ...]}}``
  (``bench/fleet_runner.py`` counts them per minute window).

It prints ``{"port": N}`` on stdout once it listens, and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from functools import cache
from typing import Any

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_STREAM_EVENTS = 1_000_000
MAX_TIMED_MS = 60_000.0
MAX_START_AHEAD_NS = 60 * 10**9

_COMPLETION = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 0,
    "model": "bench",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "A benchmark answer of a few words."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17},
}
_USAGE_EVENT = {
    "id": "chatcmpl-bench",
    "object": "chat.completion.chunk",
    "created": 0,
    "model": "bench",
    "choices": [],
    "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
}


def fingerprint(key: str) -> str:
    """How the daemon names a key: ``sha256:`` and 12 hex digits."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _response(status: int, reason: str, content_type: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\nx-request-id: req-bench\r\n"
        "x-ratelimit-remaining-requests: 9999\r\n\r\n"
    ).encode() + body


def _error(status: int, reason: str, message: str, code: str) -> bytes:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    return _response(status, reason, "application/json", _json(body))


@cache
def completion() -> bytes:
    return _response(200, "OK", "application/json", _json(_COMPLETION))


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@cache
def stream(events: int) -> bytes:
    """The whole streamed response: head, ``events`` content events (one HTTP chunk
    each), the usage event, ``[DONE]``, and the end of the chunked body."""
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\nx-request-id: req-bench\r\n\r\n"
    )
    parts = [head]
    for index in range(events):
        event = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "bench",
            "choices": [{"index": 0, "delta": {"content": f"w{index}"}, "finish_reason": None}],
        }
        parts.append(_chunk(b"data: " + _json(event) + b"\n\n"))
    parts.append(_chunk(b"data: " + _json(_USAGE_EVENT) + b"\n\n"))
    parts.append(_chunk(b"data: [DONE]\n\n"))
    parts.append(b"0\r\n\r\n")
    return b"".join(parts)


@cache
def stream_parts(events: int) -> tuple[bytes, bytes]:
    """``stream(events)`` cut after its first event: what a model sends first, the rest."""
    whole = stream(events)
    first = whole.index(b"\n\n\r\n") + 4  # the end of the first event's chunk
    return whole[:first], whole[first:]


_TIMED_EVENT = (
    '{{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":0,"model":"bench",'
    '"choices":[{{"index":0,"delta":{{"content":"w{index}"}},"finish_reason":null}}],'
    '"bench_sent_ns":{sent_ns},"bench_due_ns":{due_ns}}}'
)
_TIMED_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"transfer-encoding: chunked\r\nx-request-id: req-bench\r\n\r\n"
)


def timed_event(index: int, sent_ns: int, due_ns: int) -> bytes:
    """Event ``index`` of a timed stream as one HTTP chunk, stamped with when it was written
    and when it was due (``time.monotonic_ns()`` values)."""
    data = _TIMED_EVENT.format(index=index, sent_ns=sent_ns, due_ns=due_ns)
    return _chunk(b"data: " + data.encode() + b"\n\n")


@cache
def timed_end() -> bytes:
    """What follows a timed stream's last event: usage, ``[DONE]``, the end of the body."""
    usage = _chunk(b"data: " + _json(_USAGE_EVENT) + b"\n\n")
    return usage + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


@dataclass(frozen=True)
class Timed:
    """A timed stream to write: ``events`` events, the first ``offset_s`` after the
    request, then one every ``interval_s``."""

    events: int
    interval_s: float
    offset_s: float
    start_s: float | None = None  # loop time (time.monotonic()); None: when requested


@dataclass
class Keys:
    """The keys accepted, and what was seen of each (by fingerprint)."""

    accepted: set[str] = field(default_factory=set)
    requests: dict[str, int] = field(default_factory=dict)
    first_seen: dict[str, float] = field(default_factory=dict)
    refused: int = 0
    recording: bool = False  # note every accepted request's arrival in ``arrivals``
    arrivals: dict[str, list[float]] = field(default_factory=dict)

    def admit(self, authorization: bytes | None) -> bool:
        if authorization is None or not authorization.startswith(b"Bearer "):
            self.refused += 1
            return False
        key = authorization[7:].decode("latin-1")
        if key not in self.accepted:
            self.refused += 1
            return False
        name = fingerprint(key)
        if name not in self.requests:
            self.requests[name] = 0
            self.first_seen[name] = time.monotonic()
        self.requests[name] += 1
        if self.recording:
            self.arrivals.setdefault(name, []).append(time.monotonic())
        return True

    def record(self, on: bool) -> None:
        """Start (dropping what was noted) or stop noting arrivals."""
        if on:
            self.arrivals = {}
        self.recording = on

    def stats(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "first_seen": self.first_seen,
            "refused": self.refused,
        }


class BadRequest(Exception):
    """The bytes are not a request this server reads; the connection is closed."""


def _body_length(headers: dict[bytes, bytes]) -> int:
    """The length of the request body the head announces.

    Raises:
        BadRequest: a chunked body, or a content-length that is not a number or too large.
    """
    if b"transfer-encoding" in headers:
        raise BadRequest("chunked request bodies are not read here")
    try:
        length = int(headers.get(b"content-length", b"0"))
    except ValueError:
        raise BadRequest("bad content-length") from None
    if not 0 <= length <= MAX_BODY_BYTES:
        raise BadRequest("body too large")
    return length


class HttpProtocol(asyncio.Protocol):
    """One connection: requests parsed from the buffer as they complete, answered in order."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.delayed = False  # the rest of a response is still to be written

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._serve()

    def _write_rest(self, rest: bytes) -> None:
        assert self.transport is not None
        self.delayed = False
        if not self.transport.is_closing():
            self.transport.write(rest)
            self._serve()  # a request that came meanwhile

    def _serve(self) -> None:
        try:
            while not self.delayed and self._one():
                pass
        except BadRequest as exc:
            assert self.transport is not None
            self.transport.write(_error(400, "Bad Request", str(exc), "bad_request"))
            self.transport.close()

    def _one(self) -> bool:
        """Answer the request at the start of the buffer, if it is all there."""
        end = self.buffer.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
        if end < 0:
            if len(self.buffer) > MAX_HEAD_BYTES:  # however much of it has come
                raise BadRequest("request head too large")
            return False
        lines = bytes(self.buffer[:end]).split(b"\r\n")
        try:
            method, target, _version = lines[0].split(b" ", 2)
        except ValueError:
            raise BadRequest("malformed request line") from None
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise BadRequest("malformed header line")
            headers[name.strip().lower()] = value.strip()
        length = _body_length(headers)
        start = end + 4
        if len(self.buffer) < start + length:
            return False
        body = bytes(self.buffer[start : start + length])
        del self.buffer[: start + length]
        assert self.transport is not None
        response = self._respond(method, target, headers, body)
        if isinstance(response, Timed):
            self.delayed = True
            self.transport.write(_TIMED_HEAD)
            loop = asyncio.get_running_loop()
            begun = loop.time() if response.start_s is None else response.start_s
            loop.call_at(begun + response.offset_s, self._timed, response, begun, 0)
            return False
        answer, rest, gap_s = response if isinstance(response, tuple) else (response, b"", 0.0)
        self.transport.write(answer)
        if rest:
            self.delayed = True
            asyncio.get_running_loop().call_later(gap_s, self._write_rest, rest)
            return False
        if headers.get(b"connection", b"").lower() == b"close":
            self.transport.close()
            return False
        return True

    def _timed(self, timed: Timed, start: float, index: int) -> None:
        """Write event ``index`` of ``timed`` (a stream begun at loop time ``start``), then
        schedule the next, or end the stream. Each event's due time is reckoned from
        ``start``, so a late one does not push back those after it."""
        assert self.transport is not None
        if self.transport.is_closing():
            return
        due = start + timed.offset_s + index * timed.interval_s
        self.transport.write(timed_event(index, time.monotonic_ns(), round(due * 1e9)))
        if index + 1 < timed.events:
            next_due = due + timed.interval_s
            asyncio.get_running_loop().call_at(next_due, self._timed, timed, start, index + 1)
        else:
            self._write_rest(timed_end())

    def _respond(
        self, method: bytes, target: bytes, headers: dict[bytes, bytes], body: bytes
    ) -> bytes | tuple[bytes, bytes, float] | Timed:
        path = target.split(b"?", 1)[0]
        if path == b"/v1/chat/completions" and method == b"POST":
            if not self.keys.admit(headers.get(b"authorization")):
                return _error(401, "Unauthorized", "Incorrect API key provided.", "invalid_api_key")
            try:
                request = json.loads(body)
            except ValueError:
                return _error(400, "Bad Request", "the body is not JSON", "bad_json")
            if not isinstance(request, dict):
                return _error(400, "Bad Request", "the body is not an object", "bad_json")
            if request.get("stream") is True:
                return _streamed(request)
            return completion()
        if path.startswith(b"/_bench/"):
            return _bench_route(self.keys, method, path, body)
        return _error(404, "Not Found", "no such route", "not_found")


def _bench_route(keys: Keys, method: bytes, path: bytes, body: bytes) -> bytes:
    """The benchmarks' own routes (``/_bench/...``)."""
    if path == b"/_bench/keys" and method == b"POST":
        try:
            accept = json.loads(body)["accept"]
        except (ValueError, KeyError, TypeError):
            return _error(400, "Bad Request", 'expected {"accept": [...]}', "bad_json")
        keys.accepted = {str(key) for key in accept}
        return _response(200, "OK", "application/json", b"{}")
    if path == b"/_bench/stats" and method == b"GET":
        return _response(200, "OK", "application/json", _json(keys.stats()))
    if path == b"/_bench/arrivals" and method == b"POST":
        try:
            on = json.loads(body)["record"]
        except (ValueError, KeyError, TypeError):
            on = None
        if not isinstance(on, bool):
            return _error(400, "Bad Request", 'expected {"record": BOOL}', "bad_json")
        keys.record(on)
        return _response(200, "OK", "application/json", b"{}")
    if path == b"/_bench/arrivals" and method == b"GET":
        return _response(200, "OK", "application/json", _json({"arrivals": keys.arrivals}))
    return _error(404, "Not Found", "no such route", "not_found")


def _streamed(request: dict[str, Any]) -> bytes | tuple[bytes, bytes, float] | Timed:
    """The answer to a streamed completion request: the whole stream, its first event and
    the rest ``bench_gap_ms`` later, or a timed stream (``bench_interval_ms``)."""
    events = request.get("max_tokens", 16)
    if type(events) is not int or not 0 <= events <= MAX_STREAM_EVENTS:
        return _error(400, "Bad Request", "bad max_tokens", "bad_max_tokens")
    gap_ms = request.get("bench_gap_ms", 0)
    if type(gap_ms) not in (int, float) or not 0 <= gap_ms <= 60_000:
        return _error(400, "Bad Request", "bad bench_gap_ms", "bad_gap")
    interval_ms = request.get("bench_interval_ms", 0)
    offset_ms = request.get("bench_offset_ms", 0)
    for value in (interval_ms, offset_ms):
        if type(value) not in (int, float) or not 0 <= value <= MAX_TIMED_MS:
            return _error(400, "Bad Request", "bad bench timing", "bad_timing")
    start_ns = request.get("bench_start_ns")
    if start_ns is not None and (
        type(start_ns) is not int or abs(start_ns - time.monotonic_ns()) > MAX_START_AHEAD_NS
    ):
        return _error(400, "Bad Request", "bad bench_start_ns", "bad_timing")
    if interval_ms and events:
        start_s = None if start_ns is None else start_ns / 1e9
        return Timed(events, interval_ms / 1000, offset_ms / 1000, start_s)
    if gap_ms and events:
        return (*stream_parts(events), gap_ms / 1000)
    return stream(events)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    keys = Keys()
    server = await loop.create_server(lambda: HttpProtocol(keys), host, port, backlog=1024)
    stopped = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    bound = server.sockets[0].getsockname()[1]
    print(json.dumps({"port": bound}), flush=True)
    async with server:
        await stopped.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
