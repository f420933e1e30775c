"""The control API for operators: a Quart (quart-trio) app served by hypercorn.

Owns the routes of CONTRACT.md section 4 and their JSON answers: it reads the daemon's
statistics snapshot and calls the daemon's operations (``Operations``), and holds no state
of its own. It is served on its own listeners (the control socket, and the optional
loopback TCP one behind a bearer token), so draining the data socket never shuts operators
out. Every error answer is ``{"error": CODE, "message": TEXT}``; an unknown route is 404,
a known route with the wrong method 405 (mutations are POST only). Nothing an operator sends
is repeated back or logged where a key pasted in the wrong place could hide: not an unknown
path, method or body field, nor a provider name that is not a configured provider.
"""

from __future__ import annotations

import hmac
import json
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from quart import Response, current_app, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from openclawd import logs
from openclawd.asgi import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope
from openclawd.config import Config
from openclawd.errors import (
    ClientError,
    MethodNotAllowedError,
    NotFoundError,
    OpenclawdError,
    TooLargeError,
    UnknownProviderError,
    VaultError,
)
from openclawd.lifecycle import Lifecycle
from openclawd.metrics import CONTENT_TYPE, Metrics
from openclawd.protocol.messages import shown_name
from openclawd.statistics import Statistics
from openclawd.status import limits_body, status_body

log = logs.get(__name__)

# Control requests are small JSON objects; anything larger is refused (413).
MAX_BODY_BYTES = 64 * 1024
# werkzeug's answers (Quart routes with it) as errors of the one table (errors.py).
_HTTP_ERRORS: dict[int, type[OpenclawdError]] = {
    404: NotFoundError,
    405: MethodNotAllowedError,
    413: TooLargeError,
}
# Methods a 405 may name; any other token the client sent is not repeated back.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"})


class Operations(Protocol):
    """What the control API needs of the daemon."""

    lifecycle: Lifecycle
    config: Config  # the config in force: which providers exist, and their Vault paths

    def statistics(self) -> Statistics: ...

    def redact(self, text: str) -> str:
        """``text`` with any key the daemon holds replaced by its fingerprint."""
        ...

    async def rotate_keys(
        self, provider: str | None
    ) -> Mapping[str, tuple[int | None, int | None, bool]]: ...

    def drain(self, deadline_s: float | None) -> float:
        """Start (or move the deadline of) the operator's drain; returns its deadline_s."""
        ...

    def resume(self) -> None: ...


def json_response(
    payload: object, status: int = 200, *, redact: Callable[[str], str] | None = None
) -> Response:
    """``payload`` as JSON; with ``redact``, every string in it passes through that first
    (before JSON escapes could hide a key from it)."""
    if redact is not None:
        payload = _redacted(payload, redact)
    text = json.dumps(payload, separators=(",", ":"))
    return Response(text, status=status, content_type="application/json")


def _redacted(value: object, redact: Callable[[str], str]) -> object:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {_redacted(k, redact): _redacted(v, redact) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v, redact) for v in value]
    return value


def error(exc: OpenclawdError) -> Response:
    """The control API's error shape, with the status and code of ``exc``."""
    return json_response({"error": exc.code, "message": str(exc)}, exc.http_status)


async def _json_body() -> dict[str, Any]:
    """The request's optional JSON object body ({} when empty).

    Raises:
        ClientError: the body is not a JSON object.
    """
    data = await request.get_data()
    if not data.strip():
        return {}
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ClientError("the body is not JSON") from None
    if not isinstance(body, dict):
        raise ClientError("the body must be a JSON object")
    return body


def _caller() -> str:
    """Who sent the request, for the log: the TCP client's address, or the unix socket
    (whose mode and group decide who may connect)."""
    client = request.scope.get("client")
    if client and client[0]:
        return f"{client[0]}:{client[1]}"
    return "unix"


def _only(body: dict[str, Any], *fields: str) -> None:
    """Refuse a body with any field but ``fields``, without naming it (it may be a key).

    Raises:
        ClientError: an unknown field.
    """
    if set(body) - set(fields):
        takes = ", ".join(fields) or "no field"
        raise ClientError(f"unknown field; this route takes {takes}")


def _configured(ops: Operations, provider: str) -> bool:
    """Whether ``provider`` names a configured provider, and so may be shown and logged
    (anything else may be a key pasted in the wrong place)."""
    return shown_name(provider, ops.config.providers) is not None


def _seconds(value: object, name: str) -> float | None:
    """A JSON number of seconds, 0 or more (None if absent).

    Raises:
        ClientError: anything else (a bool, a string, NaN, infinite, too large).
    """
    if value is None:
        return None
    seconds = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = float(value) + 0.0  # + 0.0: -0.0 is 0
        except OverflowError:  # an int beyond any float
            seconds = None
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise ClientError(f"{name} must be a number of seconds, 0 or more")
    return seconds


def create_app(ops: Operations) -> QuartTrio:
    """Build the control app over the daemon's ``ops``."""
    app = QuartTrio("openclawd.control")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    # No 308 to the path with its slashes merged: its Location would repeat the query.
    app.url_map.merge_slashes = False
    _add_reading_routes(app, ops)
    _add_operating_routes(app, ops)
    app.register_error_handler(OpenclawdError, _refused)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _internal)
    return app


def _add_reading_routes(app: QuartTrio, ops: Operations) -> None:
    """The routes that only read: liveness, readiness, status, limits and metrics."""
    metrics = Metrics(ops.statistics)
    lifecycle = ops.lifecycle

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        if lifecycle.ready:
            return json_response({"ready": True})
        return json_response({"ready": False, "reasons": lifecycle.not_ready_reasons()}, 503)

    @app.get("/v1/status")
    async def status() -> Response:
        return json_response(status_body(ops.statistics(), ops.config), redact=ops.redact)

    @app.get("/v1/limits")
    async def limits() -> Response:
        return json_response(limits_body(ops.statistics()), redact=ops.redact)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), content_type=CONTENT_TYPE)


def _add_operating_routes(app: QuartTrio, ops: Operations) -> None:
    """The operator's mutations (POST only), and the drain's progress."""
    lifecycle = ops.lifecycle

    @app.post("/v1/keys/rotate")
    async def rotate() -> Response:
        return await _rotate(ops)

    @app.post("/v1/drain")
    async def drain() -> Response:
        body = await _json_body()
        _only(body, "deadline_s")
        deadline_s = _seconds(body.get("deadline_s"), "deadline_s")
        log.info("control.drain", deadline_s=deadline_s, via=_caller())
        deadline_s = ops.drain(deadline_s)
        return json_response(
            {
                "state": lifecycle.state.value,
                "inflight": lifecycle.work.count,
                "deadline_s": deadline_s,
            },
            202,
        )

    @app.get("/v1/drain")
    async def drain_state() -> Response:
        remaining = lifecycle.drain_remaining_s()
        return json_response(
            {
                "state": lifecycle.state.value,
                "inflight": lifecycle.work.count,
                "remaining_s": None if remaining is None else round(remaining, 1),
            }
        )

    @app.post("/v1/resume")
    async def resume() -> Response:
        _only(await _json_body())
        log.info("control.resume", via=_caller())
        ops.resume()
        return json_response({"state": lifecycle.state.value})


async def _rotate(ops: Operations) -> Response:
    """``POST /v1/keys/rotate``: re-read one provider's keys, or every provider's."""
    body = await _json_body()
    _only(body, "provider")
    provider = body.get("provider")
    if provider is not None and not isinstance(provider, str):
        raise ClientError("provider must be a string")
    if provider is not None and not _configured(ops, provider):
        log.info("control.rotate_refused", reason="unknown provider", via=_caller())
        return error(UnknownProviderError("unknown provider"))
    log.info("control.rotate", provider=provider, via=_caller())
    try:
        result = await ops.rotate_keys(provider)
    except UnknownProviderError:
        # Removed by a reload meanwhile; the key manager's text quotes the name.
        return error(UnknownProviderError("unknown provider"))
    except VaultError as exc:
        # Whatever the cause, the operator's answer is the contract's: the keys in
        # force are kept.
        kept = VaultError(f"the keys in force are kept: {exc}")
        return json_response(
            {"error": kept.code, "message": str(kept)}, kept.http_status, redact=ops.redact
        )
    return json_response(
        {
            "providers": {
                name: {"from_version": a, "to_version": b, "changed": changed}
                for name, (a, b, changed) in result.items()
            }
        }
    )


async def _refused(exc: OpenclawdError) -> Response:
    return error(exc)


async def _http_error(exc: HTTPException) -> Response:
    """werkzeug's answers (404, 405, 413, ...) in the error shape, naming nothing the
    client sent that is not a route's own path or a standard method."""
    status = exc.code or 500
    kind = _HTTP_ERRORS.get(status, ClientError if status < 500 else OpenclawdError)
    failure = kind(_http_message(exc, status))
    failure.http_status = status
    response = error(failure)
    if status == 405 and exc.get_headers():
        for name, value in exc.get_headers():
            if name.lower() == "allow":
                response.headers["Allow"] = value
    return response


def _http_message(exc: HTTPException, status: int) -> str:
    if status == 404:
        return "no such route"  # the path is not repeated: it may hold a key
    if status == 405:
        # Only a route's own path and a standard method are named.
        routes = {rule.rule for rule in current_app.url_map.iter_rules()}
        path = request.path if request.path in routes else "this route"
        method = request.method if request.method in _METHODS else "this method"
        return f"{path} does not take {method}"
    if status == 413:
        return f"the body is larger than {MAX_BODY_BYTES} bytes"
    return exc.description or exc.name


async def _internal(exc: Exception) -> Response:
    log.exception("control.internal_error", error=type(exc).__name__)
    return error(OpenclawdError("internal error; see the daemon's log"))


class BearerAuth:
    """An ASGI wrapper for the TCP listener: every request must carry
    ``Authorization: Bearer <token>``, compared in constant time; anything else is 401.
    The wrapped app's lifespan is left to the unix socket's server, which runs it."""

    def __init__(self, app: ASGIFramework, token: str) -> None:
        self._app = app
        self._token = token.encode()

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "http" and self._authorized(scope["headers"]):
            await self._app(scope, receive, send)
            return
        client = scope.get("client")
        log.warning("control.unauthorized", client=f"{client[0]}:{client[1]}" if client else None)
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008, "reason": ""})
            return
        body = json.dumps(
            {"error": "unauthorized", "message": "Authorization: Bearer <token> required"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="openclawd"'),
                ],
                "trailers": False,
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _authorized(self, headers: Any) -> bool:
        given = [value for name, value in headers if name.lower() == b"authorization"]
        if len(given) != 1:
            return False
        scheme, _, token = given[0].partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(token.strip(), self._token)
