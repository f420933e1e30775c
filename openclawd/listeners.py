"""What the daemon listens on, and the files it may need: the socket files of ``[listen]``
and ``[control]``, the control API's loopback TCP socket and its token, and the open-files
limit. Set up once, at start (none of these can change on reload).
"""

from __future__ import annotations

import resource
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from openclawd import logs
from openclawd.config import Config, ControlConfig, ListenConfig
from openclawd.credentials import CredentialError, read_credential
from openclawd.errors import ListenError
from openclawd.local.server import REFUSING_AT_ONCE
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
