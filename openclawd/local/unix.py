"""Unix listening sockets: creation with mode and group, stale-file handling, cleanup.

Owns the socket files on disk. A socket file is created with no permissions at all (bound
under umask 0777), then given its mode and group, then put to listen: no client ever sees
it with looser permissions than configured. A path held by a live daemon is refused (and
bind() itself refuses a path another process took in the meantime); a stale socket file
left by a crash is replaced; a path that is not a socket is never touched. On exit the
file is removed only if it is still ours (same inode), so a successor's socket survives
our late cleanup. Knows nothing of HTTP or WebSockets.
"""

from __future__ import annotations

import errno
import grp
import os
import socket
import stat
import struct
from dataclasses import dataclass

from openclawd import logs
from openclawd.errors import ListenError

log = logs.get(__name__)

# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_PATH_BYTES = 107


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """Who is on the other end of a unix socket, as the kernel saw it at connect()."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """SO_PEERCRED of a connected unix socket (trio or stdlib socket objects both work)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid, uid, gid)


def listen_backlog(max_connections: int) -> int:
    """A listen backlog above any burst we promise to answer.

    A full unix backlog does not refuse new clients, it leaves them hanging in connect()
    (trio clients included), so the queue must hold a flood of connections that we will
    accept and then refuse politely (1013). The kernel silently caps the value at
    ``net.core.somaxconn``; we say so when that cap is below what we asked for.
    """
    wanted = min(65535, max(4096, 2 * max_connections))
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            cap = int(f.read())
    except (OSError, ValueError):
        return wanted
    if cap < wanted:
        log.warning(
            "socket.backlog_capped", wanted=wanted, somaxconn=cap, hint="raise net.core.somaxconn"
        )
    return wanted


def resolve_group(group: str, *, key: str) -> int | None:
    """The gid for a group name (or number); None for "" (keep the daemon's group)."""
    if not group:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise ListenError(f"{key}: no such group {group!r}") from None


class UnixListenSocket:
    """A bound, listening unix stream socket that owns its path on disk.

    Use as a context manager: the file is removed on exit if it is still ours.
    """

    def __init__(
        self, path: str, *, mode: int, gid: int | None, backlog: int, key: str = "socket"
    ) -> None:
        self.path = path
        try:
            self.sock = _bind(path, mode=mode, gid=gid, backlog=backlog)
        except ListenError as exc:
            raise ListenError(f"{key}: {exc}") from None
        self._inode = os.stat(path).st_ino

    def __enter__(self) -> UnixListenSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket and remove its file if it is still ours. Idempotent."""
        if self.sock.fileno() != -1:
            self.sock.close()
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("socket.unlink_failed", path=self.path, error=exc.strerror)


def _bind(path: str, *, mode: int, gid: int | None, backlog: int) -> socket.socket:
    if not os.path.isabs(path):
        raise ListenError(f"socket path must be absolute: {path!r}")
    if len(os.fsencode(path)) > _MAX_PATH_BYTES:
        raise ListenError(f"socket path is longer than {_MAX_PATH_BYTES} bytes: {path!r}")
    _make_directories(os.path.dirname(path))
    _clear_stale(path)

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        # umask is process-wide; this runs at startup, before any other thread exists.
        umask = os.umask(0o777)
        try:
            sock.bind(path)
        finally:
            os.umask(umask)
        try:
            os.chmod(path, mode)
            if gid is not None:
                os.chown(path, -1, gid)
            sock.listen(backlog)
        except BaseException:
            os.unlink(path)
            raise
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(f"another process took {path} while we started") from None
        raise ListenError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _make_directories(directory: str) -> None:
    """Create the socket's missing parent directories with mode 0755, whatever the umask
    (systemd's UMask=0077 would otherwise make them unreachable for the apps)."""
    missing = []
    while directory and not os.path.isdir(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for path in reversed(missing):
        try:
            os.mkdir(path)
            os.chmod(path, 0o755)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ListenError(f"cannot create {path}: {exc.strerror}") from None


def _clear_stale(path: str) -> None:
    """Refuse a path a live daemon listens on; remove a dead one's socket file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        log.info("socket.stale_removed", path=path)
        os.unlink(path)
        return
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno == errno.EAGAIN:  # the backlog is full: very much alive
            raise ListenError(f"another process is listening on {path}") from None
        raise ListenError(f"cannot tell whether {path} is in use: {exc.strerror}") from None
    finally:
        probe.close()
    raise ListenError(f"another process is listening on {path}")
