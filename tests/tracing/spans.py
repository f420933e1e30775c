"""Tracers for tests: the daemon's own ``OtelTracer`` with the SDK's in-memory exporter in
place of OTLP, and what a test reads of the spans it kept."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from openclawd import config
from openclawd.otel import OtelTracer

APP_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN_ID = "00f067aa0ba902b7"
APP_TRACEPARENT = f"00-{APP_TRACE_ID}-{APP_SPAN_ID}-01"


class Kept:
    """The spans an in-memory tracer exported, once flushed."""

    def __init__(self, tracer: OtelTracer, exporter: InMemorySpanExporter) -> None:
        self.tracer = tracer
        self.exporter = exporter

    def spans(self) -> list[ReadableSpan]:
        self.tracer.flush()
        return list(self.exporter.get_finished_spans())

    def one(self) -> ReadableSpan:
        spans = self.spans()
        assert len(spans) == 1, [s.name for s in spans]
        return spans[0]


@contextmanager
def memory_tracer(**tracing: Any) -> Iterator[Kept]:
    """An ``OtelTracer`` for ``[tracing]`` (an endpoint that is never called) exporting to
    memory; shut down at the end."""
    table = {"otlp_endpoint": "http://127.0.0.1:9", **tracing}
    cfg = config.parse({"tracing": table}).tracing
    exporter = InMemorySpanExporter()
    tracer = OtelTracer(cfg, {}, exporter=exporter)
    try:
        yield Kept(tracer, exporter)
    finally:
        tracer.shutdown()


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    """The span's trace id and span id, as a traceparent writes them."""
    ctx = span.get_span_context()
    assert ctx is not None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def parent_ids(span: ReadableSpan) -> tuple[str, str] | None:
    if span.parent is None:
        return None
    return f"{span.parent.trace_id:032x}", f"{span.parent.span_id:016x}"
