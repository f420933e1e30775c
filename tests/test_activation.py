"""systemd socket activation's protocol (sd_listen_fds(3), CONTRACT.md 6): which
descriptors are ours, by name, checked to be listening unix stream sockets, and the
variables gone from the environment whatever they held. The daemon served on inherited
sockets across a restart: tests/integration/test_socket_activation.py."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from pathlib import Path

import pytest

from openclawd import activation
from openclawd.errors import ListenError

# Far above anything the test process has open: where "systemd" puts the descriptors.
START = 900


@pytest.fixture
def fds() -> Iterator[ExitStack]:
    """Closes whatever a test put at START and above."""
    with ExitStack() as stack:
        yield stack
    for fd in range(START, START + 4):
        with suppress(OSError):
            os.close(fd)


def listening(path: Path, kind: int = socket.SOCK_STREAM, listen: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.bind(str(path))
    if listen:
        sock.listen()
    return sock


def pass_at(*socks: socket.socket | int) -> None:
    """Put each socket (or descriptor) at START, START + 1, ... as systemd would."""
    for i, sock in enumerate(socks):
        os.dup2(sock if isinstance(sock, int) else sock.fileno(), START + i)


def environ(names: str | None, count: int = 2, pid: int | None = None) -> dict[str, str]:
    env = {"LISTEN_PID": str(os.getpid() if pid is None else pid), "LISTEN_FDS": str(count)}
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    return {**env, "PATH": "/usr/bin"}


def test_without_the_variables_nothing_is_inherited() -> None:
    env = {"PATH": "/usr/bin"}
    assert activation.inherited_sockets(env, start=START) == {}
    assert env == {"PATH": "/usr/bin"}


def test_variables_meant_for_another_process_are_dropped(fds: ExitStack) -> None:
    env = environ("data:control", pid=1)
    assert activation.inherited_sockets(env, start=START) == {}
    assert env == {"PATH": "/usr/bin"}  # not passed on to our children either


def test_data_and_control_by_name_in_any_order(tmp_path: Path, fds: ExitStack) -> None:
    control = fds.enter_context(listening(tmp_path / "control.sock"))
    data = fds.enter_context(listening(tmp_path / "data.sock"))
    pass_at(control, data)
    env = environ("control:data")
    got = activation.inherited_sockets(env, start=START)
    assert env == {"PATH": "/usr/bin"}
    assert {name: (s.fileno(), s.getsockname()) for name, s in got.items()} == {
        "control": (START, str(tmp_path / "control.sock")),
        "data": (START + 1, str(tmp_path / "data.sock")),
    }
    assert not os.get_inheritable(START)  # not passed on to children
    assert not got["data"].getblocking()
    for sock in got.values():
        sock.detach()


def test_one_socket_alone(tmp_path: Path, fds: ExitStack) -> None:
    pass_at(fds.enter_context(listening(tmp_path / "data.sock")))
    got = activation.inherited_sockets(environ("data", count=1), start=START)
    assert list(got) == ["data"]
    got["data"].detach()


@pytest.mark.parametrize(
    ("names", "count", "problem"),
    [
        (
            None,
            2,
            "LISTEN_FDNAMES names 0 descriptors, LISTEN_FDS passes 2: name each socket with "
            "FileDescriptorName=data or =control",
        ),
        (
            "data",
            2,
            "LISTEN_FDNAMES names 1 descriptors, LISTEN_FDS passes 2: name each socket with "
            "FileDescriptorName=data or =control",
        ),
        (
            "data:openclawd.socket",
            2,
            f"descriptor {START + 1} is named 'openclawd.socket'; openclawd serves sockets "
            "named 'data' and 'control' (FileDescriptorName=)",
        ),
        ("data:data", 2, "two descriptors are named 'data': one socket each, please"),
    ],
)
def test_names_that_do_not_fit(
    names: str | None, count: int, problem: str, tmp_path: Path, fds: ExitStack
) -> None:
    pass_at(
        fds.enter_context(listening(tmp_path / "a.sock")),
        fds.enter_context(listening(tmp_path / "b.sock")),
    )
    env = environ(names, count)
    with pytest.raises(ListenError) as failed:
        activation.inherited_sockets(env, start=START)
    assert str(failed.value) == problem
    assert env == {"PATH": "/usr/bin"}


def test_a_count_that_is_not_a_number() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "two", "LISTEN_FDNAMES": "data"}
    with pytest.raises(ListenError, match=r"^LISTEN_FDS: not a number of descriptors: 'two'$"):
        activation.inherited_sockets(env, start=START)
    assert env == {}


def test_a_descriptor_that_is_not_a_listening_unix_stream_socket(
    tmp_path: Path, fds: ExitStack
) -> None:
    tcp = fds.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    datagram = fds.enter_context(listening(tmp_path / "d.sock", socket.SOCK_DGRAM, listen=False))
    idle = fds.enter_context(listening(tmp_path / "i.sock", listen=False))
    read_end, write_end = os.pipe()
    fds.callback(os.close, read_end)
    fds.callback(os.close, write_end)
    cases = [
        (tcp, f"descriptor {START} (data) is a AF_INET socket, not AF_UNIX"),
        (
            datagram,
            f"descriptor {START} (data) is a SOCK_DGRAM socket, not SOCK_STREAM (ListenStream=)",
        ),
        (idle, f"descriptor {START} (data) is not listening"),
        (read_end, f"descriptor {START} (data) is not a socket: Socket operation on non-socket"),
    ]
    for given, problem in cases:
        pass_at(given)
        with pytest.raises(ListenError) as failed:
            activation.inherited_sockets(environ("data", count=1), start=START)
        assert str(failed.value) == problem
        os.fstat(START)  # left open: it is systemd's
