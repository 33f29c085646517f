"""Where a forward's time goes inside the driver, stage by stage (option `stage_times`).

A forward passes the stages in this order on the socket's thread: `decode` (frame to request objects),
`plan` (merge into histories, lookahead, rows), `engine` (the engine call), `finish` (results into the
reply), `encode` (reply bytes) and `send` (handed to ZeroMQ). `wait` is the time from a forward's reply
to the next forward's frame in hand: the host's own work and the transport both ways, as the driver
sees them; `slept` counts the forwards whose frame came only after the socket thread had stopped
busy-polling and gone to sleep (`busy_poll_us` was too short for that host). Totals are kept, not
samples, so that a reader takes differences between two `stats` calls.

One frame is timed at a time, by the thread that took it: frames another thread serves meanwhile (the
standby's `health` during a long engine call) are not timed and do not disturb the one that is, and a
forward that waited in the queue is not timed.
"""

from __future__ import annotations

import threading
import time

STAGES = ("wait", "decode", "plan", "engine", "finish", "encode", "send")


class StageClock:
    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.forwards = 0
        self._frame: list[tuple[str, float]] = []
        self._start = 0.0
        self._sent_at: float | None = None  # when the last forward's reply left, if nothing came between
        self._thread: int | None = None  # the thread timing a frame now
        self.slept = False  # set by the socket thread when it stops busy-polling and blocks
        self.slept_forwards = 0
        self._frame_slept = False

    def frame(self) -> None:
        """A frame is in hand."""
        if self._thread is not None:
            return
        self._thread = threading.get_ident()
        self._start = time.perf_counter()
        self._frame = []
        self._frame_slept, self.slept = self.slept, False

    def mark(self, stage: str) -> None:
        if self._thread == threading.get_ident():
            self._frame.append((stage, time.perf_counter()))

    def sent(self, forward: bool) -> None:
        """The reply left; only a forward's stages are kept, and `wait` only between two forwards."""
        now = time.perf_counter()
        self.slept = False  # the busy poll starts again with every reply
        if self._thread != threading.get_ident():
            return
        self._thread = None
        if not forward:
            self._sent_at = None
            return
        seconds = self.seconds
        if self._sent_at is not None:
            seconds["wait"] += self._start - self._sent_at
        last = self._start
        for stage, at in self._frame:
            seconds[stage] += at - last
            last = at
        seconds["send"] += now - last
        self.forwards += 1
        self.slept_forwards += self._frame_slept
        self._sent_at = now

    def drop(self) -> None:
        """The frame being timed was answered by another thread (its engine call overran its deadline)."""
        self._thread = None
        self._sent_at = None

    def report(self) -> dict[str, object]:
        return {"forwards": self.forwards, "slept": self.slept_forwards,
                "seconds": {stage: round(s, 6) for stage, s in self.seconds.items()}}
