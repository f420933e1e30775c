"""/v1/realtime/{provider}: one upstream WebSocket per app WebSocket, frames relayed as is.

The driver of a passthrough session (CONTRACT.md 3.2): pick the provider and its key,
open the upstream session (``upstream/ws.py``), then run two pumps, app -> upstream and
upstream -> app, each moving one message at a time, so a slow side slows the other and
nothing is held beyond the libraries' small queues. Both legs are pinged. The driver only
moves messages and reports what ends the session (a close, a drop, silence, an oversize or
unfinished message, a refused handshake, a cut) to the sans-IO core
(``protocol/relay.py``), whose table says how each side is closed and whether what the
ending side sent first is still delivered. The session keeps the key it connected with: a
rotation does not cut it. Knows nothing of HTTP upstreams or of the /v1/ws frames.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs

import trio

from openclawd import logs, websocket
from openclawd.clients import identify
from openclawd.config import Config, ProviderConfig
from openclawd.errors import (
    ClientError,
    NoKeyError,
    OpenclawdError,
    UnknownProviderError,
    UpstreamRejectedError,
)
from openclawd.keys.manager import Key
from openclawd.lifecycle import Lifecycle
from openclawd.local.cutter import Close
from openclawd.local.http11 import Connection
from openclawd.protocol import relay
from openclawd.protocol.closecodes import CloseCode
from openclawd.protocol.exchange import Admission, Ask
from openclawd.protocol.limits import utc_day
from openclawd.protocol.messages import has_dot_segment
from openclawd.protocol.relay import Cause, Relay, Side
from openclawd.tracing import NO_TRACER, Trace, Tracer, Value
from openclawd.upstream import ws as upstream_ws
from openclawd.upstream.http import KeySource
from openclawd.upstream.ws import UpstreamSession
from openclawd.websocket import Activity, ConnectionClosed, WebSocketConnection

log = logs.get(__name__)

PREFIX = "/v1/realtime/"
# App handshake headers passed on to the upstream (API versions and betas, never
# credentials); everything else the app sent stays here.
_FORWARDED_PREFIXES = ("openai-", "anthropic-")


@dataclass(frozen=True, slots=True)
class _Try:
    """A provider a session may open on: its name, config, key and where it goes."""

    name: str
    provider: ProviderConfig
    key: Key
    to: upstream_ws.Target


def _gives_way(exc: OpenclawdError) -> bool:
    """Does a route's provider give way to its next after this handshake failure?"""
    if isinstance(exc, UpstreamRejectedError):
        return exc.status == 429 or exc.status >= 500
    return True  # unreachable, or no handshake in time


@dataclass(slots=True)
class _Pumps:
    """The I/O of one session, shared by its two pumps and two watchers: they move
    messages and report to ``core``, which decides how the session ends."""

    core: Relay
    ws: dict[Side, WebSocketConnection]
    upstream: UpstreamSession
    max_bytes: int  # max_message_bytes
    messages: dict[Side, int]  # relayed, by the side that sent them
    ended: trio.Event = field(default_factory=trio.Event)
    pumped: dict[Side, trio.Event] = field(
        default_factory=lambda: {Side.APP: trio.Event(), Side.UPSTREAM: trio.Event()}
    )
    blocked_on: set[Side] = field(default_factory=set)  # sides a pump waits to send to
    senders: dict[Side, websocket.Sender] = field(init=False)  # by the side sent to

    def __post_init__(self) -> None:
        self.senders = {side: websocket.Sender(ws) for side, ws in self.ws.items()}

    def report(self, event: relay.Event) -> None:
        self.core.handle(event)
        self.ended.set()

    def report_closed(self) -> None:
        """A pump met a closed WebSocket: report each side that closed, the upstream
        first (both may have closed by now; the first reported decides)."""
        closed = [(Side.UPSTREAM, self.upstream.closed), (Side.APP, self.ws[Side.APP].closed)]
        for side, reason in closed:
            if reason is not None:
                self.report(relay.Closed(side, reason.code, reason.reason or ""))
        if all(reason is None for _, reason in closed):
            self.report(relay.Failed())  # the library said closed, yet neither side is

    async def pump(self, source: Side) -> None:
        """Move messages from ``source`` to the other side one at a time until either
        closes."""
        target = source.other
        src, sender = self.ws[source], self.senders[target]
        try:
            while True:
                message = await src.get_message()
                if websocket.over_limit(message, self.max_bytes):
                    # Over in UTF-8 bytes though not in characters: as trio-websocket does
                    # for bytes, the sender is closed with 1009.
                    self.report(relay.TooBig(source))
                    return
                self.blocked_on.add(target)
                try:
                    await sender.send(message)
                finally:
                    self.blocked_on.discard(target)
                self.messages[source] += 1
        except ConnectionClosed:
            self.report_closed()
        finally:
            self.pumped[source].set()

    async def watch(
        self, side: Side, activity: Activity, interval_s: float, timeout_s: float
    ) -> None:
        """Ping one side; if it stops answering (or finishing its message), report it."""
        other = side.other
        verdict = await websocket.watch(
            self.ws[side],
            activity,
            interval_s=interval_s,
            timeout_s=timeout_s,
            # Its pong may wait behind the messages we hold while the other side is slow.
            # Not when this side's own queue waits on the other: two stuck peers must not
            # excuse each other for ever.
            excused=lambda: other in self.blocked_on and side not in self.blocked_on,
        )
        if verdict == "silent":
            self.report(relay.Silent(side))
        elif verdict == "unfinished":
            self.report(relay.Unfinished(side))


class Realtime:
    """Serves /v1/realtime sessions; shared by all of them."""

    def __init__(
        self,
        config: Config,
        keys: KeySource,
        lifecycle: Lifecycle,
        admission: Admission,
        *,
        ssl_context: ssl.SSLContext | None = None,
        open_stream: upstream_ws.StreamOpener | None = None,
        tracer: Tracer = NO_TRACER,
    ) -> None:
        """``open_stream`` opens the connection under each upstream session (default: TCP,
        and TLS for wss:// against ``ssl_context``, else the system CA store)."""
        self.keys = keys
        self.lifecycle = lifecycle
        self.admission = admission
        self.ssl_context = ssl_context
        self.open_stream = open_stream
        self.tracer = tracer
        self.config = config
        self.sessions = 0

    def configure(self, config: Config) -> None:
        """Take a reloaded config; open sessions run on as they started."""
        self.config = config

    async def serve(self, conn: Connection, ws: WebSocketConnection) -> Close:
        """Run one session; returns how the app is to be closed.

        Raises:
            OpenclawdError: the session could not start (unknown provider, no ``ws_url``,
                a drain or a limit, no key); its ``close_code`` says how the app is closed.
        """
        target = conn.request.target.decode("ascii")
        path, _, query = target.partition("?")
        name, slash, rest = path[len(PREFIX) :].partition("/")
        members = self._members(name)
        if has_dot_segment(rest):
            raise ClientError("dot path segments are not allowed")
        conn.client = identify(conn.peer, self.config.clients)
        logs.client_name.set(conn.client.name)
        trace = self.tracer.request(
            "realtime", name, rest, None, conn.client.name, conn.request.headers
        )
        if trace.recording:
            trace.request_model(parse_qs(query).get("model", [None])[0])
        try:
            day, into_day = utc_day(time.time())
            ask = Ask(conn.peer.uid, conn.client, name, day=day, into_day=into_day)
            # A session is a request.
            await self.admission.admit_request_waiting(ask, trio.current_time)
            tries = self._tries(name, members, slash + rest, query)
        except OpenclawdError as refused:
            trace.end(refused.code)
            raise
        return await self._serve(conn, ws, name, tries, trace)

    def _tries(self, name: str, members: list[str], path: str, query: str) -> list[_Try]:
        """Each provider a session to ``name`` may open on, with its key (those that have
        one).

        Raises:
            NoKeyError: none has a key yet.
        """
        tries = [
            _Try(
                member,
                self.config.providers[member],
                key,
                upstream_ws.target(
                    self.config.providers[member].ws_url,
                    path,
                    query,
                    self.config.providers[member].query,
                ),
            )
            for member in members
            if (key := self.keys.current(member)) is not None
        ]
        if not tries:
            raise NoKeyError(f"no key for {name} yet")
        return tries

    async def _serve(
        self, conn: Connection, ws: WebSocketConnection, name: str, tries: list[_Try], trace: Trace
    ) -> Close:
        """Run the admitted session (see ``serve``)."""
        key = tries[0].key
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in conn.request.headers
            if k.decode("latin-1").startswith(_FORWARDED_PREFIXES)
        ]
        trace.propagate(headers)
        listen = self.config.listen
        core = Relay(
            max_message_bytes=listen.max_message_bytes,
            ping_timeout_s=listen.ping_timeout_s,
            message_timeout_s=listen.message_timeout_s,
            secret=key.secret,
            fingerprint=key.fingerprint,
        )
        with self.lifecycle.work.track():
            self.sessions += 1
            started = trio.current_time()
            messages = dict.fromkeys(Side, 0)
            try:
                async with trio.open_nursery() as nursery:
                    await self._session(nursery, conn, ws, core, messages, tries, headers, trace)
                    nursery.cancel_scope.cancel()
            except Exception:
                core.handle(relay.Failed())  # the connection's handler logs it
                raise
            finally:
                self.sessions -= 1
                ending = core.handle(_cut(conn))  # how it ended; if it had not, it was cut
                log.info(
                    "realtime.close",
                    provider=name,
                    code=ending.app.code if ending.app else None,
                    reason=ending.app.reason if ending.app else None,
                    ended_by=ending.side.value if ending.side else "daemon",
                    cause=ending.cause.value,
                    messages_up=messages[Side.APP],
                    messages_down=messages[Side.UPSTREAM],
                    duration_s=round(trio.current_time() - started, 3),
                )
                _end(trace, ending, messages)
        # Only a cut (a cancel, which never gets here) may leave the app's close unsaid.
        assert ending.app is not None, ending
        return Close(ending.app.code, ending.app.reason)

    def _members(self, name: str) -> list[str]:
        """The providers a session to ``name`` may go to: itself, or a route's with a
        ``ws_url``, in order (CONTRACT.md 5.4).

        Raises:
            UnknownProviderError: neither a provider nor a route.
            ClientError: none of them has a ``ws_url``.
        """
        route = self.config.routes.get(name)
        if route is None and name not in self.config.providers:
            # Not repeated back (the close reason), nor logged: it may be a key.
            raise UnknownProviderError("unknown provider")
        names = list(route.providers) if route is not None else [name]
        members = [m for m in names if self.config.providers[m].ws_url]
        if not members:
            raise ClientError(f"provider {name!r} has no ws_url")
        return members

    async def _open(
        self,
        nursery: trio.Nursery,
        core: Relay,
        tries: list[_Try],
        headers: list[tuple[str, str]],
        activity: Activity,
    ) -> tuple[upstream_ws.UpstreamSession, _Try] | None:
        """The first upstream session that opens, trying a route's providers in order: on
        a 429, a 5xx or no connection, the next one at once. None when the last failed
        (``core`` has it)."""
        for index, chosen in enumerate(tries):
            last = index == len(tries) - 1
            core.use_key(chosen.key.secret, chosen.key.fingerprint)
            try:
                session = await upstream_ws.open_session(
                    nursery,
                    chosen.provider,
                    chosen.key,
                    chosen.to,
                    headers=headers,
                    max_message_bytes=self.config.listen.max_message_bytes,
                    activity=activity,
                    ssl_context=self.ssl_context,
                    open_stream=self.open_stream,
                )
            except OpenclawdError as exc:
                if not last and _gives_way(exc):
                    following = tries[index + 1].name
                    log.info("route.fallback", provider=chosen.name, to=following, reason=str(exc))
                    continue
                await self._failed(core, chosen, exc)
                return None
            return session, chosen
        return None

    async def _failed(self, core: Relay, chosen: _Try, exc: OpenclawdError) -> None:
        if isinstance(exc, UpstreamRejectedError):
            key = chosen.key
            log.info(
                "realtime.rejected", provider=chosen.name, status=exc.status, key=key.fingerprint
            )
            if core.handle(relay.Refused(exc.status, str(exc))).cause is Cause.KEY_REFUSED:
                # Before the app hears of it: its reconnect then gets the new key.
                await self.keys.auth_failure(chosen.name, key)
            return
        log.info("realtime.connect_failed", provider=chosen.name, error=str(exc))
        core.handle(relay.Unreachable(str(exc)))

    async def _session(
        self,
        nursery: trio.Nursery,
        conn: Connection,
        app: WebSocketConnection,
        core: Relay,
        messages: dict[Side, int],
        tries: list[_Try],
        headers: list[tuple[str, str]],
        trace: Trace,
    ) -> None:
        """Connect upstream and relay (counting ``messages``); ``nursery`` hosts the
        upstream's reader. How it ended is ``core``'s: never raises an ``OpenclawdError``."""
        listen = self.config.listen
        up_activity = Activity()
        opened = await self._open(nursery, core, tries, headers, up_activity)
        if opened is None:
            return
        session, chosen = opened
        name, key, to = chosen.name, chosen.key, chosen.to
        trace.upstream(name, to.host, 1, key)
        core.opened()
        log.info(
            "realtime.open",
            provider=name,
            upstream=to.url,
            key=key.fingerprint,
            key_version=key.version,
        )
        sides = {Side.APP: app, Side.UPSTREAM: session.ws}
        pumps = _Pumps(core, sides, session, listen.max_message_bytes, messages)
        try:
            await self._relay(pumps, conn.activity or Activity(), up_activity)
        except Exception:
            core.handle(relay.Failed())
            raise
        finally:
            ending = core.handle(_cut(conn))  # how it ended; if it had not, it was cut
            closing = ending.upstream or relay.CloseFrame(CloseCode.GOING_AWAY, "")  # (opened)
            # Ended by the daemon (cut, or failed), the upstream's reader is cancelled: no
            # waiting for its answer to our close frame.
            by_daemon = ending.side is None
            wait_s = websocket.CUT_CLOSE_WAIT_S if by_daemon else websocket.CLOSE_TIMEOUT_S
            await session.aclose(closing.code, closing.reason, wait_s=wait_s)

    async def _relay(self, pumps: _Pumps, app_activity: Activity, up_activity: Activity) -> None:
        listen = self.config.listen
        async with trio.open_nursery() as nursery:
            for side, activity in ((Side.APP, app_activity), (Side.UPSTREAM, up_activity)):
                nursery.start_soon(pumps.pump, side)
                nursery.start_soon(
                    pumps.watch, side, activity, listen.ping_interval_s, listen.ping_timeout_s
                )
            try:
                await pumps.ended.wait()
                ending = pumps.core.ending
                if ending is not None and ending.deliver and ending.side is not None:
                    # What the closed side sent before its close still reaches the other.
                    with trio.move_on_after(websocket.CLOSE_TIMEOUT_S):
                        await pumps.pumped[ending.side].wait()
            finally:
                # Ended, or cut by the daemon: a message half sent is finished (bounded)
                # before anything else goes out on that side.
                for sender in pumps.senders.values():
                    sender.stop()
                nursery.cancel_scope.cancel()


# How a session may end without being an error of its span: a side closed it.
_CLEAN = frozenset({Cause.CLOSED, Cause.CLOSED_WITHOUT_CODE})


def _end(trace: Trace, ending: relay.Ending, messages: dict[Side, int]) -> None:
    """End a session's span: an error unless a side closed it, with its close code."""
    attributes: dict[str, Value] = {
        "openclawd.ended_by": ending.side.value if ending.side else "daemon",
        "openclawd.close_code": ending.app.code if ending.app else 0,
        "openclawd.messages_up": messages[Side.APP],
        "openclawd.messages_down": messages[Side.UPSTREAM],
    }
    trace.end(None if ending.cause in _CLEAN else ending.cause.value, **attributes)


def _cut(conn: Connection) -> relay.Cut:
    """The daemon cut the session: with the close its cutter chose for the app."""
    why = conn.cutter.why
    return relay.Cut() if why is None else relay.Cut(why.code, why.reason)
