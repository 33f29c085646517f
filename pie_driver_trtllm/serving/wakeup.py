"""A pipe polled next to the sockets, so that another thread can interrupt the serving thread's poll."""

from __future__ import annotations

import contextlib
import os


class Wakeup:
    """Any thread may `set` it; the serving thread polls `fd` and `clear`s it."""

    def __init__(self) -> None:
        self.fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def set(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full of unread wake-ups: the reader will come
            os.write(self._write_fd, b"!")

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.fd, 4096):
                pass

    def close(self) -> None:
        os.close(self.fd)
        os.close(self._write_fd)
