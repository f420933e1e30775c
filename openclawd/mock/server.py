"""The mock provider's HTTP and WebSocket server: a Quart (quart-trio) app on loopback.

Owns the routes and the pacing; what is said comes from ``openclawd.mock.content`` and
which key is accepted from ``openclawd.mock.keys``. Routes, as OpenAI's API has them:

* ``GET /v1/models``;
* ``POST /v1/chat/completions``, plain or streamed (SSE, one chunk per word every
  ``chunk_delay_s``, the usage chunk with ``stream_options.include_usage``, ``[DONE]``);
* ``/v1/realtime`` (WebSocket): ``session.created``, then events for each client event.

Every route needs ``Authorization: Bearer <key>`` with a key the key check accepts: 401
with an OpenAI-shaped error otherwise (a refused WebSocket gets the 401 as its handshake
answer). Each request is logged with its status and the key's version, never the key.
"""

from __future__ import annotations

import functools
import itertools
import json
import signal
import socket
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import trio
from quart import Response, request, websocket
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException

from openclawd import logs
from openclawd.asgi import serve_asgi
from openclawd.keys.vault import Vault
from openclawd.mock import content
from openclawd.mock.keys import KeyCheck, Verdict

log = logs.get(__name__)

RATE_LIMIT_REQUESTS = 10_000


def create_app(
    keys: KeyCheck, *, chunk_delay_s: float = content.DEFAULT_CHUNK_DELAY_S
) -> QuartTrio:
    """The mock provider's app. ``chunk_delay_s``: the pause before each streamed piece."""
    app = QuartTrio("openclawd.mock")
    app.config.update(
        MAX_CONTENT_LENGTH=content.MAX_REQUEST_BYTES,
        BODY_TIMEOUT=30,
        RESPONSE_TIMEOUT=None,  # a stream lasts as long as it has words to send
        PROVIDE_AUTOMATIC_OPTIONS=False,
    )
    counter = itertools.count(1)

    def headers(number: int) -> dict[str, str]:
        return {
            "x-request-id": f"req_mock_{number}",
            "openai-organization": "openclawd-mock",
            "x-ratelimit-limit-requests": str(RATE_LIMIT_REQUESTS),
            "x-ratelimit-remaining-requests": str(
                RATE_LIMIT_REQUESTS - number % RATE_LIMIT_REQUESTS
            ),
        }

    def json_response(number: int, status: int, body: Mapping[str, Any]) -> Response:
        return Response(
            json.dumps(body),
            status=status,
            headers=headers(number),
            content_type="application/json",
        )

    def refused(number: int, verdict: Verdict, method: str, path: str) -> Response:
        log.info(
            "mock.refused",
            request=number,
            method=method,
            path=path,
            status=verdict.status,
            code=verdict.code,
        )
        body = content.error_body(verdict.message, code=verdict.code)
        return json_response(number, verdict.status, body)

    @app.get("/v1/models")
    async def models() -> Response:
        number = next(counter)
        verdict = await keys.check(_bearer(request.headers))
        if not verdict.accepted:
            return refused(number, verdict, request.method, request.path)
        log.info(
            "mock.request",
            request=number,
            path="/v1/models",
            status=200,
            key_version=verdict.version,
        )
        return json_response(number, 200, content.models(int(time.time())))

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        number = next(counter)
        verdict = await keys.check(_bearer(request.headers))
        if not verdict.accepted:
            return refused(number, verdict, request.method, request.path)
        try:
            chat = content.parse_chat_request(await request.get_data(as_text=False))
        except content.MockRequestError as exc:
            log.info("mock.request", request=number, path=request.path, status=exc.status)
            return json_response(number, exc.status, exc.body)
        text = content.reply_text(chat.prompt, verdict.version)
        completion_id = f"chatcmpl-mock{number}"
        created = int(time.time())
        log.info(
            "mock.request",
            request=number,
            path=request.path,
            status=200,
            stream=chat.stream,
            key_version=verdict.version,
        )
        if not chat.stream:
            body = content.completion(chat, text, completion_id=completion_id, created=created)
            return json_response(number, 200, body)
        chunks = content.stream_chunks(chat, text, completion_id=completion_id, created=created)

        async def events() -> AsyncIterator[bytes]:
            for chunk in chunks:
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    await trio.sleep(chunk_delay_s)
                yield content.sse(chunk)
            yield content.sse("[DONE]")

        response = Response(events(), status=200, headers=headers(number))
        response.headers["content-type"] = "text/event-stream; charset=utf-8"
        response.headers["cache-control"] = "no-cache"
        return response

    @app.websocket("/v1/realtime")
    async def realtime() -> Response | None:
        number = next(counter)
        verdict = await keys.check(_bearer(websocket.headers))
        if not verdict.accepted:
            return refused(number, verdict, "GET", websocket.path)
        model = websocket.args.get("model", "gpt-realtime")
        session = content.RealtimeSession(
            session_id=f"sess_mock{number}", model=model, key_version=verdict.version
        )
        await websocket.accept(headers=headers(number))
        log.info("mock.realtime", request=number, model=model, key_version=verdict.version)
        for event in session.opening():
            await websocket.send(json.dumps(event))
        while True:
            message = await websocket.receive()
            if isinstance(message, bytes):
                events = session.receive_binary()
            else:
                events = session.receive(message)
            for event in events:
                if event["type"].endswith(".delta"):
                    await trio.sleep(chunk_delay_s)
                await websocket.send(json.dumps(event))

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        message = {
            404: f"Invalid URL ({request.method} {request.path})",
            405: f"Method {request.method} not allowed on {request.path}",
            413: f"Request body over {content.MAX_REQUEST_BYTES} bytes",
        }.get(status, exc.description or "error")
        body = content.error_body(message, code=None)
        return Response(json.dumps(body), status=status, content_type="application/json")

    return app


def _bearer(headers: Headers) -> str:
    value = headers.get("authorization", "")
    scheme, _, key = value.partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


async def serve_mock(
    keys: KeyCheck,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    chunk_delay_s: float = content.DEFAULT_CHUNK_DELAY_S,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the mock provider on ``host:port`` (0: a free port) until cancelled; reports
    the port it listens on through ``task_status``.

    Raises:
        OSError: the address cannot be bound (the port is taken, say).
    """
    app = create_app(keys, chunk_delay_s=chunk_delay_s)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(
                    serve_asgi, app, sock, backlog=128, log_name="openclawd.mock.hypercorn"
                )
            )
            bound: int = sock.getsockname()[1]
            log.info("mock.listening", url=f"http://{host}:{bound}")
            task_status.started(bound)


async def run_standalone(
    keys: KeyCheck, *, host: str, port: int, chunk_delay_s: float, login: Vault | None
) -> None:
    """``openclawd mock-provider``: serve until SIGINT or SIGTERM.

    Raises:
        OSError: the address cannot be bound.
        VaultError: ``login`` (the Vault the keys come from) refused the token.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        if login is not None:
            await login.login()
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(
                    serve_mock, keys, host=host, port=port, chunk_delay_s=chunk_delay_s
                )
            )
            async for signum in signals:
                log.info("mock.stopping", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
