"""Where a WebSocket peer's messages begin and end, read off the bytes it sends (sans-IO).

trio-websocket's public API hands over whole messages only; it never says that one has
begun, so the stream below it (``websocket.ActivityStream``) feeds what the peer sends to
``PeerBytes``, which reads the HTTP head and then the frame headers (RFC 6455 5.2),
counting past payloads. Validating is wsproto's: bytes that are not valid frames end the
connection there, whatever is read here. No I/O, no clock.
"""

from __future__ import annotations

import re

__all__ = ["PeerBytes", "header_size", "payload_size"]


class PeerBytes:
    """Where a peer's messages begin and end, read off the bytes it sends: its HTTP head,
    kept (a refused handshake's status is in it), then, if ``frames``, WebSocket frames
    (RFC 6455 5.2), of which only the headers are read: payloads are counted past.

    trio-websocket's public API hands over whole messages only; it never says that one
    has begun, so the stream below it reads the framing itself. Validating is wsproto's:
    bytes that are not valid frames end the connection there, whatever is read here.
    """

    def __init__(self, *, frames: bool) -> None:
        self.head = bytearray()
        self.in_head = True
        self._frames = frames
        self._header = bytearray()  # a frame header begun, not whole yet
        self._left = 0  # payload bytes of the current frame still to come
        self._fragmented = False  # a data frame without FIN came: its message goes on
        self._close: bytearray | None = None  # an unmasked close frame's payload, begun
        # The code and reason of the peer's close frame, as sent, once whole (a server's
        # frames only: a client's are masked, and never needed).
        self.close_frame: tuple[int, str] | None = None

    @property
    def between_messages(self) -> bool:
        """Nothing begun is unfinished: no message, frame or frame header under way."""
        return not (self._left or self._header or self._fragmented)

    def feed(self, data: bytes | bytearray) -> None:
        if self.in_head:
            data = self._feed_head(data)
        if self._frames:
            self._feed_frames(data)

    def _feed_head(self, data: bytes | bytearray) -> bytes:
        """Keeps the head; returns what follows it in ``data``."""
        start = max(0, len(self.head) - 2)  # the blank line may straddle two reads
        self.head += data
        blank = _BLANK_LINE.search(self.head, start)
        if blank is None:
            if len(self.head) > _MAX_HEAD_BYTES:  # no handshake takes it: stop keeping it
                self.head.clear()
                self.in_head = self._frames = False
            return b""
        rest = bytes(self.head[blank.end() :])
        del self.head[blank.end() :]
        self.in_head = False
        return rest

    def _feed_frames(self, data: bytes | bytearray) -> None:
        at, end, header = 0, len(data), self._header
        while at < end:
            if self._left:
                at = self._skip(data, at, end)
                continue
            if len(header) < 2:  # the first two bytes tell the header's size
                at = self._take(data, at, 2)
                if len(header) < 2:
                    return
            size = header_size(header)
            if len(header) < size:
                at = self._take(data, at, size)
                if len(header) < size:
                    return
            self._left = payload_size(header)
            if not header[0] & 0x08:  # a data frame; a control frame may sit inside one
                self._fragmented = not header[0] & 0x80  # FIN
            elif header[0] & 0x0F == _CLOSE and not header[1] & 0x80 and self._left >= 2:
                self._close = bytearray()
            header.clear()

    def _skip(self, data: bytes | bytearray, at: int, end: int) -> int:
        """Past the payload of the current frame in ``data[at:end]`` (a close frame's is
        kept); returns the new ``at``."""
        step = min(self._left, end - at)
        if self._close is not None:
            self._close += data[at : at + step]
        self._left -= step
        if not self._left and self._close is not None:
            self._closed(self._close)
        return at + step

    def _closed(self, payload: bytearray) -> None:
        self._close = None
        code = int.from_bytes(payload[:2], "big")
        self.close_frame = (code, payload[2:].decode("utf-8", "replace"))

    def _take(self, data: bytes | bytearray, at: int, size: int) -> int:
        """Add to the header from ``data[at:]`` up to ``size`` bytes; returns the new ``at``."""
        taken = data[at : at + size - len(self._header)]
        self._header += taken
        return at + len(taken)


_CLOSE = 0x8  # the close frame's opcode

# Where an HTTP head ends (h11, which wsproto uses, takes a bare LF too).
_BLANK_LINE = re.compile(b"\n\r?\n")
_MAX_HEAD_BYTES = 64 * 1024  # h11 refuses a head past 16 KiB


def header_size(header: bytearray) -> int:
    """The size of the frame header whose first two bytes begin ``header``."""
    length = header[1] & 0x7F
    extended = 2 if length == 126 else 8 if length == 127 else 0
    return 2 + extended + (4 if header[1] & 0x80 else 0)  # and the mask key, if masked


def payload_size(header: bytearray) -> int:
    length = header[1] & 0x7F
    if length == 126:
        return int.from_bytes(header[2:4], "big")
    if length == 127:
        return int.from_bytes(header[2:10], "big")
    return length
