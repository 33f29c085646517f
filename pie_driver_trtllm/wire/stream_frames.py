"""Messages on a byte stream (the driver's Unix stream socket): each one a 4-byte big-endian length, then
that many bytes holding one msgpack map. Both directions use it."""

from __future__ import annotations

import struct
from collections import deque

HEADER = struct.Struct(">I")
MAX_LENGTH = (1 << 32) - 1  # what the header can say
SCHEME = "unix://"


class FrameTooLarge(Exception):
    """A header declared more bytes than the reader accepts; the stream cannot be read past it."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"a message of {length} bytes exceeds max_frame_bytes ({limit})")
        self.length, self.limit = length, limit


def header(payload: bytes | memoryview) -> bytes:
    return HEADER.pack(len(payload))


def drop_written(pieces: deque[memoryview], sent: int) -> None:
    """Drop from the front of `pieces` the `sent` bytes a write took, leaving what is still to write."""
    while sent and sent >= len(pieces[0]):
        sent -= len(pieces.popleft())
    if sent:
        pieces[0] = pieces[0][sent:]


class FrameSplitter:
    """Cuts the bytes of a stream, fed in whatever pieces they arrived in, into whole messages.

    A message is taken out (`frames.popleft()`) before it is acted on, so a reader that is interrupted
    while acting on one, and another reader that goes on meanwhile, never see a message twice.
    Memory held is what arrived and was not yet taken, never what a header merely declares.
    """

    __slots__ = ("_buffer", "frames", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffer = bytearray()  # the start of a message that has not wholly arrived
        self.frames: deque[bytes | memoryview] = deque()

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message held."""
        return len(self._buffer)

    @property
    def missing(self) -> int:
        """Bytes still to come before the incomplete message (or the next header) is whole."""
        held = len(self._buffer)
        if held < HEADER.size:
            return HEADER.size - held
        return HEADER.size + HEADER.unpack_from(self._buffer)[0] - held

    def feed(self, chunk: bytes) -> None:
        """Add what arrived; complete messages join `frames`. Raises FrameTooLarge at a header over the
        limit, after queueing every message before it."""
        if self._buffer:
            self._buffer += chunk
            data: bytes | bytearray = self._buffer
        else:
            data = chunk  # the common case: the chunk starts a message, nothing to copy
        offset, size, view = 0, len(data), memoryview(data)
        try:
            while size - offset >= HEADER.size:
                (length,) = HEADER.unpack_from(data, offset)
                if length > self.limit:
                    raise FrameTooLarge(length, self.limit)
                end = offset + HEADER.size + length
                if end > size:
                    break
                frame = view[offset + HEADER.size:end]
                if data is not chunk:  # the buffer is reused: copy out of it, and let go of the view
                    frame, piece = bytes(frame), frame
                    piece.release()
                self.frames.append(frame)
                offset = end
        finally:
            view.release()
            self._keep(data, offset)

    def _keep(self, data: bytes | bytearray, offset: int) -> None:
        if data is self._buffer:
            del self._buffer[:offset]
        else:
            self._buffer = bytearray(data[offset:])
