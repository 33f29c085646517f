"""What the server serves (`Backend`: one replica's core, or a router over several), and the backend of a
single replica: the driver core of one engine on one device.

`begin` plans an op while the server holds the socket; a forward that needs the engine comes back as a
`Pending` whose `run` (the engine call) the server makes without holding it, so that a standby thread
can answer `health` meanwhile and give up on the call at its deadline (`expire`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pie_driver_trtllm.core.decode_step import DecodePlan
from pie_driver_trtllm.core.driver_core import DriverCore, ForwardPlan
from pie_driver_trtllm.serving.engine_guard import GuardedEngine
from pie_driver_trtllm.wire.codec import (
    Fork,
    Forward,
    ForwardTokens,
    FrameRejected,
    Limits,
    LoadWeights,
    Release,
    Request,
    Sleep,
    Truncate,
    Wake,
    decode_frame,
    encode_ok,
)
from pie_driver_trtllm.wire.errors import DriverError, ErrorCode


@dataclass
class Pending:
    """The slow part of an op: `run()` outside the socket lock, then `finish(result)` gives the reply.
    Past `deadline`, `expire()` gives the reply instead, or None when `run` has just returned."""

    run: Callable[[], Any]
    finish: Callable[[Any], dict[str, Any]]
    expire: Callable[[], dict[str, Any] | None]
    deadline: float | None = None


class Backend(Protocol):
    """What the transport serves: the core of one replica, or a router over several."""

    def decode_frame(self, frame: bytes | memoryview, limits: Limits) -> Request: ...
    def rehearse(self, frame: bytes | memoryview, limits: Limits, arrived: Callable[[], bool]) -> bool: ...
    def begin(self, request: Request) -> dict[str, Any] | ForwardTokens | Pending: ...
    def health(self) -> dict[str, Any]: ...
    def stats(self) -> dict[str, Any]: ...
    def count_error(self, code: str) -> None: ...


class LocalBackend:
    def __init__(self, core: DriverCore, device: str) -> None:
        if not isinstance(core.engine, GuardedEngine):
            core.engine = GuardedEngine(core.engine, 0)
        self.core = core
        self.engine: GuardedEngine = core.engine
        self.device = device

    def decode_frame(self, frame: bytes | memoryview, limits: Limits) -> Request:
        return decode_frame(frame, limits)

    def rehearse(self, frame: bytes | memoryview, limits: Limits, arrived: Callable[[], bool]) -> bool:
        """The driver's side of the last decode step once more, changing nothing: decode its frame, plan it
        read-only, encode its reply, stopping between them once `arrived()` (the next request is here).
        Called between steps, it brings back into the CPU's caches what the engine call evicted, so that
        the next step's own decode and plan run warm. False when the last forward was no decode step."""
        core = self.core
        if not core.last_was_decode:
            return False
        try:
            request = decode_frame(frame, limits)
        except FrameRejected:
            return False
        body = request.body
        if not isinstance(body, Forward) or arrived():
            return True
        if core.plan_decode(body, dry=True) is not None and not arrived():
            tokens = body.columns.tokens if body.columns is not None else [item.tokens[0] for item in body.items]
            encode_ok(request.id, ForwardTokens(tokens, core.weights_version))
        return True

    def begin(self, request: Request) -> dict[str, Any] | ForwardTokens | Pending:
        body = request.body
        if isinstance(body, Forward):
            return self._forward(body)
        if isinstance(body, Fork):
            return self.core.fork(body)
        if isinstance(body, Truncate):
            return self.core.truncate(body)
        if isinstance(body, Release):
            return self.core.release(body)
        if isinstance(body, LoadWeights | Sleep | Wake):
            return self._slow_state_op(body)
        raise AssertionError(f"op {request.op!r} reached the backend")  # the server answers the others

    def _slow_state_op(self, body: LoadWeights | Sleep | Wake) -> Pending:
        """A weight load, sleep or wake: it may take seconds, so it runs like a forward's engine call
        (the standby thread answers `health` and `stats` meanwhile), with no deadline."""
        refused = self.engine.refusal()
        if refused is not None:
            raise DriverError(ErrorCode.ENGINE_ERROR, str(refused))
        core = self.core
        run = core.load_weights if isinstance(body, LoadWeights) else core.sleep if isinstance(body, Sleep) \
            else core.wake
        return Pending(run=lambda: run(body), finish=lambda reply: reply, expire=lambda: None)  # type: ignore[arg-type]

    def _forward(self, body: Forward) -> dict[str, Any] | ForwardTokens | Pending:
        core, engine = self.core, self.engine
        refused = core.refusal()
        if refused is not None:
            return core.refuse_forward(body, refused)
        step = core.plan_decode(body)
        if step is not None:
            return self._decode(step)
        plan = core.plan_forward(body)
        if not plan.rows:  # everything served from the lookahead buffer (or failed validation)
            return core.finish_forward(plan, [])
        refused = engine.refusal()
        if refused is not None:
            return core.finish_forward(plan, core.fail_rows(plan.rows, refused))
        contexts = {row.context for row in plan.rows}
        return Pending(run=lambda: engine.call(lambda: core.run_rows(plan.rows), contexts),
                       finish=lambda results: core.finish_forward(plan, results),
                       expire=lambda: self._expire(plan), deadline=engine.deadline())

    def _decode(self, step: DecodePlan) -> dict[str, Any] | ForwardTokens | Pending:
        """`_forward` for a decode step: the same, with the fast path's plan and reply."""
        core, engine = self.core, self.engine
        if not step.rows:
            return core.finish_decode(step, [])
        refused = engine.refusal()
        if refused is not None:
            return core.finish_decode(step, core.fail_rows(step.rows, refused))
        rows = step.rows
        return Pending(run=lambda: engine.call(lambda: core.run_rows(rows), step.contexts),
                       finish=lambda results: core.finish_decode(step, results),
                       expire=lambda: self._expire_decode(step), deadline=engine.deadline())

    def _expire_decode(self, step: DecodePlan) -> dict[str, Any] | ForwardTokens | None:
        error = self.engine.expire()
        if error is None:
            return None
        return self.core.finish_decode(step, self.core.fail_rows(step.rows, error))

    def _expire(self, plan: ForwardPlan) -> dict[str, Any] | None:
        error = self.engine.expire()
        if error is None:
            return None
        return self.core.finish_forward(plan, self.core.fail_rows(plan.rows, error))

    def health(self) -> dict[str, Any]:
        replica: dict[str, Any] = {"device": self.device, "alive": True, "contexts": len(self.core.store),
                                   "engine": "ok"}
        stuck_for = self.engine.stuck_for_s
        if stuck_for is not None:
            replica.update(engine="stuck", stuck_s=round(stuck_for, 3))
        status = "ok" if stuck_for is None and self.core.weights_serving else "degraded"
        return {"status": status, **self.core.weights_health(), "replicas": [replica]}

    def stats(self) -> dict[str, Any]:
        return {**self.core.stats(), "engine_timeouts": self.engine.timeouts}

    def count_error(self, code: ErrorCode | str) -> None:
        self.core.counters.error(code)
