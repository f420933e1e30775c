"""Socket files: mode and group before anyone can connect, stale vs live, cleanup, limits."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from openclawd.config import ListenConfig
from openclawd.errors import ListenError
from openclawd.local.server import peer_allowed
from openclawd.local.unix import PeerCredentials, UnixListenSocket, listen_backlog


@pytest.fixture
def strict_umask() -> Iterator[None]:
    old = os.umask(0o077)  # what systemd's UMask=0077 gives the daemon
    yield
    os.umask(old)


def open_socket(path: Path, mode: int = 0o660) -> UnixListenSocket:
    return UnixListenSocket(str(path), mode=mode, gid=None, backlog=16, key="listen.socket")


def test_mode_is_applied_and_the_file_removed_on_close(runtime_dir: Path) -> None:
    path = runtime_dir / "a.sock"
    with open_socket(path, 0o640) as listener:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))  # it listens
        assert listener.sock.fileno() != -1
    assert not path.exists()


def test_missing_directories_are_created_reachable_despite_the_umask(
    runtime_dir: Path, strict_umask: None
) -> None:
    path = runtime_dir / "sub" / "dir" / "a.sock"
    with open_socket(path):
        assert stat.S_IMODE((runtime_dir / "sub").stat().st_mode) == 0o755
        assert stat.S_IMODE((runtime_dir / "sub" / "dir").stat().st_mode) == 0o755
        assert stat.S_IMODE(path.stat().st_mode) == 0o660


def test_the_longest_legal_path_works_and_one_more_byte_is_refused(runtime_dir: Path) -> None:
    longest = runtime_dir / ("d" * (100 - len(str(runtime_dir)))) / "s"
    longest = Path(str(longest) + "x" * (107 - len(str(longest))))
    assert len(str(longest)) == 107
    with open_socket(longest):
        assert stat.S_ISSOCK(longest.stat().st_mode)
    with pytest.raises(ListenError, match=r"^listen\.socket: socket path is longer than 107"):
        open_socket(Path(str(longest) + "y"))


def test_a_successors_socket_survives_our_late_cleanup(runtime_dir: Path) -> None:
    path = runtime_dir / "a.sock"
    ours = open_socket(path)
    path.unlink()  # someone (a successor) took the path over
    with socket.socket(socket.AF_UNIX) as successor:
        successor.bind(str(path))
        ours.close()
        assert path.exists()
        ours.close()  # idempotent


def test_a_live_socket_is_refused(runtime_dir: Path) -> None:
    path = runtime_dir / "a.sock"
    with open_socket(path):
        with pytest.raises(ListenError, match="another process is listening on"):
            open_socket(path)
        assert stat.S_ISSOCK(path.stat().st_mode)


def test_backlog_is_sized_above_bursts_and_capped() -> None:
    assert listen_backlog(1024) == 4096
    assert listen_backlog(10_000) == 20_000
    assert listen_backlog(1_000_000) == 65535


@pytest.mark.parametrize(
    ("uids", "gids", "peer", "allowed"),
    [
        ((), (), PeerCredentials(1, 1000, 1000), True),
        ((1000,), (), PeerCredentials(1, 1000, 5), True),
        ((1000,), (), PeerCredentials(1, 1001, 5), False),
        ((), (50,), PeerCredentials(1, 1001, 50), True),
        ((), (50,), PeerCredentials(1, 1001, 51), False),
        ((1000,), (50,), PeerCredentials(1, 1000, 50), True),
        ((1000,), (50,), PeerCredentials(1, 1000, 51), False),  # each list is its own check
        ((1000,), (50,), PeerCredentials(1, 0, 50), False),  # root is not special
    ],
)
def test_peer_allowed(
    uids: tuple[int, ...], gids: tuple[int, ...], peer: PeerCredentials, allowed: bool
) -> None:
    assert peer_allowed(peer, ListenConfig(allowed_uids=uids, allowed_gids=gids)) is allowed
