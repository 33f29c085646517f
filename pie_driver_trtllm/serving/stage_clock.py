"""Where a forward's time goes inside the driver, stage by stage (option `stage_times`).

A forward passes the stages in this order on the socket's thread: `decode` (frame to request objects),
`plan` (merge into histories, lookahead, rows), `engine` (the engine call), `finish` (results into the
reply), `encode` (reply bytes) and `send` (handed to ZeroMQ). `wait` is the time from a forward's reply
to the next forward's frame in hand: the host's own work and the transport both ways, as the driver
sees them. Totals are kept, not samples, so that a reader takes differences between two `stats` calls.
"""

from __future__ import annotations

import time

STAGES = ("wait", "decode", "plan", "engine", "finish", "encode", "send")


class StageClock:
    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.forwards = 0
        self._frame: list[tuple[str, float]] = []
        self._start = 0.0
        self._sent_at: float | None = None  # when the last forward's reply left, if nothing came between

    def frame(self) -> None:
        """A frame is in hand."""
        self._start = time.perf_counter()
        self._frame = []

    def mark(self, stage: str) -> None:
        self._frame.append((stage, time.perf_counter()))

    def sent(self, forward: bool) -> None:
        """The reply left; only a forward's stages are kept, and `wait` only between two forwards."""
        now = time.perf_counter()
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
        self._sent_at = now

    def report(self) -> dict[str, object]:
        return {"forwards": self.forwards, "seconds": {stage: round(s, 6) for stage, s in self.seconds.items()}}
