"""The /v1/ws frames between apps and the daemon: decode and validate, encode (CONTRACT.md 3.1).

Sans-IO: frames in, typed frames or ``FrameError`` out; dicts in, JSON text out. Knows the
contract's field rules (ids, methods, paths, headers) but nothing of the providers that are
configured, of connections or of time. Never raises anything but ``FrameError`` on input.
An error's message never quotes what the app sent (a frame type, a header's name or
value, a provider name): a key pasted in the wrong place must not come back in an error,
nor reach a log line. It names the field, and a header by its place in ``headers``;
only names the daemon itself knows (the credential headers) are spelled out.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from typing import Any

from openclawd.errors import FrameError

PROTOCOL_VERSION = 1
MAX_ID_CHARS = 128
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})

# Headers that carry credentials: the daemon adds the provider's key, an app never does.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
# Hop-by-hop headers (RFC 9110 7.6.1, and the older ones still seen): never passed on.
HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# In a request frame: hop-by-hop, and the ones the upstream client computes itself.
DROPPED_HEADERS = HOP_BY_HOP_HEADERS | {"host", "content-length"}

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE_RE = re.compile(r"[^\t\x20-\x7e]")
_BAD_PATH_RE = re.compile(r"[\x00-\x20\x7f#\\]")
_SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F]")


@dataclass(frozen=True, slots=True)
class Request:
    """``{"type":"request",...}``: one upstream HTTP request the app asks for."""

    id: str
    provider: str
    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    body: Any = None
    has_body: bool = False


@dataclass(frozen=True, slots=True)
class Cancel:
    """``{"type":"cancel","id":ID}``."""

    id: str


@dataclass(frozen=True, slots=True)
class Ping:
    """``{"type":"ping","id":ANY}``: answered with a pong carrying the same id."""

    id: Any = field(default=None)


Frame = Request | Cancel | Ping


def shown_name(name: str, configured: Container[str]) -> str | None:
    """``name`` as it may be shown in a log line or an answer: only a configured name
    that looks like one (``[A-Za-z0-9_.-]{1,64}``); anything else the app sent where a
    name goes may be a key pasted in the wrong place, and is None."""
    return name if name in configured and _NAME_RE.fullmatch(name) else None


def has_dot_segment(path: str) -> bool:
    """Does ``path`` (without its query) hold a dot segment, plain or percent-encoded
    (``..``, ``%2e%2e``)? Appended to a provider's base URL, it could step out of it."""
    return any(urllib.parse.unquote(segment) in (".", "..") for segment in path.split("/"))


def decode(message: str | bytes) -> Frame:
    """Parse and validate one WebSocket message from the app.

    Raises:
        FrameError: ``bad_request``, with ``request_id`` set when the frame named a usable
            id (so the error can be tied to the request it is about).
    """
    if not isinstance(message, str):
        raise FrameError("frames are JSON text messages, not binary")
    try:
        obj = json.loads(message, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise FrameError("frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise FrameError("frame must be a JSON object")
    raw_id = obj.get("id")
    request_id = raw_id if _valid_id(raw_id) else None
    if _SURROGATE_ESCAPE_RE.search(message) and not _encodable(obj):
        # "\ud800" is valid JSON but not text: nothing holding it could be sent on.
        raise FrameError(
            "frame holds a \\u escape of a lone UTF-16 surrogate",
            request_id=request_id if _encodable(request_id) else None,
        )
    kind = obj.get("type")
    if kind == "ping":
        return Ping(raw_id)
    if not isinstance(kind, str):
        raise FrameError('frame needs a string "type"', request_id=request_id)
    if kind == "cancel":
        return Cancel(_id(raw_id))
    if kind == "request":
        rid = _id(raw_id)
        try:
            return _request(rid, obj)
        except FrameError as exc:
            exc.request_id = rid
            raise
    raise FrameError(
        'unknown frame type: "type" must be "request", "cancel" or "ping"',
        request_id=request_id,
    )


def _no_constant(name: str) -> Any:
    # NaN and Infinity: Python's json reads them, JSON has no such thing.
    raise ValueError(f"{name} is not JSON")


def _encodable(obj: object) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


def _valid_id(raw: object) -> bool:
    return isinstance(raw, str) and 1 <= len(raw) <= MAX_ID_CHARS


def _id(raw: object) -> str:
    if not _valid_id(raw):
        raise FrameError(f'"id" must be a string of 1 to {MAX_ID_CHARS} characters')
    assert isinstance(raw, str)
    return raw


def _request(rid: str, obj: Mapping[str, Any]) -> Request:
    provider = obj.get("provider")
    if not isinstance(provider, str) or not provider:
        raise FrameError('"provider" must be a non-empty string')
    method = obj.get("method", "POST")
    if not isinstance(method, str) or method not in METHODS:
        raise FrameError(f'"method" must be one of {", ".join(sorted(METHODS))}')
    path = obj.get("path")
    if not isinstance(path, str) or not path.startswith("/") or path.startswith("//"):
        raise FrameError('"path" must be a string starting with a single "/"')
    if _BAD_PATH_RE.search(path) or has_dot_segment(path.split("?", 1)[0]):
        raise FrameError('"path" holds spaces, control characters, "#", "\\\\" or dot segments')
    return Request(
        id=rid,
        provider=provider,
        method=method,
        path=path,
        headers=_headers(obj.get("headers")),
        body=obj.get("body"),
        has_body="body" in obj,
    )


def _headers(raw: object) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise FrameError('"headers" must be an object of strings')
    headers = []
    for place, (name, value) in enumerate(raw.items(), 1):
        # The app's header named by its place, never quoted (see the module's docstring).
        if not _TOKEN_RE.fullmatch(name):
            raise FrameError(f'header {place} of "headers": its name is not a valid HTTP token')
        if not isinstance(value, str) or _BAD_VALUE_RE.search(value):
            raise FrameError(
                f'header {place} of "headers": its value must be a string of printable'
                " ASCII characters"
            )
        lower = name.lower()
        if lower in CREDENTIAL_HEADERS:
            raise FrameError(f"header {lower} is refused: the daemon adds the credentials")
        if lower not in DROPPED_HEADERS:
            headers.append((lower, value))
    return tuple(headers)


def encode_body(body: Any) -> bytes:
    """A request frame's ``body`` as the JSON bytes sent upstream."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


# --- daemon -> app ----------------------------------------------------------------------


def encode(frame: Mapping[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


def hello(version: str, providers: list[str], max_message_bytes: int, max_inflight: int) -> str:
    return encode(
        {
            "type": "hello",
            "protocol": PROTOCOL_VERSION,
            "server": f"openclawd/{version}",
            "providers": providers,
            "max_message_bytes": max_message_bytes,
            "max_inflight": max_inflight,
        }
    )


def pong(ping_id: Any) -> str:
    return encode({"type": "pong", "id": ping_id})


def response_start(rid: str, status: int, headers: Mapping[str, str]) -> str:
    return encode({"type": "response.start", "id": rid, "status": status, "headers": headers})


def response_event(rid: str, event: str | None, data: str) -> str:
    return encode({"type": "response.event", "id": rid, "event": event, "data": data})


def response_body(rid: str, body: Any) -> str:
    return encode({"type": "response.body", "id": rid, "body": body})


def response_end(
    rid: str, key_version: int, attempts: int, usage: Any, provider: str | None = None
) -> str:
    """The last frame of a relayed response; ``provider`` is the one that answered (a
    route's, CONTRACT.md 5.4)."""
    return encode(
        {
            "type": "response.end",
            "id": rid,
            "key_version": key_version,
            "attempts": attempts,
            "usage": usage,
            "provider": provider,
        }
    )


def error(rid: str | None, code: str, message: str, retry_after: float | None = None) -> str:
    return encode(
        {"type": "error", "id": rid, "code": code, "message": message, "retry_after": retry_after}
    )
