"""The backend of a single replica: the driver core of one engine on one device."""

from __future__ import annotations

from typing import Any

from .core import DriverCore
from .errors import ErrorCode
from .protocol import Fork, Forward, Release, Request, Truncate


class LocalBackend:
    def __init__(self, core: DriverCore, device: str) -> None:
        self.core = core
        self.device = device

    def handle(self, request: Request) -> dict[str, Any]:
        body = request.body
        if isinstance(body, Forward):
            return self.core.forward(body)
        if isinstance(body, Fork):
            return self.core.fork(body)
        if isinstance(body, Truncate):
            return self.core.truncate(body)
        if isinstance(body, Release):
            return self.core.release(body)
        raise AssertionError(f"op {request.op!r} reached the backend")  # the server answers the others

    def health(self) -> dict[str, Any]:
        replica: dict[str, Any] = {"device": self.device, "alive": True, "contexts": len(self.core.store),
                                   "engine": "ok"}
        stuck_for = getattr(self.core.engine, "stuck_for_s", None)  # set by engine_guard.GuardedEngine
        if stuck_for is not None:
            replica.update(engine="stuck", stuck_s=round(stuck_for, 3))
        return {"status": "ok" if stuck_for is None else "degraded", "replicas": [replica]}

    def stats(self) -> dict[str, Any]:
        return {**self.core.stats(), "engine_timeouts": getattr(self.core.engine, "timeouts", 0)}

    def count_error(self, code: ErrorCode | str) -> None:
        self.core.counters.error(code)
