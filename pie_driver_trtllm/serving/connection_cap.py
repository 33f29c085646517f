"""A cap on the connections the ROUTER socket holds: libzmq accepts every connection and offers no limit.

Its socket monitor reports each accepted connection and each disconnection with the connection's file
descriptor; a connection accepted past the cap is shut down at once (the newest go first), so a peer
opening thousands of connections costs a descriptor and about 28 KiB only for as long as it takes to
close them, and the connections already served keep theirs.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import struct
from collections.abc import Callable

import zmq

_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
_HEADER = struct.Struct("=HI")  # event number, value (the connection's descriptor)
_monitors = itertools.count()


class ConnectionCap:
    """Counts the ROUTER's live connections from its monitor and closes those past `limit`."""

    def __init__(self, context: zmq.Context, router: zmq.Socket, limit: int) -> None:
        self.limit = limit
        self.elsewhere: Callable[[], int] = lambda: 0  # connections counted against the same limit elsewhere
        self.refused = 0
        self._router = router
        self._live: dict[int, None] = {}  # descriptors of live connections, oldest first
        self._closing: set[int] = set()  # shut down here, disconnection not reported yet
        self._local: str | bytes | int | None = None
        address = f"inproc://pie-driver-connections-{os.getpid()}-{next(_monitors)}"
        router.monitor(address, _EVENTS)
        self.socket = context.socket(zmq.PAIR)
        # No high-water mark: a dropped event would skew the count for the driver's whole life.
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)

    def listening_on(self, url: str) -> None:
        """Where the ROUTER is bound (its LAST_ENDPOINT): only a socket with this local address is shut down."""
        if url.startswith("ipc://"):
            path = url[len("ipc://"):]
            self._local = b"\0" + path[1:].encode() if path.startswith("@") else path
        elif url.startswith("tcp://"):
            self._local = int(url.rsplit(":", 1)[1])

    @property
    def connections(self) -> int:
        return len(self._live)

    def has_room(self) -> bool:
        """Whether one more connection, here or elsewhere, stays within the limit."""
        return len(self._live) + self.elsewhere() < self.limit

    def drain(self) -> None:
        """Read every event the monitor has queued, then close the newest connections past the cap."""
        while True:
            try:
                header, _ = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            event, fd = _HEADER.unpack(header[:_HEADER.size])
            if event == zmq.EVENT_ACCEPTED:
                self._live[fd] = None
            else:
                self._live.pop(fd, None)
                self._closing.discard(fd)
        limit = max(0, self.limit - self.elsewhere())
        if len(self._live) > limit:
            for fd in itertools.islice(self._live, limit, None):
                if fd not in self._closing and self._shut_down(fd):
                    self._closing.add(fd)
                    self.refused += 1

    def _shut_down(self, fd: int) -> bool:
        """Shut the connection down through a duplicate of its descriptor (libzmq's own stays open until its
        I/O thread sees the end of the stream and closes it, which the monitor then reports)."""
        try:
            duplicate = socket.socket(fileno=os.dup(fd))
        except OSError:  # already closed, or no descriptor left for the duplicate: the next drain retries
            return False
        with duplicate, contextlib.suppress(OSError):
            # The event may be a moment old: act only on a socket that is one of this listener's connections.
            local = duplicate.getsockname()
            if self._local is not None and (local[1] if isinstance(local, tuple) else local) != self._local:
                return False
            duplicate.shutdown(socket.SHUT_RDWR)
            return True
        return False

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._router.disable_monitor()
        self.socket.close(0)
