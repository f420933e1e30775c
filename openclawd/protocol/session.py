"""Per-connection request bookkeeping of a /v1/ws channel (CONTRACT.md 3.1, 3.4).

Sans-IO, after h11's ``Connection``: the driver hands each app message to
``Session.receive`` and performs the action it gets back; it reports each request's end
with ``finish``. The session owns the ids in flight, the in-flight limit, which provider
may be asked for, and which headers each provider refuses. It knows nothing of sockets,
tasks, upstreams, keys or the clock; limits that span connections (the per-uid rate) and
the daemon's drain are checked by the driver.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from openclawd.errors import FrameError
from openclawd.protocol import messages
from openclawd.protocol.messages import Cancel, Ping, Request


@dataclass(frozen=True, slots=True)
class Start:
    """Start this request upstream (its id is now in flight until ``finish``)."""

    request: Request


@dataclass(frozen=True, slots=True)
class Abort:
    """Cancel the in-flight request ``id``; it ends with an ``error`` ``cancelled``."""

    id: str


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``text`` to the app (a pong, or an ``error`` frame for a bad frame)."""

    text: str


@dataclass(frozen=True, slots=True)
class Ignore:
    """Nothing to do (e.g. a cancel for a request that already ended)."""


Action = Start | Abort | Send | Ignore


class Session:
    """The state of one /v1/ws channel.

    Args:
        refused_headers: for each configured provider, the lower-case header names an app
            may not send it (the provider's ``auth_header`` beyond the common ones).
        max_inflight: ``[listen] max_inflight_per_connection``.
    """

    def __init__(self, refused_headers: Mapping[str, frozenset[str]], max_inflight: int) -> None:
        self.refused_headers = dict(refused_headers)
        self.max_inflight = max_inflight
        self.inflight: set[str] = set()

    def receive(self, message: str | bytes) -> Action:
        """Decide what one app message asks for. Never raises."""
        try:
            frame = messages.decode(message)
            return self._act(frame)
        except FrameError as exc:
            # An error tied to an id in flight would read as that request's end.
            rid = exc.request_id if exc.request_id not in self.inflight else None
            return Send(messages.error(rid, exc.code, str(exc)))

    def _act(self, frame: messages.Frame) -> Action:
        if isinstance(frame, Ping):
            return Send(messages.pong(frame.id))
        if isinstance(frame, Cancel):
            return Abort(frame.id) if frame.id in self.inflight else Ignore()
        return self._start(frame)

    def _start(self, request: Request) -> Action:
        rid = request.id
        if rid in self.inflight:
            # Not tied to the id: an error frame with it would read as the end of the
            # request that really is in flight under that id.
            raise FrameError(f"id {_short(rid)} is already in flight")
        refused = self.refused_headers.get(request.provider)
        if refused is None:
            # Not repeated back: what the app put there may be a key (messages.py).
            raise FrameError("unknown provider", code="unknown_provider", request_id=rid)
        for name, _ in request.headers:
            if name in refused:
                raise FrameError(
                    f"header {name} is refused: the daemon adds the credentials", request_id=rid
                )
        if len(self.inflight) >= self.max_inflight:
            raise FrameError(
                f"{self.max_inflight} requests already in flight on this connection",
                code="too_many_inflight",
                request_id=rid,
            )
        self.inflight.add(rid)
        return Start(request)

    def finish(self, rid: str) -> None:
        """Request ``rid`` has sent its last frame; its id may be used again."""
        self.inflight.discard(rid)


def _short(text: str, limit: int = 40) -> str:
    return json.dumps(text[:limit] + ("..." if len(text) > limit else ""))
