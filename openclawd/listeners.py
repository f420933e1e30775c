"""What the daemon listens on, and the files it may need: the socket files of ``[listen]``
and ``[control]`` (or the sockets systemd passed, ``activation.py``), the control API's
loopback TCP socket and its token, and the open-files limit. Set up once, at start (none of
these can change on reload).
"""

from __future__ import annotations

import resource
import socket
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Protocol

import trio

from openclawd import activation, logs
from openclawd.config import Config, ControlConfig, ListenConfig
from openclawd.credentials import CredentialError, read_credential
from openclawd.errors import ListenError
from openclawd.lifecycle import Lifecycle
from openclawd.local.server import REFUSING_AT_ONCE, LocalServer
from openclawd.local.unix import UnixListenSocket, resolve_group

log = logs.get("openclawd.daemon")


def control_token(control: ControlConfig) -> str | None:
    """The control TCP listener's bearer token, read at start; None without a listener.

    Raises:
        ListenError: the token file cannot be read (or is empty).
    """
    if not control.tcp:
        return None
    try:
        return read_credential(control.token_file, what="control.token_file")
    except CredentialError as exc:
        raise ListenError(str(exc)) from None


@contextmanager
def listen_tcp(address: str) -> Iterator[socket.socket]:
    """The control API's loopback TCP socket (``[control] tcp``, checked to be loopback).

    Raises:
        ListenError: the address cannot be bound (e.g. the port is taken).
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ListenError(f"control.tcp: cannot listen on {address}: {exc.strerror}") from None
    with sock:
        yield sock


def listen_unix(section: ListenConfig | ControlConfig, name: str, backlog: int) -> UnixListenSocket:
    """The socket file of a ``[listen]`` or ``[control]`` table, with its mode and group."""
    gid = resolve_group(section.group, key=f"{name}.group")
    return UnixListenSocket(
        section.socket, mode=section.mode, gid=gid, backlog=backlog, key=f"{name}.socket"
    )


class Listening(Protocol):
    """A listening unix socket the daemon serves, and the path apps reach it by."""

    sock: socket.socket
    path: str


class InheritedSocket:
    """A listening socket systemd passed: closed on exit, its file left in place (it is the
    ``.socket`` unit's, and apps keep connecting to it while no daemon runs)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        name = sock.getsockname()
        self.path = name if isinstance(name, str) else repr(name)

    def __enter__(self) -> InheritedSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()


def open_listeners(
    config: Config,
    backlog: int,
    stack: ExitStack,
    inherited: Mapping[str, socket.socket] | None = None,
) -> tuple[Listening, Listening]:
    """The data and control sockets, each inherited from systemd if it passed one (from
    ``inherited``, by default read from the environment), else created from the config;
    closed (and the created files removed) when ``stack`` closes.

    Raises:
        ListenError: an inherited socket is unusable, or a socket cannot be created.
    """
    if inherited is None:
        inherited = activation.inherited_sockets()
    opened: list[Listening] = []
    for name, section, key in (
        ("data", config.listen, "listen"),
        ("control", config.control, "control"),
    ):
        sock = inherited.get(name)
        if sock is None:
            opened.append(stack.enter_context(listen_unix(section, key, backlog)))
            continue
        given = stack.enter_context(InheritedSocket(sock))
        log.info("socket.inherited", name=name, path=given.path)
        if given.path != section.socket:
            log.warning(
                "socket.inherited_elsewhere", name=name, path=given.path, config=section.socket
            )
        opened.append(given)
    return opened[0], opened[1]


# How long the data socket systemd passed waits for the keys before it accepts anyway.
INHERITED_KEY_WAIT_S = 15.0


async def serve_data(
    local: LocalServer,
    lifecycle: Lifecycle,
    data: Listening,
    connections: trio.Nursery,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the data socket until cancelled. One that systemd passed may hold apps that
    connected while no daemon ran (a restart): it is accepted on once nothing holds
    readiness back (every required provider has its key), or after
    ``INHERITED_KEY_WAIT_S``, so that they meet a daemon with keys rather than ``no_key``.
    """
    if not isinstance(data, InheritedSocket):
        await local.serve(data.sock, connections, task_status=task_status)
        return
    task_status.started()
    with trio.move_on_after(INHERITED_KEY_WAIT_S):
        await lifecycle.wait_unblocked()
    await local.serve(data.sock, connections)


# Files besides connections: Vault's, the log, the sockets, the interpreter's own.
_FILES_SPARE = 64


def files_needed(config: Config) -> int:
    """Open files the daemon may need at its limits: two per app connection (a realtime
    session is one upstream connection too), the connections being refused, every
    provider's pool, and some spare."""
    pools = sum(p.max_connections for p in config.providers.values())
    return 2 * config.listen.max_connections + REFUSING_AT_ONCE + pools + _FILES_SPARE


def raise_file_limit(needed: int) -> int:
    """Raise the soft limit on open files to the hard one, as far as the system allows,
    and return it; warn if it is below ``needed``. (systemd's default soft limit, 1024,
    is below what the default ``max_connections`` needs; the daemon uses epoll, never
    select, so a high limit costs nothing.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # over the kernel's nr_open: keep the soft limit
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("daemon.file_limit_low", limit=soft, needed=needed)
    return soft
