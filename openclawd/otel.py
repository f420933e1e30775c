"""The OpenTelemetry SDK behind ``openclawd/tracing.py``'s interface: the one importer of it.

Owns the tracer provider (``service.name``, a parent-based ratio sampler), each request's
span (``_Span``: a ``tracing.Trace``), the W3C trace context in and out, and the export:
spans wait in a bounded queue and a thread of their own sends them in batches to the
collector's ``/v1/traces`` with the SDK's OTLP/HTTP exporter, so the event loop never
waits on a collector. A full queue or a failed export drops spans, counted (``dropped``).
Imported only when ``[tracing] otlp_endpoint`` is set. Only the SDK's public API is used.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import trio
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from openclawd import __version__
from openclawd.config import TracingConfig
from openclawd.protocol.exchange import Ending
from openclawd.protocol.usage import token_counts
from openclawd.tracing import TRACE_HEADERS, Headers, Trace, Tracer, Value, operation_of

if TYPE_CHECKING:
    from openclawd.keys.manager import Key
    from openclawd.protocol.exchange import Exchange

# Spans sent in one export request, and how long a span may wait for a batch to fill.
MAX_BATCH_SPANS = 512
SCHEDULE_DELAY_S = 1.0

_PROPAGATOR = TraceContextTextMapPropagator()


class BoundedBatches(SpanProcessor):
    """Ended spans, queued (at most ``max_queue``) and exported in batches by a thread of
    their own, when a batch is full or ``delay_s`` after the last. A span that finds the
    queue full, and each span of a batch the exporter fails to send (a dead collector,
    after its own retries within its timeout), is dropped and counted."""

    def __init__(
        self, exporter: SpanExporter, max_queue: int, delay_s: float = SCHEDULE_DELAY_S
    ) -> None:
        self._exporter = exporter
        self._max_queue = max_queue
        self._delay_s = delay_s
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._lock = threading.Lock()  # the queue and the count
        self._exporting = threading.Lock()  # one export at a time, in order
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="openclawd-traces", daemon=True)
        self._thread.start()

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            if len(self._queue) >= self._max_queue:
                self.dropped += 1
                return
            self._queue.append(span)
            full = len(self._queue) >= MAX_BATCH_SPANS
        if full:
            self._wake.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._delay_s)
            self._wake.clear()
            self._export_queued()

    def _export_queued(self) -> None:
        with self._exporting:
            while True:
                with self._lock:
                    size = min(len(self._queue), MAX_BATCH_SPANS)
                    batch = [self._queue.popleft() for _ in range(size)]
                if not batch:
                    return
                if not self._export(batch):
                    with self._lock:
                        self.dropped += len(batch)
                        if self._stopping.is_set():  # no second wait on a dead collector
                            self.dropped += len(self._queue)
                            self._queue.clear()

    def _export(self, batch: Sequence[ReadableSpan]) -> bool:
        try:
            return self._exporter.export(batch) is SpanExportResult.SUCCESS
        except Exception:  # the exporter's own failure: the batch is lost, not the daemon
            return False

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self._export_queued()
        return True

    def shutdown(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join()
        self._export_queued()
        self._exporter.shutdown()


class OtelTracer(Tracer):
    """Spans of the SDK, exported to ``config.otlp_endpoint`` + ``/v1/traces`` with
    ``headers`` (``exporter`` replaces the OTLP exporter, ``delay_s`` the wait for a
    batch: tests)."""

    def __init__(
        self,
        config: TracingConfig,
        headers: dict[str, str],
        exporter: SpanExporter | None = None,
        delay_s: float = SCHEDULE_DELAY_S,
    ) -> None:
        exporter = exporter or OTLPSpanExporter(
            endpoint=f"{config.otlp_endpoint}/v1/traces",
            headers=headers,
            timeout=config.export_timeout_s,
        )
        self.batches = BoundedBatches(exporter, config.max_queue_spans, delay_s)
        self._provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
            resource=Resource.create(
                {"service.name": config.service_name, "service.version": __version__}
            ),
            shutdown_on_exit=False,
        )
        self._provider.add_span_processor(self.batches)
        self._tracer = self._provider.get_tracer("openclawd", __version__)

    @property
    def dropped(self) -> int:
        return self.batches.dropped

    def request(
        self,
        entry: str,
        provider: str,
        path: str,
        model: object,
        client: str | None,
        headers: Headers,
    ) -> Trace:
        carrier = _trace_headers(headers)
        parent = _PROPAGATOR.extract(carrier) if carrier else Context()
        operation = "realtime" if entry == "realtime" else operation_of(path)
        attributes: dict[str, Value] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": provider,
            "openclawd.entry_point": entry,
        }
        if isinstance(model, str):
            attributes["gen_ai.request.model"] = model
        if client is not None:
            attributes["openclawd.client"] = client
        name = f"{operation} {model}" if isinstance(model, str) else operation
        span = self._tracer.start_span(
            name, context=parent, kind=SpanKind.CLIENT, attributes=attributes
        )
        return _Span(span, operation)

    def flush(self) -> None:
        self.batches.force_flush()

    def shutdown(self) -> None:
        self._provider.shutdown()

    async def aclose(self) -> None:
        """``shutdown`` in a thread, abandoned if cancelled."""
        await trio.to_thread.run_sync(self.shutdown, abandon_on_cancel=True)


def _trace_headers(headers: Headers) -> dict[str, str]:
    """The app's ``traceparent`` and ``tracestate``, by their lower-case names."""
    carrier: dict[str, str] = {}
    for name, value in headers:
        text = name.decode("latin-1") if isinstance(name, bytes) else name
        if text.lower() in TRACE_HEADERS:
            carrier[text.lower()] = value.decode("latin-1") if isinstance(value, bytes) else value
    return carrier


class _Span(Trace):
    """One request's SDK span (recording or not: an unsampled one still propagates)."""

    __slots__ = ("_span", "_outgoing", "_recording", "_operation")

    def __init__(self, span: trace.Span, operation: str) -> None:
        self._span = span
        self._operation = operation
        self._recording = span.is_recording()
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        self._outgoing = list(carrier.items())

    @property
    def recording(self) -> bool:  # type: ignore[override]
        return self._recording

    def request_model(self, model: object) -> None:
        if isinstance(model, str) and self._recording:
            self._span.set_attribute("gen_ai.request.model", model)
            self._span.update_name(f"{self._operation} {model}")

    def set(self, name: str, value: Value | None) -> None:
        if value is not None and self._recording:
            self._span.set_attribute(name, value)

    def event(self, name: str, attributes: Mapping[str, Value]) -> None:
        if self._recording:
            self._span.add_event(name, attributes)

    def upstream(self, provider: str, server: str, attempts: int, key: Key | None) -> None:
        if not self._recording:
            return
        self._span.set_attributes({"gen_ai.provider.name": provider, "server.address": server})
        self._span.set_attribute("openclawd.attempts", attempts)
        if key is not None:
            self._span.set_attribute("openclawd.key.fingerprint", key.fingerprint)
            self._span.set_attribute("openclawd.key.version", key.version)

    def propagate(self, headers: list[tuple[str, str]]) -> None:
        headers[:] = [(k, v) for k, v in headers if k.lower() not in TRACE_HEADERS]
        headers.extend(self._outgoing)

    def finish(self, exchange: Exchange) -> None:
        if not self._recording:
            self._span.end()
            return
        counts = token_counts(exchange.usage)
        self.set("gen_ai.usage.input_tokens", counts.get("prompt"))
        self.set("gen_ai.usage.output_tokens", counts.get("completion"))
        self.set("gen_ai.response.model", exchange.response_model)
        self.set("http.response.status_code", exchange.status)
        ending = exchange.ending or Ending.CUT
        error: str | None = None
        if exchange.error is not None:
            error = exchange.error.code
        elif ending is Ending.CUT:
            error = "cut"
        elif exchange.status is not None and exchange.status >= 400:
            error = str(exchange.status)
        self.end(error, **{"openclawd.ending": ending.value})

    def end(self, error_type: str | None = None, **attributes: Value) -> None:
        if self._recording:
            self._span.set_attributes(attributes)
            if error_type is not None:
                self._span.set_attribute("error.type", error_type)
                self._span.set_status(Status(StatusCode.ERROR))
        self._span.end()
