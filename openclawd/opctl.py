"""The operators' commands (CONTRACT.md 6): ``openclawd status``, ``drain``, ``resume``,
``rotate`` and ``limits``, a short-lived client of the control socket.

Owns the command line of those five, the one HTTP request each sends over the control
socket (``http.client`` on an ``AF_UNIX`` socket, every wait bounded), and what an operator
reads of the answer: a few aligned lines, or the API's JSON itself with ``--json``. Exit 0
on a 2xx answer; 1 on any other answer or none, the cause on stderr; 2 when the config
that names the control socket cannot be read. Knows nothing of the daemon's insides: only
the control API's routes and JSON (CONTRACT.md 4, 5.7), which hold no secret.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from openclawd.config import DEFAULT_CONFIG_PATH, ControlConfig

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

# Every wait on the daemon: a rotation reads Vault, which has its own (shorter) timeout.
TIMEOUT_S = 30.0
# An answer larger than this is not the control API's.
MAX_ANSWER_BYTES = 16 * 1024 * 1024

COMMANDS = ("status", "drain", "resume", "rotate", "limits")


class ControlError(Exception):
    """No usable answer from the control socket; the text says why and names the socket."""


@dataclass(frozen=True, slots=True)
class Answer:
    """The control API's answer: its status, its text, and that text decoded."""

    status: int
    text: str
    body: Any


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout_s: float) -> None:
        super().__init__("openclawd", timeout=timeout_s)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def call(
    path: str,
    method: str,
    target: str,
    body: dict[str, Any] | None = None,
    *,
    timeout_s: float = TIMEOUT_S,
) -> Answer:
    """Send one request to the control socket at ``path`` and read its JSON answer.

    Raises:
        ControlError: nobody answers, the socket cannot be used, the answer is not the
            control API's (not HTTP, not JSON), or it takes longer than ``timeout_s``.
    """
    connection = _UnixConnection(path, timeout_s)
    payload = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"} if payload is not None else {}
    try:
        connection.request(method, target, body=payload, headers=headers)
        response = connection.getresponse()
        raw = response.read(MAX_ANSWER_BYTES + 1)
        status = response.status
    except OSError as exc:
        raise ControlError(_unreachable(path, exc, timeout_s)) from None
    except http.client.HTTPException:
        raise ControlError(f"the process on {path} did not answer as HTTP") from None
    finally:
        connection.close()
    if len(raw) > MAX_ANSWER_BYTES:
        raise ControlError(f"the answer from {path} is larger than {MAX_ANSWER_BYTES} bytes")
    text = raw.decode("utf-8", "replace")
    try:
        decoded = json.loads(text)
    except ValueError:
        raise ControlError(f"the answer from {path} is not JSON (HTTP {status})") from None
    return Answer(status, text, decoded)


def _unreachable(path: str, exc: OSError, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer from {path} within {timeout_s:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return f"no daemon answers on {path} (connection refused)"
    if isinstance(exc, FileNotFoundError):
        return f"no daemon answers on {path} (no such socket)"
    if isinstance(exc, PermissionError):
        return (
            f"cannot connect to {path}: permission denied "
            "(operators need write access to the control socket: its group)"
        )
    if isinstance(exc, ConnectionError):
        return f"the daemon on {path} closed the connection without an answer"
    return f"cannot reach the daemon on {path}: {exc.strerror or exc}"


def control_socket(config_path: str, explicit: bool) -> str:
    """The ``[control] socket`` of the config file at ``config_path`` (its default if the
    file does not set it, or if ``config_path`` is the default path and there is no file).

    Only that key is read: the rest of the file (and the environment the daemon's config
    may lean on, such as ``VAULT_TOKEN``) is not the operator command's business.

    Raises:
        ControlError: the file cannot be read, is not TOML, or its key is not a path.
    """
    default = ControlConfig().socket
    try:
        with open(config_path, "rb") as f:
            tables = tomllib.load(f)
    except FileNotFoundError:
        if not explicit:
            return default
        raise ControlError(f"cannot read {config_path}: no such file") from None
    except OSError as exc:
        raise ControlError(
            f"cannot read {config_path}: {exc.strerror} (or name the socket: --control PATH)"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ControlError(f"{config_path} is not valid TOML: {exc}") from None
    control = tables.get("control", {})
    value = control.get("socket", default) if isinstance(control, dict) else default
    if not isinstance(value, str) or not os.path.isabs(value):
        raise ControlError(f"control.socket: must be an absolute path (in {config_path})")
    return value


# --- what each command sends ----------------------------------------------------------------


def _request(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    """(method, route, body) of the command in ``args``."""
    if args.command == "status":
        return "GET", "/v1/status", None
    if args.command == "limits":
        return "GET", "/v1/limits", None
    if args.command == "resume":
        return "POST", "/v1/resume", None
    if args.command == "drain":
        body = None if args.deadline_s is None else {"deadline_s": args.deadline_s}
        return "POST", "/v1/drain", body
    body = None if args.provider is None else {"provider": args.provider}
    return "POST", "/v1/keys/rotate", body


# --- what an operator reads -------------------------------------------------------------------


def _num(value: object, unit: str = "") -> str:
    """A figure as read: ``-`` for none, whole numbers without a decimal point."""
    if value is None:
        return "-"
    text = f"{value:.1f}".removesuffix(".0") if isinstance(value, float) else str(value)
    return f"{text} {unit}" if unit else text


def table(rows: Sequence[Sequence[str]]) -> str:
    """``rows`` as aligned columns, two spaces apart, with no trailing blanks."""
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(map(len, rows)))]
    lines = (
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    )
    return "\n".join(lines) + "\n"


def _vault_line(vault: dict[str, Any]) -> str:
    reachable = vault.get("reachable")
    reach = "not yet read" if reachable is None else "reachable" if reachable else "UNREACHABLE"
    parts = [reach, f"{vault.get('addr')} ({vault.get('auth')})"]
    parts.append(f"token ttl {_num(vault.get('token_ttl_s'), 's')}")
    parts.append(f"last refresh {vault.get('last_refresh') or '-'}")
    return ", ".join(parts)


def _shared_line(shared: dict[str, Any]) -> str:
    reachable = shared.get("reachable")
    if reachable is None:
        return str(shared.get("mode"))
    return f"{shared.get('mode')}, engine {'reachable' if reachable else 'UNREACHABLE'}"


def format_status(body: dict[str, Any]) -> str:
    """``GET /v1/status`` as a few aligned lines, then one line per provider."""
    conn = body.get("connections", {})
    head = [
        ["state", str(body.get("state"))],
        ["version", f"{body.get('version')}, up {_num(body.get('uptime_s'), 's')}"],
        [
            "connections",
            f"{_num(conn.get('clients'))} clients, {_num(conn.get('inflight'))} in flight, "
            f"{_num(conn.get('realtime'))} realtime",
        ],
    ]
    vault = body.get("vault") or {}
    providers = body.get("providers") or {}
    used = providers or vault.get("addr")  # without providers, the daemon reads no Vault
    head.append(["vault", _vault_line(vault) if used else "not used (no providers)"])
    if vault.get("last_error"):
        head.append(["vault error", str(vault["last_error"])])
    if "shared" in body:
        head.append(["shared", _shared_line(body["shared"])])
    if not providers:
        return table(head) + "no providers\n"
    rows = [["provider", "key", "fingerprint", "pool", "circuit", "last error"]]
    for name, provider in providers.items():
        key = provider.get("key") or {}
        upstream = provider.get("upstream") or {}
        error = upstream.get("last_error") or (provider.get("vault") or {}).get("last_error")
        rows.append(
            [
                name,
                f"v{key['version']}" if key else "-",
                key.get("fingerprint") or "no key",
                _num(key.get("pool_size")),
                str(upstream.get("circuit", "-")),
                str(error or "-"),
            ]
        )
    return table(head) + "\n" + table(rows)


def format_limits(body: dict[str, Any]) -> str:
    """``GET /v1/limits``: where limits are counted, then each set limit as used/limit."""
    head = table([["shared", _shared_line(body.get("shared") or {})]])
    rows = [["scope", "name", "limit", "used/limit"]]
    for scope in ("clients", "providers"):
        for name, limits in (body.get(scope) or {}).items():
            for limit, figures in limits.items():
                if limit == "upstream":
                    continue
                used = f"{_num(figures.get('used'))}/{_num(figures.get('limit'))}"
                rows.append([scope.removesuffix("s"), name, limit, used])
    upstream = [["provider", "upstream remaining requests", "tokens", "reset"]]
    for name, limits in (body.get("providers") or {}).items():
        seen = limits.get("upstream")
        if seen and any(v is not None for v in seen.values()):
            upstream.append(
                [
                    name,
                    _num(seen.get("remaining_requests")),
                    _num(seen.get("remaining_tokens")),
                    _num(seen.get("reset_s"), "s"),
                ]
            )
    text = head + "\n" + (table(rows) if len(rows) > 1 else "no limits are set\n")
    return text + ("\n" + table(upstream) if len(upstream) > 1 else "")


def format_drain(body: dict[str, Any]) -> str:
    return table(
        [
            ["state", str(body.get("state"))],
            ["in flight", _num(body.get("inflight"))],
            ["deadline", _num(body.get("deadline_s"), "s")],
        ]
    )


def format_resume(body: dict[str, Any]) -> str:
    return table([["state", str(body.get("state"))]])


def format_rotate(body: dict[str, Any]) -> str:
    rows = [["provider", "from", "to", "changed"]]
    for name, change in (body.get("providers") or {}).items():
        rows.append(
            [
                name,
                _num(change.get("from_version")),
                _num(change.get("to_version")),
                "yes" if change.get("changed") else "no",
            ]
        )
    return table(rows) if len(rows) > 1 else "no providers\n"


FORMATS: dict[str, Callable[[dict[str, Any]], str]] = {
    "status": format_status,
    "limits": format_limits,
    "drain": format_drain,
    "resume": format_resume,
    "rotate": format_rotate,
}


def refusal(answer: Answer) -> str:
    """What an answer other than 2xx says: its status, and the API's code and message."""
    body = answer.body
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return f"the daemon answered {answer.status} {body['error']}: {body.get('message')}"
    if isinstance(body, dict) and body.get("ready") is False:
        return f"the daemon answered {answer.status}: not ready: {body.get('reasons')}"
    return f"the daemon answered {answer.status}: {answer.text.strip()[:200]}"


# --- the command line -------------------------------------------------------------------------


def add_commands(sub: Any) -> None:
    """The five commands' parsers, under the ``openclawd`` parser's subparsers ``sub``."""
    helps = {
        "status": "the daemon's state, keys, Vault and connections",
        "drain": "stop taking new work; work in flight runs on until done or the deadline",
        "resume": "undo a drain that has not ended in shutdown",
        "rotate": "re-read the keys from Vault now",
        "limits": "what each client and provider has used of its limits",
    }
    for name in COMMANDS:
        cmd = sub.add_parser(name, help=helps[name], description=helps[name])
        cmd.add_argument(
            "--control",
            metavar="PATH",
            help="the control socket (default: the config's [control] socket)",
        )
        cmd.add_argument(
            "--config",
            metavar="PATH",
            help=f"the config that names the control socket (default: {DEFAULT_CONFIG_PATH})",
        )
        cmd.add_argument("--json", action="store_true", help="print the API's JSON answer")
        if name == "drain":
            cmd.add_argument(
                "--deadline-s",
                type=_seconds,
                metavar="N",
                help="how long work in flight may run on (default: [shutdown] drain_timeout_s)",
            )
        if name == "rotate":
            cmd.add_argument("--provider", metavar="NAME", help="one provider (default: all)")


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds")
    return number


def main(args: argparse.Namespace) -> int:
    """Run the operator command of ``args``; the exit code."""
    try:
        path = args.control or control_socket(
            args.config or DEFAULT_CONFIG_PATH, explicit=args.config is not None
        )
    except ControlError as exc:
        print(f"openclawd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    method, target, body = _request(args)
    try:
        answer = call(path, method, target, body)
    except ControlError as exc:
        print(f"openclawd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if not 200 <= answer.status < 300:
        print(f"openclawd: {args.command}: {refusal(answer)}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        sys.stdout.write(answer.text.strip() + "\n")
    elif isinstance(answer.body, dict):
        sys.stdout.write(FORMATS[args.command](answer.body))
    else:
        print(f"openclawd: {args.command}: the answer is not a JSON object", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK
