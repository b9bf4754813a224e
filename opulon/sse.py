"""Incremental Server-Sent Events splitting, byte-exact.

The gateway relays upstream streams unchanged, so events are handled as the raw bytes that
arrived: :class:`SSESplitter` only finds where each event ends, and :func:`event_fields` reads
the ``event`` and ``data`` fields of one event when a caller needs them.

Lines end with ``\\n``, ``\\r\\n`` or a lone ``\\r`` (as the SSE spec allows) and an event ends
at the first blank line. A blank line where an event would start forms an event of its own
(the spec dispatches nothing for it), so every byte belongs to exactly one event or to the tail.
"""

from __future__ import annotations

import re

__all__ = ["SSESplitter", "event_fields"]

# A line terminator directly followed by another one: the end of an event. A lone CR must
# not be the first half of a CRLF, or "a\r\nb" would look like a blank line.
_BOUNDARY = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")
_LF = 0x0A
_CR = 0x0D


def _split(buf: bytes) -> tuple[list[bytes], int]:
    """Complete events at the start of ``buf`` and the offset where the unfinished rest begins."""
    events: list[bytes] = []
    pos = 0
    n = len(buf)
    if b"\r" not in buf:  # nearly every real stream: plain LF
        find = buf.find
        if buf.endswith(b"\n\n") and find(b"\n\n") == n - 2 and buf[0] != _LF:  # one event
            return [buf], n
        while pos < n:
            if buf[pos] == _LF:
                end = pos + 1
            else:
                i = find(b"\n\n", pos)
                if i < 0:
                    break
                end = i + 2
            events.append(buf[pos:end])
            pos = end
        return events, pos
    search = _BOUNDARY.search
    while pos < n:
        first = buf[pos]
        if first == _LF:
            end = pos + 1
        elif first == _CR:
            if pos + 1 == n:  # may be the first half of a CRLF
                break
            end = pos + 2 if buf[pos + 1] == _LF else pos + 1
        else:
            m = search(buf, pos)
            if m is None:
                break
            end = m.end()
            if end == n and buf[-1] == _CR:  # the blank line might still be a CRLF
                break
        events.append(buf[pos:end])
        pos = end
    return events, pos


def _may_hold_boundary(data: bytes) -> bool:
    if b"\r" in data:
        return _BOUNDARY.search(data) is not None
    return b"\n\n" in data


class SSESplitter:
    """Cuts a byte stream into complete raw events, whatever the chunking.

    ``feed`` returns the events completed by a chunk, each with its terminating blank line;
    the concatenation of everything returned plus :attr:`tail` is exactly the input.
    """

    __slots__ = ("_edge", "_parts", "_size")

    def __init__(self) -> None:
        self._parts: list[bytes] = []  # the unfinished event, as received
        self._size = 0
        self._edge = b""  # its last three bytes: a blank line may begin there

    @property
    def tail(self) -> bytes:
        """The bytes of the event not finished yet."""
        parts = self._parts
        if len(parts) > 1:
            parts[:] = [b"".join(parts)]
        return parts[0] if parts else b""

    @property
    def pending(self) -> int:
        """How many bytes :attr:`tail` holds, without joining them."""
        return self._size

    def feed(self, chunk: bytes) -> list[bytes]:
        if not chunk:
            return []
        parts = self._parts
        if parts:
            # A long event arriving in many pieces is only joined once its end is in sight.
            if self._size > 3 and not _may_hold_boundary(self._edge + chunk):
                parts.append(chunk)
                self._size += len(chunk)
                self._edge = (self._edge + chunk[-3:])[-3:]
                return []
            parts.append(chunk)
            buf = b"".join(parts)
            parts.clear()
        else:
            buf = chunk
        events, pos = _split(buf)
        if pos < len(buf):
            rest = buf[pos:] if pos else buf
            parts.append(rest)
            self._size = len(rest)
            self._edge = rest[-3:]
        else:
            self._size = 0
            self._edge = b""
        return events

    def reset(self) -> bytes:
        """Drop and return the unfinished tail (at the end of a stream)."""
        tail = self.tail
        self._parts.clear()
        self._size = 0
        self._edge = b""
        return tail


def event_fields(raw_event: bytes) -> tuple[bytes | None, bytes]:
    """The event name (``None`` when absent or empty) and the data of one raw event.

    Several ``data`` lines are joined with ``\\n``; one space after the colon is dropped;
    comment lines (starting with ``:``) and other fields are ignored.
    """
    name: bytes | None = None
    data: list[bytes] = []
    for line in raw_event.splitlines():
        if not line or line[0] == 0x3A:  # blank line or ':' comment
            continue
        field, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value or None
    return name, b"\n".join(data)
