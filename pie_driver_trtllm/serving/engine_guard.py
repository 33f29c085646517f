"""A deadline around engine calls: a call that overruns it fails its rows and fences the engine off.

Python cannot kill a thread, so a call that overruns `engine_step_timeout_s` is left running on the
thread that made it, which the server then abandons (`Abandoned`). Its rows fail with ENGINE_ERROR at
the deadline, later calls fail at once while it is still stuck (the engine is not thread-safe and may be
wedged), `health` reports it, and `fork`/`drop` calls are queued. When the stuck call finally returns,
its results are thrown away, the engine state of its contexts is dropped (it may be half-updated) and
the queued calls are applied.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pie_driver_trtllm.engines.base import Engine, Row, RowResult, rl_ops, sleep_levels

T = TypeVar("T")


class EngineUnresponsive(Exception):
    """The engine call did not finish within its deadline, or an earlier one still has not."""


class Abandoned(BaseException):
    """Raised in the thread of a call that overran its deadline, once it returns: its caller was
    answered already and must not touch driver state again. A BaseException, so that no handler on the
    way out mistakes it for a failure to report."""


@dataclass(eq=False)
class _Call:
    contexts: set[int]
    started: float


class GuardedEngine:
    """Wraps an Engine; `call` runs an engine call on the calling thread, watched by `expire`."""

    def __init__(self, engine: Engine, timeout_s: float) -> None:
        self.inner = engine
        self.kind, self.version, self.execution_mode = engine.kind, engine.version, engine.execution_mode
        self.model, self.samplers = engine.model, engine.samplers
        self.timeout_s = timeout_s  # 0: no deadline
        self.timeouts = 0
        self._lock = threading.Lock()
        self._current: _Call | None = None
        self._stuck: _Call | None = None  # the call that overran its deadline and has not returned
        self._deferred_drops: set[int] = set()
        for op in rl_ops(engine):  # offered only where the engine offers them; no deadline applies
            setattr(self, op, functools.partial(self._unwatched, getattr(engine, op)))
        self.sleep_levels = sleep_levels(engine)

    @property
    def stuck_for_s(self) -> float | None:
        """Seconds the overrunning call has been running, or None when the engine is responsive."""
        stuck = self._stuck
        return None if stuck is None else time.monotonic() - stuck.started

    def deadline(self) -> float | None:
        """When a call started now must be given up (monotonic), or None without a deadline."""
        return time.monotonic() + self.timeout_s if self.timeout_s > 0 else None

    def refusal(self) -> EngineUnresponsive | None:
        """Why a call cannot start now (an earlier one is stuck), or None."""
        if self._stuck is None:
            return None
        return EngineUnresponsive(f"an engine step has been running for {self.stuck_for_s:.1f} s "
                                  f"(over engine_step_timeout_s = {self.timeout_s:g}); not started")

    def call(self, job: Callable[[], T], contexts: set[int]) -> T:
        with self._lock:
            refused = self.refusal()
            if refused is not None:
                raise refused
            current = self._current = _Call(contexts, time.monotonic())
        try:
            return job()
        finally:
            with self._lock:
                self._current = None
                if self._stuck is current:
                    self._recover(current)
                    raise Abandoned("the engine call returned after its deadline; its results are dropped")

    def _unwatched(self, method: Callable[..., T], *args: Any) -> T:
        """An engine call without a step's deadline (a weight load, sleep, wake), refused while a step is
        stuck."""
        return self.call(lambda: method(*args), set())

    def expire(self) -> EngineUnresponsive | None:
        """At the deadline: fence the engine off and return the error for the call's rows, or None when
        the call has just returned (its result stands)."""
        with self._lock:
            if self._current is None:
                return None
            self.timeouts += 1
            self._stuck = self._current
        return EngineUnresponsive(f"engine step exceeded engine_step_timeout_s = {self.timeout_s:g} s; "
                                  "the engine is fenced off until it returns")

    def _recover(self, call: _Call) -> None:
        # The caller was answered without this call: its contexts' engine state may be half-updated, so
        # drop it and everything queued while we were stuck.
        drops = list(call.contexts | self._deferred_drops)
        self._deferred_drops = set()
        try:
            self.inner.drop(drops)
        finally:
            self._stuck = None

    # ------------------------------------------------------------------ the Engine interface

    def step(self, rows: list[Row]) -> list[RowResult]:
        return self.inner.step(rows)

    def stats(self) -> dict[str, Any]:
        inner = getattr(self.inner, "stats", None)
        return inner() if inner is not None else {}

    def fork(self, src: int, dst: int, length: int) -> None:
        with self._lock:
            if self._stuck is not None:
                self._deferred_drops.add(dst)  # dst's next step rebuilds its state from the history
                return
            self.inner.fork(src, dst, length)

    def drop(self, contexts: list[int]) -> None:
        with self._lock:
            if self._stuck is not None:
                self._deferred_drops.update(contexts)
                return
            self.inner.drop(contexts)

    def close(self) -> None:
        with self._lock:
            if self._stuck is not None:
                return  # closing under a wedged call could block exit; process exit frees it
        self.inner.close()
