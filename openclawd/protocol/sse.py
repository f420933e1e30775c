"""An incremental Server-Sent Events decoder: upstream bytes in, ``Event`` objects out.

Owns the WHATWG "event stream interpretation" of a ``text/event-stream`` body: line
splitting on CRLF, LF or a lone CR (also when a CRLF is split between two reads), the BOM
at the start of the stream, comments, fields, dispatch on a blank line, and a bound on the
memory one event may hold. It is sans-IO: it never reads a socket, starts a task, looks at
a clock or knows about HTTP; the caller feeds it the bytes it got and relays what comes
out. It must not grow dependencies beyond the stdlib and ``openclawd.errors``, since it sits
on the hot path of every streamed response.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

from openclawd.errors import UpstreamProtocolError

__all__ = ["Event", "SSEDecoder"]

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched SSE event.

    Attributes:
        event: The ``event`` field, or None when it was absent or empty, so the app sees
            null for the default type ``message``.
        data: The ``data`` lines joined with ``"\\n"``, verbatim (``"[DONE]"`` stays as is).
        id: The ``id`` field given in this event, or None. Unlike a browser's
            ``lastEventId`` it does not carry over to later events.
    """

    event: str | None
    data: str
    id: str | None


class SSEDecoder:
    """Turns a byte stream, split anywhere, into SSE events.

    Feed every chunk to ``feed`` in order, and call ``close`` at the end of the stream.
    If an event grows over ``max_event_bytes``, ``feed`` raises ``UpstreamProtocolError``
    and the decoder is then unusable: every later ``feed`` or ``close`` raises it again,
    and events completed earlier in the failing chunk are lost with the stream.

    Args:
        max_event_bytes: The most bytes one event may hold: the raw bytes of its data
            lines as received (line endings excluded) plus the line being read, whatever
            its field, whole or not yet ended. It also bounds memory when an upstream
            never sends a newline.

    Raises:
        ValueError: If ``max_event_bytes`` is not positive.
    """

    __slots__ = (
        "_max",
        "_partial",
        "_cr_pending",
        "_at_start",
        "_data",
        "_data_bytes",
        "_event",
        "_id",
        "_failed",
    )

    def __init__(self, *, max_event_bytes: int = 16 * 1024 * 1024) -> None:
        if max_event_bytes < 1:
            raise ValueError(f"max_event_bytes must be positive, not {max_event_bytes}")
        self._max = max_event_bytes
        self._failed = False
        self._partial = bytearray()
        self._reset()

    def _reset(self) -> None:
        self._partial.clear()
        # The last chunk ended in CR: a LF opening the next one ends no second line.
        self._cr_pending = False
        # Until 3 bytes arrived we cannot tell a BOM from a line that starts like one.
        self._at_start = True
        self._data: list[str] = []
        self._data_bytes = 0
        self._event: str | None = None
        self._id: str | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for the event being built and the line not yet ended."""
        return self._data_bytes + len(self._partial)

    def feed(self, data: bytes) -> list[Event]:
        """Take the next chunk of the stream and return the events it completed.

        Args:
            data: The bytes as they arrived; a chunk may end anywhere, even inside a UTF-8
                character or between the CR and LF of one line ending.

        Returns:
            The events completed by this chunk, in stream order; often empty.

        Raises:
            UpstreamProtocolError: If an event is larger than ``max_event_bytes``, or the
                decoder already failed that way.
        """
        if self._failed:
            self._fail()
        if self._at_start:
            data = self._past_bom(data)
        if not data:
            return []
        if self._cr_pending or b"\r" in data:
            data = self._lf_endings(data)
        lines = data.split(b"\n")
        tail = lines.pop()
        if not lines:
            self._partial += tail
            if len(self._partial) + self._data_bytes > self._max:
                self._fail()
            return []
        if self._partial:
            # Joined once, when the line ends, so a long line fed in small chunks stays linear.
            lines[0] = bytes(self._partial) + lines[0]
            self._partial.clear()
        events = self._lines(lines)
        if tail:
            self._partial += tail
            if len(tail) + self._data_bytes > self._max:
                self._fail()
        return events

    def _past_bom(self, data: bytes) -> bytes:
        """The stream's first bytes without the BOM, once 3 have come (b"" until then)."""
        self._partial += data
        if len(self._partial) < len(_BOM) and _BOM.startswith(self._partial):
            return b""
        self._at_start = False
        data = bytes(self._partial)
        self._partial.clear()
        return data[len(_BOM) :] if data.startswith(_BOM) else data

    def _lf_endings(self, data: bytes) -> bytes:
        """``data`` with every line ending a LF. A CR ending the chunk ends its line
        whatever follows; only a LF opening the next chunk must then be dropped, as the
        second half of a CRLF."""
        if self._cr_pending:
            self._cr_pending = False
            if data[:1] == b"\n":
                data = data[1:]
        if b"\r" in data:
            self._cr_pending = data[-1:] == b"\r"
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        return data

    def close(self) -> list[Event]:
        """End the stream: flush what is pending, then reset for a new stream.

        Lenient where the standard discards: a last line without its line ending is still
        interpreted, and a pending event with data is dispatched without the final blank
        line, so upstreams that stop short do not lose their last event.

        Returns:
            The pending event, if it had a ``data`` field; otherwise an empty list.

        Raises:
            UpstreamProtocolError: If the decoder failed earlier.
        """
        if self._failed:
            self._fail()
        lines = [bytes(self._partial), b""] if self._partial else [b""]
        events = self._lines(lines)
        self._reset()
        return events

    def _lines(self, lines: list[bytes]) -> list[Event]:
        events: list[Event] = []
        data = self._data
        limit = self._max
        for line in lines:
            if not line:
                if data:
                    events.append(Event(self._event or None, "\n".join(data), self._id))
                    data.clear()
                    self._data_bytes = 0
                self._event = None
                self._id = None
                continue
            # Any line counts while it is read (the partial-line check in ``feed``), so a
            # line of any kind counts whole too: the limit must not depend on where the
            # chunks were cut (found by tests/faults/test_fuzz.py).
            if self._data_bytes + len(line) > limit:
                self._fail()
            # The common line first: one startswith instead of a partition and a compare.
            if line.startswith(b"data:"):
                value = line[6:] if line[5:6] == b" " else line[5:]
            else:
                field = self._field(line)
                if field is None:
                    continue
                value = field
            data.append(value.decode("utf-8", "replace"))
            self._data_bytes += len(line)
        return events

    def _field(self, line: bytes) -> bytes | None:
        """A line other than ``data:``: takes an ``event`` or ``id`` field; returns the
        value of a ``data`` field written otherwise (``data`` alone), else None."""
        if line[0] == 0x3A:  # a comment
            return None
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            return value
        if name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id" and b"\0" not in value:
            self._id = value.decode("utf-8", "replace")
        # retry and unknown fields: nothing of them reaches the app.
        return None

    def _fail(self) -> NoReturn:
        # Drop what we hold: a failed stream must not keep up to max_event_bytes alive.
        self._failed = True
        self._partial.clear()
        self._data.clear()
        self._data_bytes = 0
        raise UpstreamProtocolError(f"SSE event larger than {self._max} bytes")
