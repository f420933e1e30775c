"""The operators' commands without a daemon (CONTRACT.md 6): what an operator reads of each
answer, where the control socket is found, and every way of getting no usable answer.
The commands against a real daemon: tests/dataplane/test_operator_cli.py."""

from __future__ import annotations

import argparse
import json
import socket
import threading
from pathlib import Path

import pytest

from openclawd import cli, opctl

# CONTRACT.md 4's example, with 5.7's "shared".
STATUS = {
    "state": "ready",
    "version": "0.1.0",
    "uptime_s": 12.5,
    "connections": {"clients": 3, "inflight": 1, "realtime": 0},
    "providers": {
        "openai": {
            "key": {
                "version": 4,
                "fingerprint": "sha256:1a2b3c4d5e6f",
                "fetched_at": "2026-11-21T10:00:00Z",
                "pool_size": 1,
            },
            "upstream": {"circuit": "closed", "last_error": None},
            "ratelimit": {"remaining_requests": None, "remaining_tokens": None},
        },
        "anthropic": {
            "key": None,
            "upstream": {"circuit": "open", "last_error": "upstream 503"},
            "ratelimit": {"remaining_requests": None, "remaining_tokens": None},
        },
    },
    "shared": {"mode": "local", "reachable": None},
    "vault": {
        "addr": "https://vault.internal:8200",
        "auth": "approle",
        "reachable": True,
        "token_ttl_s": 3100,
        "last_refresh": "2026-11-21T10:00:00Z",
        "last_error": None,
    },
}


def test_status_is_a_few_aligned_lines() -> None:
    assert opctl.format_status(STATUS) == (
        "state        ready\n"
        "version      0.1.0, up 12.5 s\n"
        "connections  3 clients, 1 in flight, 0 realtime\n"
        "vault        reachable, https://vault.internal:8200 (approle), token ttl 3100 s,"
        " last refresh 2026-11-21T10:00:00Z\n"
        "shared       local\n"
        "\n"
        "provider   key  fingerprint          pool  circuit  last error\n"
        "openai     v4   sha256:1a2b3c4d5e6f  1     closed   -\n"
        "anthropic  -    no key               -     open     upstream 503\n"
    )


def test_status_says_what_is_wrong_with_vault_and_the_fleet() -> None:
    body = json.loads(json.dumps(STATUS))
    body["state"] = "degraded"
    body["vault"].update(reachable=False, last_error="Vault at https://vault.internal:8200 ...")
    body["shared"] = {"mode": "local", "reachable": False}
    lines = opctl.format_status(body).splitlines()
    assert lines[0] == "state        degraded"
    assert lines[3].startswith("vault        UNREACHABLE, https://vault.internal:8200")
    assert lines[4] == "vault error  Vault at https://vault.internal:8200 ..."
    assert lines[5] == "shared       local, engine UNREACHABLE"


def test_status_without_providers() -> None:
    body = {**STATUS, "providers": {}, "vault": {**STATUS["vault"], "addr": ""}}
    text = opctl.format_status(body)
    assert "vault        not used (no providers)\n" in text
    assert text.endswith("shared       local\nno providers\n")


def test_limits_show_each_set_limit_as_used_over_limit() -> None:
    body = {
        "shared": {"mode": "shared", "reachable": True},
        "clients": {
            "billing": {
                "tokens_per_minute": {"limit": 200000, "used": 1234.5},
                "tokens_per_day": {"limit": 5000000, "used": 1200},
            }
        },
        "providers": {
            "openai": {
                "requests_per_minute": {"limit": 6000, "used": 12},
                "upstream": {"remaining_requests": 499, "remaining_tokens": None, "reset_s": 1.25},
            },
            "mock": {
                "upstream": {"remaining_requests": None, "remaining_tokens": None, "reset_s": None}
            },
        },
    }
    assert opctl.format_limits(body) == (
        "shared  shared, engine reachable\n"
        "\n"
        "scope     name     limit                used/limit\n"
        "client    billing  tokens_per_minute    1234.5/200000\n"
        "client    billing  tokens_per_day       1200/5000000\n"
        "provider  openai   requests_per_minute  12/6000\n"
        "\n"
        "provider  upstream remaining requests  tokens  reset\n"
        "openai    499                          -       1.2 s\n"
    )


def test_limits_when_none_are_set() -> None:
    body = {"shared": {"mode": "local", "reachable": None}, "clients": {}, "providers": {}}
    assert opctl.format_limits(body) == "shared  local\n\nno limits are set\n"


def test_drain_resume_and_rotate() -> None:
    drain = {"state": "draining", "inflight": 3, "deadline_s": 60.0}
    assert opctl.format_drain(drain) == "state      draining\nin flight  3\ndeadline   60 s\n"
    assert opctl.format_resume({"state": "ready"}) == "state  ready\n"
    rotated = {
        "providers": {
            "openai": {"from_version": 3, "to_version": 4, "changed": True},
            "mock": {"from_version": None, "to_version": 1, "changed": True},
            "eu": {"from_version": 2, "to_version": 2, "changed": False},
        }
    }
    assert opctl.format_rotate(rotated) == (
        "provider  from  to  changed\n"
        "openai    3     4   yes\n"
        "mock      -     1   yes\n"
        "eu        2     2   no\n"
    )


# --- what each command sends, and the command line -------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    return cli._parser().parse_args(argv)


@pytest.mark.parametrize(
    ("argv", "sent_request"),
    [
        (["status"], ("GET", "/v1/status", None)),
        (["limits"], ("GET", "/v1/limits", None)),
        (["resume"], ("POST", "/v1/resume", None)),
        (["drain"], ("POST", "/v1/drain", None)),
        (["drain", "--deadline-s", "60"], ("POST", "/v1/drain", {"deadline_s": 60.0})),
        (["rotate"], ("POST", "/v1/keys/rotate", None)),
        (["rotate", "--provider", "openai"], ("POST", "/v1/keys/rotate", {"provider": "openai"})),
    ],
)
def test_each_command_sends_its_route(
    argv: list[str], sent_request: tuple[str, str, object], tmp_path: Path
) -> None:
    server = CannedServer(tmp_path / "c.sock", 200, {"state": "ready", "providers": {}})
    with server:
        code = cli.main([*argv, "--control", str(server.path), "--json"])
    assert code == 0
    method, target, body = sent_request
    head, _, sent = server.requests[0].partition(b"\r\n\r\n")
    assert head.startswith(f"{method} {target} HTTP/1.1\r\n".encode())
    assert (json.loads(sent) if sent else None) == body


@pytest.mark.parametrize("value", ["-1", "soon", "nan", "inf"])
def test_a_deadline_that_is_not_seconds_is_bad_usage(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse("drain", "--deadline-s", value)
    assert exited.value.code == 2
    assert f"{value!r} is not a number of seconds" in capsys.readouterr().err


def test_the_control_socket_comes_from_the_config(tmp_path: Path) -> None:
    config = tmp_path / "openclawd.toml"
    config.write_text('[control]\nsocket = "/srv/oc/control.sock"\n[vault]\nauth = "token"\n')
    assert opctl.control_socket(str(config), explicit=True) == "/srv/oc/control.sock"
    config.write_text("[listen]\nmax_connections = 10\n")
    assert opctl.control_socket(str(config), explicit=True) == "/run/openclawd/control.sock"
    # No file at the default path: the default socket.
    assert opctl.control_socket(str(tmp_path / "none"), explicit=False) == (
        "/run/openclawd/control.sock"
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (None, "cannot read {path}: no such file"),
        ("[control\n", "{path} is not valid TOML: "),
        ("[control]\nsocket = 5\n", "control.socket: must be an absolute path (in {path})"),
        ('[control]\nsocket = "c.sock"\n', "control.socket: must be an absolute path (in {path})"),
    ],
)
def test_a_config_that_names_no_socket_exits_2(
    text: str | None, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "openclawd.toml"
    if text is not None:
        config.write_text(text)
    assert cli.main(["status", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("openclawd: " + problem.format(path=config))


# --- no usable answer --------------------------------------------------------------------------


class CannedServer:
    """A unix socket that answers each connection with one canned HTTP response (or
    ``raw`` bytes), and records what each request sent."""

    def __init__(
        self, path: Path, status: int = 200, body: object = None, raw: bytes | None = None
    ) -> None:
        self.path = path
        text = json.dumps(body).encode()
        self.raw = (
            raw
            if raw is not None
            else (
                f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
                f"content-length: {len(text)}\r\n\r\n".encode()
                + text
            )
        )
        self.requests: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> CannedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(10)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                data = conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                while len(body) < length:
                    body += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + body)
                conn.sendall(self.raw)


@pytest.fixture
def control(tmp_path: Path) -> Path:
    return tmp_path / "control.sock"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_no_socket_file(control: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "status", "--control", str(control)) == (
        1,
        "",
        f"openclawd: no daemon answers on {control} (no such socket)\n",
    )


def test_a_socket_nobody_listens_on(control: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_UNIX) as left_behind:
        left_behind.bind(str(control))  # as a daemon that crashed leaves it
        assert run(capsys, "limits", "--control", str(control), "--json") == (
            1,
            "",
            f"openclawd: no daemon answers on {control} (connection refused)\n",
        )


def test_a_4xx_answer_names_its_code_and_message(
    control: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refused = {"error": "unknown_provider", "message": "unknown provider"}
    with CannedServer(control, 404, refused):
        code, out, err = run(capsys, "rotate", "--provider", "x", "--control", str(control))
    assert (code, out) == (1, "")
    assert err == "openclawd: rotate: the daemon answered 404 unknown_provider: unknown provider\n"


def test_a_503_answer_exits_1_even_with_json(
    control: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refused = {"error": "vault_unreachable", "message": "the keys in force are kept: down"}
    with CannedServer(control, 503, refused):
        code, out, err = run(capsys, "rotate", "--json", "--control", str(control))
    assert (code, out) == (1, "")
    assert err == (
        "openclawd: rotate: the daemon answered 503 vault_unreachable: "
        "the keys in force are kept: down\n"
    )


def test_an_answer_that_is_not_json_or_not_http(
    control: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
    with CannedServer(control, raw=page):
        assert run(capsys, "status", "--control", str(control)) == (
            1,
            "",
            f"openclawd: the answer from {control} is not JSON (HTTP 200)\n",
        )
    control.unlink()
    with CannedServer(control, raw=b"SSH-2.0-OpenSSH_9.2\r\n"):
        assert run(capsys, "status", "--control", str(control)) == (
            1,
            "",
            f"openclawd: the process on {control} did not answer as HTTP\n",
        )


def test_a_silent_socket_is_given_up_on(control: Path) -> None:
    with socket.socket(socket.AF_UNIX) as silent:
        silent.bind(str(control))
        silent.listen()  # connects are queued, never accepted, never answered
        with pytest.raises(opctl.ControlError) as failed:
            opctl.call(str(control), "GET", "/v1/status", timeout_s=0.05)
    assert str(failed.value) == f"no answer from {control} within 0.05 s"
