"""The mock provider's HTTP and WebSocket server: a Quart (quart-trio) app on loopback.

Owns the routes and the pacing; what is said comes from ``openclawd.mock.content`` and
which key is accepted from ``openclawd.mock.keys``. Routes, as OpenAI's API has them:

* ``GET /v1/models``;
* ``POST /v1/chat/completions``, plain or streamed (SSE, one chunk per word every
  ``chunk_delay_s``, the usage chunk with ``stream_options.include_usage``, ``[DONE]``);
* ``/v1/realtime`` (WebSocket): ``session.created``, then events for each client event;
* ``POST /v1/messages``, Anthropic's Messages API, plain or streamed (its named events).

Every route needs ``Authorization: Bearer <key>`` (``/v1/messages``: ``x-api-key: <key>``
and ``anthropic-version``) with a key the key check accepts: 401 with the provider's
error shape otherwise (a refused WebSocket gets the 401 as its handshake answer). Each
request is logged with its status and the key's version, never the key.
"""

from __future__ import annotations

import functools
import itertools
import json
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import trio
from quart import Response, has_websocket_context, request, websocket
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException

from openclawd import logs
from openclawd.asgi import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope, serve_asgi
from openclawd.keys.vault import Vault
from openclawd.mock import anthropic, content
from openclawd.mock.keys import KeyCheck, Verdict

log = logs.get(__name__)

RATE_LIMIT_REQUESTS = 10_000
# How long the rest of a request body the app did not read is read and dropped (Quart's
# BODY_TIMEOUT): see ``_drain_request_bodies``.
BODY_TIMEOUT_S = 30.0


def create_app(
    keys: KeyCheck, *, chunk_delay_s: float = content.DEFAULT_CHUNK_DELAY_S
) -> QuartTrio:
    """The mock provider's app. ``chunk_delay_s``: the pause before each streamed piece."""
    app = QuartTrio("openclawd.mock")
    app.config.update(
        MAX_CONTENT_LENGTH=content.MAX_REQUEST_BYTES,
        BODY_TIMEOUT=BODY_TIMEOUT_S,
        RESPONSE_TIMEOUT=None,  # a stream lasts as long as it has words to send
        PROVIDE_AUTOMATIC_OPTIONS=False,
    )
    routes = _Routes(keys, chunk_delay_s)
    app.get("/v1/models")(routes.models)
    app.post("/v1/chat/completions")(routes.chat_completions)
    app.post("/v1/messages")(routes.messages)
    app.websocket("/v1/realtime")(routes.realtime)
    app.register_error_handler(HTTPException, _http_error)
    return app


class _Routes:
    """The routes, over what they share: the key check, the pacing and a request counter."""

    def __init__(self, keys: KeyCheck, chunk_delay_s: float) -> None:
        self._keys = keys
        self._chunk_delay_s = chunk_delay_s
        self._counter = itertools.count(1)

    async def models(self) -> Response:
        number, verdict, refusal = await self._admit(request.headers, request.method, request.path)
        if refusal is not None:
            return refusal
        log.info(
            "mock.request",
            request=number,
            path="/v1/models",
            status=200,
            key_version=verdict.version,
        )
        return _json_response(number, 200, content.models(int(time.time())))

    async def chat_completions(self) -> Response:
        number, verdict, refusal = await self._admit(request.headers, request.method, request.path)
        if refusal is not None:
            return refusal
        try:
            chat = content.parse_chat_request(await request.get_data(as_text=False))
        except content.MockRequestError as exc:
            log.info("mock.request", request=number, path=request.path, status=exc.status)
            return _json_response(number, exc.status, exc.body)
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
            return _json_response(number, 200, body)
        chunks = content.stream_chunks(chat, text, completion_id=completion_id, created=created)
        response = Response(self._events(chunks), status=200, headers=_headers(number))
        response.headers["content-type"] = "text/event-stream; charset=utf-8"
        response.headers["cache-control"] = "no-cache"
        return response

    async def messages(self) -> Response:
        """Anthropic's Messages API: the key in ``x-api-key``, ``anthropic-version`` set."""
        number = next(self._counter)
        given = request.headers.get("x-api-key", "")
        verdict = await self._keys.check(given)
        try:
            if not verdict.accepted:
                message = verdict.message if given else "x-api-key header is required"
                raise anthropic.AnthropicRequestError(401, message, "authentication_error")
            if not request.headers.get(anthropic.VERSION_HEADER):
                raise anthropic.AnthropicRequestError(400, "anthropic-version: header is required")
            body = anthropic.parse_messages_request(await request.get_data(as_text=False))
        except anthropic.AnthropicRequestError as exc:
            log.info("mock.request", request=number, path=request.path, status=exc.status)
            return _json_response(number, exc.status, exc.body)
        log.info(
            "mock.request",
            request=number,
            path=request.path,
            status=200,
            stream=body.stream,
            key_version=verdict.version,
        )
        text = content.reply_text(body.prompt, verdict.version)
        if not body.stream:
            reply = anthropic.message(body, text, message_id=f"msg_mock{number}")
            return _json_response(number, 200, reply)
        events = anthropic.stream_events(body, text, message_id=f"msg_mock{number}")
        response = Response(self._named_events(events), status=200, headers=_headers(number))
        response.headers["content-type"] = "text/event-stream; charset=utf-8"
        response.headers["cache-control"] = "no-cache"
        return response

    async def _named_events(
        self, events: Iterable[tuple[str, dict[str, Any]]]
    ) -> AsyncIterator[bytes]:
        """An Anthropic SSE stream: a pause before each piece of text."""
        for name, data in events:
            if name == "content_block_delta":
                await trio.sleep(self._chunk_delay_s)
            yield anthropic.sse(name, data)

    async def _events(self, chunks: Iterable[dict[str, Any]]) -> AsyncIterator[bytes]:
        """The SSE stream: a pause before each piece of content, then ``[DONE]``."""
        for chunk in chunks:
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                await trio.sleep(self._chunk_delay_s)
            yield content.sse(chunk)
        yield content.sse("[DONE]")

    async def realtime(self) -> Response | None:
        number, verdict, refusal = await self._admit(websocket.headers, "GET", websocket.path)
        if refusal is not None:
            return refusal  # the handshake's answer: the WebSocket is never accepted
        model = websocket.args.get("model", "gpt-realtime")
        session = content.RealtimeSession(
            session_id=f"sess_mock{number}", model=model, key_version=verdict.version
        )
        await websocket.accept(headers=_headers(number))
        log.info("mock.realtime", request=number, model=model, key_version=verdict.version)
        for event in session.opening():
            await websocket.send(json.dumps(event))
        while True:
            message = await websocket.receive()
            # Not `isinstance(message, bytes)`: quart hands an empty binary message over
            # as None (its `event.get("bytes") or event["text"]`).
            if isinstance(message, str):
                events = session.receive(message)
            else:
                events = session.receive_binary()
            for event in events:
                if event["type"].endswith(".delta"):
                    await trio.sleep(self._chunk_delay_s)
                await websocket.send(json.dumps(event))

    async def _admit(
        self, given: Headers, method: str, path: str
    ) -> tuple[int, Verdict, Response | None]:
        """Number the request and judge its key: the refusal to answer, if refused."""
        number = next(self._counter)
        verdict = await self._keys.check(_bearer(given))
        if verdict.accepted:
            return number, verdict, None
        return number, verdict, _refused(number, verdict, method, path)


def _headers(number: int) -> dict[str, str]:
    return {
        "x-request-id": f"req_mock_{number}",
        "openai-organization": "openclawd-mock",
        "x-ratelimit-limit-requests": str(RATE_LIMIT_REQUESTS),
        "x-ratelimit-remaining-requests": str(RATE_LIMIT_REQUESTS - number % RATE_LIMIT_REQUESTS),
    }


def _json_response(number: int, status: int, body: Mapping[str, Any]) -> Response:
    return Response(
        json.dumps(body),
        status=status,
        headers=_headers(number),
        content_type="application/json",
    )


def _refused(number: int, verdict: Verdict, method: str, path: str) -> Response:
    log.info(
        "mock.refused",
        request=number,
        method=method,
        path=path,
        status=verdict.status,
        code=verdict.code,
    )
    body = content.error_body(verdict.message, code=verdict.code)
    return _json_response(number, verdict.status, body)


async def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    # A WebSocket handshake to an unknown path lands here too, with no request context.
    method, path = (
        ("GET", websocket.path) if has_websocket_context() else (request.method, request.path)
    )
    message = {
        404: f"Invalid URL ({method} {path})",
        405: f"Method {method} not allowed on {path}",
        413: f"Request body over {content.MAX_REQUEST_BYTES} bytes",
    }.get(status, exc.description or "error")
    body = content.error_body(message, code=None)
    return Response(json.dumps(body), status=status, content_type="application/json")


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
    ipv6 = ":" in host  # ::1, which the CLI accepts as a loopback address
    with socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(
                    serve_asgi,
                    _drain_request_bodies(app),
                    sock,
                    backlog=128,
                    log_name="openclawd.mock.hypercorn",
                )
            )
            bound: int = sock.getsockname()[1]
            shown = f"[{host}]" if ipv6 else host
            log.info("mock.listening", url=f"http://{shown}:{bound}")
            task_status.started(bound)


def _drain_request_bodies(app: ASGIFramework) -> ASGIFramework:
    """``app``, reading and dropping what is left of a request body it answered without
    reading (a 401, a 413) before the end of its response goes out.

    Hypercorn queues at most 10 body chunks for an app, and nobody takes them once the
    app has answered. Left unread, a body over about 640 KiB wedged the connection: the
    server stopped reading it but never closed it (its close was cancelled midway), so a
    client that reused it (a pooled httpx client) hung on its next request. Drained
    before the response ends, the request is complete when the response is, and the
    connection is reused as usual.
    """

    async def drained(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        body_done = trio.Event()

        async def tracked() -> Any:
            event = await receive()
            if event["type"] == "http.disconnect" or not event.get("more_body", False):
                body_done.set()
            return event

        async def drain() -> None:
            while True:
                await tracked()

        async def send_after_body(message: Any) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                # quart's own reader takes events too, maybe the last one: wait for the
                # body's end, whoever reads it, rather than for another event.
                with trio.move_on_after(BODY_TIMEOUT_S):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(drain)
                        await body_done.wait()
                        nursery.cancel_scope.cancel()
            await send(message)

        await app(scope, tracked, send_after_body)

    return drained


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
