"""Traces (CONTRACT.md 7): what the data plane tells a request's span, and the tracer.

The drivers and the upstream pool speak to a ``Trace``, an interface of our own: attributes
as the request learns them (the provider it went to, its key, its attempts), an event per
retry and per key re-read, the traceparent to send upstream, and the end with the
request's ``Exchange``. With tracing off (the default) every request gets ``OFF``, whose
methods do nothing, and the OpenTelemetry SDK is never imported: ``open_tracer`` imports
``openclawd/otel.py``, the one module that uses the SDK, only for a ``[tracing]
otlp_endpoint``. Never a key, a prompt or a completion in a span: only what is named here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from openclawd.credentials import CredentialError, read_credential
from openclawd.errors import ListenError

if TYPE_CHECKING:
    from openclawd.config import TracingConfig
    from openclawd.keys.manager import Key
    from openclawd.protocol.exchange import Exchange

__all__ = ["OFF", "NO_TRACER", "Trace", "Tracer", "operation_of", "open_tracer"]

# A span attribute's value, as the data plane gives them.
Value = str | int | float | bool
# An app's headers: a /v1/ws request's, or an HTTP head's as h11 has them.
Headers = Iterable[tuple[str, str]] | Iterable[tuple[bytes, bytes]]

# The W3C trace-context headers: the app's become the span's parent and are replaced, on
# the way upstream, by the span's own.
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})

# gen_ai.operation.name by the end of the upstream path: the GenAI conventions' values.
_OPERATIONS = (
    ("/chat/completions", "chat"),
    ("/messages", "chat"),
    ("/responses", "chat"),
    ("/completions", "text_completion"),
    ("/embeddings", "embeddings"),
    (":generatecontent", "generate_content"),
    (":streamgeneratecontent", "generate_content"),
)


def operation_of(path: str) -> str:
    """``gen_ai.operation.name`` of a request to ``path`` (under the provider's
    ``base_url``): ``chat``, ``text_completion``, ``embeddings``, ``generate_content``, or
    ``other`` for what the conventions do not name (``GET /v1/models``)."""
    path = path.split("?", 1)[0].rstrip("/").lower()
    for end, operation in _OPERATIONS:
        if path.endswith(end):
            return operation
    return "other"


class Trace:
    """One request's span as the data plane sees it. This base does nothing: it is the
    trace of every request while tracing is off (``OFF``), and costs a method call."""

    __slots__ = ()
    recording = False  # does the span keep what it is told? (else skip the work)

    def request_model(self, model: object) -> None:
        """The body's ``model``, once read (a string, else nothing)."""

    def set(self, name: str, value: Value | None) -> None:
        """Set attribute ``name`` (nothing for None)."""

    def event(self, name: str, attributes: Mapping[str, Value]) -> None:
        """Add the event ``name`` (a retry, a key re-read) now."""

    def upstream(self, provider: str, server: str, attempts: int, key: Key | None) -> None:
        """The provider the request was sent to (for a route, the last one tried), its
        host, the attempts made and the key of the last (its fingerprint and version)."""

    def propagate(self, headers: list[tuple[str, str]]) -> None:
        """Put the span's ``traceparent`` (and ``tracestate``) in the headers of a
        request going upstream, in place of any the app sent."""

    def finish(self, exchange: Exchange) -> None:
        """End the span with how the request ended (status, usage, error)."""

    def end(self, error_type: str | None = None, **attributes: Value) -> None:
        """End the span: ERROR with ``error.type`` if ``error_type`` is given."""


OFF = Trace()


class Tracer:
    """Makes each request's ``Trace``. This base is tracing off: ``OFF`` for every request,
    nothing exported, nothing dropped."""

    @property
    def dropped(self) -> int:
        """Spans dropped so far: the export queue was full, or the collector failed."""
        return 0

    def request(
        self,
        entry: str,
        provider: str,
        path: str,
        model: object,
        client: str | None,
        headers: Headers,
    ) -> Trace:
        """The trace of an app request that has started: on entry point ``entry``
        (``ws``, ``http``, ``realtime``) to ``provider`` (or a route) at ``path``, for body
        ``model`` (if a string), from ``client``; the app's ``headers`` may hold a W3C
        ``traceparent`` (names in any case) that becomes its parent. Cancellation: never
        blocks."""
        return OFF

    def flush(self) -> None:
        """Export what is queued now (blocks: run it in a thread)."""

    def shutdown(self) -> None:
        """Export what is queued (bounded by the export timeout) and stop (blocks)."""

    async def aclose(self) -> None:
        """``shutdown`` without blocking the event loop; here (tracing off), nothing to do:
        not even a thread, which a virtual clock would jump over."""


NO_TRACER = Tracer()


def open_tracer(config: TracingConfig) -> Tracer:
    """The tracer ``[tracing]`` asks for: ``NO_TRACER`` without an ``otlp_endpoint``;
    else one that exports spans to it (OTLP over HTTP, protobuf) from its own thread.

    Raises:
        ListenError: ``headers_file`` cannot be read or is malformed (the message names
            the file and the line, never a value).
    """
    if not config.otlp_endpoint:
        return NO_TRACER
    headers: dict[str, str] = {}
    if config.headers_file:
        try:
            headers = parse_headers(read_credential(config.headers_file, what=_HEADERS_KEY))
        except CredentialError as exc:
            raise ListenError(str(exc)) from None
    from openclawd import otel  # the SDK, only now

    return otel.OtelTracer(config, headers)


_HEADERS_KEY = "tracing.headers_file"


def parse_headers(text: str) -> dict[str, str]:
    """``name: value`` lines (blank lines and ``#`` comments skipped) as headers.

    Raises:
        CredentialError: a line is not ``name: value`` (by its number: a value is secret).
    """
    headers: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, colon, value = stripped.partition(":")
        name, value = name.strip().lower(), value.strip()
        if not colon or not name or not value or not name.isascii() or " " in name:
            raise CredentialError(_HEADERS_KEY, f"line {number} is not 'name: value'")
        headers[name] = value
    return headers
