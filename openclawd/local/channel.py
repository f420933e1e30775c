"""The /v1/ws request channel: the driver between an app's WebSocket and the upstreams.

A thin loop after STYLE 6: receive a message, let the sans-IO ``Session`` decide, perform
the action. Each request runs in its own task in the connection's nursery, under its own
cancel scope (the app's ``cancel``), relays the upstream response as frames, and counts as
in-flight work for a drain. Every frame goes out through trio-websocket's send, which
waits while the app reads slowly; the request's task then stops reading its upstream, so
a slow app slows its upstream instead of filling memory. A keepalive task pings the app
and ends the channel when it stops answering. When the app leaves, the connection's
nursery is cancelled and with it every upstream request it had open.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from openclawd import __version__, logs, websocket
from openclawd.clients import identify
from openclawd.config import ClientConfig, Config
from openclawd.errors import (
    MessageTooBigError,
    OpenclawdError,
    PeerTimeoutError,
    RateLimitedError,
    UnfinishedMessageError,
)
from openclawd.lifecycle import Lifecycle
from openclawd.local.http11 import Connection
from openclawd.local.outbox import Outbox
from openclawd.protocol import messages
from openclawd.protocol.exchange import Admission, Ask, Exchange, provider_limits
from openclawd.protocol.limits import Charge, utc_day
from openclawd.protocol.messages import Request
from openclawd.protocol.session import Abort, Send, Session, Start
from openclawd.protocol.usage import estimate_tokens
from openclawd.tracing import NO_TRACER, OFF, Trace, Tracer
from openclawd.upstream.http import UpstreamRequest, UpstreamResponse, Upstreams
from openclawd.upstream.routes import Candidate, TakeLimits, open_route, rewrite_model
from openclawd.websocket import ConnectionClosed, WebSocketConnection

log = logs.get(__name__)

# A non-streaming body is sent as one frame, so it is read whole: at most this much.
MAX_BODY_BYTES = 64 * 1024 * 1024
# A single SSE event is held whole before it is relayed: at most this much.
MAX_EVENT_BYTES = 16 * 1024 * 1024

# Upstream response headers an app is shown in response.start.
_SHOWN_HEADERS = frozenset({"content-type", "retry-after", "request-id", "x-request-id"})
_SHOWN_PREFIXES = ("x-ratelimit-", "openai-", "anthropic-")


def shown_headers(headers: list[tuple[str, str]]) -> dict[str, str]:
    """The upstream headers that matter to apps: content type, request ids, rate limits."""
    shown: dict[str, str] = {}
    for name, value in headers:
        if name in _SHOWN_HEADERS or name.startswith(_SHOWN_PREFIXES):
            shown[name] = f"{shown[name]}, {value}" if name in shown else value
    return shown


class Channels:
    """Serves /v1/ws connections; shared by all of them."""

    def __init__(
        self,
        config: Config,
        upstreams: Upstreams,
        lifecycle: Lifecycle,
        admission: Admission,
        tracer: Tracer = NO_TRACER,
    ) -> None:
        self.upstreams = upstreams
        self.lifecycle = lifecycle
        self.admission = admission
        self.tracer = tracer
        self.configure(config)
        self.inflight = 0

    def configure(self, config: Config) -> None:
        """Take a (reloaded) config; open channels keep the limits they started with."""
        self.config = config
        self.refused_headers = {
            name: frozenset({provider.auth_header.lower()})
            for name, provider in config.providers.items()
        }
        for name, route in config.routes.items():  # a route refuses what its providers do
            self.refused_headers[name] = frozenset(
                config.providers[p].auth_header.lower() for p in route.providers
            )

    async def serve(self, conn: Connection, ws: WebSocketConnection) -> None:
        """Run one channel until the app leaves or the keepalive gives up on it."""
        listen = self.config.listen
        channel = _Channel(
            conn, ws, Session(self.refused_headers, listen.max_inflight_per_connection)
        )
        channel.client = identify(conn.peer, self.config.clients)
        logs.client_name.set(channel.client.name)
        await ws.send_message(
            messages.hello(
                __version__,
                sorted(self.refused_headers),
                listen.max_message_bytes,
                listen.max_inflight_per_connection,
            )
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.outbox.run)
            nursery.start_soon(self._keepalive, channel, nursery.cancel_scope)
            try:
                with contextlib.suppress(
                    ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError
                ):
                    await self._read_frames(channel, nursery)
                    # Returned: a message over the limit (a failure, below).
                if channel.failure is None:
                    channel.ending = channel.ending or "app gone"
            finally:
                # The app is gone, or the daemon cuts the channel: a frame half written is
                # finished (bounded), and nothing the app asked for goes on upstream.
                if channel.failure is not None:
                    channel.ending = str(channel.failure)
                elif channel.ending is None:
                    channel.ending = _cut_reason(channel.conn)
                channel.sender.stop()
                nursery.cancel_scope.cancel()
        if channel.failure is not None:
            raise channel.failure

    async def _read_frames(self, channel: _Channel, nursery: trio.Nursery) -> None:
        session = channel.session
        while True:
            message = await channel.ws.get_message()
            channel.activity.touch()
            limit = self.config.listen.max_message_bytes
            if websocket.over_limit(message, limit):
                channel.failure = MessageTooBigError(f"message over max_message_bytes ({limit})")
                return
            action = session.receive(message)
            if isinstance(action, Send):
                await channel.send(action.text)
            elif isinstance(action, Abort):
                channel.scopes[action.id].cancel()
            elif isinstance(action, Start):
                await self._start(channel, nursery, action.request)

    async def _start(self, channel: _Channel, nursery: trio.Nursery, request: Request) -> None:
        """Admit a request (or send its refusal) and start it in its own task."""
        rid = request.id
        model = request.body.get("model") if isinstance(request.body, dict) else None
        client = channel.client.name if channel.client is not None else None
        trace = self.tracer.request(
            "ws", request.provider, request.path, model, client, request.headers
        )
        try:
            ask = self._ask(channel, request)
            charge = await self.admission.admit_request_waiting(ask, trio.current_time)
        except OpenclawdError as refusal:
            trace.end(refusal.code)
            channel.session.finish(rid)
            await channel.send(_error_frame(rid, refusal))
            return
        scope = channel.scopes[rid] = trio.CancelScope()
        # In flight from here: a drain that starts before the task runs waits for it. The
        # task ends the count.
        self.lifecycle.work.begin()
        nursery.start_soon(self._request, channel, request, scope, charge, trace)

    def _ask(self, channel: _Channel, request: Request) -> Ask:
        """What admission needs to know of a request: who, where, which model, how many
        tokens (estimated only when a limit counts them)."""
        tokens = 0
        limits = self.admission.limits
        if limits is not None and limits.counts_tokens:
            body = messages.encode_body(request.body) if request.has_body else b""
            tokens = estimate_tokens(body, self.config.limits.default_completion_tokens)
        model = request.body.get("model") if isinstance(request.body, dict) else None
        day, into_day = utc_day(time.time())
        uid = channel.conn.peer.uid
        return Ask(uid, channel.client, request.provider, model, tokens, day, into_day)

    async def _request(
        self,
        channel: _Channel,
        request: Request,
        scope: trio.CancelScope,
        charge: Charge | None,
        trace: Trace,
    ) -> None:
        """One request, start to last frame. ``scope`` is the app's ``cancel``; it only
        ever interrupts the upstream side or the queueing of a frame, never a write. The
        request was counted as work when it was accepted; this ends the count, and settles
        what admission charged it."""
        rid = request.id
        exchange = Exchange(answers_after_head=True)
        exchange.charge = charge

        async def finish(text: str) -> None:
            # The id is free before the last frame is queued: the app may reuse it as soon
            # as it reads that frame. Queued whatever happens next (a cancel, the total
            # deadline): after this, nothing more is sent for the id.
            exchange.finished()
            channel.session.finish(rid)
            with trio.CancelScope(shield=True):
                # Still in-flight work until written: a drain must not cut it off queued.
                await channel.send_last(text)

        self.inflight += 1
        try:
            with scope:
                try:
                    admission = self.admission
                    limits = provider_limits(exchange, admission.limits, _clock, admission.top_up)
                    await relay(
                        self.upstreams, request, exchange, channel.send, finish, limits, trace
                    )
                except OpenclawdError as exc:
                    exchange.fail(exc)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    raise  # the writer is gone: so is the app (below)
                except Exception:
                    log.exception("request.internal_error", request_id=rid)
                    exchange.fail(OpenclawdError("internal error"))
            await _tell_the_end(rid, exchange, scope.cancelled_caught, finish)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The writer is gone, before the channel's reader may have seen the app go:
            # an app leaving is normal, not an error of ours.
            channel.ending = channel.ending or "app gone"
        finally:
            self.inflight -= 1
            self.lifecycle.work.end()
            exchange.settle(trio.current_time(), utc_day(time.time())[0])
            if not exchange.ended:
                # Left behind: the app went, or the daemon cut the channel (the
                # connection's cancel ended the request, and why is the channel's).
                exchange.left(channel.ending or "cut", cut=channel.ending != "app gone")
                log.info("request.cancelled", request_id=rid, reason=exchange.reason)
                # Only then: else the id may already belong to the app's next request.
                channel.session.finish(rid)
            if channel.scopes.get(rid) is scope:
                del channel.scopes[rid]
            trace.finish(exchange)

    async def _keepalive(self, channel: _Channel, connection: trio.CancelScope) -> None:
        """Ping a peer that has been quiet for ``ping_interval_s``; if it does not answer
        within ``ping_timeout_s``, end the channel (``serve`` raises ``PeerTimeoutError``
        and the front door closes with its close code, 1011). So too for a message left
        unfinished for ``message_timeout_s`` (``UnfinishedMessageError``, 1008)."""
        listen = self.config.listen
        verdict = await websocket.watch(
            channel.ws,
            channel.activity,
            interval_s=listen.ping_interval_s,
            timeout_s=listen.ping_timeout_s,
        )
        if verdict == "silent":
            log.info("connection.ping_timeout", timeout_s=listen.ping_timeout_s)
            channel.failure = PeerTimeoutError(f"no pong within {listen.ping_timeout_s:g}s")
            connection.cancel()
        elif verdict == "unfinished":
            log.info("connection.message_timeout", timeout_s=listen.message_timeout_s)
            channel.failure = UnfinishedMessageError.of("message", listen.message_timeout_s)
            connection.cancel()


class _Channel:
    """The state of one open /v1/ws channel, shared by its tasks."""

    def __init__(self, conn: Connection, ws: WebSocketConnection, session: Session) -> None:
        self.conn = conn
        self.ws = ws
        self.sender = websocket.Sender(ws, conn.wire)
        self.session = session
        self.activity = conn.activity or websocket.Activity()
        self.scopes: dict[str, trio.CancelScope] = {}
        self.client: ClientConfig | None = None  # who is calling (CONTRACT.md 5.1)
        self.failure: OpenclawdError | None = None  # what ended the channel, if not the app
        # Why the channel ended, for the requests it leaves behind: "app gone", the
        # failure, or the daemon's cut. None while it runs.
        self.ending: str | None = None
        # The frames for the app: whole, in order, and a slow app holds up its requests'
        # upstream reads, not memory (local/outbox.py).
        self.outbox = Outbox(self.sender)

    async def send(self, *texts: str) -> None:
        """Frames for the app, in order (waits while too many are queued).

        Raises:
            trio.BrokenResourceError: the app is gone.
        """
        await self.outbox.send(texts)

    async def send_last(self, text: str) -> None:
        """A request's last frame; returns once it is written (or the app is gone)."""
        await self.outbox.send_last(text)


async def _tell_the_end(
    rid: str, exchange: Exchange, cancelled: bool, finish: Callable[[str], Awaitable[None]]
) -> None:
    """The last frame a request that did not finish is owed: ``cancelled`` after the app's
    cancel, else its error's; an error after its end is only logged."""
    if cancelled and exchange.cancelled():
        log.info("request.cancelled", request_id=rid, reason="cancel frame")
        await finish(messages.error(rid, "cancelled", "cancelled by the app"))
    elif exchange.late_error is not None:  # e.g. the deadline, once the end was queued
        log.info("request.late_error", request_id=rid, error=str(exchange.late_error))
    elif exchange.error is not None and not exchange.ended:
        exchange.answered()
        await finish(_error_frame(rid, exchange.error))


def _clock() -> tuple[float, int, float]:
    return (trio.current_time(), *utc_day(time.time()))


def _cut_reason(conn: Connection) -> str:
    """Why the daemon cut a channel (its connection's cancel came from outside)."""
    why = conn.cutter.why
    return why.reason if why is not None else "connection cut"


def _error_frame(rid: str | None, exc: OpenclawdError) -> str:
    retry_after = exc.retry_after_s if isinstance(exc, RateLimitedError) else None
    return messages.error(rid, exc.code, str(exc), retry_after)


async def relay(
    upstreams: Upstreams,
    request: Request,
    exchange: Exchange,
    send: Callable[[str], Any],
    finish: Callable[[str], Any],
    take_limits: TakeLimits | None = None,
    trace: Trace = OFF,
) -> None:
    """Send ``request`` upstream and relay the response as frames (CONTRACT.md 3.1).

    ``send`` takes every frame but the last, ``finish`` the last (``response.end``).
    Raises:
        OpenclawdError: no response to relay, or the upstream failed after
            ``response.start`` (the caller ends the request with an ``error`` frame).
        trio.BrokenResourceError: the app left (the channel's writer is gone).
    """
    rid = request.id
    headers = list(request.headers)
    if request.has_body and not any(name == "content-type" for name, _ in headers):
        headers.append(("content-type", "application/json"))

    def request_for(candidate: Candidate) -> UpstreamRequest:
        content = None
        if request.has_body:
            content = messages.encode_body(rewrite_model(request.body, candidate.models))
        return UpstreamRequest(request.method, request.path, tuple(headers), content, trace)

    opened = open_route(upstreams, request.provider, request_for, take_limits)
    async with opened as (provider, response):
        await send(messages.response_start(rid, response.status, shown_headers(response.headers)))
        exchange.responded(response.status)
        if response.is_event_stream:
            async with contextlib.aclosing(response.events(MAX_EVENT_BYTES)) as reads:
                async for events in reads:  # those one upstream read brought, sent together
                    await send(*[messages.response_event(rid, e.event, e.data) for e in events])
        else:
            body = _body_of(response, await response.read(MAX_BODY_BYTES))
            await send(messages.response_body(rid, body))
        exchange.usage = response.usage
        exchange.response_model = response.model
        version, attempts, usage = response.key.version, response.attempts, response.usage
        await finish(messages.response_end(rid, version, attempts, usage, provider))


def _body_of(response: UpstreamResponse, raw: bytes) -> Any:
    """A whole body as ``response.body`` carries it: JSON parsed, else text."""
    text = raw.decode("utf-8", "replace")
    if "json" in (response.header("content-type") or "").lower():
        try:
            return json.loads(text)
        except (ValueError, RecursionError):  # relayed as the text it is
            return text
    return text
