"""/v1/http/{provider}/{path}: plain HTTP passthrough, so existing clients work unchanged.

The driver of one passthrough request (CONTRACT.md 3.3): the app's request goes to the
provider's ``base_url`` + ``/`` + path + query, minus hop-by-hop and credential headers,
with the key added by the upstream pool (which also retries and follows a rotated key, as
for /v1/ws). The response streams back as it arrives: status, headers minus hop-by-hop,
and the body exactly as sent (content-encoding kept, SSE included), one chunk at a time,
so a slow app slows its upstream read. A request body up to ``REPLAYABLE_BYTES`` is held so
a retry can send it again; a larger one is streamed through and never retried. Failures
before the response head are answered with the contract's JSON error; after it, the
connection is cut so the app sees a truncated response, never a silently short one.
The token usage of a response (a JSON body's or an SSE stream's ``usage``) is read on the
side as the bytes pass, for the metrics; the bytes themselves are not changed.
Knows nothing of WebSockets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass

import h11
import trio

from openclawd import logs
from openclawd.clients import identify
from openclawd.config import Config
from openclawd.errors import (
    ClientError,
    OpenclawdError,
    UnknownProviderError,
)
from openclawd.lifecycle import Lifecycle
from openclawd.local.appbody import AppBody, watch_for_leaving
from openclawd.local.http11 import Connection, reason_phrase
from openclawd.protocol.exchange import Admission, Ask, Exchange, provider_limits
from openclawd.protocol.limits import Charge, utc_day
from openclawd.protocol.messages import (
    CREDENTIAL_HEADERS,
    HOP_BY_HOP_HEADERS,
    has_dot_segment,
    shown_name,
)
from openclawd.protocol.usage import estimate_tokens
from openclawd.tracing import NO_TRACER, Trace, Tracer
from openclawd.upstream.http import UpstreamRequest, Upstreams
from openclawd.upstream.routes import Candidate, open_route, rewrite_model_bytes

log = logs.get(__name__)

PREFIX = "/v1/http/"
# A request body up to this size is held whole, so a retry can send it again.
REPLAYABLE_BYTES = 1024 * 1024
# The most of a JSON response body held on the side to read its token usage.
USAGE_BODY_BYTES = 1024 * 1024
# Request headers the upstream client sets itself, or that only this hop understands.
_NOT_FORWARDED = HOP_BY_HOP_HEADERS | {"host", "content-length", "expect"}


def request_headers(
    raw: Sequence[tuple[bytes, bytes]], auth_header: str | Iterable[str]
) -> tuple[list[tuple[str, str]], int | None]:
    """The app's headers to pass on, and its Content-Length (None if it sent none).

    Raises:
        ClientError: a header to pass on has a value that is not ASCII, or the body is
            framed twice (Content-Length and Transfer-Encoding).

    Dropped: hop-by-hop headers and any the app's ``Connection`` header names, framing
    headers the upstream client sets itself, and every credential header (the provider's
    ``auth_header``, ``Authorization``, ``Proxy-Authorization``, ``Cookie``).
    """
    named: set[str] = set()
    length: int | None = None
    chunked = False
    for raw_name, raw_value in raw:
        if raw_name == b"connection":
            named.update(t.strip().decode("latin-1") for t in raw_value.lower().split(b","))
        elif raw_name == b"content-length":
            length = int(raw_value)  # h11 checked it is a number
        elif raw_name == b"transfer-encoding":
            chunked = True
    if chunked and length is not None:
        # Which one frames the body? Two readers may disagree (request smuggling).
        raise ClientError("both Content-Length and Transfer-Encoding: send one")
    auth = {auth_header} if isinstance(auth_header, str) else set(auth_header)
    dropped = _NOT_FORWARDED | CREDENTIAL_HEADERS | named | {name.lower() for name in auth}
    headers: list[tuple[str, str]] = []
    for place, (raw_name, raw_value) in enumerate(raw, 1):
        name = raw_name.decode("latin-1")
        if name in dropped:
            continue
        if not raw_value.isascii():
            # By its place, not its name: the app's text is not repeated (it may be a key).
            raise ClientError(f"header {place} has a value that is not ASCII")
        headers.append((name, raw_value.decode("ascii")))
    if not any(name == "accept-encoding" for name, _ in headers):
        # Else the upstream client asks for gzip and an app that did not would get it.
        headers.append(("accept-encoding", "identity"))
    return headers, length


def response_headers(raw: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """The upstream's headers to pass back, byte for byte: all but hop-by-hop ones."""
    named = {
        token.strip()
        for name, value in raw
        if name == "connection"
        for token in value.lower().split(",")
    }
    return [
        (name.encode("latin-1"), value.encode("latin-1"))
        for name, value in raw
        if name not in HOP_BY_HOP_HEADERS and name not in named
    ]


@dataclass(frozen=True, slots=True)
class _Route:
    """Where a request goes: ``/v1/http/{provider}/{rest}?{query}``."""

    method: str
    provider: str
    rest: str
    query: str

    @classmethod
    def of(cls, request: h11.Request) -> _Route:
        path, _, query = request.target.decode("ascii").partition("?")
        provider, _, rest = path[len(PREFIX) :].partition("/")
        return cls(request.method.decode("ascii"), provider, rest, query)

    @property
    def upstream_target(self) -> str:
        """The path and query under the provider's ``base_url``."""
        return f"/{self.rest}" + (f"?{self.query}" if self.query else "")


class Passthrough:
    """Serves /v1/http requests; shared by all of them."""

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
        self.config = config
        self.inflight = 0

    def configure(self, config: Config) -> None:
        self.config = config

    async def serve(self, conn: Connection) -> None:
        """Answer one request: the upstream's response, or the contract's JSON error."""
        started = trio.current_time()
        route = _Route.of(conn.request)
        exchange = Exchange(answers_after_head=False)
        conn.client = identify(conn.peer, self.config.clients)
        logs.client_name.set(conn.client.name)
        trace = self.tracer.request(
            "http", route.provider, route.rest, None, conn.client.name, conn.request.headers
        )
        self.inflight += 1
        try:
            with self.lifecycle.work.track(), trio.CancelScope() as app_gone:
                async with trio.open_nursery() as nursery:

                    def watch() -> None:
                        nursery.start_soon(watch_for_leaving, conn, app_gone)

                    await self._exchange(conn, route, watch, exchange, trace)
                    nursery.cancel_scope.cancel()
            if app_gone.cancelled_caught:
                exchange.left("app gone")  # too late to matter if the answer had ended
        except Exception as exc:
            exchange.fail(OpenclawdError(f"internal error: {type(exc).__name__}"))
            raise
        finally:
            self.inflight -= 1
            exchange.left("cut", cut=True)  # unless it ended: cut by the daemon
            exchange.settle(trio.current_time(), utc_day(time.time())[0])
            log.info(
                "http.request",
                provider=shown_name(route.provider, self.config.providers),
                method=route.method,
                path=f"/{route.rest}",
                status=exchange.logged_status(),
                bytes_out=exchange.body_bytes,
                **({"error": exchange.error.code} if exchange.error else {}),
                duration_s=round(trio.current_time() - started, 4),
            )
            trace.finish(exchange)

    async def _exchange(
        self,
        conn: Connection,
        route: _Route,
        watch: Callable[[], None],
        exchange: Exchange,
        trace: Trace,
    ) -> None:
        """The request and its answer, told to ``exchange`` as it is written (the
        exchange may be cancelled at any point: the log line shows what the app got).
        ``watch`` is called once the app's body is all read: from then on the app leaving
        cancels the exchange."""
        try:
            request = await self._prepare(conn, route, watch, exchange)
            request = dataclasses.replace(request, trace=trace)
            if trace.recording and isinstance(request.content, bytes):
                trace.request_model(_body_model(request.content))

            def request_for(candidate: Candidate) -> UpstreamRequest:
                if not isinstance(request.content, bytes) or not candidate.models:
                    return request
                content = rewrite_model_bytes(request.content, candidate.models)
                return dataclasses.replace(request, content=content)

            clock = lambda: (trio.current_time(), *utc_day(time.time()))  # noqa: E731
            limits = provider_limits(exchange, self.admission.limits, clock, self.admission.top_up)
            opened = open_route(self.upstreams, route.provider, request_for, limits)
            async with opened as (provider, response):
                headers = response_headers(response.headers)
                headers.append((b"openclawd-provider", provider.encode("ascii")))
                head = h11.Response(
                    status_code=response.status,
                    headers=headers,
                    reason=reason_phrase(response.status, response.reason),
                )
                await _send(conn, head)
                exchange.responded(response.status)
                async with contextlib.aclosing(response.aiter_raw()) as chunks:
                    async for chunk in chunks:
                        await _send(conn, h11.Data(data=chunk))
                        exchange.sent(len(chunk))
                exchange.usage = response.usage
                exchange.response_model = response.model
                await _send(conn, h11.EndOfMessage())
                exchange.finished()
        except OpenclawdError as exc:
            if exchange.fail(exc):
                written = await conn.respond_error(exc)
                if written is None:
                    exchange.left("app gone")
                else:
                    exchange.answered(exc.http_status, written)
            elif exchange.error is exc:
                # The head is out: the app is cut off mid-body and sees a truncated response.
                log.warning("http.cut", error=str(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            exchange.left("app gone")

    def _members(self, name: str) -> tuple[str, ...]:
        """The providers ``name`` sends to: itself, or a route's.

        Raises:
            UnknownProviderError: neither a provider nor a route.
        """
        if name in self.config.providers:
            return (name,)
        route = self.config.routes.get(name)
        if route is None:
            # Not repeated back, nor logged: it may be a key pasted in the wrong place.
            raise UnknownProviderError("unknown provider")
        return route.providers

    async def _admit(
        self, conn: Connection, route: _Route, held: bytes, length: int | None
    ) -> Charge | None:
        """Admission (CONTRACT.md 5.1-5.3) of the request with what is known of its body:
        the bytes ``held`` (the whole body, or its first ``REPLAYABLE_BYTES`` of
        ``length``)."""
        tokens = 0
        limits = self.admission.limits
        if limits is not None and limits.counts_tokens:
            default = self.config.limits.default_completion_tokens
            tokens = estimate_tokens(held, default)
            if length is not None and length > len(held):
                tokens += math.ceil((length - len(held)) / 4)
        day, into_day = utc_day(time.time())
        model = _body_model(held)
        ask = Ask(conn.peer.uid, conn.client, route.provider, model, tokens, day, into_day)
        return await self.admission.admit_request_waiting(ask, trio.current_time)

    async def _prepare(
        self, conn: Connection, route: _Route, on_complete: Callable[[], None], exchange: Exchange
    ) -> UpstreamRequest:
        """Check the request, admit it and start reading its body. Admitted before its
        body is read, unless admission needs the body: its tokens for a token limit, its
        ``model`` for the client's list (then up to ``REPLAYABLE_BYTES`` of it are read).

        Raises:
            OpenclawdError: the request is refused (unknown provider, bad path, a drain,
                a limit, a provider or model the client may not use).
        """
        members = self._members(route.provider)
        bad = _bad_segment(route.rest)
        if bad is not None:
            raise ClientError(f"{bad} path segments are not allowed")
        limits = self.admission.limits
        models = conn.client.models if conn.client is not None else ()
        late = bool(models) or (limits is not None and limits.counts_tokens)
        if not late:
            exchange.charge = await self._admit(conn, route, b"", None)
        auth = [self.config.providers[name].auth_header for name in members]
        headers, length = request_headers(conn.request.headers, auth)
        if conn.http.they_are_waiting_for_100_continue:
            go_on = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
            await _send(conn, go_on)
        body = AppBody(conn, on_complete, self.config.listen.message_timeout_s)
        held = await body.hold(REPLAYABLE_BYTES)
        if late:
            exchange.charge = await self._admit(conn, route, held, length)
        content: bytes | AsyncIterator[bytes] | None
        if body.complete:
            chunked = any(n == b"transfer-encoding" for n, _ in conn.request.headers)
            content = held if length is not None or chunked else None
        else:
            content = body.stream(held)
            if length is not None:  # else it goes chunked
                headers.append(("content-length", str(length)))
        return UpstreamRequest(route.method, route.upstream_target, tuple(headers), content)


def _body_model(held: bytes) -> object:
    """The ``model`` of a JSON body held whole, if it names one."""
    if not held.lstrip().startswith(b"{"):
        return None
    try:
        body = json.loads(held)
    except (ValueError, RecursionError):
        return None
    return body.get("model") if isinstance(body, dict) else None


def _bad_segment(path: str) -> str | None:
    """What is wrong with the path under the provider, if anything: a dot segment (plain
    or percent-encoded) could step out of ``base_url``'s path, and an empty first one
    would read as a host (``//host/...``)."""
    segments = path.split("/")
    if segments[0] == "" and len(segments) > 1:
        return "empty"
    if has_dot_segment(path):
        return "dot"
    return None


async def _send(conn: Connection, event: h11.Event) -> None:
    data = conn.http.send(event)
    if data:
        await conn.stream.send_all(data)
