"""The state ops waiting behind the running one: bounded, and taken from the connections in turns."""

from __future__ import annotations

from collections import deque

from pie_driver_trtllm.wire.codec import Request


class Backlog:
    """State ops waiting behind the running one: a queue per connection, served in turns (one op from
    each connection with ops waiting, round-robin), within a bound on ops and on their frames' bytes."""

    def __init__(self, max_ops: int, max_bytes: int) -> None:
        self.max_ops, self.max_bytes = max_ops, max_bytes
        # Keyed by connection, in turn order; each op keeps its own identity, whose type says how its
        # reply is enveloped (a message with an empty delimiter, or without).
        self._queues: dict[bytes, deque[tuple[bytes, Request, int]]] = {}
        self._ops = 0
        self.bytes = 0

    def __len__(self) -> int:
        return self._ops

    def push(self, identity: bytes, request: Request, size: int) -> bool:
        """Queue it, or False when the bound would be passed."""
        if self._ops >= self.max_ops or self.bytes + size > self.max_bytes:
            return False
        queue = self._queues.get(identity)
        if queue is None:
            queue = self._queues[identity] = deque()
        queue.append((identity, request, size))
        self._ops += 1
        self.bytes += size
        return True

    def pop(self) -> tuple[bytes, Request]:
        """The next op: the oldest of the connection whose turn it is; that connection goes last."""
        key = next(iter(self._queues))
        queue = self._queues.pop(key)
        identity, request, size = queue.popleft()
        if queue:
            self._queues[key] = queue
        self._ops -= 1
        self.bytes -= size
        return identity, request

    def holds(self, identity: bytes) -> bool:
        """Whether an op of this connection waits."""
        return identity in self._queues

    def forwards(self) -> int:
        return sum(request.op == "forward" for queue in self._queues.values() for _, request, _ in queue)
