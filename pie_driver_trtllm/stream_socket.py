"""The host's end of the driver's stream socket (`unix://PATH`), with the part of a ZeroMQ socket's
interface the client uses: `send`, `poll`, `recv`, `close`."""

from __future__ import annotations

import select
import socket
import time
from collections import deque

from pie_driver_trtllm.wire.stream_frames import MAX_LENGTH, SCHEME, FrameSplitter, drop_written, header


class StreamSocket:
    """One connection; messages are length-prefixed both ways. `poll(0)` costs one system call, so a host
    may spin on it."""

    def __init__(self, url: str, timeout_s: float) -> None:
        if not url.startswith(SCHEME):
            raise ValueError(f"not a {SCHEME} URL: {url!r}")
        self.url, self.timeout_s = url, timeout_s
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        try:
            self._sock.connect(url[len(SCHEME):])
        except OSError:
            self._sock.close()
            raise
        self._sock.setblocking(False)
        self._splitter = FrameSplitter(MAX_LENGTH)
        self._reader = select.poll()
        self._reader.register(self._sock, select.POLLIN)

    def send(self, frame: bytes | memoryview) -> None:
        """Write one message whole, waiting up to the timeout for room."""
        self._check_open()
        pieces = deque((memoryview(header(frame)), memoryview(frame)))
        deadline = time.monotonic() + self.timeout_s
        written = 0
        while pieces:
            try:
                sent = self._sock.sendmsg(pieces, (), socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                sent = 0
            written += sent
            drop_written(pieces, sent)
            if pieces:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([], [self._sock], [], left)[1]:
                    if written:  # the driver would read what comes next as this message's rest
                        self.close()
                        raise TimeoutError(f"could not send to {self.url} within {self.timeout_s} s; part of "
                                           "the message went out, so the connection is closed")
                    raise TimeoutError(f"could not send to {self.url} within {self.timeout_s} s")

    def poll(self, timeout_ms: int = 0) -> bool:
        """Whether a whole reply is in hand, reading what has arrived and waiting up to `timeout_ms`."""
        deadline = time.monotonic() + timeout_ms / 1000
        while not self._splitter.frames:
            self._check_open()
            try:
                chunk = self._sock.recv(max(65536, min(self._splitter.missing, 1 << 24)))
            except (BlockingIOError, InterruptedError):
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.poll(left * 1000):
                    return False
                continue
            if not chunk:
                raise ConnectionError(f"the driver at {self.url} closed the connection")
            self._splitter.feed(chunk)
        return True

    def recv(self) -> bytes:
        """The next reply, waiting up to the timeout."""
        if not self.poll(int(self.timeout_s * 1000)):
            raise TimeoutError(f"no reply from {self.url} within {self.timeout_s} s")
        return bytes(self._splitter.frames.popleft())

    def close(self, linger: int | None = None) -> None:
        self._sock.close()

    def _check_open(self) -> None:
        if self._sock.fileno() < 0:
            raise ConnectionError(f"the connection to {self.url} is closed")
