"""Structured logging to stderr, one line per event, for journald.

Owns the log format (``logfmt`` or ``json``) and the ``conn`` and ``client`` fields: code
that handles one connection sets ``connection_id`` (and, once it knows it, ``client_name``)
once, and every line logged from that task (and the tasks it starts) carries it. Call
sites log an event name plus fields, never prose with values pasted in, so lines stay
machine-readable: ``log.info("socket.listening", path=p)``. This module must never be
handed a key: callers log fingerprints and versions.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any, TextIO

connection_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "openclawd_connection_id", default=None
)
# The client (CONTRACT.md 5.1) of the connection being handled: every line about one of
# its requests carries ``client=NAME``.
client_name: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "openclawd_client_name", default=None
)

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class EventLogger:
    """A thin front of ``logging.Logger`` that takes an event name and keyword fields."""

    __slots__ = ("_logger",)

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)

    def _log(self, level: int, event: str, fields: dict[str, Any], exc_info: bool = False) -> None:
        logger = self._logger
        if logger.isEnabledFor(level):
            # Built here rather than by Logger.log, which walks the stack to find the
            # caller's file and line for every record: no line of ours shows them, and
            # the walk was a third of a request's logging cost (docs/performance.md).
            record = logger.makeRecord(
                logger.name,
                level,
                "",
                0,
                event,
                (),
                sys.exc_info() if exc_info else None,
                extra={"fields": fields},
            )
            logger.handle(record)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """Log at error level with the traceback of the exception being handled."""
        self._log(logging.ERROR, event, fields, exc_info=True)


def get(name: str) -> EventLogger:
    return EventLogger(name)


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
        "event": record.getMessage(),
    }
    conn = connection_id.get()
    if conn is not None:
        fields["conn"] = conn
    client = client_name.get()
    if client is not None:
        fields["client"] = client
    fields.update(getattr(record, "fields", {}))
    return fields


class LogfmtFormatter(logging.Formatter):
    """``key=value`` pairs; values with spaces, quotes or ``=`` are quoted."""

    def format(self, record: logging.LogRecord) -> str:
        pairs = [f"{k}={_logfmt_value(v)}" for k, v in _record_fields(record).items()]
        if record.exc_info:
            pairs.append(f"traceback={_logfmt_value(self.formatException(record.exc_info))}")
        return " ".join(pairs)


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        fields = _record_fields(record)
        if record.exc_info:
            fields["traceback"] = self.formatException(record.exc_info)
        return json.dumps(fields, default=str, separators=(",", ":"))


def _logfmt_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = value if isinstance(value, str) else str(value)
    if text and not any(c in text for c in ' "=\\') and text.isprintable():
        return text
    return json.dumps(text)


_handler: logging.Handler | None = None


def configure(level: str = "info", fmt: str = "logfmt", stream: TextIO | None = None) -> None:
    """Send every log line (ours and our libraries') to ``stream`` (stderr) in ``fmt``.

    Safe to call again, on reload: it replaces the handler rather than adding one.
    """
    global _handler
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    _handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root.addHandler(_handler)
    # Libraries stay at WARNING even when we debug: their debug lines (HTTP/2 header
    # tables, request dumps) may carry the very keys we must never log.
    root.setLevel(max(_LEVELS[level], logging.WARNING))
    logging.getLogger("openclawd").setLevel(_LEVELS[level])
