"""The control API for operators: a Quart (quart-trio) app served by hypercorn.

Owns the routes of CONTRACT.md section 4 and their JSON answers; it reads the daemon's
state and calls the daemon's operations, and holds no state of its own. It is served on its
own listener (the control socket), so draining the data socket never shuts operators out.
Every error answer is ``{"error": CODE, "message": TEXT}``; an unknown route is 404, a
known route with the wrong method 405.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from quart import Response, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from openclawd.lifecycle import Lifecycle


def error(status: int, code: str, message: str) -> tuple[Response, int]:
    return jsonify({"error": code, "message": message}), status


def create_app(lifecycle: Lifecycle) -> QuartTrio:
    """Build the control app over the daemon's ``lifecycle``."""
    app = QuartTrio("openclawd.control")

    @app.get("/healthz")
    async def healthz() -> Any:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Any:
        if lifecycle.ready:
            return {"ready": True}
        return jsonify({"ready": False, "reasons": lifecycle.not_ready_reasons()}), 503

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Any:
        status = exc.code or 500
        codes = {404: "not_found", 405: "method_not_allowed"}
        if status == 404:
            message = f"no route {request.method} {request.path}"
        elif status == 405:
            message = f"{request.path} does not take {request.method}"
        else:
            message = exc.description or exc.name
        return error(
            status, codes.get(status, "bad_request" if status < 500 else "internal"), message
        )

    return app


async def serve_control(
    app: QuartTrio,
    sock: socket.socket,
    *,
    backlog: int,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on the listening unix socket ``sock`` until cancelled.

    ``sock`` stays ours: hypercorn gets a duplicate of its descriptor and closes that.
    """
    config = HypercornConfig()
    config.bind = [f"fd://{os.dup(sock.fileno())}"]
    config.backlog = backlog
    config.accesslog = None
    # hypercorn's info lines name the descriptor's temporary bind path; keep its warnings.
    errorlog = logging.getLogger("openclawd.control.server")
    errorlog.setLevel(logging.WARNING)
    config.errorlog = errorlog
    config.graceful_timeout = 2.0
    config.keep_alive_timeout = 30.0
    await hypercorn_serve(app, config, task_status=task_status)  # type: ignore[arg-type]
