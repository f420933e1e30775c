"""The data socket's passthroughs at their edges (CONTRACT.md 2, 3.2-3.4): what review
found and these tests hold the code to: no frame cut in half by a shutdown, no peer left
hanging after its oversize message, no two stuck peers excusing each other, a 401 whose
body ends with the connection, a long key echoed in a close reason, byte (not character)
limits, no socket left behind by a TLS timeout, ws_url's own query, a request that would
frame its body twice, a bug that ends one request (not the daemon), an app that leaves
while the upstream works; and two that cover the drain of a closed side's queued messages
and TLS verification against the system store.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from pathlib import Path

import h11
import pytest
import trio
import trio.testing
import trio_websocket
import wsproto
import wsproto.events
from wsproto.events import BytesMessage, CloseConnection, Request

from openclawd.daemon import SHUTDOWN_CLOSE
from openclawd.upstream import http as upstream_http
from openclawd.upstream import ws as upstream_ws

from ..bao import BaoServer
from ..conftest import server_tls as shared_server_tls
from ..fake_upstream import Reply, open_fake_upstream
from ..fake_ws_upstream import Session, open_fake_ws_upstream
from .harness import (
    FAST_PINGS,
    call,
    close_of,
    open_app,
    open_dataplane,
    open_http,
    open_realtime,
    realtime_plane,
)

Bao = BaoServer
MODELS = "/v1/http/openai/v1/models"
CHAT = "/v1/http/openai/v1/chat/completions"


# --- helpers ------------------------------------------------------------------------------


class RawApp:
    """A realtime app spoken with wsproto over the unix socket: it reads only when told."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.events: list[wsproto.events.Event] = []

    async def handshake(self, target: str = "/v1/realtime/openai") -> None:
        await self.stream.send_all(self.ws.send(Request(host="openclawd", target=target)))
        while not any(isinstance(e, wsproto.events.AcceptConnection) for e in self.events):
            self.ws.receive_data(await self.stream.receive_some(65536))
            self.events.extend(self.ws.events())

    async def read_until_close_frame(self) -> CloseConnection:
        """Read (and keep) events until a close event, or EOF (wsproto then says 1006)."""
        while True:
            for event in self.events:
                if isinstance(event, CloseConnection):
                    return event
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)
            self.events.extend(self.ws.events())


async def wait_for(condition: object, timeout_s: float) -> bool:
    """Poll ``condition()`` (no event exists for these counters) for up to ``timeout_s``."""
    with trio.move_on_after(timeout_s):
        while not condition():  # type: ignore[operator]  # noqa: ASYNC110
            await trio.sleep(0.05)
        return True
    return False


async def raw_upstream(
    nursery: trio.Nursery, answer: bytes | None, *, tls_hangs: bool = False
) -> tuple[int, list[str]]:
    """A loopback TCP server: reads a request head, then writes ``answer`` and closes
    (``None``: writes nothing, waits for the client to leave). Returns (port, events)."""
    events: list[str] = []

    async def handle(stream: trio.SocketStream) -> None:
        events.append("open")
        try:
            data = b""
            if not tls_hangs:
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    data += chunk
            if answer is not None:
                await stream.send_all(answer)
                await stream.aclose()
                events.append("answered")
                return
            while await stream.receive_some(65536):
                pass
            events.append("client closed")
        except trio.BrokenResourceError:
            events.append("client closed")

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port, events


# --- /v1/realtime -------------------------------------------------------------------------


async def test_an_app_silent_after_its_oversize_message_is_let_go(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    """1009 to the app, then the connection must end: trio-websocket's reader is still
    blocked in receive_some (it set _close_reason itself, so ws.aclose() is a no-op) and
    _serve_websocket's nursery waits for it forever."""
    limit = 64 * 1024
    with trio.fail_after(20):
        async with (
            open_fake_ws_upstream() as up,
            realtime_plane(
                shared_bao, runtime_dir, up.url, listen={"max_message_bytes": limit}
            ) as dp,
        ):
            stream = await trio.open_unix_socket(dp.socket_path)
            async with stream:
                app = RawApp(stream)
                await app.handshake()
                await up.wait_handshakes(1)
                await stream.send_all(app.ws.send(BytesMessage(data=b"x" * (limit + 1))))
                close = await app.read_until_close_frame()
                assert close.code == 1009
                # The app neither answers the close nor closes its socket (hung, stopped).
                await up.wait_connections_closed(1)
                released = await wait_for(lambda: dp.local.clients == 0, 5.0)
                assert released, "the daemon still holds the connection 5 s after its 1009"


async def test_shutdown_does_not_cut_a_message_in_half(shared_bao: Bao, runtime_dir: Path) -> None:
    """At shutdown the app must see 1012; the pump cancelled mid-frame (large message,
    app reading slowly) puts the close frame in the middle of the message's payload."""
    size = 900 * 1024
    close: CloseConnection | None = None
    with trio.fail_after(30):
        async with (
            open_fake_ws_upstream() as up,
            realtime_plane(shared_bao, runtime_dir, up.url) as dp,
        ):
            up.script(Session(send_bytes_of=size, echo=False))
            stream = await trio.open_unix_socket(dp.socket_path)
            app = RawApp(stream)
            await app.handshake()
            await up.wait_messages_sent(1)
            # The daemon has begun relaying the message: its first bytes reached the app.
            # The app reads nothing and the message (900 KiB) is larger than a socket's
            # buffers, so from here on the daemon is part way into it until cut.
            await trio.lowlevel.wait_readable(stream.socket)
            # The daemon's shutdown cut, with the close it chose.
            dp.local.cutter.cut_at(trio.current_time(), SHUTDOWN_CLOSE)
            with trio.CancelScope(shield=True), trio.fail_after(15):
                close = await app.read_until_close_frame()
                await stream.aclose()
    assert close is not None
    assert (close.code, close.reason) == (1012, "openclawd is shutting down")


async def test_two_stuck_peers_do_not_excuse_each_other_forever(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    """An upstream that stops reading while it keeps sending, and an app that does the
    same: each pump waits to send to the other, so each watcher excuses its peer
    (``other in blocked_on``) and neither ever fires; the session never ends."""
    size = 64 * 1024
    with trio.fail_after(30):
        async with (
            open_fake_ws_upstream() as up,
            realtime_plane(
                shared_bao,
                runtime_dir,
                up.url,
                listen=FAST_PINGS,
            ) as dp,
        ):
            up.script(
                Session(
                    stream_messages=100_000,
                    stream_message_bytes=size,
                    echo=False,
                    go_silent_after=0,
                )
            )
            stream = await trio.open_unix_socket(dp.socket_path)
            app = RawApp(stream)
            await app.handshake()
            await up.wait_handshakes(1)  # the session runs (Realtime.sessions == 1)

            async def flood() -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while True:
                        await stream.send_all(app.ws.send(BytesMessage(data=b"a" * size)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                ended = await wait_for(lambda: dp.realtime.sessions == 0, 5.0)
                nursery.cancel_scope.cancel()
            await stream.aclose()
            assert ended, "both peers stopped reading; the session still runs 5 s later"


async def test_coverage_what_the_upstream_sent_before_its_close_reaches_a_slow_app(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    """The upstream closes while messages for a slow app are still queued in the
    daemon, and the app's next message finds the upstream closed (so the app->upstream
    pump ends first). The queued messages are still delivered, then the upstream's close."""
    big: list[str | bytes] = ["a" * (300 * 1024), "b" * (300 * 1024), "c" * (300 * 1024)]
    with trio.fail_after(30):
        async with (
            open_fake_ws_upstream() as up,
            realtime_plane(shared_bao, runtime_dir, up.url) as dp,
        ):
            up.script(Session(greeting=big, close_after=0, close_code=4000, close_reason="done"))
            async with open_realtime(dp.socket_path, max_queue=1) as app:
                await up.wait_messages_sent(3)
                # The daemon has read the close behind the messages (its queue holds all
                # three) and answered it: the upstream's side of the closing handshake ends.
                await up.wait_connections_closed(1)
                await app.send("too late")  # in the daemon's socket once this returns
                # Every task of this trio run (the daemon's) has done what it can: it read
                # the message and found the upstream closed when relaying it. A causal
                # wait, not a time: nothing else is left for the daemon to do.
                await trio.testing.wait_all_tasks_blocked()
                received = [await app.recv() for _ in big]
                assert received == big
                assert await app.closed() == (4000, "done")


async def test_coverage_an_upstream_certificate_not_in_the_system_store_is_refused(
    shared_bao: Bao, runtime_dir: Path, certificate: tuple[Path, Path]
) -> None:
    """wss:// is verified against the system CA store; a self-signed upstream is
    1014 with the TLS failure named, and the key is never sent to it."""
    server_tls = shared_server_tls(certificate)
    received = bytearray()

    async def handle(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, server_tls, server_side=True)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await stream.receive_some(65536):
                received.extend(data)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            async with realtime_plane(shared_bao, runtime_dir, f"wss://127.0.0.1:{port}") as dp:
                code, reason = await close_of(dp.socket_path)
            nursery.cancel_scope.cancel()
    assert code == 1014
    assert reason.startswith("upstream TLS handshake failed"), reason
    assert "certificate" in reason, reason
    assert received == b""  # no handshake (and no key) ever went over it


async def test_an_upstream_401_with_a_close_delimited_body_is_1008(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    """A 401 whose body ends with the connection (no content-length, not chunked) is
    still a refused key: 1008 and a re-read, not 1014."""
    answer = (
        b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n"
        b"connection: close\r\n\r\n"
        b'{"error":{"message":"Incorrect API key provided","type":"invalid_request_error"}}'
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port, _ = await raw_upstream(nursery, answer)
            async with realtime_plane(shared_bao, runtime_dir, f"ws://127.0.0.1:{port}") as dp:
                assert await close_of(dp.socket_path) == (1008, "upstream 401")
            nursery.cancel_scope.cancel()


async def test_a_long_key_echoed_in_a_close_reason_is_not_passed_on(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    """Real keys (OpenAI project keys: ~164 chars) never fit a 123-byte close reason, so
    an upstream echoing one always cuts it; replace(key.secret, ...) then finds nothing
    and most of the key reaches the app."""
    key = "sk-proj-" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z" * 5
    echoed = key[:90]
    with trio.fail_after(20):
        async with (
            open_fake_ws_upstream() as up,
            realtime_plane(shared_bao, runtime_dir, up.url, key=key) as dp,
        ):
            up.script(Session(close_after=0, close_code=4001, close_reason=f"bad key {echoed}"))
            code, reason = await close_of(dp.socket_path)
            assert code == 4001
            assert echoed not in reason, reason
            assert key[8:40] not in reason, reason


async def test_a_text_message_over_max_message_bytes_in_utf8_is_1009(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    """max_message_bytes is a byte limit (CONTRACT 3.4); trio-websocket counts len(str),
    so a text message of 3-byte characters passes at three times the limit."""
    limit = 64 * 1024
    with trio.fail_after(20):
        async with (
            open_fake_ws_upstream() as up,
            realtime_plane(
                shared_bao, runtime_dir, up.url, listen={"max_message_bytes": limit}
            ) as dp,
        ):
            text = "\u20ac" * (limit // 2)  # 32 Ki characters, 96 KiB of UTF-8
            assert len(text.encode()) > limit
            async with open_realtime(dp.socket_path) as app:
                await app.send(text)
                await up.wait_connections_opened(1)
                with trio.move_on_after(3):
                    await up.wait_received(1)
                assert up.received == []  # it went upstream at 3x max_message_bytes


async def test_a_tls_handshake_timeout_closes_the_tcp_connection(
    shared_bao: Bao, runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """connect_timeout_s firing during the TLS handshake: _open_stream only closes ``tcp``
    on BrokenResourceError, so on Cancelled the socket is left to the garbage collector."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port, events = await raw_upstream(nursery, None, tls_hangs=True)
            async with realtime_plane(
                shared_bao,
                runtime_dir,
                f"wss://127.0.0.1:{port}",
                provider={"connect_timeout_s": 0.3},
            ) as dp:
                # Keep every frame alive (as a traceback in a log handler would): the
                # socket must be closed by the code, not by reference counting.
                kept: list[object] = []
                original = upstream_ws._open_stream

                async def keeping(*args: object) -> object:
                    try:
                        return await original(*args)  # type: ignore[arg-type]
                    except BaseException as exc:
                        kept.append(exc)
                        raise

                monkeypatch.setattr(upstream_ws, "_open_stream", keeping)
                code, reason = await close_of(dp.socket_path)
                assert (code, reason) == (
                    1014,
                    "no upstream handshake within connect_timeout_s=0.3",
                )
                closed = await wait_for(lambda: "client closed" in events, 2.0)
                # Close what was left open ourselves (no ResourceWarning in a later test).
                for exc in kept:
                    tb = exc.__traceback__ if isinstance(exc, BaseException) else None
                    while tb is not None:
                        leaked = tb.tb_frame.f_locals.get("tcp")
                        if isinstance(leaked, trio.SocketStream):
                            await trio.aclose_forcefully(leaked)
                        tb = tb.tb_next
                kept.clear()
                assert closed, "the TCP connection of the abandoned TLS handshake is still open"
            nursery.cancel_scope.cancel()


def test_a_query_in_ws_url_is_kept() -> None:
    """ws_url + path + query: a ws_url that carries its own query (Azure OpenAI:
    ?api-version=...&deployment=...) loses it silently."""
    to = upstream_ws.target(
        "wss://example.openai.azure.com/openai?api-version=2024-10-01", "", "x=1"
    )
    assert "api-version=2024-10-01" in to.resource


# --- /v1/http -----------------------------------------------------------------------------


async def test_content_length_with_chunked_large_body_does_not_crash_the_daemon(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    """h11 accepts Content-Length together with Transfer-Encoding: chunked (chunked wins),
    but request_headers() still passes the app's Content-Length on for a streamed body.
    httpcore's h11 then raises a raw h11.LocalProtocolError (not mapped by httpx), which
    nothing catches: it escapes the handler into the connection nursery."""
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
        ):
            async with open_http(dp.socket_path) as app:
                await app.send_head(
                    "POST",
                    CHAT,
                    [("content-length", "10"), ("transfer-encoding", "chunked")],
                )
                try:
                    for _ in range(40):
                        await app.send(h11.Data(data=b"x" * 65536))
                    await app.send(h11.EndOfMessage())
                except trio.BrokenResourceError:
                    pass  # the daemon stopped reading: its answer is what matters
                try:
                    status: int | None = (await app.read_response()).status
                except trio.BrokenResourceError:
                    status = None  # cut off without an answer
            answer = await call(dp.socket_path, "GET", MODELS)
            assert answer.status == 200  # the daemon serves on
            assert status == 400


async def test_an_unexpected_error_in_a_passthrough_request_ends_that_request_alone(
    shared_bao: Bao, runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STYLE 4: anything unexpected is logged and becomes internal for that request or
    connection alone. Plain-HTTP handlers run unguarded in the connection nursery."""
    calls = 0
    original = upstream_http.ProviderPool._attempt

    async def broken_once(self: upstream_http.ProviderPool, *args: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        return await original(self, *args)  # type: ignore[arg-type]

    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(shared_bao, runtime_dir, up.url) as dp,
        ):
            monkeypatch.setattr(upstream_http.ProviderPool, "_attempt", broken_once)
            try:
                first: int | None = (await call(dp.socket_path, "GET", MODELS)).status
            except (trio.BrokenResourceError, h11.RemoteProtocolError):
                first = None  # cut off without an answer
            answer = await call(dp.socket_path, "GET", MODELS)
            assert answer.status == 200  # the daemon serves on
            assert first is not None
            assert first >= 500


async def test_an_app_that_leaves_while_the_upstream_works_abandons_the_request(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    """The app gives up (SDK timeout, Ctrl-C) while the upstream has not answered yet:
    nobody watches the app's socket, so the upstream request, its pool connection and
    the drain's in-flight count are held until read_timeout_s / total_timeout_s."""
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(
                shared_bao, runtime_dir, up.url, provider={"read_timeout_s": 30.0}
            ) as dp,
        ):
            up.script(Reply(head_delay_s=math.inf))
            async with open_http(dp.socket_path) as app:
                await app.send_head("GET", MODELS)
                await app.send(h11.EndOfMessage())
                await up.wait_requests(1)
            # The app's socket is closed now.
            released = await wait_for(lambda: dp.lifecycle.work.count == 0, 3.0)
            assert released, "the abandoned request is still in flight 3 s after the app left"


async def test_a_dot_segment_in_a_realtime_path_is_refused(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_ws_upstream() as up,
            realtime_plane(shared_bao, runtime_dir, up.url) as dp,
        ):
            for path in ("/v1/realtime/openai/v1/../x", "/v1/realtime/openai/%2e%2e/x"):
                assert await close_of(dp.socket_path, path) == (
                    1008,
                    "dot path segments are not allowed",
                )
            assert up.handshakes == []


async def test_a_ws_channel_text_frame_over_max_message_bytes_in_utf8_is_1009(
    shared_bao: Bao, runtime_dir: Path
) -> None:
    limit = 64 * 1024
    with trio.fail_after(20):
        async with (
            open_fake_upstream() as up,
            open_dataplane(
                shared_bao, runtime_dir, up.url, listen={"max_message_bytes": limit}
            ) as dp,
            open_app(dp.socket_path) as app,
        ):
            await app.send("\u20ac" * (limit // 2))  # 32 Ki characters, 96 KiB of UTF-8
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await app.receive()
            assert closed.value.reason.code == 1009
            assert closed.value.reason.reason == f"message over max_message_bytes ({limit})"
