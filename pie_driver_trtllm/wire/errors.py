"""Error codes of protocol v1 and the exceptions that carry them to the protocol edge."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    BAD_FRAME = "BAD_FRAME"
    BAD_REQUEST = "BAD_REQUEST"
    UNKNOWN_OP = "UNKNOWN_OP"
    VERSION = "VERSION"
    UNSUPPORTED = "UNSUPPORTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    HISTORY_GAP = "HISTORY_GAP"
    UNKNOWN_CONTEXT = "UNKNOWN_CONTEXT"
    CAPACITY = "CAPACITY"
    ENGINE_ERROR = "ENGINE_ERROR"
    REPLICA_LOST = "REPLICA_LOST"
    SHUTTING_DOWN = "SHUTTING_DOWN"


class DriverError(Exception):
    """An error that becomes one `{"code", "message", ...}` map on the wire."""

    def __init__(self, code: ErrorCode, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code.value, "message": self.message, **self.details}


class HistoryGap(DriverError):
    def __init__(self, context: int, position: int, known_length: int) -> None:
        super().__init__(
            ErrorCode.HISTORY_GAP,
            f"context {context}: position {position} is past the history's end; resend from {known_length}",
            known_length=known_length,
        )

