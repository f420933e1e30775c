"""The load client for the benchmarks: its own process, driven over stdin/stdout.

One client measures every path the same way, so that their difference is openclawd's
cost and not a difference between client libraries:

* ``direct`` -- HTTP/1.1 (h11) over TCP to the upstream, with the key in the
  Authorization header, as an app that holds its own key would;
* ``http`` -- the very same HTTP client code over the data socket, to
  ``/v1/http/<provider>/v1/chat/completions``, without a key;
* ``ws`` -- the ``/v1/ws`` channel (wsproto) over the data socket, one request frame in,
  ``response.*`` frames out.

Each client connection keeps one request in flight at a time and stays open (keep-alive)
between requests. A response counts as successful only when it is complete: status 200,
a JSON body that parses (or, streamed, every event through ``[DONE]``), and on ``/v1/ws``
the ``response.end`` frame. Anything else is a failure with a reason, never dropped.

The runner (``bench/runner.py``) sends one JSON command per line on stdin and reads one
JSON answer per line on stdout; see ``Client.handle`` for the commands. Latencies are
``time.perf_counter_ns()`` differences, in nanoseconds.

Timed streams (the ``streams`` scenario): the upstream stamps each event with the
``time.monotonic_ns()`` at which it wrote it; this client takes the same clock
(CLOCK_MONOTONIC, shared by every process on the host) as soon as the bytes that complete
the event are read from the socket. Arrival minus stamp is the event's delay: the
upstream's write, the kernel, the daemon (on a path through it), and this client's own
wait to be scheduled. ``EventDelays`` keeps them.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h11
import trio
import wsproto
import wsproto.events as ws_events

RECEIVE_BYTES = 64 * 1024
CONNECT_CONCURRENCY = 128  # idle connections opened at once


class PeerFailure(Exception):
    """A request did not complete; the message says why (it is the failure's reason)."""


@dataclass
class Outcome:
    """One completed request."""

    latency_ns: int
    first_event_ns: int | None  # streamed: time to the first event
    events: int
    key_version: int | None = None  # /v1/ws tells it in response.end


@dataclass(frozen=True)
class Target:
    """Where a path's requests go."""

    kind: str  # "http" (h11) or "ws" (the /v1/ws channel)
    tcp: tuple[str, int] | None = None
    unix: str | None = None
    path: str = "/v1/chat/completions"
    provider: str = ""
    key: str | None = None  # the direct path only: sent in the Authorization header

    @classmethod
    def of(cls, spec: dict[str, Any]) -> Target:
        tcp = spec.get("tcp")
        return cls(
            kind=spec["kind"],
            tcp=(tcp[0], int(tcp[1])) if tcp else None,
            unix=spec.get("unix"),
            path=spec.get("path", "/v1/chat/completions"),
            provider=spec.get("provider", ""),
            key=spec.get("key"),
        )

    async def connect(self) -> trio.SocketStream:
        if self.unix is not None:
            return await trio.open_unix_socket(self.unix)
        assert self.tcp is not None
        stream = await trio.open_tcp_stream(*self.tcp)
        return stream


def request_body(
    *,
    stream: bool,
    events: int,
    gap_ms: float = 0,
    interval_ms: float = 0,
    offset_ms: float = 0,
    start_ns: int | None = None,
) -> dict[str, Any]:
    """What every path sends. Streamed: ``events`` events; with ``gap_ms`` the upstream
    sends the first at once and the others that much later; with ``interval_ms`` it is a
    timed stream, the first event ``offset_ms`` after the request (or after ``start_ns``,
    a ``time.monotonic_ns()`` value) and one every ``interval_ms``, each stamped
    (bench/upstream.py)."""
    body: dict[str, Any] = {
        "model": "bench",
        "messages": [{"role": "user", "content": "Say a few words."}],
    }
    if stream:
        body["stream"] = True
        body["max_tokens"] = events
        if gap_ms:
            body["bench_gap_ms"] = gap_ms
        if interval_ms:
            body["bench_interval_ms"] = interval_ms
            body["bench_offset_ms"] = offset_ms
            if start_ns is not None:
                body["bench_start_ns"] = start_ns
    return body


_STAMPS = re.compile(r'"bench_sent_ns":(\d+),"bench_due_ns":(\d+)')
_STAMPS_BYTES = re.compile(rb'"bench_sent_ns":(\d+),"bench_due_ns":(\d+)')


@dataclass
class EventDelays:
    """The timed events seen: per event, its delay (arrival minus the upstream's stamp of
    when it wrote it) and how late the upstream wrote it (stamp minus when it was due),
    in nanoseconds. Events without stamps (usage, ``[DONE]``) are not counted."""

    delays_ns: list[int] = field(default_factory=list)
    upstream_late_ns: list[int] = field(default_factory=list)

    def add(self, data: str | bytes, arrival_ns: int) -> bool:
        """Note one event's data (its SSE text, or its ``data`` field), read from the
        socket at ``arrival_ns``; whether it was stamped."""
        found = _STAMPS.search(data) if isinstance(data, str) else _STAMPS_BYTES.search(data)
        if found is None:
            return False
        sent_ns = int(found[1])
        self.delays_ns.append(arrival_ns - sent_ns)
        self.upstream_late_ns.append(sent_ns - int(found[2]))
        return True


class SSECounter:
    """Splits an SSE byte stream into events and counts them; notes ``[DONE]``; hands
    each complete event to ``on_event``, if given."""

    def __init__(self, on_event: Callable[[bytes], object] | None = None) -> None:
        self._pending = b""
        self._on_event = on_event
        self.events = 0
        self.done = False

    def feed(self, data: bytes) -> int:
        """Returns how many events ``data`` completed."""
        parts = (self._pending + data).split(b"\n\n")
        self._pending = parts.pop()
        for part in parts:
            if part.endswith(b"data: [DONE]"):
                self.done = True
            if self._on_event is not None:
                self._on_event(part)
        self.events += len(parts)
        return len(parts)


def _sse_counter(
    head: h11.Response, on_event: Callable[[bytes], object] | None
) -> SSECounter | None:
    """A counter for the events of a streamed response; None for any other."""
    content_type = dict(head.headers).get(b"content-type", b"")
    return SSECounter(on_event) if content_type.startswith(b"text/event-stream") else None


def _http_outcome(
    status: int,
    sse: SSECounter | None,
    parts: list[bytes],
    latency: int,
    first_event_ns: int | None,
) -> Outcome:
    """A complete HTTP response judged: 200, and every event through ``[DONE]`` or a JSON
    body.

    Raises:
        PeerFailure: it was not.
    """
    if status != 200:
        raise PeerFailure(f"status {status}")
    if sse is not None:
        if not sse.done:
            raise PeerFailure("stream ended without [DONE]")
        return Outcome(latency, first_event_ns, sse.events)
    try:
        json.loads(b"".join(parts))
    except ValueError:
        raise PeerFailure("body is not JSON") from None
    return Outcome(latency, None, 0)


class HttpPeer:
    """One keep-alive HTTP/1.1 connection (h11)."""

    def __init__(self, target: Target, stream: trio.SocketStream) -> None:
        self.target = target
        self.stream = stream
        self.http = h11.Connection(h11.CLIENT)
        headers = [("host", "openclawd"), ("content-type", "application/json")]
        if target.key is not None:
            headers.append(("authorization", f"Bearer {target.key}"))
        self._headers = headers

    @classmethod
    async def open(cls, target: Target) -> HttpPeer:
        return cls(target, await target.connect())

    async def request(self, body: bytes, timed: EventDelays | None = None) -> Outcome:
        """One request; streamed and ``timed``, each event's delay noted there."""
        http = self.http
        received_ns = 0
        on_event = None if timed is None else (lambda part: timed.add(part, received_ns))
        started = time.perf_counter_ns()
        head = h11.Request(
            method="POST",
            target=self.target.path,
            headers=[*self._headers, ("content-length", str(len(body)))],
        )
        await self.stream.send_all(
            http.send(head) + http.send(h11.Data(data=body)) + http.send(h11.EndOfMessage())
        )
        status = 0
        sse: SSECounter | None = None
        first_event_ns: int | None = None
        parts: list[bytes] = []
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(RECEIVE_BYTES)
                received_ns = time.monotonic_ns()
                if not data:
                    raise PeerFailure("connection closed mid-response")
                http.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
                sse = _sse_counter(event, on_event)
            elif isinstance(event, h11.Data):
                if sse is not None:
                    if sse.feed(bytes(event.data)) and first_event_ns is None:
                        first_event_ns = time.perf_counter_ns() - started
                else:
                    parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise PeerFailure(f"unexpected {type(event).__name__}")
        latency = time.perf_counter_ns() - started
        if http.our_state is h11.DONE and http.their_state is h11.DONE:
            http.start_next_cycle()
        else:
            await self.aclose()
        return _http_outcome(status, sse, parts, latency, first_event_ns)

    @property
    def usable(self) -> bool:
        return self.http.our_state is h11.IDLE

    async def aclose(self) -> None:
        await self.stream.aclose()


class WsPeer:
    """One /v1/ws channel (wsproto)."""

    def __init__(self, target: Target, stream: trio.SocketStream) -> None:
        self.target = target
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self._ids = itertools.count(1)
        self._messages: list[str] = []
        self._text: list[str] = []
        self.closed = False
        # When the bytes that completed every message in _messages were read: it is read
        # only once they are all taken, so they all came with the last read.
        self.received_ns = 0

    @classmethod
    async def open(cls, target: Target) -> WsPeer:
        peer = cls(target, await target.connect())
        try:
            await peer.stream.send_all(
                peer.ws.send(ws_events.Request(host="openclawd", target="/v1/ws"))
            )
            hello = json.loads(await peer.receive())
            if hello.get("type") != "hello":
                raise PeerFailure(f"expected hello, got {hello.get('type')}")
        except BaseException:
            await peer.aclose()
            raise
        return peer

    async def receive(self) -> str:
        """The next whole text message; answers pings on the way."""
        while not self._messages:
            if self.closed:
                raise PeerFailure("channel closed")
            data = await self.stream.receive_some(RECEIVE_BYTES)
            self.received_ns = time.monotonic_ns()
            if not data:
                self.closed = True
                raise PeerFailure("connection closed")
            self.ws.receive_data(data)
            out = b""
            for event in self.ws.events():
                if isinstance(event, ws_events.TextMessage):
                    self._text.append(event.data)
                    if event.message_finished:
                        self._messages.append("".join(self._text))
                        self._text.clear()
                elif isinstance(event, ws_events.Ping):
                    out += self.ws.send(event.response())
                elif isinstance(event, ws_events.CloseConnection | ws_events.RejectConnection):
                    out += self._ended(event)
            if out:
                await self.stream.send_all(out)
        return self._messages.pop(0)

    def _ended(self, event: ws_events.CloseConnection | ws_events.RejectConnection) -> bytes:
        """The channel closed (a ``closed`` message is queued; returns the close's answer),
        or the handshake was refused.

        Raises:
            PeerFailure: the handshake was refused.
        """
        self.closed = True
        if isinstance(event, ws_events.RejectConnection):
            raise PeerFailure(f"handshake refused: {event.status_code}")
        out = self.ws.send(event.response())
        self._messages.append(
            json.dumps({"type": "closed", "code": event.code, "reason": event.reason})
        )
        return out

    async def request(self, body: bytes, timed: EventDelays | None = None) -> Outcome:
        """One request; streamed and ``timed``, each event's delay noted there."""
        rid = f"r{next(self._ids)}"
        head = f'{{"type":"request","id":"{rid}","provider":"{self.target.provider}",'
        message = head + '"path":"/v1/chat/completions","body":' + body.decode() + "}"
        started = time.perf_counter_ns()
        await self.stream.send_all(self.ws.send(ws_events.TextMessage(data=message)))
        first_event_ns: int | None = None
        events = 0
        done = False
        body_seen = False
        while True:
            frame_ = json.loads(await self.receive())
            kind = frame_.get("type")
            if kind == "response.event":
                events += 1
                if first_event_ns is None:
                    first_event_ns = time.perf_counter_ns() - started
                data = frame_.get("data")
                if data == "[DONE]":
                    done = True
                elif timed is not None and isinstance(data, str):
                    timed.add(data, self.received_ns)
            elif kind == "response.body":
                body_seen = isinstance(frame_.get("body"), dict)
            elif kind == "response.end":
                latency = time.perf_counter_ns() - started
                return _ws_outcome(frame_, latency, first_event_ns, events, done, body_seen)
            elif kind in _FAILING:
                _check(frame_)

    @property
    def usable(self) -> bool:
        return not self.closed

    async def hold(self) -> None:
        """Idle: answer pings until the channel closes or this is cancelled."""
        try:
            while True:
                await self.receive()
        except (PeerFailure, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def aclose(self) -> None:
        await self.stream.aclose()


# The frames of /v1/ws that may end a request in failure, besides a missing [DONE] or body.
_FAILING = frozenset({"response.start", "error", "closed"})


def _check(frame_: dict[str, Any]) -> None:
    """Raises PeerFailure if ``frame_`` (of a kind in ``_FAILING``) ends the request."""
    kind = frame_["type"]
    if kind == "response.start":
        if frame_.get("status") != 200:
            raise PeerFailure(f"status {frame_.get('status')}")
    elif kind == "error":
        raise PeerFailure(f"error {frame_.get('code')}")
    elif kind == "closed":
        raise PeerFailure(f"closed {frame_.get('code')}")


def _ws_outcome(
    end: dict[str, Any],
    latency: int,
    first_event_ns: int | None,
    events: int,
    done: bool,
    body_seen: bool,
) -> Outcome:
    """A request that reached ``response.end`` judged: every event through ``[DONE]``, or
    a JSON body.

    Raises:
        PeerFailure: it was not.
    """
    if events and not done:
        raise PeerFailure("stream ended without [DONE]")
    if not events and not body_seen:
        raise PeerFailure("no JSON body")
    return Outcome(latency, first_event_ns, events, end.get("key_version"))


Peer = HttpPeer | WsPeer


async def open_peer(target: Target) -> Peer:
    if target.kind == "ws":
        return await WsPeer.open(target)
    return await HttpPeer.open(target)


def percentile(samples: list[int], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest-rank method; NaN for no samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(q * len(ordered)))
    return float(ordered[rank - 1])


@dataclass
class LoadTally:
    """What a group of load workers saw."""

    latencies: list[int] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    key_versions: Counter[int] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": len(self.latencies),
            "failures": sum(self.failures.values()),
            "failure_reasons": dict(self.failures.most_common(10)),
            "p50_ns": percentile(self.latencies, 0.50),
            "p99_ns": percentile(self.latencies, 0.99),
            "key_versions": {str(k): v for k, v in sorted(self.key_versions.items())},
        }


class Client:
    """Runs the runner's commands."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.targets: dict[str, Target] = {}
        self.idle: list[WsPeer] = []
        self.idle_scope: trio.CancelScope | None = None
        self._holders: trio.Nursery | None = None
        self.ready: list[Peer] = []  # opened by streams_open, used by streams_go
        self.ready_failures: Counter[str] = Counter()

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        op = command["op"]
        if op == "targets":  # {"targets": {name: spec}}
            self.targets = {name: Target.of(spec) for name, spec in command["targets"].items()}
            return {"ok": True}
        if op == "sequential":
            return await self.sequential(
                self.targets[command["target"]],
                command["n"],
                stream=command.get("stream", False),
                events=command.get("events", 16),
                gap_ms=command.get("gap_ms", 0),
                pause_ms=command.get("pause_ms", 0),
            )
        if op == "load":
            return await self.load(
                {name: int(n) for name, n in command["clients"].items()},
                command["duration_s"],
                stream_events=command.get("stream_events", 0),
                gap_ms=command.get("gap_ms", 0),
            )
        if op == "streams_open":
            return await self.streams_open(self.targets[command["target"]], command["n"])
        if op == "streams_go":
            return await self.streams_go(
                command["events"],
                command["interval_ms"],
                first=command["first"],
                total=command["total"],
                start_ns=command.get("start_ns"),
            )
        if op == "idle":
            return await self.open_idle(self.targets[command["target"]], command["n"])
        if op == "release":
            return await self.release_idle()
        raise ValueError(f"unknown op {op!r}")

    async def sequential(
        self,
        target: Target,
        n: int,
        *,
        stream: bool,
        events: int,
        gap_ms: float = 0,
        pause_ms: float = 0,
    ) -> dict[str, Any]:
        """``n`` requests one after the other on one connection, ``pause_ms`` of quiet
        before each but the first: every latency (and time to first event, streamed), and
        the failures."""
        body = json.dumps(request_body(stream=stream, events=events, gap_ms=gap_ms)).encode()
        latencies: list[int] = []
        first_events: list[int] = []
        events_seen: list[int] = []
        failures: Counter[str] = Counter()
        peer: Peer | None = None
        for index in range(n):
            if pause_ms and index:
                await trio.sleep(pause_ms / 1000)
            try:
                if peer is None or not peer.usable:
                    peer = await open_peer(target)
                outcome = await peer.request(body)
            except (PeerFailure, OSError, trio.BrokenResourceError) as exc:
                failures[str(exc) or type(exc).__name__] += 1
                if peer is not None:
                    await peer.aclose()
                peer = None
                continue
            latencies.append(outcome.latency_ns)
            events_seen.append(outcome.events)
            if outcome.first_event_ns is not None:
                first_events.append(outcome.first_event_ns)
        if peer is not None:
            await peer.aclose()
        return {
            "latency_ns": latencies,
            "first_event_ns": first_events,
            "events": events_seen,
            "failures": dict(failures),
        }

    async def load(
        self,
        clients: dict[str, int],
        duration_s: float,
        *,
        stream_events: int = 0,
        gap_ms: float = 0,
    ) -> dict[str, Any]:
        """For ``duration_s``, ``clients[target]`` workers per target, each with its own
        connection, each sending the next request as soon as the last completed: plain
        ones, or streams of ``stream_events`` events (``gap_ms``: see ``request_body``)."""
        stream = stream_events > 0
        body = json.dumps(request_body(stream=stream, events=stream_events, gap_ms=gap_ms)).encode()
        tallies = {name: LoadTally() for name in clients}
        started = time.perf_counter()

        async def worker(target: Target, tally: LoadTally) -> None:
            peer: Peer | None = None
            try:
                while True:
                    try:
                        if peer is None or not peer.usable:
                            peer = await open_peer(target)
                        outcome = await peer.request(body)
                    except (PeerFailure, OSError, trio.BrokenResourceError) as exc:
                        tally.failures[str(exc) or type(exc).__name__] += 1
                        if peer is not None:
                            await peer.aclose()
                        peer = None
                        await trio.sleep(0.01)  # a failure is not a busy loop
                        continue
                    tally.latencies.append(outcome.latency_ns)
                    if outcome.key_version is not None:
                        tally.key_versions[outcome.key_version] += 1
            finally:
                if peer is not None:
                    with trio.CancelScope(shield=True):
                        await peer.aclose()

        with trio.move_on_after(duration_s):
            async with trio.open_nursery() as nursery:
                for name, count in clients.items():
                    for _ in range(count):
                        nursery.start_soon(worker, self.targets[name], tallies[name])
        elapsed = time.perf_counter() - started
        return {
            "seconds": elapsed,
            "targets": {name: tally.summary() for name, tally in tallies.items()},
        }

    async def streams_open(self, target: Target, n: int) -> dict[str, Any]:
        """Open ``n`` connections (on /v1/ws, hello received) for ``streams_go``."""
        limit = trio.Semaphore(CONNECT_CONCURRENCY)

        async def open_one() -> None:
            async with limit:
                try:
                    self.ready.append(await open_peer(target))
                except (PeerFailure, OSError, trio.BrokenResourceError) as exc:
                    self.ready_failures[str(exc) or type(exc).__name__] += 1

        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(open_one)
        return {"open": len(self.ready), "failures": dict(self.ready_failures)}

    async def streams_go(
        self,
        events: int,
        interval_ms: float,
        *,
        first: int,
        total: int,
        start_ns: int | None = None,
    ) -> dict[str, Any]:
        """One timed stream on each connection ``streams_open`` opened, all sent at once:
        ``events`` events, one every ``interval_ms``; the stream on the ``i``-th connection
        is stream ``first + i`` of ``total`` (in every client process), and its events are
        due ``interval_ms * (first + i) / total`` ms later than the first stream's, so that
        the ``total`` streams' events are spread evenly over each interval, not written in
        one burst; with ``start_ns`` (``time.monotonic_ns()``) every stream's schedule
        starts then, not when its request reaches the upstream. Every event's delay and
        the upstream's lateness (``EventDelays``, in ns), and the streams that did not
        complete, with their reasons. The connections are closed afterwards."""
        peers, self.ready = self.ready, []
        failures, self.ready_failures = self.ready_failures, Counter()
        timed = EventDelays()
        complete = 0
        started = time.perf_counter()

        async def one(index: int, peer: Peer) -> None:
            nonlocal complete
            offset_ms = round(interval_ms * (first + index) / max(1, total), 3)
            body = request_body(
                stream=True,
                events=events,
                interval_ms=interval_ms,
                offset_ms=offset_ms,
                start_ns=start_ns,
            )
            try:
                outcome = await peer.request(json.dumps(body).encode(), timed)
            except (PeerFailure, OSError, trio.BrokenResourceError) as exc:
                failures[str(exc) or type(exc).__name__] += 1
                return
            if outcome.events < events:
                failures[f"{outcome.events} events of {events}"] += 1
                return
            complete += 1

        try:
            async with trio.open_nursery() as nursery:
                for index, peer in enumerate(peers):
                    nursery.start_soon(one, index, peer)
        finally:
            with trio.CancelScope(shield=True):
                for peer in peers:
                    await peer.aclose()
        return {
            "streams": complete,
            "failures": dict(failures),
            "seconds": time.perf_counter() - started,
            "delays_ns": timed.delays_ns,
            "upstream_late_ns": timed.upstream_late_ns,
        }

    async def open_idle(self, target: Target, n: int) -> dict[str, Any]:
        """Open ``n`` more /v1/ws channels (hello received) and keep them open, idle,
        answering pings, until ``release``."""
        started = time.perf_counter()
        failures: Counter[str] = Counter()
        limit = trio.Semaphore(CONNECT_CONCURRENCY)
        if self.idle_scope is None:
            self.idle_scope = trio.CancelScope()
            self._holders = await self.nursery.start(self._hold_all, self.idle_scope)

        async def open_one() -> None:
            async with limit:
                try:
                    peer = await WsPeer.open(target)
                except (PeerFailure, OSError, trio.BrokenResourceError) as exc:
                    failures[str(exc) or type(exc).__name__] += 1
                    return
                self.idle.append(peer)
                assert self._holders is not None
                self._holders.start_soon(peer.hold)

        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(open_one)
        return {
            "open": len(self.idle),
            "seconds": time.perf_counter() - started,
            "failures": dict(failures),
        }

    async def _hold_all(
        self,
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[trio.Nursery] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with scope:
            async with trio.open_nursery() as holders:
                task_status.started(holders)
                await trio.sleep_forever()

    async def release_idle(self) -> dict[str, Any]:
        closed = len(self.idle)
        if self.idle_scope is not None:
            self.idle_scope.cancel()
            self.idle_scope = None
        for peer in self.idle:
            await peer.aclose()
        self.idle.clear()
        return {"closed": closed}


async def serve() -> None:
    """Read commands from stdin until it closes; answer each on stdout."""
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    stdout = trio.lowlevel.FdStream(os.dup(sys.stdout.fileno()))
    async with trio.open_nursery() as nursery:
        client = Client(nursery)
        pending = b""
        while True:
            data = await stdin.receive_some(RECEIVE_BYTES)
            if not data:
                break
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                try:
                    answer = await client.handle(json.loads(line))
                except Exception as exc:  # reported to the runner, which stops
                    answer = {"error": f"{type(exc).__name__}: {exc}"}
                await stdout.send_all(json.dumps(answer).encode() + b"\n")
        await client.release_idle()
        nursery.cancel_scope.cancel()


def main() -> int:
    trio.run(serve)
    return 0


if __name__ == "__main__":
    sys.exit(main())
