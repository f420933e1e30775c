"""/v1/realtime/{provider}: one upstream WebSocket per app WebSocket, frames relayed as is.

The driver of a passthrough session (CONTRACT.md 3.2): pick the provider and its key,
open the upstream session (``upstream/ws.py``), then run two pumps, app -> upstream and
upstream -> app, each moving one message at a time, so a slow side slows the other and
nothing is held beyond the libraries' small queues. Both legs are pinged; a leg that stops
answering ends the session. When one side closes, what it sent before closing is still
delivered to the other, which is then closed with the code the contract names: the
upstream's own code and reason, or 1014 for a drop, 1009 for an oversize message, 1011
for a silent app, 1008 for an app that leaves a message unfinished for
``message_timeout_s``. The session keeps the key it connected with: a rotation does not cut it.
Knows nothing of HTTP upstreams or of the /v1/ws frames.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

import trio

from openclawd import logs, websocket
from openclawd.config import Config, ListenConfig, ProviderConfig
from openclawd.errors import (
    ClientError,
    NoKeyError,
    OpenclawdError,
    UnfinishedMessageError,
    UnknownProviderError,
    UpstreamRejectedError,
)
from openclawd.keys.manager import Key
from openclawd.lifecycle import Lifecycle
from openclawd.local.server import Close, Connection
from openclawd.protocol.closecodes import CloseCode, sendable
from openclawd.protocol.messages import has_dot_segment
from openclawd.protocol.ratelimit import RateLimiter
from openclawd.upstream import ws as upstream_ws
from openclawd.upstream.http import KeySource
from openclawd.websocket import Activity, CloseReason, ConnectionClosed, WebSocketConnection

log = logs.get(__name__)

PREFIX = "/v1/realtime/"
# App handshake headers passed on to the upstream (API versions and betas, never
# credentials); everything else the app sent stays here.
_FORWARDED_PREFIXES = ("openai-", "anthropic-")
# trio-websocket's own reason when it closes a peer for an oversize message.
_OVERSIZE_REASON = "Exceeded maximum message size"


@dataclass(slots=True)
class _Relay:
    """The state two pumps and two watchers of one session share."""

    app: WebSocketConnection
    upstream: WebSocketConnection
    ended: trio.Event = field(default_factory=trio.Event)
    first: str | None = None  # "app" or "upstream": the side that closed first
    first_close: CloseReason | None = None  # and how it closed
    silent: str | None = None  # the side that stopped answering pings (or finishing)
    unfinished: bool = False  # it was cut for a message left unfinished, not a lost pong
    pumped: dict[str, trio.Event] = field(
        default_factory=lambda: {"app": trio.Event(), "upstream": trio.Event()}
    )
    blocked_on: set[str] = field(default_factory=set)  # sides a pump waits to send to
    senders: dict[str, websocket.Sender] = field(init=False)  # by the side sent to
    max_bytes: int = 1 << 20  # max_message_bytes
    oversize: bool = False  # the first side to close was closed for an oversize message
    messages: dict[str, int] = field(default_factory=lambda: {"app": 0, "upstream": 0})

    def __post_init__(self) -> None:
        self.senders = {
            "app": websocket.Sender(self.app),
            "upstream": websocket.Sender(self.upstream),
        }

    def end(self) -> None:
        if self.first is None:
            for side, ws in (("upstream", self.upstream), ("app", self.app)):
                if ws.closed is not None:
                    self.first, self.first_close = side, ws.closed
                    break
        self.ended.set()

    async def pump(self, source: str, src: WebSocketConnection) -> None:
        """Move messages from ``src`` to the other side one at a time until either closes."""
        target = "upstream" if source == "app" else "app"
        sender = self.senders[target]
        try:
            while True:
                message = await src.get_message()
                if websocket.over_limit(message, self.max_bytes):
                    # Over in UTF-8 bytes though not in characters: as trio-websocket does
                    # for bytes, the sender is closed with 1009.
                    if self.first is None:
                        self.first, self.oversize = source, True
                        self.first_close = CloseReason(
                            1009, f"{_OVERSIZE_REASON}: {self.max_bytes} bytes"
                        )
                    return
                self.blocked_on.add(target)
                try:
                    await sender.send(message)
                finally:
                    self.blocked_on.discard(target)
                self.messages[source] += 1
        except ConnectionClosed:
            pass
        finally:
            self.pumped[source].set()
            self.end()

    async def watch(
        self,
        side: str,
        ws: WebSocketConnection,
        activity: Activity,
        interval_s: float,
        timeout_s: float,
    ) -> None:
        """Ping one side; if it stops answering, note it and end the session."""
        other = "upstream" if side == "app" else "app"
        verdict = await websocket.watch(
            ws,
            activity,
            interval_s=interval_s,
            timeout_s=timeout_s,
            # Its pong may wait behind the messages we hold while the other side is slow.
            # Not when this side's own queue waits on the other: two stuck peers must not
            # excuse each other for ever.
            excused=lambda: other in self.blocked_on and side not in self.blocked_on,
        )
        if verdict != "closed" and self.silent is None:
            self.silent, self.unfinished = side, verdict == "unfinished"
            self.ended.set()


class Realtime:
    """Serves /v1/realtime sessions; shared by all of them."""

    def __init__(
        self,
        config: Config,
        keys: KeySource,
        lifecycle: Lifecycle,
        limiter: RateLimiter,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.keys = keys
        self.lifecycle = lifecycle
        self.limiter = limiter
        self.ssl_context = ssl_context
        self.config = config
        self.sessions = 0

    def configure(self, config: Config) -> None:
        """Take a reloaded config; open sessions run on as they started."""
        self.config = config

    async def serve(self, conn: Connection, ws: WebSocketConnection) -> Close:
        """Run one session; returns how the app is to be closed.

        Raises:
            OpenclawdError: the session could not start (unknown provider, no ``ws_url``,
                rate limited, no key); its ``close_code`` says how the app is closed.
        """
        target = conn.request.target.decode("ascii")
        path, _, query = target.partition("?")
        name, slash, rest = path[len(PREFIX) :].partition("/")
        provider = self.config.providers.get(name)
        if provider is None:
            # Not repeated back (the close reason), nor logged: it may be a key.
            raise UnknownProviderError("unknown provider")
        if not provider.ws_url:
            raise ClientError(f"provider {name!r} has no ws_url")
        if has_dot_segment(rest):
            raise ClientError("dot path segments are not allowed")
        refused = self.limiter.check(conn.peer.uid, trio.current_time())
        if refused is not None:
            raise refused
        key = self.keys.current(name)
        if key is None:
            raise NoKeyError(f"no key for {name} yet")
        to = upstream_ws.target(provider.ws_url, slash + rest, query)
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in conn.request.headers
            if k.decode("latin-1").startswith(_FORWARDED_PREFIXES)
        ]
        with self.lifecycle.work.track():
            self.sessions += 1
            started = trio.current_time()
            outcome = Close(CloseCode.INTERNAL, "internal error")
            relay: _Relay | None = None
            try:
                async with trio.open_nursery() as nursery:
                    outcome, relay = await self._session(
                        nursery, conn, ws, name, provider, key, to, headers
                    )
                    nursery.cancel_scope.cancel()
            finally:
                self.sessions -= 1
                log.info(
                    "realtime.close",
                    provider=name,
                    code=outcome.code,
                    reason=outcome.reason,
                    messages_up=relay.messages["app"] if relay else 0,
                    messages_down=relay.messages["upstream"] if relay else 0,
                    duration_s=round(trio.current_time() - started, 3),
                )
        return outcome

    async def _session(
        self,
        nursery: trio.Nursery,
        conn: Connection,
        app: WebSocketConnection,
        name: str,
        provider: ProviderConfig,
        key: Key,
        to: upstream_ws.Target,
        headers: list[tuple[str, str]],
    ) -> tuple[Close, _Relay | None]:
        """Connect upstream and relay; ``nursery`` hosts the upstream's reader. Never
        raises an ``OpenclawdError``: a failure is the returned close."""
        listen = self.config.listen
        up_activity = Activity()
        try:
            session = await upstream_ws.open_session(
                nursery,
                provider,
                key,
                to,
                headers=headers,
                max_message_bytes=listen.max_message_bytes,
                activity=up_activity,
                ssl_context=self.ssl_context,
            )
        except UpstreamRejectedError as exc:
            log.info("realtime.rejected", provider=name, status=exc.status, key=key.fingerprint)
            if exc.status in (401, 403):
                # Before the app hears of it: its reconnect then gets the new key.
                await self.keys.auth_failure(name, key)
            return Close(exc.close_code, str(exc)), None
        except OpenclawdError as exc:
            log.info("realtime.connect_failed", provider=name, error=str(exc))
            return Close(exc.close_code, str(exc)), None
        log.info(
            "realtime.open",
            provider=name,
            upstream=to.url,
            key=key.fingerprint,
            key_version=key.version,
        )
        relay = _Relay(app, session.ws, max_bytes=listen.max_message_bytes)
        try:
            await self._relay(relay, conn.activity or Activity(), up_activity)
        finally:
            cut = relay.first is None and relay.silent is None
            # Cut by the daemon, the upstream's reader is cancelled: no waiting for its
            # answer to our close frame.
            wait_s = websocket.CUT_CLOSE_WAIT_S if cut else websocket.CLOSE_TIMEOUT_S
            await session.aclose(*_upstream_close(relay, cut=cut), wait_s=wait_s)
        return _app_close(relay, key, listen), relay

    async def _relay(self, relay: _Relay, app_activity: Activity, up_activity: Activity) -> None:
        listen = self.config.listen
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.pump, "app", relay.app)
            nursery.start_soon(relay.pump, "upstream", relay.upstream)
            for side, ws, activity in (
                ("app", relay.app, app_activity),
                ("upstream", relay.upstream, up_activity),
            ):
                nursery.start_soon(
                    relay.watch, side, ws, activity, listen.ping_interval_s, listen.ping_timeout_s
                )
            try:
                await relay.ended.wait()
                if relay.silent is None and relay.first is not None:
                    # What the closed side sent before its close still reaches the other.
                    with trio.move_on_after(websocket.CLOSE_TIMEOUT_S):
                        await relay.pumped[relay.first].wait()
            finally:
                # Ended, or cut by the daemon: a message half sent is finished (bounded)
                # before anything else goes out on that side.
                for sender in relay.senders.values():
                    sender.stop()
                nursery.cancel_scope.cancel()


def _app_close(relay: _Relay, key: Key, listen: ListenConfig) -> Close:
    """How the app is closed, now that the session is over."""
    if relay.silent == "app" and relay.unfinished:
        unfinished = UnfinishedMessageError.of("message", listen.message_timeout_s)
        return Close(unfinished.close_code, str(unfinished))
    if relay.silent == "app":
        return Close(CloseCode.INTERNAL, f"no pong within {listen.ping_timeout_s:g}s")
    if relay.silent == "upstream":
        return Close(CloseCode.BAD_GATEWAY, "upstream stopped answering pings")
    closed = relay.first_close
    if closed is None:
        return Close(CloseCode.INTERNAL, "session ended without a close")
    if relay.first == "app":
        return Close(closed.code, closed.reason or "")  # already closed: for the log
    return _from_upstream(closed, key, relay.max_bytes)


def _from_upstream(closed: CloseReason, key: Key, max_bytes: int) -> Close:
    """The upstream's close, passed on where it may be (its code and reason verbatim)."""
    code, reason = closed.code, closed.reason or ""
    if _quotes(reason, key.secret):  # an upstream echoing the key must not pass it on
        reason = f"(the upstream's reason quoted key {key.fingerprint}: withheld)"
    if code == 1006:
        return Close(CloseCode.BAD_GATEWAY, "upstream dropped the connection")
    if code == 1009 and reason.startswith(_OVERSIZE_REASON):
        return Close(CloseCode.TOO_BIG, f"upstream message over max_message_bytes ({max_bytes})")
    if code == 1005:
        return Close(CloseCode.NORMAL, reason)
    if not sendable(code):
        return Close(CloseCode.BAD_GATEWAY, f"upstream closed with {code}")
    return Close(code, reason)


# A run of this many characters of a key in a text counts as quoting it: a close reason
# (123 bytes at most) always cuts a real key short.
_KEY_RUN = 8


def _quotes(text: str, secret: str) -> bool:
    """Does ``text`` hold ``secret``, or any piece of it ``_KEY_RUN`` characters long?"""
    if len(secret) <= _KEY_RUN:
        return secret in text
    return any(secret[i : i + _KEY_RUN] in text for i in range(len(secret) - _KEY_RUN + 1))


def _upstream_close(relay: _Relay, *, cut: bool) -> tuple[int, str]:
    """How the upstream is closed: with the app's code when the app closed first."""
    if cut:
        return CloseCode.GOING_AWAY, "openclawd ended the session"
    if relay.silent == "app" and relay.unfinished:
        return CloseCode.GOING_AWAY, "the app left a message unfinished"
    if relay.silent == "app":
        return CloseCode.GOING_AWAY, "the app stopped answering pings"
    closed = relay.first_close
    if relay.first == "upstream" and relay.oversize:
        return CloseCode.TOO_BIG, f"message over max_message_bytes ({relay.max_bytes})"
    if relay.first == "app" and closed is not None:
        if closed.code == 1006:
            return CloseCode.GOING_AWAY, "the app went away"
        if closed.code == 1005:
            return CloseCode.NORMAL, ""
        if sendable(closed.code):
            return closed.code, closed.reason or ""
    return CloseCode.NORMAL, ""
