"""A local OTLP/HTTP sink for ``bench/run --tracing``: takes every export the daemon POSTs
to ``/v1/traces``, counts the requests and bytes, and answers 200 with an empty
``ExportTraceServiceResponse`` (zero bytes of protobuf), so the daemon's tracing cost is
measured against a collector that is never the limit. A thread in the runner's process."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Sink:
    """What the sink took: export requests and their bytes."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.lock = threading.Lock()


@contextlib.contextmanager
def otlp_sink() -> Iterator[tuple[str, Sink]]:
    """A sink on 127.0.0.1 (its base URL, for ``[tracing] otlp_endpoint``) while open."""
    sink = Sink()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            size = len(self.rfile.read(int(self.headers.get("content-length", "0"))))
            with sink.lock:
                sink.requests += 1
                sink.bytes += size
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", sink
    finally:
        server.shutdown()
        server.server_close()
