"""Vault answering 500, 403 or too slowly: the keys in force stay, and Vault is retried on
the manager's backoff, not hammered; when Vault answers again the manager follows it.

A scripted HTTP proxy (trio + h11) sits between the manager's real Vault client (hvac in
worker threads) and a real OpenBao dev server. It forwards every request to bao, records
each one it receives (when, path, and the mode it was in), and can be switched at any
moment to answer everything with 500 or 403 (Vault's JSON error shape) or to hold every
answer far longer than the client's ``request_timeout_s``. The requests it counts are the
requests Vault would have seen.

Real time, short outages. The manager's ``jitter`` is fixed at 0.5, the mean of full
jitter's uniform draw: the backoff waits are then exactly 0.5 x 1, 2, 4, ... s (base 1 s,
doubling, far below the 300 s cap), so the most requests an outage can see is a number
(``most_attempts``), not a probability. With the real ``random.random`` a run of small
draws could legitimately retry sooner: full jitter has no minimum wait.
"""

from __future__ import annotations

import functools
import json
import math
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import h11
import pytest
import trio

from openclawd import config
from openclawd.keys.manager import (
    AUTH_REREAD_INTERVAL_S,
    BACKOFF_BASE_S,
    BACKOFF_CAP_S,
    Key,
    KeyManager,
)
from openclawd.keys.vault import Vault
from openclawd.lifecycle import Lifecycle

from ..bao import KV_MOUNT, BaoServer

PROVIDER = "openai"
JITTER = 0.5  # the mean of full jitter: backoff waits 0.5, 1, 2, 4 ... s
REFRESH_S = 0.2  # the metadata poll while Vault is well
OUTAGE_S = 3.0
# The longest a request may take from the manager's worker thread to the proxy: the first
# failed request of an outage may have been sent just before the proxy was switched.
LATENCY_S = 0.5
SLOW_TIMEOUT_S = 0.5  # request_timeout_s of the slow-Vault test
HOLD_S = 20 * SLOW_TIMEOUT_S
# A failure timeout for the recovery, not a measure of it: far below BACKOFF_CAP_S, so a
# backoff stuck at its cap fails the test.
RECOVERY_TIMEOUT_S = 10.0  # how long the slow proxy sits on a request

FORWARD, FAIL_500, FAIL_403, SLOW = "forward", "500", "403", "slow"
LOOKUP_SELF = "/v1/auth/token/lookup-self"

_T = TypeVar("_T")


# --- the scripted proxy -------------------------------------------------------------------


@dataclass
class Seen:
    """One request the proxy received."""

    at: float  # trio time
    mode: str  # what the proxy was scripted to do when the request arrived
    method: str
    path: str  # without the query
    answered: bool = False
    cut_after_s: float | None = None  # SLOW: when the client gave up, after ``at``


class ClientGoneError(Exception):
    pass


def _vault_error(status: int, message: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = json.dumps({"errors": [message]}).encode()
    return status, [(b"content-type", b"application/json")], body


_HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host"}


async def _next_event(stream: trio.SocketStream, conn: h11.Connection) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(65536))


class VaultProxy:
    """Forwards to bao, or answers 500 / 403, or holds every answer, as ``mode`` says."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.mode = FORWARD
        self.seen: list[Seen] = []
        self.url = ""

    def during(self, mode: str) -> list[Seen]:
        return [s for s in self.seen if s.mode == mode]

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listener.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        async with listener, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            conn = h11.Connection(h11.SERVER)
            try:
                while await self._exchange(stream, conn):
                    conn.start_next_cycle()
            except (ClientGoneError, trio.BrokenResourceError, h11.RemoteProtocolError):
                return  # the client closed or reset its connection

    async def _exchange(self, stream: trio.SocketStream, conn: h11.Connection) -> bool:
        """One request and its answer; False when the connection is over."""
        request = await _next_event(stream, conn)
        if isinstance(request, h11.ConnectionClosed):
            return False
        assert isinstance(request, h11.Request), request
        body = bytearray()
        while not isinstance(event := await _next_event(stream, conn), h11.EndOfMessage):
            assert isinstance(event, h11.Data), event
            body += event.data
        target = request.target.decode("ascii")
        seen = Seen(trio.current_time(), self.mode, request.method.decode(), target.split("?")[0])
        self.seen.append(seen)
        if seen.mode == FAIL_500:
            status, headers, content = _vault_error(500, "internal error")
        elif seen.mode == FAIL_403:
            status, headers, content = _vault_error(403, "permission denied")
        else:
            if seen.mode == SLOW:
                await self._hold(stream, seen)
            status, headers, content = await self._forward(request, bytes(body))
        headers = [*headers, (b"content-length", str(len(content)).encode())]
        await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=content)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        seen.answered = True
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _hold(self, stream: trio.SocketStream, seen: Seen) -> None:
        """Sit on the request for HOLD_S; note when the client gives up (EOF or reset)."""
        with trio.move_on_after(HOLD_S):
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            assert data == b"", "the client sent more while waiting for its answer"
            seen.cut_after_s = trio.current_time() - seen.at
            raise ClientGoneError

    async def _forward(
        self, request: h11.Request, body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """The same request to bao on a connection of its own; its whole answer."""
        headers = [(n, v) for n, v in request.headers if n.lower() not in _HOP_BY_HOP]
        headers += [
            (b"host", f"127.0.0.1:{self.upstream_port}".encode()),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        async with await trio.open_tcp_stream("127.0.0.1", self.upstream_port) as upstream:
            conn = h11.Connection(h11.CLIENT)
            out = conn.send(
                h11.Request(method=request.method, target=request.target, headers=headers)
            )
            out += conn.send(h11.Data(data=body)) if body else b""
            out += conn.send(h11.EndOfMessage())
            await upstream.send_all(out)
            response = await _next_event(upstream, conn)
            assert isinstance(response, h11.Response), response
            content = bytearray()
            while not isinstance(event := await _next_event(upstream, conn), h11.EndOfMessage):
                assert isinstance(event, h11.Data), event
                content += event.data
        kept = [(n, v) for n, v in response.headers if n.lower() not in _HOP_BY_HOP]
        return response.status_code, kept, bytes(content)


# --- the manager behind it ----------------------------------------------------------------


@dataclass
class Rig:
    proxy: VaultProxy
    manager: KeyManager
    lifecycle: Lifecycle
    bao: BaoServer
    path: str

    def key(self) -> Key:
        key = self.manager.current(PROVIDER)
        assert key is not None
        return key


async def admin(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """A blocking admin call to bao (hvac, root token) in a worker thread."""
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


@asynccontextmanager
async def open_rig(
    bao: BaoServer, tmp_path: Path, *, request_timeout_s: float = 2.0
) -> AsyncIterator[Rig]:
    """A KeyManager (real Vault client, root token) whose Vault address is the proxy's;
    returns once the key (version 1) is loaded through the proxy."""
    path = f"openclawd-faults/{uuid.uuid4().hex[:12]}/{PROVIDER}"
    assert await admin(bao.write, path, api_key="sk-fault-0001") == 1
    token_file = tmp_path / "vault-token"
    token_file.write_text(bao.root_token + "\n")
    async with trio.open_nursery() as nursery:
        proxy = VaultProxy(bao.port)
        await nursery.start(proxy.serve)
        cfg = config.parse(
            {
                "vault": {
                    "addr": proxy.url,
                    "auth": "token",
                    "token_file": str(token_file),
                    "mount": KV_MOUNT,
                    "refresh_interval_s": REFRESH_S,
                    "request_timeout_s": request_timeout_s,
                },
                "providers": {PROVIDER: {"base_url": "http://127.0.0.1:9", "vault_path": path}},
            },
            source=str(tmp_path / "openclawd.toml"),
            environ={},
        )
        lifecycle = Lifecycle()
        lifecycle.set_listening()
        manager = KeyManager(cfg, Vault(cfg.vault), lifecycle, jitter=lambda: JITTER)
        await nursery.start(manager.serve)
        rig = Rig(proxy, manager, lifecycle, bao, path)
        assert rig.key().version == 1
        assert manager.statistics().reachable
        yield rig
        nursery.cancel_scope.cancel()


async def polled(rig: Rig) -> None:
    """Wait until the manager has polled Vault's metadata through the proxy twice."""
    metadata = f"/v1/{KV_MOUNT}/metadata/{rig.path}"
    await wait_for(lambda: paths(rig.proxy.seen)[metadata] >= 2, "two polls", 5.0)


async def wait_for(predicate: Callable[[], object], what: str, within_s: float) -> float:
    """Poll ``predicate`` until true; returns the seconds it took."""
    start = trio.current_time()
    while not predicate():  # noqa: ASYNC110 - the manager has no change event to wait on
        if trio.current_time() - start > within_s:
            raise AssertionError(f"not within {within_s} s: {what}")
        await trio.sleep(0.02)
    return trio.current_time() - start


def most_attempts(window_s: float) -> int:
    """The most attempts one retry loop of the manager can make within ``window_s``.

    ``KeyManager._backoff(k)`` waits ``jitter * min(cap, base * 2**k)`` after its k-th
    failure (k = 0, 1, ...), so attempt k comes at least ``JITTER * (2**k - 1)`` s after the
    first (more when the requests themselves take time): k <= log2(window / JITTER + 1).
    """
    assert JITTER * BACKOFF_BASE_S * (window_s / JITTER + 1) < BACKOFF_CAP_S  # cap not reached
    return 1 + math.floor(math.log2(window_s / (JITTER * BACKOFF_BASE_S) + 1))


async def outage(rig: Rig, mode: str, key: Key, *, also: Callable[[], None] | None = None) -> float:
    """Script ``mode`` for OUTAGE_S (and until two requests met it) while checking, every
    50 ms, that ``key`` stays in force; a new version (2) is written to bao itself meanwhile.
    Returns the outage's length, as the window its requests may have been sent in
    (LATENCY_S before it included)."""
    start = trio.current_time()
    rig.proxy.mode = mode
    await admin(rig.bao.write, rig.path, api_key="sk-fault-0002")  # Vault has news meanwhile
    # At least OUTAGE_S, and until two requests met the outage (the tests' lower bound is
    # then a fact, not a bet on how fast a loaded machine runs the poll).
    while trio.current_time() - start < OUTAGE_S or len(rig.proxy.during(mode)) < 2:
        assert rig.manager.current(PROVIDER) is key  # the very key, throughout
        if also is not None:
            also()
        await trio.sleep(0.05)
    rig.proxy.mode = FORWARD
    return trio.current_time() - start + LATENCY_S


def assert_kept(rig: Rig, key: Key) -> None:
    assert rig.manager.current(PROVIDER) is key
    snapshot = rig.manager.statistics().providers[PROVIDER].key
    assert snapshot is not None
    assert (snapshot.version, snapshot.fingerprint) == (1, key.fingerprint)
    assert rig.lifecycle.state.value == "degraded"
    assert rig.lifecycle.ready  # degraded still serves
    assert rig.lifecycle.degradations() == ["vault unreachable"]


async def assert_recovers(rig: Rig, key: Key) -> float:
    """Vault answers again: the manager follows it (version 2) by itself, on the backoff's
    next attempt (``RECOVERY_TIMEOUT_S`` is far below the backoff's cap)."""
    took = await wait_for(
        lambda: rig.manager.statistics().reachable and rig.key().version == 2,
        "reachable again, on version 2",
        RECOVERY_TIMEOUT_S,
    )
    stats = rig.manager.statistics()
    assert stats.last_error is None
    assert stats.providers[PROVIDER].last_error is None
    assert rig.key() is not key
    assert rig.key().secret == "sk-fault-0002"
    await wait_for(lambda: rig.lifecycle.state.value == "ready", "ready again", 2.0)
    return took


def measured(request: pytest.FixtureRequest, name: str, value: object) -> None:
    """Keep the counts with the test's report (``--junitxml`` shows them)."""
    request.node.user_properties.append((name, value))


def paths(seen: list[Seen]) -> Counter[str]:
    return Counter(s.path for s in seen)


# --- the tests ----------------------------------------------------------------------------


async def test_vault_answering_500_backs_off_keeps_the_key_and_recovers(
    shared_bao: BaoServer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    with trio.fail_after(25):
        async with open_rig(shared_bao, tmp_path) as rig:
            key = rig.key()
            metadata = f"/v1/{KV_MOUNT}/metadata/{rig.path}"
            await polled(rig)  # the poll, every REFRESH_S, via the proxy

            window = await outage(rig, FAIL_500, key)
            assert_kept(rig, key)
            stats = rig.manager.statistics()
            assert stats.reachable is False
            assert stats.last_error == "Vault answered InternalServerError: internal error"
            assert stats.vault_errors >= 1

            failed = rig.proxy.during(FAIL_500)
            # Only the poll talks to Vault here (a 500 is no reason to log in again), and it
            # backs off: OUTAGE_S at REFRESH_S would be 15 polls, a backoff of 0 hundreds.
            assert set(paths(failed)) == {metadata}, paths(failed)
            assert 2 <= len(failed) <= most_attempts(window), (len(failed), window)

            took = await assert_recovers(rig, key)
            measured(request, "vault_500", {"requests": len(failed), "recovered_s": took})


async def test_vault_answering_403_backs_off_with_bounded_relogins_and_keeps_the_key(
    shared_bao: BaoServer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    with trio.fail_after(25):
        async with open_rig(shared_bao, tmp_path) as rig:
            key = rig.key()
            await polled(rig)

            window = await outage(rig, FAIL_403, key)
            assert_kept(rig, key)
            stats = rig.manager.statistics()
            assert stats.reachable is False
            refused_read = (
                f"Vault refused read on {KV_MOUNT}/metadata/{rig.path}: permission denied"
                ' (the token\'s policy needs "read" on it)'
            )
            refused_token = (
                "Vault refused the token: permission denied (it is invalid, expired or revoked)"
            )
            # The last of the poll's refusal and the re-login's it woke.
            assert stats.last_error in (refused_read, refused_token)
            assert stats.providers[PROVIDER].last_error == refused_read

            refused = paths(rig.proxy.during(FAIL_403))
            metadata = f"/v1/{KV_MOUNT}/metadata/{rig.path}"
            assert set(refused) == {metadata, LOOKUP_SELF}, refused
            polls, logins = refused[metadata], refused[LOOKUP_SELF]
            # The poll backs off as for a 500.
            assert 2 <= polls <= most_attempts(window), (refused, window)
            # A refused read means "perhaps our token expired": every failed poll wakes the
            # token task, which logs in again (token auth: lookup-self) and, refused too,
            # backs off on a schedule of its own. So its attempts are at most one per failed
            # poll plus those its own timer wakes: distinct waits 0.5 x 2**k s, disjoint, that
            # fit in the window, i.e. most_attempts(window) - 1 of them.
            assert 1 <= logins <= polls + most_attempts(window) - 1, (refused, window)

            took = await assert_recovers(rig, key)
            measured(request, "vault_403", {"polls": polls, "logins": logins, "recovered_s": took})


async def test_vault_answering_too_slowly_is_cut_by_the_timeout_and_backs_off(
    shared_bao: BaoServer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    with trio.fail_after(25):
        async with open_rig(shared_bao, tmp_path, request_timeout_s=SLOW_TIMEOUT_S) as rig:
            key = rig.key()
            await polled(rig)

            window = await outage(rig, SLOW, key)
            assert_kept(rig, key)
            stats = rig.manager.statistics()
            assert stats.reachable is False
            assert stats.last_error == (
                f"Vault at {rig.proxy.url} did not answer within {SLOW_TIMEOUT_S:g}s"
            )

            held = rig.proxy.during(SLOW)
            # Each held request given up by the client (its read timed out: last_error
            # above), none waited out: the proxy would have sat on it for HOLD_S.
            await wait_for(
                lambda: all(s.cut_after_s is not None for s in held),
                "every held request given up by the client",
                HOLD_S,
            )
            cut = sorted(s.cut_after_s or 0.0 for s in held)
            assert not any(s.answered for s in held)
            assert set(paths(held)) == {f"/v1/{KV_MOUNT}/metadata/{rig.path}"}, paths(held)
            # Each attempt also takes request_timeout_s: fewer still than most_attempts.
            assert 2 <= len(held) <= most_attempts(window), (len(held), window)

            took = await assert_recovers(rig, key)
            measured(
                request,
                "vault_slow",
                {"requests": len(held), "cut_after_s": cut, "recovered_s": took},
            )


async def test_an_upstream_401_burst_while_vault_answers_500_reads_vault_once(
    shared_bao: BaoServer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    with trio.fail_after(25):
        async with open_rig(shared_bao, tmp_path) as rig:
            key = rig.key()
            data = f"/v1/{KV_MOUNT}/data/{rig.path}"
            rig.proxy.mode = FAIL_500
            reads = []
            for burst in range(2):  # two bursts, the re-read interval apart
                if burst:
                    await trio.sleep(AUTH_REREAD_INTERVAL_S)
                before = paths(rig.proxy.seen)[data]
                results: list[Key | None] = []

                async def refused(results: list[Key | None] = results) -> None:
                    results.append(await rig.manager.auth_failure(PROVIDER, key))

                async with trio.open_nursery() as nursery:
                    for _ in range(50):
                        nursery.start_soon(refused)
                reads.append(paths(rig.proxy.seen)[data] - before)
                # All 50 got the key in force: Vault had nothing newer to give.
                assert len(results) == 50
                assert all(result is key for result in results)
            assert reads == [1, 1]  # one Vault read per burst, coalesced
            assert_kept(rig, key)
            stats = rig.manager.statistics()
            assert stats.reachable is False
            assert stats.last_error == "Vault answered InternalServerError: internal error"
            measured(request, "vault_401_burst", {"reads_per_burst_of_50": reads})


@pytest.mark.parametrize("window_s", [1.0, 3.5, 6.0])
def test_most_attempts_follows_the_schedule(window_s: float) -> None:
    # Attempts at 0, 0.5, 1.5, 3.5, 7.5 s after the first (waits 0.5, 1, 2, 4 s).
    assert most_attempts(window_s) == {1.0: 2, 3.5: 4, 6.0: 4}[window_s]


async def test_upstream_401s_one_after_another_while_vault_answers_500_are_bounded(
    shared_bao: BaoServer, tmp_path: Path
) -> None:
    """An app at 20 requests/s on a key the provider refuses, while Vault fails: each 401
    may re-read Vault only once per AUTH_REREAD_INTERVAL_S (it was one read per request)."""
    with trio.fail_after(25):
        async with open_rig(shared_bao, tmp_path) as rig:
            key = rig.key()
            data = f"/v1/{KV_MOUNT}/data/{rig.path}"
            rig.proxy.mode = FAIL_500
            start = trio.current_time()
            for _ in range(20):
                assert await rig.manager.auth_failure(PROVIDER, key) is key
                await trio.sleep(0.05)
            window = trio.current_time() - start
            reads = paths(rig.proxy.during(FAIL_500))[data]
            assert reads <= 1 + window / AUTH_REREAD_INTERVAL_S, (reads, window)
            assert_kept(rig, key)
