"""systemd socket activation (CONTRACT.md 6): the listening sockets systemd hands over.

Owns sd_listen_fds(3)'s protocol, written out (no libsystemd): when ``LISTEN_PID`` is our
pid, the ``LISTEN_FDS`` descriptors from 3 on are ours, named in order by
``LISTEN_FDNAMES`` (``FileDescriptorName=`` of their ``.socket`` unit; one unit names all
its sockets alike). The three variables are removed from the environment whatever they
hold, so that no child inherits them. Each descriptor named ``data`` or ``control`` must be
a listening ``AF_UNIX`` stream socket; anything else is a startup error naming the
descriptor and what it is. The socket files are the ``.socket`` units' (their mode and
group too): nothing here creates, changes or removes a file.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

from openclawd.errors import ListenError

LISTEN_FDS_START = 3
NAMES = ("data", "control")
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def inherited_sockets(
    environ: MutableMapping[str, str] = os.environ,
    pid: int | None = None,
    start: int = LISTEN_FDS_START,
) -> dict[str, socket.socket]:
    """The listening sockets systemd passed us, by name (``data``, ``control``); empty
    when the process was not socket-activated (or the variables were meant for another
    process: ``LISTEN_PID`` is not ``pid``, our own by default). ``start`` is the first
    descriptor (systemd's is 3; tests pass others).

    Raises:
        ListenError: the variables do not agree, a name is not ``data`` or ``control`` or
            comes twice, or a descriptor is not a listening unix stream socket.
    """
    listen_pid, count, names = (environ.pop(name, None) for name in _VARIABLES)
    if listen_pid is None or count is None:
        return {}
    if listen_pid != str(os.getpid() if pid is None else pid):
        return {}
    if not count.isdigit():
        raise ListenError(f"LISTEN_FDS: not a number of descriptors: {count!r}")
    fds = range(start, start + int(count))
    labels = names.split(":") if names is not None else []
    if len(labels) != len(fds):
        raise ListenError(
            f"LISTEN_FDNAMES names {len(labels)} descriptors, LISTEN_FDS passes {len(fds)}: "
            "name each socket with FileDescriptorName=data or =control"
        )
    sockets: dict[str, socket.socket] = {}
    try:
        for fd, name in zip(fds, labels, strict=True):
            if name not in NAMES:
                raise ListenError(
                    f"descriptor {fd} is named {name!r}; openclawd serves sockets named "
                    "'data' and 'control' (FileDescriptorName=)"
                )
            if name in sockets:
                raise ListenError(f"two descriptors are named {name!r}: one socket each, please")
            sockets[name] = _listening_unix_socket(fd, name)
    except ListenError:
        for sock in sockets.values():
            sock.detach()  # left as found: a socket object closes its descriptor when freed
        raise
    return sockets


def _listening_unix_socket(fd: int, name: str) -> socket.socket:
    """Descriptor ``fd`` as a socket object, checked to be what a listener must be."""
    os.set_inheritable(fd, False)
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ListenError(f"descriptor {fd} ({name}) is not a socket: {exc.strerror}") from None
    what = None
    if sock.family != socket.AF_UNIX:
        what = f"a {sock.family.name} socket, not AF_UNIX"
    elif sock.type != socket.SOCK_STREAM:
        what = f"a {sock.type.name} socket, not SOCK_STREAM (ListenStream=)"
    elif not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        what = "not listening"
    if what is not None:
        sock.detach()  # the descriptor is systemd's to close
        raise ListenError(f"descriptor {fd} ({name}) is {what}")
    sock.setblocking(False)
    return sock
