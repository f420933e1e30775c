"""Token usage, as a response reports it (sans-IO).

Providers say how many tokens a response cost in a ``usage`` object: at the end of a JSON
body, or in an event of an SSE stream (OpenAI's last chunk; Anthropic's input tokens first
and output tokens last). ``UsageReader`` reads it from a body's raw bytes as they pass,
without changing them; ``usage_of`` and ``merge_usage`` read it from decoded events;
``token_counts`` turns it into the daemon's two counts. The model that answered (the
response's ``model``, for traces' ``gen_ai.response.model``) is read the same way, by
``model_of`` and ``UsageReader.model``. Pure: no I/O, no clock.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from openclawd.errors import UpstreamProtocolError
from openclawd.protocol.sse import SSEDecoder

# The most of a JSON response body held on the side to read its token usage.
USAGE_BODY_BYTES = 1024 * 1024

_COUNTS = (
    ("prompt", ("prompt_tokens", "input_tokens")),
    ("completion", ("completion_tokens", "output_tokens")),
)


def usage_of(data: str) -> Any:
    """The ``usage`` object an event's data carries, if any and not null: at the top
    (OpenAI chat chunks, Anthropic's ``message_delta``) or one level down (Anthropic's
    ``message_start``, ``message.usage``; OpenAI Responses' ``response.completed``,
    ``response.usage``)."""
    # Every chunk of an include_usage stream says "usage":null: not worth a parse.
    if data.count('"usage"') == data.count('"usage":null'):
        return None
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return _usage_in(obj)


def _usage_in(obj: Any) -> Any:
    return _field_in(obj, "usage")


def _field_in(obj: Any, name: str) -> Any:
    """``obj[name]``, or one level down under ``message`` or ``response``; None if none."""
    if not isinstance(obj, dict):
        return None
    value = obj.get(name)
    for inner in ("message", "response"):
        if value is None and isinstance(obj.get(inner), dict):
            value = obj[inner].get(name)
    return value


def model_of(data: str) -> str | None:
    """The ``model`` an event's data names, if any: at the top (OpenAI's chunks) or one
    level down (Anthropic's ``message_start``, OpenAI Responses' events)."""
    if '"model"' not in data:
        return None
    try:
        return _model_in(json.loads(data))
    except (ValueError, RecursionError):
        return None


def _model_in(obj: Any) -> str | None:
    model = _field_in(obj, "model")
    return model if isinstance(model, str) else None


def merge_usage(before: Any, usage: Any) -> Any:
    """The usage of a stream so far, given the next event's: objects are merged (an
    Anthropic stream gives its input tokens first and its output tokens last), anything
    else replaces what was there."""
    if usage is None:
        return before
    if isinstance(before, dict) and isinstance(usage, dict):
        return {**before, **usage}
    return usage


def token_counts(usage: Any) -> dict[str, int]:
    """``{"prompt": N, "completion": M}`` of a ``usage`` object (OpenAI or Anthropic
    shape); what is missing or not a count is left out."""
    counts: dict[str, int] = {}
    if not isinstance(usage, dict):
        return counts
    for kind, names in _COUNTS:
        for name in names:
            value = usage.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                counts[kind] = value
                break
    return counts


def body_kind(content_type: str | None, content_encoding: str | None) -> str | None:
    """How a body's usage is read: ``"sse"``, ``"json"``, or None (not at all: a body
    with a content-encoding is passed on compressed, and other types carry none)."""
    encoding = (content_encoding or "identity").strip().lower()
    content_type = (content_type or "").lower()
    if encoding != "identity":
        return None
    if content_type.startswith("text/event-stream"):
        return "sse"
    if "json" in content_type:
        return "json"
    return None


class UsageReader:
    """Reads a body's token usage as its raw bytes pass: the merged ``usage`` objects of
    an SSE stream, or that of a JSON body up to ``USAGE_BODY_BYTES``. A JSON body whose
    ``length`` is known is read as soon as its last byte is fed. It gives up, quietly, on
    what it cannot read: the usage is for the counts, the body is the app's.

    ``feed`` each chunk, then ``close()`` at the end of the body; ``done`` is true once the
    usage is known, and ``usage`` holds it (None if the body carried none); ``model``, the
    model the body names (its first event's that names one), if any.
    """

    def __init__(self, kind: str | None, length: int | None = None) -> None:
        self._kind = kind
        self._length = length
        self._sse = SSEDecoder(max_event_bytes=USAGE_BODY_BYTES) if kind == "sse" else None
        self._body = bytearray()
        self.usage: Any = None
        self.model: str | None = None
        self.done = kind is None

    def feed(self, chunk: bytes) -> None:
        if self.done:
            return
        if self._sse is not None:
            try:
                for event in self._sse.feed(chunk):
                    self._read_event(event.data)
            except UpstreamProtocolError:  # an event too large to read on the side
                self._sse = None
                self.done = True
            return
        if len(self._body) + len(chunk) > USAGE_BODY_BYTES:
            self._body.clear()
            self.done = True
            return
        self._body += chunk
        if len(self._body) == self._length:
            self.close()

    def close(self) -> None:
        """The body has ended: read what is left (once)."""
        if self.done:
            return
        self.done = True
        if self._sse is not None:
            try:
                for event in self._sse.close():
                    self._read_event(event.data)
            except UpstreamProtocolError:
                pass
            self._sse = None
            return
        try:
            body = json.loads(self._body)
        except (ValueError, RecursionError):
            body = None
        self.usage, self.model = _usage_in(body), _model_in(body)
        self._body.clear()

    def _read_event(self, data: str) -> None:
        self.usage = merge_usage(self.usage, usage_of(data))
        if self.model is None:
            self.model = model_of(data)


# The body fields that bound a completion, in the order they are looked for.
_COMPLETION_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def estimate_tokens(body: bytes, default_completion: int) -> int:
    """A request's tokens before it is sent: its body's bytes / 4, rounded up, plus its
    completion allowance (the first of ``max_completion_tokens``, ``max_tokens``,
    ``max_output_tokens`` in a JSON body, else ``default_completion``)."""
    return math.ceil(len(body) / 4) + completion_allowance(_json_object(body), default_completion)


def completion_allowance(body: Any, default_completion: int) -> int:
    """The completion's allowance a parsed body asks for (see ``estimate_tokens``)."""
    if isinstance(body, dict):
        for name in _COMPLETION_FIELDS:
            value = body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
    return default_completion


def used_tokens(usage: Any) -> int | None:
    """Prompt plus completion tokens of a ``usage`` object (OpenAI's or Anthropic's
    names), None if it reports neither."""
    if not isinstance(usage, dict):
        return None
    counts = [
        value
        for names in (("prompt_tokens", "input_tokens"), ("completion_tokens", "output_tokens"))
        for value in _first_count(usage, names)
    ]
    return sum(counts) if counts else None


def _first_count(usage: Mapping[str, Any], names: Iterable[str]) -> list[int]:
    for name in names:
        value = usage.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return [value]
    return []


def _json_object(body: bytes) -> Any:
    if not body.lstrip().startswith(b"{"):
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None
