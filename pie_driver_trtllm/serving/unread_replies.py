"""A bound on the reply bytes each connection has not read.

ZeroMQ gives no read receipts and its send high-water mark counts messages, not bytes. What it does
report is when it lets go of a message sent without copying: a tracked message is done once ZeroMQ has
written it into the kernel's socket buffer (or dropped it with its connection). A reply of at least
`TRACKED_BYTES` is sent that way and counted against its connection until then; a smaller one is copied
into ZeroMQ, where the high-water mark bounds how many wait.
"""

from __future__ import annotations

from collections import deque

import zmq

TRACKED_BYTES = zmq.COPY_THRESHOLD  # pyzmq copies smaller messages, and a copy is released at once


class UnreadReplies:
    """Per connection: the tracked replies ZeroMQ still holds, and whether one more fits `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._held: dict[bytes, deque[tuple[zmq.MessageTracker, int]]] = {}

    def unread(self, identity: bytes) -> int:
        held = self._held.get(identity)
        if held is None:
            return 0
        while held and held[0][0].done:  # ZeroMQ writes one connection's messages in order
            held.popleft()
        if not held:
            del self._held[identity]
            return 0
        return sum(size for _, size in held)

    def admits(self, identity: bytes, size: int) -> bool:
        """Whether a reply of `size` bytes may be sent: it fits the bound, or nothing is unread (so one
        reply at a time always gets through, whatever its size)."""
        if size < TRACKED_BYTES:
            return True
        unread = self.unread(identity)
        return unread == 0 or unread + size <= self.max_bytes

    def sent(self, identity: bytes, tracker: zmq.MessageTracker, size: int) -> None:
        self._held.setdefault(identity, deque()).append((tracker, size))
        if len(self._held) > 64:  # connections that left: ZeroMQ dropped their messages
            for gone in [key for key, held in self._held.items() if all(t.done for t, _ in held)]:
                del self._held[gone]
