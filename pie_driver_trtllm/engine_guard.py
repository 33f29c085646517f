"""A deadline around engine calls: a step that hangs fails its rows and fences the engine off.

Python cannot kill a thread, so a step that overruns `engine_step_timeout_s` is left running on its own
thread. Its rows fail with ENGINE_ERROR at the deadline, later steps fail at once while it is still
stuck (the engine is not thread-safe and may be wedged), `health` reports the engine as stuck, and
`fork`/`drop` calls are queued. When the stuck call finally returns, its results are thrown away, the
engine state of its contexts is dropped (it may be half-updated) and the queued calls are applied.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from .engines.base import Engine, Row, RowResult


class EngineUnresponsive(Exception):
    """The engine step did not finish within its deadline, or an earlier one still has not."""


class GuardedEngine:
    """Wraps an Engine; `step` runs on one long-lived engine thread and waits at most `timeout_s`."""

    def __init__(self, engine: Engine, timeout_s: float) -> None:
        self.inner = engine
        self.kind, self.version, self.execution_mode = engine.kind, engine.version, engine.execution_mode
        self.model, self.samplers = engine.model, engine.samplers
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._stuck_since: float | None = None  # monotonic start of the step that overran
        self._stuck_contexts: set[int] = set()
        self._deferred_drops: set[int] = set()
        self.timeouts = 0
        # One thread for every step (starting a thread per step cost ~0.15 ms a round trip); daemon, so
        # a wedged step cannot keep the process alive.
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="engine-step", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ health

    @property
    def stuck_for_s(self) -> float | None:
        """Seconds the overrunning step has been running, or None when the engine is responsive."""
        since = self._stuck_since
        return None if since is None else time.monotonic() - since

    # ------------------------------------------------------------------ the Engine interface

    def step(self, rows: list[Row]) -> list[RowResult]:
        with self._lock:
            if self._stuck_since is not None:
                raise EngineUnresponsive(f"an engine step has been running for {self.stuck_for_s:.1f} s "
                                         f"(over engine_step_timeout_s = {self.timeout_s:g}); not started")
        box: dict[str, Any] = {}
        done = threading.Event()
        contexts = {row.context for row in rows}
        started = time.monotonic()
        self._jobs.put((rows, box, done, contexts))
        if not done.wait(self.timeout_s):
            with self._lock:
                if not done.is_set():  # re-checked under the lock: _run may have finished just now
                    self.timeouts += 1
                    self._stuck_since = started
                    self._stuck_contexts = contexts
                    raise EngineUnresponsive(f"engine step exceeded engine_step_timeout_s = {self.timeout_s:g} s; "
                                             "the engine is fenced off until it returns")
        if "error" in box:
            raise box["error"]
        return box["results"]

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._run(*job)

    def _run(self, rows: list[Row], box: dict[str, Any], done: threading.Event, contexts: set[int]) -> None:
        try:
            box["results"] = self.inner.step(rows)
        except BaseException as exc:  # handed to the waiting caller, never lost on this thread
            box["error"] = exc
        with self._lock:
            done.set()
            if self._stuck_since is None:
                return
            # The caller gave up on this step: its results are stale and its contexts' engine state
            # may be half-updated, so drop that state and everything queued while we were stuck.
            drops = list(self._stuck_contexts | self._deferred_drops)
            self._stuck_contexts, self._deferred_drops = set(), set()
            try:
                self.inner.drop(drops)
            finally:
                self._stuck_since = None

    def fork(self, src: int, dst: int, length: int) -> None:
        with self._lock:
            if self._stuck_since is not None:
                self._deferred_drops.add(dst)  # dst's next step rebuilds its state from the history
                return
            self.inner.fork(src, dst, length)

    def drop(self, contexts: list[int]) -> None:
        with self._lock:
            if self._stuck_since is not None:
                self._deferred_drops.update(contexts)
                return
            self.inner.drop(contexts)

    def close(self) -> None:
        self._jobs.put(None)
        with self._lock:
            if self._stuck_since is not None:
                return  # closing under a wedged step could block exit; process exit frees it
        self.inner.close()
