"""The export, through the SDK's real OTLP/HTTP exporter to a collector on loopback that
decodes its protobuf (``opentelemetry-proto``): what arrives and with which headers,
spans dropped and counted when the collector is dead or the queue is full, and the real
daemon process exporting a request's span, child of the app's traceparent."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from openclawd import config
from openclawd.keys.manager import fingerprint
from openclawd.otel import OtelTracer

from ..bao import BaoServer
from ..conftest import DaemonProcess
from ..dataplane.daemon_process import curl, metric, running_daemon
from .spans import APP_SPAN_ID, APP_TRACE_ID, APP_TRACEPARENT

COLLECTOR_TOKEN = "collector-token-5e1d9a"
KEY = "sk-traces-0001-aaaaaaaaaaaaaaaa"


class Collector:
    """An OTLP/HTTP collector on 127.0.0.1: each POST is kept (path, headers, decoded
    request) and answered 200 with an empty ``ExportTraceServiceResponse``."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.received = threading.Condition()
        kept = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                with kept.received:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    kept.posts.append((self.path, headers, body))
                    kept.received.notify_all()
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def spans(self) -> list[tuple[Span, dict[str, Any]]]:
        """Every span received, with its resource's attributes."""
        found = []
        for _, _, body in self.posts:
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                resource = {a.key: value_of(a.value) for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    found.extend((span, resource) for span in scope.spans)
        return found


def value_of(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value"))


def attributes_of(span: Span) -> dict[str, Any]:
    return {a.key: value_of(a.value) for a in span.attributes}


@pytest.fixture
def collector() -> Iterator[Collector]:
    collector = Collector()
    collector.thread.start()
    yield collector
    collector.server.shutdown()
    collector.server.server_close()


def tracing(**table: Any) -> config.TracingConfig:
    return config.parse({"tracing": table}).tracing


def closed_port() -> int:
    """A loopback port nothing listens on (bound then closed: connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_spans_reach_the_collector_as_otlp_protobuf_with_the_headers(
    collector: Collector,
) -> None:
    tracer = OtelTracer(
        tracing(otlp_endpoint=collector.url, service_name="sidecar-7"),
        {"authorization": f"Bearer {COLLECTOR_TOKEN}"},
    )
    try:
        trace = tracer.request(
            "http", "openai", "v1/chat/completions", "gpt-4o-mini", "billing",
            [(b"traceparent", APP_TRACEPARENT.encode())],
        )  # fmt: skip
        trace.end("upstream_unavailable")
        tracer.flush()
    finally:
        tracer.shutdown()
    [(path, headers, _)] = collector.posts
    assert path == "/v1/traces"
    assert headers["content-type"] == "application/x-protobuf"
    assert headers["authorization"] == f"Bearer {COLLECTOR_TOKEN}"
    [(span, resource)] = collector.spans()
    assert resource["service.name"] == "sidecar-7"
    assert span.trace_id.hex() == APP_TRACE_ID
    assert span.parent_span_id.hex() == APP_SPAN_ID
    assert span.name == "chat gpt-4o-mini"
    assert span.kind == Span.SPAN_KIND_CLIENT
    assert span.status.code == span.status.STATUS_CODE_ERROR
    attributes = attributes_of(span)
    assert attributes["error.type"] == "upstream_unavailable"
    assert attributes["openclawd.client"] == "billing"


def test_a_dead_collector_drops_the_spans_and_counts_them() -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    tracer = OtelTracer(tracing(otlp_endpoint=endpoint, export_timeout_s=0.5), {})
    try:
        for _ in range(3):
            tracer.request("ws", "openai", "v1/embeddings", None, None, ()).end()
        assert tracer.dropped == 0
        tracer.flush()
        assert tracer.dropped == 3
    finally:
        tracer.shutdown()


def test_spans_over_the_queue_bound_are_dropped_and_counted() -> None:
    exporter = InMemorySpanExporter()
    # The thread exports only when told (delay_s): what the queue holds is known.
    tracer = OtelTracer(tracing(otlp_endpoint="http://127.0.0.1:9", max_queue_spans=2), {},
                        exporter=exporter, delay_s=3600)  # fmt: skip
    try:
        for _ in range(5):
            tracer.request("ws", "openai", "v1/embeddings", None, None, ()).end()
        assert tracer.dropped == 3
        tracer.flush()
        assert len(exporter.get_finished_spans()) == 2
        assert tracer.dropped == 3
    finally:
        tracer.shutdown()


async def test_the_daemon_exports_a_span_per_request_child_of_the_apps_traceparent(
    collector: Collector,
    shared_bao: BaoServer,
    runtime_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    headers_file = runtime_dir / "otlp-headers"
    headers_file.write_text(f"# the collector's token\nAuthorization: Bearer {COLLECTOR_TOKEN}\n")
    table = {"otlp_endpoint": collector.url, "headers_file": str(headers_file)}
    body = '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}'
    with trio.fail_after(60):
        async with running_daemon(shared_bao, runtime_dir, start_daemon, KEY, tracing=table) as (
            daemon,
            upstream,
            _,
        ):
            status, _ = await curl(
                "/v1/http/openai/v1/chat/completions",
                unix_socket=runtime_dir / "data.sock",
                method="POST",
                data=body,
                headers=("content-type: application/json", f"traceparent: {APP_TRACEPARENT}"),
            )
            assert status == 200
            _, metrics = await curl("/metrics", unix_socket=runtime_dir / "control.sock")
            assert metric(metrics, "openclawd_trace_spans_dropped_total") == 0
            sent = upstream.requests[0].headers["traceparent"]
            daemon.signal(15)  # the stop exports what is queued
            assert await trio.to_thread.run_sync(daemon.wait) == 0
    [(span, resource)] = collector.spans()
    assert resource["service.name"] == "openclawd"
    assert (span.trace_id.hex(), span.parent_span_id.hex()) == (APP_TRACE_ID, APP_SPAN_ID)
    assert sent == f"00-{APP_TRACE_ID}-{span.span_id.hex()}-01"
    attributes = attributes_of(span)
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert attributes["gen_ai.provider.name"] == "openai"
    assert attributes["server.address"] == "127.0.0.1"
    assert attributes["openclawd.key.fingerprint"] == fingerprint(KEY)
    assert attributes["openclawd.key.version"] == 1
    assert attributes["openclawd.attempts"] == 1
    assert attributes["http.response.status_code"] == 200
    assert all(h["authorization"] == f"Bearer {COLLECTOR_TOKEN}" for _, h, _ in collector.posts)
    everything = b"".join(post for _, _, post in collector.posts)
    assert KEY.encode() not in everything
    assert COLLECTOR_TOKEN not in daemon.stderr
    assert KEY not in daemon.stderr
