"""The driver's second way in: a Unix stream socket in a private directory, each message length-prefixed
(`wire/stream_frames`), read and written by the thread that serves the ROUTER socket.

ZeroMQ hands every message to an I/O thread on each side, and those threads sleep between messages:
waking one costs tens of microseconds on a virtual machine, twice a round trip. Here nothing sits
between the driver's thread and the kernel, so a host that polls its end gets a reply one system call
after the driver writes it. The bounds match the ROUTER socket's: frames up to `max_frame_bytes`, reply
bytes a connection leaves unread up to `max_unread_reply_bytes`, connections counted in `max_connections`.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import struct
import tempfile
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from pie_driver_trtllm.config import StartupError
from pie_driver_trtllm.wire.errors import DriverError, ErrorCode
from pie_driver_trtllm.wire.stream_frames import SCHEME, FrameSplitter, FrameTooLarge, drop_written, header

READ_BYTES = 16 << 10  # one read when no large message is in progress
MAX_READ_BYTES = 1 << 20  # one read while a large message arrives
READ_BUDGET = 1 << 20  # bytes read from one connection per turn, so the others and the replies keep moving
MAX_WAITING_FRAMES = 64  # a connection with this many messages not yet served is not read until they are
MAX_FRAMES_PER_TURN = 256
_CREDENTIALS = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid
# The poll flags as plain ints: pyzmq's are enum members, whose `&` and `|` cost a call each.
_IN, _OUT, _ERR = int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.POLLERR)


class StreamPeer(bytes):
    """The identity of a stream connection, as a ROUTER peer's is its routing id. Queues keyed by identity
    hold both kinds, so no ZeroMQ peer may name itself like a stream connection: the identity ends in 12
    random bytes, which a peer cannot guess (ZeroMQ takes any chosen routing id, a leading zero byte
    included), and is longer than the 5 bytes of the ids ZeroMQ makes itself."""

    __slots__ = ()


class _Connection:
    __slots__ = ("ending", "fd", "identity", "outbox", "refusal", "sock", "splitter", "unsent")

    def __init__(self, sock: socket.socket, identity: StreamPeer, max_frame_bytes: int) -> None:
        self.sock, self.fd, self.identity = sock, sock.fileno(), identity
        self.splitter = FrameSplitter(max_frame_bytes)
        self.outbox: deque[memoryview] = deque()  # reply bytes the kernel has not taken yet
        self.unsent = 0
        self.refusal: DriverError | None = None  # sent once the messages before it are served; then it ends
        self.ending = False  # the peer hung up or was refused: closed once its messages are served


class StreamListener:
    """The listening socket, its connections, and their unread requests and unsent replies."""

    def __init__(self, directory: str | None, max_frame_bytes: int, max_unread_bytes: int,
                 poller: zmq.Poller, answering: Callable[[bytes], bool]) -> None:
        self.max_frame_bytes, self.max_unread_bytes = max_frame_bytes, max_unread_bytes
        # Whether an op of a connection runs or waits to run: its refusal and its closing wait for it.
        self._answering = answering
        self.refused = 0
        self._own_dir = directory is None  # beside the ROUTER's private socket, or in a directory of its own
        self._dir = tempfile.mkdtemp(prefix="pie-trtllm-s-", dir="/tmp") if directory is None else directory
        os.chmod(self._dir, 0o700)
        self.path = os.path.join(self._dir, "s.sock")
        self.url = SCHEME + self.path
        self._poller = poller
        self._by_fd: dict[int, _Connection] = {}
        self._by_identity: dict[bytes, _Connection] = {}
        self._serial = 0
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        umask = os.umask(0o077)  # private from its creation, not from a chmod after it
        try:
            self._socket.bind(self.path)
        except OSError as exc:
            self.close()
            raise StartupError(f"endpoint: cannot bind the stream socket {self.path}: {exc.strerror}") from None
        finally:
            os.umask(umask)
        os.chmod(self.path, 0o600)
        self._socket.listen(64)
        self._socket.setblocking(False)
        self.fd = self._socket.fileno()
        poller.register(self.fd, _IN)

    @property
    def connections(self) -> int:
        return len(self._by_fd)

    @property
    def waiting(self) -> bool:
        """Whether a message has been read and not served: the serving loop must not sleep."""
        return any(conn.splitter.frames or (conn.refusal and not self._answering(conn.identity))
                   for conn in self._by_fd.values())

    # ------------------------------------------------------------------ one turn of the serving loop

    def serve(self, events: dict[Any, int], admit: Callable[[], bool],
              deliver: Callable[[StreamPeer, bytes | memoryview], None],
              refuse: Callable[[StreamPeer, DriverError], None]) -> None:
        """Accept, write what waits, read, then serve the messages read, a turn of each connection at a
        time. `deliver` may let another thread take over (an engine call): each message is taken out of
        its queue before it is served, so neither thread serves one twice."""
        by_fd = self._by_fd
        if self.fd in events:
            self._accept(admit)
        for fd, flags in events.items():
            conn = by_fd.get(fd) if type(fd) is int else None
            if conn is None:
                continue
            if flags & (_OUT | _ERR) and conn.outbox:  # an error: the write finds out which
                self._flush(conn)
            if flags & (_IN | _ERR) and not conn.ending:
                self._read(conn)
        served = 0
        while served < MAX_FRAMES_PER_TURN:
            progressed = False
            for conn in list(by_fd.values()):
                if by_fd.get(conn.fd) is not conn:  # closed while another thread served (see above)
                    continue
                if conn.splitter.frames:
                    served += 1
                    progressed = True
                    deliver(conn.identity, conn.splitter.frames.popleft())
                elif conn.ending and not self._answering(conn.identity):  # (a refusal ends it too)
                    if conn.refusal is not None:  # only once the ops before it are answered
                        refusal, conn.refusal = conn.refusal, None
                        progressed = True
                        refuse(conn.identity, refusal)
                    elif not conn.outbox:
                        self._close(conn)
            if not progressed:
                return  # nothing left to serve; connections still writing replies wait for their turn

    def _accept(self, admit: Callable[[], bool]) -> None:
        for _ in range(64):
            try:
                sock, _ = self._socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors: the next turn tries again
                return
            uid = _CREDENTIALS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size))[1]
            if uid != os.getuid() or not admit():
                self.refused += 1
                sock.close()
                continue
            sock.setblocking(False)
            self._serial += 1
            conn = _Connection(sock, StreamPeer(b"\x00stream-%d-" % self._serial + os.urandom(12)),
                               self.max_frame_bytes)
            self._by_fd[conn.fd] = conn
            self._by_identity[conn.identity] = conn
            self._poller.register(conn.fd, _IN)

    def _read(self, conn: _Connection) -> None:
        splitter, budget = conn.splitter, READ_BUDGET
        while budget > 0 and len(splitter.frames) < MAX_WAITING_FRAMES:
            size = READ_BYTES if not splitter.buffered else max(READ_BYTES, min(splitter.missing, MAX_READ_BYTES))
            try:
                chunk = conn.sock.recv(size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                chunk = b""
            if not chunk:  # hung up: its messages are still served, then it is closed
                self._end(conn)
                return
            budget -= len(chunk)
            try:
                splitter.feed(chunk)
            except FrameTooLarge as exc:
                conn.refusal = DriverError(ErrorCode.BAD_FRAME, f"{exc}; the connection is closed after this reply")
                self._end(conn)
                return
            if len(chunk) < size:  # the kernel had no more: spare the read that would say so
                return

    def _end(self, conn: _Connection) -> None:
        """Read no more from it; it closes once its messages are served and its replies written."""
        conn.ending = True
        self._watch(conn)

    # ------------------------------------------------------------------ replies

    def unread(self, identity: bytes) -> int:
        conn = self._by_identity.get(identity)
        return conn.unsent if conn is not None else 0

    def admits(self, identity: bytes, size: int) -> bool:
        """Whether a reply of `size` bytes may be sent: it fits the bound, or nothing waits."""
        unsent = self.unread(identity)
        return unsent == 0 or unsent + size <= self.max_unread_bytes

    def send(self, identity: bytes, payload: bytes) -> bool:
        """Write a reply, or queue what the kernel does not take now. False: dropped (the connection is
        gone, or its unsent replies are past the bound)."""
        conn = self._by_identity.get(identity)
        if conn is None:
            return False
        if conn.outbox:
            if conn.unsent > self.max_unread_bytes:
                return False
            self._queue(conn, memoryview(header(payload)), memoryview(payload))
            return True
        head = header(payload)
        try:
            sent = conn.sock.sendmsg((head, payload), (), socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # the peer is gone: what it sent is still served, the replies dropped
            self._drop(conn)
            return False
        if sent < len(head) + len(payload):  # the kernel took part: the rest waits for room
            pieces = deque((memoryview(head), memoryview(payload)))
            drop_written(pieces, sent)
            self._queue(conn, *pieces)
        return True

    def _queue(self, conn: _Connection, *pieces: memoryview) -> None:
        was_empty = not conn.outbox
        for piece in pieces:
            conn.outbox.append(piece)
            conn.unsent += len(piece)
        if was_empty:
            self._watch(conn)

    def _flush(self, conn: _Connection) -> None:
        while conn.outbox:
            try:
                sent = conn.sock.sendmsg(list(conn.outbox)[:64], (), socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(conn)
                return
            conn.unsent -= sent
            drop_written(conn.outbox, sent)
        self._watch(conn)
        if conn.ending and not conn.splitter.frames and conn.refusal is None and not self._answering(conn.identity):
            self._close(conn)

    def _drop(self, conn: _Connection) -> None:
        """The peer cannot be written to: forget its unsent replies and read no more."""
        conn.outbox.clear()
        conn.unsent = 0
        self._end(conn)

    def _watch(self, conn: _Connection) -> None:
        """Poll for what the connection waits on: reading unless it ends, writing while replies wait."""
        # (flags 0 takes it off the poller)
        self._poller.register(conn.fd, (0 if conn.ending else _IN) | (_OUT if conn.outbox else 0))

    # ------------------------------------------------------------------ closing

    def _close(self, conn: _Connection) -> None:
        with contextlib.suppress(KeyError):
            self._poller.unregister(conn.fd)
        del self._by_fd[conn.fd]
        del self._by_identity[conn.identity]
        conn.sock.close()

    def close(self, linger_s: float = 0.0) -> None:
        """Write the replies that wait for up to `linger_s` (as the ROUTER's linger does), then close every
        connection and the socket; remove the socket file and a directory of its own."""
        deadline = time.monotonic() + linger_s
        writing = [conn for conn in self._by_fd.values() if conn.outbox]
        while writing and time.monotonic() < deadline:
            room = select.poll()
            for conn in writing:
                room.register(conn.fd, select.POLLOUT)
            room.poll(max(1, int((deadline - time.monotonic()) * 1000)))
            for conn in writing:
                self._flush(conn)
            writing = [conn for conn in writing if conn.outbox and self._by_fd.get(conn.fd) is conn]
        for conn in list(self._by_fd.values()):
            self._close(conn)
        with contextlib.suppress(KeyError):
            self._poller.unregister(self._socket.fileno())
        self._socket.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        if self._own_dir:
            shutil.rmtree(self._dir, ignore_errors=True)
