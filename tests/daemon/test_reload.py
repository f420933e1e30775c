"""SIGHUP applies what etc/openclawd.toml says it applies: every key of the example config
is either proved to take effect on reload, or listed in ``reload.RESTART_ONLY`` and
reported as ``config.needs_restart``.

The daemon runs in-process from the example config itself (sockets moved to a temporary
directory, the provider pointed at a small upstream on 127.0.0.1) with the in-memory Vault
of tests/keys. Each case changes one key in the file, runs the daemon's reload (the path
SIGHUP takes; one test sends the signal), checks the ``config.reloaded`` line names that key
alone, and proves the new value in force where it acts: what the upstream receives, what an
app is answered, the pool's connections, the Vault poll, the log level. Timeouts,
intervals and backoffs are proved at their exact new values in virtual time (a clock that
runs at real speed for the start and the reload, then only jumps: ``virtual_time``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
import signal
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import h11
import pytest
import trio
import trio.testing
import wsproto
import wsproto.events

from openclawd import logs
from openclawd.config import Config
from openclawd.config import load as load_config
from openclawd.config import parse as parse_config
from openclawd.daemon import Daemon
from openclawd.notify import Notifier
from openclawd.reload import RESTART_ONLY, changed_keys, keep_restart_only
from openclawd.upstream.http import UpstreamRequest

from ..conftest import REPO, render_toml, unix_request
from ..dataplane.harness import Answer, call, open_app
from ..keys.test_manager import FakeVault
from .test_daemon import wait_for_log

EXAMPLE = REPO / "etc" / "openclawd.toml"
PATH = "openclawd/openai"  # the example's vault_path
NEXT_PATH = "openclawd/openai-next"
MODELS = "/v1/http/openai/v1/models"
_E = TypeVar("_E", bound=wsproto.events.Event)


# --- a small upstream that records what it receives -----------------------------------------


@dataclass
class Upstream:
    port: int = 0
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    hold: trio.Event | None = None  # answers wait for it while set
    held: int = 0  # requests waiting for it
    arrived: trio.Event = field(default_factory=trio.Event)  # set at each held request
    status: int = 200  # what every answer says
    times: list[float] = field(default_factory=list)  # trio.current_time() of each request

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                    self.requests.append((event.target.decode(), headers))
                    self.times.append(trio.current_time())
                elif isinstance(event, h11.EndOfMessage):
                    if self.hold is not None:
                        self.held += 1
                        self.arrived.set()
                        self.arrived = trio.Event()
                        await self.hold.wait()
                        self.held -= 1
                    body = b"{}"
                    head = h11.Response(
                        status_code=self.status,
                        headers=[("content-type", "application/json"), ("content-length", "2")],
                    )
                    await stream.send_all(
                        (conn.send(head) or b"")
                        + (conn.send(h11.Data(data=body)) or b"")
                        + (conn.send(h11.EndOfMessage()) or b"")
                    )
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except (trio.BrokenResourceError, h11.ProtocolError):
            return

    @property
    def last(self) -> tuple[str, dict[str, str]]:
        return self.requests[-1]


# --- the daemon, run from the example config --------------------------------------------------


@dataclass
class Ctx:
    daemon: Daemon
    upstream: Upstream
    vault: FakeVault
    runtime: Path

    async def http(self, target: str = "/v1/http/openai/v1/models") -> tuple[int, Any]:
        status, _, body = await trio.to_thread.run_sync(
            unix_request, self.runtime / "data.sock", "GET", target
        )
        return status, body


def example_tables(runtime: Path, port: int) -> dict[str, dict[str, Any]]:
    """The example config, runnable here: its sockets in ``runtime`` and its provider at
    the local upstream; every other value as shipped."""
    tables: dict[str, Any] = tomllib.loads(EXAMPLE.read_text())
    tables["listen"]["socket"] = str(runtime / "data.sock")
    tables["control"]["socket"] = str(runtime / "control.sock")
    tables["providers"]["openai"]["base_url"] = f"http://127.0.0.1:{port}"
    return tables


def write(runtime: Path, tables: dict[str, dict[str, Any]]) -> Path:
    flat = {}
    for name, table in tables.items():
        if name == "providers":
            for provider, keys in table.items():
                flat[f"providers.{provider}"] = keys
        else:
            flat[name] = table
    path = runtime / "openclawd.toml"
    path.write_text(render_toml(flat))
    return path


def set_key(tables: dict[str, Any], key: str, value: object) -> None:
    *where, name = key.split(".")
    table = tables
    for part in where:
        table = table[part]
    table[name] = value


@pytest.fixture
def restore_logging() -> Any:
    """A reload reconfigures logging (level, format, handler): put it back afterwards."""
    root = logging.getLogger()
    ours = logging.getLogger("openclawd")
    before = (root.level, ours.level, list(root.handlers))
    yield
    logs.configure("debug")  # drops the handler a reload installed ...
    root.handlers[:] = before[2]  # ... and this the one that configure() added
    root.setLevel(before[0])
    ours.setLevel(before[1])


async def run_with_change(
    runtime: Path,
    caplog: pytest.LogCaptureFixture,
    changes: dict[str, object],
    prove: Callable[[Ctx], Awaitable[None]] | None,
    *,
    before: Callable[[Ctx], Awaitable[None]] | None = None,
    base: dict[str, object] | None = None,
    by_signal: bool = False,
) -> tuple[Ctx, Config]:
    """Run the daemon from the example config (with ``base`` changed), change ``changes``
    in its file (a callable value is given the context), reload, then run ``prove``.
    Returns the context and the config in force before the reload."""
    vault = FakeVault()
    vault.login_ttls = [0.0]
    vault.write(PATH, api_key="sk-base", backup="sk-backup")
    vault.write(NEXT_PATH, api_key="sk-next")  # version 1 as well
    upstream = Upstream()
    with (
        trio.fail_after(20),
        caplog.at_level(logging.INFO, logger="openclawd.daemon"),
        caplog.at_level(logging.INFO, logger="openclawd.keys.manager"),
    ):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, upstream.handle, 0, host="127.0.0.1")
            )
            upstream.port = listeners[0].socket.getsockname()[1]
            tables = example_tables(runtime, upstream.port)
            for key, value in (base or {}).items():
                set_key(tables, key, value)
            path = write(runtime, tables)
            cfg = load_config(str(path))
            daemon = Daemon(cfg, Notifier(None), vault=vault)
            ctx = Ctx(daemon, upstream, vault, runtime)
            done = trio.Event()

            async def run() -> None:
                try:
                    await daemon.run()
                finally:
                    done.set()

            nursery.start_soon(run)
            while not daemon.lifecycle.ready:
                await daemon.lifecycle.wait_changed()
            if before is not None:
                await before(ctx)
            old = daemon.config
            for key, value in changes.items():
                set_key(tables, key, value(ctx) if callable(value) else value)
            write(runtime, tables)
            caplog.clear()
            if by_signal:
                os.kill(os.getpid(), signal.SIGHUP)
                await wait_for_log(caplog, "config.reloaded")  # keys re-read too
            else:
                await daemon.reload()
            if prove is not None:
                await prove(ctx)
            os.kill(os.getpid(), signal.SIGTERM)
            await done.wait()
            nursery.cancel_scope.cancel()
    return ctx, old


def reloaded_fields(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    [record] = [r for r in caplog.records if r.getMessage() == "config.reloaded"]
    fields: dict[str, Any] = record.fields  # type: ignore[attr-defined]
    return fields


def needs_restart(caplog: pytest.LogCaptureFixture) -> set[str]:
    return {
        r.fields["key"]  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "config.needs_restart"
    }


# --- the proofs, one per reloadable key ---------------------------------------------------------


@contextlib.contextmanager
def virtual_time() -> Iterator[trio.testing.MockClock]:
    """From here on, time moves only by jumps: the clock (``reload_clock``, real-time
    until now, for the daemon's start and the reload's read of the file in a thread)
    stands still and jumps to the next deadline once every task has been blocked for
    10 ms of real time. Inside, nothing may wait on a thread: only this trio run's own
    tasks and in-process sockets, so a timeout seen inside fires at its exact value."""
    clock = trio.lowlevel.current_clock()
    assert isinstance(clock, trio.testing.MockClock), "the test needs the reload_clock fixture"
    clock.rate = 0.0
    clock.autojump_threshold = 0.01
    try:
        yield clock
    finally:
        clock.autojump_threshold = math.inf
        clock.rate = 1.0


async def app_call(ctx: Ctx, target: str = MODELS) -> tuple[Answer, float]:
    """One request from an app (over the data socket, no thread); returns the answer and
    how long it took on the trio clock."""
    started = trio.current_time()
    answer = await call(str(ctx.runtime / "data.sock"), "GET", target)
    return answer, trio.current_time() - started


def answered_at(status: int, code: str, after_s: float) -> Callable[[Ctx], Awaitable[None]]:
    """The upstream holds its answer forever: the app is told ``status`` / ``code`` at
    exactly ``after_s`` (virtual), the reloaded timeout (the old one is 60 or 600 s)."""

    async def prove(ctx: Ctx) -> None:
        ctx.upstream.hold = trio.Event()
        try:
            with virtual_time():
                answer, elapsed = await app_call(ctx)
            assert ctx.upstream.held == 1  # the request reached the upstream, which is silent
            assert (answer.status, answer.json()["error"]["code"]) == (status, code)
            assert elapsed == after_s
        finally:
            ctx.upstream.hold.set()
            ctx.upstream.hold = None

    return prove


async def pool_wait_bounded(ctx: Ctx) -> None:
    """connect_timeout_s also bounds the wait for one of the pool's connections (the
    transport's ``pool`` timeout, set from the same value): with the only connection
    (base: max_connections = 1) held by a request the upstream does not answer, the next
    request gives up at exactly the reloaded 3 s (the old 10 s otherwise). A TCP connect
    that never completes cannot be had on loopback without changing base_url as well."""
    upstream = ctx.upstream
    upstream.hold = trio.Event()
    with virtual_time():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app_call, ctx)
            while not upstream.held:
                await upstream.arrived.wait()
            answer, elapsed = await app_call(ctx)
            upstream.hold.set()
    upstream.hold = None
    assert (answer.status, answer.json()["error"]["code"]) == (503, "upstream_unavailable")
    assert elapsed == 3.0


async def attempts_for_503(ctx: Ctx) -> list[float]:
    """An app's request while the upstream answers 503 to everything, each retry waiting
    the longest its backoff allows (the jitter's upper bound); returns the virtual times
    at which the upstream saw the attempts, relative to the first."""
    ctx.upstream.status = 503
    ctx.upstream.times.clear()
    try:
        with (
            mock.patch.object(random, "uniform", lambda low, high: high),
            virtual_time(),
        ):
            answer, _ = await app_call(ctx)
    finally:
        ctx.upstream.status = 200
    assert answer.status == 503  # the last attempt's answer, relayed
    first = ctx.upstream.times[0]
    return [t - first for t in ctx.upstream.times]


async def one_attempt(ctx: Ctx) -> None:
    assert await attempts_for_503(ctx) == [0.0]  # the example's 2 retries: three


async def backoff_from_025(ctx: Ctx) -> None:
    assert await attempts_for_503(ctx) == [0.0, 0.25, 0.75]  # 0.25, then 0.5 (was 0.5, 1)


async def backoff_capped_at_2(ctx: Ctx) -> None:
    # base: retry_backoff_s = 4, so the waits are 4 and 8 under the example's cap of 8.
    assert await attempts_for_503(ctx) == [0.0, 2.0, 4.0]


async def one_connection_admitted(ctx: Ctx) -> None:
    """With max_connections lowered to 1, a connection that is open (quiet, admitted when
    accepted: the accept queue is FIFO) leaves none for the next, refused with 503."""
    path = str(ctx.runtime / "data.sock")
    async with await trio.open_unix_socket(path):
        answer = await call(path, "GET", MODELS)
    assert (answer.status, answer.json()["error"]["code"]) == (503, "busy")
    # The first one gone (its EOF is already in the daemon's socket: once every task is
    # blocked, the daemon has seen it and let the slot go), there is room again.
    await trio.testing.wait_all_tasks_blocked()
    assert ctx.daemon.local.statistics().clients == 0
    assert (await call(path, "GET", MODELS)).status == 200


async def quiet_connection_closed_at(ctx: Ctx) -> None:
    """A connection that never sends its request head is closed at exactly the reloaded
    handshake_timeout_s (the example's 10 s otherwise)."""
    with virtual_time():
        async with await trio.open_unix_socket(str(ctx.runtime / "data.sock")) as stream:
            started = trio.current_time()
            assert await stream.receive_some(1024) == b""  # closed, without a word
            assert trio.current_time() - started == 4.5


class RawWebSocket:
    """A /v1/ws app spoken with wsproto: it sees every frame, and answers no ping."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)

    async def send(self, event: wsproto.events.Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def next_event(self) -> wsproto.events.Event:
        while True:
            for event in self.ws.events():
                return event
            data = await self.stream.receive_some(65536)
            # Raised, not looped on: in virtual time a loop that never blocks would keep
            # the clock (and the test's fail_after) from ever moving.
            assert data, "the daemon closed the connection without another frame"
            self.ws.receive_data(data)

    async def wait_for(self, kind: type[_E]) -> tuple[_E, float]:
        """The next event of ``kind`` (others skipped) and the virtual time it came."""
        while True:
            event = await self.next_event()
            if isinstance(event, kind):
                return event, trio.current_time()


@contextlib.asynccontextmanager
async def open_raw_ws(ctx: Ctx) -> AsyncIterator[tuple[RawWebSocket, float]]:
    """A /v1/ws connection, open; yields it and the virtual time it opened."""
    async with await trio.open_unix_socket(str(ctx.runtime / "data.sock")) as stream:
        app = RawWebSocket(stream)
        await app.send(wsproto.events.Request(host="openclawd", target="/v1/ws"))
        _, opened = await app.wait_for(wsproto.events.AcceptConnection)
        yield app, opened


async def pinged_at_25(ctx: Ctx) -> None:
    """The first ping comes exactly 2.5 s after the app's last sign of life, the
    handshake (20 s otherwise)."""
    with virtual_time():
        async with open_raw_ws(ctx) as (app, opened):
            _, pinged = await app.wait_for(wsproto.events.Ping)
    assert pinged - opened == 2.5


async def unanswered_ping_closes_at_35(ctx: Ctx) -> None:
    """An app that answers no ping is closed (1011) exactly 3.5 s after the ping (base:
    ping_interval_s = 1; the example's ping_timeout_s is 20)."""
    with virtual_time():
        async with open_raw_ws(ctx) as (app, _):
            _, pinged = await app.wait_for(wsproto.events.Ping)
            close, closed = await app.wait_for(wsproto.events.CloseConnection)
    assert close.code == 1011
    assert closed - pinged == 3.5


async def unfinished_message_closes_at_55(ctx: Ctx) -> None:
    """A message begun and never finished closes the connection (1008) exactly 5.5 s
    after its first byte (30 s otherwise)."""
    with virtual_time():
        async with open_raw_ws(ctx) as (app, _):
            await app.send(wsproto.events.TextMessage(data='{"type":', message_finished=False))
            begun = trio.current_time()
            close, closed = await app.wait_for(wsproto.events.CloseConnection)
    assert close.code == 1008
    assert closed - begun == 5.5


async def not_ready_without_key(ctx: Ctx) -> None:
    """The provider has no key (base: its secret is missing, required = false, so the
    daemon started ready). Required now, its missing key holds readiness back."""
    assert ctx.daemon.keys.current("openai") is None
    status, _, body = await trio.to_thread.run_sync(
        unix_request, ctx.runtime / "control.sock", "GET", "/readyz"
    )
    assert (status, body["ready"]) == (503, False), body
    assert any("no key for openai" in reason for reason in body["reasons"]), body


async def refused_peer(ctx: Ctx) -> None:
    status, body = await ctx.http()
    assert status == 403, body


async def hello_max_message_bytes(ctx: Ctx) -> None:
    async with open_app(str(ctx.runtime / "data.sock")) as app:
        assert app.hello["max_message_bytes"] == 4096


async def hello_max_inflight(ctx: Ctx) -> None:
    async with open_app(str(ctx.runtime / "data.sock")) as app:
        assert app.hello["max_inflight"] == 3


async def polls_sooner(ctx: Ctx) -> None:
    # The daemon read its keys at start and waits 30 s for the first metadata poll; with
    # a shorter interval that poll comes sooner (before the fix: 30 s later, past the
    # test's fail_after).
    while not ctx.vault.times("metadata"):  # noqa: ASYNC110 - the fake Vault has no event
        await trio.sleep(0.01)


async def rate_limited(ctx: Ctx) -> None:
    assert (await ctx.http())[0] == 200
    status, body = await ctx.http()
    assert (status, body["error"]["code"]) == (429, "rate_limited")


async def drain_deadline(ctx: Ctx) -> None:
    assert ctx.daemon.drain(None) == 12.5
    ctx.daemon.resume()


async def quieter_log(ctx: Ctx) -> None:
    assert logging.getLogger("openclawd").level == logging.WARNING


async def json_log(ctx: Ctx) -> None:
    formatters = [h.formatter for h in logging.getLogger().handlers]
    assert any(isinstance(f, logs.JsonFormatter) for f in formatters)


def upstream_sees(target: str | None = None, **headers: str) -> Callable[[Ctx], Awaitable[None]]:
    """A request from an app reaches the upstream at ``target`` with ``headers``."""

    async def prove(ctx: Ctx) -> None:
        status, body = await ctx.http()
        assert status == 200, body
        seen_target, seen = ctx.upstream.last
        if target is not None:
            assert seen_target == target
        for name, value in headers.items():
            assert seen.get(name.replace("_", "-")) == value

    return prove


def key_pool(secret: str, size: int) -> Callable[[Ctx], Awaitable[None]]:
    async def prove(ctx: Ctx) -> None:
        await upstream_sees(authorization=f"Bearer {secret}")(ctx)
        key = ctx.daemon.statistics().keys.providers["openai"].key
        assert key is not None
        assert (key.version, key.pool_size) == (1, size)

    return prove


async def hold_requests(ctx: Ctx, count: int) -> int:
    """Start ``count`` requests at once on the provider's pool while the upstream holds
    its answers; returns how many reached the upstream at once (each on a connection of
    its own: the pool's connections in use)."""
    upstream = ctx.upstream
    upstream.hold = trio.Event()
    pool = ctx.daemon.upstreams["openai"]

    async def one() -> None:
        async with pool.open(UpstreamRequest("GET", "/v1/models")) as response:
            await response.read(1024)

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
        while not upstream.held:
            await upstream.arrived.wait()
        # Quiet: every request is now either at the upstream or waiting for a connection.
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        opened = upstream.held
        upstream.hold.set()
    upstream.hold = None
    return opened


async def two_connections_at_most(ctx: Ctx) -> None:
    assert await hold_requests(ctx, 3) == 2


async def realtime_ws_url(ctx: Ctx) -> None:
    assert ctx.daemon.realtime.config.providers["openai"].ws_url == "ws://127.0.0.1:9/rt"


async def insecure_allowed(ctx: Ctx) -> None:
    # allow_insecure acts when the config is checked: it is what lets this reload point
    # the provider at a plain-http non-loopback host (rejected otherwise, see below).
    assert ctx.daemon.config.providers["openai"].allow_insecure is True
    assert ctx.daemon.upstreams["openai"].config.allow_insecure is True


def breaker(attribute: str, value: object) -> Callable[[Ctx], Awaitable[None]]:
    async def prove(ctx: Ctx) -> None:
        assert getattr(ctx.daemon.upstreams["openai"].breaker, attribute) == value

    return prove


P = "providers.openai."
RELOADABLE: dict[str, tuple[object, Callable[[Ctx], Awaitable[None]]]] = {
    "listen.allowed_uids": ([os.getuid() + 1], refused_peer),
    "listen.allowed_gids": ([os.getgid() + 1], refused_peer),
    "listen.max_connections": (1, one_connection_admitted),
    "listen.max_message_bytes": (4096, hello_max_message_bytes),
    "listen.max_inflight_per_connection": (3, hello_max_inflight),
    "listen.ping_interval_s": (2.5, pinged_at_25),
    "listen.ping_timeout_s": (3.5, unanswered_ping_closes_at_35),
    "listen.handshake_timeout_s": (4.5, quiet_connection_closed_at),
    "listen.message_timeout_s": (5.5, unfinished_message_closes_at_55),
    "vault.refresh_interval_s": (0.05, polls_sooner),
    "limits.requests_per_minute": (1, rate_limited),
    "shutdown.drain_timeout_s": (12.5, drain_deadline),
    "logging.level": ("warning", quieter_log),
    "logging.format": ("json", json_log),
    P + "base_url": (
        lambda ctx: f"http://127.0.0.1:{ctx.upstream.port}/prefix",
        upstream_sees("/prefix/v1/models"),
    ),
    P + "ws_url": ("ws://127.0.0.1:9/rt", realtime_ws_url),
    P + "auth_header": ("x-api-key", upstream_sees(x_api_key="Bearer sk-base")),
    P + "auth_scheme": ("", upstream_sees(authorization="sk-base")),
    P + "vault_path": (NEXT_PATH, key_pool("sk-next", 1)),
    P + "key_field": (["backup", "api_key"], key_pool("sk-backup", 2)),
    P + "required": (True, not_ready_without_key),
    P + "connect_timeout_s": (3.0, pool_wait_bounded),
    P + "read_timeout_s": (4.0, answered_at(504, "upstream_timeout", 4.0)),
    P + "total_timeout_s": (5.0, answered_at(504, "upstream_timeout", 5.0)),
    P + "max_retries": (0, one_attempt),
    P + "retry_backoff_s": (0.25, backoff_from_025),
    P + "retry_backoff_max_s": (2.0, backoff_capped_at_2),
    P + "circuit_failure_threshold": (2, breaker("failure_threshold", 2)),
    P + "circuit_reset_s": (9.0, breaker("reset_s", 9.0)),
    P + "max_connections": (2, two_connections_at_most),
    P + "allow_insecure": (True, insecure_allowed),
    # The example's own auth keys override the preset's; its header is added.
    P + "preset": ("anthropic", upstream_sees(anthropic_version="2023-06-01")),
    P + "headers": ({"OpenAI-Beta": "assistants=v2"}, upstream_sees(openai_beta="assistants=v2")),
    P + "query": (
        {"api-version": "2024-10-21"},
        upstream_sees("/v1/models?api-version=2024-10-21"),
    ),
}

# What a reload of a key changes besides it: a preset fills other keys.
ALSO_CHANGED = {P + "preset": f"{P}headers,{P}preset"}

# What a proof needs of the config it starts from (as well as the example's values).
BASES: dict[str, dict[str, object]] = {
    "listen.ping_timeout_s": {"listen.ping_interval_s": 1.0},
    P + "required": {P + "required": False, P + "vault_path": "openclawd/missing"},
    P + "connect_timeout_s": {P + "max_connections": 1},
    P + "retry_backoff_max_s": {P + "retry_backoff_s": 4.0},
}

# New values for the keys that need a restart, and the other keys a valid change of
# them drags along (control.tcp needs a token_file).
RESTART_CHANGES: dict[str, dict[str, object]] = {
    "listen.socket": {"listen.socket": "/run/openclawd/other.sock"},
    "listen.mode": {"listen.mode": "0600"},
    "listen.group": {"listen.group": "openclawd-apps"},
    "control.socket": {"control.socket": "/run/openclawd/other-control.sock"},
    "control.mode": {"control.mode": "0600"},
    "control.group": {"control.group": "openclawd-ops"},
    "control.tcp": {"control.tcp": "127.0.0.1:9477", "control.token_file": "/etc/oc/token"},
    "control.token_file": {"control.token_file": "/etc/oc/token"},
    "vault.addr": {"vault.addr": "https://vault2.internal:8200"},
    "vault.auth": {"vault.auth": "token"},
    "vault.token_file": {"vault.token_file": "/etc/oc/vault-token"},
    "vault.role_id_file": {"vault.role_id_file": "other-role-id"},
    "vault.secret_id_file": {"vault.secret_id_file": "other-secret-id"},
    "vault.mount": {"vault.mount": "kv"},
    "vault.request_timeout_s": {"vault.request_timeout_s": 5.0},
    "vault.ca_cert": {"vault.ca_cert": "/etc/oc/vault-ca.pem"},
    "vault.allow_insecure": {"vault.allow_insecure": True},
}


def example_keys() -> set[str]:
    keys = set()
    for name, table in tomllib.loads(EXAMPLE.read_text()).items():
        if name == "providers":
            for provider, values in table.items():
                keys |= {f"providers.{provider}.{k}" for k in values}
        else:
            keys |= {f"{name}.{k}" for k in table}
    return keys


def test_every_key_of_the_example_is_proved_reloadable_or_needs_a_restart() -> None:
    keys = example_keys()
    restart = {k for k in keys if k in RESTART_ONLY}
    assert set(RELOADABLE).isdisjoint(RESTART_ONLY)
    assert keys - restart == set(RELOADABLE)
    assert restart == set(RESTART_CHANGES)
    # The table names no key the example does not document; [shared] and [tracing] are
    # documented commented out (a fleet and traces are opt-in).
    shared = {k for k in RESTART_ONLY if k.startswith(("shared.", "tracing."))}
    assert keys | shared >= RESTART_ONLY
    commented = EXAMPLE.read_text()
    assert all(f"# {k.split('.')[1]} = " in commented for k in shared), shared


def test_the_example_names_every_key_that_needs_a_restart() -> None:
    header = EXAMPLE.read_text().split("\n[listen]", 1)[0]
    text = " ".join(line.lstrip("# ") for line in header.splitlines())
    for key in RESTART_ONLY:
        section, name = key.split(".")
        assert f"[{section}]" in text, key
        assert name in text, key


@pytest.fixture
def reload_clock() -> trio.testing.MockClock:
    """Real time (rate 1, no jumps) until a proof switches to ``virtual_time``."""
    return trio.testing.MockClock(rate=1.0)


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("key", sorted(RELOADABLE))
async def test_a_reload_puts_the_new_value_in_force(
    runtime_dir: Path,
    caplog: pytest.LogCaptureFixture,
    reload_clock: trio.testing.MockClock,  # pytest-trio runs the test on it
    key: str,
) -> None:
    value, prove = RELOADABLE[key]

    async def before(ctx: Ctx) -> None:
        if key == P + "base_url":
            await upstream_sees("/v1/models")(ctx)
        if key == P + "max_connections":
            assert await hold_requests(ctx, 3) == 3  # the example's 100 let all three open

    await run_with_change(
        runtime_dir, caplog, {key: value}, prove, before=before, base=BASES.get(key)
    )
    assert reloaded_fields(caplog)["changed"] == ALSO_CHANGED.get(key, key)
    assert needs_restart(caplog) == set()


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("key", sorted(RESTART_CHANGES))
async def test_a_key_that_needs_a_restart_is_reported_and_kept(
    runtime_dir: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    key: str,
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", "hvs.test-only")  # auth = "token" needs a token
    changes = RESTART_CHANGES[key]
    ctx, old = await run_with_change(runtime_dir, caplog, changes, None)
    assert needs_restart(caplog) == set(changes)
    assert reloaded_fields(caplog)["changed"] == ""
    for changed in changes:
        section, name = changed.split(".")
        in_force = getattr(getattr(ctx.daemon.config, section), name)
        assert in_force == getattr(getattr(old, section), name)
        assert changed in RESTART_ONLY


@pytest.mark.usefixtures("restore_logging")
async def test_a_raised_max_connections_lets_more_upstream_connections_open(
    runtime_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def before(ctx: Ctx) -> None:
        assert await hold_requests(ctx, 3) == 1

    async def prove(ctx: Ctx) -> None:
        assert await hold_requests(ctx, 3) == 3

    await run_with_change(
        runtime_dir,
        caplog,
        {P + "max_connections": 3},
        prove,
        before=before,
        base={P + "max_connections": 1},
    )


@pytest.mark.usefixtures("restore_logging")
async def test_sighup_names_every_key_it_changed(
    runtime_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    changes = {
        # Not 0.05 as above: polls that often would never leave the daemon quiet for
        # hold_requests' look at the pool.
        "vault.refresh_interval_s": 1.0,
        P + "max_connections": 2,
        "vault.mount": "kv",
        "listen.socket": "/run/openclawd/other.sock",
    }

    async def prove(ctx: Ctx) -> None:
        await polls_sooner(ctx)
        await two_connections_at_most(ctx)

    await run_with_change(runtime_dir, caplog, changes, prove, by_signal=True)
    assert reloaded_fields(caplog)["changed"] == (
        "providers.openai.max_connections,vault.refresh_interval_s"
    )
    assert needs_restart(caplog) == {"listen.socket", "vault.mount"}


def test_a_provider_added_or_removed_is_named_as_a_whole() -> None:
    def parse(*names: str, **vault: object) -> Config:
        providers = {n: {"base_url": "https://x.test", "vault_path": f"p/{n}"} for n in names}
        return parse_config(
            {
                "vault": {"addr": "https://v.test", "token_file": "/t", **vault},
                "providers": providers,
            }
        )

    old = parse("openai", "gone")
    new = parse("openai", "added", mount="kv", refresh_interval_s=5.0)
    assert changed_keys(old, new) == [
        "providers.added",
        "providers.gone",
        "vault.mount",
        "vault.refresh_interval_s",
    ]
    kept = keep_restart_only(old, new)
    assert (kept.vault.mount, kept.vault.refresh_interval_s) == ("secret", 5.0)
    assert set(kept.providers) == {"openai", "added"}
