"""Serving an ASGI app with hypercorn: the only module that imports hypercorn.

Both Quart apps of the package are served through here: the control API (on the control
socket and the optional loopback TCP port) and the built-in mock provider (on loopback TCP).
The caller binds and listens on the socket itself, so a bad path or a taken port is its
own clear startup error, and the socket stays the caller's: hypercorn is handed a duplicate
of the descriptor and closes that one.

A request hypercorn cannot parse (no Host, a malformed header, two Content-Lengths, a head
over 16 KiB, garbage) never reaches the app: hypercorn answers it itself, with an empty
body. The apps served here answer every error as JSON ``{"error": CODE, "message": TEXT}``
(CONTRACT.md 4), and so do these answers, which repeat nothing of the request. hypercorn
has no public hook for them, so this module replaces the one private method that writes
them (``H11Protocol._send_error_response``, hypercorn 0.17 and 0.18), for the servers it
starts only; and the one that writes every response head (``_send_h11_event``), to give
their status lines a reason phrase (hypercorn sends ``HTTP/1.1 200 ``). They are the
package's only reach below hypercorn's public API: pyproject.toml bounds hypercorn below
0.19, and tests/control/test_parse_errors.py fails should the methods move (the answers
are then hypercorn's own again, empty and without a reason but still correct HTTP).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from http import HTTPStatus
from typing import Any

import h11
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

from openclawd.errors import (
    ClientError,
    HeadTooLargeError,
    NotImplementedByUsError,
    OpenclawdError,
)

__all__ = ["ASGIFramework", "ASGIReceiveCallable", "ASGISendCallable", "Scope", "serve_asgi"]

# The longest request head (request line and headers) taken; a longer one is a 431.
MAX_HEAD_BYTES = 16 * 1024
# What an unparseable request is told, by the status h11 suggests (its error_status_hint),
# as errors of the one table (errors.py).
_UNPARSEABLE: dict[int, OpenclawdError] = {
    400: ClientError("the request is not valid HTTP/1.1"),
    431: HeadTooLargeError(f"the request line and headers are larger than {MAX_HEAD_BYTES} bytes"),
    501: NotImplementedByUsError("only the chunked Transfer-Encoding is supported"),
}


def unparseable_body(status: int) -> bytes:
    """The JSON body of the answer to a request that could not be parsed."""
    error = _UNPARSEABLE.get(status, _UNPARSEABLE[400])
    body = {"error": error.code, "message": str(error)}
    return json.dumps(body, separators=(",", ":")).encode()


class _Config(HypercornConfig):
    """hypercorn's config, marking the servers whose parse errors are answered as JSON."""

    json_parse_errors = True


_hypercorn_error_response = getattr(H11Protocol, "_send_error_response", None)


async def _send_error_response(self: Any, status_code: int) -> None:
    """``H11Protocol._send_error_response`` with a JSON body, for our servers: called with
    h11's suggested status once a request could not be parsed and no response has begun."""
    if not getattr(self.config, "json_parse_errors", False):
        assert _hypercorn_error_response is not None
        await _hypercorn_error_response(self, status_code)
        return
    body = unparseable_body(status_code)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *self.config.response_headers("h11"),
    ]
    await self._send_h11_event(h11.Response(status_code=status_code, headers=headers))
    await self._send_h11_event(h11.Data(data=body))
    await self._send_h11_event(h11.EndOfMessage())


_hypercorn_send_h11_event = getattr(H11Protocol, "_send_h11_event", None)


async def _send_h11_event(self: Any, event: Any) -> None:
    """``H11Protocol._send_h11_event`` giving our servers' status lines their reason phrase
    (``HTTP/1.1 200 OK``): hypercorn builds every response head with none."""
    assert _hypercorn_send_h11_event is not None
    if (
        getattr(self.config, "json_parse_errors", False)
        and isinstance(event, h11.Response | h11.InformationalResponse)
        and not event.reason
    ):
        event = type(event)(
            status_code=event.status_code, headers=event.headers, reason=_phrase(event.status_code)
        )
    await _hypercorn_send_h11_event(self, event)


def _phrase(status_code: int) -> bytes:
    try:
        return HTTPStatus(status_code).phrase.encode()
    except ValueError:  # a status the standard library does not name
        return b""


if _hypercorn_error_response is not None and _hypercorn_send_h11_event is not None:
    H11Protocol._send_error_response = _send_error_response  # type: ignore[method-assign]
    H11Protocol._send_h11_event = _send_h11_event  # type: ignore[method-assign]


async def serve_asgi(
    app: ASGIFramework,
    sock: socket.socket,
    *,
    backlog: int,
    log_name: str,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on the listening socket ``sock`` (unix or TCP) until cancelled.

    Only hypercorn's warnings and errors are logged, under ``log_name``: its info lines
    name the descriptor's bind path, which says nothing useful. A request that cannot be
    parsed is answered with a JSON 4xx (``unparseable_body``) and the connection closed.
    """
    config = _Config()
    config.h11_max_incomplete_size = MAX_HEAD_BYTES
    config.bind = [f"fd://{os.dup(sock.fileno())}"]
    config.backlog = backlog
    config.accesslog = None
    errorlog = logging.getLogger(log_name)
    errorlog.setLevel(logging.WARNING)
    config.errorlog = errorlog
    config.graceful_timeout = 2.0
    config.keep_alive_timeout = 30.0
    await hypercorn_serve(app, config, task_status=task_status)  # type: ignore[arg-type]
