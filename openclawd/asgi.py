"""Serving an ASGI app with hypercorn: the only module that imports hypercorn.

Both Quart apps of the package are served through here: the control API (on the control
socket and the optional loopback TCP port) and the built-in mock provider (on loopback TCP).
The caller binds and listens on the socket itself, so a bad path or a taken port is its
own clear startup error, and the socket stays the caller's: hypercorn is handed a duplicate
of the descriptor and closes that one.
"""

from __future__ import annotations

import logging
import os
import socket

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

__all__ = ["ASGIFramework", "ASGIReceiveCallable", "ASGISendCallable", "Scope", "serve_asgi"]


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
    name the descriptor's bind path, which says nothing useful.
    """
    config = HypercornConfig()
    config.bind = [f"fd://{os.dup(sock.fileno())}"]
    config.backlog = backlog
    config.accesslog = None
    errorlog = logging.getLogger(log_name)
    errorlog.setLevel(logging.WARNING)
    config.errorlog = errorlog
    config.graceful_timeout = 2.0
    config.keep_alive_timeout = 30.0
    await hypercorn_serve(app, config, task_status=task_status)  # type: ignore[arg-type]
