"""Access (issue 9), in one place: who may use openclawd, and through what.

* A peer outside ``[listen] allowed_uids`` / ``allowed_gids`` is refused on every entry
  point of the data socket (/v1/ws and /v1/realtime close 1008 naming the peer, /v1/http
  answers 403 ``forbidden``) before anything reaches an upstream; a peer on the list is
  served on each of them (CONTRACT.md 3.4).
* The control TCP listener answers only ``Authorization: Bearer <token>`` and listens on
  the loopback address it was given, nowhere else; a non-loopback ``[control] tcp`` is a
  config error naming the key, in ``check-config`` and at startup (CONTRACT.md 1).
* Both socket files get the configured mode and group (CONTRACT.md 1).

The data-plane cases run in the test's own trio run (``tests/dataplane/harness.py``); the
rest run the real daemon process.
"""

from __future__ import annotations

import grp
import http.client
import ipaddress
import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from ..bao import BaoServer, free_port
from ..conftest import DaemonProcess
from ..dataplane.harness import DataPlane, call, close_of, open_app, open_dataplane, open_realtime
from ..fake_upstream import FakeUpstream, open_fake_upstream
from ..fake_ws_upstream import FakeWsUpstream, open_fake_ws_upstream

StartDaemon = Callable[..., DaemonProcess]
WriteConfig = Callable[..., Path]

UID, GID = os.getuid(), os.getgid()
CHANNEL = "/v1/ws"
REALTIME = "/v1/realtime/openai"
MODELS = "/v1/http/openai/v1/models"
ENTRY_POINTS = [CHANNEL, REALTIME, MODELS]
CHECKS = ["allowed_uids", "allowed_gids"]
REFUSAL = f"peer uid {UID} gid {GID} is not allowed"
LOOPBACK_ONLY = "must be a loopback address (127.0.0.0/8 or [::1])"


# --- 1. peer credentials on every entry point of the data socket ---------------------------


def id_list(check: str, *, with_ours: bool) -> dict[str, list[int]]:
    """``[listen] check = [...]`` holding an id that is not ours, and ours if ``with_ours``."""
    ours = UID if check == "allowed_uids" else GID
    return {check: [ours + 1, ours] if with_ours else [ours + 1]}


@asynccontextmanager
async def data_plane(
    bao: BaoServer, runtime: Path, listen: dict[str, Any]
) -> AsyncIterator[tuple[DataPlane, FakeUpstream, FakeWsUpstream]]:
    """The data socket with provider ``openai`` on both fakes: HTTP (/v1/ws, /v1/http)
    and WebSocket (/v1/realtime)."""
    async with (
        open_fake_upstream() as http_up,
        open_fake_ws_upstream() as ws_up,
        open_dataplane(
            bao, runtime, http_up.url, listen=listen, provider={"ws_url": ws_up.url}
        ) as dp,
    ):
        yield dp, http_up, ws_up


async def channel_close(socket_path: str) -> tuple[list[str | bytes], int | None, str | None]:
    """Open /v1/ws and read until the daemon closes (10 s at most): what it sent first,
    the close code and reason (None, None: it did not close)."""
    received: list[str | bytes] = []
    reason: trio_websocket.CloseReason | None = None
    stream = await trio.open_unix_socket(socket_path)
    async with stream, trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(nursery, stream, "openclawd", CHANNEL)
        with trio.move_on_after(10):
            try:
                while True:
                    received.append(await ws.get_message())
            except trio_websocket.ConnectionClosed as exc:
                reason = exc.reason
        nursery.cancel_scope.cancel()
    if reason is None:
        return received, None, None
    return received, reason.code, reason.reason


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("check", CHECKS)
async def test_a_peer_not_allowed_is_refused_before_any_upstream_work(
    shared_bao: BaoServer, runtime_dir: Path, check: str, entry: str
) -> None:
    with trio.fail_after(20):
        async with data_plane(shared_bao, runtime_dir, id_list(check, with_ours=False)) as (
            dp,
            http_up,
            ws_up,
        ):
            if entry == CHANNEL:
                # Not even the hello (it lists the providers): the close comes first.
                assert await channel_close(dp.socket_path) == ([], 1008, REFUSAL)
            elif entry == REALTIME:
                assert await close_of(dp.socket_path, entry) == (1008, REFUSAL)
            else:
                answer = await call(dp.socket_path, "GET", entry)
                assert answer.status == 403
                assert answer.headers["content-type"] == "application/json"
                assert answer.json() == {"error": {"code": "forbidden", "message": REFUSAL}}
            # Anything the refused connection had set off would have reached a fake by now.
            await trio.sleep(0.2)
            assert (http_up.connections_opened, http_up.requests) == (0, [])
            assert (ws_up.connections_opened, ws_up.handshakes) == (0, [])


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("check", CHECKS)
async def test_a_peer_on_the_list_is_served(
    shared_bao: BaoServer, runtime_dir: Path, check: str, entry: str
) -> None:
    with trio.fail_after(20):
        async with data_plane(shared_bao, runtime_dir, id_list(check, with_ours=True)) as (
            dp,
            http_up,
            ws_up,
        ):
            if entry == CHANNEL:
                async with open_app(dp.socket_path) as app:
                    assert app.hello["providers"] == ["openai"]
                    frames = await app.call("a", body={"model": "m"})
                    assert frames[-1]["type"] == "response.end"
                [seen] = http_up.requests
                assert seen.path == "/v1/chat/completions"
            elif entry == REALTIME:
                async with open_realtime(dp.socket_path, entry) as app:
                    await app.send("hello")
                    assert await app.recv() == "hello"
                    await app.close(1000, "done")
                assert len(ws_up.handshakes) == 1
            else:
                answer = await call(dp.socket_path, "GET", entry)
                assert answer.status == 200
                assert answer.json()["data"][0]["id"] == "gpt-fake"
                [seen] = http_up.requests
                assert (seen.method, seen.path) == ("GET", "/v1/models")


# --- 2. the control TCP listener ----------------------------------------------------------


def tcp_listeners(port: int) -> set[str]:
    """The local addresses of every socket listening on TCP ``port``, as the kernel shows
    them in /proc/net/tcp and /proc/net/tcp6."""
    found: set[str] = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            address, _, port_hex = fields[1].partition(":")
            if fields[3] != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            if sys.byteorder == "little":  # each 32-bit word is printed in host order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(str(ipaddress.ip_address(raw)))
    return found


def non_loopback_addresses() -> list[tuple[int, tuple[Any, ...]]]:
    """(family, sockaddr) of this machine's own addresses that are not loopback."""
    found: list[tuple[int, tuple[Any, ...]]] = []
    previous = ""
    with open("/proc/net/fib_trie") as trie:  # IPv4: "|-- ADDR" then "/32 host LOCAL"
        for line in trie:
            if line.split()[:3] == ["/32", "host", "LOCAL"]:
                address = ipaddress.IPv4Address(previous)
                if not address.is_loopback and (socket.AF_INET, (str(address),)) not in found:
                    found.append((socket.AF_INET, (str(address),)))
            previous = line.split()[-1]
    with open("/proc/net/if_inet6") as table:  # IPv6: address, interface index, ...
        for line in table:
            hex_address, index = line.split()[:2]
            address6 = ipaddress.IPv6Address(bytes.fromhex(hex_address))
            if not address6.is_loopback:
                found.append((socket.AF_INET6, (str(address6), 0, int(index, 16))))
    return found


def connect_to(family: int, address: tuple[Any, ...], port: int) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect((address[0], port, *address[1:]))


def get(host: str, port: int, target: str, headers: dict[str, str]) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", target, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]"])
def test_the_control_tcp_listener_wants_the_token_and_listens_on_loopback_only(
    start_daemon: StartDaemon, write_config: WriteConfig, runtime_dir: Path, host: str
) -> None:
    token = "tok-" + secrets.token_hex(20)
    token_file = runtime_dir / "control-token"
    token_file.write_text(token + "\n")
    port = free_port()
    daemon = start_daemon(
        write_config(control={"tcp": f"{host}:{port}", "token_file": str(token_file)})
    )
    daemon.wait_ready(timeout=30)
    address = host.strip("[]")

    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {token}x"},
        {"Authorization": f"Basic {token}"},
        {"Authorization": token},
    ):
        status, body = get(address, port, "/v1/status", headers)
        assert status == 401, headers
        assert body["error"] == "unauthorized"
    status, body = get(address, port, "/v1/status", {"Authorization": f"Bearer {token}"})
    assert status == 200
    assert body["state"] == "ready"

    # Bound to the configured loopback address, and to no other.
    assert tcp_listeners(port) == {address}
    for family, other in non_loopback_addresses():
        with pytest.raises(ConnectionRefusedError):
            connect_to(family, other, port)

    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0
    assert token not in daemon.stderr


NON_LOOPBACK = [
    ("0.0.0.0:9477", "0.0.0.0"),
    ("[::]:9477", "::"),
    ("192.0.2.2:9477", "192.0.2.2"),
    ("openclawd.example:9477", "openclawd.example"),
]


@pytest.mark.parametrize(("tcp", "host"), NON_LOOPBACK)
def test_check_config_refuses_a_control_tcp_address_off_loopback(
    write_config: WriteConfig, runtime_dir: Path, tcp: str, host: str
) -> None:
    token_file = runtime_dir / "control-token"
    token_file.write_text("tok-1\n")
    path = write_config(control={"tcp": tcp, "token_file": str(token_file)})
    done = subprocess.run(
        [sys.executable, "-m", "openclawd", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.splitlines() == [f"control.tcp: {LOOPBACK_ONLY}, not {host!r} (in {path})"]


def test_the_daemon_does_not_start_with_a_control_tcp_address_off_loopback(
    start_daemon: StartDaemon, write_config: WriteConfig, runtime_dir: Path
) -> None:
    token_file = runtime_dir / "control-token"
    token_file.write_text("tok-1\n")
    port = free_port()
    daemon = start_daemon(
        write_config(control={"tcp": f"0.0.0.0:{port}", "token_file": str(token_file)})
    )
    assert daemon.wait(timeout=30) == 2
    assert f"control.tcp: {LOOPBACK_ONLY}, not '0.0.0.0'" in daemon.stderr
    assert tcp_listeners(port) == set()
    assert list(runtime_dir.glob("*.sock")) == []


# --- 3. the socket files' mode and group --------------------------------------------------


def other_group() -> grp.struct_group:
    """A group we may give files to that is not our primary one: any, as root; otherwise
    one we are a member of."""
    choices = (g.gr_gid for g in grp.getgrall()) if os.geteuid() == 0 else os.getgroups()
    gid = next((g for g in choices if g != os.getegid()), None)
    assert gid is not None, "the test needs a second group this user may use"
    return grp.getgrgid(gid)


@pytest.mark.parametrize(
    ("mode", "other_group_on"),
    [("0600", "listen"), ("0660", "control"), (None, None)],
    ids=["0600-other-group-on-data", "0660-other-group-on-control", "defaults"],
)
def test_socket_files_get_the_configured_mode_and_group(
    start_daemon: StartDaemon,
    write_config: WriteConfig,
    runtime_dir: Path,
    mode: str | None,
    other_group_on: str | None,
) -> None:
    primary = grp.getgrgid(os.getegid()).gr_name
    tables: dict[str, dict[str, str]] = {"listen": {}, "control": {}}
    if mode is not None:
        for keys in tables.values():
            keys["mode"] = mode
            keys["group"] = primary  # by name: it resolves
        assert other_group_on is not None
        tables[other_group_on]["group"] = other_group().gr_name
    daemon = start_daemon(write_config(**tables))
    daemon.wait_ready(timeout=30)

    for table, name in (("listen", "data.sock"), ("control", "control.sock")):
        st = (runtime_dir / name).stat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == int(mode or "0660", 8), table
        group = tables[table].get("group", primary)  # "" or no key: the daemon's group
        assert st.st_gid == grp.getgrnam(group).gr_gid, table
        assert st.st_uid == os.geteuid()

    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0
